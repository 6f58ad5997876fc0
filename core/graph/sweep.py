"""Build a concept graph: G_0 for every concept, then one row per erased concept.

A row = erase one concept (any engine method and target) and measure G for every concept of the set.
Rows are independent: they run one after another here, or on Ray workers (``backend="ray"``) of an
existing cluster (``ray_address``) or a local one, where a row's erasure and the parts of its
measurement are separate tasks. Each row is written as soon as it is done, and a re-run skips the
rows already present.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..bundle import ModelBundle, load_bundle
from ..files import environment_versions
from ..runs import RunManifest, delta_weights, read_delta
from .capability import CapabilitySpec, capability, default_evaluator_name, load_evaluator
from .concept_sets import ConceptSet
from .store import GraphStore

ABNORMAL_G0 = 0.6  # the paper's abnormal nodes sit near 60 % while most are near 100 %


@dataclass
class RowRecipe:
    """How a row erases its concept."""

    method: str = "esd"
    preset: str | None = None
    options: dict = field(default_factory=dict)  # config overrides, e.g. {"target": ""}

    def config(self, concept: str):
        from ..erasure import make_config

        return make_config(self.method, self.preset, concepts=[concept], **self.options)


def erase_row(bundle: ModelBundle, recipe: RowRecipe, erased: str, work_dir: Path | None = None
              ) -> tuple[dict[str, torch.Tensor], float]:
    """Erase ``erased`` by ``recipe``: the changed UNet tensors (checked as any run's) and the seconds."""
    from ..erasure import erase

    start = time.time()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        run_dir = Path(tmp) / "run"
        erase(bundle, recipe.config(erased), run_dir)
        delta = read_delta(bundle, run_dir, RunManifest.read(run_dir))
    return delta, time.time() - start


def row_frame(erased: str, nodes: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """The row's edges from G after (``after``, any order) and G₀ (``nodes``), in the nodes' order."""
    row = nodes[["concept", "G0_top1", "G0_topk"]].merge(after, on="concept")
    return pd.DataFrame({"erased": erased, "affected": row.concept,
                         "G_before_top1": row.G0_top1, "G_after_top1": row.G_top1,
                         "delta_top1": row.G0_top1 - row.G_top1,
                         "G_before_topk": row.G0_topk, "G_after_topk": row.G_topk,
                         "delta_topk": row.G0_topk - row.G_topk})


def measure_row(erased_bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec,
                erased: str, nodes: pd.DataFrame) -> pd.DataFrame:
    """Delta of every concept after erasing ``erased`` (``erased_bundle`` is the erased model; G₀ is in
    ``nodes``)."""
    return row_frame(erased, nodes, capability(erased_bundle, concept_set, evaluator, spec))


def compute_row(bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec,
                recipe: RowRecipe, erased: str, nodes: pd.DataFrame, work_dir: Path | None = None
                ) -> tuple[pd.DataFrame, float]:
    start = time.time()
    delta, _ = erase_row(bundle, recipe, erased, work_dir)
    with delta_weights(bundle, delta):
        row = measure_row(bundle, concept_set, evaluator, spec, erased, nodes)
    return row, time.time() - start


def base_nodes(bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec) -> pd.DataFrame:
    g0 = capability(bundle, concept_set, evaluator, spec)
    nodes = pd.DataFrame({"concept": concept_set.concepts})
    for grouping, labels in concept_set.groups.items():
        nodes[f"group_{grouping}"] = [labels.get(c, "") for c in concept_set.concepts]
    nodes["G0_top1"] = g0.G_top1.values
    nodes["G0_topk"] = g0.G_topk.values
    nodes["low_G0"] = nodes.G0_top1 < ABNORMAL_G0
    return nodes


def open_graph(bundle: ModelBundle, concept_set: ConceptSet, out_dir: str | Path, recipe: RowRecipe,
               spec: CapabilitySpec = CapabilitySpec(), evaluator_name: str | None = None,
               log=print, nodes: pd.DataFrame | None = None) -> tuple[GraphStore, CapabilitySpec, object, pd.DataFrame]:
    """Open (or create) the graph folder of ``recipe`` and make sure G_0 is in it.

    ``nodes``: G_0 already measured with the same model and spec (another graph's), written
    instead of measured again.

    Returns the store, the spec with the model's sampling settings written in, the evaluator and
    the nodes. A folder made another way is refused (:class:`GraphMismatchError`).
    """
    evaluator_name = evaluator_name or default_evaluator_name(bundle, concept_set)
    spec = spec.resolved(bundle)
    store = GraphStore(out_dir)
    store.open({**bundle.graph_identity(), "method": recipe.method, "preset": recipe.preset,
                "target": recipe.options.get("target"), "options": recipe.options, "evaluator": evaluator_name,
                "concept_set": concept_set.to_dict(), "template": spec.template or concept_set.template,
                "capability": spec.to_dict(), "seeds": spec.seeds(), "images_per_concept": spec.images_per_concept,
                "versions": environment_versions()})
    evaluator = load_evaluator(evaluator_name, bundle, concept_set)
    if store.nodes() is None and nodes is not None:
        store.write_nodes(nodes)
    nodes = store.nodes()
    if nodes is None:
        start = time.time()
        nodes = base_nodes(bundle, concept_set, evaluator, spec)
        store.write_nodes(nodes)
        store.update_meta(baseline_seconds=round(time.time() - start, 1))
        log(f"G_0 of {len(nodes)} concepts in {time.time() - start:.0f} s")
    return store, spec, evaluator, nodes


def build_graph(bundle: ModelBundle, concept_set: ConceptSet, out_dir: str | Path, recipe: RowRecipe,
                spec: CapabilitySpec = CapabilitySpec(), evaluator_name: str | None = None,
                rows: list[str] | None = None, backend: str = "local", ray_address: str | None = None,
                progress: bool = True, log=print) -> GraphStore:
    """Compute the missing rows of the graph in ``out_dir`` (all concepts by default)."""
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use local or ray")
    store, spec, evaluator, nodes = open_graph(bundle, concept_set, out_dir, recipe, spec, evaluator_name, log)
    wanted = rows or concept_set.concepts
    unknown = [c for c in wanted if c not in concept_set.concepts]
    if unknown:
        raise ValueError(f"rows for concepts outside the set: {', '.join(unknown)}")
    todo = [c for c in wanted if c not in set(store.rows_done())]
    if not todo:
        return store
    if backend == "local":
        bar = tqdm(todo, desc="graph rows", disable=not progress)
        for concept in bar:
            row, seconds = compute_row(bundle, concept_set, evaluator, spec, recipe, concept, nodes)
            store.add_row(concept, row, seconds)
            log(f"row {concept}: {seconds:.1f} s")
    else:
        _ray_rows(store, bundle.base_source or bundle.source, bundle, concept_set, evaluator.name,
                  spec, recipe, todo, nodes, ray_address, progress, log)
    return store


# A row's images are measured in this many Ray tasks, so that the last rows of a graph share the
# workers instead of leaving all but one idle (docs/graph.md, "Benchmark").
MEASURE_PARTS = 2


class RowWorker:
    """A Ray actor: the model and the classifier loaded once, one thread; it erases rows and measures
    parts of erased rows."""

    def __init__(self, source, device, concept_set: ConceptSet, evaluator_name: str, spec: CapabilitySpec):
        torch.set_num_threads(1)  # rows run side by side; one row's small batches use a second thread poorly
        self.bundle = load_bundle(source, device=device)
        self.concept_set, self.spec = concept_set, spec
        self.evaluator = load_evaluator(evaluator_name, self.bundle, concept_set)

    def erase(self, recipe: RowRecipe, concept: str) -> tuple[dict[str, torch.Tensor], float]:
        return erase_row(self.bundle, recipe, concept)

    def measure(self, delta: dict[str, torch.Tensor], concepts: list[str]) -> tuple[pd.DataFrame, float]:
        start = time.time()
        with delta_weights(self.bundle, delta):
            after = capability(self.bundle, self.concept_set, self.evaluator, self.spec, concepts)
        return after, time.time() - start


def ray_worker_plan(available: dict, use_gpu: bool, rows: int) -> tuple[int, dict]:
    """How many row workers to start, and the Ray resources each asks for: one per GPU when the model is on
    a GPU (Ray gives each its own device through CUDA_VISIBLE_DEVICES, so its "cuda" is that GPU), else
    one per CPU; never more than there are row parts to measure."""
    slots = int(available.get("GPU" if use_gpu else "CPU", 1))
    return max(1, min(slots, rows * MEASURE_PARTS)), {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0}


def _ray_rows(store, source, bundle, concept_set, evaluator_name, spec, recipe, todo, nodes, address,
              progress, log) -> None:
    """Rows on Ray workers (one per CPU, or per GPU): a worker erases a row, then the row's parts are
    measured by whichever workers are free. A row is written as soon as its last part is in."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("the Ray backend needs Ray: pip install 'age-explorer[ray]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    use_gpu = bundle.device.type == "cuda"
    n_workers, resources = ray_worker_plan(ray.available_resources(), use_gpu, len(todo))
    actor = ray.remote(**resources)(RowWorker)
    workers = [actor.remote(source, "cuda" if use_gpu else str(bundle.device), concept_set, evaluator_name, spec)
               for _ in range(n_workers)]
    concepts = concept_set.concepts
    size = -(-len(concepts) // (MEASURE_PARTS if n_workers > 1 else 1))
    parts = [concepts[i:i + size] for i in range(0, len(concepts), size)]
    waiting, measurable = list(todo), deque()  # rows to erase; (row, part) pairs ready to measure
    deltas, measured = {}, {}
    seconds = {}  # the open rows (erasing or being measured) and their worker seconds so far
    idle, running = list(workers), {}
    bar = tqdm(total=len(todo), desc="graph rows (ray)", disable=not progress)
    try:
        while waiting or measurable or running:
            while idle and (waiting or measurable):
                worker = idle.pop()
                # start a row while fewer rows are open than workers, else finish the open ones
                if waiting and (len(seconds) < n_workers or not measurable):
                    concept = waiting.pop(0)
                    seconds[concept] = 0.0
                    running[worker.erase.remote(recipe, concept)] = (worker, concept, None)
                else:
                    concept, part = measurable.popleft()
                    running[worker.measure.remote(deltas[concept], parts[part])] = (worker, concept, part)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            worker, concept, part = running.pop(ref)
            idle.append(worker)
            result, spent = ray.get(ref)
            seconds[concept] += spent
            if part is None:
                deltas[concept] = ray.put(result)
                measurable.extend((concept, p) for p in range(len(parts)))
                continue
            measured.setdefault(concept, []).append(result)
            if len(measured[concept]) == len(parts):
                store.add_row(concept, row_frame(concept, nodes, pd.concat(measured.pop(concept))), seconds[concept])
                del deltas[concept]
                bar.update()
                log(f"row {concept}: {seconds.pop(concept):.1f} s (ray, worker seconds)")
    finally:
        bar.close()
        for worker in workers:
            ray.kill(worker)
        if started_here:
            ray.shutdown()
