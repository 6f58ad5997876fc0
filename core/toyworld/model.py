"""Architecture of the embedded toy text-to-image model, built from real diffusers/transformers parts.

- "latent": ``pixel_unshuffle`` of a 32x32 RGB image in [-1, 1] to 16x16x12. It is lossless and has no
  parameters, so there is no VAE to train, and it makes the UNet about 4x cheaper than pixel space.
- UNet: ``diffusers.UNet2DConditionModel`` on that latent, cross-attending to the text states.
- Text: a tiny ``transformers.CLIPTextModel`` with a word-level tokenizer, trained jointly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

LATENT_FACTOR = 2
MAX_TOKENS = 10  # <bos> + up to 8 words + <eos>; prompts are padded to this, as SD pads to 77
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) in [0, 1] -> (N, 12, 16, 16) in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, LATENT_FACTOR)


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`images_to_latents`, clamped to [0, 1].

    Sampling leaves a small image-wide 2x2-periodic pattern (a per-channel bias of the unshuffled
    latent, which guidance amplifies). Renders contain none, so each sub-pixel channel's mean is set
    to its colour's mean: this removes exactly the periodic component and leaves edges intact.
    """
    n, ch, h, w = latents.shape
    per_sub = latents.reshape(n, ch // 4, 4, h, w)
    sub_means = per_sub.mean(dim=(3, 4), keepdim=True)
    per_sub = per_sub - sub_means + sub_means.mean(dim=2, keepdim=True)
    images = F.pixel_shuffle(per_sub.reshape(n, ch, h, w), LATENT_FACTOR)
    return ((images + 1) / 2).clamp(0, 1)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, projection_dim=hidden_size,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=12, out_channels=12,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=16, cross_attention_dim=cross_attention_dim,
    )


def build_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    """SD-1.4's noise schedule; the prediction type of SD 2.x by default.

    The epsilon model trained first barely followed an input's mean colour, and its image estimate
    divides that miss by sqrt(alpha_bar): at high noise every seed's mean colour became a cast. A v
    model's image estimate weighs its input's mean by sqrt(alpha_bar) instead, and the cast is gone
    (docs/toyworld.md). ESD/AGE guidance combines outputs linearly, so it works unchanged.
    """
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=True,
                         steps_offset=1)
