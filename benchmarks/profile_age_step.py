"""Where an AGE iteration's time goes: "sample till t", frozen passes, trainable passes, the rest.

Prints one row per setting (precision, TF32 matmuls on or off) with seconds per loop iteration and
the share of each part. Parts are timed with a device synchronisation around each call, so the
total is a little above `age-explorer bench erase`'s.

    python benchmarks/profile_age_step.py --arch sd14 --device cuda --iterations 10
    python benchmarks/profile_age_step.py --arch toy --device cpu --iterations 4
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from age_explorer.core.app.bench import engine_seconds, random_sd14_bundle
from age_explorer.core.bundle import load_bundle
from age_explorer.core.device import resolve_device
from age_explorer.core.erasure.loop import FineTuneRun, Predictor

PARTS = {"sample till t": (FineTuneRun, "sample_till"), "frozen passes": (Predictor, "frozen_with_grad"),
         "trainable passes": (Predictor, "trainable")}


def timed(spent: dict, name: str, fn, device: torch.device, active: list):
    """Time the outermost timed call only: "sample till t" runs trainable passes of its own."""
    def wrapper(*args, **kwargs):
        if active:
            return fn(*args, **kwargs)
        active.append(name)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent[name] += time.perf_counter() - start
        finally:
            active.pop()
        return out
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd14", "toy"], default="sd14")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    device = resolve_device(args.device)
    bundle = random_sd14_bundle(device) if args.arch == "sd14" else load_bundle("toy", device=device)
    overrides = {} if args.arch == "sd14" else {"loss_space": "eps"}
    settings = [("fp32", False), ("fp32", True), ("bf16", False)] if device.type == "cuda" else [("fp32", False)]
    print(f"{args.arch} UNet on {device}, {args.iterations} timed loop iterations per setting")
    print(f"{'precision':10s} {'tf32':5s} {'s/iter':>7s} " + " ".join(f"{p:>17s}" for p in PARTS) + f" {'rest':>7s}")
    for precision, tf32 in settings:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        spent: dict[str, float] = defaultdict(float)
        active: list[str] = []
        originals = {name: getattr(cls, attr) for name, (cls, attr) in PARTS.items()}
        for name, (cls, attr) in PARTS.items():
            setattr(cls, attr, timed(spent, name, originals[name], device, active))
        try:
            start = time.perf_counter()
            per_iter, _ = engine_seconds(bundle, args.iterations, precision, **dict(overrides))
            wall = time.perf_counter() - start
        finally:
            for name, (cls, attr) in PARTS.items():
                setattr(cls, attr, originals[name])
        shares = {name: spent[name] / wall for name in PARTS}
        rest = max(0.0, 1 - sum(shares.values()))
        print(f"{precision:10s} {str(tf32):5s} {per_iter:7.3f} " + " ".join(f"{shares[p]:16.0%} " for p in PARTS)
              + f" {rest:6.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
