"""The Stable Diffusion 1.x/2.x backend: a diffusers ``StableDiffusionPipeline`` by Hub id or folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends import Backend, register_backend
from .bundle import LOAD_LOCK, ModelBundle, ModelUnavailableError, diffusers_pipeline_class, looks_like_hub_id


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
            pipe = cls.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only,
                                       revision=revision)
        except Exception as err:
            if path is not None:  # a local folder: say which of its files is wrong, not how to download
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
        return cls.bundle_from_pipeline(pipe, source, device, dtype, revision)

    @classmethod
    def bundle_from_pipeline(cls, pipe, source, device, dtype, revision) -> ModelBundle:
        return ModelBundle(
            backend=cls(), source=source, unet=pipe.unet.eval(), text_encoder=pipe.text_encoder.eval(),
            tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config), device=device, dtype=dtype,
            vae=pipe.vae.eval(), revision=revision, default_steps=50, default_guidance=7.5,
        )

    def decode(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, bundle: ModelBundle, images: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        x = images.to(bundle.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    def save_pipeline(self, bundle: ModelBundle, folder: Path) -> None:
        with LOAD_LOCK:  # a load like load_bundle's: one at a time in the process
            pipe = self.from_pretrained(bundle.base_source or bundle.source, local_files_only=True)
        pipe.unet = bundle.unet
        pipe.save_pretrained(folder)
