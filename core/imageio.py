"""Writing images: PNGs for people (upscaled small images) and the raw resolution beside them."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor, size: int | None = None) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL; small images are enlarged with nearest-neighbour so that their
    longer side is ``size``, keeping their aspect ratio."""
    array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(array)
    longer = max(pil.width, pil.height)
    if size and longer < size:
        pil = pil.resize((round(pil.width * size / longer), round(pil.height * size / longer)), Image.NEAREST)
    return pil


def save_pngs(images: torch.Tensor, out_dir: str | Path, names: list[str], view_size: int = 128,
              raw_subdir: str = "raw") -> list[Path]:
    """Write ``name.png`` at ``view_size`` and, when that enlarges it, the raw image under ``raw/``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        path = out / f"{name}.png"
        view = to_pil(image, view_size)
        view.save(path)
        if view.width != image.shape[-1]:
            (out / raw_subdir).mkdir(exist_ok=True)
            to_pil(image).save(out / raw_subdir / f"{name}.png")
        paths.append(path)
    return paths


def grid(images: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """Tile (N, 3, H, W) into one (3, rows*H, cols*W) image, row-major, padding with white."""
    n, c, h, w = images.shape
    cols = cols or -(-n // rows)
    if rows * cols < n:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    padded = torch.ones(rows * cols, c, h, w)
    padded[:n] = images
    return padded.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
