"""The explorer's journey as workflows with no UI: which runs exist, which presets fit, a checked
erasure request, before/after images, a spillover row, checked recovery-attack and evaluation requests
and their results. The explorer's tabs call these; the CLI and scripts can call them too. They use the
engine and never re-implement it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from age_explorer.core.backends import backends
from age_explorer.core.bundle import ModelBundle, PromptWarning
from age_explorer.core.checks import short
from age_explorer.core.erasure import get_method
from age_explorer.core.erasure.config import MAX_ITERATIONS, PRESETS, make_config, presets_for
from age_explorer.core.graph.capability import CapabilitySpec
from age_explorer.core.graph.concept_sets import ConceptSet
from age_explorer.core.graph.sweep import RowRecipe, measure_row, open_graph
from age_explorer.core.graph.store import GraphStore
from age_explorer.core.imageio import contact_sheet, to_pil
from age_explorer.core.runs import CorruptRunError, RunManifest, run_weights
from age_explorer.core.sampling import generate, parse_seeds
from age_explorer.core.app.job_store import JobStore

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
            manifest = RunManifest.read(run_dir)
        except CorruptRunError:  # not a run, or one still running or stopped: not offered yet
            continue
        if manifest.base_model != model:
            continue
        concepts = tuple(manifest.concepts)
        runs.append(RunEntry(f"{manifest.method.upper()}: {', '.join(concepts)} ({run_dir.name})",
                             str(run_dir), manifest.method, concepts, (run_dir / "manifest.json").stat().st_mtime))
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


def preset_values(method: str, preset: str | None, names) -> dict:
    """The values a preset (or the method's defaults) gives the config fields ``names`` the method has:
    what a form shows before anyone edits it, so that sending it back changes nothing."""
    config = make_config(method, preset, concepts=["x"])
    return {name: getattr(config, name) for name in names if hasattr(config, name)}


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
    chosen = get_method(method)
    if iterations is not None and not chosen.fine_tuned:
        raise ValueError(f"{chosen.display_name} is a closed-form edit with no model steps: leave the steps blank")
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


def before_after(bundle: ModelBundle, columns: list[tuple[str, str | None]], rows: list[tuple[str, str]],
                 seeds: list[int], seeds_text: str, progress=None) -> BeforeAfter:
    """The same seeds through each column's model, as one labelled contact sheet. ``bundle`` is the base
    model; a column is ``(name, run folder)``, whose delta is swapped into it, or ``(name, None)`` for the
    base itself (the first column: the original)."""
    prompts = [prompt_for(bundle, concept) for _, concept in rows]
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptWarning)
        for i, (name, run_dir) in enumerate(columns):
            if progress:
                progress(i / len(columns), f"{name} model")
            with run_weights(bundle, run_dir) if run_dir else nullcontext():
                images.append(generate(bundle, prompts, seeds))
    n = len(seeds)
    strips = [[batch[i * n:(i + 1) * n] for batch in images] for i in range(len(rows))]
    row_labels = [f"{label}: {concept}" for label, concept in rows]
    column_labels = [name for name, _ in columns]
    sheet = contact_sheet(strips, row_labels, column_labels, image_px=bundle.backend.sheet_image_px)
    legend = (f"Seeds {seeds_text.strip()}, left to right in each strip. Columns: {', '.join(column_labels)}. "
              f"Rows: {'; '.join(row_labels)}.")
    return BeforeAfter(sheet, legend, (to_pil(images[0][0], 256), to_pil(images[1][0], 256)))


def spillover_row(bundle: ModelBundle, run_dir: str | Path, concept_set: ConceptSet,
                  graph_dir: Path, images_per_concept: int, progress=None, evaluator_name: str | None = None):
    """Measure the row of a finished run (Δ of every concept of ``concept_set``; ``bundle`` is the base
    model, into which the run's delta is swapped) and add it to the graph in ``graph_dir``, opened as
    ``age-explorer graph`` opens one (G₀ measured on first use), with ``evaluator_name`` (default: the
    model's default evaluator for the set). Also writes ``spillover.csv`` into the run folder. Returns
    the row and the graph."""
    manifest = RunManifest.read(Path(run_dir))
    concept = manifest.concepts[0]
    if concept not in concept_set.concepts:
        raise ValueError(f"{concept!r} is not in the concept set {concept_set.name}, so it has no row")
    recipe = RowRecipe(manifest.method, manifest.preset, {"target": manifest.config.get("target")})
    if progress:
        progress(0.05, "G₀ of the original model (once per graph)")
    store, spec, evaluator, nodes = open_graph(bundle, concept_set, graph_dir, recipe,
                                               CapabilitySpec(images_per_concept=images_per_concept, seed=1000),
                                               evaluator_name=evaluator_name, log=lambda message: None)
    if progress:
        progress(0.5, "G of the erased model")
    start = time.time()
    with run_weights(bundle, run_dir):
        row = measure_row(bundle, concept_set, evaluator, spec, concept, nodes)
    store.add_row(concept, row, time.time() - start)
    row.to_csv(Path(run_dir) / "spillover.csv", index=False)
    return row, GraphStore(graph_dir)


# ---- recovery attacks on a run ------------------------------------------------------------------
# an attack from the page runs on the server's device: bounds that keep one request to minutes on a CPU
MAX_ATTACK_STEPS = 5_000
MAX_ATTACK_SEEDS = 64


@dataclass(frozen=True)
class PastAttack:
    """An attack folder of a run (``RUN/attacks/NAME``) with its ``attack.json``."""

    label: str  # what the page lists, e.g. "embedding on red circle: ASR 0.62 (embedding-red-circle)"
    folder: str
    result: dict


def attack_defaults(attack: str) -> tuple[int | None, str]:
    """(optimisation steps, evaluation seeds) of an attack's config; steps None for the prompt probes."""
    from age_explorer.core.attacks import make_attack_config

    config = make_attack_config(attack)
    return getattr(config, "steps", None), config.seeds


def plan_attack(attack: str, steps: float | None, seeds: str, concept: str | None, run_concepts: list[str]):
    """The validated config of an attack on a run that erased ``run_concepts``, asked for from a form,
    or a ValueError of one line. ``steps`` applies to the optimising attacks; blank keeps the attack's
    default; no ``concept`` attacks the run's first."""
    from age_explorer.core.attacks import ATTACKS, make_attack_config

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {short(attack)}; choose one of {', '.join(ATTACKS)}")
    if concept and concept not in run_concepts:
        raise ValueError(f"{short(concept)} is not a concept of the run (it erased: {', '.join(run_concepts)})")
    options = {"seeds": (seeds or "").strip() or None, "concept": concept or None}
    if steps is not None and hasattr(ATTACKS[attack].config, "steps"):
        if not (math.isfinite(steps) and steps == int(steps) and 1 <= steps <= MAX_ATTACK_STEPS):
            raise ValueError(f"steps must be a whole number from 1 to {MAX_ATTACK_STEPS:,}")
        options["steps"] = int(steps)
    if options["seeds"] is not None:
        parse_seeds(options["seeds"], limit=MAX_ATTACK_SEEDS)
    return make_attack_config(attack, **options)


def past_attacks(run_dir: str | Path) -> list[PastAttack]:
    """The finished attacks of a run, newest first (a damaged or foreign folder is skipped)."""
    from age_explorer.core.attacks import RESULT, read_result

    folder = Path(run_dir) / "attacks"
    found = []
    for result_file in folder.glob(f"*/{RESULT}") if folder.is_dir() else []:
        try:
            data = read_result(result_file.parent)
        except (ValueError, KeyError, OSError):
            continue
        label = f"{data['attack']} on {data['concept']}: ASR {data['asr']:.2f} ({result_file.parent.name})"
        found.append((result_file.stat().st_mtime, PastAttack(label, str(result_file.parent), data)))
    return [entry for _, entry in sorted(found, key=lambda item: -item[0])]


def attack_summary(result: dict) -> str:
    """An attack's numbers in words: ASR against its two baselines, what it learned, what it cost."""
    learned = result.get("learned", {})
    lines = [f"**{result['attack']}** attack on **{result['concept']}** ({result.get('run_description', '')}): "
             f"ASR **{result['asr']:.2f}** on the erased model (best probe {result['asr_best']:.2f}).",
             f"Baselines: the same attack on the base model {result['asr_base']:.2f}; the plain prompt on the "
             f"erased model {result['asr_plain']:.2f}, on the base model {result['asr_original']:.2f}."]
    if learned.get("nearest_words"):
        words = "; ".join(f"`{token}`: {', '.join(near)}" for token, near in
                          zip(learned.get("tokens") or [f"token {i}" for i in range(len(learned["nearest_words"]))],
                              learned["nearest_words"]))
        lines.append(f"Learned prompt `{learned.get('prompt', '')}`; nearest words: {words}.")
    if learned.get("best_probe"):
        lines.append(f"Best probe: `{learned['best_probe']}`.")
    config = result.get("config", {})
    steps = f"{config['steps']} steps, " if "steps" in config else ""
    lines.append(f"{steps}{result['images_per_probe']} images per probe (seeds {result['seeds']}), judged by "
                 f"{result['evaluator']}; {result['seconds']:.1f} s on the erased model, {result['seconds_total']:.1f} s "
                 f"in all.")
    return "  \n".join(lines)


# ---- evaluation of a run ------------------------------------------------------------------------
# ESR/PSR from the page: a few images per class fit a CPU (the paper's 500 are the CLI's default)
PAGE_IMAGES_PER_CLASS = 8
MAX_PAGE_IMAGES_PER_CLASS = 64
EVALUATION_COLUMNS = ["class", "role", "top1", "top5", "images"]  # the per-class table, empty or not


def plan_evaluation(images_per_class: float | None, classifier: str | None = None, concept_set: str | None = None):
    """The config of an object-erasure evaluation (ESR/PSR) asked for from a form, or a ValueError;
    ``classifier`` and ``concept_set``: the server's choice (None: the model's defaults)."""
    from age_explorer.core.evaluation.config import EvaluationConfig

    n = PAGE_IMAGES_PER_CLASS if images_per_class is None else images_per_class
    if not (math.isfinite(n) and n == int(n) and 1 <= n <= MAX_PAGE_IMAGES_PER_CLASS):
        raise ValueError(f"images per class must be a whole number from 1 to {MAX_PAGE_IMAGES_PER_CLASS}")
    return EvaluationConfig(metrics=["objects"], images_per_class=int(n), classifier=classifier,
                            concept_set=concept_set)


@dataclass
class EvaluationView:
    summary: str  # the headline metrics in words
    table: pd.DataFrame  # per class: role, top-1, top-5, images


def evaluation_view(folder: str | Path) -> EvaluationView:
    """An evaluation result folder as the page shows it."""
    from age_explorer.core.evaluation.results import read_results

    data = read_results(folder)
    metrics = data["metrics"]
    objects = data.get("objects", {})
    summary = ", ".join(f"{name} **{100 * metrics[name]:.1f}%**" for name in ("ESR-1", "ESR-5", "PSR-1", "PSR-5")
                        if name in metrics)
    manifest_file = Path(folder) / "manifest.json"
    seconds = json.loads(manifest_file.read_text()).get("seconds") if manifest_file.is_file() else None
    others = [f"{name} **{value:.4g}**" for name, value in metrics.items()
              if name not in ("ESR-1", "ESR-5", "PSR-1", "PSR-5") and isinstance(value, (int, float))]
    if others:  # the other families', a registered plugin's included
        summary += ", " + ", ".join(others) if summary else ", ".join(others)
    summary += (f"  \nESR: share of the erased class's images no longer classified as it; PSR: share of the other "
                f"classes' images still classified right. {len(objects.get('seeds', []))} images per class, "
                f"classifier {objects.get('classifier')}" + (f", {seconds:.0f} s." if seconds is not None else "."))
    table = pd.DataFrame(objects.get("per_class", []), columns=EVALUATION_COLUMNS).round(3)
    return EvaluationView(summary, table)
