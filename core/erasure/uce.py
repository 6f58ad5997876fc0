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


@torch.no_grad()
def uce_edit(bundle, config: UCEConfig) -> dict[str, torch.Tensor]:
    """Edit the bundle's UNet in place; returns the original values of the edited weights."""
    # the reference maps to ' ' when the target is empty: the same tokens as '' for CLIP's tokenizer
    target = config.target or " "
    prompts = [config.prompt_template.format(c=c) for c in config.concepts]
    erased = bundle.cross_attention_states(bundle.encode(prompts)).double()
    target_states = bundle.cross_attention_states(bundle.encode([target])).double()[0]
    length, d = erased.shape[1], erased.shape[2]
    c_cols, t_cols = [], []
    for prompt, states in zip(prompts, erased):
        at_erased, at_target = edited_positions(bundle, prompt, target, config.token_alignment, length)
        c_cols.append(states[at_erased])
        t_cols.append(target_states[at_target])
    c_e = torch.cat(c_cols).T  # (d, n_e)
    t_e = torch.cat(t_cols).T
    lhs_in = config.erase_scale * c_e @ c_e.T + config.lam * torch.eye(d, dtype=torch.float64, device=c_e.device)
    kept_prompts = config.preserved_prompts()
    preserve_scale = config.effective_preserve_scale()
    if kept_prompts:
        kept = bundle.cross_attention_states(bundle.encode(kept_prompts)).double().reshape(-1, d).T
        lhs_in = lhs_in + preserve_scale * kept @ kept.T
    inverse = torch.linalg.inv(lhs_in)
    originals = {}
    for name, param in bundle.unet.named_parameters():
        if not ("attn2.to_k." in name or "attn2.to_v." in name) or not name.endswith("weight"):
            continue
        w = param.double()
        rhs = config.erase_scale * (w @ t_e) @ c_e.T + config.lam * w
        if kept_prompts:
            rhs = rhs + preserve_scale * (w @ kept) @ kept.T
        originals[name] = param.detach().clone()
        param.copy_((rhs @ inverse).to(param.dtype))
    return originals


def run_uce(bundle, config: UCEConfig, run_dir, callbacks=None, stop=None, resume=False) -> MethodResult:
    """One closed-form edit (no steps, nothing to resume); the bundle's weights are restored after."""
    if config.requires_gpu and bundle.device.type != "cuda":
        raise RuntimeError(f"preset {config.preset!r} needs a CUDA GPU")
    originals = uce_edit(bundle, config)
    params = dict(bundle.unet.named_parameters())
    changed = {n: params[n].detach().cpu().clone() for n in originals}
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    return MethodResult("done", 1, changed, originals)
