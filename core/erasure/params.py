"""Trainable parameter sets of the erasure methods, in diffusers UNet naming.

The reference code names sets in CompVis terms; the mapping to diffusers is:
``attn2`` keeps its name (cross-attention), ``attn1`` is self-attention, CompVis ``time_embed`` is
``time_embedding``, and the top-level ``out.0``/``out.2`` are ``conv_norm_out``/``conv_out``.
The ResNet ``time_emb_proj`` layers stay trainable in ``noxattn``: CompVis did not exclude their
equivalent (``emb_layers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def _is_xattn(name: str) -> bool:
    return "attn2" in name


def _is_noxattn(name: str) -> bool:
    return not (_is_xattn(name) or name.startswith(("time_embedding.", "conv_norm_out.", "conv_out.")))


PARAMETER_SETS: dict[str, tuple[Callable[[str], bool], str]] = {
    "xattn": (_is_xattn, "all cross-attention weights (q, k, v, out): ESD-x, AGE for objects and artists"),
    "xattn_kv": (lambda n: "attn2.to_k." in n or "attn2.to_v." in n, "cross-attention keys and values only"),
    "noxattn": (_is_noxattn, "everything but cross-attention, time embedding and output layers: ESD-u, AGE for nudity"),
    "selfattn": (lambda n: "attn1" in n, "self-attention weights"),
    "full": (lambda n: True, "every UNet weight"),
}


def select_parameters(unet: torch.nn.Module, parameter_set: str) -> dict[str, torch.nn.Parameter]:
    """The named UNet parameters a method trains, in diffusers naming."""
    if parameter_set not in PARAMETER_SETS:
        raise ValueError(f"unknown parameter set {parameter_set!r}; choose one of {', '.join(PARAMETER_SETS)}")
    keep = PARAMETER_SETS[parameter_set][0]
    chosen = {name: p for name, p in unet.named_parameters() if keep(name)}
    if not chosen:
        raise ValueError(f"parameter set {parameter_set!r} selects no parameter of this UNet")
    return chosen
