"""Speed on a busy CPU: each workload on idle cores and beside a competing CPU-bound process, old
thread settings against new, in one run; prints a table of seconds per iteration and the ratio to idle.

    python benchmarks/contention_bench.py                                   # all workloads, all competitors
    python benchmarks/contention_bench.py --workload esd --competitor torch2 --repeats 3

Workloads (toy model, each in a fresh process so that the thread settings are chosen as a command
chooses them): ``esd`` (toy-esd: the median model step after the first), ``age`` (toy-fast: the
median loop iteration after the first), ``generate`` (32 images, per image), ``row`` (one ESD graph
row: its erasure and every concept's images, classified).

Settings: ``old`` is torch's default (one OpenMP thread per core, libgomp's default spin-wait), as
every command ran before ``core.cpu_threads``; ``new`` is ``core.cpu_threads.configure()``, what the
CLI, the worker, graph rows and the tests now call before torch loads.

Competitors, started and stopped by this script: ``none`` (idle cores), ``py1`` (a one-thread Python
busy loop), ``torch2`` (a two-thread torch matmul loop with torch's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITORS = {
    "none": None,
    "py1": "while True: pass",
    "torch2": "import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\nwhile True: a @ a",
}
WORKLOADS = ("esd", "age", "generate", "row")


def child(args) -> None:
    """Run one workload in this process and print its JSON line: seconds, units, threads."""
    if args.settings == "new":
        from age_explorer.core.cpu_threads import configure

        configure()
    import torch

    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.erasure import erase, make_config

    bundle = load_bundle("toy", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.child in ("esd", "age"):
            method, preset = ("esd", "toy-esd") if args.child == "esd" else ("age", "toy-fast")
            options = {"target": ""} if method == "esd" else {}
            config = make_config(method, preset, concepts=["red circle"], iterations=args.iterations, **options)
            stamps = []
            erase(bundle, config, Path(tmp) / "run", callbacks=[lambda report: stamps.append(time.perf_counter())])
            # the median step after the first, so that set-up and first-call costs do not count
            seconds, units = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])), 1
        elif args.child == "generate":
            from age_explorer.core.sampling import generate

            start = time.perf_counter()
            generate(bundle, ["a red circle"], list(range(32)))
            seconds, units = time.perf_counter() - start, 32
        else:
            from age_explorer.core.graph.capability import CapabilitySpec, load_evaluator
            from age_explorer.core.graph.concept_sets import load_concept_set
            from age_explorer.core.graph.sweep import RowRecipe, base_nodes, compute_row

            concept_set = load_concept_set("toy", bundle)
            spec = CapabilitySpec(images_per_concept=args.row_images).resolved(bundle)
            evaluator = load_evaluator("toy", bundle, concept_set)
            nodes = base_nodes(bundle, concept_set, evaluator, spec)
            recipe = RowRecipe("esd", "toy-esd", {"target": "", "iterations": args.iterations})
            start = time.perf_counter()
            compute_row(bundle, concept_set, evaluator, spec, recipe, "red circle", nodes)
            seconds, units = time.perf_counter() - start, 1
    print(json.dumps({"seconds": seconds, "units": units, "threads": torch.get_num_threads(),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}), flush=True)


def clean_env() -> dict:
    """This environment without thread settings: each child chooses its own, as a command would."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}


def run_child(workload: str, settings: str, args) -> dict:
    env = clean_env()
    command = [sys.executable, __file__, "--child", workload, "--settings", settings,
               "--iterations", str(args.iterations), "--row-images", str(args.row_images)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_competitor(name: str):
    code = COMPETITORS[name]
    if code is None:
        return None
    process = subprocess.Popen([sys.executable, "-c", code], env=clean_env())
    time.sleep(3 if name.startswith("torch") else 0.5)  # past its imports: competing when we start
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=WORKLOADS, help="default: all")
    parser.add_argument("--competitor", action="append", choices=[c for c in COMPETITORS if c != "none"],
                        help="default: all (idle is always measured)")
    parser.add_argument("--settings", action="append", choices=["old", "new"], help="default: both")
    parser.add_argument("--iterations", type=int, default=16, help="erasure iterations of esd, age and row")
    parser.add_argument("--row-images", type=int, default=8, help="images per concept of a row (graphs: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the table shows the median")
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.settings = args.settings[0]
        child(args)
        return
    workloads = args.workload or list(WORKLOADS)
    competitors = ["none", *(args.competitor or [c for c in COMPETITORS if c != "none"])]
    settings = args.settings or ["old", "new"]
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.iterations} erasure iterations, rows of {args.row_images} images per concept, "
          f"median of {args.repeats}")
    print("| workload | settings | threads | competitor | s / unit | × idle | × old idle |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        unit = {"esd": "step", "age": "iteration", "generate": "image", "row": "row"}[workload]
        old_idle = None
        for setting in settings:
            idle = None
            for competitor in competitors:
                process = start_competitor(competitor)
                try:
                    results = [run_child(workload, setting, args) for _ in range(args.repeats)]
                finally:
                    if process:
                        process.kill()
                        process.wait()
                per_unit = statistics.median(r["seconds"] / r["units"] for r in results)
                idle = per_unit if competitor == "none" else idle
                old_idle = idle if setting == "old" else old_idle
                against_old = f"{per_unit / old_idle:.2f}" if old_idle else "–"
                print(f"| {workload} | {setting} | {results[0]['threads']} | {competitor} | "
                      f"{per_unit:.3f} s / {unit} | {per_unit / idle:.2f} | {against_old} |", flush=True)


if __name__ == "__main__":
    main()
