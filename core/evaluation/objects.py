"""Object erasure (the paper's Table 1): ESR-k and PSR-k with an image classifier.

- ESR-k: the share of images of an *erased* class whose class is not in the classifier's top-k;
- PSR-k: the share of images of a *kept* class whose class is in the top-k.

Every class gets the same seeds, so per class the top-1 / top-5 hit rates are the graph's G(c)
(:mod:`age_explorer.core.graph.capability`) for the same template, seeds and sampler: ESR-1 of an
erased class c = 1 - G_after(c) and PSR-1 = the mean of G_after over the kept classes, i.e. a graph
row's ``G_after_top1`` column.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..sampling import generate
from .config import EvaluationConfig

TOP = (1, 5)


@dataclass
class ObjectResult:
    per_class: pd.DataFrame  # class, role (erased / kept), images, top1, top5 (hit rates)
    metrics: dict[str, float]  # ESR-1, ESR-5, PSR-1, PSR-5 as fractions
    samples: list[dict]  # one per image: class, seed, prompt, top-5 predicted classes


def check_classes(concept_set, erased: list[str]) -> list[str]:
    """The kept classes; an erased class outside the set, or nothing kept, is an error."""
    outside = [c for c in erased if c not in concept_set.concepts]
    if outside:
        raise ValueError(f"erased class(es) {', '.join(map(repr, outside))} are not in the concept set "
                         f"{concept_set.name!r} ({', '.join(concept_set.concepts[:12])}"
                         f"{', ...' if len(concept_set.concepts) > 12 else ''}); pass --concept-set with a set "
                         f"that holds them")
    kept = [c for c in concept_set.concepts if c not in erased]
    if not kept:
        raise ValueError("every class of the concept set is erased: PSR needs at least one kept class")
    return kept


def object_erasure(bundle, erased: list[str], concept_set, evaluator, config: EvaluationConfig,
                   progress=None, stop=None, on_images=None) -> ObjectResult:
    """Generate ``images_per_class`` images of every class of ``concept_set`` and classify them;
    ``on_images(class, seeds, images)`` sees each class's images (e.g. to save them)."""
    if not erased:
        raise ValueError("ESR needs at least one erased class: evaluate a run folder, or name the classes "
                         "with --erased")
    check_classes(concept_set, erased)
    seeds = config.seeds
    rows, samples = [], []
    for i, name in enumerate(concept_set.concepts):
        if stop is not None and stop():
            raise InterruptedError("evaluation stopped")
        prompt = config.template.format(concept=name)
        images = generate(bundle, [prompt], seeds, steps=config.steps, guidance_scale=config.guidance,
                          batch_size=config.batch_size)
        if on_images:
            on_images(name, seeds, images)
        top = evaluator.topk(images, max(TOP)).cpu()
        label = concept_set.concepts.index(name)
        hits = {k: (top[:, :k] == label).any(dim=1).float() for k in TOP}
        rows.append({"class": name, "role": "erased" if name in erased else "kept", "images": len(seeds),
                     **{f"top{k}": hits[k].mean().item() for k in TOP}})
        samples += [{"class": name, "seed": s, "prompt": prompt,
                     "top5": [concept_set.concepts[j] if j >= 0 else None for j in t.tolist()]}
                    for s, t in zip(seeds, top)]
        if progress:
            progress("objects", i + 1, len(concept_set.concepts))
    per_class = pd.DataFrame(rows)
    return ObjectResult(per_class, summarise(per_class), samples)


def summarise(per_class: pd.DataFrame) -> dict[str, float]:
    """ESR/PSR over images: every class has the same image count, so the mean over classes is the
    mean over images."""
    erased, kept = per_class[per_class.role == "erased"], per_class[per_class.role == "kept"]
    esr = {f"ESR-{k}": float((1 - erased[f"top{k}"]).mean()) for k in TOP}
    return {**esr, **{f"PSR-{k}": float(kept[f"top{k}"].mean()) for k in TOP}}

