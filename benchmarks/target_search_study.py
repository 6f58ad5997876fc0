"""Target-search study: AGE search variants and ablations × erased concepts on the toy world.

Each row erases one concept with one variant, then measures G after (N images, seeds 1000..,
"a photo of a {concept}", the toy classifier top-1: the settings of the shipped graphs) for the
erased concept, its 4 same-shape and 4 same-colour relatives and the run's top-1 target (when the
target is a concept), and records the search's neighbour-pick share against chance, the top-1
target's distance to the erased concept, the erasure term by quarter and the seconds.

Rows run in parallel worker processes of one thread each (``--workers``). The CSV is appended as rows
finish and a re-run skips the rows it holds, so a killed study resumes. Everything goes under ``--out``:
``rows.csv``, ``table.md``, ``study.json`` (the manifest) and ``runs/<variant>-<concept>/``.

    python benchmarks/target_search_study.py --out study/ --workers 14
    python benchmarks/target_search_study.py --out study/ --variants paper,damage --concepts "purple triangle"
    python benchmarks/target_search_study.py --list        # the variants and what they change
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

COMPARISON_CONCEPTS = ["red circle", "blue square", "yellow triangle", "green cross", "purple ring"]
# name -> (method, preset: None = the study's --preset for AGE, options, what it is)
VARIANTS: dict[str, tuple[str, str | None, dict, str]] = {
    "esd": ("esd", "toy-esd", {"target": ""}, "ESD with the empty target (the baseline)"),
    "paper": ("age", None, {}, "AGE, the paper's Gumbel search"),
    "uniform": ("age", None, {"pi_mode": "uniform"}, "ablation: pi frozen at uniform"),
    "nearest": ("age", None, {"pi_mode": "nearest"}, "ablation: one fixed target, the nearest candidate in text"),
    "most-damaged": ("age", None, {"pi_mode": "most_damaged"},
                     "ablation: one fixed target, the candidate an ESD-'' probe damages most"),
    "damage": ("age", None, {"target_search": "damage"}, "AGE, the damage-scored search"),
    "damage-floor": ("age", None, {"target_search": "damage", "near_copy_floor": 0.5},
                     "damage search without near copies (output distance under half the median): the "
                     "settings of target_search=damage_floor"),
    "damage-net": ("age", None, {"target_search": "damage_net"},
                   "damage search net of the erasure: change along the erased concept's own change not counted"),
    "damage-floor-spread": ("age", None, {"target_search": "damage_floor", "pi_spread": 0.1},
                            "damage_floor with pi spread over the most damaged candidates (pi_spread 0.1)"),
    "damage-floor-spread-03": ("age", None, {"target_search": "damage_floor", "pi_spread": 0.3},
                               "damage_floor with pi spread wider (pi_spread 0.3)"),
    "two-stage": ("age", None, {"target_search": "two_stage"},
                  "damage search picks 5 candidates, then the paper's search within them"),
    "damage-constrained": ("age", None, {"target_search": "damage", "erase_check_every": 25},
                           "damage search, erasure weight doubled while G > 0.05 (checked every 25 model steps)"),
    "two-stage-constrained": ("age", None, {"target_search": "two_stage", "erase_check_every": 25},
                              "two-stage search with the erasure-success constraint"),
}
DEFAULT_VARIANTS = ["esd", "paper", "uniform", "nearest", "most-damaged", "damage", "damage-floor", "two-stage",
                    "damage-constrained"]
KEY = ["variant", "concept"]

_worker: dict = {}


def slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def _init_worker(device: str) -> None:
    """One thread per worker: small batches use a second thread poorly (docs/graph.md)."""
    import torch

    torch.set_num_threads(1)
    from age_explorer.core.bundle import load_bundle

    bundle = load_bundle("toy", device=device)
    concept_set = bundle.backend.concept_set()
    _worker.update(bundle=bundle, concept_set=concept_set,
                   evaluator=bundle.backend.evaluator(bundle, concept_set))


def run_row(variant: str, concept: str, preset: str, iterations: int | None, images: int, out: str) -> dict:
    """Erase ``concept`` with ``variant`` and measure the row (in a worker process)."""
    from age_explorer.core.erasure import erase, make_config
    from age_explorer.core.erasure.preservation import target_preservation
    from age_explorer.core.graph.capability import CapabilitySpec, capability
    from age_explorer.core.runs import RunManifest, run_weights

    bundle, concept_set, evaluator = _worker["bundle"], _worker["concept_set"], _worker["evaluator"]
    world = bundle.backend.world
    method, own_preset, options, _ = VARIANTS[variant]
    options = dict(options)
    if iterations is not None:
        options["iterations"] = iterations
    run_dir = Path(out) / "runs" / f"{variant}-{slug(concept)}"
    start = time.time()
    if run_dir.exists() and not _finished(run_dir):
        shutil.rmtree(run_dir)  # killed mid-erasure: start the row again
    if _finished(run_dir):
        manifest = RunManifest.read(run_dir)
    else:
        config = make_config(method, own_preset or preset, concepts=[concept], **options)
        manifest = erase(bundle, config, run_dir).manifest
    erase_seconds = manifest.seconds
    targets = (manifest.targets or {}).get(concept, [])
    top1 = targets[0][0] if targets else None
    measured = [concept] + world.same_shape(concept) + world.same_colour(concept)
    if top1 in world.names and top1 not in measured:
        measured.append(top1)
    spec = CapabilitySpec(images_per_concept=images).resolved(bundle)
    with run_weights(bundle, run_dir):
        after = capability(bundle, concept_set, evaluator, spec, measured)
    g = dict(zip(after.concept, after.G_top1))
    # the top-1 target's record as an AGE run's manifest holds it (core/erasure/preservation.py)
    kept = target_preservation(manifest, g, images).get(concept, {})
    row = {"variant": variant, "concept": concept, "preset": own_preset or preset,
           "iterations": options.get("iterations"), "images": images,
           "G_after": g[concept],
           "G_after_same_shape": _mean(g, world.same_shape(concept)),
           "G_after_same_colour": _mean(g, world.same_colour(concept)),
           "top1_target": top1, "top1_pi": targets[0][1] if targets else None,
           "top1_target_G_after": kept.get("G_after"), "top1_target_note": kept.get("note")}
    picks = manifest.neighbour_picks
    if picks:
        row.update(neighbour_share=picks["share"], neighbour_share_last_quarter=picks["share_last_quarter"],
                   neighbour_chance=picks["chance"])
    near = (manifest.near_copy or {}).get(concept)
    if near:
        row.update(top1_text_rank=near[0]["text_rank"], top1_output_rank=near[0]["output_rank"],
                   top1_output_vs_median=near[0]["output_vs_median"])
    erase_term = (manifest.erase_term or {}).get(concept)
    if erase_term:
        row.update(erase_term_first_quarter=erase_term[0], erase_term_last_quarter=erase_term[-1])
    if manifest.erase_weight is not None:
        row["erase_weight_final"] = manifest.erase_weight
    row.update(erase_seconds=round(erase_seconds, 1), seconds=round(time.time() - start, 1), pid=os.getpid())
    return row


def _finished(run_dir: Path) -> bool:
    from age_explorer.core.runs import MANIFEST, RunManifest

    return (run_dir / MANIFEST).is_file() and RunManifest.read(run_dir, finished=False).status == "done"


def _mean(values: dict[str, float], names: list[str]) -> float:
    return sum(values[n] for n in names) / len(names)


def baseline(images: int, device: str) -> pd.DataFrame:
    """G_0 of every toy concept with the study's measurement: the shipped ESD graph's nodes when they
    were measured with the same model revision and settings (every G_0 there is 1.00), else measured."""
    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.graph.capability import CapabilitySpec, capability
    from age_explorer.core.paths import assets_dir

    bundle = load_bundle("toy", device=device)
    spec = CapabilitySpec(images_per_concept=images).resolved(bundle)
    graph = assets_dir() / "graphs" / "toy-esd"
    meta = json.loads((graph / "graph.json").read_text())
    concept_set = bundle.backend.concept_set()
    if meta["model_revision"] == bundle.revision and meta["capability"] == spec.to_dict() \
            and meta["template"] == concept_set.template:
        nodes = pd.read_csv(graph / "nodes.csv")
        return pd.DataFrame({"concept": nodes.concept, "G0": nodes.G0_top1, "source": str(graph)})
    g0 = capability(bundle, concept_set, bundle.backend.evaluator(bundle, concept_set), spec)
    return pd.DataFrame({"concept": g0.concept, "G0": g0.G_top1, "source": "measured"})


def add_deltas(rows: pd.DataFrame, g0: pd.DataFrame) -> pd.DataFrame:
    """Δ = G_0 − G_after, from the stored G_after (kept raw in the CSV so a new G_0 never rewrites rows)."""
    base = dict(zip(g0.concept, g0.G0))
    out = rows.copy()
    out["G_before"] = out.concept.map(base)
    shape = {c: c.split()[1] for c in base}
    colour = {c: c.split()[0] for c in base}
    out["delta_same_shape"] = [_group_mean(base, shape, c) - g for c, g in zip(out.concept, out.G_after_same_shape)]
    out["delta_same_colour"] = [_group_mean(base, colour, c) - g
                                for c, g in zip(out.concept, out.G_after_same_colour)]
    return out


def _group_mean(base: dict[str, float], key: dict[str, str], concept: str) -> float:
    members = [c for c in base if c != concept and key[c] == key[concept]]
    return sum(base[c] for c in members) / len(members)


def markdown(rows: pd.DataFrame, variants: list[str]) -> str:
    cols = ["G_after", "delta_same_shape", "delta_same_colour", "top1_target_G_after", "neighbour_share",
            "neighbour_chance", "erase_seconds", "seconds"]
    lines = ["| variant | rows | erased (G ≤ 0.10) | G after | Δ same shape | Δ same colour | top-1 target G after "
             "| neighbour picks (chance) | erase s | row s |", "|" + "---|" * 10]
    for v in [v for v in variants if v in set(rows.variant)]:
        r = rows[rows.variant == v]
        m = {c: (r[c].astype(float).mean() if c in r and r[c].notna().any() else math.nan) for c in cols}
        picks = "–" if math.isnan(m["neighbour_share"]) else f"{m['neighbour_share']:.2f} ({m['neighbour_chance']:.2f})"
        top1 = "–" if math.isnan(m["top1_target_G_after"]) else f"{m['top1_target_G_after']:.2f}"
        lines.append(f"| {v} | {len(r)} | {(r.G_after <= 0.10).sum()} | {m['G_after']:.2f} | "
                     f"{m['delta_same_shape']:.3f} | {m['delta_same_colour']:.3f} | {top1} | {picks} | "
                     f"{m['erase_seconds']:.0f} | {m['seconds']:.0f} |")
    lines += ["", "| variant | concept | G after | Δ same shape | Δ same colour | top-1 target (π) | its G after "
              "| its text / output rank | erase term first → last quarter | neighbour picks |", "|" + "---|" * 10]
    for _, r in rows.sort_values(KEY, key=lambda s: s.map({v: i for i, v in enumerate(variants)})
                                 if s.name == "variant" else s).iterrows():
        top1 = "–" if pd.isna(r.get("top1_target")) else f"{r['top1_target']} ({r['top1_pi']:.2f})"
        own = "–" if pd.isna(r.get("top1_target_G_after")) else f"{r['top1_target_G_after']:.2f}"
        ranks = "–" if pd.isna(r.get("top1_text_rank")) else f"{int(r['top1_text_rank'])} / {int(r['top1_output_rank'])}"
        term = "–" if pd.isna(r.get("erase_term_first_quarter")) else \
            f"{r['erase_term_first_quarter']:.4f} → {r['erase_term_last_quarter']:.4f}"
        picks = "–" if pd.isna(r.get("neighbour_share")) else f"{r['neighbour_share']:.2f}"
        lines.append(f"| {r.variant} | {r.concept} | {r.G_after:.2f} | {r.delta_same_shape:.3f} | "
                     f"{r.delta_same_colour:.3f} | {top1} | {own} | {ranks} | {term} | {picks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=False, help="folder of every output (rows.csv, table.md, study.json, runs/)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated; --list shows them")
    parser.add_argument("--concepts", default=",".join(COMPARISON_CONCEPTS), help="comma-separated toy concepts")
    parser.add_argument("--preset", default="toy-fast", help="the AGE variants' preset (ESD uses toy-esd)")
    parser.add_argument("--iterations", type=int, default=None, help="model steps instead of the presets' (a quick check)")
    parser.add_argument("--images", type=int, default=32, help="N images per measured concept (the graphs: 32)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes, one thread each")
    parser.add_argument("--device", default="cpu", help="the workers' device (cpu keeps the graphs' numerics)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds: start no row that would end past "
                        "this, judged by the slowest row so far (0: no limit); a re-run resumes the rest")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (method, preset, options, what) in VARIANTS.items():
            print(f"{name:22s} {what}  [{method} {preset or '--preset'} {options}]")
        return 0
    if not args.out:
        parser.error("--out is required")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from age_explorer.core.files import environment_versions, write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file, g0_file = out / "rows.csv", out / "g0.csv"
    if g0_file.exists():
        g0 = pd.read_csv(g0_file)
    else:
        g0 = baseline(args.images, args.device)
        g0.to_csv(g0_file, index=False)
    known = set(g0.concept)
    bad = [c for c in concepts if c not in known]
    if bad:
        parser.error(f"unknown toy concept(s) {', '.join(bad)}")
    done = pd.read_csv(rows_file) if rows_file.exists() else pd.DataFrame(columns=KEY)
    have = set(zip(done.variant, done.concept))
    # variant-major: with a time limit, the variants listed first are complete on every concept
    todo = [(v, c) for v in variants for c in concepts if (v, c) not in have]
    started = time.time()
    manifest = {"kind": "target-search-study", "args": vars(args), "variants": {v: VARIANTS[v][:3] for v in variants},
                "concepts": concepts, "rows_total": len(variants) * len(concepts), "rows_before": len(have),
                "g0_source": str(g0.source.iloc[0]), "cpu_count": os.cpu_count(), "versions": environment_versions(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(out / "study.json", manifest)
    print(f"{len(todo)} rows to run ({len(have)} already in {rows_file}), {args.workers} worker(s)", flush=True)
    failures = []
    if todo:
        ctx = get_context("spawn")  # fresh interpreters: no torch thread pools inherited from this one
        queue, slowest, n = list(todo), 0.0, 0
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(args.device,)) as pool:
            futures: dict = {}

            def fill() -> None:
                # rows are submitted only as workers free up, so a time limit can hold back the rest
                while queue and len(futures) < args.workers:
                    if args.time_limit and time.time() - started + slowest > args.time_limit:
                        return
                    v, c = queue.pop(0)
                    futures[pool.submit(run_row, v, c, args.preset, args.iterations, args.images, str(out))] = (v, c)

            fill()
            while futures:
                future = next(as_completed(futures))
                v, c = futures.pop(future)
                n += 1
                try:
                    row = future.result()
                except Exception as err:  # one failed row must not lose the others
                    failures.append(f"{v} / {c}: {type(err).__name__}: {err}")
                    print(f"[{n}/{len(todo)}] {v} / {c} FAILED: {err}", flush=True)
                    fill()
                    continue
                slowest = max(slowest, row["seconds"])
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                done.to_csv(rows_file, index=False)
                print(f"[{n}/{len(todo)}] {v:20s} {c:16s} G after {row['G_after']:.2f}  "
                      f"top-1 {row['top1_target']}  erase {row['erase_seconds']:.0f} s  row {row['seconds']:.0f} s  "
                      f"({time.time() - started:.0f} s elapsed)", flush=True)
                fill()
        if queue:
            print(f"time limit: {len(queue)} row(s) not started; run the same command again to add them", flush=True)
    rows = add_deltas(done[[v in variants and c in concepts for v, c in zip(done.variant, done.concept)]], g0)
    table = markdown(rows, variants)
    (out / "table.md").write_text(table)
    print(table)
    manifest.update(rows_done=len(rows), failures=failures, rows_not_started=len(todo) - n if todo else 0,
                    seconds=round(time.time() - started, 1),
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(out / "study.json", manifest)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
