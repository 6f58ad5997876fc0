"""``age-explorer generate``: images from a model or an erased run."""

from __future__ import annotations

import argparse

from .common import THREADS_HELP, add_model_args, load_model, use_threads

HELP = "generate images with a model or an erased run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 1,4,9")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (model default: toy 25, SD 50)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (model default: toy 3, SD 7.5)")
    parser.add_argument("--size", type=int, default=128, help="view size of small images; raw ones go to raw/")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ...imageio import save_pngs
    from ...sampling import check_sampling_options, generate, parse_seeds

    seeds = parse_seeds(args.seeds)
    if not args.prompt.strip():
        raise ValueError("prompt is empty: give a text such as 'a red circle'")
    check_sampling_options(args.steps, args.guidance)  # before the model loads and the bar starts
    use_threads(args.threads)
    bundle = load_model(args)
    bar = tqdm(total=len(seeds), desc="generate", unit="img")
    images = generate(bundle, [args.prompt], seeds, steps=args.steps, guidance_scale=args.guidance,
                      progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    paths = save_pngs(images, args.out, [f"seed{s:04d}" for s in seeds], view_size=args.size)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0
