"""How good the toy model is: per-concept accuracy, image statistics against renders, and speed."""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.nn.functional as F

from age_explorer.core.bundle import ModelBundle
from age_explorer.core.sampling import generate
from age_explorer.core.toyworld.render import render


def concept_accuracy(bundle: ModelBundle, images_per_concept: int = 16, seed: int = 1000,
                     template: str | None = None, guidance_scale: float | None = None,
                     steps: int | None = None) -> tuple[pd.DataFrame, torch.Tensor]:
    """Top-1 accuracy of the toy classifier on generated images, one row per concept.

    Seeds are ``seed .. seed + images_per_concept - 1`` for every concept.
    """
    world = bundle.backend.world
    prompts = [world.prompt(name, template) for name in world.names]
    seeds = list(range(seed, seed + images_per_concept))
    images = generate(bundle, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    predicted = bundle.backend.classifier.topk(images, 1)[:, 0].view(len(prompts), images_per_concept)
    rows = []
    for i, concept in enumerate(world.concepts):
        wrong = predicted[i][predicted[i] != i]
        confused = world.names[int(wrong.mode().values)] if len(wrong) else ""
        rows.append({"concept": concept.name, "shape": concept.shape, "colour": concept.colour,
                     "accuracy": (predicted[i] == i).float().mean().item(),
                     "shape_right": sum(world.concepts[p].shape == concept.shape for p in predicted[i].tolist()) / images_per_concept,
                     "colour_right": sum(world.concepts[p].colour == concept.colour for p in predicted[i].tolist()) / images_per_concept,
                     "most_confused_with": confused})
    return pd.DataFrame(rows), images


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared 2x2 Haar detail coefficient: grid textures raise it, smooth areas do not."""
    blocks = F.pixel_unshuffle(images.float(), 2).view(len(images), 3, 4, images.shape[-2] // 2, images.shape[-1] // 2)
    a, b, c, d = blocks.unbind(2)
    details = torch.stack([(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2])
    return details.pow(2).mean().item()


def background_saturation(images: torch.Tensor, border: int = 2) -> float:
    """Mean HSV saturation of the image border, where the background almost always is."""
    mask = torch.ones(images.shape[-2:], dtype=torch.bool)
    mask[border:-border, border:-border] = False
    pixels = images.float()[:, :, mask]
    top, bottom = pixels.max(dim=1).values, pixels.min(dim=1).values
    return ((top - bottom) / top.clamp(min=1e-6)).mean().item()


def render_reference(bundle: ModelBundle, images_per_concept: int, seed: int = 0) -> torch.Tensor:
    world = bundle.backend.world
    labels = torch.arange(len(world.concepts)).repeat_interleave(images_per_concept)
    return render(world, labels, torch.Generator().manual_seed(seed))


def timed_generation(bundle: ModelBundle, images_per_concept: int = 4, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds for ``images_per_concept`` images of every concept (after a warm-up)."""
    prompts = [bundle.backend.world.prompt(n) for n in bundle.backend.world.names]
    generate(bundle, prompts[:2], [0])  # oneDNN warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(bundle, prompts, list(range(images_per_concept)))
        best = min(best, time.perf_counter() - start)
    return best
