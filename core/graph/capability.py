"""Generation capability G(c): the share of N generated images of c that a classifier recognises as c.

Evaluators map images to concept-set indices (top-k):
- the backend's own classifier, named after it (the toy world's CNN, ``toy``, the counterpart of the
  paper's ResNet-50);
- ``hf:<hub id>``: an ImageNet classifier through transformers (e.g. ``hf:microsoft/resnet-50``);
  G(c) counts images whose top-k ImageNet classes contain c's explicit class index;
- ``torchvision-resnet50``: torchvision's ResNet-50 (IMAGENET1K_V2, as the paper) where importable;
- ``clip:<hub id>``: CLIP zero-shot over the concept set, for sets without ImageNet classes.
Spillover of erasing a on b is Delta(a -> b) = G_0(b) - G_a(b), same prompts and seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F

from ..bundle import LOAD_LOCK, ModelBundle, ModelUnavailableError
from ..evaluation.clip_score import projected_features
from ..sampling import generate
from .concept_sets import ConceptSet


@dataclass(frozen=True)
class CapabilitySpec:
    """What G is measured on; recorded with every graph."""

    images_per_concept: int = 32
    seed: int = 1000
    template: str | None = None  # None: the concept set's
    steps: int | None = None  # None: the model's default
    guidance_scale: float | None = None
    topk: int = 5
    eta: float | None = None

    def __post_init__(self):
        if self.images_per_concept < 1 or self.topk < 1:
            raise ValueError("images_per_concept and topk must be at least 1")

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.images_per_concept))

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, bundle: ModelBundle) -> "CapabilitySpec":
        """The model's sampling defaults written in, so a graph records what it was measured with."""
        return replace(self, steps=self.steps or bundle.default_steps,
                       guidance_scale=bundle.default_guidance if self.guidance_scale is None else self.guidance_scale,
                       eta=bundle.default_eta if self.eta is None else self.eta)


class ImageNetEvaluator:
    """An ImageNet-1k classifier; predictions outside the concept set map to -1."""

    def __init__(self, name: str, model, preprocess, concept_set: ConceptSet, device):
        missing = [c for c in concept_set.concepts if c not in concept_set.imagenet_index]
        if missing:
            raise ValueError(f"ImageNet evaluation needs an ImageNet class index for every concept; missing: "
                             f"{', '.join(missing[:5])}. Use a CLIP evaluator (clip:<hub id>) instead.")
        self.name, self.model, self.preprocess, self.device = name, model.eval().to(device), preprocess, device
        self.to_set = torch.full((1000,), -1, dtype=torch.long)
        for i, c in enumerate(concept_set.concepts):
            self.to_set[concept_set.imagenet_index[c]] = i

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int) -> torch.Tensor:
        out = []
        for chunk in images.split(32):
            logits = self.model(self.preprocess(chunk).to(self.device))
            logits = getattr(logits, "logits", logits)
            out.append(self.to_set[logits.float().topk(k, dim=1).indices.cpu()])
        return torch.cat(out)


class ClipEvaluator:
    """CLIP zero-shot classification over the concept set's prompts."""

    def __init__(self, name: str, model, processor, concept_set: ConceptSet, device):
        self.name, self.model, self.processor, self.device = name, model.eval().to(device), processor, device
        with torch.no_grad():
            text = processor(text=[concept_set.prompt(c) for c in concept_set.concepts], return_tensors="pt", padding=True)
            self.text = F.normalize(projected_features(model.get_text_features(**text.to(device))), dim=-1)

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int) -> torch.Tensor:
        out = []
        for chunk in images.split(32):
            pixels = self.processor(images=[img for img in chunk], return_tensors="pt", do_rescale=False).pixel_values
            feats = F.normalize(projected_features(self.model.get_image_features(pixel_values=pixels.to(self.device))),
                                dim=-1)
            out.append((feats @ self.text.T).topk(min(k, self.text.shape[0]), dim=1).indices.cpu())
        return torch.cat(out)


def _imagenet_preprocess(size: int = 224):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def run(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - mean) / std
    return run


def default_evaluator_name(bundle: ModelBundle, concept_set: ConceptSet) -> str:
    if bundle.backend.has_evaluator:
        return bundle.kind
    if concept_set.imagenet_index and len(concept_set.imagenet_index) == len(concept_set.concepts):
        return "hf:microsoft/resnet-50"
    return "clip:openai/clip-vit-large-patch14"


def load_evaluator(name: str, bundle: ModelBundle, concept_set: ConceptSet, local_files_only: bool | None = None):
    with LOAD_LOCK:  # from_pretrained is not safe beside another load (see core.bundle.LOAD_LOCK)
        return _load_evaluator(name, bundle, concept_set, local_files_only)


def _load_evaluator(name, bundle, concept_set, local_files_only):
    device = bundle.device
    if name == bundle.kind and bundle.backend.has_evaluator:
        return bundle.backend.evaluator(bundle, concept_set)
    try:
        if name == "torchvision-resnet50":
            try:
                from torchvision.models import ResNet50_Weights, resnet50
            except ImportError as err:
                raise ModelUnavailableError("torchvision is not installed; use hf:microsoft/resnet-50") from err
            weights = ResNet50_Weights.IMAGENET1K_V2
            return ImageNetEvaluator(name, resnet50(weights=weights), _imagenet_preprocess(), concept_set, device)
        kind, _, hub_id = name.partition(":")
        kwargs = {"local_files_only": bool(local_files_only)} if local_files_only is not None else {}
        if kind == "hf" and hub_id:
            from transformers import AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(hub_id, **kwargs)
            return ImageNetEvaluator(name, model, _imagenet_preprocess(), concept_set, device)
        if kind == "clip" and hub_id:
            from transformers import CLIPModel, CLIPProcessor

            return ClipEvaluator(name, CLIPModel.from_pretrained(hub_id, **kwargs),
                                 CLIPProcessor.from_pretrained(hub_id, **kwargs), concept_set, device)
    except (OSError, RuntimeError) as err:
        if isinstance(err, ModelUnavailableError):
            raise
        raise ModelUnavailableError(
            f"could not load the classifier {name!r}: {type(err).__name__}. Download its weights on a connected "
            f"machine (`hf download {name.partition(':')[2] or name}`) and copy the Hugging Face cache here.") from err
    own = f"{bundle.kind}, " if bundle.backend.has_evaluator else ""
    raise ValueError(f"unknown evaluator {name!r}: use {own}hf:<hub id>, clip:<hub id> or torchvision-resnet50")


def capability(bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec,
               concepts: list[str] | None = None, progress=None) -> pd.DataFrame:
    """G top-1 and top-k for ``concepts`` (default: the whole set), one row per concept."""
    names = concepts or concept_set.concepts
    template = spec.template or concept_set.template
    prompts = [template.format(concept=n) for n in names]
    images = generate(bundle, prompts, spec.seeds(), steps=spec.steps, guidance_scale=spec.guidance_scale,
                      progress=progress, eta=spec.eta)
    top = evaluator.topk(images, spec.topk).view(len(names), spec.images_per_concept, -1)
    rows = []
    for i, name in enumerate(names):
        label = concept_set.concepts.index(name)
        rows.append({"concept": name, "G_top1": (top[i, :, 0] == label).float().mean().item(),
                     "G_topk": (top[i] == label).any(dim=1).float().mean().item()})
    return pd.DataFrame(rows)
