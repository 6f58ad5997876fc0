"""One interface to every text-to-image backend: the embedded toy world and Stable Diffusion 1.x/2.x.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from .device import resolve_device, resolve_dtype
from .paths import toy_model_dir

TOY = "toy"
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
    """A prompt uses words the model's vocabulary does not have (the toy model only)."""


class LongPromptWarning(PromptWarning):
    """A prompt has more tokens than the text encoder reads; the rest is cut off."""


@dataclass
class ModelBundle:
    """A loaded text-to-image model. Images are float tensors in [0, 1], shape (N, 3, H, W)."""

    kind: str  # "toy" or "stable-diffusion"
    source: str  # "toy", a Hub id or a folder
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
    extras: dict = field(default_factory=dict)  # toy: world, classifier, manifest

    # ---- text ---------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompt hidden states (B, max_tokens, D), padded to a fixed length as SD pads to 77."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for prompt in prompts:
            self.warn_unknown_words(prompt)
            self.warn_long(prompt)
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def vocabulary(self) -> list[str] | None:
        """The closed word list of the toy model; ``None`` for open-vocabulary models."""
        if self.kind != TOY:
            return None
        special = set(self.tokenizer.all_special_tokens)
        return [w for w, _ in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if w not in special]

    def unknown_words(self, prompt: str) -> list[str]:
        vocab = self.vocabulary()
        if vocab is None:
            return []
        known = set(vocab)
        return [w for w in re.findall(r"\w+", prompt.lower()) if w not in known]

    def warn_unknown_words(self, prompt: str) -> None:
        from .erasure.config import short

        unknown = list(dict.fromkeys(self.unknown_words(prompt)))
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            warnings.warn(
                f"prompt {short(prompt)} has words the toy model does not know: {shown}. "
                f"They are read as <unk>. The toy vocabulary is: {', '.join(self.vocabulary())}.",
                UnknownWordsWarning, stacklevel=3,
            )

    def warn_long(self, prompt: str) -> None:
        from .erasure.config import short

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
        if self.kind == TOY:
            from .toyworld.model import latents_to_images

            return latents_to_images(latents.float())
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == TOY:
            from .toyworld.model import images_to_latents

            return images_to_latents(images.to(self.device)).to(self.dtype)
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    # ---- schedulers and parameters ------------------------------------------------------------------
    def train_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def unet_parameter_names(self) -> list[str]:
        """UNet parameter names in diffusers naming (``down_blocks.1.attentions.0...attn2.to_k.weight``)."""
        return [name for name, _ in self.unet.named_parameters()]

    def graph_identity(self) -> dict:
        """Which model a measurement was made with: a graph records these and refuses rows of another."""
        return {"model": self.extras.get("base_source", self.source), "model_revision": self.revision,
                "model_kind": self.kind}

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "revision": self.revision,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "unet_parameters": sum(p.numel() for p in self.unet.parameters())}

    # ---- toy-only parts -----------------------------------------------------------------------------
    @property
    def world(self):
        return self._toy_extra("world")

    @property
    def classifier(self):
        return self._toy_extra("classifier")

    def _toy_extra(self, key: str):
        if key not in self.extras:
            raise AttributeError(f"the {self.kind} bundle has no {key}; only the toy world ships one")
        return self.extras[key]


