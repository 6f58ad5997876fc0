"""An erased Stable Diffusion model as one single-file checkpoint in the original (LDM) layout, the
file AUTOMATIC1111 lists in ``models/Stable-diffusion`` and ComfyUI's checkpoint loader reads.

The UNet is the run's, the VAE and text encoders the base model's. The key map is written from the two
layouts' structure: diffusers' ``UNet2DConditionModel`` (``down_blocks.i.resnets.j``...) against the
LDM ``UNetModel`` (``input_blocks.n.m``...), diffusers' ``AutoencoderKL`` against LDM's autoencoder,
and transformers' ``CLIPTextModel`` against OpenCLIP's text tower where the original used OpenCLIP.

- SD-1.x: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``
  (the OpenAI CLIP text model, kept in transformers' own names).
- SD-2.x: the same, but ``cond_stage_model.model.*`` in OpenCLIP's names (q, k and v joined into
  ``in_proj``). diffusers' SD-2 text encoder stops at the penultimate layer, which is the one SD-2
  reads, so the file has one text layer fewer than the original: loaders warn about that layer and
  never use it. Beside it goes ``<name>.yaml``, the model's original (LDM) inference config, written
  from the run's architecture and scheduler (v-prediction or not): AUTOMATIC1111 reads a ``.yaml`` of
  the checkpoint's name before it guesses the config, and its guess of v-prediction runs the UNet once
  and compares the output with the released SD-2 models' behaviour, which an erased model need not keep.
- SDXL: ``model.diffusion_model.*`` (with ``label_emb`` for the size and pooled-text embedding),
  ``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` (CLIP-L, transformers' names) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP bigG, with its ``text_projection``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_KINDS = ("stable-diffusion", "stable-diffusion-xl")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT, SDXL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

# inside a ResnetBlock2D: diffusers' name -> LDM's
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# transformers' CLIP encoder layer -> OpenCLIP's residual block (q, k and v are joined apart)
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def refuse_checkpoint_kind(kind: str) -> None:
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"the checkpoint format is the single-file layout of Stable Diffusion 1.x, 2.x and SDXL; "
                         f"a {kind} model has none: export it as delta, diffusers or lora")


def unet_block_map(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of every UNet block, from the UNet's config: its levels' block
    types and ``layers_per_block`` fix where each resnet, attention and resampler sits in LDM's flat
    ``input_blocks`` / ``output_blocks`` lists."""
    per = config.layers_per_block
    if not isinstance(per, int):
        raise ValueError("the checkpoint format needs the same number of layers in every UNet level")
    down, up = config.down_block_types, config.up_block_types
    pairs = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
             ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(len(down)):
        for j in range(per):
            n = 1 + i * (per + 1) + j  # each level: its layers, then its downsampler
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.")]
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
    for i, kind in enumerate(up):
        for j in range(per + 1):  # an up level has one layer more (it also takes the downsampler's skip)
            n = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.")]
        if i < len(up) - 1:  # the upsampler follows the last layer's resnet (and attention, if any)
            position = 2 if "CrossAttn" in kind else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (per + 1) + per}.{position}.conv."))
    return pairs


def unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's tensors in LDM names (without the ``model.diffusion_model.`` prefix)."""
    pairs = sorted(unet_block_map(unet.config), key=lambda pair: -len(pair[0]))
    out = {}
    for key, value in unet.state_dict().items():
        match = _longest_prefix(key, pairs)
        if match is None:
            raise ValueError(f"the UNet tensor {key} has no place in the single-file layout")
        ours, theirs = match
        rest = key[len(ours):]
        out[theirs + (_renamed(rest, _UNET_RESNET) if ".resnets." in ours else rest)] = value
    return out


def _longest_prefix(key: str, pairs: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The first (diffusers prefix, LDM prefix) pair whose diffusers prefix starts ``key``; ``pairs`` sorted
    longest first, so that the most specific prefix wins."""
    return next(((ours, theirs) for ours, theirs in pairs if key.startswith(ours)), None)


def vae_state_dict(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors in LDM names: its attention's linear layers become 1x1 convolutions."""
    levels = len(vae.config.block_out_channels)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  # LDM numbers the decoder's levels from the bottom, diffusers from the top
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]
    pairs.sort(key=lambda pair: -len(pair[0]))
    out = {}
    for key, value in vae.state_dict().items():
        match = _longest_prefix(key, pairs)
        if match is not None:  # else conv_in, conv_out, quant_conv, post_quant_conv: the same names
            ours, theirs = match
            rest = key[len(ours):]
            if ".attn_1." in theirs:
                rest = _renamed(rest, _VAE_ATTENTION)
                if value.dim() == 2:
                    value = value.reshape(*value.shape, 1, 1)
            elif "block" in theirs:
                rest = _renamed(rest, _VAE_RESNET)
            key = theirs + rest
        out[key] = value
    return out


