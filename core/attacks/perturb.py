"""Prompt-embedding attack (UnlearnDiffAtk style): a norm-bounded perturbation of the plain prompt's
token embeddings, optimised on the erased model against the denoising objective.

Each word token's embedding moves by at most ``epsilon`` times the mean norm of the vocabulary's
embeddings (L2, per token; projected after every Adam step). Start, end and padding tokens stay as
they are. A model with several text encoders (SDXL) gets a perturbation in each, bounded by its own
table's norms; the prompt states (SDXL's pooled embedding included) are the backend's. The result
reports the bound in both units and the nearest words of the perturbed tokens.
"""

from __future__ import annotations

import contextlib

import torch

from .common import (AttackTarget, DenoisingObjective, Probe, check_stop, content_positions, frozen, nearest_words,
                     suffix, token_ids)
from .config import PerturbConfig


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
        parts = [_Part(bundle, tokenizer, encoder, prompt, config.epsilon) for tokenizer, encoder in bundle.text_encoders()]
        # one Adam over every text encoder's perturbation, each with a step size relative to its own bound
        optimizer = torch.optim.Adam([{"params": [p.delta], "lr": config.lr * p.bound} for p in parts])
        losses = []
        with frozen(bundle.unet, *(p.encoder for p in parts)), contextlib.ExitStack() as hooks:
            for p in parts:
                hooks.enter_context(perturbed_embeddings(p.encoder, p.delta, p.mask))
            for step in range(config.steps):
                check_stop(stop)
                loss = objective.loss(bundle.encode_differentiable([prompt]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # projection onto the L2 ball of each token
                    for p in parts:
                        norms = p.delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
                        p.delta.mul_(norms.clamp(max=p.bound) / norms)
                losses.append(loss.item())
                if progress:
                    progress("optimise", step + 1, config.steps)
            with torch.no_grad():
                cond = bundle.encode_differentiable([prompt])
        learned, tensors = {"prompt": prompt}, {}
        for i, p in enumerate(parts):
            moved = (p.delta * p.mask).detach()
            originals = p.table[p.ids[0, p.positions]]
            end = suffix(i)
            if i == 0:
                learned["bound_relative"] = config.epsilon
            learned.update({f"bound_l2{end}": p.bound, f"largest_token_change_l2{end}": float(moved.norm(dim=1).max()),
                            f"tokens{end}": p.tokenizer.convert_ids_to_tokens(p.ids[0, p.positions].tolist()),
                            f"nearest_words{end}": nearest_words(bundle, originals + moved[p.positions], p.table,
                                                                 tokenizer=p.tokenizer)})
            tensors[f"perturbation{end}"] = moved.cpu().contiguous()
        learned.update(loss_first=losses[0], loss_last_10=sum(losses[-10:]) / len(losses[-10:]))
        label = f"{prompt} + perturbation (L2 <= {config.epsilon:g} x mean embedding norm)"
        return [Probe(label, cond.detach(), config.seed_list, config.guidance, "perturbed prompt")], learned, tensors


class _Part:
    """One text encoder's share of the attack: its prompt ids, word positions, bound and perturbation."""

    def __init__(self, bundle, tokenizer, encoder: torch.nn.Module, prompt: str, epsilon: float):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.ids = token_ids(tokenizer, prompt, bundle.device)
        self.table = encoder.get_input_embeddings().weight.detach()
        self.bound = epsilon * float(self.table.float().norm(dim=1).mean())
        self.positions = content_positions(bundle, self.ids.cpu(), tokenizer)
        self.mask = torch.zeros(self.ids.shape[1], 1, device=self.table.device)
        self.mask[self.positions] = 1
        self.delta = torch.nn.Parameter(torch.zeros(self.ids.shape[1], self.table.shape[1], device=self.table.device))
