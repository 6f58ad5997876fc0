"""Procedural renderer of the toy world: coloured shapes on muted grey backgrounds.

Vectorised signed-distance rendering in torch; about a thousand 32x32 images per second on one core.
Images are float tensors in [0, 1], shape (N, 3, H, W).
"""

from __future__ import annotations

import math

import torch

from .concepts import ToyWorld


def _shape_sdf(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) for shapes centred at the origin."""
    if shape == "circle":
        return torch.sqrt(x**2 + y**2) - r
    if shape == "square":
        half = r * 0.82
        dx, dy = x.abs() - half, y.abs() - half
        outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
        return outside + torch.maximum(dx, dy).clamp(max=0)
    if shape == "triangle":
        # Upward equilateral triangle inscribed in radius r (distance to the three edge lines).
        y = y - 0.2 * r
        k = math.sqrt(3.0)
        d1 = (k * x - y) / 2 - r * 0.5
        d2 = (-k * x - y) / 2 - r * 0.5
        d3 = y - r * 0.5
        return torch.maximum(torch.maximum(d1, d2), d3)
    if shape == "cross":
        arm, half = r * 0.95, r * 0.3
        bar_h = torch.maximum(x.abs() - arm, y.abs() - half)
        bar_v = torch.maximum(x.abs() - half, y.abs() - arm)
        return torch.minimum(bar_h, bar_v)
    if shape == "ring":
        return (torch.sqrt(x**2 + y**2) - r * 0.78).abs() - r * 0.24
    raise ValueError(f"unknown shape {shape!r}")


def render(world: ToyWorld, concept_ids: torch.Tensor, generator: torch.Generator | None = None,
           background_tint: float | None = None) -> torch.Tensor:
    """Render one image per concept id. ``background_tint`` overrides the recipe (classifier augmentation)."""
    return render_with_masks(world, concept_ids, generator, background_tint)[0]


def render_with_masks(world: ToyWorld, concept_ids: torch.Tensor, generator: torch.Generator | None = None,
                      background_tint: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`render`'s images (the same draws) and each object's pixel coverage (N, 1, H, W) in [0, 1]."""
    p = world.renderer
    n, size = len(concept_ids), int(p["size"])

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    coords = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    radius = uniform(*p["radius"], 1, 1)
    off = p["centre_offset"]
    cx, cy = uniform(-off, off, 1, 1), uniform(-off, off, 1, 1)
    x, y = xx[None] - cx, yy[None] - cy

    coverage = torch.zeros(n, size, size)
    colour = torch.zeros(n, 3)
    colour_table = torch.tensor(list(world.colours.values()))
    for i, cid in enumerate(concept_ids.tolist()):
        c = world.concepts[cid]
        sdf = _shape_sdf(c.shape, x[i], y[i], radius[i])
        coverage[i] = (0.5 - sdf).clamp(0, 1)  # 1-pixel anti-aliasing
        colour[i] = colour_table[list(world.colours).index(c.colour)]
    jitter = p["colour_jitter"]
    colour = (colour + uniform(-jitter, jitter, 3)).clamp(0, 1)

    grey = uniform(*p["background"], 1)
    tint = p["background_tint"] if background_tint is None else background_tint
    bg_colour = (grey + uniform(-tint, tint, 3)).clamp(0, 1)
    angle = uniform(0, 2 * math.pi, 1, 1)
    ramp = (torch.cos(angle) * xx[None] + torch.sin(angle) * yy[None]) / size
    background = bg_colour[:, :, None, None] + p["background_gradient"] * ramp[:, None]

    img = background * (1 - coverage[:, None]) + colour[:, :, None, None] * coverage[:, None]
    img = img + p["pixel_noise"] * torch.randn(img.shape, generator=generator)
    return img.clamp(0, 1), coverage[:, None]
