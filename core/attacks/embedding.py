"""Embedding inversion (textual inversion / CCE style): learn new token embeddings with which the
*erased* model denoises images of the concept that the *base* model made.

The tokenizer gains placeholder tokens the way diffusers' textual inversion adds them
(``tokenizer.add_tokens``), but on a copy swapped into the bundle for the attack, and the text
encoder's input-embedding layer is wrapped instead of resized, so that afterwards the bundle's
tokenizer and embedding table are the very objects they were, unchanged. The UNet, the text encoder
and the erased weights are frozen; only the new embeddings train.

Default steps: 200 at batch 4 fit well under 3 minutes on 2 CPU cores on the toy world
(``age-explorer bench attack`` measures it).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..bundle import ModelBundle
from .common import AttackTarget, DenoisingObjective, OptimConfig, Probe, _help, check_stop, frozen, nearest_words


@dataclass
class EmbeddingConfig(OptimConfig):
    """Learn 1-4 new tokens on the erased model; generate with them in the concept's place."""

    attack = "embedding"

    tokens: int = _help("number of new tokens learned (1-4)", 2)
    lr: float = _help("Adam learning rate of the new embeddings", 0.1)
    placeholder: str = _help("text of the new tokens; token i is '<placeholder-i>'", "attack")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.tokens <= 4:
            raise ValueError(f"tokens must be between 1 and 4, got {self.tokens}")
        if not self.placeholder.strip() or any(ch.isspace() or ch in "<>" for ch in self.placeholder):
            raise ValueError(f"placeholder must be one word without < or >, got {self.placeholder!r}")


class _ExtendedEmbedding(torch.nn.Module):
    """The original embedding table for known ids; the learned vectors for ids past its end."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base, self.extra = base, extra
        self.size = base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:  # code that reads the table's dtype or device still finds it
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.size - 1))
        new = ids >= self.size
        if new.any():
            learned = self.extra[(ids - self.size).clamp(min=0)].to(out.dtype)
            out = torch.where(new[..., None], learned, out)
        return out


@contextlib.contextmanager
def placeholder_tokens(bundle: ModelBundle, vectors: torch.Tensor, name: str = "attack"):
    """Make ``<name-0> ... <name-k>`` words of the bundle whose input embeddings are ``vectors`` (k, D).

    Yields the token strings. On exit the bundle's own tokenizer and embedding layer are back."""
    tokens = [f"<{name}-{i}>" for i in range(len(vectors))]
    original_tokenizer = bundle.tokenizer
    known = original_tokenizer.get_vocab()
    clash = [t for t in tokens if t in known]
    if clash:
        raise ValueError(f"the tokenizer already has the token {clash[0]}; choose another placeholder")
    tokenizer = copy.deepcopy(original_tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    encoder = bundle.text_encoder
    original_embedding = encoder.get_input_embeddings()
    if ids != list(range(original_embedding.num_embeddings, original_embedding.num_embeddings + len(tokens))):
        raise RuntimeError(f"the tokenizer gave the new tokens ids {ids}, not the ids right after the text "
                           f"encoder's {original_embedding.num_embeddings} embeddings")
    encoder.set_input_embeddings(_ExtendedEmbedding(original_embedding, vectors))
    bundle.tokenizer = tokenizer
    try:
        yield tokens
    finally:
        encoder.set_input_embeddings(original_embedding)
        bundle.tokenizer = original_tokenizer


class EmbeddingAttack:
    name = "embedding"
    config_class = EmbeddingConfig
    depends_on_weights = True

    def learn(self, target: AttackTarget, concept: str, config: EmbeddingConfig, progress=None, stop=None):
        bundle = target.bundle
        objective = DenoisingObjective(target, concept, config, progress, stop)
        table = bundle.text_encoder.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(config.seed + 1)
        # Start from the mean word plus noise of the table's spread: no prior knowledge of the concept.
        # drawn on the CPU (the generator's device), so a seed gives the same start on any device
        noise = torch.randn((config.tokens, table.shape[1]), generator=g).to(table.device)
        init = table.float().mean(0) + table.float().std(0) * noise
        vectors = torch.nn.Parameter(init)
        optimizer = torch.optim.Adam([vectors], lr=config.lr)
        losses = []
        with frozen(bundle.unet, bundle.text_encoder), placeholder_tokens(bundle, vectors, config.placeholder) as words:
            prompt = config.template.format(c=" ".join(words))
            ids = bundle.tokenize([prompt]).to(bundle.device)
            for step in range(config.steps):
                check_stop(stop)
                states = bundle.text_encoder(ids)[0].to(bundle.dtype)
                loss = objective.loss(states)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if progress:
                    progress("optimise", step + 1, config.steps)
            with torch.no_grad():
                cond = bundle.text_encoder(ids)[0].to(bundle.dtype)
        learned = {"prompt": prompt, "tokens": words, "nearest_words": nearest_words(bundle, vectors, table),
                   "loss_first": losses[0], "loss_last_10": sum(losses[-10:]) / len(losses[-10:])}
        return [Probe(prompt, cond.detach(), config.seed_list, config.guidance, "learned tokens")], learned, \
            {"embedding": vectors.detach().cpu().contiguous()}
