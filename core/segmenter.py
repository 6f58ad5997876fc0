"""Object masks of images a model generates, for methods that train inside an object's pixels (MACE's
LoRA stage) on model families whose backend has no masks of its own.

The segmenter is the reference's Hugging Face Grounded-SAM (``data_preparation_transformers.py``): a
Grounding DINO detector finds the concept's box (threshold 0.3, the highest-scoring box kept) and SAM
segments it (the union of its three masks). Both are read from the local Hugging Face cache and never
downloaded; without them :class:`SegmenterUnavailableError` says in one line what to download. The
reference also fills each mask's largest contour (``polygon_refinement``, OpenCV); this module does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bundle import ModelBundle

# the reference's pair first (data_preparation_transformers.py), then the smaller ones it names
DETECTORS = ("IDEA-Research/grounding-dino-base", "IDEA-Research/grounding-dino-tiny")
SEGMENTERS = ("facebook/sam-vit-huge", "facebook/sam-vit-large", "facebook/sam-vit-base")
DETECTION_THRESHOLD = 0.3
PROMPT = "a photo of the {c}"  # the reference's prompt of an object's training images (inference.py)


class SegmenterUnavailableError(RuntimeError):
    """No segmenter in the local cache; the message says what to download."""


def _cached_folder(repo: str) -> str | None:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - an incomplete snapshot is as good as none
        return None


def cached_segmenter() -> tuple[str, str] | None:
    """(detector folder, segmenter folder) of a Grounded-SAM in the local Hub cache, or None."""
    detector = next((f for f in map(_cached_folder, DETECTORS) if f), None)
    segmenter = next((f for f in map(_cached_folder, SEGMENTERS) if f), None) if detector else None
    return (detector, segmenter) if detector and segmenter else None


def require_segmenter() -> tuple[str, str]:
    found = cached_segmenter()
    if found is None:
        raise SegmenterUnavailableError(
            f"no Grounded-SAM is in the local Hugging Face cache; download the reference's with "
            f"`hf download {DETECTORS[0]}` and `hf download {SEGMENTERS[0]}`")
    return found


@torch.no_grad()
def segment(images: torch.Tensor, label: str, detector: str, segmenter: str,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 1, H, W) masks in {0, 1} of ``label`` in ``images`` (N, 3, H, W) in [0, 1]; an image where
    nothing is detected gets an empty mask."""
    from PIL import Image
    from transformers import AutoModelForMaskGeneration, AutoProcessor, pipeline

    device = torch.device(device)
    find = pipeline(model=detector, task="zero-shot-object-detection", device=device)
    sam = AutoModelForMaskGeneration.from_pretrained(segmenter).to(device).eval()
    processor = AutoProcessor.from_pretrained(segmenter)
    masks = torch.zeros(len(images), 1, *images.shape[-2:])
    for i, image in enumerate(images):
        pil = Image.fromarray((image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8"))
        found = find(pil, candidate_labels=[label if label.endswith(".") else label + "."],
                     threshold=DETECTION_THRESHOLD)
        if not found:
            continue
        box = max(found, key=lambda r: r["score"])["box"]
        inputs = processor(images=pil, input_boxes=[[[box["xmin"], box["ymin"], box["xmax"], box["ymax"]]]],
                           return_tensors="pt").to(device)
        out = sam(**inputs)
        predicted = processor.post_process_masks(masks=out.pred_masks, original_sizes=inputs["original_sizes"],
                                                 reshaped_input_sizes=inputs["reshaped_input_sizes"])[0]
        masks[i, 0] = (predicted[0].float().mean(0) > 0).float().cpu()  # the union of SAM's three masks
    return masks


def generated_images_with_masks(bundle: ModelBundle, concept: str, n: int,
                                seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` images the model generates of ``concept`` (seeds ``seed``...), their masks, and which
    segmenter made them; :class:`SegmenterUnavailableError` before any work when there is none."""
    from pathlib import Path

    from .sampling import generate

    detector, segmenter = require_segmenter()
    images = generate(bundle, PROMPT.format(c=concept), list(range(seed, seed + n)))
    masks = segment(images, concept, detector, segmenter, bundle.device)
    if not masks.any():
        raise ValueError(f"the segmenter found no {concept!r} in any of the {n} generated images")
    names = " + ".join(Path(f).parent.parent.name.replace("models--", "").replace("--", "/")
                       for f in (detector, segmenter))
    return images, masks, f"grounded-sam ({names})"
