"""What every recovery attack shares: the config fields, the attacked run (its erased and base weights),
the judge that decides whether an image shows the concept, generation from hidden states, and the
denoising objective of the optimising attacks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..bundle import ModelBundle, load_bundle
from ..runs import CorruptRunError, RunManifest, apply_delta, is_run_dir
from ..sampling import initial_latents, sample_latents
from .config import OptimConfig

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class AttackStopped(Exception):
    """The caller's stop flag was raised; nothing was written."""


@dataclass
class Probe:
    """One attack input: hidden states to generate from, with its seeds and guidance."""

    label: str  # the prompt, or a description of the learned input
    cond: torch.Tensor  # (1, L, D)
    seeds: list[int]
    guidance: float | None = None
    kind: str = ""


class AttackTarget:
    """An erased run loaded for attack: the bundle carries the erased weights; ``weights("base")``
    swaps in the base values of the weights the run changed (no second model in memory)."""

    def __init__(self, run_dir: str | Path, device="auto", dtype=None, local_files_only: bool | None = None):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        if not is_run_dir(self.run_dir):
            raise ValueError(f"{run_dir} is not an erased run (no erasure manifest.json): attack a folder "
                             f"written by `age-explorer erase`")
        self.manifest = RunManifest.read(self.run_dir)
        m = self.manifest
        bundle = load_bundle(m.base_model, device=device, dtype=dtype, local_files_only=local_files_only,
                             revision=m.base_revision)
        if m.base_revision and bundle.revision and m.base_revision != bundle.revision:
            raise CorruptRunError(f"run {run_dir} was made on revision {m.base_revision} of {m.base_model}, "
                                  f"but revision {bundle.revision} is installed")
        from safetensors import safe_open

        with safe_open(str(self.run_dir / (m.delta_file or "delta.safetensors")), "pt") as f:
            names = list(f.keys())
        params = dict(bundle.unet.named_parameters())
        self.base_values = {n: params[n].detach().clone() for n in names if n in params}
        apply_delta(bundle, self.run_dir, m)
        self.erased_values = {n: params[n].detach().clone() for n in self.base_values}
        bundle.run_manifest, bundle.base_source = m, bundle.source
        bundle.source = str(self.run_dir)
        self.bundle: ModelBundle = bundle
        self.active = "erased"

    @property
    def concepts(self) -> list[str]:
        return list(self.manifest.concepts)

    def concept(self, asked: str | None) -> str:
        if asked is None:
            return self.concepts[0]
        if asked not in self.concepts:
            raise ValueError(f"{asked!r} is not a concept of the run {self.run_dir} "
                             f"(it erased: {', '.join(self.concepts)})")
        return asked

    def describe(self) -> str:
        m = self.manifest
        search = m.config.get("target_search")
        target = m.config.get("target")
        what = m.method.upper() + (f" ({search} search)" if search else "") + \
            (f" target {target!r}" if target is not None else "")
        return f"{what}, preset {m.preset}"

    @contextlib.contextmanager
    def weights(self, which: str):
        """``base`` or ``erased`` weights for the duration of the block (blocks nest); then the ones before."""
        if which not in ("base", "erased"):
            raise ValueError(f"weights must be base or erased, got {which!r}")
        before = self.active
        self._load(which)
        try:
            yield self.bundle
        finally:
            self._load(before)

    def _load(self, which: str) -> None:
        params = dict(self.bundle.unet.named_parameters())
        with torch.no_grad():
            for name, value in (self.base_values if which == "base" else self.erased_values).items():
                params[name].copy_(value)
        self.active = which


class Judge:
    """Whether each image shows ``concept``: top-1 of the evaluator is the concept (as G top-1 counts)."""

    def __init__(self, name: str, evaluator, label: int):
        self.name, self.evaluator, self.label = name, evaluator, label

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.topk(images, 1)[:, 0].cpu() == self.label


