"""The Admin tab's Hub panel (UI only): where models are kept, publish a fine-tune to the Hub,
fetch a GGUF from it. Both run as background transfers (finetune/ui/transfers.py); the tab's timer
shows their progress. A token typed here stays in memory for that one transfer."""
from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr

from finetune import FinetuneError
from finetune.export import install, publish
from finetune.jobs import records
from finetune.ui.transfers import Transfers
from inference import hub, storage


def hub_panel(tab, timer: gr.Timer) -> None:
    """`tab` carries the session token State, the guard, the folders and the transfers."""
    gr.Markdown("### 5 · Hugging Face Hub and storage")
    gr.Markdown(storage.describe(tab.models_dir), elem_id="storage-note")
    hf_token = gr.Textbox(label="Hugging Face token (empty: the HF_TOKEN secret)",
                          type="password", elem_id="hf-token")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Publish a fine-tune** (GGUFs, LoRA adapter, model card)")
            version = gr.Dropdown([], value="", label="Version", allow_custom_value=True)
            files = gr.CheckboxGroup([], label="GGUF files (none ticked: all)")
            repo = gr.Textbox(label="Hub repo (owner/name, created if needed)")
            private = gr.Checkbox(False, label="Private (when created)")
            publish_btn = gr.Button("Publish", elem_id="publish-btn")
        with gr.Column():
            gr.Markdown("**Fetch a GGUF** into the models folder")
            source = gr.Textbox(label="Hub repo (owner/repo)")
            list_btn = gr.Button("List its .gguf files")
            remote = gr.Dropdown([], value="", label="File", allow_custom_value=True)
            fetch_btn = gr.Button("Fetch", elem_id="fetch-btn")
    message = gr.Markdown(elem_id="hub-message")
    progress = gr.HTML(elem_id="transfers")
    _wire(tab, timer, SimpleNamespace(
        hf_token=hf_token, version=version, files=files, repo=repo, private=private,
        publish_btn=publish_btn, source=source, list_btn=list_btn, remote=remote,
        fetch_btn=fetch_btn, message=message, progress=progress))


def _wire(tab, timer: gr.Timer, w: SimpleNamespace) -> None:
    guard, transfers, models_dir = tab.guard, tab.transfers, tab.models_dir

    @guard
    def version_files(name):
        ggufs = [p.name for p in install.load_version(models_dir, name).ggufs] if name else []
        return gr.CheckboxGroup(choices=ggufs, value=[])

    @guard
    def start_publish(name, files, repo_id, private, token):
        found = install.load_version(models_dir, name)  # bad input fails here, at once
        token = publish.hub_token(token)

        def work(progress):
            done = publish.publish(models_dir, found.name, repo_id, token=token,
                                   private=private, files=files, progress=progress)
            records.record_publication(tab.jobs_dir, found.name, {
                "repo": done.repo_id, "url": done.url, "commit": done.commit_url})
            return f"published {len(done.files)} files: {done.url}"

        transfers.start(f"publish {found.name} to {repo_id}", work)
        return f"Publishing `{found.name}` to `{repo_id}`…"

    @guard
    def list_files(spec, token):
        repo_id, _ = hub.parse_spec(spec)
        found = hub.list_ggufs(repo_id, token or None)
        return gr.Dropdown(choices=found, value=found[0]), f"{repo_id}: {len(found)} GGUF files."

    @guard
    def start_fetch(spec, filename, token):
        repo_id, in_spec = hub.parse_spec(spec)
        filename = (filename or in_spec).strip()
        if not filename:
            raise FinetuneError("Pick a file: press “List its .gguf files” first.")
        hub.local_name(filename)  # a name that is not a GGUF is refused at once

        def work(progress):
            path = hub.fetch(repo_id, filename, models_dir, token=token or None,
                             progress=progress)
            return f"{path.name} is in the models folder: pick it in the chat (↻ Refresh models)"

        transfers.start(f"fetch {repo_id}/{filename}", work)
        return f"Fetching `{filename}` from `{repo_id}`…"

    @guard
    def show(picked=""):
        found = install.versions(models_dir)  # a job that just finished appears; newest first
        picked = picked if picked in found else (found[0] if found else "")
        return _transfers_html(transfers), gr.Dropdown(choices=found, value=picked)

    w.version.change(version_files, [tab.token, w.version], w.files,
                     api_name="admin_version_files")
    w.publish_btn.click(start_publish, [tab.token, w.version, w.files, w.repo, w.private,
                                        w.hf_token], w.message, api_name="admin_publish")
    w.list_btn.click(list_files, [tab.token, w.source, w.hf_token], [w.remote, w.message],
                     api_name="admin_hub_files")
    w.fetch_btn.click(start_fetch, [tab.token, w.source, w.remote, w.hf_token], w.message,
                      api_name="admin_fetch")
    timer.tick(show, [tab.token, w.version], [w.progress, w.version], api_name="admin_transfers",
               show_progress="hidden")


def _transfers_html(transfers: Transfers) -> str:
    rows = []
    for t in transfers.recent():
        color = {"failed": "#c00", "done": "#080"}.get(t.state, "inherit")
        rows.append(f"<div class='transfer' data-state='{t.state}'><progress value="
                    f"'{100 * t.fraction:.0f}' max='100' style='width:30%'></progress> "
                    f"<b>{html.escape(t.what)}</b>: <span style='color:{color}'>{t.state}</span>"
                    f" · {html.escape(t.message)}</div>")
    return "".join(rows) or "<i>No transfers yet.</i>"
