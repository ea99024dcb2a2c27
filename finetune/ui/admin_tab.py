"""The Admin tab: UI only. Reads job records, starts and cancels jobs, asks the engine to swap.

Every handler takes the session token first and checks it on the server (`_guard`): Gradio
exposes each handler as an API endpoint, so the hidden panel is cosmetic, not protection.
"""
from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from finetune import FinetuneError
from finetune import presets
from finetune.config import (FieldSpec, FinetuneConfig, config_fields, fields_by_section,
                             from_preset)
from finetune.jobs import records, resume
from finetune.presets import OFFLINE_PRESET, PRESETS
from finetune.recipe.data import inspect_dataset
from finetune.ui.auth import AdminAuth
from finetune.ui.hub_panel import hub_panel
from finetune.ui.transfers import Transfers
from finetune.ui.uploads import store_upload
from inference.errors import InferenceError
from inference.supervisor import EngineSupervisor

CUSTOM = "custom (HF id or local path)"
LOG_LINES = 14  # the Code box shows its first lines: send only as many as it shows
TRISTATE = {"auto": None, "on": True, "off": False}  # an optional_bool setting's choices
# The Training panel's own settings, outside "Advanced settings" (every other field is there,
# by section, but the data panel's DATA_FIELDS).
VISIBLE = ("num_epochs", "max_steps", "learning_rate", "lora_r", "max_seq_length", "quant_types",
           "activate_when_done")
DATA_FIELDS = ("base_model", "dataset")
FORM_QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0")  # the GGUF outputs the form offers
# The settings /admin_start took, in this order, before the form was generated from the
# fields: they keep their positions (positional API calls still fit) and always apply.
LEGACY_FIELDS = ("num_epochs", "max_steps", "learning_rate", "lora_r", "max_seq_length",
                 "lora_alpha", "lora_dropout", "micro_batch_size", "gradient_accumulation",
                 "val_split", "seed", "packing", "load_in_4bit", "quant_types",
                 "activate_when_done", "min_optimizer_steps", "gate_probes", "serve_mode",
                 "export_adapter", "memory_mode")
PRIVATE = dict(api_visibility="private")  # hidden from API docs; each still checks auth


class _Guard:
    """Decorator factory: check the token, turn user errors into gr.Error."""

    def __init__(self, auth: AdminAuth):
        self.auth = auth

    def __call__(self, fn):
        # no functools.wraps: Gradio would read fn's signature and miscount the inputs
        def wrapper(token, *args, **kwargs):
            try:
                self.auth.require(token)
                return fn(*args, **kwargs)
            except (FinetuneError, InferenceError) as exc:
                raise gr.Error(str(exc)) from None
        wrapper.__name__ = fn.__name__
        return wrapper


def _progress_html(status: dict, checkpoint_note: str = "") -> str:
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    pct = 100.0 * step / total if total else (100.0 if status.get("state") == "done" else 0.0)
    eta = status.get("eta_s")
    bits = [f"<b>{html.escape(str(status.get('stage', '?')))}</b>",
            f"step {step}/{total or '?'}"]
    if status.get("devices"):  # "2 GPUs": a job on several trains through torchrun
        bits.append(html.escape(status["devices"]))
    if eta is not None and status.get("state") not in records.FINAL_STATES:
        bits.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
    for key, label, fmt in (("tokens_per_s", "tok/s", "{:.0f}"), ("loss", "loss", "{:.4f}"),
                            ("gpu_mem_gb", "GPU GB", "{:.1f}")):
        if status.get(key) is not None:
            bits.append(f"{label} {fmt.format(status[key])}")
    if status.get("error"):
        bits.append(f"<span style='color:#c00'>{html.escape(str(status['error']))}</span>")
    if checkpoint_note:  # a running job's newest checkpoint, or where a resume would start
        bits.append(f"<span id='job-checkpoint'>{html.escape(checkpoint_note)}</span>")
    return (f"<div id='job-progress'><progress value='{pct:.1f}' max='100' style='width:100%'>"
            f"</progress><div>{' · '.join(bits)}</div></div>")


