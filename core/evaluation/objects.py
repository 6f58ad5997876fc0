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



class ObjectsMeasurement:
    """The ``objects`` family: loads the classifier and checks the classes before any image, then
    generates every class's images (handing them on) and classifies them."""

    def __init__(self, context):
        from ..graph.capability import default_evaluator_name, load_evaluator
        from ..graph.concept_sets import load_concept_set

        bundle, config, erased = context.bundle, context.config, context.erased
        if not erased:
            raise ValueError("ESR needs the erased classes: evaluate a run folder, or name them with --erased")
        own = bundle.backend.concept_set() is not None
        self.concept_set = load_concept_set(config.concept_set or (bundle.kind if own else "imagenette"), bundle)
        check_classes(self.concept_set, erased)
        name = config.classifier or default_evaluator_name(bundle, self.concept_set)
        # a Hub classifier comes from the local cache only: evaluation never downloads weights
        self.evaluator = load_evaluator(name, bundle, self.concept_set, local_files_only=True)
        self.context = context

    def produce(self, on_images=None) -> None:
        c = self.context
        self.result = object_erasure(c.bundle, c.erased, self.concept_set, self.evaluator, c.config, c.progress,
                                     c.stop, on_images=on_images)

    def finish(self):
        from .registry import Measured

        result, config, erased = self.result, self.context.config, self.context.erased
        counted = {role: int(result.per_class[result.per_class.role == role].images.sum()) for role in ("erased", "kept")}
        table = [{"metric": m, "scope": "all", "value": v, "n": counted["erased" if m.startswith("ESR") else "kept"]}
                 for m, v in result.metrics.items()]
        for rec in result.per_class.to_dict("records"):
            table += [{"metric": f"{rec['role']}_top{k}", "scope": rec["class"], "value": rec[f"top{k}"],
                       "n": rec["images"]} for k in TOP]
        details = {"classifier": self.evaluator.name, "concept_set": self.concept_set.name,
                   "template": config.template, "seeds": config.seeds, "erased": erased,
                   "kept": [c for c in self.concept_set.concepts if c not in erased],
                   "per_class": result.per_class.to_dict("records"), "samples": result.samples}
        return Measured(dict(result.metrics), table, {"objects": details})