def default_judge(bundle: ModelBundle, concept: str, evaluator: str | None = None,
                  concept_set: str | None = None) -> Judge:
    """The toy classifier on the toy world; on SD the graph's evaluator over a concept set holding the concept."""
    from ..graph.capability import default_evaluator_name, load_evaluator
    from ..graph.concept_sets import load_concept_set

    own = bundle.backend.concept_set()
    cs = load_concept_set(concept_set or (bundle.kind if own is not None else "imagenette"), bundle)
    if concept not in cs.concepts:
        raise ValueError(f"the evaluator's concept set {cs.name!r} has no class {concept!r}: pass a concept set "
                         f"that holds it (a CSV of concepts, --concept-set FILE)")
    name = evaluator or default_evaluator_name(bundle, cs)
    return Judge(name, load_evaluator(name, bundle, cs), cs.concepts.index(concept))


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """No gradients into the models' weights (only the attack's own tensors train); flags restored after."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise AttackStopped("stopped")


def generate_states(bundle: ModelBundle, cond: torch.Tensor, seeds: list[int], steps: int | None,
                    guidance: float | None, stop=None, batch_size: int = 64) -> torch.Tensor:
    """Images from hidden states (the learned inputs have no prompt text), as ``generate`` does."""
    steps = steps or bundle.default_steps
    guidance = bundle.default_guidance if guidance is None else guidance
    out = []
    for start in range(0, len(seeds), batch_size):
        check_stop(stop)
        chunk = seeds[start:start + batch_size]
        latents = sample_latents(bundle, cond.expand(len(chunk), -1, -1), initial_latents(bundle, chunk), steps,
                                 guidance, eta=bundle.default_eta, seeds=chunk)
        out.append(bundle.decode(latents).cpu())
    return torch.cat(out)


class DenoisingObjective:
    """Noise-prediction loss of the current UNet on fixed images of the concept (textual inversion's loss).

    The images are latents the *base* model made for the plain prompt with fixed seeds; timesteps and
    noise come from the attack's own generator, so an attack is deterministic for its seed.
    """

    def __init__(self, target: AttackTarget, concept: str, config: OptimConfig, progress: Progress | None = None,
                 stop=None):
        bundle = target.bundle
        self.bundle, self.config = bundle, config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.scheduler = bundle.train_scheduler()
        with target.weights("base"):
            cond = bundle.encode([config.template.format(c=concept)])
            seeds = config.train_seeds
            latents = []
            for i, s in enumerate(seeds):
                check_stop(stop)
                latents.append(sample_latents(bundle, cond, initial_latents(bundle, [s]),
                                              config.sample_steps or bundle.default_steps,
                                              bundle.default_guidance if config.guidance is None else config.guidance))
                if progress:
                    progress("training images", i + 1, len(seeds))
        self.x0 = torch.cat(latents).detach()

    def loss(self, states: torch.Tensor) -> torch.Tensor:
        """``states``: (1, L, D) hidden states with gradients to the attack's tensors."""
        b = self.config.batch_size
        g = self.generator
        idx = torch.randint(len(self.x0), (b,), generator=g)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn((b, *self.x0.shape[1:]), generator=g).to(self.x0)
        x0 = self.x0[idx]
        t = t.to(self.bundle.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        out = self.bundle.unet(xt, t, **self.bundle.unet_kwargs(states.expand(b, -1, -1))).sample.float()
        target = self.scheduler.get_velocity(x0, noise, t) if self.bundle.prediction_type == "v_prediction" else noise
        return F.mse_loss(out, target.float())


def token_ids(tokenizer, prompt: str, device) -> torch.Tensor:
    """(1, L) ids of ``prompt`` padded as the prompt states are (``ModelBundle.tokenize`` for the first tokenizer)."""
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def content_positions(bundle: ModelBundle, ids: torch.Tensor, tokenizer=None) -> torch.Tensor:
    """Positions of a tokenised prompt (1, L) that hold words, not start/end/padding tokens
    (``tokenizer``: the one that made ``ids``, default the bundle's first)."""
    special = set((tokenizer or bundle.tokenizer).all_special_ids)
    return torch.tensor([i for i, tok in enumerate(ids[0].tolist()) if tok not in special], dtype=torch.long)


def nearest_words(bundle: ModelBundle, vectors: torch.Tensor, table: torch.Tensor, k: int = 3,
                  tokenizer=None) -> list[list[str]]:
    """The vocabulary tokens whose input embeddings are closest (cosine) to each vector: what a learned
    vector 'reads as' (``table`` and ``tokenizer``: one text encoder's, default the bundle's first)."""
    tokenizer = tokenizer or bundle.tokenizer
    special = set(tokenizer.all_special_ids)
    sims = F.normalize(vectors.detach().float(), dim=-1) @ F.normalize(table.detach().float(), dim=-1).T
    if special:
        sims[:, [i for i in special if i < sims.shape[1]]] = -2
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in top]


def suffix(i: int) -> str:
    """Name suffix of text encoder ``i``'s learned tensors and facts: none for the first, ``_2`` for the second."""
    return "" if i == 0 else f"_{i + 1}"
