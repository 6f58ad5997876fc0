"""One interface to every text-to-image model, whatever its backend (the embedded toy world, Stable Diffusion).

Everything above the loader (sampling, erasure, graphs, the explorer) talks to a :class:`ModelBundle`:
prompts -> hidden states, a ``diffusers.UNet2DConditionModel`` with diffusers parameter names, the
noise-scheduler config, and latents <-> images.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .backends import Backend, backend_for, backends
from .device import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from .runs import RunManifest

# ``from_pretrained`` builds modules on the "meta" device by patching torch for the whole process
# (accelerate's init_empty_weights), so two loads at once break each other ("Cannot copy out of meta
# tensor"). Every load in the process holds this lock; reentrant because a run folder loads its base.
LOAD_LOCK = threading.RLock()
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded; the message says why and how to get it."""


class PromptWarning(UserWarning):
    """Something in a prompt the model will not read as written; shown to the user, never fatal."""


class UnknownWordsWarning(PromptWarning):
    """A prompt uses words the model's vocabulary does not have (a closed vocabulary, like the toy model's)."""


class LongPromptWarning(PromptWarning):
    """A prompt has more tokens than the text encoder reads; the rest is cut off."""


@dataclass
class ModelBundle:
    """A loaded text-to-image model. Images are float tensors in [0, 1], shape (N, 3, H, W).

    What differs between model families (latent codec, vocabulary, evaluator, export) is asked of
    ``backend``; this class is the same for all of them.
    """

    backend: Backend
    source: str  # the name it was loaded by, a Hub id or a folder
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    vae: torch.nn.Module | None = None
    revision: str | None = None
    default_steps: int = 50
    default_guidance: float = 7.5
    default_eta: float = 0.0  # DDIM eta of generate(); 0 = deterministic DDIM
    base_source: str | None = None  # a run folder's bundle: the base model it was loaded from
    run_manifest: RunManifest | None = None  # a run folder's bundle: the run's manifest

    @property
    def kind(self) -> str:
        """The backend's name ("toy", "stable-diffusion"), as manifests and graphs record it."""
        return self.backend.name

    # ---- text ---------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompt states (B, tokens, D), padded to a fixed length as SD pads to 77; what they hold beyond
        the text encoder's hidden states is the backend's (see ``Backend.encode_prompts``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for prompt in prompts:
            self.warn_unknown_words(prompt)
            self.warn_long(prompt)
        return self.backend.encode_prompts(self, list(prompts))

    def encode_differentiable(self, prompts: list[str]) -> torch.Tensor:
        """Prompt states as ``encode`` makes them, with gradients to the text encoders' inputs (what the
        recovery attacks optimise through); no prompt warnings."""
        return self.backend.encode_prompts(self, list(prompts))

    def text_encoders(self) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) of every text encoder behind the prompt states (SDXL has two)."""
        return self.backend.text_encoders(self)

    def unconditional(self) -> torch.Tensor:
        """The (1, tokens, D) states of classifier-free guidance's unconditional branch."""
        return self.backend.unconditional_states(self)

    def unet_kwargs(self, states: torch.Tensor) -> dict:
        """Keyword arguments of a UNet call conditioned on prompt states: ``unet(x, t, **bundle.unet_kwargs(states))``."""
        return self.backend.unet_kwargs(self, states)

    def cross_attention_states(self, states: torch.Tensor) -> torch.Tensor:
        """The token states (B, tokens, D) the cross-attention keys and values read, out of prompt states."""
        return self.backend.cross_attention_states(self, states)

    def vocabulary(self) -> list[str] | None:
        """The model's closed word list; ``None`` for open-vocabulary models."""
        return self.backend.vocabulary(self)

    def unknown_words(self, prompt: str) -> list[str]:
        vocab = self.vocabulary()
        if vocab is None:
            return []
        known = set(vocab)
        return [w for w in re.findall(r"\w+", prompt.lower()) if w not in known]

    def warn_unknown_words(self, prompt: str) -> None:
        from .checks import short

        unknown = list(dict.fromkeys(self.unknown_words(prompt)))
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            warnings.warn(
                f"prompt {short(prompt)} has words the {self.kind} model does not know: {shown}. "
                f"They are read as <unk>. The {self.kind} vocabulary is: {', '.join(self.vocabulary())}.",
                UnknownWordsWarning, stacklevel=3,
            )

    def warn_long(self, prompt: str) -> None:
        from .checks import short

        n = len(self.tokenizer(prompt, truncation=False).input_ids)
        if n > self.max_tokens:
            warnings.warn(f"prompt {short(prompt)} has {n} tokens; the model reads only the first {self.max_tokens}",
                          LongPromptWarning, stacklevel=3)

    # ---- latents and images -------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backend.decode(self, latents)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.encode_images(self, images)

    # ---- schedulers and parameters ------------------------------------------------------------------
    def train_scheduler(self) -> DDPMScheduler:
        from diffusers import DDPMScheduler  # diffusers loads with the first model, not with the explorer's page

        return DDPMScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self) -> DDIMScheduler:
        return ddim_scheduler(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def unet_parameter_names(self) -> list[str]:
        """UNet parameter names in diffusers naming (``down_blocks.1.attentions.0...attn2.to_k.weight``)."""
        return [name for name, _ in self.unet.named_parameters()]

    def graph_identity(self) -> dict:
        """Which model a measurement was made with: a graph records these and refuses rows of another."""
        return {"model": self.base_source or self.source, "model_revision": self.revision, "model_kind": self.kind}


# DDIM's numerics where the base's scheduler config does not state them: the values a plain
# StableDiffusionPipeline samples with when its scheduler is DDIM built from that config. The pipeline
# turns clip_sample off (clipping the x0 estimate to [-1, 1] suits pixels, not latents) and sets
# steps_offset to 1; the others are DDIMScheduler's own defaults, written out so that no field that
# decides the numerics is left to a library default. A value the config states is kept (the toy model's
# clip_sample=True). The beta schedule always comes from the config: every scheduler config states it.
DDIM_UNSTATED = {"clip_sample": False, "steps_offset": 1, "set_alpha_to_one": True, "clip_sample_range": 1.0,
                 "thresholding": False, "timestep_spacing": "leading", "prediction_type": "epsilon",
                 "rescale_betas_zero_snr": False}


def ddim_scheduler(config: dict) -> DDIMScheduler:
    """The project's DDIM sampler for a base's scheduler config (of any scheduler class).

    A key listed in the config's ``_use_default_values`` was not in the base's file: the class filled
    in its own default, and ``from_config`` would drop it and take DDIM's (clip_sample=True), even
    where the pipeline had corrected it to False. Such keys count as unstated.
    """
    from diffusers import DDIMScheduler

    defaulted = set(config.get("_use_default_values", ()))
    stated = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
    return DDIMScheduler.from_config({**DDIM_UNSTATED, **stated})


def load_bundle(model: str | os.PathLike = "toy", device: str | torch.device | None = "auto",
                dtype: str | torch.dtype | None = None, local_files_only: bool | None = None,
                revision: str | None = None) -> ModelBundle:
    """Load a model by name (``"toy"``), a model folder, a Hub id, or an erasure run folder (its base
    model with the run's weights applied). The registered backends say which models they load.

    ``local_files_only`` defaults to the ``HF_HUB_OFFLINE`` environment variable.
    """
    with LOAD_LOCK:
        return _load_bundle(model, device, dtype, local_files_only, revision)


def _load_bundle(model, device, dtype, local_files_only, revision) -> ModelBundle:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = str(model)
    if not source.strip():
        raise ValueError("model is empty: use 'toy', a Hub id such as CompVis/stable-diffusion-v1-4, or a folder")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    path = Path(source).expanduser()
    path = path if path.exists() else None
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"{source} is a file; a model is a folder (a diffusers pipeline or a toy model)")
        from .runs import RunManifest, apply_delta, is_run_dir

        if is_run_dir(path):
            manifest = RunManifest.read(path)
            bundle = load_bundle(manifest.base_model, device=dev, dtype=dt,
                                 local_files_only=local_files_only, revision=manifest.base_revision)
            if manifest.base_revision and bundle.revision and manifest.base_revision != bundle.revision:
                raise ValueError(f"run {source} was made on revision {manifest.base_revision} of "
                                 f"{manifest.base_model}, but revision {bundle.revision} is installed; "
                                 f"its changed weights only apply to the model they were trained from")
            apply_delta(bundle, path, manifest)
            bundle.run_manifest = manifest
            bundle.base_source = bundle.source
            bundle.source = str(path)
            return bundle
    backend = backend_for(source, path)
    if backend is not None:
        return backend.load(source, path, dev, dt, local_files_only, revision)
    hints = " or ".join(b.folder_hint for b in backends().values())
    pipeline_class = diffusers_pipeline_class(source, path)
    if pipeline_class is not None:  # a diffusers model of a family no backend handles (SD3, Flux, ...)
        raise ValueError(f"{source} is a {pipeline_class}, which the engine does not support; "
                         f"it supports {hints}")
    if path is not None:
        raise ValueError(f"folder {source} is not a model: expected {hints}")
    raise FileNotFoundError(f"model folder {source} does not exist (and it is not a Hub id such as "
                            f"CompVis/stable-diffusion-v1-4)")


def diffusers_pipeline_class(source: str, path: Path | None) -> str | None:
    """The pipeline class a diffusers model names in its ``model_index.json`` (a folder's, or a Hub
    model's in the local cache; never downloaded); None when there is none to read."""
    index = path / "model_index.json" if path is not None else None
    if index is None and looks_like_hub_id(source) and "/" in source:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else None
    if index is None or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` (or ``name``), not a path: what a backend loading from the Hub may claim."""
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)
    return not looks_like_path and bool(_HUB_ID.match(source))


def load_base(run: ModelBundle, local_files_only: bool | None = None) -> ModelBundle:
    """The base model of a loaded run, on the CPU, at the revision the run was made on."""
    if run.run_manifest is None or run.base_source is None:
        raise ValueError(f"{run.source} is not an erased run: it has no base model to compare with")
    return load_bundle(run.base_source, device="cpu", dtype=run.dtype, local_files_only=local_files_only,
                       revision=run.run_manifest.base_revision)


def weights_revision(model: str) -> str | None:
    """The revision of a model's weights, read without loading it; None where the backend has none."""
    for backend in backends().values():
        revision = backend.weights_revision(model)
        if revision is not None:
            return revision
    return None