def openclip_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` (or ``...WithProjection``) in OpenCLIP's text-tower names."""
    sd = _transformers_names(text_encoder)
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:  # a Linear (out x in) in transformers, a matrix x @ P in OpenCLIP
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([sd[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in _OPENCLIP_LAYER.items():
                out[f"{theirs}{b}.{kind}"] = sd[f"{ours}{a}.{kind}"]
    return out


def checkpoint_state_dict(bundle) -> dict[str, torch.Tensor]:
    """Every tensor of the single file, by LDM name, for a Stable Diffusion or SDXL bundle."""
    refuse_checkpoint_kind(bundle.backend.name)
    out = {UNET + k: v for k, v in unet_state_dict(bundle.unet).items()}
    out.update({VAE + k: v for k, v in vae_state_dict(bundle.vae).items()})
    if bundle.backend.name == "stable-diffusion-xl":
        out.update({SDXL_TEXT + k: v for k, v in _transformers_names(bundle.text_encoder).items()})
        out.update({SDXL_TEXT_2 + k: v for k, v in openclip_state_dict(bundle.backend.text_encoder_2).items()})
    elif is_openclip(bundle.text_encoder):
        out.update({SD2_TEXT + k: v for k, v in openclip_state_dict(bundle.text_encoder).items()})
    else:
        out.update({SD1_TEXT + k: v for k, v in _transformers_names(bundle.text_encoder).items()})
    return out


def is_openclip(text_encoder) -> bool:
    """SD-2.x's text encoder (OpenCLIP ViT-H, GELU) as opposed to SD-1.x's OpenAI CLIP-L (quick GELU)."""
    return text_encoder.config.hidden_act == "gelu"


def ldm_config(bundle) -> dict | None:
    """The original (LDM) inference config of an SD-2.x bundle, the ``.yaml`` AUTOMATIC1111 reads beside
    the checkpoint; None for SD-1.x and SDXL, whose config A1111 and ComfyUI tell from the weights alone.

    Every number comes from the bundle: the UNet's levels become ``channel_mult``, the levels with
    cross-attention ``attention_resolutions`` (their downsampling factors), the scheduler's betas and
    ``prediction_type`` the ``linear_start`` / ``linear_end`` / ``parameterization``."""
    if bundle.backend.name != "stable-diffusion" or not is_openclip(bundle.text_encoder):
        return None
    unet, vae, scheduler = bundle.unet.config, bundle.vae.config, bundle.scheduler_config
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":  # the only schedule LDM's "linear" means
        raise ValueError(f"the checkpoint format's SD-2 config has no place for the beta schedule "
                         f"{scheduler.get('beta_schedule')!r}")
    base = unet.block_out_channels[0]
    levels = len(unet.block_out_channels)
    heads = unet.num_attention_heads or unet.attention_head_dim  # diffusers' attention_head_dim counts heads
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    head_channels = {c // h for c, h in zip(unet.block_out_channels, heads)}
    depth = unet.transformer_layers_per_block
    if len(head_channels) != 1 or not isinstance(depth, int) or any(c % base for c in unet.block_out_channels):
        raise ValueError("the checkpoint format's SD-2 config needs the same head size and transformer depth "
                         "in every UNet level")
    vae_base = vae.block_out_channels[0]
    unet_params = {
        "use_checkpoint": False, "use_fp16": False, "image_size": unet.sample_size,
        "in_channels": unet.in_channels, "out_channels": unet.out_channels, "model_channels": base,
        "attention_resolutions": [2 ** i for i, kind in reversed(list(enumerate(unet.down_block_types)))
                                  if "CrossAttn" in kind],
        "num_res_blocks": unet.layers_per_block, "channel_mult": [c // base for c in unet.block_out_channels],
        "num_head_channels": head_channels.pop(), "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet.use_linear_projection), "transformer_depth": depth,
        "context_dim": unet.cross_attention_dim, "legacy": False}
    ddconfig = {"double_z": True, "z_channels": vae.latent_channels, "resolution": vae.sample_size,
                "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae_base,
                "ch_mult": [c // vae_base for c in vae.block_out_channels], "num_res_blocks": vae.layers_per_block,
                "attn_resolutions": [], "dropout": 0.0}
    params = {
        "linear_start": scheduler.get("beta_start", 0.00085), "linear_end": scheduler.get("beta_end", 0.012),
        "num_timesteps_cond": 1, "timesteps": scheduler.get("num_train_timesteps", 1000),
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": unet.sample_size,
        "channels": unet.in_channels, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "scale_factor": vae.scaling_factor, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae.latent_channels, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}},
        # SD-2 reads the penultimate layer of OpenCLIP ViT-H, the last one diffusers' text encoder keeps
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}}
    if scheduler.get("prediction_type", "epsilon") == "v_prediction":
        params = {"parameterization": "v", **params}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def config_path(checkpoint: Path) -> Path:
    """Where AUTOMATIC1111 looks for a checkpoint's own config: the same name with ``.yaml``."""
    return checkpoint.with_suffix(".yaml")


def write_checkpoint(bundle, path: Path, dtype: torch.dtype | None = None) -> Path | None:
    """Write the single file, in ``dtype`` (default: the base's stored dtype), and for SD-2.x its config
    beside it; return the config's path (None where there is none)."""
    import yaml
    from safetensors.torch import save_file

    from ..backends.stable_diffusion import stored_dtype

    config = ldm_config(bundle)  # before anything is written: a config it cannot express is refused first
    dtype = dtype or stored_dtype(bundle.base_source or bundle.source)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in checkpoint_state_dict(bundle).items()}
    save_file(tensors, str(path), metadata={"format": "pt", "written_by": "age-explorer"})
    os.chmod(path, 0o644)  # readable like the other files of the export
    if config is None:
        return None
    config_file = config_path(path)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    os.chmod(config_file, 0o644)
    return config_file


def _transformers_names(text_encoder) -> dict[str, torch.Tensor]:
    """The CLIP text model's tensors in the names the original checkpoints hold (``text_model.*``):
    transformers from 5.6 on names a ``CLIPTextModel``'s tensors without that prefix."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in text_encoder.state_dict().items()}


def _renamed(rest: str, names: dict[str, str]) -> str:
    """``rest`` (a name inside a block, after an optional layer index: ``0.conv_shortcut.weight``) with its
    diffusers part replaced by the LDM one."""
    index, dot, tail = rest.partition(".")
    if index.isdigit():
        return index + dot + _renamed(tail, names)
    for ours, theirs in names.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest
