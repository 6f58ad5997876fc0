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


def grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """Tile (N, 3, H, W) into one (3, rows*H, cols*W) image, row-major, padding with white."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    padded = torch.ones(rows * cols, c, h, w)
    padded[:n] = images
    return padded.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def contact_sheet(strips: list[list[torch.Tensor]], row_labels: list[str], column_labels: list[str],
                  image_px: int = 64, gap: int = 8) -> Image.Image:
    """One labelled picture: ``strips[r][c]`` is an (N, 3, H, W) batch drawn as a strip of N images
    of ``image_px`` each, under ``column_labels[c]`` and beside ``row_labels[r]``."""
    from PIL import ImageDraw, ImageFont

    if len(strips) != len(row_labels) or any(len(row) != len(column_labels) for row in strips):
        raise ValueError("contact_sheet needs one strip per row label and column label")
    font = ImageFont.load_default(size=14)
    n = max(len(s) for row in strips for s in row)
    label_w = max(int(font.getlength(text)) for text in row_labels) + 2 * gap
    strip_w = n * image_px
    header_h = 24
    width = label_w + len(column_labels) * (strip_w + gap)
    height = header_h + len(row_labels) * (image_px + gap)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(column_labels):
        draw.text((label_w + c * (strip_w + gap), 4), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        top = header_h + r * (image_px + gap)
        draw.text((gap, top + image_px // 2 - 8), text, fill="black", font=font)
        for c, strip in enumerate(strips[r]):
            picture = to_pil(grid(strip, 1))
            size = (len(strip) * image_px, image_px)
            # nearest-neighbour keeps a small toy image's pixels crisp; a large one is averaged down
            picture = picture.resize(size, Image.NEAREST if picture.height <= image_px else Image.LANCZOS)
            sheet.paste(picture, (label_w + c * (strip_w + gap), top))
    return sheet