def load_bundle(model: str | os.PathLike = TOY, device: str | torch.device | None = "auto",
                dtype: str | torch.dtype | None = None, local_files_only: bool | None = None,
                revision: str | None = None) -> ModelBundle:
    """Load ``"toy"``, a toy model folder, a diffusers SD 1.x/2.x folder, a Hub id, or an erasure run
    folder (its base model with the run's weights applied).

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
    if source == TOY:
        return _load_toy(toy_model_dir(), dev, dt, source=TOY)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{source} is a file; a model is a folder (a diffusers pipeline or a toy model)")
        from .runs import apply_delta, is_run_dir, read_manifest

        if is_run_dir(path):
            manifest = read_manifest(path)
            bundle = load_bundle(manifest["base_model"], device=dev, dtype=dt,
                                 local_files_only=local_files_only, revision=manifest.get("base_revision"))
            if manifest.get("base_revision") and bundle.revision and manifest["base_revision"] != bundle.revision:
                raise ValueError(f"run {source} was made on revision {manifest['base_revision']} of "
                                 f"{manifest['base_model']}, but revision {bundle.revision} is installed; "
                                 f"its changed weights only apply to the model they were trained from")
            apply_delta(bundle, path, manifest)
            bundle.extras["run_manifest"] = manifest
            bundle.extras["base_source"] = bundle.source
            bundle.source = str(path)
            return bundle
        if (path / "model_index.json").is_file():
            return _load_stable_diffusion(str(path), dev, dt, local_files_only=True, revision=None)
        if (path / "concepts.json").is_file() and (path / "unet").is_dir():
            return _load_toy(path, dev, dt, source=str(path))
        raise ValueError(
            f"folder {source} is not a model: expected a diffusers pipeline (model_index.json) "
            f"or a toy model folder (concepts.json and unet/)"
        )
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(source):
        raise FileNotFoundError(f"model folder {source} does not exist (and it is not a Hub id such as "
                                f"CompVis/stable-diffusion-v1-4)")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return _load_stable_diffusion(source, dev, dt, local_files_only=local_files_only, revision=revision)


def toy_revision(model: str) -> str | None:
    """The weights revision of a toy model, read without loading it; None for any other model."""
    path = toy_model_dir() if model == TOY else Path(model)
    manifest = path / "manifest.json"
    if (path / "concepts.json").is_file() and manifest.is_file():
        return json.loads(manifest.read_text()).get("revision")
    return None


def _load_toy(path: Path, device: torch.device, dtype: torch.dtype, source: str) -> ModelBundle:
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from .toyworld.classifier import ToyClassifier
    from .toyworld.concepts import ToyWorld

    missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler", "classifier.safetensors",
                           "manifest.json") if not (path / p).exists()]
    if missing:
        raise ModelUnavailableError(f"toy model folder {path} is incomplete: missing {', '.join(missing)}. "
                                    f"Re-create it with `age-explorer toyworld train --out {path}`.")
    manifest = json.loads((path / "manifest.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder").to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    scheduler_config = dict(DDPMScheduler.from_pretrained(path / "scheduler").config)
    defaults = manifest.get("sampling_defaults", {})
    return ModelBundle(
        kind=TOY, source=source, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=scheduler_config, device=device, dtype=dtype,
        revision=manifest.get("revision"),
        default_steps=int(defaults.get("steps", 25)), default_guidance=float(defaults.get("guidance_scale", 3.0)),
        default_eta=float(defaults.get("eta", 0.0)),
        extras={"world": ToyWorld.from_json(path / "concepts.json"),
                "classifier": ToyClassifier.load(path / "classifier.safetensors"),
                "manifest": manifest, "path": str(path)},
    )


def _load_stable_diffusion(source: str, device: torch.device, dtype: torch.dtype, local_files_only: bool,
                           revision: str | None) -> ModelBundle:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=local_files_only, revision=revision,
        )
    except Exception as err:
        if Path(source).is_dir():  # a local folder: say which of its files is wrong, not how to download
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ModelUnavailableError(f"could not load the Stable Diffusion folder {source}: "
                                        f"{type(err).__name__}: {first}") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        where = "the local Hugging Face cache" if local_files_only else "the local cache or the Hub"
        raise ModelUnavailableError(
            f"could not load Stable Diffusion model {source!r} from {where}: {err.__class__.__name__}. "
            f"To use it offline, download it on a machine with internet access "
            f"(`hf download {source}` or `huggingface-cli download {source}`) and copy the Hugging Face "
            f"cache folder (HF_HOME) here, or save the pipeline with `save_pretrained(FOLDER)` and pass "
            f"--model FOLDER. The embedded toy model (--model toy) needs no download."
        ) from err
    pipe.to(device)
    return ModelBundle(
        kind="stable-diffusion", source=source, unet=pipe.unet.eval(), text_encoder=pipe.text_encoder.eval(),
        tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config), device=device, dtype=dtype,
        vae=pipe.vae.eval(), revision=revision, default_steps=50, default_guidance=7.5,
    )
