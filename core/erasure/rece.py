"""RECE (Gong et al., ECCV'24): UCE's closed-form edit, then epochs that find and erase what still
regenerates the concept.

After UCE's edit (``uce_first``; the reference loads a UCE checkpoint made with UCE's defaults), each
epoch, for every erased concept with token states c (all positions of its prompt):

1. the adversarial embedding (the reference's ``close_form_emb_regzero``): the token states e whose
   keys and values in the *edited* model are closest to the *original* model's on the concept,

       e* = argmin_e  sum_l ||W'_l e - W_l c||^2 + regular_scale ||e||^2
          = (sum_l W'_l^T W'_l + regular_scale I)^-1 (sum_l W'_l^T W_l) c

   over every ``attn2.to_k`` / ``attn2.to_v`` weight (W: before any edit, W': now), position by position;
2. the adversarial edit (the reference's ``edit_model_adversarial``): UCE's closed form
   (``uce.closed_form_edit``) of the current weights with every position of e* mapped onto the same
   position of the target's token states (``adv_token_alignment="all"``; ``last_word`` edits only the
   positions from the prompt's last word on, aligned as UCE's), the preserved prompts ('' and
   ``preserve``, all positions) kept, weights ``adv_erase_scale`` / ``adv_preserve_scale`` / ``adv_lam``.

All in float64. The manifest's ``adversarial_embeddings`` records, per epoch and concept, the norms
and cosines of e* and how far the model's keys and values on e* and on c are from the original
model's on c, before and after the epoch's edit.
"""

from __future__ import annotations

import time

import torch

from .config import RECEConfig
from .loop import StepReport
from .registry import MethodResult
from .uce import closed_form_edit, edited_positions, kv_weight_names, preserved_columns, restore, uce_edit


@torch.no_grad()
def derive_embedding(edited: list[torch.Tensor], original: list[torch.Tensor], states: torch.Tensor,
                     regular_scale: float) -> torch.Tensor:
    """The adversarial token states (..., d) of ``states`` (..., d): closed form, in float64, from the
    edited and the original key/value weights (out_l x d), paired one to one."""
    d = states.shape[-1]
    mat1 = regular_scale * torch.eye(d, dtype=torch.float64, device=states.device)
    mat2 = torch.zeros(d, d, dtype=torch.float64, device=states.device)
    for w_now, w_base in zip(edited, original):
        w_now, w_base = w_now.double(), w_base.to(w_now.device).double()
        mat1 = mat1 + w_now.T @ w_now
        mat2 = mat2 + w_now.T @ w_base
    coefficient = torch.linalg.solve(mat1, mat2)  # the reference: inverse(mat1) @ mat2
    return states.double() @ coefficient.T


def _kv(bundle) -> list[torch.Tensor]:
    params = dict(bundle.unet.named_parameters())
    return [params[name].detach() for name in kv_weight_names(bundle)]


@torch.no_grad()
def _distances(edited: list[torch.Tensor], original: list[torch.Tensor], inputs: torch.Tensor,
               concept: torch.Tensor) -> torch.Tensor:
    """Per concept (n,): sqrt(sum_l ||W'_l x - W_l c||^2) / sqrt(sum_l ||W_l c||^2) over all positions."""
    num = torch.zeros(len(concept), dtype=torch.float64, device=concept.device)
    den = torch.zeros_like(num)
    for w_now, w_base in zip(edited, original):
        w_now, w_base = w_now.double(), w_base.to(w_now.device).double()
        base = concept @ w_base.T
        num += ((inputs @ w_now.T - base) ** 2).sum(dim=(1, 2))
        den += (base ** 2).sum(dim=(1, 2))
    return (num / den.clamp_min(1e-300)).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def run_rece(bundle, config: RECEConfig, run_dir, callbacks=None, stop=None, resume=False) -> MethodResult:
    """UCE's edit, then ``epochs`` adversarial edits (no checkpoints: each epoch is one closed form);
    the bundle's weights are restored after."""
    if config.requires_gpu and bundle.device.type != "cuda":
        raise RuntimeError(f"preset {config.preset!r} needs a CUDA GPU")
    started = time.time()
    names = kv_weight_names(bundle)
    params = dict(bundle.unet.named_parameters())
    if config.uce_first:
        originals = uce_edit(bundle, config)
    else:
        originals = {name: params[name].detach().clone() for name in names}
    try:
        base = [originals[name] for name in names]
        prompts = [config.prompt_template.format(c=c) for c in config.concepts]
        concept = bundle.cross_attention_states(bundle.encode(prompts)).double()  # (n, L, d)
        target = bundle.cross_attention_states(bundle.encode([config.target or " "])).double()  # (1, L, d)
        kept = preserved_columns(bundle, config.preserved_prompts())
        target_text = config.target or " "  # as UCE: the reference maps to ' ' when the target is empty
        pairs = [edited_positions(bundle, prompt, target_text, config.adv_token_alignment, concept.shape[1])
                 for prompt in prompts]
        t_e = torch.cat([target[0, at_target] for _, at_target in pairs]).T
        epochs, history = [], []
        for epoch in range(1, config.epochs + 1):
            adv = derive_embedding(_kv(bundle), base, concept, config.regular_scale)
            before = _distances(_kv(bundle), base, adv, concept)
            concept_before = _distances(_kv(bundle), base, concept, concept)
            c_e = torch.cat([adv[i, at_erased] for i, (at_erased, _) in enumerate(pairs)]).T
            closed_form_edit(bundle, c_e, t_e, kept, config.adv_erase_scale,
                             config.adv_preserve_scale, config.adv_lam)
            after = _distances(_kv(bundle), base, adv, concept)
            concept_after = _distances(_kv(bundle), base, concept, concept)
            rows = {c: {"adv_norm": float(adv[i].norm()), "concept_norm": float(concept[i].norm()),
                        "cosine_to_concept": float(_cosine(adv[i:i + 1], concept[i:i + 1])[0]),
                        "cosine_to_target": float(_cosine(adv[i:i + 1], target)[0]),
                        "adv_kv_distance_before": float(before[i]), "adv_kv_distance_after": float(after[i]),
                        "concept_kv_distance_before": float(concept_before[i]),
                        "concept_kv_distance_after": float(concept_after[i])}
                    for i, c in enumerate(config.concepts)}
            epochs.append({"epoch": epoch, "concepts": rows})
            losses = {key: sum(r[key] for r in rows.values()) / len(rows)
                      for key in ("adv_kv_distance_before", "adv_kv_distance_after", "concept_kv_distance_after",
                                  "adv_norm", "cosine_to_concept")}
            elapsed = time.time() - started
            report = StepReport(epoch, config.epochs, "epoch", ", ".join(config.concepts), losses, elapsed,
                                elapsed / epoch * (config.epochs - epoch))
            history.append({"step": epoch, "phase": "epoch", "concept": report.concept,
                            "elapsed": round(elapsed, 3), **losses})
            for callback in callbacks or []:
                callback(report)
    except BaseException:
        restore(bundle, originals)
        raise
    extra = {"adversarial_embeddings": epochs}
    return MethodResult("done", int(config.uce_first) + config.epochs, restore(bundle, originals), originals,
                        extra=extra, history=history)
