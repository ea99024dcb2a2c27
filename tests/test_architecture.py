"""The house rules, as tests: no import cycles (function-level imports included), data flows
one way between finetune's subpackages, and the web process's modules never load torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "inference")
VENDORED = ROOT / "finetune" / "export" / "_vendor"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {"app": ROOT / "app.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if VENDORED not in path.parents:
                found[_module_name(path)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth of its code."""
    tree, out = ast.parse(path.read_text()), set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` names a.b.c, a.b and a
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first: not a cycle
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_at_every_depth():
    graph = _graph()
    # function-level imports count: the worker imports the recipe inside its functions
    assert "finetune.recipe.train" in graph["finetune.jobs.worker"]
    assert "inference.registry" in graph["inference.default_model"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ui -> jobs -> quality -> export -> recipe -> the package's shared modules -> inference: each
# layer names the ones above it, which it must never import
LAYERS = {
    "finetune.jobs": {"finetune.ui"},
    "finetune.quality": {"finetune.ui", "finetune.jobs"},
    "finetune.export": {"finetune.ui", "finetune.jobs", "finetune.quality"},
    "finetune.recipe": {"finetune.ui", "finetune.jobs", "finetune.quality", "finetune.export"},
    **{f"finetune.{m}": {"finetune.ui", "finetune.jobs", "finetune.quality", "finetune.export",
                         "finetune.recipe"} for m in ("config", "presets", "resources",
                                                      "distributed")},
    "inference": {"finetune", "app"},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_data_flows_one_way(layer):
    forbidden = LAYERS[layer] - {layer}
    wrong = sorted(f"{mod} -> {dep}" for mod, deps in _graph().items()
                   if mod == layer or mod.startswith(layer + ".")
                   for dep in deps if any(dep == f or dep.startswith(f + ".") for f in forbidden))
    assert wrong == []


WEB_MODULES = ["app", "finetune.ui.admin_tab", "finetune.ui.hub_panel", "finetune.ui.hot_reload",
               "finetune.ui.auth", "finetune.ui.uploads", "finetune.ui.transfers",
               "finetune.jobs.records", "finetune.jobs.resume", "finetune.config",
               "finetune.__main__",
               "inference.chat_tab", "inference.openai_api", "inference.supervisor"]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp")


def test_the_web_process_never_imports_torch():
    """What app.py's process imports (the Admin tab included) loads no torch, transformers,
    peft or llama.cpp: those live in the job process and the engine process."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in WEB_MODULES)
            + f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_ui_package_never_imports_torch_itself():
    """Not even inside a function: a UI handler that did would load torch in the web process."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("finetune.ui"):
            tree = ast.parse(path.read_text())
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                        for a in n.names}
            imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                         if isinstance(n, ast.ImportFrom)}
            assert not imported & set(HEAVY), (name, imported & set(HEAVY))
