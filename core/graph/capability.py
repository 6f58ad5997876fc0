"""Generation capability G(c): the share of N generated images of c that a classifier recognises as c.

On the toy world the classifier is the toy CNN. Spillover of an erasure a on concept b is
Delta(a -> b) = G_0(b) - G_a(b) with the same prompts and seeds before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..bundle import ModelBundle
from ..sampling import generate


@dataclass(frozen=True)
class CapabilitySpec:
    """What G is measured on; recorded with every measurement."""

    images_per_concept: int = 32
    seed: int = 1000
    template: str | None = None  # None: the concept set's default
    steps: int | None = None
    guidance_scale: float | None = None
    topk: int = 5


def toy_capability(bundle: ModelBundle, spec: CapabilitySpec, concepts: list[str] | None = None,
                   progress=None) -> pd.DataFrame:
    """G top-1 and top-k for toy concepts (default: all 25), one row per concept."""
    world = bundle.world
    names = concepts or world.names
    prompts = [world.prompt(n, spec.template) for n in names]
    seeds = list(range(spec.seed, spec.seed + spec.images_per_concept))
    images = generate(bundle, prompts, seeds, steps=spec.steps, guidance_scale=spec.guidance_scale,
                      progress=progress)
    top = bundle.classifier.topk(images, spec.topk).view(len(names), spec.images_per_concept, spec.topk)
    rows = []
    for i, name in enumerate(names):
        label = world.concept(name).index
        rows.append({"concept": name, "G_top1": (top[i, :, 0] == label).float().mean().item(),
                     f"G_top{spec.topk}": (top[i] == label).any(dim=1).float().mean().item()})
    return pd.DataFrame(rows)
