"""The Stable Diffusion 1.x/2.x backend: a diffusers ``StableDiffusionPipeline`` by Hub id or folder."""

from __future__ import annotations

from pathlib import Path

import torch

from . import Backend, register_backend
from ..bundle import LOAD_LOCK, ModelBundle, ModelUnavailableError, diffusers_pipeline_class, looks_like_hub_id


@register_backend
class StableDiffusionBackend(Backend):
    name = "stable-diffusion"
    folder_hint = "a diffusers StableDiffusionPipeline folder (SD 1.x/2.x)"
    default_presets = {"age": "imagenette", "esd": "esd-x"}
    card_tags = ("stable-diffusion", "text-to-image")
    card_pipeline_hint = " Load it with `diffusers.StableDiffusionPipeline.from_pretrained(folder)`."
    # the model_index.json class names this backend loads; a folder or cached Hub model naming another
    # class is left to the backend that claims it (or refused with the list of what is supported)
    pipeline_classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    # whether a model whose pipeline class is unknown (an uncached Hub id) is tried with this backend
    claims_unknown: bool = True
    default_guidance = 7.5  # the pipeline's own default CFG scale

    @classmethod
    def claims(cls, source: str, path: Path | None) -> bool:
        if path is None and not looks_like_hub_id(source):
            return False
        if path is not None and not (path / "model_index.json").is_file():
            return False
        pipeline_class = diffusers_pipeline_class(source, path)
        return pipeline_class in cls.pipeline_classes or (pipeline_class is None and cls.claims_unknown)

    @classmethod
    def pipeline_loader(cls):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def from_pretrained(cls, source: str, **options):
        """The family's diffusers pipeline, without a safety checker (the project never runs one)."""
        return cls.pipeline_loader().from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                     **options)

    @classmethod
    def load(cls, source, path, device, dtype, local_files_only, revision) -> ModelBundle:
        if path is not None:  # a local folder never needs the Hub
            local_files_only, revision = True, None
        try:
            pipe = cls.from_pretrained(source, dtype=dtype, local_files_only=local_files_only,
                                       revision=revision)
        except Exception as err:
            if path is not None:  # a local folder: say which of its files is wrong, not how to download
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise ModelUnavailableError(f"could not load the Stable Diffusion folder {source}: "
                                            f"{type(err).__name__}: {first}") from None
            if not isinstance(err, (OSError, ValueError)):
                raise
            why = ("its files are not in the local Hugging Face cache" if local_files_only else
                   f"it is not in the local cache and the Hub did not provide it ({err.__class__.__name__})")
            raise ModelUnavailableError(
                f"could not load Stable Diffusion model {source!r}: {why}. "
                f"To use it offline, download it on a machine with internet access "
                f"(`hf download {source}` or `huggingface-cli download {source}`) and copy the Hugging Face "
                f"cache folder (HF_HOME) here, or save the pipeline with `save_pretrained(FOLDER)` and pass "
                f"--model FOLDER. The embedded toy model (--model toy) needs no download."
            ) from err
        pipe.to(device)
        return cls.bundle_from_pipeline(pipe, source, device, dtype, revision)

    @classmethod
    def bundle_from_pipeline(cls, pipe, source, device, dtype, revision) -> ModelBundle:
        return ModelBundle(
            backend=cls(), source=source, unet=pipe.unet.eval(), text_encoder=pipe.text_encoder.eval(),
            tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config), device=device, dtype=dtype,
            vae=pipe.vae.eval(), revision=revision, default_steps=50, default_guidance=cls.default_guidance,
        )

    def decode(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, bundle: ModelBundle, images: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        x = images.to(bundle.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    def save_pipeline(self, bundle: ModelBundle, folder: Path, dtype: torch.dtype | None = None) -> None:
        """The base pipeline with the erased UNet, in the base's stored dtype (or ``dtype``), and with
        the DDIM scheduler the project samples with, so that a plain ``pipe(prompt)`` with the same
        steps, guidance and seed gives the project's "after" images (a PNDM or Euler base would not)."""
        source = bundle.base_source or bundle.source
        dtype = dtype or stored_dtype(source)
        with LOAD_LOCK:  # a load like load_bundle's: one at a time in the process
            pipe = self.from_pretrained(source, dtype=dtype, local_files_only=True)
        pipe.unet.load_state_dict(bundle.unet.state_dict())  # cast to the folder's dtype
        pipe.scheduler = bundle.sampling_scheduler()
        pipe.save_pretrained(folder)

    @classmethod
    def card_usage(cls, fmt: str) -> list[str]:
        sampler = ["from diffusers import DDIMScheduler",
                   # without _use_default_values, from_config keeps what the pipeline set (clip_sample=False
                   # for a base whose config lacks it) instead of DDIM's own defaults
                   "config = {k: v for k, v in pipe.scheduler.config.items() if k != \"_use_default_values\"}",
                   "pipe.scheduler = DDIMScheduler.from_config(config)  # the sampler of AGE Explorer"]
        load = ["import torch",
                f"from diffusers import {cls.pipeline_loader().__name__}",
                f"pipe = {cls.pipeline_loader().__name__}.from_pretrained(BASE_MODEL, dtype=torch.float32)"]
        if fmt == "diffusers":
            return ["The folder's scheduler is the DDIM sampler AGE Explorer draws its images with, so "
                    f"`pipe(prompt, num_inference_steps=50, guidance_scale={cls.default_guidance}, "
                    "generator=torch.Generator()"
                    ".manual_seed(SEED))` gives its \"after\" images.", ""]
        if fmt == "delta":
            apply = ["from safetensors.torch import load_file",
                     "delta = load_file(\"delta.safetensors\")  # the changed UNet tensors' new values, diffusers names",
                     "pipe.unet.load_state_dict(delta, strict=False)"]
            title = "Apply the delta with `safetensors` alone (three lines, on a loaded base pipeline `pipe`)"
        elif fmt == "lora":
            apply = ["pipe.load_lora_weights(\"FOLDER/diffusers\")  # the PEFT file; needs peft"]
            title = "Load the LoRA in diffusers"
        else:
            return []
        return [f"## {title}", "", "```python", *load, *apply, "```", "",
                "AGE Explorer samples with DDIM built from the base's scheduler config; with these lines a "
                "plain `pipe(prompt)` with the same steps, guidance and seed reproduces its images:", "",
                "```python", *sampler, "```", ""]


def stored_dtype(source: str) -> torch.dtype:
    """The dtype a pipeline's UNet weights are stored in (float32 when they cannot be read)."""
    from safetensors import safe_open

    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from diffusers import DiffusionPipeline

            folder = Path(DiffusionPipeline.download(source, local_files_only=True))
        except Exception:  # not in the cache as a folder: float32, the dtype the project loads
            return torch.float32
    files = sorted((folder / "unet").glob("*.safetensors"), key=lambda f: (f.name.count("."), f.name))
    if not files:
        return torch.float32
    with safe_open(str(files[0]), framework="pt") as weights:
        first = next(iter(weights.keys()), None)
        return _SAFETENSORS_DTYPES.get(weights.get_slice(first).get_dtype(), torch.float32) if first else torch.float32


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
