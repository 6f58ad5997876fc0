"""UCE (Gandikota et al., WACV'24): a closed-form edit of the cross-attention key/value projections.

For every ``attn2.to_k`` / ``attn2.to_v`` weight W (out x text_dim), with text states c:

    W' = (sum_e s_e W t_e c_e^T + sum_p s_p W c_p c_p^T + lam W) (sum_e s_e c_e c_e^T + sum_p s_p c_p c_p^T + lam I)^-1

Erased prompt states c_e are mapped to the target prompt's states t_e at the same token positions
(the full padded sequence, so the tokens after the concept follow it too); preserved prompts keep
their keys and values; ``lam`` keeps W' close to W. Solved in float64.
"""

from __future__ import annotations

import torch

from .config import UCEConfig
from .registry import Method, MethodResult, register_method


@torch.no_grad()
def uce_edit(bundle, config: UCEConfig) -> dict[str, torch.Tensor]:
    """Edit the bundle's UNet in place; returns the original values of the edited weights."""
    tpl = config.prompt_template
    erased = bundle.encode([tpl.format(c=c) for c in config.concepts]).double()
    target = bundle.encode([config.target] * len(config.concepts)).double()
    d = erased.shape[-1]
    c_e = erased.reshape(-1, d).T  # (d, n_e)
    t_e = target.reshape(-1, d).T
    lhs_in = config.erase_scale * c_e @ c_e.T + config.lam * torch.eye(d, dtype=torch.float64, device=c_e.device)
    if config.preserve:
        kept = bundle.encode([tpl.format(c=p) for p in config.preserve]).double().reshape(-1, d).T
        lhs_in = lhs_in + config.preserve_scale * kept @ kept.T
    inverse = torch.linalg.inv(lhs_in)
    originals = {}
    for name, param in bundle.unet.named_parameters():
        if not ("attn2.to_k." in name or "attn2.to_v." in name) or not name.endswith("weight"):
            continue
        w = param.double()
        rhs = config.erase_scale * (w @ t_e) @ c_e.T + config.lam * w
        if config.preserve:
            rhs = rhs + config.preserve_scale * (w @ kept) @ kept.T
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


register_method(Method("uce", "UCE (closed-form edit)", UCEConfig, run_uce,
                       "closed-form edit of the cross-attention keys and values towards a fixed target"))
