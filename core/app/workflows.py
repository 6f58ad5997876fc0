"""The explorer's journey as workflows with no UI: which runs exist, which presets fit, a checked
erasure request, before/after images and a spillover row. The explorer's tabs call these; the CLI
and scripts can call them too. They use the engine and never re-implement it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..backends import backends
from ..bundle import ModelBundle, PromptWarning
from ..erasure.config import MAX_ITERATIONS, PRESETS, make_config, presets_for, short
from ..graph.capability import CapabilitySpec
from ..graph.concept_sets import ConceptSet
from ..graph.sweep import RowRecipe, measure_row, open_graph
from ..graph.store import GraphStore
from ..imageio import contact_sheet, to_pil
from ..runs import CorruptRunError, read_manifest
from ..sampling import generate
from .jobs import JobStore

RUNS_FOLDER = "runs"  # runs made with `age-explorer erase --out DATA/runs/NAME` live here


# ---- runs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunEntry:
    """A finished erasure run the explorer can show, generate with and export."""

    label: str  # what the page lists, e.g. "AGE: red circle (3f2a…)"
    path: str  # the run folder
    method: str
    concepts: tuple[str, ...]
    finished: float  # for newest-first order


def list_runs(store: JobStore, model: str, owner: str | None = None, public: bool = False) -> list[RunEntry]:
    """Every finished run of ``model`` under the data folder, newest first: the background jobs' runs
    (in public mode only ``owner``'s) and the run folders under ``DATA/runs`` (shared, as the operator
    put them there). Read from disk on each call, so a run appears as soon as it is written."""
    runs = []
    for job in store.list(status="done"):
        if job.kind != "erase" or "run_dir" not in job.artifacts:
            continue
        if public and (owner is None or job.session != owner):
            continue
        concepts = tuple(job.config["options"]["concepts"])
        runs.append(RunEntry(f"{job.config['method'].upper()}: {', '.join(concepts)} ({job.id})",
                             job.artifacts["run_dir"], job.config["method"], concepts, job.finished or job.created))
    folder = store.data_dir / RUNS_FOLDER
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            manifest = read_manifest(run_dir)
        except CorruptRunError:  # not a run, or one still running or stopped: not offered yet
            continue
        if model not in (manifest.get("base_model"), manifest.get("model")):
            continue
        concepts = tuple(manifest["concepts"])
        runs.append(RunEntry(f"{manifest['method'].upper()}: {', '.join(concepts)} ({run_dir.name})",
                             str(run_dir), manifest["method"], concepts, (run_dir / "manifest.json").stat().st_mtime))
    return sorted(runs, key=lambda r: -r.finished)


def find_run(runs: list[RunEntry], label: str) -> RunEntry:
    for run in runs:
        if run.label == label:
            return run
    raise ValueError(f"no finished run {short(label)}; finished runs: {', '.join(r.label for r in runs[:5]) or 'none yet'}")


# ---- presets ------------------------------------------------------------------------------------
def preset_family(preset: str) -> str | None:
    """The backend a preset is named after (``toy``, ``toy-esd`` → toy; ``sdxl-esd-x`` → SDXL), or None
    for the paper's Stable Diffusion presets (imagenette, esd-x, ...)."""
    for name, backend in backends().items():
        prefix = backend.preset_prefix
        if prefix and (preset == prefix or preset.startswith(prefix + "-")):
            return name
    return None


def presets_offered(method: str, kind: str, device: str) -> list[str]:
    """The presets of ``method`` that fit a model of backend ``kind`` on ``device``: those named after
    the backend when it has its own, else the paper's; GPU-sized ones only on a GPU."""
    own = any(preset_family(p) == kind for p in PRESETS)
    fits = [p for p in presets_for(method) if preset_family(p) == (kind if own else None)]
    return [p for p in fits if device.startswith("cuda") or not PRESETS[p][1].get("requires_gpu")]


def preset_steps(method: str, preset: str | None) -> int | None:
    """The model steps a preset (or the method's defaults) runs; None for a closed-form method."""
    config = make_config(method, preset, concepts=["x"])
    return getattr(config, "iterations", None) if method != "uce" else None


def check_preset(method: str, preset: str | None, kind: str, device: str) -> None:
    """A preset that does not fit the method, the model or the device is an error that says what to pick."""
    offered = presets_offered(method, kind, device)
    choice = f"pick one of {', '.join(offered)}" if offered else "leave the preset empty for the method's defaults"
    if preset is None:
        return
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {short(preset)}; {choice}")
    if PRESETS[preset][0] != method:
        raise ValueError(f"preset {preset!r} is for method {PRESETS[preset][0]!r}, not {method!r}: {choice}")
    if PRESETS[preset][1].get("requires_gpu") and not device.startswith("cuda"):
        raise ValueError(f"preset {preset!r} is sized for a GPU and this server runs on the CPU: {choice}")
    if preset not in offered:
        raise ValueError(f"preset {preset!r} is not made for the {kind} model: {choice}")


