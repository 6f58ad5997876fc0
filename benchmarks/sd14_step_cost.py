"""Seconds per loop step of each fine-tuning method on the SD-1.4 architecture (random weights) on this
machine's CPU, from measured parts. One AGE, ESD or AP step there runs a "sample till t" chain of up to 50
guided UNet calls at 64 x 64 latents, minutes of two CPU cores, so timing several whole steps of every
method would take hours; this script counts the calls and times each kind of call instead:

1. calls: each method runs its SD-1.x preset (its batch, its 50-step DDIM schedule, CFG) for ``--steps``
   loop steps on a small SD-1.4-shaped UNet (the GPU check's), and hooks on the UNet record each call's
   batch and whether a backward pass goes through it (its output requires a gradient); the mean per step,
   AGE's and AP's model and π steps apart. Set-up before the loop (CA's anchor images, the candidates'
   probes) is not a step's and is left out, as ``age-explorer bench methods`` leaves it out (with the
   same changes to the presets, ``core.app.bench.sd14_cpu_overrides``);
2. seconds: SD-1.4's own UNet (860 M parameters, float32) at each batch those calls use, a forward without
   gradients and a forward with the cross-attention weights trainable plus its backward (median of
   ``--repeats``, after one warm-up; a batch over 2 with a backward pass is timed at 2 and scaled by the
   batch, as memory allows);
3. the estimate of a step: the sum over its mean calls of their seconds. It leaves out everything but the
   UNet (the optimiser, the text encoder, the scheduler), a few percent of a step at these sizes.

    python benchmarks/sd14_step_cost.py --threads 2
    python benchmarks/sd14_step_cost.py --threads 2 --method esd --steps 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from age_explorer.core.app.bench import sd14_cpu_overrides
from age_explorer.core.erasure import METHODS, erase, get_method, make_config

# benchmarks/: the GPU check's small SD-1.4-shaped UNet in a pipeline of SD-1.4's other parts
from gpu_check import bundle_for  # noqa: E402

# a larger batch with a backward pass is timed as this batch's time per sample: SD-1.4's activations at
# batch 8 with gradients would not fit beside the rest in this machine's 23 GB (the cost is linear in the batch)
MAX_BACKWARD_BATCH = 2


def count_steps(bundle, name: str, steps: int) -> tuple[str | None, dict[str, list[list[tuple[int, bool]]]]]:
    """The UNet calls of each loop step of ``name``'s SD preset: phase -> steps -> [(batch, backward?)]. The
    first reported step is dropped: its calls cannot be told from the set-up's before it."""
    method = get_method(name)
    preset = bundle.backend.default_preset(name)
    config = make_config(name, preset, concepts=["garbage truck"], iterations=steps, **sd14_cpu_overrides(method))
    calls: list[tuple[int, bool]] = []
    per_phase: dict[str, list] = defaultdict(list)
    set_up_done = False

    def after(_module, _args, _kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        calls.append((int(sample.shape[0]), bool(sample.requires_grad)))

    def on_step(report):
        nonlocal set_up_done
        if set_up_done:  # the first report's calls include the set-up's: dropped
            per_phase[getattr(report, "phase", None) or "step"].append(list(calls))
        set_up_done = True
        calls.clear()

    handle = bundle.unet.register_forward_hook(after, with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            erase(bundle, config, Path(tmp) / "run", callbacks=[on_step])
    finally:
        handle.remove()
    return preset, per_phase


def unet_seconds(unet, batch: int, backward: bool, repeats: int, latent: int = 64, context: int = 768) -> float:
    """Median seconds of one SD-1.4 UNet call at ``batch`` (with ``backward``: the cross-attention weights
    trainable, a forward and the backward of its mean)."""
    for n, p in unet.named_parameters():
        p.requires_grad_(backward and "attn2" in n)
    z = torch.randn(batch, 4, latent, latent)
    states = torch.randn(batch, 77, context)
    t = torch.tensor([500] * batch)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        if backward:
            unet(z, t, encoder_hidden_states=states).sample.mean().backward()
            unet.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                unet(z, t, encoder_hidden_states=states)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", default=None, help="a fine-tuning method (repeat; default all)")
    parser.add_argument("--steps", type=int, default=30, help="loop steps counted per method (AGE and AP: model steps)")
    parser.add_argument("--repeats", type=int, default=1, help="timed SD-1.4 UNet calls per kind (after a warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.method or [n for n, m in METHODS.items() if get_method(n).fine_tuned]
    torch.manual_seed(0)
    small = bundle_for(torch.device("cpu"), tiny=True)
    counted = {}
    for name in names:
        try:
            counted[name] = count_steps(small, name, args.steps)
        except (ValueError, RuntimeError) as err:  # e.g. MACE's LoRA stage without a segmenter
            counted[name] = (None, {"refused": str(err).splitlines()[0]})
    kinds = sorted({call for _, phases in counted.values() if "refused" not in phases
                    for steps in phases.values() for calls in steps for call in calls})
    from age_explorer.core.app.bench import SD14_UNET
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SD14_UNET).eval()
    seconds = {}
    for batch, backward in kinds:
        timed = min(batch, MAX_BACKWARD_BATCH) if backward else batch
        key = (timed, backward)
        if key not in seconds:
            seconds[key] = unet_seconds(unet, timed, backward, args.repeats)
        seconds[(batch, backward)] = seconds[key] * batch / timed
    print(f"SD-1.4 UNet (860 M parameters, float32, 64 x 64 latents) on {torch.get_num_threads()} CPU threads, "
          f"median of {args.repeats}:")
    for (batch, backward), s in sorted(seconds.items()):
        scaled = " (scaled from batch 2)" if backward and batch > MAX_BACKWARD_BATCH else ""
        print(f"  batch {batch}, {'forward + backward' if backward else 'forward, no gradients'}: {s:.2f} s{scaled}")
    print("\n| method | preset | phase | steps counted | UNet calls per step: no gradients / with backward "
          "(batches) | estimated s per step |")
    print("|---|---|---|---|---|---|")
    for name, (preset, phases) in counted.items():
        if "refused" in phases:
            print(f"| {name} | {preset} | – | – | refused: {phases['refused']} | – |")
            continue
        for phase, steps in phases.items():
            plain = statistics.mean(sum(1 for _, b in calls if not b) for calls in steps)
            grad = statistics.mean(sum(1 for _, b in calls if b) for calls in steps)
            batches = sorted({c for calls in steps for c in calls})
            estimate = statistics.mean(sum(seconds[c] for c in calls) for calls in steps)
            shown = ", ".join(f"{b}{'+bw' if g else ''}" for b, g in batches)
            print(f"| {name} | {preset} | {phase} | {len(steps)} | {plain:.1f} / {grad:.1f} ({shown}) | {estimate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
