"""Flags and steps that several commands share: the model to load, CPU threads."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy",
                        help="'toy' (embedded), a toy model folder, a diffusers SD 1.x/2.x folder or a Hub id")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 (GPU only)")
    parser.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")


def load_model(args):
    """The bundle that ``add_model_args``' flags name."""
    from ...bundle import load_bundle

    return load_bundle(args.model, device=args.device, dtype=args.dtype,
                       local_files_only=True if args.offline else None)


THREADS_HELP = ("CPU threads (default: the usable cores minus those other processes keep busy at start; "
                "see docs/contention.md)")


def use_threads(threads: int | None) -> None:
    """Set torch's CPU thread count: ``--threads`` when given, else the rule of ``core.cpu_threads``."""
    from ...cpu_threads import configure

    configure(threads)
