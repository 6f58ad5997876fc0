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

from ..bundle import load_bundle
from ..evaluation import results as res
from ..evaluation.config import EvaluationConfig
from ..evaluation.registry import GENERATES, METRIC_FAMILIES, PROMPTS, SHARED, EvaluationContext
from ..evaluation.weights import Unavailable
from ..files import environment_versions

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
    rows = None
    if config.prompts:
        from ..evaluation.prompts import read_prompt_csv

        rows = read_prompt_csv(config.prompts)
    context = EvaluationContext(bundle, config, erased, rows, local_files_only, progress, stop)

    # every family loads its weights and reads its inputs before the first image
    families = [METRIC_FAMILIES[name] for name in METRIC_FAMILIES if name in config.metrics]
    measuring, unavailable = {}, {}
    for family in families:
        try:
            measuring[family.name] = family.start(context)
        except Unavailable as err:
            unavailable[family.result_name] = str(err)
    for name, why in unavailable.items():
        log(f"{name}: {why}")

    started = [f for f in families if f.name in measuring]
    takes_generated = [measuring[f.name] for f in started if f.images == SHARED and rows is None]
    takes_prompts = [measuring[f.name] for f in started if f.images == PROMPTS or (f.images == SHARED and rows is not None)]
    for family in started:
        if family.images != GENERATES:
            continue

        def on_images(name, seeds, pixels, _family=family.name):
            if save_images:
                save_pngs(pixels, folder / "images" / _family, [f"{name.replace(' ', '_')}_seed{s}" for s in seeds])
            for m in takes_generated:
                m.add([config.template.format(concept=name)] * len(seeds), seeds, pixels, label=name)

        measuring[family.name].produce(on_images if save_images or takes_generated else None)
    if rows is not None and takes_prompts:
        from ..evaluation.prompts import generate_rows

        prompt_images = generate_rows(bundle, rows, config.steps, config.batch_size, progress, stop)
        if save_images:
            save_pngs(prompt_images, folder / "images" / "prompts",
                      [f"row{i:05d}_seed{s}" for i, s in enumerate(rows.seed)])
        for m in takes_prompts:
            m.add(rows.prompt.tolist(), [int(s) for s in rows.seed], prompt_images)

    metrics: dict[str, float] = {}
    table: list[dict] = []
    body: dict = {}
    versions = environment_versions()
    for m in measuring.values():
        measured = m.finish()
        metrics.update(measured.metrics)
        table += measured.table
        body.update(measured.details)
        versions.update(measured.versions)
    table += [{"metric": name, "scope": "all", "value": why, "n": 0} for name, why in unavailable.items()]

    identity = {**bundle.graph_identity(), "evaluated": str(model), "method": run.method if run else None,
                "preset": run.preset if run else None, "run_config": run.config if run else None}
    sampler = {"steps": config.steps or bundle.default_steps,
               "guidance": bundle.default_guidance if config.guidance is None else config.guidance,
               "eta": bundle.default_eta, "sampler": "DDIM (age_explorer.core.sampling)"}
    seconds = round(time.time() - start, 1)
    results = {"schema": res.SCHEMA, "model": identity, "erased": erased, "metrics": metrics,
               "unavailable": unavailable, "sampler": sampler, **body}
    generated = any(f.images == GENERATES for f in started)
    manifest = {"kind": "age-explorer evaluation", "config": config.to_dict(), "model": identity,
                "seeds": config.seeds if generated else None,
                "prompt_seeds": rows.seed.tolist() if rows is not None else None, "sampler": sampler,
                "versions": versions, "seconds": seconds, "files": [res.RESULTS, res.TABLE]}
    res.write_results(folder, results, table, manifest)
    return results
