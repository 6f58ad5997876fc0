"""The SDXL backend: a diffusers ``StableDiffusionXLPipeline`` (two text encoders, pooled text
embeddings and size conditioning) by Hub id or folder.

Prompt states are packed into one tensor so that the engine handles them like SD's hidden states
(concatenate, expand, slice, mix): (B, tokens + 1, D) where

- rows ``[:tokens]`` are both encoders' penultimate hidden states side by side (D = D1 + D2), what the
  UNet's cross-attention reads, exactly as ``StableDiffusionXLPipeline.encode_prompt`` builds them;
- the last row holds the pooled embedding of the second encoder in its first ``projection_dim``
  entries (zeros after), which the UNet reads as ``added_cond_kwargs["text_embeds"]``.

The size conditioning (``add_time_ids``: original size, crop corner, target size) is the same for every
image of a bundle, (H, W, 0, 0, H, W) at the UNet's native resolution (1024 px for SDXL 1.0), as the
pipeline uses when no size is given; it is built per UNet call.
"""

from __future__ import annotations

import torch

from . import register_backend
from ..bundle import ModelBundle
from .stable_diffusion import StableDiffusionBackend


@register_backend
class StableDiffusionXLBackend(StableDiffusionBackend):
    name = "stable-diffusion-xl"
    folder_hint = "a diffusers StableDiffusionXLPipeline folder (SDXL)"
    default_presets = {"age": "sdxl-imagenette", "esd": "sdxl-esd-x"}
    preset_prefix = "sdxl"
    card_tags = ("stable-diffusion-xl", "text-to-image")
    card_pipeline_hint = " Load it with `diffusers.StableDiffusionXLPipeline.from_pretrained(folder)`."
    pipeline_classes = ("StableDiffusionXLPipeline",)
    claims_unknown = False
    default_guidance = 5.0  # StableDiffusionXLPipeline's default CFG scale

    def __init__(self, text_encoder_2: torch.nn.Module, tokenizer_2, force_zeros_for_empty_prompt: bool,
                 image_size: tuple[int, int]):
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        # SDXL's unconditional branch is all zeros, not the empty prompt's states (the pipeline's
        # force_zeros_for_empty_prompt, True for SDXL 1.0): a plain pipe(prompt) samples with zeros
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.image_size = image_size  # (height, width) in pixels

    @classmethod
    def pipeline_loader(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def from_pretrained(cls, source: str, **options):
        return cls.pipeline_loader().from_pretrained(source, **options)

    @classmethod
    def bundle_from_pipeline(cls, pipe, source, device, dtype, revision) -> ModelBundle:
        if pipe.text_encoder is None or pipe.tokenizer is None:
            # the refiner has only the second encoder and conditions on an aesthetic score
            raise ValueError(f"{source} has no first text encoder (an SDXL refiner?); the engine supports "
                             f"SDXL base pipelines with both text encoders")
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        size = pipe.unet.config.sample_size * scale
        backend = cls(pipe.text_encoder_2.eval(), pipe.tokenizer_2,
                      bool(pipe.config.get("force_zeros_for_empty_prompt", True)), (size, size))
        return ModelBundle(
            backend=backend, source=source, unet=pipe.unet.eval(), text_encoder=pipe.text_encoder.eval(),
            tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config), device=device, dtype=dtype,
            vae=pipe.vae.eval(), revision=revision, default_steps=50, default_guidance=cls.default_guidance,
        )

    # ---- prompt states --------------------------------------------------------------------------------
    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
        hidden, pooled = [], None
        for tokenizer, encoder in ((bundle.tokenizer, bundle.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(bundle.device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the encoder with a projection gives the pooled embedding
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        states = torch.cat(hidden, dim=-1)
        if pooled is None:
            raise ValueError("the SDXL text encoders give no pooled embedding (text_encoder_2 must be a "
                             "CLIPTextModelWithProjection)")
        return self._pack(states, pooled).to(bundle.dtype)

    def _pack(self, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.shape[-1] > states.shape[-1]:
            raise ValueError(f"the pooled embedding ({pooled.shape[-1]}) is wider than the hidden states "
                             f"({states.shape[-1]}); this SDXL variant is not supported")
        row = torch.zeros(states.shape[0], 1, states.shape[-1], dtype=states.dtype, device=states.device)
        row[:, 0, :pooled.shape[-1]] = pooled.to(states.dtype)
        return torch.cat([states, row], dim=1)

    def unconditional_states(self, bundle: ModelBundle) -> torch.Tensor:
        empty = bundle.encode([""])
        return torch.zeros_like(empty) if self.force_zeros_for_empty_prompt else empty

    def unet_kwargs(self, bundle: ModelBundle, states: torch.Tensor) -> dict:
        height, width = self.image_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=states.device)
        return {"encoder_hidden_states": states[:, :-1],
                "added_cond_kwargs": {"text_embeds": states[:, -1, :self.pooled_dim],
                                      "time_ids": time_ids.expand(len(states), -1)}}

    def cross_attention_states(self, bundle: ModelBundle, states: torch.Tensor) -> torch.Tensor:
        return states[:, :-1]

    def text_encoders(self, bundle: ModelBundle) -> list[tuple[object, torch.nn.Module]]:
        return [(bundle.tokenizer, bundle.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    def set_tokenizers(self, bundle: ModelBundle, tokenizers: list) -> None:
        bundle.tokenizer, self.tokenizer_2 = tokenizers

    # ---- the latent codec -----------------------------------------------------------------------------
    def decode(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        # SDXL 1.0's VAE overflows in float16; the pipeline decodes in float32 then (force_upcast)
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
            try:
                return super().decode(bundle, latents.float())
            finally:
                vae.to(torch.float16)
        return super().decode(bundle, latents)
