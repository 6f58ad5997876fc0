"""The Generate tab: any prompt through the original model or a finished run, chosen seeds."""

from __future__ import annotations

import functools
import warnings

import gradio as gr

from age_explorer.core.bundle import PromptWarning
from age_explorer.core.checks import check_text
from age_explorer.core.imageio import to_pil
from age_explorer.core.sampling import generate, parse_seeds

from ..space import gpu
from .common import COMPUTE_SLOT, ORIGINAL, Page, bind, owner_of, plain, shown_as_error

MAX_SEEDS = 16


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def run_generate(page: Page, prompt: str, seeds_text: str, model_choice: str, owner="", request: gr.Request = None,
                 progress=gr.Progress()):
    with shown_as_error():
        seed_list = parse_seeds(seeds_text, limit=MAX_SEEDS)
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: type something such as 'a red circle'")
        check_text("the prompt", prompt)  # the text encoder reads 77 tokens; a huge prompt only costs time
        run = None if model_choice in (None, "", ORIGINAL) else page.explorer.run(model_choice, owner_of(owner, request))
    progress(0, desc="loading model")
    with shown_as_error(), page.explorer.model(run.path if run else None) as bundle, \
            warnings.catch_warnings(record=True) as caught, page.explorer.compute():
        warnings.simplefilter("always", PromptWarning)
        images = generate(bundle, [prompt], seed_list,
                          progress=lambda done, total: progress(done / total, desc="generating"))
    for w in caught:
        if issubclass(w.category, PromptWarning):
            gr.Warning(plain(str(w.message)))
    return [(to_pil(img, 128), f"seed {s}") for img, s in zip(images, seed_list)]


def build(page: Page) -> gr.Dropdown:
    """The tab's components; returns its model list (original and the finished runs)."""
    on = functools.partial(bind, page=page)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a red circle", elem_id="prompt")
        seeds = gr.Textbox(label="Seeds", value="0-3", elem_id="seeds")
        model = gr.Dropdown([ORIGINAL], value=ORIGINAL, label="Model (original, or a finished run)", elem_id="gen_model", allow_custom_value=True)
    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate_btn")
    # whole images: each 128 px sample in a cell that is at least as tall, never cropped
    gallery = gr.Gallery(label="Samples", columns=8, height="auto", object_fit="contain", elem_id="gallery")
    page.run_lists.append((model, True))
    gen_btn.click(gpu(on(run_generate)), [prompt, seeds, model, page.owner], gallery, api_name="generate",
                  api_visibility=page.api, **COMPUTE_SLOT)
    return model
