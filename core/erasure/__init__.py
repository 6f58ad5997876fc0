"""Concept erasure: AGE (the paper), ESD and UCE baselines, on any :class:`~core.bundle.ModelBundle`.

``erase(bundle, config, run_dir)`` runs a method, writes the run folder (``delta.safetensors``,
``manifest.json``, ``history.jsonl`` of step reports as they happen, ``history.csv`` of loss terms and picks per step, ``pi_history.csv`` of the
target distribution over steps, ``targets.csv`` of AGE's candidates) and leaves the bundle's
weights as they were.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..files import environment_versions, folder_lock
from .config import (PRESETS, AGEConfig, APConfig, CAConfig, ESDConfig, MACECFRConfig, MACEConfig, RECEConfig,
                     UCEConfig, make_config, presets_for)
from .registry import METHODS, Method, get_method, register_method

if TYPE_CHECKING:
    from ..bundle import ModelBundle
    from ..runs import RunManifest
    from .loop import Callback

__all__ = ["erase", "make_config", "presets_for", "AGEConfig", "APConfig", "CAConfig", "ESDConfig", "RECEConfig", "UCEConfig", "MACEConfig", "MACECFRConfig", "PRESETS", "METHODS",
           "Method", "get_method", "register_method", "StepReport", "RunResult"]

# The built-in methods. Importing this package loads no torch (the CLI's --help, the explorer's lists):
# each runner is named by "module:function" and imported by the method's first run. A new built-in
# method adds its line here.
register_method(Method("age", "AGE (adaptive targets)", AGEConfig, ".age:run_age",
                       "the paper's min-max fine-tuning towards a learned mixture of nearby concepts"))
register_method(Method("esd", "ESD (fixed target)", ESDConfig, ".esd:run_esd",
                       "fine-tune so the concept maps to a fixed target prompt, with negative guidance"))
register_method(Method("ap", "AP (adversarial preservation)", APConfig, ".age:run_age",
                       "ESD towards a fixed anchor, preserving the concept the erasure damages most (AGE's search)"))
register_method(Method("uce", "UCE (closed-form edit)", UCEConfig, ".uce:run_uce",
                       "closed-form edit of the cross-attention keys and values towards a fixed target"))
register_method(Method("rece", "RECE (UCE + adversarial embeddings)", RECEConfig, ".rece:run_rece",
                       "UCE's edit, then erase the closed-form embeddings that still regenerate the concept"))
register_method(Method("ca", "CA (concept ablation)", CAConfig, ".ca:run_ca",
                       "fine-tune so the concept's prediction matches an anchor concept's on images of the anchor"))
register_method(Method("mace", "MACE (refine, LoRAs, fuse)", MACEConfig, ".mace:run_mace",
                       "closed-form refinement of k/v, one attention-map LoRA per concept inside its mask, closed-form fusion"))
register_method(Method("mace-cfr", "MACE-CFR (closed-form refinement)", MACECFRConfig, ".mace:run_mace",
                       "MACE's closed-form refinement of the words around each concept, without the LoRA stage"))


def __getattr__(name: str):
    if name == "StepReport":  # the step reports of the fine-tuning loop (torch)
        from .loop import StepReport

        return StepReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "done" or "stopped"
    steps_done: int
    manifest: RunManifest


def erase(bundle: ModelBundle, config, run_dir: str | Path, callbacks: list[Callback] | None = None,
          stop: Callable[[], bool] | None = None, resume: bool = False) -> RunResult:
    """Erase ``config.concepts`` from ``bundle``; see the method modules for the maths.

    A stopped run leaves a checkpoint in ``run_dir``; ``resume=True`` continues it exactly.
    """
    from ..runs import MANIFEST

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
    import pandas as pd
    import torch

    from ..runs import HISTORY_TABLE, HistoryLog, RunManifest, fingerprint, write_delta

    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bundle.backend.check_concepts(bundle, config.concepts, getattr(config, "target", None))
    callbacks = [HistoryLog(run_dir), *(callbacks or [])]
    result = get_method(config.method).load_runner()(bundle, config, run_dir, callbacks, stop, resume)
    changed, history = result.changed, result.history
    manifest = RunManifest(
        status=result.status,
        method=config.method,
        preset=config.preset,
        deviations_from_paper=list(config.deviations),
        concepts=list(config.concepts),
        config=config.to_dict(),
        seed=config.seed,
        steps_done=result.steps_done,
        base_model=bundle.source,
        base_model_kind=bundle.kind,
        base_revision=bundle.revision,
        base_fingerprint=fingerprint(result.originals),
        device=str(bundle.device),
        dtype=str(bundle.dtype).replace("torch.", ""),
        # the CPU thread count changes the order of float sums, so it is part of what reproduces a run
        cpu_threads=torch.get_num_threads() if bundle.device.type == "cpu" else None,
        loss_space=getattr(config, "loss_space", None),
        seconds=round(time.time() - started, 2),
        versions=environment_versions(),
        **RunManifest.keywords(result.extra),  # the method's own results
    )
    if history:
        pd.DataFrame(history).to_csv(run_dir / HISTORY_TABLE, index=False)
    pi_rows = [{"step": row["step"], "concept": row["concept"], "candidate": name, "pi": p}
               for row in result.pi_history for name, p in row["pi"].items()]
    if pi_rows:
        pd.DataFrame(pi_rows).to_csv(run_dir / "pi_history.csv", index=False)
    if result.status == "done":
        manifest = replace(manifest, **write_delta(run_dir, changed))
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    manifest.write(run_dir)
    return RunResult(run_dir, result.status, result.steps_done, manifest)
