"""``age-explorer evaluate``: the paper's evaluation of a run or model (ESR/PSR, NudeNet nudity, CLIP
score), or one table of several results with ``--compare``."""

from __future__ import annotations

import argparse

from .common import THREADS_HELP, use_threads
from .config_flags import add_config_flags, given_values

HELP = "the paper's evaluation of a run or model: ESR/PSR, NudeNet nudity, CLIP score, LPIPS, FID; --compare prints several"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...evaluation.config import EvaluationConfig

    parser.add_argument("target", nargs="+", help="a run folder or model (several result folders with --compare)")
    parser.add_argument("--compare", action="store_true", help="print one table of existing results")
    parser.set_defaults(config_fields=add_config_flags(parser, {"evaluate": EvaluationConfig}))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")
    parser.add_argument("--save-images", action="store_true", help="also write every image under OUT/images/")
    parser.add_argument("--out", default=None, help="result folder (default: RUN/evaluation)")
    parser.add_argument("--force", action="store_true", help="replace an existing result folder")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ...evaluation import EvaluationConfig
    from ...evaluation.results import compare_table

    if args.compare:
        table = compare_table(args.target)
        print("rates in %: ESR = erased classes not recognised, PSR = kept classes recognised (top-1 / top-5)")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep="-"))
        return 0
    if len(args.target) != 1:
        raise ValueError("evaluate one model or run at a time, or compare result folders with --compare")
    from ..evaluate import evaluate

    config = EvaluationConfig(**given_values(args, args.config_fields))  # bad options fail before any model loads
    use_threads(args.threads)
    bars: dict = {}

    def show(stage, done, total):
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage))
        bar.update(done - bar.n)

    try:
        result = evaluate(args.target[0], config, out=args.out, device=args.device, dtype=args.dtype,
                          local_files_only=True if args.offline else None, force=args.force,
                          save_images=args.save_images, progress=show, log=tqdm.write)
    finally:
        for bar in bars.values():
            bar.close()
    for name, value in result.results["metrics"].items():
        print(f"{name}: {100 * value:.1f} %" if "ESR" in name or "PSR" in name or name.endswith("rate")
              else f"{name}: {value:g}")
    for name, why in result.results["unavailable"].items():
        print(f"{name}: {why}")
    print(f"results -> {result.out_dir}")
    return 0
