"""Where a concept-graph row's time goes, on the toy model: prints a table.

One row = erase one concept with a preset, then generate N images of every concept with the erased
model and classify them (``core.graph.sweep.compute_row``). This times the three parts apart, for
each thread count given, and says whether the images are the same bytes across thread counts.

    python benchmarks/graph_row_profile.py --threads 1,2
    python benchmarks/graph_row_profile.py --concept "blue square" --preset toy-esd --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(args) -> None:
    """Measure in this process (one thread count) and print one table row."""
    import torch

    torch.set_num_threads(args.threads_one)
    from age_explorer.core.bundle import load_bundle
    from age_explorer.core.erasure import erase, make_config
    from age_explorer.core.graph.capability import CapabilitySpec, load_evaluator
    from age_explorer.core.graph.concept_sets import load_concept_set
    from age_explorer.core.runs import run_weights
    from age_explorer.core.sampling import generate

    bundle = load_bundle("toy")
    concept_set = load_concept_set("toy", bundle)
    spec = CapabilitySpec(images_per_concept=args.images).resolved(bundle)
    evaluator = load_evaluator("toy", bundle, concept_set)
    prompts = [concept_set.template.format(concept=c) for c in concept_set.concepts]
    options = {"target": ""} if args.method in ("esd", "uce") else {}
    config = make_config(args.method, args.preset, concepts=[args.concept], **options)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        erase(bundle, config, Path(tmp) / "run")
        erase_s = time.time() - start
        with run_weights(bundle, Path(tmp) / "run"):
            start = time.time()
            images = generate(bundle, prompts, spec.seeds(), steps=spec.steps, guidance_scale=spec.guidance_scale,
                              eta=spec.eta)
            images_s = time.time() - start
            start = time.time()
            evaluator.topk(images, spec.topk)
            classify_s = time.time() - start
    torch.save(images, args.save)
    print(f"| {args.threads_one} | {erase_s:.1f} | {len(images)} | {images_s:.1f} | {classify_s:.2f} | "
          f"{erase_s + images_s + classify_s:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="red circle")
    parser.add_argument("--method", default="esd")
    parser.add_argument("--preset", default="toy-esd")
    parser.add_argument("--images", type=int, default=32, help="images per concept (the graphs: 32)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    parser.add_argument("--threads-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads_one:
        one(args)
        return
    import torch

    print(f"one {args.method} row ({args.preset}) erasing {args.concept!r} on the toy model, "
          f"{args.images} images per concept")
    print("| threads | erasure s | images | generation s | classifier s | row s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        saved = []
        for threads in [int(t) for t in args.threads.split(",")]:
            path = Path(tmp) / f"images-{threads}.pt"
            # a fresh process per thread count: torch's thread pool is set once per process
            subprocess.run([sys.executable, __file__, "--threads-one", str(threads), "--save", str(path),
                            "--concept", args.concept, "--method", args.method, "--preset", args.preset,
                            "--images", str(args.images)], check=True, cwd=ROOT)
            saved.append((threads, torch.load(path)))
        for (t0, a), (t1, b) in zip(saved, saved[1:]):
            same = "the same bytes" if torch.equal(a, b) else f"not the same bytes (max |diff| {(a - b).abs().max():.1e})"
            print(f"images on {t0} and {t1} thread(s): {same}")


if __name__ == "__main__":
    main()
