"""What every benchmark shares: the machine it ran on, one layout for its results file, its table.

A results file in bench/results/ is a JSON list of run records, in the order first written:

    {"benchmark": name, "date": ISO 8601 date-time (UTC), "commit": git short sha (+ "-dirty"),
     "machine": {cpu, arch, cores, ram_gb, amx, gpus, python, platform, packages, ...},
     "settings": {the run's arguments}, "results": [one row per measured case],
     "summary": {verdicts over the rows}   (when the benchmark has some),
     "label": name, "note": text          (records kept by hand, and converted old ones)}

A benchmark that keeps a history (pipeline_e2e, train_throughput) replaces its record of the same
machine and settings and keeps the others; every other benchmark's file holds its latest run.
Records converted from the layouts before this one carry "commit": null and only the machine
fields those runs wrote down.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from inference.settings import ROOT

RESULTS_DIR = ROOT / "bench" / "results"
# Versions recorded with every run (read from the installed metadata: nothing is imported, so
# a process that must not load torch, or llama.cpp before it, can describe its machine too).
PACKAGES = ("llama-cpp-python", "torch", "transformers", "peft", "bitsandbytes", "gradio",
            "gradio_client")


# -- the machine --------------------------------------------------------------------------------

def machine(**extra) -> dict:
    """This machine: CPU model and flags that matter here, memory, GPUs, Python and packages;
    `extra` adds what a benchmark knows beyond that (load average, the llama.cpp build)."""
    cpuinfo = _read("/proc/cpuinfo")
    model = _field(cpuinfo, "model name") or platform.processor() or platform.machine()
    flags = set((_field(cpuinfo, "flags") or "").split())
    mem_kb = _field(_read("/proc/meminfo"), "MemTotal")
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "ram_gb": round(int(mem_kb.split()[0]) * 1024 / 1e9, 1) if mem_kb else None,
            "amx": bool(flags & {"amx_tile", "amx_bf16", "amx_int8"}) if cpuinfo else None,
            "gpus": gpus(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": packages(), **extra}


def gpus() -> list[str]:
    """The GPUs' names (nvidia-smi; without it, torch asked in a child process, never in this
    one: torch must not share a process with a CUDA build of llama.cpp); [] for none."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if not glob.glob("/dev/nvidia[0-9]*") or importlib.util.find_spec("torch") is None:
        return []
    out = subprocess.run([sys.executable, "-c", "import torch; print('\\n'.join("
                          "torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())"
                          "))"], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def packages() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def same_machine(a: dict, b: dict) -> bool:
    """The same hardware as far as both records say: the same GPUs (or none), and the same
    cores, architecture and CPU model where both name them (converted records name fewer)."""
    if list(a.get("gpus") or []) != list(b.get("gpus") or []):
        return False
    return all(a[k] == b[k] for k in ("cores", "arch", "cpu")
               if a.get(k) is not None and b.get(k) is not None)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == name), None)


# -- the results file ---------------------------------------------------------------------------

def commit() -> str | None:
    """The checkout's short sha, "-dirty" when tracked files differ from it; None without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    try:
        sha = git("rev-parse", "--short", "HEAD")
        if sha.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record(benchmark: str, settings: dict, results: list, *, summary: dict | None = None,
           note: str | None = None, machine_info: dict | None = None) -> dict:
    """One run in the results layout (the machine probed here unless given)."""
    out = {"benchmark": benchmark, "date": now(), "commit": commit(),
           "machine": machine_info if machine_info is not None else machine(),
           "settings": settings, "results": results}
    if summary is not None:
        out["summary"] = summary
    if note is not None:
        out["note"] = note
    return out


def read(path: Path) -> list[dict]:
    """The records of a results file ([] when there is none yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


def write(benchmark: str, settings: dict, results: list, *, out: Path | None = None,
          summary: dict | None = None, note: str | None = None,
          machine_info: dict | None = None, history: bool = False,
          key: Sequence[str] | None = None,
          merge: Callable[[dict, dict], dict] | None = None, replace: bool = True) -> dict:
    """Write this run to `out` (bench/results/<benchmark>.json) and return its record.

    history: keep the file's other records and replace the one of the same machine and
    settings (only the `key` settings count when given), or add this one at the end; `merge`
    (old record, new record) -> the record to keep instead of the new one. replace=False:
    always add it at the end (every run is kept)."""
    out = Path(out) if out else RESULTS_DIR / f"{benchmark}.json"
    new = record(benchmark, settings, results, summary=summary, note=note,
                 machine_info=machine_info)
    records = read(out) if history else []

    def identity(r: dict) -> dict:
        settings = r.get("settings") or {}
        return {k: settings.get(k) for k in key} if key is not None else settings

    for i, old in enumerate(records if replace else []):
        if (old.get("benchmark") == benchmark and "label" not in old
                and same_machine(old.get("machine") or {}, new["machine"])
                and identity(old) == identity(new)):
            records[i] = new = merge(old, new) if merge else new
            break
    else:
        records.append(new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return new


# -- the table ----------------------------------------------------------------------------------

def print_table(headers: Sequence[str], rows: Iterable[Sequence], formats: Sequence[str] = (),
                markdown: bool = False) -> None:
    """Columns as wide as their widest cell, numbers right-aligned; `formats`: a format spec per
    column (".1f", ",.0f", ".1%"; "" or missing: str()); None prints as nothing."""
    rows = [list(row) for row in rows]
    specs = list(formats) + [""] * (len(headers) - len(formats))
    cells = [[_cell(v, spec) for v, spec in zip(row, specs)] for row in rows]
    numeric = [any(isinstance(row[i], (int, float)) and not isinstance(row[i], bool)
                   for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if right else v.ljust(w)
                  for v, w, right in zip(values, widths, numeric)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    print(line(headers))
    if markdown:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))


def _cell(value, spec: str) -> str:
    if value is None:
        return ""
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)
