"""Randomly initialised pipelines of the real diffusers classes at the full SD-1.4 and SDXL architectures,
for benchmarks on machines where no weights can be downloaded.

The UNet and VAE have the published architectures; the text encoders have the published widths (so the
UNet sees states of the right shape) but ``text_layers`` layers, since a benchmark never times them, and
the tokenizer is a byte-level CLIP BPE with no learned merges (every prompt is read letter by letter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .bench import SD14_SCHEDULER, SD14_UNET

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def _byte_chars() -> list[str]:
    # the printable-unicode stand-ins CLIP's byte-level BPE uses for the 256 byte values
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def byte_level_tokenizer(folder: Path, max_length: int = 77, merges: tuple[str, ...] = ()):
    """A ``CLIPTokenizer`` over the 512 byte symbols (with and without the word end) plus ``merges``."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_config(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 1)


def random_sd14_pipeline(work: Path, device: torch.device, text_layers: int = 2, unet: dict | None = None,
                         vae: dict | None = None):
    """A ``StableDiffusionPipeline`` with SD-1.4's UNet and VAE architectures (or the ``unet`` and ``vae``
    configs given) and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer(work / "tokenizer_src")
    with torch.device(device):  # random init on the GPU: minutes less than on the CPU at this size
        text_encoder = CLIPTextModel(_text_config(tokenizer, 768, text_layers, 12))
        model = UNet2DConditionModel(**(unet or SD14_UNET))
        autoencoder = AutoencoderKL(**(vae or SD_VAE))
    return StableDiffusionPipeline(vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                   scheduler=DDIMScheduler(**SD14_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def random_sdxl_pipeline(work: Path, device: torch.device, text_layers: int = 2, unet: dict | None = None,
                         vae: dict | None = None):
    """A ``StableDiffusionXLPipeline`` with SDXL 1.0's UNet architecture (1024 px), text encoders of its
    widths (768 and 1280, pooled projection 1280) and random weights; ``unet`` and ``vae`` configs replace
    the published ones."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer(work / "tokenizer_src")
    unet = unet or SDXL_UNET
    with torch.device(device):
        text_encoder = CLIPTextModel(_text_config(tokenizer, 768, text_layers, 12))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, 1280, text_layers, 20, 1280))
        model = UNet2DConditionModel(**unet)
        autoencoder = AutoencoderKL(**dict(vae or SD_VAE, sample_size=1024), scaling_factor=0.13025)
    # SDXL 1.0's scheduler config: Euler, with the DDIM fields (clip_sample, set_alpha_to_one) it keeps unused
    scheduler = EulerDiscreteScheduler.from_config(dict(SD14_SCHEDULER, timestep_spacing="leading"))
    return StableDiffusionXLPipeline(vae=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=model, scheduler=scheduler)
