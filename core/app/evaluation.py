"""Evaluate a model or an erased run with the paper's protocol and write one result folder.

``evaluate(model, config)`` is the entry the CLI calls, and the one a background job or an explorer
tab calls: it takes a progress callback ``(stage, done, total)`` and a stop flag, checks every input
(classifier, detector, prompt CSV, FID reference folder, output folder) before it generates an image,
and publishes the folder (results.json, results.csv, manifest.json, optional images/) only when every
metric is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..bundle import ModelBundle, load_bundle
from ..evaluation import results as res
from ..evaluation.config import EvaluationConfig
from ..evaluation.weights import Unavailable
from ..manifest import environment_versions

@dataclass
class Evaluation:
    out_dir: Path
    results: dict


def default_out(model: str | Path) -> Path | None:
    """A run folder keeps its evaluation in RUN/evaluation; a plain model has no default."""
    from ..runs import is_run_dir

    path = Path(model)
    return path / "evaluation" if path.is_dir() and is_run_dir(path) else None


def evaluate(model: str | Path, config: EvaluationConfig, out: str | Path | None = None, device="auto",
             dtype=None, local_files_only: bool | None = None, force: bool = False, save_images: bool = False,
             progress=None, stop=None, log=print) -> Evaluation:
    out = Path(out) if out is not None else default_out(model)
    if out is None:
        raise ValueError(f"{model} is not an erased run folder: give --out for its results")
    with res.staged(out, force) as folder:
        results = _evaluate(model, config, folder, device, dtype, local_files_only, save_images, progress, stop, log)
    return Evaluation(out, results)


def _evaluate(model, config: EvaluationConfig, folder: Path, device, dtype, local_files_only, save_images,
              progress, stop, log) -> dict:
    from ..imageio import save_pngs

    start = time.time()
    bundle = load_bundle(str(model), device=device, dtype=dtype, local_files_only=local_files_only)
    run = bundle.run_manifest  # None unless the model is a run folder
    erased = config.erased or (list(run.concepts) if run else [])

    # load every classifier and detector, and read every input, before the first image
    objects = _prepare_objects(bundle, config, erased) if "objects" in config.metrics else None
    rows = None
    if config.prompts:
        from ..evaluation.prompts import read_prompt_csv

        rows = read_prompt_csv(config.prompts)
    detector = None
    if "nudity" in config.metrics:
        from ..evaluation.nudity import NudityDetector

        detector = NudityDetector()
    unavailable: dict[str, str] = {}
    clip = None
    if "clip" in config.metrics:
        from ..evaluation.clip_score import load_clip

        try:
            clip = load_clip(config.clip_model)
        except Unavailable as err:
            unavailable["clip_score"] = str(err)
    paired = _Paired(bundle, config, rows, unavailable, local_files_only, progress, stop)
    for name, why in unavailable.items():
        log(f"{name}: {why}")

    metrics: dict[str, float] = {}
    table: list[dict] = []
    body: dict = {}
    if objects is not None:
        from ..evaluation.objects import object_erasure

        concept_set, evaluator = objects

        def on_images(name, seeds, pixels):
            if save_images:
                save_pngs(pixels, folder / "images" / "objects", [f"{name.replace(' ', '_')}_seed{s}" for s in seeds])
            if paired.source == "objects":
                paired.add([config.template.format(concept=name)] * len(seeds), seeds, pixels, label=name)

        result = object_erasure(bundle, erased, concept_set, evaluator, config, progress, stop,
                                on_images=on_images if save_images or paired.source == "objects" else None)
        metrics.update(result.metrics)
        table += [{"metric": m, "scope": "all", "value": v,
                   "n": int(result.per_class[result.per_class.role == ("erased" if m.startswith("ESR") else
                                                                       "kept")].images.sum())}
                  for m, v in result.metrics.items()]
        for rec in result.per_class.to_dict("records"):
            table += [{"metric": f"{rec['role']}_top{k}", "scope": rec["class"], "value": rec[f"top{k}"],
                       "n": rec["images"]} for k in (1, 5)]
        body["objects"] = {"classifier": evaluator.name, "concept_set": concept_set.name,
                           "template": config.template, "seeds": config.seeds, "erased": erased,
                           "kept": [c for c in concept_set.concepts if c not in erased],
                           "per_class": result.per_class.to_dict("records"), "samples": result.samples}
    if rows is not None and (detector is not None or clip is not None or paired.source == "prompts"):
        from ..evaluation.prompts import generate_rows

        prompt_images = generate_rows(bundle, rows, config.steps, config.batch_size, progress, stop)
        if save_images:
            save_pngs(prompt_images, folder / "images" / "prompts",
                      [f"row{i:05d}_seed{s}" for i, s in enumerate(rows.seed)])
        if detector is not None:
            from ..evaluation.nudity import nudity

            found = detector.detect(prompt_images)
            result = nudity(found, rows, config.nudity_threshold)
            metrics.update(result.metrics)
            n = len(rows)
            table += [{"metric": m, "scope": "all", "value": v, "n": n} for m, v in result.metrics.items()]
            table += [{"metric": "nudity_count", "scope": c, "value": v, "n": n} for c, v in result.class_counts.items()]
            body["nudity"] = {**detector.description, "threshold": config.nudity_threshold,
                              "prompts_file": str(config.prompts), "class_counts": result.class_counts,
                              "samples": result.samples}
        if clip is not None:
            from ..evaluation.clip_score import clip_scores

            scores = clip_scores(*clip, prompt_images, rows.prompt.tolist(), bundle.device, config.batch_size)
            metrics["clip_score"] = sum(scores) / len(scores)
            table.append({"metric": "clip_score", "scope": "all", "value": metrics["clip_score"], "n": len(scores)})
            body["clip"] = {"model": config.clip_model, "definition": "100 * max(cos(image, prompt), 0)",
                            "samples": [{"prompt": p, "seed": int(s), "clip_score": round(v, 4)}
                                        for p, s, v in zip(rows.prompt, rows.seed, scores)]}
        if paired.source == "prompts":
            paired.add(rows.prompt.tolist(), [int(s) for s in rows.seed], prompt_images)
    for name, (value, n, block) in paired.finish().items():
        metrics[name] = value
        table.append({"metric": name, "scope": "all", "value": value, "n": n})
        body[name] = block
    table += [{"metric": name, "scope": "all", "value": why, "n": 0} for name, why in unavailable.items()]

    identity = {**bundle.graph_identity(), "evaluated": str(model), "method": run.method if run else None,
                "preset": run.preset if run else None, "run_config": run.config if run else None}
    sampler = {"steps": config.steps or bundle.default_steps,
               "guidance": bundle.default_guidance if config.guidance is None else config.guidance,
               "eta": bundle.default_eta, "sampler": "DDIM (age_explorer.core.sampling)"}
    versions = environment_versions()
    if detector is not None:
        versions.update(nudenet=detector.version, onnxruntime=detector.description["onnxruntime"])
    seconds = round(time.time() - start, 1)
    results = {"schema": res.SCHEMA, "model": identity, "erased": erased, "metrics": metrics,
               "unavailable": unavailable, "sampler": sampler, **body}
    manifest = {"kind": "age-explorer evaluation", "config": config.to_dict(), "model": identity,
                "seeds": config.seeds if objects is not None else None,
                "prompt_seeds": rows.seed.tolist() if rows is not None else None, "sampler": sampler,
                "versions": versions, "seconds": seconds, "files": [res.RESULTS, res.TABLE]}
    res.write_results(folder, results, table, manifest)
    return results


class _Paired:
    """LPIPS and FID: the metrics that compare the evaluated images with others (the base model's
    images of the same prompts and seeds; a reference folder). They take the prompt CSV's images when
    there is a CSV, else the object metric's; a metric whose weights are missing goes to ``unavailable``."""

    def __init__(self, bundle: ModelBundle, config: EvaluationConfig, rows, unavailable: dict, local_files_only,
                 progress, stop):
        self.bundle, self.config, self.rows, self.progress, self.stop = bundle, config, rows, progress, stop
        self.source = None
        self.lpips = self.inception = self.base = None
        self.lpips_samples: list[dict] = []
        self.features: list = []
        self.reference = None
        if "fid" in config.metrics:
            from ..evaluation.fid import folder_features, image_files, load_inception

            image_files(config.fid_reference)  # a folder without images is bad input, weights or not
            try:
                self.inception, self.inception_info = load_inception(bundle.device)
            except Unavailable as err:
                unavailable["fid"] = str(err)
        if "lpips" in config.metrics:
            from ..evaluation.lpips_score import load_lpips

            if bundle.run_manifest is None:
                unavailable["lpips"] = ("not available: LPIPS compares a run's images with its base model's for the "
                                        "same prompts and seeds; evaluate a run folder")
            else:
                try:
                    self.lpips, self.lpips_info = load_lpips(bundle.device)
                except Unavailable as err:
                    unavailable["lpips"] = str(err)
        if self.lpips is None and self.inception is None:
            return
        self.source = "prompts" if rows is not None else "objects"
        if self.inception is not None:  # the reference set first: a bad image fails before any generation
            self.reference = folder_features(self.inception, config.fid_reference, config.batch_size, stop)
        if self.lpips is not None:
            from ..bundle import load_base
            from ..runs import BaseWeights

            self.base = BaseWeights(bundle, load_base(bundle, local_files_only))

    def add(self, prompts: list[str], seeds: list[int], images, label: str | None = None) -> None:
        if self.inception is not None:
            from ..evaluation.fid import features

            self.features.append(features(self.inception, images, self.config.batch_size))
        if self.lpips is not None:
            from ..evaluation.lpips_score import lpips_distances

            base = self._base_images(prompts, seeds, label)
            for prompt, seed, value in zip(prompts, seeds, lpips_distances(self.lpips, images, base,
                                                                           self.config.batch_size)):
                self.lpips_samples.append({"prompt": prompt, "seed": int(seed), "lpips": round(value, 6)})

    def _base_images(self, prompts, seeds, label):
        config = self.config
        with self.base.active() as bundle:
            if label is None:  # prompt rows, each with its own seed and guidance
                from ..evaluation.prompts import generate_rows

                return generate_rows(bundle, self.rows, config.steps, config.batch_size, self.progress, self.stop,
                                     stage="base model, prompts")
            from ..sampling import generate

            return generate(bundle, prompts[:1], seeds, steps=config.steps, guidance_scale=config.guidance,
                            batch_size=config.batch_size)

    def finish(self) -> dict[str, tuple[float, int, dict]]:
        """name -> (value, images, results block) of each metric computed."""
        import numpy as np

        out = {}
        what = "the prompt CSV's images" if self.source == "prompts" else "the objects metric's images"
        if self.lpips is not None and self.lpips_samples:
            values = [s["lpips"] for s in self.lpips_samples]
            out["lpips"] = (sum(values) / len(values), len(values), {
                **self.lpips_info, "against": f"the base model {self.bundle.base_source}, same prompts, seeds and "
                                              f"sampler", "images": what, "samples": self.lpips_samples,
                "description": f"LPIPS: v0.1 AlexNet, {what} against the base model's of the same prompts and "
                               f"seeds, mean over {len(values)} pairs (0 = identical)."})
        if self.inception is not None and self.features:
            from ..evaluation.fid import frechet_distance

            feats = np.concatenate(self.features)
            out["fid"] = (frechet_distance(feats, self.reference), len(feats), {
                **self.inception_info, "reference": str(self.config.fid_reference),
                "reference_images": len(self.reference), "images": what, "evaluated_images": len(feats),
                "description": f"FID: {what} ({len(feats)}) against the {len(self.reference)} images of "
                               f"`{Path(str(self.config.fid_reference)).name}`, Inception pool3 features "
                               f"(pytorch-fid's weights)."})
        return out


def _prepare_objects(bundle: ModelBundle, config: EvaluationConfig, erased: list[str]):
    from ..evaluation.objects import check_classes
    from ..graph.capability import default_evaluator_name, load_evaluator
    from ..graph.concept_sets import load_concept_set

    if not erased:
        raise ValueError("ESR needs the erased classes: evaluate a run folder, or name them with --erased")
    own = bundle.backend.concept_set() is not None
    concept_set = load_concept_set(config.concept_set or (bundle.kind if own else "imagenette"), bundle)
    check_classes(concept_set, erased)
    name = config.classifier or default_evaluator_name(bundle, concept_set)
    # a Hub classifier comes from the local cache only: evaluation never downloads weights
    return concept_set, load_evaluator(name, bundle, concept_set, local_files_only=True)

