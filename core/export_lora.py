"""A run's delta as a LoRA: a truncated SVD of each changed weight matrix, in two file layouts.

For every UNet Linear or Conv2d layer whose weight changed, ``W_erased - W_base`` (a conv kernel
flattened to ``out x (in*k*k)``) is factored as ``U S Vh`` and cut to the ``rank`` largest singular
values: ``down = Vh[:r]`` and ``up = U[:, :r] * S[:r]``, so ``up @ down`` is the best rank-r
approximation in the Frobenius norm. Every layer gets the same rank (a layer with fewer singular
values is zero-padded) and ``alpha = rank``, so the LoRA scale is exactly 1 in every loader; a loader
that reads one rank and one alpha for the whole file (diffusers without metadata) cannot scale some
layers by rank/alpha != 1.

Two files, the same numbers:
- ``pytorch_lora_weights.safetensors``, the diffusers/PEFT layout that
  ``StableDiffusionPipeline.load_lora_weights`` loads: ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight``, plus ``lora_B.bias`` holding the changed biases (PEFT's ``lora_bias``);
- ``lora_kohya.safetensors``, the kohya layout that AUTOMATIC1111 and ComfyUI load:
  ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``. diffusers'
  kohya converter (``_convert_non_diffusers_lora_to_diffusers``) refuses any other key for SD-1.x, so
  this file carries no biases.

What a LoRA cannot hold (normalisation weights, and biases in the kohya file) is listed, with its
share of the delta, in the export's manifest and model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# the file names, the rank flag and its config live in a module without torch (the CLI's --help reads
# them); they are part of this module's names as well
from .export_options import DEFAULT_RANK, FULL_RANK, KOHYA_FILE, PEFT_FILE, LoraExportConfig, parse_rank

__all__ = ["LowRankDelta", "kohya_name", "lowrank_delta", "lowrank_summary", "DEFAULT_RANK", "FULL_RANK",
           "KOHYA_FILE", "PEFT_FILE", "LoraExportConfig", "parse_rank"]


@dataclass
class LowRankDelta:
    """The factors of one run's delta at one rank."""

    rank: int  # the file's rank (every layer padded to it)
    down: dict[str, torch.Tensor]  # module -> (rank, in) or (rank, in, k, k)
    up: dict[str, torch.Tensor]  # module -> (out, rank) or (out, rank, 1, 1)
    bias: dict[str, torch.Tensor]  # module -> bias delta (out,), zeros where the bias did not change
    relative_error: float  # ||delta - up@down||_F / ||delta||_F over all weight matrices together
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> ||its delta||_F, not representable

    def module_delta(self, module: str) -> torch.Tensor:
        """``up @ down`` in the weight's shape (what the LoRA adds to ``<module>.weight``)."""
        down, up = self.down[module], self.up[module]
        flat = up.flatten(1) @ down.flatten(1)
        return flat.reshape(up.shape[0], *down.shape[1:])

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for module in self.down:
            out[f"unet.{module}.lora_A.weight"] = self.down[module].contiguous()
            out[f"unet.{module}.lora_B.weight"] = self.up[module].contiguous()
            if self.bias:  # PEFT's lora_bias is one switch for all layers: every layer then has a bias
                out[f"unet.{module}.lora_B.bias"] = self.bias[module].contiguous()
        return out

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for module in self.down:
            name = kohya_name(module)
            out[f"{name}.lora_down.weight"] = self.down[module].contiguous()
            out[f"{name}.lora_up.weight"] = self.up[module].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(self.rank))
        return out


def kohya_name(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``: kohya's sd-scripts
    trains SD-1.x on the diffusers UNet and names a layer by its diffusers path with '_' for '.'."""
    return "lora_unet_" + module.replace(".", "_")


def lowrank_delta(unet: torch.nn.Module, base: dict[str, torch.Tensor], erased: dict[str, torch.Tensor],
                  rank: int | None) -> LowRankDelta:
    """Factor ``erased - base`` (changed UNet tensors by parameter name) at ``rank`` (None: full).

    ``unet`` tells which parameters belong to Linear / Conv2d layers; the SVD runs in float64 so that
    the full-rank factors reproduce the delta to float32 rounding.
    """
    layers: dict[str, torch.nn.Module] = {}
    left_out: dict[str, float] = {}
    for name in erased:
        module_name, _, kind = name.rpartition(".")
        module = unet.get_submodule(module_name)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and kind in ("weight", "bias") \
                and getattr(module, "groups", 1) == 1:
            layers[module_name] = module
        else:  # a norm's scale or shift: no LoRA layout has a place for it
            left_out[name] = float((erased[name].double() - base[name].double()).norm())
    if not layers:
        raise ValueError("the run changed no Linear or Conv2d weight, so there is nothing a LoRA can hold")
    deltas = {}
    for module_name, module in layers.items():
        key = f"{module_name}.weight"
        weight = module.weight
        deltas[module_name] = ((erased[key].double() - base[key].double()) if key in erased
                               else torch.zeros(weight.shape, dtype=torch.float64))
    most = max(min(d.shape[0], d[0].numel()) for d in deltas.values())
    file_rank = most if rank is None else min(rank, most)
    down, up, bias = {}, {}, {}
    residual_sq = total_sq = 0.0
    for module_name, delta in deltas.items():
        flat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        keep = min(file_rank, len(s))
        residual_sq += float((s[keep:] ** 2).sum())
        total_sq += float((s ** 2).sum())
        d = torch.zeros(file_rank, flat.shape[1], dtype=torch.float64)
        w = torch.zeros(flat.shape[0], file_rank, dtype=torch.float64)
        d[:keep], w[:, :keep] = vh[:keep], u[:, :keep] * s[:keep]
        conv = delta.dim() == 4
        down[module_name] = (d.reshape(file_rank, *delta.shape[1:]) if conv else d).float()
        up[module_name] = (w.reshape(*w.shape, 1, 1) if conv else w).float()
        key = f"{module_name}.bias"
        if key in erased:
            bias[module_name] = (erased[key].double() - base[key].double()).float()
    if bias:
        for module_name, module in layers.items():
            bias.setdefault(module_name, torch.zeros(deltas[module_name].shape[0]))
    error = (residual_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return LowRankDelta(file_rank, down, up, bias, error, left_out)


def lowrank_summary(factors: LowRankDelta, erased: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """What the export's manifest and card say about the approximation."""
    bias_norm = float(sum(float(b.double().norm() ** 2) for b in factors.bias.values()) ** 0.5)
    weight_norm = float(sum(float((erased[k].double() - base[k].double()).norm() ** 2)
                            for k in erased if k.endswith(".weight") and k.rpartition(".")[0] in factors.down) ** 0.5)
    return {"rank": factors.rank, "layers": len(factors.down),
            "relative_frobenius_error": factors.relative_error,
            "weight_delta_frobenius": weight_norm,
            "bias_delta_frobenius": bias_norm,  # in the PEFT file, not in the kohya file
            "left_out": factors.left_out}
