"""The kinds of background job, one runner each: erase, generate, attack (``run_attack`` into
``RUN/attacks/``) and evaluate (``evaluate`` into ``RUN/evaluation/``). A runner gets a
:class:`~.job_store.JobContext` and returns the job's artifacts."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

from .job_store import JobCancelled, JobContext, Runner


_BUNDLES: dict[tuple[str, str], object] = {}
_BUNDLES_LOCK = threading.Lock()


def _bundle(model: str, device: str):
    from ..bundle import load_bundle

    with _BUNDLES_LOCK:
        key = (model, device)
        if key not in _BUNDLES:
            _BUNDLES[key] = load_bundle(model, device=device)
        return _BUNDLES[key]


def erase_run_dir(work_dir: Path) -> Path:
    """The run folder an erase job writes in its work folder (``JobStore.work_dir``)."""
    return work_dir / "run"


def run_erase_job(ctx: JobContext) -> dict:
    """config: {"model": ..., "method": ..., "preset": ..., "options": {...concepts...}}."""
    from ..erasure import erase, get_method, make_config

    cfg = ctx.job.config
    config = make_config(cfg["method"], cfg.get("preset"), **cfg.get("options", {}))
    bundle = _bundle(cfg.get("model", "toy"), ctx.device)
    run_dir = erase_run_dir(ctx.work_dir)
    resume = ctx.job.resume and (run_dir / "checkpoint").exists()

    preview_every = int(cfg.get("preview_every", bundle.backend.preview_every))
    preview = {}

    def on_step(report):
        if preview_every and report.step % preview_every == 0:
            preview["path"] = str(_write_preview(bundle, config, ctx.work_dir, report.step))
        ctx.report(report.step, report.total, {**asdict(report), "preview": preview.get("path")})

    if not resume and run_dir.exists():
        # A run killed before its first checkpoint left nothing to continue from: start it over.
        import shutil

        shutil.rmtree(run_dir)
    result = erase(bundle, config, run_dir, callbacks=[on_step], stop=ctx.should_stop, resume=resume)
    if result.status == "stopped":
        raise JobCancelled()
    artifacts = {"run_dir": str(run_dir)}
    if "pgd_num_steps" in get_method(config.method).options:  # AGE, AP: the top-1 targets' own G after, where judged
        from ..erasure.preservation import check_target_preservation, notes

        artifacts["target_notes"] = notes(check_target_preservation(bundle, run_dir))
    return artifacts


def _write_preview(bundle, config, work_dir: Path, step: int) -> Path:
    """An image of the first erased concept with the weights as they are now (fixed seed)."""
    from ..imageio import to_pil
    from ..sampling import generate

    prompt = config.prompt_template.format(c=config.concepts[0])
    image = generate(bundle, [prompt], [0])[0]
    path = work_dir / f"preview-{step:06d}.png"
    to_pil(image, 160).save(path)
    return path


def run_generate_job(ctx: JobContext) -> dict:
    """config: {"model": ..., "prompts": [...], "seeds": "0-3", "steps": ..., "guidance_scale": ...}."""
    from ..imageio import save_pngs
    from ..sampling import generate, parse_seeds

    cfg = ctx.job.config
    bundle = _bundle(cfg.get("model", "toy"), ctx.device)
    seeds = parse_seeds(cfg.get("seeds", "0-3"))
    images = generate(bundle, cfg["prompts"], seeds, steps=cfg.get("steps"), guidance_scale=cfg.get("guidance_scale"),
                      progress=lambda done, total: ctx.report(done, total, {}))
    names = [f"p{p:02d}_seed{s:04d}" for p in range(len(cfg["prompts"])) for s in seeds]
    out = ctx.work_dir / "images"
    save_pngs(images, out, names)
    return {"images": str(out)}


class StageProgress:
    """The ``(stage, done, total)`` callbacks of attacks and evaluation as job progress: the job's step
    and total are the current stage's, and the progress names the stage with its own ETA."""

    def __init__(self, ctx: JobContext):
        self.ctx, self.stage, self.started = ctx, None, time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.stage, self.started = stage, time.monotonic()
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done) if done else None
        self.ctx.report(done, total, {"stage": stage, "eta": eta}, force=done == 1)


def run_attack_job(ctx: JobContext) -> dict:
    """config: {"run_dir": ..., "attack": ..., "options": {...AttackConfig fields...}, optional "evaluator"
    and "concept_set" (the judge; default: the model's)}. The attack folder goes under the run
    (``RUN/attacks/``), in a name no earlier attack holds."""
    from ..attacks import AttackStopped, free_attack_folder, make_attack_config, run_attack
    from ..attacks.common import AttackTarget

    cfg = ctx.job.config
    config = make_attack_config(cfg["attack"], **cfg.get("options", {}))
    target = AttackTarget(cfg["run_dir"], device=ctx.device)
    out = free_attack_folder(cfg["run_dir"], cfg["attack"], target.concept(config.concept))
    try:
        result = run_attack(cfg["run_dir"], cfg["attack"], config, out=out, target=target,
                            progress=StageProgress(ctx), stop=ctx.should_stop, evaluator=cfg.get("evaluator"),
                            concept_set=cfg.get("concept_set"))
    except AttackStopped:
        raise JobCancelled() from None
    return {"attack_dir": str(result.out_dir)}


def run_evaluate_job(ctx: JobContext) -> dict:
    """config: {"model": a run folder (or model), "out": result folder, "config": {...EvaluationConfig...}}.
    The result folder is replaced only once every metric is done."""
    from ..evaluation.config import EvaluationConfig
    from .evaluate import evaluate

    cfg = ctx.job.config
    try:
        done = evaluate(cfg["model"], EvaluationConfig(**cfg["config"]), out=cfg["out"], device=ctx.device, force=True,
                        progress=StageProgress(ctx), stop=ctx.should_stop, log=lambda message: None)
    except InterruptedError:
        raise JobCancelled() from None
    return {"evaluation_dir": str(done.out_dir)}


def default_runners() -> dict[str, Runner]:
    return {"erase": run_erase_job, "generate": run_generate_job, "attack": run_attack_job,
            "evaluate": run_evaluate_job}
