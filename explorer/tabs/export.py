"""The Export tab: a finished run as its delta (with manifest and model card), a LoRA of a chosen rank
(diffusers/PEFT and kohya files), a single-file checkpoint or a zipped diffusers folder, and a push of
this session's export to the Hugging Face Hub."""

from __future__ import annotations

import functools
import os

import gradio as gr

from age_explorer.core.export.writers import FORMATS, push_to_hub
from age_explorer.core.export.lora import DEFAULT_RANK, FULL_RANK

from .common import Page, bind, owner_of, shown_as_error


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def do_export(page: Page, run_label, fmt, exported, rank=str(DEFAULT_RANK), owner="", request: gr.Request = None):
    if not run_label:
        raise gr.Error("no finished run to export")
    with shown_as_error(FileExistsError, RuntimeError, OSError):
        # the rank is read only for a LoRA: a stray value in the hidden field cannot fail a delta export
        folder = page.explorer.export(page.explorer.run(run_label, owner_of(owner, request)).path, fmt,
                                      rank=rank if fmt == "lora" else DEFAULT_RANK)
    # the session remembers what it exported: a push takes nothing else, never a client's path
    exported = list(exported or []) + [str(folder)]
    shown = folder.name if page.settings.public else str(folder)  # a public server shows no server path
    if fmt == "delta":
        return [str(folder / "delta.safetensors"), str(folder / "manifest.json"), str(folder / "README.md")], shown, exported
    if fmt in ("lora", "checkpoint"):  # a few files, each downloadable as it is (the PEFT one in diffusers/)
        return sorted(str(f) for f in folder.rglob("*") if f.is_file()), shown, exported
    return [str(page.explorer.export_zip(folder))], shown, exported


def do_push(page: Page, exported, repo_id, token):
    if not exported:
        raise gr.Error("export a run on this page first, then push it")
    token = (token or "").strip()
    if not token and not page.settings.allow_server_token:
        raise gr.Error("paste a Hugging Face token with write access into the Hub token field: "
                       "this server does not lend its own token")
    if not token and not os.environ.get("HF_TOKEN"):
        raise gr.Error("paste a Hugging Face token with write access into the Hub token field: "
                       "this server has no HF_TOKEN")
    with shown_as_error(RuntimeError, OSError):
        folder = page.explorer.owned_export(exported[-1])
        url = push_to_hub(folder, (repo_id or "").strip(), token=token or None, env_token=page.settings.allow_server_token)
    return f"Pushed `{folder.name}` to `{repo_id.strip()}`: {url}"


def build(page: Page) -> gr.Dropdown:
    """The tab's components; returns its run list."""
    on = functools.partial(bind, page=page)
    with gr.Row():
        run_dd = gr.Dropdown([], label="Finished run", elem_id="export_run_dd", allow_custom_value=True)
        fmt = gr.Radio(list(FORMATS), value="delta", label="Format", elem_id="export_format")
        rank = gr.Textbox(str(DEFAULT_RANK), label=f"LoRA rank (a whole number, or '{FULL_RANK}')", visible=False,
                          elem_id="export_rank")
        export_btn = gr.Button("Export", variant="primary", elem_id="export_btn")
    files = gr.File(label="Download", file_count="multiple", elem_id="export_files")
    export_folder = gr.Textbox(label="Export folder", interactive=False)
    with gr.Row():
        repo = gr.Textbox(label="Hub repo id (owner/name)")
        token = gr.Textbox(label="Hub token (write access)" + (
            "; empty: the server's HF_TOKEN" if page.settings.allow_server_token else ""), type="password")
        push_btn = gr.Button("Push to the Hub")
    push_md = gr.Markdown()
    page.run_lists.append((run_dd, False))

    fmt.change(lambda chosen: gr.Textbox(visible=chosen == "lora"), fmt, rank, api_visibility="private")
    export_btn.click(on(do_export), [run_dd, fmt, page.exported, rank, page.owner], [files, export_folder, page.exported],
                     api_name="export", api_visibility=page.api)
    push_btn.click(on(do_push), [page.exported, repo, token], push_md, api_name="push", api_visibility=page.api)
    return run_dd
