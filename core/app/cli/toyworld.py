"""``age-explorer toyworld``: train, benchmark and compare erasures on the embedded toy world."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import THREADS_HELP, use_threads
from .config_flags import add_config_flags, given_values

HELP = "the embedded toy world: train or benchmark its model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...toyworld.config import ToyTrainConfig

    toy_sub = parser.add_subparsers(dest="toy_command", required=True)
    t = toy_sub.add_parser("train", help="train the toy text-to-image model and its classifier")
    t.add_argument("--out", required=True)
    t.add_argument("--concepts", default=None, help="concepts.json (default: the shipped one)")
    t.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    t.set_defaults(func=run_train, config_fields=add_config_flags(t, {"toy model": ToyTrainConfig}))

    b = toy_sub.add_parser("bench", help="accuracy per concept, image statistics and speed of the toy model")
    b.add_argument("--model", default="toy")
    b.add_argument("--images-per-concept", type=int, default=16)
    b.add_argument("--seed", type=int, default=1000)
    b.add_argument("--guidance", type=float, default=None)
    b.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    b.add_argument("--skip-speed", action="store_true")
    b.add_argument("--grid-out", default=None, help="write a render-vs-sample grid PNG here")
    b.set_defaults(func=run_bench)

    c = toy_sub.add_parser("compare", help="AGE vs ESD-'' spillover on related concepts (the paper's claim)")
    c.add_argument("--model", default="toy")
    c.add_argument("--concept", action="append", default=None, help="erased concept (repeat; default: 5)")
    c.add_argument("--variant", action="append", default=None,
                   help="a variant (repeat), e.g. \"ESD ''\" or \"AGE (paper search)\"; an unknown name lists them all "
                        "(default: ESD '', the paper's and the damage search)")
    c.add_argument("--images-per-concept", type=int, default=32)
    c.add_argument("--seed", type=int, default=1000)
    c.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    c.add_argument("--out", required=True, help="folder for runs and results (resumes when re-run)")
    c.set_defaults(func=run_compare)


def run_train(args: argparse.Namespace) -> int:
    from ...paths import toy_model_dir
    from ...toyworld.concepts import ToyWorld
    from ...toyworld.config import ToyTrainConfig

    concepts = Path(args.concepts) if args.concepts else toy_model_dir() / "concepts.json"
    # a bad file or flag is refused before torch and diffusers load (seconds)
    ToyWorld.from_json(concepts)
    cfg = ToyTrainConfig(**given_values(args, args.config_fields))
    from ...toyworld.train import train_toy_model

    use_threads(args.threads)
    start = time.time()
    out = train_toy_model(args.out, concepts, cfg)
    print(f"toy model written to {out} in {time.time() - start:.0f} s")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from ...bundle import load_bundle
    from ..experiments import toy_quality as evaluate

    use_threads(args.threads)
    start = time.perf_counter()
    bundle = load_bundle(args.model, device="cpu")
    load_seconds = time.perf_counter() - start
    table, samples = evaluate.concept_accuracy(bundle, args.images_per_concept, seed=args.seed,
                                               guidance_scale=args.guidance)
    import pandas as pd

    with pd.option_context("display.width", 120, "display.max_rows", 100):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nmean accuracy {table.accuracy.mean():.3f}   min {table.accuracy.min():.3f} "
          f"({table.loc[table.accuracy.idxmin(), 'concept']})   "
          f"shape right {table.shape_right.mean():.3f}   colour right {table.colour_right.mean():.3f}")
    renders = evaluate.render_reference(bundle, args.images_per_concept)
    print("\nimage statistics        renders   samples")
    print(f"high-frequency energy   {evaluate.high_frequency_energy(renders):.5f}   "
          f"{evaluate.high_frequency_energy(samples):.5f}")
    print(f"background saturation   {evaluate.background_saturation(renders):.3f}     "
          f"{evaluate.background_saturation(samples):.3f}")
    if not args.skip_speed:
        seconds = evaluate.timed_generation(bundle, 4)
        print(f"\nspeed ({torch.get_num_threads()} threads)")
        print(f"model load              {load_seconds:.2f} s")
        print(f"4 images x 25 concepts  {seconds:.1f} s")
    if args.grid_out:
        from ...imageio import grid, to_pil

        n = args.images_per_concept
        pick = torch.arange(25) * n  # first image of each concept
        side = torch.cat([grid(renders[pick], 5), torch.ones(3, 160, 8), grid(samples[pick], 5)], dim=2)
        to_pil(side).resize((side.shape[2] * 3, side.shape[1] * 3), 0).save(args.grid_out)
        print(f"\nrender grid (left) and sample grid (right) written to {args.grid_out}")
    ok = table.accuracy.mean() >= 0.9 and table.accuracy.min() >= 0.6
    print(f"\ntarget mean >= 0.90 and every concept >= 0.60: {'met' if ok else 'NOT met'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    import pandas as pd
    from ...bundle import load_bundle
    from ...graph.capability import CapabilitySpec
    from ..experiments.toy_compare import compare, summary

    use_threads(args.threads)
    bundle = load_bundle(args.model, device="cpu")
    spec = CapabilitySpec(images_per_concept=args.images_per_concept, seed=args.seed)
    results = compare(bundle, args.out, concepts=args.concept, variants=args.variant, spec=spec)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nper concept")
        print(results.drop(columns=["top_targets"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("\nmean over erased concepts (Delta = G before - G after, top-1)")
        print(summary(results).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0