# ---- an erasure request -------------------------------------------------------------------------
def plan_erase(bundle: ModelBundle, device: str, concepts: list[str], method: str, preset: str | None,
               options: dict):
    """The validated config of an erasure asked for from a form, or a ValueError of one line: the
    preset fits, the values are in range and the model can represent the concepts, the target and
    the own candidates (the engine's own checks, run before the job is queued)."""
    if not concepts:
        raise ValueError("pick at least one concept to erase")
    iterations = options.get("iterations")
    if iterations is not None and (iterations != iterations or abs(iterations) == float("inf")):
        raise ValueError(f"model steps must be a whole number from 1 to {MAX_ITERATIONS:,}")
    check_preset(method, preset, bundle.kind, device)
    vocab = options.get("vocab")
    if vocab and bundle.vocabulary() is not None and vocab != bundle.kind:
        raise ValueError(f"the {bundle.kind} model knows only its own words: use the {bundle.kind!r} vocabulary, "
                         f"not {short(vocab)}")
    config = make_config(method, preset, concepts=concepts, **options)
    bundle.backend.check_concepts(bundle, concepts, getattr(config, "target", None))
    for candidate in getattr(config, "candidates", None) or []:
        unknown = bundle.unknown_words(candidate)
        if unknown:
            raise ValueError(f"the {bundle.kind} model does not know {', '.join(unknown[:10])} (own candidates); "
                             f"its words: {', '.join(bundle.vocabulary())}")
    return config


# ---- inspecting a run ---------------------------------------------------------------------------
def prompt_for(bundle: ModelBundle, concept: str) -> str:
    """The prompt that asks a model for a concept: its backend's concept-set template."""
    own = bundle.backend.concept_set()
    return (own.template if own else "a photo of {concept}").format(concept=concept)


@dataclass
class BeforeAfter:
    sheet: object  # PIL image: rows of concepts, one column per model, a strip of seeds per cell
    legend: str  # the sheet's rows and columns in words
    pair: tuple  # (original, erased) of the first row's first seed, for a slider


def before_after(models: list[tuple[str, ModelBundle]], rows: list[tuple[str, str]], seeds: list[int],
                 seeds_text: str, progress=None) -> BeforeAfter:
    """The same seeds through each model (original first), as one labelled contact sheet."""
    base = models[0][1]
    prompts = [prompt_for(base, concept) for _, concept in rows]
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptWarning)
        for i, (name, bundle) in enumerate(models):
            if progress:
                progress(i / len(models), f"{name} model")
            images.append(generate(bundle, prompts, seeds))
    n = len(seeds)
    strips = [[batch[i * n:(i + 1) * n] for batch in images] for i in range(len(rows))]
    row_labels = [f"{label}: {concept}" for label, concept in rows]
    column_labels = [name for name, _ in models]
    sheet = contact_sheet(strips, row_labels, column_labels, image_px=64 if base.kind == "toy" else 128)
    legend = (f"Seeds {seeds_text.strip()}, left to right in each strip. Columns: {', '.join(column_labels)}. "
              f"Rows: {'; '.join(row_labels)}.")
    return BeforeAfter(sheet, legend, (to_pil(images[0][0], 256), to_pil(images[1][0], 256)))


def spillover_row(bundle: ModelBundle, erased: ModelBundle, run_dir: str | Path, concept_set: ConceptSet,
                  graph_dir: Path, images_per_concept: int, progress=None):
    """Measure the row of a finished run (Δ of every concept of ``concept_set``) and add it to the
    graph in ``graph_dir``, opened as ``age-explorer graph`` opens one (G₀ measured on first use).
    Also writes ``spillover.csv`` into the run folder. Returns the row and the graph."""
    manifest = read_manifest(Path(run_dir))
    concept = manifest["concepts"][0]
    if concept not in concept_set.concepts:
        raise ValueError(f"{concept!r} is not in the concept set {concept_set.name}, so it has no row")
    recipe = RowRecipe(manifest["method"], manifest.get("preset"), {"target": manifest["config"].get("target")})
    if progress:
        progress(0.05, "G₀ of the original model (once per graph)")
    store, spec, evaluator, nodes = open_graph(bundle, concept_set, graph_dir, recipe,
                                               CapabilitySpec(images_per_concept=images_per_concept, seed=1000),
                                               log=lambda message: None)
    if progress:
        progress(0.5, "G of the erased model")
    start = time.time()
    row = measure_row(bundle, erased, concept_set, evaluator, spec, concept, nodes)
    store.add_row(concept, row, time.time() - start)
    row.to_csv(Path(run_dir) / "spillover.csv", index=False)
    return row, GraphStore(graph_dir)