def _loss_figure(metrics: list[dict]):
    """Train and validation loss against the step, as a matplotlib figure (None: no data).

    Not gr.LinePlot: in Gradio 6.31 it fixes its set of series at its first value, so a curve
    that starts with the validation loss before training never shows the training loss."""
    train = [(m["step"], m["loss"]) for m in metrics
             if m.get("loss") is not None and m.get("step") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics
           if m.get("val_loss") is not None and m.get("step") is not None]
    if not train and not val:
        return None
    from matplotlib.figure import Figure  # not pyplot: no global state across sessions
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 2.8), dpi=110, layout="tight")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), color="#2563eb", linewidth=1.6, label="train")
    if val:
        ax.plot(*zip(*val), color="#f97316", marker="o", linewidth=1.6, label="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return fig


def _jobs_frame(records: list) -> pd.DataFrame:
    rows = [{"job": r.id, "state": r.status.get("state"), "stage": r.status.get("stage"),
             "base": r.config.get("base_model"), "created": r.status.get("created_at", ""),
             "models": ", ".join(r.status.get("models") or [])} for r in records]
    return pd.DataFrame(rows, columns=["job", "state", "stage", "base", "created", "models"])


def _eval_frame(evaluation: dict) -> pd.DataFrame:
    rows = [{"prompt": s.get("prompt"), "base model": s.get("base"),
             "fine-tuned": s.get("tuned")} for s in evaluation.get("samples", [])]
    return pd.DataFrame(rows, columns=["prompt", "base model", "fine-tuned"])


def _gate_frame(evaluation: dict) -> pd.DataFrame:
    """One row per produced file: questions answered as taught and held-out paraphrases, share
    kept of f16's, general ability against the base (first row), agreement."""
    columns = ["file", "answers as taught", "held-out paraphrases", "kept vs f16",
               "general text perplexity", "general questions", "top-1 agreement", "KL vs f16",
               "passed"]
    serve = (evaluation.get("serve") or {}).get("label")
    rows = []
    for label, row in (evaluation.get("gate") or {}).items():
        top1, kld = row.get("top1_agreement_vs_f16"), row.get("mean_kld_vs_f16")
        para, general = row.get("paraphrase") or {}, row.get("general") or {}
        if label == "base":  # general ability before the fine-tune
            rows.append({"file": "base (before)", "general text perplexity":
                         f"{general.get('perplexity', 0):.2f}", "general questions":
                         f"{general.get('right')}/{general.get('of')}", "passed": "reference"})
            continue
        change = general.get("perplexity_change")
        points = general.get("accuracy_change")
        rows.append({
            "file": f"{label}: {row.get('model')}" + (" (served)" if label == serve else ""),
            "answers as taught": f"{row.get('hits')}/{row.get('of')}",
            "held-out paraphrases": f"{para['hits']}/{para['of']}" if para else "",
            "general text perplexity": "" if change is None else
            f"{general['perplexity']:.2f} ({change:+.1%})",
            "general questions": "" if points is None else
            f"{general['right']}/{general['of']} ({points * 100:+.0f} points)",
            "kept vs f16": "" if row.get("kept") is None else f"{row['kept']:.0%}",
            "top-1 agreement": "" if top1 is None else f"{top1:.1%}",
            "KL vs f16": "" if kld is None else f"{kld:.4f}",
            "passed": "reference" if label == "F16" else "yes" if row.get("passed") else "NO"})
    return pd.DataFrame(rows, columns=columns)


def _eval_markdown(evaluation: dict, status: dict) -> str:
    lines = []
    if evaluation.get("val_loss_before") is not None:
        lines.append(f"Validation loss: **{evaluation['val_loss_before']:.4f} → "
                     f"{evaluation.get('val_loss_after', float('nan')):.4f}**")
    serve = evaluation.get("serve") or {}
    if serve.get("reason"):
        chosen = serve.get("file") or "nothing new (the old model keeps serving)"
        lines.append(f"Chat serves **{html.escape(chosen)}**: {html.escape(serve['reason'])}")
    return "  \n".join(lines)


def _report_markdown(report) -> str:
    lines = [f"**Detected:** {report.summary()}"]
    for bad in report.bad_examples[:3]:
        lines.append(f"- skipped row {bad.get('row')}: {bad.get('reason')} — "
                     f"`{bad.get('preview', '')[:80]}`")
    return "\n".join(lines)


def _rows_frame(conversations: list[list[dict]]) -> pd.DataFrame:
    """First rows as one column per role (system / user / assistant)."""
    rows = []
    for messages in conversations[:5]:
        row: dict[str, str] = {}
        for m in messages:
            row[m["role"]] = (row.get(m["role"], "") + "\n" + m["content"]).strip()
        rows.append(row)
    return pd.DataFrame(rows)


def build_admin_tab(engine: EngineSupervisor, auth: AdminAuth, jobs_dir: Path) -> None:
    tab = SimpleNamespace(engine=engine, auth=auth, guard=_Guard(auth), jobs_dir=jobs_dir,
                          models_dir=engine.settings.models_dir, token=gr.State(""),
                          transfers=Transfers())
    login = _login_row()
    with gr.Column(visible=False) as panel:
        timer = gr.Timer(2.0, active=False)
        with gr.Row():
            with gr.Column(scale=3):
                data = _data_panel(tab)
            with gr.Column(scale=2):
                training = _training_panel(tab, data)
        job = _jobs_panel(tab, training)
        served = _served_panel(tab)
        hub_panel(tab, timer)
    _wire_login(tab, login, panel, timer)
    _wire_refresh(tab, timer, job, served)


def _login_row() -> SimpleNamespace:
    with gr.Row(elem_id="admin-login"):
        password = gr.Textbox(label="Admin password", type="password", scale=3,
                              elem_id="admin-password")
        login_btn = gr.Button("Log in", variant="primary", scale=1, elem_id="admin-login-btn")
        logout_btn = gr.Button("Log out", scale=1)
    login_msg = gr.Markdown("Log in to fine-tune and manage models.")
    return SimpleNamespace(password=password, login_btn=login_btn, logout_btn=logout_btn,
                           login_msg=login_msg)


def _wire_login(tab, login: SimpleNamespace, panel: gr.Column, timer: gr.Timer) -> None:
    def do_login(pw, request: gr.Request):
        client = request.client.host if request and request.client else ""
        try:
            new_token = tab.auth.login(pw, client)
        except FinetuneError as exc:
            raise gr.Error(str(exc)) from None
        return (new_token, "Logged in.", gr.Column(visible=True), "",
                gr.Timer(active=True))

    def do_logout(tok):
        tab.auth.logout(tok)
        return "", "Logged out.", gr.Column(visible=False), gr.Timer(active=False)

    login_outputs = [tab.token, login.login_msg, panel, login.password, timer]
    login.login_btn.click(do_login, login.password, login_outputs, api_name="admin_login")
    login.password.submit(do_login, login.password, login_outputs, **PRIVATE)
    login.logout_btn.click(do_logout, tab.token, [tab.token, login.login_msg, panel, timer],
                           api_name="admin_logout")


def _data_panel(tab) -> SimpleNamespace:
    gr.Markdown("### 1 · Base model and data")
    preset = gr.Dropdown(list(PRESETS) + [CUSTOM], value=OFFLINE_PRESET,
                         label="Base model preset")
    base_custom = gr.Textbox(label="Custom base (HF id or local folder)", visible=False)
    upload = gr.File(label="Dataset upload (.json, .jsonl, .csv)",
                     file_types=[".json", ".jsonl", ".csv"], elem_id="dataset-upload")
    data_path = gr.Textbox(label="…or a local path / datasets Hub name",
                           placeholder="tests/data/faq.jsonl")
    preview_btn = gr.Button("Preview dataset")
    data_info = gr.Markdown()
    data_rows = gr.Dataframe(label="First rows", interactive=False, wrap=True)

    @tab.guard
    def preview(upload_file, path_text):
        report = inspect_dataset(_resolve_dataset(tab, upload_file, path_text))
        return _report_markdown(report), _rows_frame(report.first_rows)

    preset.change(lambda p: gr.Textbox(visible=p == CUSTOM), preset, base_custom, **PRIVATE)
    preview_btn.click(preview, [tab.token, upload, data_path], [data_info, data_rows],
                      api_name="admin_preview")
    return SimpleNamespace(preset=preset, base_custom=base_custom, upload=upload,
                           data_path=data_path)


def _resolve_dataset(tab, upload_file, path_text) -> str:
    if upload_file:
        src = Path(upload_file if isinstance(upload_file, str) else upload_file.name)
        return str(store_upload(src, src.name, tab.jobs_dir / "uploads"))
    if path_text and path_text.strip():
        return path_text.strip()
    raise FinetuneError("Choose a dataset: upload a file or give a path / Hub name.")


def _training_panel(tab, data: SimpleNamespace) -> SimpleNamespace:
    """The few settings that matter, every other one under "Advanced settings"."""
    gr.Markdown("### 2 · Training")
    w = _training_inputs()
    start_btn = gr.Button("Start fine-tune", variant="primary", elem_id="start-job")
    start_msg = gr.Markdown()
    job_pick = gr.Dropdown([], label="Job", scale=3, elem_id="job-pick",
                           allow_custom_value=True, render=False)  # shown in the jobs panel
    specs = {spec.name: spec for spec in config_fields()}

    @tab.guard
    def start(preset, base_custom, dataset_upload, dataset_path, **settings):
        """/admin_start: preset, base_custom, dataset_upload, dataset_path, then one value per
        setting, in start_fields() order: first LEGACY_FIELDS (the positions the endpoint has
        always had), then every other FinetuneConfig field in config_fields() order (without
        base_model and dataset, which the four data inputs give). Each is also a keyword
        parameter named after its field. LEGACY_FIELDS always apply; any other setting applies
        when it differs from its default, so one left at the default (or left out of an API
        call) keeps the preset's value."""
        base = base_custom.strip() if preset == CUSTOM else preset
        if not base:
            raise FinetuneError("Give a base model: an HF id or a local folder.")
        overrides = {}
        for name, value in settings.items():
            spec = specs[name]
            value = spec.coerce(_from_form(spec, value))
            if name in LEGACY_FIELDS or value != spec.default:
                overrides[name] = value
        overrides["dataset"] = _resolve_dataset(tab, dataset_upload, dataset_path)
        config = (from_preset(base, **overrides) if base in PRESETS
                  else FinetuneConfig.from_dict({"base_model": base, **overrides}))
        record = records.submit(config, tab.jobs_dir, tab.models_dir)  # validates, once
        ids = [r.id for r in records.list_jobs(tab.jobs_dir)]
        return f"Started job `{record.id}`.", gr.Dropdown(choices=ids, value=record.id)

    inputs = {"preset": data.preset, "base_custom": data.base_custom,
              "dataset_upload": data.upload, "dataset_path": data.data_path,
              **{name: w[name] for name in start_fields()}}
    start_btn.click(start, [tab.token], [start_msg, job_pick], inputs_kwargs=inputs,
                    api_name="admin_start")
    return SimpleNamespace(start_msg=start_msg, job_pick=job_pick)


def form_layout() -> tuple[list[FieldSpec], list[tuple[str, list[FieldSpec]]]]:
    """What the Training panel shows: (the VISIBLE fields, in that order; every other field but
    the data panel's, by section, for "Advanced settings")."""
    specs = {spec.name: spec for spec in config_fields()}
    visible = [specs[name] for name in VISIBLE]
    rest = [s for s in specs.values() if s.name not in VISIBLE and s.name not in DATA_FIELDS]
    return visible, fields_by_section(rest)


def start_fields() -> list[str]:
    """The settings of /admin_start after its four data inputs, in order."""
    rest = [s.name for s in config_fields() if s.name not in DATA_FIELDS]
    return [*LEGACY_FIELDS, *(name for name in rest if name not in LEGACY_FIELDS)]


def _training_inputs() -> dict:
    """FinetuneConfig field -> its input, generated from the fields' specs: the VISIBLE ones,
    then an "Advanced settings" accordion with one accordion per section."""
    visible, advanced = form_layout()
    w = {spec.name: _field_input(spec) for spec in visible}
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced-settings"):
        for section, specs in advanced:
            with gr.Accordion(section[0].upper() + section[1:], open=False):
                for spec in specs:
                    w[spec.name] = _field_input(spec, _preset_note(spec))
    return w


def _field_input(spec: FieldSpec, note: str = ""):
    """The widget for one setting, at its default: label and help (as info) from the spec."""
    common = dict(label=spec.label, info=spec.help + note,
                  elem_id="setting-" + spec.name.replace("_", "-"))
    if spec.name == "quant_types":
        return gr.CheckboxGroup(list(FORM_QUANTS), value=list(spec.default), **common)
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=spec.default, **common)
    if spec.kind == "optional_bool":
        return gr.Dropdown(list(TRISTATE), value=_tristate(spec.default), **common)
    if spec.kind == "bool":
        return gr.Checkbox(spec.default, **common)
    if spec.kind in ("int", "float"):
        return gr.Number(spec.default, precision=0 if spec.kind == "int" else None, **common)
    if spec.kind == "str_list" and not isinstance(spec.default, str):
        return gr.Textbox("\n".join(spec.default), lines=2, **{
            **common, "info": common["info"] + " One per line."})
    return gr.Textbox(spec.default, **common)


