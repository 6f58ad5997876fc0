"""Prompt-embedding attack (UnlearnDiffAtk style): a norm-bounded perturbation of the plain prompt's
token embeddings, optimised on the erased model against the denoising objective.

Each word token's embedding moves by at most ``epsilon`` times the mean norm of the vocabulary's
embeddings (L2, per token; projected after every Adam step). Start, end and padding tokens stay as
they are. The result reports the bound in both units and the nearest words of the perturbed tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .common import (AttackTarget, DenoisingObjective, OptimConfig, Probe, _help, check_stop, content_positions,
                     frozen, nearest_words)


@dataclass
class PerturbConfig(OptimConfig):
    """Perturb the plain prompt's word embeddings within an L2 ball per token."""

    attack = "perturb"

    epsilon: float = _help("per-token L2 bound, relative to the mean norm of the vocabulary's embeddings", 0.5)
    lr: float = _help("Adam learning rate, relative to the absolute bound", 0.1)

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon}")


@contextlib.contextmanager
def perturbed_embeddings(encoder: torch.nn.Module, delta: torch.Tensor, mask: torch.Tensor):
    """Add ``delta * mask`` (L, D) to the input embeddings of every prompt encoded inside the block."""
    handle = encoder.get_input_embeddings().register_forward_hook(
        lambda module, inputs, out: out + (delta * mask).to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


class PerturbAttack:
    name = "perturb"
    config_class = PerturbConfig
    depends_on_weights = True

    def learn(self, target: AttackTarget, concept: str, config: PerturbConfig, progress=None, stop=None):
        bundle = target.bundle
        objective = DenoisingObjective(target, concept, config, progress, stop)
        prompt = config.template.format(c=concept)
        ids = bundle.tokenize([prompt]).to(bundle.device)
        table = bundle.text_encoder.get_input_embeddings().weight.detach()
        bound = config.epsilon * float(table.float().norm(dim=1).mean())
        positions = content_positions(bundle, ids.cpu())
        mask = torch.zeros(ids.shape[1], 1, device=table.device)
        mask[positions] = 1
        delta = torch.nn.Parameter(torch.zeros(ids.shape[1], table.shape[1], device=table.device))
        optimizer = torch.optim.Adam([delta], lr=config.lr * bound)
        losses = []
        with frozen(bundle.unet, bundle.text_encoder), perturbed_embeddings(bundle.text_encoder, delta, mask):
            for step in range(config.steps):
                check_stop(stop)
                loss = objective.loss(bundle.text_encoder(ids)[0].to(bundle.dtype))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # projection onto the L2 ball of each token
                    norms = delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    delta.mul_(norms.clamp(max=bound) / norms)
                losses.append(loss.item())
                if progress:
                    progress("optimise", step + 1, config.steps)
            with torch.no_grad():
                cond = bundle.text_encoder(ids)[0].to(bundle.dtype)
        moved = (delta * mask).detach()
        originals = table[ids[0, positions]]
        words = bundle.tokenizer.convert_ids_to_tokens(ids[0, positions].tolist())
        learned = {"prompt": prompt, "bound_relative": config.epsilon, "bound_l2": bound,
                   "largest_token_change_l2": float(moved.norm(dim=1).max()),
                   "tokens": words, "nearest_words": nearest_words(bundle, originals + moved[positions], table),
                   "loss_first": losses[0], "loss_last_10": sum(losses[-10:]) / len(losses[-10:])}
        label = f"{prompt} + perturbation (L2 <= {config.epsilon:g} x mean embedding norm)"
        return [Probe(label, cond.detach(), config.seed_list, config.guidance, "perturbed prompt")], learned, \
            {"perturbation": moved.cpu().contiguous()}
