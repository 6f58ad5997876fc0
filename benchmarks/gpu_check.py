"""The GPU check: the figures docs/erasure.md reports for a CUDA machine, on random weights of the SD-1.4
architecture (nothing to download), written to one JSON as they come.

    python benchmarks/gpu_check.py --out gpu_check.json                 # on a CUDA GPU, within 8 minutes (below)
    python benchmarks/gpu_check.py --parts shortcuts,sdxl_esd,imagenette --out g2.json  # the parts it skips
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/g.json  # the same steps on a small UNet (a test)

Parts, in this order (the speed targets' figures first), each timed on its own and recorded even when a
later one fails:
1. ``bench``: the engine's AGE iteration against the reference-style loop (fp32, TF32, bf16), side by side;
2. ``compiled_chain``: the engine's AGE iteration (bf16 on a GPU) with the eager "sample till t" chain, the
   eager chain on a channels-last UNet, the compiled chain (``compile_chain``: CUDA graphs on a GPU), the
   compiled chain with ``ddim_steps`` 25 and with ``ddim_steps`` 25 and ``batch_pi_chain`` (the shortcuts whose
   toy rows pass the equivalence tests), with seconds per model step at the expected "till t" draw, the
   estimate for 1000, peak memory, the speed-up over the eager row and each row's wall time (the first
   compiled row's includes the compilation);
3. ``graph_row``: one SD-1.4 graph row: an ``esd-x`` erasure for ``--row-erase-iterations`` steps, then the
   25 ``netfive`` concepts x ``--row-images`` images generated in batches of 100 and classified by a
   ResNet-50 (random weights), bf16 autocast on a GPU, with the estimate of a whole row at N = 32; then the
   esd-x iteration with the eager chain (before) and the compiled one (after) at the expected draw, each
   with its estimate of a whole row;
4. ``shortcuts``: the same eager iteration with each shortcut of docs/erasure.md ("Each shortcut on its
   own": ``ddim_steps`` 25, ``share_draws``, ``batch_pi_chain``, ``xt_source`` pool) beside the unchanged
   recipe, with seconds per model step at the expected "till t" draw, the estimate for 1000 and the speed-up;
5. ``sdxl_esd``: an ESD erasure (preset ``sdxl-esd-x``) on SDXL 1.0's UNet architecture, random weights, with
   the eager chain (before) and the compiled one (after), seconds an iteration at the expected draw;
6. ``imagenette``: the paper's AGE recipe (preset ``imagenette``) as a whole erasure for ``--age-iterations``
   model steps (and as many pi steps), with wall time, seconds per model step, the estimate for the
   recipe's 1000 and the peak GPU memory;
7. ``evaluate``: ``evaluate`` (NudeNet nudity, CLIP score) on a handful of images of a random
   SD-1.4-architecture pipeline saved as a folder.

Each part's time at the default sizes, estimated from the H200 figures in docs/erasure.md (``PART_MINUTES``):
bench 1 min, compiled_chain about 3.2 min (most of it compiling the chain's shapes), graph_row 2.7 min (1.2
of it compiling ESD's chain), shortcuts 1.2 min, sdxl_esd about 3 min (most of it compiling SDXL's chain),
imagenette 1.3 min, evaluate 0.5 min: about 12.9 minutes for all seven. The run keeps to a budget
(``--budget-min``, 8 on a GPU, none with ``--tiny``): a part whose estimate no longer fits in what is left is
recorded as skipped, with the reason, and not started. By the estimates the first three take 6.9 min and, of
the rest, only evaluate fits; a second call, ``--parts shortcuts,sdxl_esd,imagenette``, takes the other three
(about 5.5 min). Each part is written as it ends, so a run stopped at a time limit keeps every part that
finished.

The pipelines are diffusers' real classes at the published UNet/VAE sizes with thin text encoders
(``age_explorer.core.app.random_pipelines``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from age_explorer.core.app.bench import (SD14_UNET, engine_seconds, esd_seconds, random_sd14_bundle,
                                         reference_style_seconds)
from age_explorer.core.app.random_pipelines import SD_VAE, SDXL_UNET, random_sd14_pipeline, random_sdxl_pipeline
from age_explorer.core.device import resolve_device

TINY_UNET = dict(SD14_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                 attention_head_dim=4)
# the VAE's 8x upsampling with few channels: on a CPU the published VAE's decoding is half of a tiny row
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)


def sd14_parts(tiny: bool) -> dict:
    """The ``unet`` and ``vae`` configs of ``random_sd14_pipeline``: the published ones, or small ones."""
    return dict(unet=TINY_UNET, vae=TINY_VAE) if tiny else {}


def bundle_for(device: torch.device, tiny: bool):
    """Random SD-1.4 weights; ``tiny``: a small UNet and VAE in a pipeline of SD-1.4's other parts (SD-1.4's
    own UNet is not built: half a minute of CPU)."""
    if not tiny:
        return random_sd14_bundle(device)
    from age_explorer.core.backends.stable_diffusion import StableDiffusionBackend

    with tempfile.TemporaryDirectory() as tmp:
        pipe = random_sd14_pipeline(Path(tmp), device, **sd14_parts(tiny))
    return StableDiffusionBackend.bundle_from_pipeline(pipe, "random SD-1.4 architecture, small UNet and VAE", device,
                                                       torch.float32, None)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def part_bench(device, tiny, iterations) -> dict:
    bundle = bundle_for(device, tiny)
    rows = {"reference_fp32": {"s_per_iter": reference_style_seconds(bundle, iterations)}}
    for name, precision, tf32 in [("engine_fp32", "fp32", False), ("engine_tf32", "fp32", True),
                                  ("engine_bf16", "bf16", False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        sec, info = engine_seconds(bundle, iterations, precision)
        rows[name] = {"s_per_iter": sec, "peak_gib": info["peak_gib"],
                      "speedup": rows["reference_fp32"]["s_per_iter"] / sec}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return {"iterations_timed": iterations, "rows": rows}


# the compiled chain with the shortcuts whose toy rows pass the equivalence tests (docs/erasure.md), alone and
# together: the candidates for the 10-minute target with an equivalent shortcut
CHAIN_ROWS = [("eager", {}), ("eager_channels_last", {"channels_last": True}), ("compiled", {"compile_chain": True}),
              ("compiled_ddim_steps_25", {"compile_chain": True, "ddim_steps": 25}),
              ("compiled_ddim_steps_25_batch_pi_chain",
               {"compile_chain": True, "ddim_steps": 25, "batch_pi_chain": True})]


def part_compiled_chain(device, tiny, iterations) -> dict:
    """The engine's AGE iteration (paper recipe, 100 candidates, bf16 on a GPU) with the eager chain, the eager
    chain on a channels-last UNet and the compiled chain, alone, with ``ddim_steps`` 25 and with ``ddim_steps``
    25 and ``batch_pi_chain``, each at the expected "till t" draw (below). The first compiled row's wall time
    includes the compilation; the second reuses it (the same chain shapes); the third compiles the batched
    chains' shapes."""
    return timed_rows(device, tiny, iterations, CHAIN_ROWS, baseline="eager")


