"""Concept erasure: AGE (the paper), ESD and UCE baselines, on any :class:`~core.bundle.ModelBundle`.

``erase(bundle, config, run_dir)`` runs a method, writes the run folder (``delta.safetensors``,
``manifest.json``, ``history.csv`` of loss terms and picks per step, ``pi_history.csv`` of the
target distribution over steps, ``targets.csv`` of AGE's candidates) and leaves the bundle's
weights as they were.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ..bundle import ModelBundle
from ..manifest import environment_versions, folder_lock, write_json_atomic
from ..runs import MANIFEST, RUN_KIND, fingerprint, write_delta
from .age import AGERun
from .config import AGEConfig, ESDConfig, PRESETS, UCEConfig, make_config
from .esd import ESDRun
from .loop import Callback, StepReport, _check_concepts
from .uce import uce_edit

__all__ = ["erase", "make_config", "AGEConfig", "ESDConfig", "UCEConfig", "PRESETS", "StepReport", "RunResult"]

RUNS = {"age": AGERun, "esd": ESDRun}


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "done" or "stopped"
    steps_done: int
    manifest: dict


def erase(bundle: ModelBundle, config, run_dir: str | Path, callbacks: list[Callback] | None = None,
          stop: Callable[[], bool] | None = None, resume: bool = False) -> RunResult:
    """Erase ``config.concepts`` from ``bundle``; see the method modules for the maths.

    A stopped run leaves a checkpoint in ``run_dir``; ``resume=True`` continues it exactly.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and (run_dir / MANIFEST).exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; choose another folder or resume it")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(run_dir, f"another process is writing a run in {run_dir}; choose another folder", wait=0):
            if (run_dir / MANIFEST).exists() and not resume:  # written while this one waited for the lock
                raise FileExistsError(f"{run_dir} already holds a run; choose another folder or resume it")
            return _erase(bundle, config, run_dir, callbacks, stop, resume)
    except Exception:
        # a run that failed before its first checkpoint (a diverged loss, a bad target) leaves no folder
        if created and not (run_dir / "checkpoint").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _erase(bundle, config, run_dir: Path, callbacks, stop, resume) -> RunResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if config.method == "uce":
        _check_concepts(bundle, config)
        if config.requires_gpu and bundle.device.type != "cuda":
            raise RuntimeError(f"preset {config.preset!r} needs a CUDA GPU")
        originals = uce_edit(bundle, config)
        changed = {n: p.detach().cpu().clone() for n, p in bundle.unet.named_parameters() if n in originals}
        outcome, extra, history = {"status": "done", "steps_done": 1}, {}, []
        base_print = fingerprint(originals)
        _restore(bundle, originals)
    else:
        run = RUNS[config.method](bundle, config, run_dir, callbacks, stop)
        try:
            outcome = run.run(resume=resume)
            changed = run.predictor.changed()
            base_print = fingerprint({n: run.predictor.original[n] for n in changed})
            extra, history = run.extra_results(run_dir), run.history
        finally:
            run.predictor.restore()
    manifest = {
        "kind": RUN_KIND,
        "status": outcome["status"],
        "method": config.method,
        "preset": config.preset,
        "deviations_from_paper": list(config.deviations),
        "concepts": list(config.concepts),
        "config": config.to_dict(),
        "seed": config.seed,
        "steps_done": outcome["steps_done"],
        "base_model": bundle.source,
        "base_model_kind": bundle.kind,
        "base_revision": bundle.revision,
        "base_fingerprint": base_print,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        # the CPU thread count changes the order of float sums, so it is part of what reproduces a run
        "cpu_threads": torch.get_num_threads() if bundle.device.type == "cpu" else None,
        "loss_space": getattr(config, "loss_space", None),
        "seconds": round(time.time() - started, 2),
        "versions": environment_versions(),
        **extra,
    }
    steps = [row for row in history if row["phase"] != "pi_distribution"]
    if steps:
        pd.DataFrame(steps).to_csv(run_dir / "history.csv", index=False)
    pi_rows = [{"step": row["step"], "concept": row["concept"], "candidate": name, "pi": p}
               for row in history if row["phase"] == "pi_distribution" for name, p in row["pi"].items()]
    if pi_rows:
        pd.DataFrame(pi_rows).to_csv(run_dir / "pi_history.csv", index=False)
    if outcome["status"] == "done":
        manifest.update(write_delta(run_dir, changed))
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    write_json_atomic(run_dir / MANIFEST, manifest)
    return RunResult(run_dir, outcome["status"], outcome["steps_done"], manifest)


def _restore(bundle: ModelBundle, originals: dict) -> None:
    import torch

    params = dict(bundle.unet.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
