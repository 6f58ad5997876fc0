"""The paper's claim on the toy world: AGE loses less on related concepts than ESD with the empty target.

For each erased concept and each method variant: erase, then measure G on all 25 concepts with the
same prompts and seeds as the original model, plus G of the erased concept under a paraphrased
template. Spillover Delta = G_0 - G_after, averaged over the 4 same-shape, 4 same-colour and 16
unrelated concepts.

Each variant's measurements are rows of a concept graph (``OUT/graphs/<variant>``, the same files
and settings as ``age-explorer graph``), so a comparison and a graph share their rows: the compare
reuses rows already measured, and ``age-explorer graph`` completes a compare's graph. Results are
appended to a CSV as they come, so a killed comparison resumes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from age_explorer.core.bundle import ModelBundle
from age_explorer.core.erasure import erase
from age_explorer.core.graph.capability import CapabilitySpec, capability
from age_explorer.core.graph.concept_sets import load_concept_set
from age_explorer.core.graph.sweep import RowRecipe, measure_row, open_graph
from age_explorer.core.runs import RunManifest, is_run_dir, run_weights


DEFAULT_CONCEPTS = ["red circle", "blue square", "yellow triangle", "green cross", "purple ring"]
# The same recipes as `age-explorer graph --method esd --target ""` and `--method age [--search damage]`.
VARIANTS = {
    "ESD ''": RowRecipe("esd", "toy-esd", {"target": ""}),
    "AGE (paper search)": RowRecipe("age", "toy", {}),
    "AGE (damage search)": RowRecipe("age", "toy", {"target_search": "damage"}),
    "AGE fast (paper search)": RowRecipe("age", "toy-fast", {}),
    "AGE fast (damage search)": RowRecipe("age", "toy-fast", {"target_search": "damage"}),
    "AGE fast (damage_floor search)": RowRecipe("age", "toy-fast", {"target_search": "damage_floor"}),
}
DEFAULT_VARIANTS = ["ESD ''", "AGE (paper search)", "AGE (damage search)"]


def variant_slug(variant: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in variant.lower()).split())


def compare(bundle: ModelBundle, out_dir: str | Path, concepts: list[str] | None = None,
            variants: list[str] | None = None, spec: CapabilitySpec = CapabilitySpec(),
            overrides: dict | None = None, log=print) -> pd.DataFrame:
    """``overrides``: config changes applied to every variant (e.g. fewer iterations for a quick check);
    they are part of each graph's recipe, so such graphs are kept apart from the full ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = bundle.backend.world
    concept_set = load_concept_set("toy", bundle)
    concepts = concepts or DEFAULT_CONCEPTS
    variants = variants or DEFAULT_VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    recipes = {v: RowRecipe(VARIANTS[v].method, VARIANTS[v].preset, {**VARIANTS[v].options, **(overrides or {})})
               for v in variants}
    graphs = {}
    for v in variants:  # G_0 is measured once and shared: same model, prompts and seeds
        known = next(iter(graphs.values()))[3] if graphs else None
        graphs[v] = open_graph(bundle, concept_set, out / "graphs" / variant_slug(v), recipes[v], spec, "toy",
                               log, nodes=known)
    _, spec, evaluator, nodes = graphs[variants[0]]
    paraphrase = world.paraphrase_templates[0].replace("{c}", "{concept}")
    para_spec = replace(spec, seed=spec.seed + 10_000, template=paraphrase)
    base_file = out / "baseline.csv"
    if base_file.exists():
        base = pd.read_csv(base_file)
    else:
        base = nodes[["concept", "G0_top1"]].rename(columns={"G0_top1": "G_top1"}).merge(
            capability(bundle, concept_set, evaluator, para_spec, concepts)[["concept", "G_top1"]]
            .rename(columns={"G_top1": "para_G_top1"}), on="concept", how="left")
        base.to_csv(base_file, index=False)
    g0 = dict(zip(base.concept, base.G_top1))
    p0 = dict(zip(base.concept, base.para_G_top1))
    results_file = out / "comparison.csv"
    done = pd.read_csv(results_file) if results_file.exists() else pd.DataFrame(columns=["variant", "concept"])
    for concept in concepts:
        for variant in variants:
            if ((done.variant == variant) & (done.concept == concept)).any():
                continue
            store, _, _, nodes = graphs[variant]
            run_dir = out / "runs" / f"{variant_slug(variant)}-{concept.replace(' ', '_')}"
            start = time.time()
            if is_run_dir(run_dir) and RunManifest.read(run_dir, finished=False).status == "done":
                # Killed after the erasure, before its evaluation: reuse the finished run.
                manifest = RunManifest.read(run_dir)
                erase_seconds = manifest.seconds
            else:
                manifest = erase(bundle, recipes[variant].config(concept), run_dir,
                                 resume=(run_dir / "checkpoint").exists()).manifest
                erase_seconds = time.time() - start
            with run_weights(bundle, run_dir):
                if concept in store.rows_done():
                    measured = store.edges()[lambda e: e.erased == concept]
                else:
                    measured = measure_row(bundle, concept_set, evaluator, spec, concept, nodes)
                    store.add_row(concept, measured, time.time() - start)
                para = capability(bundle, concept_set, evaluator, para_spec, [concept])
            g = dict(zip(measured.affected, measured.G_after_top1))
            delta = {c: g0[c] - g[c] for c in world.names}
            row = {"variant": variant, "concept": concept,
                   "G_before": g0[concept], "G_after": g[concept],
                   "para_before": p0[concept], "para_after": float(para.G_top1.iloc[0]),
                   "delta_same_shape": _mean(delta, world.same_shape(concept)),
                   "delta_same_colour": _mean(delta, world.same_colour(concept)),
                   "delta_unrelated": _mean(delta, world.unrelated(concept)),
                   "erase_seconds": round(erase_seconds, 1)}
            picks = manifest.neighbour_picks
            if picks:
                row.update(neighbour_pick_share=picks["share"], neighbour_pick_chance=picks["chance"])
            targets = (manifest.targets or {}).get(concept)
            if targets:
                row["top_targets"] = "; ".join(f"{w} {p:.2f}" for w, p in targets[:3])
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(results_file, index=False)
            log(f"{variant:22s} {concept:16s} G {row['G_before']:.2f}->{row['G_after']:.2f} "
                f"para {row['para_after']:.2f}  same shape {row['delta_same_shape']:.3f}  "
                f"same colour {row['delta_same_colour']:.3f}  unrelated {row['delta_unrelated']:.3f}  "
                f"({erase_seconds:.0f} s)")
    return done


def summary(results: pd.DataFrame) -> pd.DataFrame:
    cols = ["G_after", "para_after", "delta_same_shape", "delta_same_colour", "delta_unrelated", "erase_seconds"]
    extra = [c for c in ("neighbour_pick_share", "neighbour_pick_chance") if c in results]
    return results.groupby("variant", sort=False)[cols + extra].mean()


def _mean(delta: dict[str, float], names: list[str]) -> float:
    return sum(delta[n] for n in names) / len(names)