# the shortcuts of docs/erasure.md's "Each shortcut on its own", on the SD recipe; ddim_steps 25 halves the
# recipe's 50 as the toy rows' 5 halve the toy recipe's 10
SHORTCUTS = [("recipe", {}), ("ddim_steps_25", {"ddim_steps": 25}), ("share_draws", {"share_draws": True}),
             ("batch_pi_chain", {"batch_pi_chain": True}), ("pool", {"xt_source": "pool"})]


def part_shortcuts(device, tiny, iterations) -> dict:
    """The engine's AGE iteration (paper recipe, 100 candidates, eager, bf16 on a GPU) with each shortcut, at
    the expected "till t" draw (below). The pool's builds (one per prompt drawn: the erased concept and each
    candidate a pick lands on, up to all of them) are timed apart and added as a range."""
    return timed_rows(device, tiny, iterations, SHORTCUTS, baseline="recipe")


def steady_seconds(step: dict) -> float:
    """A step's seconds without its pool builds (a pool is built once per prompt, not every step)."""
    return step["seconds"] - step["pool_build_seconds"]


def seconds_per_chain_step(runs: list[list[dict]]) -> float | None:
    """The slope of a step's steady seconds on its "till t" DDIM steps, within each run and phase (whose
    fixed costs differ), pooled: the cost of one chain DDIM step. None when no draw varied.

    The fit is least squares with the slope and every run's and phase's fixed cost kept non-negative: a few
    noisy steps of a fast model can otherwise give a slope that brings a row to a negative time at its
    expected draw. With the fixed costs profiled out the problem is one-dimensional, so the constrained
    slope is the unconstrained one clipped to [0, the smallest mean seconds / mean DDIM steps of a group]."""
    num = den = 0.0
    ceiling = float("inf")
    for steps in runs:
        for phase in {s["phase"] for s in steps}:
            group = [s for s in steps if s["phase"] == phase]
            n_mean = statistics.mean(s["chain_ddim_steps"] for s in group)
            t_mean = statistics.mean(steady_seconds(s) for s in group)
            num += sum((s["chain_ddim_steps"] - n_mean) * (steady_seconds(s) - t_mean) for s in group)
            den += sum((s["chain_ddim_steps"] - n_mean) ** 2 for s in group)
            if n_mean > 0:
                ceiling = min(ceiling, max(t_mean, 0.0) / n_mean)
    return min(max(num / den, 0.0), ceiling) if den else None


