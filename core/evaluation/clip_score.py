"""CLIP score (the paper's Table 3 and COCO column): 100 x max(cos(image, prompt), 0) per image, as
torchmetrics defines it, with a ``transformers`` CLIP model from the local Hugging Face cache.

CLIP *classification* accuracy is the object metric with a CLIP classifier
(``--classifier clip:<hub id>``), zero-shot over the concept set's prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bundle import LOAD_LOCK
from .weights import Unavailable


def load_clip(model_id: str, local_files_only: bool = True):
    from transformers import CLIPModel, CLIPProcessor

    try:
        with LOAD_LOCK:  # from_pretrained is not safe beside another load (see core.bundle.LOAD_LOCK)
            return (CLIPModel.from_pretrained(model_id, local_files_only=local_files_only).eval(),
                    CLIPProcessor.from_pretrained(model_id, local_files_only=local_files_only))
    except OSError as err:
        raise Unavailable(f"not available: CLIP weights {model_id!r} are not in the local Hugging Face cache "
                          f"({type(err).__name__}); run `hf download {model_id}` on a connected machine and copy "
                          f"HF_HOME here") from err


@torch.no_grad()
def clip_scores(model, processor, images: torch.Tensor, prompts: list[str], device, batch_size: int = 32
                ) -> list[float]:
    model = model.to(device)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = images[start:start + batch_size]
        inputs = processor(text=prompts[start:start + batch_size], images=[img for img in chunk],
                           return_tensors="pt", padding=True, truncation=True, do_rescale=False).to(device)
        image = F.normalize(projected_features(model.get_image_features(pixel_values=inputs.pixel_values)), dim=-1)
        text = F.normalize(projected_features(model.get_text_features(input_ids=inputs.input_ids,
                                                              attention_mask=inputs.attention_mask)), dim=-1)
        out += (100 * (image * text).sum(-1).clamp(min=0)).tolist()
    return out


def projected_features(features):
    """transformers 5 returns an output object whose pooler_output holds the projected embeddings;
    4.x returns the tensor itself."""
    return getattr(features, "pooler_output", features)


class ClipMeasurement:
    """The ``clip`` family: the CLIP score of each prompt CSV image against its own prompt."""

    def __init__(self, context):
        self.model, self.processor = load_clip(context.config.clip_model)
        self.context = context
        self.samples: list[dict] = []

    def add(self, prompts, seeds, images, label=None) -> None:
        c = self.context
        scores = clip_scores(self.model, self.processor, images, list(prompts), c.bundle.device, c.config.batch_size)
        self.samples += [{"prompt": p, "seed": int(s), "clip_score": v} for p, s, v in zip(prompts, seeds, scores)]

    def finish(self):
        from .registry import Measured

        scores = [s["clip_score"] for s in self.samples]
        value = sum(scores) / len(scores)
        details = {"model": self.context.config.clip_model, "definition": "100 * max(cos(image, prompt), 0)",
                   "samples": [{**s, "clip_score": round(s["clip_score"], 4)} for s in self.samples]}
        return Measured({"clip_score": value}, [{"metric": "clip_score", "scope": "all", "value": value,
                                                 "n": len(scores)}], {"clip": details})
