"""``age-explorer graph``: build (or complete) a concept graph of spillover Delta(a -> b)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .common import THREADS_HELP, add_model_args, load_model, use_threads
from .config_flags import json_object

HELP = "build (or complete) a concept graph of spillover Delta(a -> b)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...erasure import METHODS

    add_model_args(parser)
    parser.add_argument("--concepts", default="toy",
                        help="toy, netfive, imagenette or a CSV (concept[,group][,imagenet_index])")
    parser.add_argument("--subset", action="append", default=None, help="only these concepts (repeat)")
    parser.add_argument("--template", default=None, help="prompt template with {concept}")
    parser.add_argument("--method", choices=list(METHODS), default="esd", help="erasure method of each row")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--target", default=None, help="ESD/UCE target ('' = empty prompt)")
    parser.add_argument("--search", default=None, help=METHODS["age"].config.field_help()["target_search"])
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--options", type=json_object, default=None, metavar="JSON",
                        help="more fields of the method's config for every row, as `erase` takes them, e.g. "
                             "'{\"ddim_steps\": 4, \"requires_gpu\": false}' (a GPU preset's recipe on the CPU)")
    parser.add_argument("--evaluator", default=None, help="toy, hf:<hub id>, clip:<hub id>, torchvision-resnet50")
    parser.add_argument("--images-per-concept", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of the generated images")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=run)


def row_recipe(args: argparse.Namespace, bundle):
    from ...graph.sweep import RowRecipe

    options = dict(args.options or {})
    if args.target is not None:
        options["target"] = args.target
    if args.search:
        options["target_search"] = args.search
    if args.iterations:
        options["iterations"] = args.iterations
    preset = args.preset or bundle.backend.default_preset(args.method)
    return RowRecipe(args.method, preset, options)


def run(args: argparse.Namespace) -> int:
    from ...graph.analysis import similarity_measures, summary
    from ...graph.capability import CapabilitySpec
    from ...graph.concept_sets import load_concept_set
    from ...graph.sweep import build_graph

    use_threads(args.threads)
    bundle = load_model(args)
    concept_set = load_concept_set(args.concepts, bundle, args.template)
    if args.subset:
        concept_set = concept_set.subset(args.subset)
    spec = CapabilitySpec(images_per_concept=args.images_per_concept, seed=args.seed, steps=args.steps)
    recipe = row_recipe(args, bundle)
    recipe.config(concept_set.concepts[0])  # a bad recipe is refused before any image is made
    out = Path(args.out)
    fresh = not out.exists() or not any(out.iterdir())
    start = time.time()
    try:
        store = build_graph(bundle, concept_set, args.out, recipe, spec, args.evaluator,
                            backend=args.backend, ray_address=args.ray_address)
    except Exception:
        # a graph this command began that failed before its first row leaves no half-written folder
        # (a Ctrl-C keeps it: the build resumes from what it has)
        if fresh and out.is_dir() and not _has_rows(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    meta = store.meta()
    seconds = meta.get("row_seconds", {})
    print(f"\n{len(store.rows_done())} rows in {args.out}; this run {time.time() - start:.0f} s; "
          f"G_0 {meta.get('baseline_seconds', 0):.0f} s")
    if seconds:
        print("seconds per row: " + ", ".join(f"{c} {s:.0f}" for c, s in seconds.items()))
        print(f"mean {sum(seconds.values()) / len(seconds):.1f} s per row")
    print(summary(store, concept_set, similarity_measures(bundle, concept_set)))
    return 0


def _has_rows(out: Path) -> bool:
    from ...graph.store import GraphStore

    try:
        return bool(GraphStore(out).rows_done())
    except Exception:  # noqa: BLE001  a damaged edges file: keep the folder for the user to look at
        return True
