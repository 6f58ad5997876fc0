"""UCE (Gandikota et al., WACV'24): a closed-form edit of the cross-attention key/value projections.

For every ``attn2.to_k`` / ``attn2.to_v`` weight W (out x text_dim), with token states c:

    W' = (sum_e s_e W t_e c_e^T + sum_p s_p W c_p c_p^T + lam W) (sum_e s_e c_e c_e^T + sum_p s_p c_p c_p^T + lam I)^-1

Erased token states c_e are mapped to the target prompt's token states t_e; preserved prompts keep
their keys and values; ``lam`` keeps W' close to W. Solved in float64.

Which positions are edited (``token_alignment``), as the reference ``train_erase.py``:

- ``last_word``: the erased prompt's positions from its last word's (last) token to the end of the
  padded sequence, each mapped to the target's position the same distance after the target's last
  word (for the empty target ' ': its start token). The sequence is cut where the later of the two
  runs out. The words before the last one (e.g. "a photo of") are not edited.
- ``all``: every position onto the same position of the target (this project's earlier behaviour).

Preserved prompts are the empty prompt '' (``preserve_empty``, as the reference) and the preserved
concepts, all positions, weighted max(0.1, 1/their number) unless ``preserve_scale`` is set.
The token states are what the cross-attention reads (both SDXL encoders' states side by side).
"""

from __future__ import annotations

import torch

from .config import UCEConfig
from .registry import MethodResult


def last_word_position(bundle, prompt: str) -> int:
    """The position of a prompt's last word token in its padded token sequence (the start token for an
    empty prompt): the reference's ``attention_mask.sum() - 2`` for a tokenizer that adds start and end."""
    ids = bundle.tokenizer(prompt, truncation=True, max_length=bundle.max_tokens).input_ids
    ends_with_eos = bundle.tokenizer.eos_token_id is not None and ids and ids[-1] == bundle.tokenizer.eos_token_id
    return max(0, len(ids) - 1 - int(bool(ends_with_eos)))


def edited_positions(bundle, erased_prompt: str, target: str, alignment: str, length: int) -> tuple[list[int], list[int]]:
    """(erased positions, target positions) paired one to one, for token sequences of ``length``."""
    if alignment == "all":
        return list(range(length)), list(range(length))
    start = last_word_position(bundle, erased_prompt)
    target_start = last_word_position(bundle, target)
    count = length - max(start, target_start)
    return list(range(start, start + count)), list(range(target_start, target_start + count))


def kv_weight_names(bundle) -> list[str]:
    """The cross-attention key and value projections' weights (``attn2.to_k`` / ``attn2.to_v``), in the
    UNet's parameter order: what UCE and RECE edit."""
    return [name for name, _ in bundle.unet.named_parameters()
            if ("attn2.to_k." in name or "attn2.to_v." in name) and name.endswith("weight")]


@torch.no_grad()
def erasure_columns(bundle, config: UCEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's erasure equations: the erased prompts' token states c_e and the target's t_e they are mapped
    to, as float64 columns (d, n_e), paired by ``token_alignment``."""
    # the reference maps to ' ' when the target is empty: the same tokens as '' for CLIP's tokenizer
    target = config.target or " "
    prompts = [config.prompt_template.format(c=c) for c in config.concepts]
    erased = bundle.cross_attention_states(bundle.encode(prompts)).double()
    target_states = bundle.cross_attention_states(bundle.encode([target])).double()[0]
    length = erased.shape[1]
    c_cols, t_cols = [], []
    for prompt, states in zip(prompts, erased):
        at_erased, at_target = edited_positions(bundle, prompt, target, config.token_alignment, length)
        c_cols.append(states[at_erased])
        t_cols.append(target_states[at_target])
    return torch.cat(c_cols).T, torch.cat(t_cols).T


@torch.no_grad()
def preserved_columns(bundle, prompts: list[str]) -> torch.Tensor | None:
    """Every token state of the preserved prompts as float64 columns (d, n_p); None for no prompts."""
    if not prompts:
        return None
    states = bundle.cross_attention_states(bundle.encode(prompts)).double()
    return states.reshape(-1, states.shape[-1]).T


@torch.no_grad()
def closed_form_edit(bundle, c_e: torch.Tensor, t_e: torch.Tensor, kept: torch.Tensor | None,
                     erase_scale: float, preserve_scale: float, lam: float) -> dict[str, torch.Tensor]:
    """Edit every ``attn2.to_k`` / ``attn2.to_v`` weight W of the bundle's UNet in place, in float64:

        W' = (s_e W t_e c_e^T + s_p W k k^T + lam W) (s_e c_e c_e^T + s_p k k^T + lam I)^-1

    with the columns ``c_e`` (inputs) mapped to W's outputs on ``t_e``, the preserved columns ``kept``
    (k) keeping theirs. Returns the values of the edited weights before the edit."""
    d = c_e.shape[0]
    lhs_in = erase_scale * c_e @ c_e.T + lam * torch.eye(d, dtype=torch.float64, device=c_e.device)
    if kept is not None:
        lhs_in = lhs_in + preserve_scale * kept @ kept.T
    inverse = torch.linalg.inv(lhs_in)
    originals = {}
    params = dict(bundle.unet.named_parameters())
    for name in kv_weight_names(bundle):
        param = params[name]
        w = param.double()
        rhs = erase_scale * (w @ t_e) @ c_e.T + lam * w
        if kept is not None:
            rhs = rhs + preserve_scale * (w @ kept) @ kept.T
        originals[name] = param.detach().clone()
        param.copy_((rhs @ inverse).to(param.dtype))
    return originals


@torch.no_grad()
def uce_edit(bundle, config: UCEConfig) -> dict[str, torch.Tensor]:
    """Edit the bundle's UNet in place; returns the original values of the edited weights."""
    c_e, t_e = erasure_columns(bundle, config)
    kept = preserved_columns(bundle, config.preserved_prompts())
    return closed_form_edit(bundle, c_e, t_e, kept, config.erase_scale, config.effective_preserve_scale(),
                            config.lam)


def restore(bundle, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put ``originals`` back into the bundle's UNet; returns the edited values (on the CPU) they replace."""
    params = dict(bundle.unet.named_parameters())
    changed = {n: params[n].detach().cpu().clone() for n in originals}
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    return changed


def run_uce(bundle, config: UCEConfig, run_dir, callbacks=None, stop=None, resume=False) -> MethodResult:
    """One closed-form edit (no steps, nothing to resume); the bundle's weights are restored after."""
    if config.requires_gpu and bundle.device.type != "cuda":
        raise RuntimeError(f"preset {config.preset!r} needs a CUDA GPU")
    originals = uce_edit(bundle, config)
    return MethodResult("done", 1, restore(bundle, originals), originals)
