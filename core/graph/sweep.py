"""Build a concept graph: G_0 for every concept, then one row per erased concept.

A row = erase one concept (any engine method and target) and measure G for every concept of the set.
Rows are independent: they run one after another here, or as Ray tasks (``backend="ray"``) on an
existing cluster (``ray_address``) or a local one. Each row is written as soon as it is done, and a
re-run skips the rows already present.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..bundle import ModelBundle, load_bundle
from ..manifest import environment_versions
from ..runs import run_weights
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


def measure_row(erased_bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec,
                erased: str, nodes: pd.DataFrame) -> pd.DataFrame:
    """Delta of every concept after erasing ``erased`` (``erased_bundle`` is the erased model; G₀ is in
    ``nodes``)."""
    after = capability(erased_bundle, concept_set, evaluator, spec)
    row = nodes[["concept", "G0_top1", "G0_topk"]].merge(after, on="concept")
    return pd.DataFrame({"erased": erased, "affected": row.concept,
                         "G_before_top1": row.G0_top1, "G_after_top1": row.G_top1,
                         "delta_top1": row.G0_top1 - row.G_top1,
                         "G_before_topk": row.G0_topk, "G_after_topk": row.G_topk,
                         "delta_topk": row.G0_topk - row.G_topk})


def compute_row(bundle: ModelBundle, concept_set: ConceptSet, evaluator, spec: CapabilitySpec,
                recipe: RowRecipe, erased: str, nodes: pd.DataFrame, work_dir: Path | None = None
                ) -> tuple[pd.DataFrame, float]:
    from ..erasure import erase

    start = time.time()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        erase(bundle, recipe.config(erased), Path(tmp) / "run")
        with run_weights(bundle, Path(tmp) / "run"):
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


def _ray_rows(store, source, bundle, concept_set, evaluator_name, spec, recipe, todo, nodes, address,
              progress, log) -> None:
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("the Ray backend needs Ray: pip install 'age-explorer[ray]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    use_gpu = bundle.device.type == "cuda"
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_row_task)
    pending = {task.remote(source, str(bundle.device) if not use_gpu else "cuda", concept_set, evaluator_name,
                           spec, recipe, concept, nodes): concept for concept in todo}
    bar = tqdm(total=len(pending), desc="graph rows (ray)", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            concept = pending.pop(ready[0])
            row, seconds = ray.get(ready[0])
            store.add_row(concept, row, seconds)
            bar.update()
            log(f"row {concept}: {seconds:.1f} s (ray)")
    finally:
        bar.close()
        if started_here:
            ray.shutdown()


def _row_task(source, device, concept_set, evaluator_name, spec, recipe, concept, nodes):
    torch.set_num_threads(1)
    bundle = load_bundle(source, device=device)
    evaluator = load_evaluator(evaluator_name, bundle, concept_set)
    return compute_row(bundle, concept_set, evaluator, spec, recipe, concept, nodes)
