"""UNet forward calls per AGE step, from a counter: how many calls a model step and a π step make, and
the batch of each, inside the "sample till t" chain and outside it; the reference-style loop beside them.

    python benchmarks/unet_calls.py                      # toy presets, and the imagenette recipe on a tiny SD UNet
    python benchmarks/unet_calls.py --out calls.json     # the same, and the rows as JSON

A forward pre-hook on the UNet counts every call, frozen ones included (``functional_call`` and a
deep copy of the UNet run the same hooks). A call is in the chain when it comes from a guided DDIM step
of the erasure loop. "Trajectories per chain call" is a chain call's batch over CFG's 2 x the config's
batch: 2 when the erased concept's and the target's chains advance in one batched call, 1 when they run
one after the other, 3 while the π step's chain runs beside them (``batch_pi_chain``). "Sequential
chains" counts the chains that start from z_T one after another in a step (a chain starts at the schedule's
first timestep).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.device import resolve_device

# benchmarks/: the GPU check's small SD-1.4-shaped UNet
from gpu_check import bundle_for  # noqa: E402


class CallCounter:
    """Every UNet call's batch and whether it came from a guided DDIM step, since the last :meth:`take`."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []
        self.ddim_steps = self.chains = 0
        self.in_chain = False

    def take(self) -> tuple[list[tuple[int, bool]], int, int]:
        """The calls, DDIM steps and chain starts since the last take."""
        taken = self.calls, self.ddim_steps, self.chains
        self.calls, self.ddim_steps, self.chains = [], 0, 0
        return taken

    @contextmanager
    def attached(self, unet: torch.nn.Module, modules: list):
        """Count ``unet``'s calls, and mark the guided DDIM steps that ``modules`` import."""
        def count(_module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.calls.append((int(sample.shape[0]), self.in_chain))

        def chain_step(step):
            def wrapper(scheduler, predict, z, t, *args, **kwargs):
                self.ddim_steps += 1
                self.chains += int(t == scheduler.timesteps[0])
                self.in_chain = True
                try:
                    return step(scheduler, predict, z, t, *args, **kwargs)
                finally:
                    self.in_chain = False
            return wrapper

        handle = unet.register_forward_pre_hook(count, with_kwargs=True)
        originals = [(m, m.guided_ddim_step) for m in modules]
        for module, step in originals:
            module.guided_ddim_step = chain_step(step)
        try:
            yield self
        finally:
            handle.remove()
            for module, step in originals:
                module.guided_ddim_step = step


def step_row(setting: str, phase: str, steps: list[tuple[list, int, int]], batch: int) -> dict:
    """One table row: the mean counts of ``steps`` (each: the calls, DDIM steps and chain starts of one
    loop step, or of several alike)."""
    chain = [[b for b, c in calls if c] for calls, _, _ in steps]
    other = [[b for b, c in calls if not c] for calls, _, _ in steps]
    chain_batches = sorted({b for calls in chain for b in calls})
    sampled = [starts for _, n, starts in steps if n]
    return {"setting": setting, "phase": phase, "steps": len(steps),
            "ddim_steps": statistics.mean(n for _, n, _ in steps),
            "sequential_chains": statistics.mean(sampled) if sampled else 0,
            "chain_calls": statistics.mean(len(c) for c in chain),
            "chain_calls_per_ddim_step": (sum(len(c) for c in chain) / max(1, sum(n for _, n, _ in steps))),
            "chain_batches": chain_batches,
            "trajectories_per_chain_call": sorted({b // (2 * batch) for b in chain_batches}),
            "other_calls": statistics.mean(len(o) for o in other),
            "other_batches": sorted({b for o in other for b in o})}


def engine_rows(setting: str, bundle, preset: str, concept: str, model_steps: int, **overrides) -> list[dict]:
    """Count the calls of each step of an AGE run (after its construction's probes)."""
    from age_explorer.core.erasure import loop
    from age_explorer.core.erasure.age import AGERun
    from age_explorer.core.erasure.config import make_config

    config = make_config("age", preset, concepts=[concept], iterations=model_steps, **overrides)
    counter = CallCounter()
    per_phase: dict[str, list] = defaultdict(list)
    with counter.attached(bundle.unet, [loop]), tempfile.TemporaryDirectory() as tmp:
        run = AGERun(bundle, config, tmp, callbacks=[lambda report: per_phase[report.phase].append(counter.take())])
        counter.take()
        try:
            run.run()
        finally:
            run.predictor.restore()
    return [step_row(setting, {"theta": "model step", "pi": "π step"}[phase], steps, config.batch_size)
            for phase, steps in per_phase.items()]


def reference_row(bundle, iterations: int) -> dict:
    """The reference-style loop (core.app.bench): every iteration alike, model or π step."""
    from age_explorer.core.app import bench

    counter = CallCounter()
    with counter.attached(bundle.unet, [bench]):
        bench.reference_style_seconds(bundle, iterations)
        calls, steps, starts = counter.take()
    n = iterations + 2  # its two warm-up iterations are counted too
    row = step_row("reference-style loop, tiny SD", "iteration", [(calls, steps, starts)], 1)
    # the counts of all iterations together, per iteration
    for key in ("ddim_steps", "sequential_chains", "chain_calls", "other_calls"):
        row[key] /= n
    row["steps"] = n
    return row


def measure(device: torch.device, model_steps: int) -> list[dict]:
    toy = load_bundle("toy", device=device)
    rows = engine_rows("toy", toy, "toy", "red circle", model_steps)
    rows += engine_rows("toy-fast", toy, "toy-fast", "red circle", model_steps)
    rows += engine_rows("toy, batch_pi_chain", toy, "toy", "red circle", model_steps, batch_pi_chain=True)
    tiny_sd = bundle_for(device, tiny=True)
    candidates = [f"candidate {i}" for i in range(20)]
    rows += engine_rows("imagenette, tiny SD", tiny_sd, "imagenette", "garbage truck", model_steps,
                        candidates=candidates, k_closest=20, num_centers=20, requires_gpu=False)
    rows += engine_rows("imagenette, tiny SD, batch_pi_chain", tiny_sd, "imagenette", "garbage truck", model_steps,
                        candidates=candidates, k_closest=20, num_centers=20, requires_gpu=False, batch_pi_chain=True)
    rows.append(reference_row(tiny_sd, model_steps))
    return rows


def print_table(rows: list[dict]) -> None:
    head = ["setting", "phase", "steps", "DDIM steps", "sequential chains", "chain calls", "calls/DDIM step",
            "chain batch", "trajectories/call", "other calls", "other batches"]
    print(" | ".join(head))
    print("|".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r["setting"], r["phase"], str(r["steps"]), f"{r['ddim_steps']:.1f}",
                          f"{r['sequential_chains']:.2f}", f"{r['chain_calls']:.1f}",
                          f"{r['chain_calls_per_ddim_step']:.2f}", str(r["chain_batches"]),
                          str(r["trajectories_per_chain_call"]), f"{r['other_calls']:.1f}", str(r["other_batches"])]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-steps", type=int, default=4, help="model steps (and as many π steps) per setting")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(resolve_device(args.device), args.model_steps)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