def _from_form(spec: FieldSpec, value):
    """A widget's value as FinetuneConfig.from_dict takes it."""
    if spec.kind == "optional_bool":
        return TRISTATE.get(value, value) if isinstance(value, str) else value
    if spec.kind == "str_list" and isinstance(value, str) and not isinstance(spec.default, str):
        return [line.strip() for line in value.splitlines() if line.strip()]  # one per line
    return value


def _tristate(value: bool | None) -> str:
    return next(key for key, known in TRISTATE.items() if known is value)


def _preset_note(spec: FieldSpec) -> str:
    """For a setting some preset sets itself: that the preset's value applies at the default
    (not for LEGACY_FIELDS, which always apply)."""
    if spec.name in LEGACY_FIELDS:
        return ""

    def shown(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return ", ".join(value) if isinstance(value, (list, tuple)) else str(value)

    own = [f"{name}: {shown(value)}" for name in PRESETS
           if (value := presets.config_values(name).get(spec.name, spec.default)) != spec.default]
    return f" Left at the default, a preset's own value applies ({'; '.join(own)})." if own \
        else ""


def _jobs_panel(tab, training: SimpleNamespace) -> SimpleNamespace:
    gr.Markdown("### 3 · Jobs")
    with gr.Row():
        # custom values: choices fill in per session; the handlers check every value themselves
        job_pick = training.job_pick.render()
        resume_btn = gr.Button("Resume job", scale=1, elem_id="resume-job")
        cancel_btn = gr.Button("Cancel job", variant="stop", scale=1)
    progress = gr.HTML(elem_id="job-progress-box")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", elem_id="loss-plot", format="png")
        log_tail = gr.Code(label="Log (tail)", language=None, lines=LOG_LINES,
                           max_lines=LOG_LINES)
    eval_md = gr.Markdown(elem_id="eval-summary")
    # fixed widths: long answers would otherwise push the fine-tuned column out of view
    eval_table = gr.Dataframe(label="Before / after", interactive=False, wrap=True,
                              column_widths=["20%", "40%", "40%"])
    gate_table = gr.Dataframe(label="Fidelity gate: what each file keeps of what training "
                              "taught (vs the f16 model)", interactive=False,
                              elem_id="gate-table")
    jobs_table = gr.Dataframe(label="All jobs", interactive=False)

    @tab.guard
    def cancel(job_id):
        if not job_id:
            raise FinetuneError("Pick a job to cancel.")
        records.cancel(tab.jobs_dir, job_id, wait_for_exit=False)
        return f"Cancelling `{job_id}`…"

    @tab.guard
    def resume_job(job_id):
        if not job_id:
            raise FinetuneError("Pick an interrupted or failed job to resume.")
        record = resume.resume(tab.jobs_dir, job_id)
        return f"Resuming `{record.id}`: {record.status.get('message', '')}"

    cancel_btn.click(cancel, [tab.token, job_pick], training.start_msg, api_name="admin_cancel")
    resume_btn.click(resume_job, [tab.token, job_pick], training.start_msg,
                     api_name="admin_resume")
    return SimpleNamespace(job_pick=job_pick, progress=progress, loss_plot=loss_plot,
                           log_tail=log_tail, eval_md=eval_md, eval_table=eval_table,
                           gate_table=gate_table, jobs_table=jobs_table)


def _served_panel(tab) -> SimpleNamespace:
    gr.Markdown("### 4 · Served model")
    with gr.Row():
        # "" rather than None: the refresh endpoint's API keeps this argument optional
        version_pick = gr.Dropdown([], value="", label="Model file", scale=3,
                                   allow_custom_value=True)
        activate_btn = gr.Button("Activate", scale=1)
        rollback_btn = gr.Button("Roll back", scale=1)
    served_md = gr.Markdown()
    engine = tab.engine

    @tab.guard
    def activate_version(name):
        if not name:
            raise FinetuneError("Pick a model file to activate.")
        engine.swap(name)
        return f"**Serving:** `{engine.active_name}`"

    @tab.guard
    def rollback():
        engine.rollback()
        return f"**Serving:** `{engine.active_name}` (rolled back)"

    activate_btn.click(activate_version, [tab.token, version_pick], served_md,
                       api_name="admin_activate")
    rollback_btn.click(rollback, tab.token, served_md, api_name="admin_rollback")
    return SimpleNamespace(version_pick=version_pick, served_md=served_md)


def _wire_refresh(tab, timer: gr.Timer, job: SimpleNamespace, served: SimpleNamespace) -> None:
    """Every 2 s while logged in: the picked job's progress, the jobs, the served model."""
    served_seen = gr.State("")  # the served model this session last showed in the picker
    engine, jobs_dir = tab.engine, tab.jobs_dir

    @tab.guard
    def refresh(job_id, version="", seen=""):
        found = records.list_jobs(jobs_dir)
        ids = [r.id for r in found]
        job_id = job_id if job_id in ids else (ids[0] if ids else None)
        picker = gr.Dropdown(choices=ids, value=job_id)
        versions = [i.name for i in engine.models() if i.usable]
        active = engine.active_name
        # The picker follows the served model (a hot reload, a rollback) unless the admin has
        # picked another file since it last showed it.
        if version not in versions or version == seen:
            version = active
        versions_pick = gr.Dropdown(choices=versions, value=version)
        served_text = f"**Serving:** `{active or 'nothing'}`"
        if job_id is None:
            return (picker, "<i>No jobs yet.</i>", None, "", "", _eval_frame({}),
                    _gate_frame({}), _jobs_frame(found), versions_pick, served_text, active)
        record = records.get(jobs_dir, job_id)
        evaluation = record.evaluation
        return (picker, _progress_html(record.status, resume.describe(record)),
                _loss_figure(record.metrics),
                record.log_tail(LOG_LINES), _eval_markdown(evaluation, record.status),
                _eval_frame(evaluation), _gate_frame(evaluation), _jobs_frame(found),
                versions_pick, served_text, active)

    outputs = [job.job_pick, job.progress, job.loss_plot, job.log_tail, job.eval_md,
               job.eval_table, job.gate_table, job.jobs_table, served.version_pick,
               served.served_md, served_seen]
    inputs = [tab.token, job.job_pick, served.version_pick, served_seen]
    timer.tick(refresh, inputs, outputs, api_name="admin_refresh", show_progress="hidden")
    job.job_pick.change(refresh, inputs, outputs, **PRIVATE)
