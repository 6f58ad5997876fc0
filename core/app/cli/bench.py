"""``age-explorer bench``: benchmarks that print tables (erasure loop, whole presets, attacks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import THREADS_HELP, use_threads

HELP = "benchmarks that print tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_sub = parser.add_subparsers(dest="bench_command", required=True)
    be = bench_sub.add_parser("erase", help="engine vs reference-style AGE loop on the same device")
    be.add_argument("--arch", choices=["sd14", "toy"], default="sd14", help="sd14: random SD-1.4 UNet")
    be.add_argument("--device", default="auto")
    be.add_argument("--iterations", type=int, default=10)
    be.add_argument("--candidates", type=int, default=100)
    be.add_argument("--precision", action="append", default=None, help="fp32 and/or bf16 (default both)")
    be.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    be.set_defaults(func=run_erase)
    bp = bench_sub.add_parser("presets", help="seconds of whole erasures with presets (e.g. toy against toy-fast)")
    bp.add_argument("--model", default="toy")
    bp.add_argument("--device", default="auto")
    bp.add_argument("--preset", action="append", required=True, metavar="PRESET[+FIELD=VALUE...]", help=(
        "preset to time (repeat); config fields over it after '+', values in JSON, e.g. "
        "toy+xt_source=pool or toy+ddim_steps=5+share_draws=true, to time a shortcut against its recipe"))
    bp.add_argument("--concept", action="append", required=True, help="concept to erase (repeat)")
    bp.add_argument("--iterations", type=int, default=None, help="override the presets' model steps (smoke runs)")
    bp.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    bp.set_defaults(func=run_presets)
    bm = bench_sub.add_parser("methods", help="seconds of one erasure per method (toy: its toy preset, whole; "
                              "sd14: random SD-1.4 UNet, seconds per loop step of its SD-1.x recipe)")
    bm.add_argument("--arch", choices=["toy", "sd14"], default="toy")
    bm.add_argument("--device", default="auto")
    bm.add_argument("--method", action="append", default=None, help="method to time (repeat; default: every one)")
    bm.add_argument("--concept", default="red circle")
    bm.add_argument("--steps", type=int, default=3, help="sd14: model steps of a fine-tuning method")
    bm.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    bm.set_defaults(func=run_methods)
    bat = bench_sub.add_parser("attack", help="seconds of each recovery attack (toy) or per step (SD-1.4 arch)")
    bat.add_argument("--arch", choices=["toy", "sd14"], default="toy", help="sd14: random SD-1.4 UNet and text encoder")
    bat.add_argument("--device", default="cpu")
    bat.add_argument("--concept", default="red circle", help="toy: the concept erased (ESD-'', toy-esd) and attacked")
    bat.add_argument("--steps", type=int, default=None, help="optimisation steps (toy: the defaults; sd14: 3)")
    bat.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    bat.set_defaults(func=run_attack)


def run_erase(args: argparse.Namespace) -> int:
    import torch

    from ...bundle import load_bundle
    from ...device import resolve_device
    from ..bench import engine_seconds, random_sd14_bundle, reference_style_seconds

    device = resolve_device(args.device)
    use_threads(args.threads)
    if args.arch == "sd14":
        bundle = random_sd14_bundle(device)
        overrides = {}
    else:
        bundle = load_bundle("toy", device=device)
        overrides = {"loss_space": "eps"}
    n = args.iterations
    print(f"AGE iteration cost, {args.arch} UNet on {device} ({torch.get_num_threads()} CPU threads), "
          f"{n} timed iterations each, paper recipe (DDIM 50 'till t', batch 1)")
    args.precision = args.precision or ["fp32", "bf16"]
    ref = reference_style_seconds(bundle, n, candidates=args.candidates, loss_space=overrides.get("loss_space", "x0"))
    rows = [("reference-style loop (fp32, sequential)", ref, float("nan"))]
    for precision in args.precision:
        sec, info = engine_seconds(bundle, n, precision, candidates=args.candidates, **overrides)
        rows.append((f"engine ({precision})", sec, info["peak_gib"]))
    print(f"{'loop':42s} {'s/iter':>8s} {'2000 iters':>11s} {'speed-up':>9s} {'peak GiB':>9s}")
    for name, sec, peak in rows:
        print(f"{name:42s} {sec:8.3f} {sec * 2000 / 60:9.1f} m {ref / sec:8.2f}x {peak:9.2f}")
    return 0


def preset_spec(spec: str) -> tuple[str, dict]:
    """``toy`` or ``toy+xt_source=pool+ddim_steps=5``: a preset and config fields over it (a value is
    read as JSON, else as text)."""
    import json

    from ...erasure import PRESETS

    preset, *pairs = spec.split("+")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    options = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not (sep and field.strip()):
            raise ValueError(f"--preset {spec!r}: write its fields as PRESET+FIELD=VALUE, e.g. toy+xt_source=pool")
        try:
            options[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[field.strip()] = value
    return preset, options


def run_presets(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from ...bundle import load_bundle
    from ...erasure import PRESETS, make_config
    from ..bench import preset_seconds

    overrides = {"iterations": args.iterations} if args.iterations else {}
    specs = {spec: preset_spec(spec) for spec in args.preset}
    for preset, options in specs.values():  # every spec checked before the model loads
        make_config(PRESETS[preset][0], preset, concepts=args.concept, **{**options, **overrides})
    use_threads(args.threads)
    bundle = load_bundle(args.model, device=args.device)
    width = max(10, *(len(spec) for spec in specs))
    print(f"whole erasures on {bundle.device} ({torch.get_num_threads()} CPU threads), model {args.model}")
    print(f"{'preset':{width}s} {'concept':16s} {'loop steps':>10s} {'seconds':>8s} {'peak RSS GiB':>13s}")
    means = {}
    for spec, (preset, options) in specs.items():
        for concept in args.concept:
            with tempfile.TemporaryDirectory() as tmp:
                row = preset_seconds(bundle, preset, concept, Path(tmp) / "run", **{**options, **overrides})
            means.setdefault(spec, []).append(row["seconds"])
            print(f"{spec:{width}s} {concept:16s} {row['steps']:10d} {row['seconds']:8.1f} {row['peak_rss_gib']:13.2f}")
    for spec, seconds in means.items():
        print(f"{spec:{width}s} {'mean':16s} {'':10s} {sum(seconds) / len(seconds):8.1f}")
    return 0


def run_attack(args: argparse.Namespace) -> int:
    from ..attack_bench import print_table, sd14_step_seconds, toy_attack_seconds

    use_threads(args.threads)
    if args.arch == "sd14":
        print_table(sd14_step_seconds(args.device, args.steps), f"SD-1.4 architecture, random weights, {args.device}")
    else:
        print_table(toy_attack_seconds(args.concept, args.steps), "toy world, CPU")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    import tempfile

    from ...bundle import load_bundle
    from ...device import resolve_device
    from ...erasure import METHODS, get_method
    from ..bench import method_seconds, random_sd14_bundle, sd14_cpu_overrides

    use_threads(args.threads)
    device = resolve_device(args.device)
    methods = args.method or list(METHODS)
    for name in methods:
        get_method(name)
    bundle = random_sd14_bundle(device) if args.arch == "sd14" else load_bundle("toy", device=device)
    print(f"{'method':10s} {'preset':14s} {'seconds':>9s} {'steps':>6s} {'s/step':>9s}  "
          f"({bundle.source}, {device}; s/step: loop steps after the first, AGE and AP alternate model and pi steps)")
    for name in methods:
        method = get_method(name)
        preset = bundle.backend.default_preset(name)
        overrides = {}
        if args.arch == "sd14":
            overrides = sd14_cpu_overrides(method)
            if method.fine_tuned:
                overrides["iterations"] = args.steps
        with tempfile.TemporaryDirectory() as tmp:
            row = method_seconds(bundle, name, preset, args.concept, Path(tmp) / "run", **overrides)
        if "refused" in row:
            print(f"{name:10s} {str(preset):14s} refused: {row['refused']}")
            continue
        per_step = row["seconds_per_step"]
        per_step = "-" if per_step != per_step else f"{per_step:.2f}"  # NaN: one step, or closed form
        print(f"{name:10s} {str(preset):14s} {row['seconds']:9.1f} {row['steps']:6d} {per_step:>9s}")
    return 0