def chain_kind(options: dict) -> tuple[bool, bool, bool]:
    """How a row runs its chain; rows that run it alike share the cost of one chain DDIM step (a batch of the
    model step's and the pi step's chains costs more a DDIM step than the model step's alone)."""
    return bool(options.get("compile_chain")), bool(options.get("channels_last")), bool(options.get("batch_pi_chain"))


def expected_longest(chains: int, ddim_steps: int) -> float:
    """The expected DDIM steps of a batch of chains: the largest of ``chains`` draws n ~ U{0..ddim_steps-1}."""
    return sum(1 - ((j + 1) / ddim_steps) ** chains for j in range(ddim_steps))


def timed_rows(device, tiny, iterations, settings: list[tuple[str, dict]], baseline: str) -> dict:
    """Each setting's AGE iteration, timed in one run, with its seconds per model step at the expected draw.

    A step's time grows with the "till t" DDIM steps it draws (n ~ U{0..ddim_steps-1} per chain; a batch of
    chains runs as many as its longest), so a few steps are a noisy sample. Each row therefore gives its time
    at the expected draw: the measured steady mean plus b x (expected - drawn DDIM steps per step), b being
    the seconds of one chain DDIM step fitted (non-negative, see seconds_per_chain_step) on the steps of every
    row that runs its chain the same way (eager, channels-last or compiled; alone or batched with the pi
    step's)."""
    bundle = bundle_for(device, tiny)
    precision = "bf16" if device.type == "cuda" else "fp32"
    measured = measure(settings, lambda **options: engine_seconds(bundle, iterations, precision, **options))
    return {"precision": precision, "iterations_timed": 2 * (iterations // 2),
            "rows": at_expected_draw(measured, baseline)}


def measure(settings: list[tuple[str, dict]], seconds) -> dict[str, tuple[dict, dict, float]]:
    """Each setting timed in one run by ``seconds(**options)`` (engine_seconds or esd_seconds): name ->
    (options, its info, wall seconds), what at_expected_draw takes."""
    measured = {}
    for name, options in settings:
        started = time.perf_counter()
        _, info = seconds(**options)
        measured[name] = (options, info, time.perf_counter() - started)
    return measured


def at_expected_draw(measured: dict[str, tuple[dict, dict, float]], baseline: str,
                     steps_per_model_step: int = 2) -> dict[str, dict]:
    """Rows of (options, engine_seconds or esd_seconds info, wall seconds) brought to the expected "till t"
    draw. ``steps_per_model_step``: AGE's model step comes with a pi step (2); an ESD iteration is one step."""
    slopes = {kind: seconds_per_chain_step([info["steps"] for options, info, _ in measured.values()
                                            if chain_kind(options) == kind])
              for kind in {chain_kind(options) for options, _, _ in measured.values()}}
    rows: dict[str, dict] = {}
    for name, (options, info, wall) in measured.items():
        steps, slope = info["steps"], slopes[chain_kind(options)]
        steady = statistics.mean(steady_seconds(s) for s in steps)
        drawn = statistics.mean(s["chain_ddim_steps"] for s in steps)
        expected = statistics.mean(sum(expected_longest(k, info["ddim_steps"]) for k in s["chain_batches"])
                                   for s in steps)
        per_model_step = steps_per_model_step * (steady + slope * (expected - drawn) if slope is not None else steady)
        row = {"options": options, "s_per_model_step_measured": steps_per_model_step * steady,
               "steps_timed": len(steps), "chain_ddim_steps_per_iter": drawn,
               "expected_chain_ddim_steps_per_iter": expected,
               "s_per_chain_ddim_step": slope, "s_per_model_step": per_model_step,
               "estimate_1000_model_steps_min": per_model_step * 1000 / 60, "peak_gib": info["peak_gib"],
               "wall_s": wall}
        builds = [s["pool_build_seconds"] / s["pool_builds"] for s in steps if s["pool_builds"]]
        if builds:
            row["s_per_pool_build"] = statistics.mean(builds)
            row["estimate_1000_model_steps_every_pool_min"] = (
                row["estimate_1000_model_steps_min"] + (info["candidates"] + 1) * row["s_per_pool_build"] / 60)
        rows[name] = row
    for row in rows.values():
        row["speedup"] = rows[baseline]["s_per_model_step"] / row["s_per_model_step"]
    return rows


class TimedEvaluator:
    """An evaluator whose ``topk`` calls are timed (the classification's share of a row)."""

    def __init__(self, evaluator):
        self.evaluator, self.seconds = evaluator, 0.0

    def topk(self, images, k):
        started = time.perf_counter()
        out = self.evaluator.topk(images, k)  # its indices come back on the CPU: the GPU work is done
        self.seconds += time.perf_counter() - started
        return out


def random_resnet50(tiny: bool):
    """ResNet-50's architecture (ImageNet's 1000 classes) with random weights: the graph's classifier's cost."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    small = dict(embedding_size=16, hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1]) if tiny else {}
    return ResNetForImageClassification(ResNetConfig(num_labels=1000, **small))


# an ESD iteration (a graph row's esd-x, SDXL's sdxl-esd-x) before (the eager chain) and after (the compiled
# chain), the same recipe
ESD_ROWS = [("eager", {}), ("compiled", {"compile_chain": True})]


def esd_rows(bundle, device, iterations, preset, concept, work: Path) -> dict[str, dict]:
    """The ``ESD_ROWS`` of one ESD recipe, timed in one run and brought to the expected draw (an ESD
    iteration is one model step); bf16 on a GPU."""
    cuda = device.type == "cuda"
    measured = measure(ESD_ROWS, lambda **options: esd_seconds(
        bundle, iterations, preset, concept=concept, work_dir=work, precision="bf16" if cuda else "fp32",
        requires_gpu=cuda, **options))
    return at_expected_draw(measured, baseline="eager", steps_per_model_step=1)


def part_graph_row(device, tiny, images, erase_iterations, esd_iterations, work: Path) -> dict:
    """One SD-1.4 graph row as ``build_graph`` computes it: erase, then G of every concept of the set. Then
    the esd-x iteration with the eager and the compiled chain, at the expected draw, each with the estimate
    of a whole row at N = 32 (its 1000 iterations and the images)."""
    from age_explorer.core.graph.capability import CapabilitySpec, ImageNetEvaluator, _imagenet_preprocess, capability
    from age_explorer.core.graph.concept_sets import load_concept_set
    from age_explorer.core.graph.sweep import RowRecipe, erase_row
    from age_explorer.core.runs import delta_weights
    from age_explorer.core.backends.stable_diffusion import StableDiffusionBackend

    pipe = random_sd14_pipeline(work / "sd14-row", device, **sd14_parts(tiny))
    bundle = StableDiffusionBackend.bundle_from_pipeline(pipe, "random SD-1.4 architecture", device, torch.float32,
                                                         None)
    concept_set = load_concept_set("netfive")
    evaluator = TimedEvaluator(ImageNetEvaluator("random ResNet-50", random_resnet50(tiny), _imagenet_preprocess(),
                                                 concept_set, device))
    cuda = device.type == "cuda"
    recipe = RowRecipe("esd", "esd-x", {"iterations": erase_iterations, "precision": "bf16" if cuda else "fp32",
                                        "requires_gpu": cuda})
    spec = CapabilitySpec(images_per_concept=images).resolved(bundle)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    delta, erase_s = erase_row(bundle, recipe, concept_set.concepts[0], work)
    started = time.perf_counter()
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with delta_weights(bundle, delta), bf16:
        after = capability(bundle, concept_set, evaluator, spec)
    measure_s = time.perf_counter() - started
    row_peak = peak_gib(device)  # the erasure and the images; the timed rows below reset the counter
    n_concepts = len(concept_set.concepts)
    n_images = n_concepts * images
    per_image = measure_s / n_images
    erase_1000_s = erase_s / erase_iterations * 1000
    erase_rows = esd_rows(bundle, device, esd_iterations, "esd-x", concept_set.concepts[0], work)
    for row in erase_rows.values():
        row["estimate_row_n32_min"] = (row["s_per_model_step"] * 1000 + per_image * 32 * n_concepts) / 60
    return {"erased": concept_set.concepts[0], "concepts": n_concepts, "images_per_concept": images,
            "images": n_images, "steps": spec.steps, "precision": "bf16" if cuda else "fp32",
            "erase_iterations": erase_iterations, "erase_s": erase_s, "generate_s": measure_s - evaluator.seconds,
            "classify_s": evaluator.seconds, "s_per_image": per_image,
            "estimate_row_n32_min": (erase_1000_s + per_image * 32 * n_concepts) / 60,
            "estimate_row_n32_erase_min": erase_1000_s / 60, "peak_gib": row_peak,
            "mean_G_top1": float(after.G_top1.mean()), "esd_iterations": esd_iterations,
            "erase_rows": erase_rows}


def part_imagenette(device, tiny, iterations, work: Path) -> dict:
    from age_explorer.core.erasure import PRESETS, erase, make_config

    bundle = bundle_for(device, tiny)
    precision = "bf16" if device.type == "cuda" else "fp32"
    config = make_config(PRESETS["imagenette"][0], "imagenette", concepts=["garbage truck"],
                         iterations=iterations, precision=precision, requires_gpu=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = erase(bundle, config, work / "imagenette-run")
    seconds = time.perf_counter() - started
    per_step = seconds / iterations
    return {"precision": precision, "model_steps": iterations, "steps_done": result.steps_done,
            "seconds": seconds, "s_per_model_step": per_step,
            "estimate_1000_model_steps_min": per_step * 1000 / 60, "peak_gib": peak_gib(device)}


TINY_SDXL_UNET = dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                      attention_head_dim=(2, 4))


def part_sdxl_esd(device, tiny, iterations, work: Path) -> dict:
    """ESD (preset ``sdxl-esd-x``) on SDXL 1.0's UNet architecture, random weights: seconds an iteration with
    the eager "till t" chain and with the compiled one, each at the expected draw (the first two iterations
    are warm-up; the compiled row's wall time includes the compilation)."""
    from age_explorer.core.backends.stable_diffusion_xl import StableDiffusionXLBackend

    pipe = random_sdxl_pipeline(work / "sdxl", device, **(dict(unet=TINY_SDXL_UNET, vae=TINY_VAE) if tiny else {}))
    bundle = StableDiffusionXLBackend.bundle_from_pipeline(pipe, "random SDXL architecture", device, torch.float32,
                                                           None)
    rows = esd_rows(bundle, device, iterations, "sdxl-esd-x", "garbage truck", work)
    return {"preset": "sdxl-esd-x", "precision": "bf16" if device.type == "cuda" else "fp32",
            "iterations": iterations, "iterations_timed": rows["eager"]["steps_timed"], "rows": rows,
            "unet_parameters_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6}


def part_evaluate(device, tiny, images, work: Path) -> dict:
    """NudeNet on images of a random SD-1.4-architecture pipeline (saved as a folder, as a user's model)."""
    from age_explorer.core.app.evaluate import evaluate
    from age_explorer.core.evaluation import EvaluationConfig

    folder = work / "sd14-random"
    random_sd14_pipeline(work / "sd14", device, **sd14_parts(tiny)).save_pretrained(folder)
    prompts = work / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance\n" +
                       "".join(f"a photo of a person on a beach,{seed},7.5\n" for seed in range(images)))
    config = EvaluationConfig(metrics=["nudity", "clip"], prompts=str(prompts), batch_size=images)
    started = time.perf_counter()
    result = evaluate(folder, config, out=work / "evaluation", device=device)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "s_per_image": seconds / images,
            "metrics": result.results["metrics"], "unavailable": result.results["unavailable"]}


PARTS = ("bench", "compiled_chain", "graph_row", "shortcuts", "sdxl_esd", "imagenette", "evaluate")
# each part at the default sizes on an H100/H200-class GPU (estimated from the H200 figures): the budget's plan
PART_MINUTES = {"bench": 1.0, "compiled_chain": 3.2, "graph_row": 2.7, "shortcuts": 1.2, "sdxl_esd": 3.0,
                "imagenette": 1.3, "evaluate": 0.5}


def over_budget(part: str, elapsed_s: float, budget_min: float | None) -> str | None:
    """Why ``part`` is not started (its estimate does not fit in what is left of the budget), or None."""
    if budget_min is None:
        return None
    left = budget_min - elapsed_s / 60
    if PART_MINUTES[part] > left:
        return (f"skipped: its estimate, {PART_MINUTES[part]:.1f} min, does not fit in the {left:.1f} min left of "
                f"the {budget_min:g} min budget (--budget-min)")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON to write (rewritten after every part)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="a small UNet and VAE instead of the published ones (a CPU test)")
    parser.add_argument("--bench-iterations", type=int, default=4)
    parser.add_argument("--chain-iterations", type=int, default=6, help="loop iterations per compiled_chain row")
    parser.add_argument("--shortcut-iterations", type=int, default=6, help="loop iterations per shortcuts row")
    parser.add_argument("--row-images", type=int, default=4, help="images per concept of the graph row")
    parser.add_argument("--row-erase-iterations", type=int, default=10, help="esd-x steps of the graph row")
    parser.add_argument("--row-esd-iterations", type=int, default=6,
                        help="esd-x iterations per timed row (eager, compiled) of the graph row")
    parser.add_argument("--age-iterations", type=int, default=16, help="model steps of the imagenette run")
    parser.add_argument("--sdxl-iterations", type=int, default=6, help="ESD iterations per sdxl_esd row")
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget-min", type=float, default=None,
                        help="skip the parts whose estimate no longer fits (default: 8 on a GPU, none with --tiny)")
    args = parser.parse_args()
    budget_min = args.budget_min if args.budget_min is not None else (None if args.tiny else 8.0)
    if budget_min is not None and budget_min <= 0:
        parser.error(f"--budget-min must be positive, got {budget_min:g}")
    script_started = time.perf_counter()
    device = resolve_device(args.device)
    out = Path(args.out)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "python": sys.version.split()[0], "tiny": args.tiny,
               "budget_min": budget_min, "parts": {}}

    def record(name, fn):
        started = time.perf_counter()
        skipped = over_budget(name, started - script_started, budget_min)
        if skipped:
            figures["parts"][name] = {"skipped": skipped}
            out.write_text(json.dumps(figures, indent=2, default=str))
            print(f"[gpu_check] {name}: {skipped}", flush=True)
            return
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            figures["parts"][name] = fn()
        except Exception as err:  # one part's failure must not lose the others' figures
            figures["parts"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        figures["parts"][name]["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(figures, indent=2, default=str))
        print(f"[gpu_check] {name}: {json.dumps(figures['parts'][name], default=str)[:600]}", flush=True)

    import diffusers

    figures["diffusers"] = diffusers.__version__
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = {"bench": lambda: part_bench(device, args.tiny, args.bench_iterations),
               "compiled_chain": lambda: part_compiled_chain(device, args.tiny, args.chain_iterations),
               "graph_row": lambda: part_graph_row(device, args.tiny, args.row_images, args.row_erase_iterations,
                                                   args.row_esd_iterations, work),
               "shortcuts": lambda: part_shortcuts(device, args.tiny, args.shortcut_iterations),
               "sdxl_esd": lambda: part_sdxl_esd(device, args.tiny, args.sdxl_iterations, work),
               "imagenette": lambda: part_imagenette(device, args.tiny, args.age_iterations, work),
               "evaluate": lambda: part_evaluate(device, args.tiny, args.eval_images, work)}
        for name in PARTS:  # in PARTS' order, whatever the order of --parts
            if name in parts:
                record(name, run[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
