"""Embedding inversion (textual inversion / CCE style): learn new token embeddings with which the
*erased* model denoises images of the concept that the *base* model made.

The tokenizer gains placeholder tokens the way diffusers' textual inversion adds them
(``tokenizer.add_tokens``), but on a copy swapped into the bundle for the attack, and the text
encoder's input-embedding layer is wrapped instead of resized, so that afterwards the bundle's
tokenizer and embedding table are the very objects they were, unchanged. A model with several text
encoders (SDXL) gets the placeholders in every one, each with vectors of its own width, as diffusers'
SDXL textual inversion trains them; the prompt states are the backend's, so SDXL's pooled embedding
comes from the learned tokens too. The UNet, the text encoders and the erased weights are frozen; only
the new embeddings train.

Default steps: 200 at batch 4 fit well under 3 minutes on 2 CPU cores on the toy world
(``age-explorer bench attack`` measures it).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..bundle import ModelBundle
from .common import AttackTarget, DenoisingObjective, Probe, check_stop, frozen, nearest_words, suffix
from .config import EmbeddingConfig


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
def placeholder_tokens(bundle: ModelBundle, vectors: torch.Tensor | list[torch.Tensor], name: str = "attack"):
    """Make ``<name-0> ... <name-k>`` words of the bundle whose input embeddings are ``vectors``: a (k, D)
    tensor, or one per text encoder (SDXL has two), in the bundle's ``text_encoders()`` order.

    Yields the token strings. On exit the bundle's own tokenizers and embedding layers are back."""
    pairs = bundle.text_encoders()
    vectors = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if len(vectors) != len(pairs):
        raise ValueError(f"the model has {len(pairs)} text encoder(s): give one tensor of vectors for each, "
                         f"not {len(vectors)}")
    tokens = [f"<{name}-{i}>" for i in range(len(vectors[0]))]
    originals = [tokenizer for tokenizer, _ in pairs]
    tokenizers, swapped = [], []
    with contextlib.ExitStack() as restore:
        for (tokenizer, encoder), table in zip(pairs, vectors):
            known = tokenizer.get_vocab()
            clash = [t for t in tokens if t in known]
            if clash:
                raise ValueError(f"the tokenizer already has the token {clash[0]}; choose another placeholder")
            if len(table) != len(tokens):
                raise ValueError("every text encoder needs the same number of placeholder vectors")
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens(tokens)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            original_embedding = encoder.get_input_embeddings()
            if ids != list(range(original_embedding.num_embeddings, original_embedding.num_embeddings + len(tokens))):
                raise RuntimeError(f"the tokenizer gave the new tokens ids {ids}, not the ids right after the text "
                                   f"encoder's {original_embedding.num_embeddings} embeddings")
            tokenizers.append(tokenizer)
            swapped.append((encoder, original_embedding))
            restore.enter_context(_end_token_by_id(encoder, tokenizer.eos_token_id))
        for (encoder, original_embedding), table in zip(swapped, vectors):
            encoder.set_input_embeddings(_ExtendedEmbedding(original_embedding, table))
        bundle.backend.set_tokenizers(bundle, tokenizers)
        try:
            yield tokens
        finally:
            for encoder, original_embedding in swapped:
                encoder.set_input_embeddings(original_embedding)
            bundle.backend.set_tokenizers(bundle, originals)


@contextlib.contextmanager
def _end_token_by_id(encoder: torch.nn.Module, eos_token_id: int | None):
    """A CLIP text model whose config says ``eos_token_id`` 2 (older configs, SDXL's among them) pools
    its output at the largest id of the prompt, assuming the end token has the largest id; the
    placeholders' ids lie past it, so while they exist it pools at the end token found by its id
    (transformers' own rule for newer configs). Prompt states without placeholders are unchanged:
    there the first end token is also the first largest id."""
    legacy = [m for m in encoder.modules() if getattr(m, "eos_token_id", None) == 2]
    if eos_token_id is None or eos_token_id == 2 or not legacy:
        yield
        return
    for module in legacy:
        module.eos_token_id = eos_token_id
    try:
        yield
    finally:
        for module in legacy:
            module.eos_token_id = 2


class EmbeddingAttack:
    name = "embedding"
    config_class = EmbeddingConfig
    depends_on_weights = True

    def learn(self, target: AttackTarget, concept: str, config: EmbeddingConfig, progress=None, stop=None):
        bundle = target.bundle
        objective = DenoisingObjective(target, concept, config, progress, stop)
        pairs = bundle.text_encoders()
        tables = [encoder.get_input_embeddings().weight.detach() for _, encoder in pairs]
        g = torch.Generator().manual_seed(config.seed + 1)
        vectors = []
        for table in tables:  # one set of new tokens per text encoder (SDXL: both, as its textual inversion)
            # Start from the mean word plus noise of the table's spread: no prior knowledge of the concept.
            # drawn on the CPU (the generator's device), so a seed gives the same start on any device
            noise = torch.randn((config.tokens, table.shape[1]), generator=g).to(table.device)
            vectors.append(torch.nn.Parameter(table.float().mean(0) + table.float().std(0) * noise))
        optimizer = torch.optim.Adam(vectors, lr=config.lr)
        losses = []
        with frozen(bundle.unet, *(encoder for _, encoder in pairs)), \
                placeholder_tokens(bundle, vectors, config.placeholder) as words:
            prompt = config.template.format(c=" ".join(words))
            for step in range(config.steps):
                check_stop(stop)
                loss = objective.loss(bundle.encode_differentiable([prompt]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if progress:
                    progress("optimise", step + 1, config.steps)
            with torch.no_grad():
                cond = bundle.encode_differentiable([prompt])
        learned = {"prompt": prompt, "tokens": words}
        tensors = {}
        for i, ((tokenizer, _), table, learnt) in enumerate(zip(pairs, tables, vectors)):
            learned[f"nearest_words{suffix(i)}"] = nearest_words(bundle, learnt, table, tokenizer=tokenizer)
            tensors[f"embedding{suffix(i)}"] = learnt.detach().cpu().contiguous()
        learned.update(loss_first=losses[0], loss_last_10=sum(losses[-10:]) / len(losses[-10:]))
        return [Probe(prompt, cond.detach(), config.seed_list, config.guidance, "learned tokens")], learned, tensors
