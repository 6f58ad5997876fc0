"""Build the explorer's ``gr.Blocks`` without launching it (tests import it and drive it via a server)."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import gradio as gr

from core.bundle import ModelBundle, UnknownWordsWarning, load_bundle
from core.imageio import to_pil
from core.sampling import generate, parse_seeds

MAX_IMAGES = 16


@dataclass
class Settings:
    model: str = "toy"
    device: str = "auto"
    dtype: str = "float32"


class BundleCache:
    """Loads the model once, on first use, and shares it between sessions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._bundle: ModelBundle | None = None
        self._lock = threading.Lock()

    def get(self) -> ModelBundle:
        with self._lock:
            if self._bundle is None:
                s = self.settings
                self._bundle = load_bundle(s.model, device=s.device, dtype=s.dtype)
            return self._bundle


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings()
    models = BundleCache(settings)

    def run_generate(prompt: str, seeds: str, progress=gr.Progress()):
        try:
            seed_list = parse_seeds(seeds)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if len(seed_list) > MAX_IMAGES:
            raise gr.Error(f"at most {MAX_IMAGES} images at a time; you asked for {len(seed_list)}")
        if not prompt or not prompt.strip():
            raise gr.Error("the prompt is empty: type something such as 'a red circle'")
        progress(0, desc="loading model")
        bundle = models.get()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownWordsWarning)
            images = generate(bundle, [prompt], seed_list,
                              progress=lambda done, total: progress(done / total, desc="generating"))
        for w in caught:
            if issubclass(w.category, UnknownWordsWarning):
                gr.Warning(str(w.message))
        return [(to_pil(img, 128), f"seed {s}") for img, s in zip(images, seed_list)]

    with gr.Blocks(title="AGE Explorer") as demo:
        gr.Markdown(
            "# AGE Explorer\n"
            "See and steer concept erasure in text-to-image diffusion models. "
            f"Model: **{settings.model}**"
            + (" (the embedded toy world: 5 shapes x 5 colours)" if settings.model == "toy" else "")
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a red circle", elem_id="prompt")
            seeds = gr.Textbox(label="Seeds", value="0-3", elem_id="seeds")
        button = gr.Button("Generate", variant="primary", elem_id="generate_btn")
        gallery = gr.Gallery(label="Samples", columns=8, height=220, elem_id="gallery")
        button.click(run_generate, [prompt, seeds], gallery, api_name="generate")
    return demo
