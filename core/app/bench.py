"""Benchmark: the engine's AGE iteration against a reference-style loop, on the same device.

The reference-style loop does what the reference code does per iteration: fp32, batch 1, the two
"sample till t" trajectories one after the other with the model being trained, 3 frozen passes on a
second UNet copy, 2 trainable passes and a backward pass on every iteration (pi steps included).
The engine is :class:`core.erasure.age.AGERun` with the chosen precision.
"""

from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bundle import ModelBundle
from ..prediction import x0_from_output
from ..sampling import guided_ddim_step, unet_prediction

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class _RandomStates(torch.nn.Module):
    """Stands in for CLIP: a fixed random (77, 768) state per prompt (the text encoder is not timed)."""

    def __init__(self, device, dtype):
        super().__init__()
        self.device_, self.dtype_ = device, dtype

    def forward(self, ids):
        out = []
        for row in ids.tolist():
            g = torch.Generator().manual_seed(zlib.crc32(str(row).encode()))
            out.append(torch.randn(77, 768, generator=g))
        return (torch.stack(out).to(self.device_, self.dtype_),)


class _HashTokenizer:
    """A stand-in tokenizer: a batch of prompts becomes each prompt's hash then padding (what the random
    text encoder reads); one prompt, unpadded, becomes start, a hash per word, end (what the closed-form
    edits read to find a prompt's last word)."""
    model_max_length = 77
    all_special_tokens: list[str] = []
    bos_token_id, eos_token_id = 49406, 49407

    def __call__(self, prompts, **_):
        if isinstance(prompts, str):
            words = [zlib.crc32(w.encode()) % 49406 for w in prompts.split()]
            return type("Enc", (), {"input_ids": [self.bos_token_id, *words, self.eos_token_id]})()
        ids = torch.tensor([[zlib.crc32(p.encode()) % 49407] + [0] * 76 for p in prompts])
        return type("Enc", (), {"input_ids": ids})()


def sd14_cpu_overrides(method) -> dict:
    """What a method's SD preset changes to run on the SD-1.4 stand-in on a CPU: no GPU requirement, five
    candidate words (each costs a UNet probe at set-up) and two anchor images (CA's set-up)."""
    out = {"requires_gpu": False}
    if "candidates" in method.options:
        out["candidates"] = ["dog", "cat", "car", "tree", "house"]
    if "anchor_images" in method.options:
        out["anchor_images"] = 2
    return out


def random_sd14_bundle(device: torch.device) -> ModelBundle:
    """SD-1.4's UNet architecture with random weights (nothing to download)."""
    from diffusers import UNet2DConditionModel

    from ..backends.stable_diffusion import StableDiffusionBackend

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET).to(device).eval()
    return ModelBundle(backend=StableDiffusionBackend(), source="random SD-1.4 architecture", unet=unet,
                       text_encoder=_RandomStates(device, torch.float32), tokenizer=_HashTokenizer(),
                       scheduler_config=SD14_SCHEDULER, device=device, dtype=torch.float32)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_style_seconds(bundle: ModelBundle, iterations: int, candidates: int = 100, seed: int = 0,
                            loss_space: str = "x0") -> float:
    """Seconds per iteration of the reference-style loop (see module docstring)."""
    device = bundle.device
    unet = bundle.unet
    frozen = copy.deepcopy(unet).requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "attn2" in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-5)
    pi = torch.zeros(candidates, device=device, requires_grad=True)
    pi_opt = torch.optim.Adam([pi], lr=1e-2)
    c_e = bundle.encode(["erased concept"])
    uncond = bundle.encode([""])
    table = torch.randn(candidates, *c_e.shape[1:], device=device)
    sched = bundle.sampling_scheduler()
    sched.set_timesteps(50, device=device)
    alphas = bundle.train_scheduler().alphas_cumprod.to(device)
    g = torch.Generator().manual_seed(seed)

    predict = unet_prediction(bundle, unet)

    def till(z, cond, n):
        with torch.no_grad():
            for t in sched.timesteps[:n]:
                z = guided_ddim_step(sched, predict, z, t, cond, uncond, 3.0)
        return z

    def x0(eps, z, t):
        return eps if loss_space == "eps" else x0_from_output(eps, z, alphas[t], "epsilon")

    times = []
    for i in range(iterations + 2):  # two warm-up iterations
        _sync(device)
        start = time.perf_counter()
        n = int(torch.randint(50, (1,), generator=g))
        z_T = torch.randn(1, *bundle.latent_shape, generator=g).to(device)
        y = F.softmax((pi + -torch.log(-torch.log(torch.rand(candidates, generator=g).to(device) + 1e-10) + 1e-10)) / 0.1, 0)
        w = F.one_hot(y.argmax(), candidates).float() - y.detach() + y
        e_t = torch.einsum("n,nld->ld", w, table)[None]
        z_e = till(z_T, c_e, n)
        z_t = till(z_T, e_t.detach(), n)
        t = sched.timesteps[min(n, 49)]
        with torch.no_grad():
            f_et = frozen(z_e, t, encoder_hidden_states=e_t.detach()).sample
            f_ee = frozen(z_e, t, encoder_hidden_states=c_e).sample
            f_tt = frozen(z_t, t, encoder_hidden_states=e_t.detach()).sample
        l_e = unet(z_e, t, encoder_hidden_states=c_e).sample
        l_t = unet(z_t, t, encoder_hidden_states=e_t).sample
        erase = F.mse_loss(x0(l_e, z_e, t), x0(f_et - (f_ee - f_et), z_e, t))
        keep = F.mse_loss(x0(l_t, z_t, t), x0(f_tt, z_t, t))
        opt.zero_grad()
        pi_opt.zero_grad()
        if i % 2 == 0:
            (erase + keep).backward()
            opt.step()
        else:
            (-(erase + keep)).backward()
            pi_opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    del frozen
    return sum(times) / len(times)


def engine_seconds(bundle: ModelBundle, iterations: int, precision: str, candidates: int = 100,
                   work_dir: Path | None = None, **overrides) -> tuple[float, dict]:
    """Seconds per loop iteration of the engine's AGE run (paper recipe otherwise), steps timed as
    :func:`timed_steps` times them. The info dict holds the peak memory, the "till t" schedule, the
    candidates and the timed steps."""
    import tempfile

    from ..erasure.age import AGERun
    from ..erasure.config import make_config

    own_set, own_words = bundle.backend.concept_set(), bundle.backend.candidate_vocabulary()
    if own_set is not None and own_words is not None:  # a closed world: its first concept, its own words
        concept, words = own_set.concepts[0], own_words
    else:
        concept, words = "erased concept", [f"candidate {i}" for i in range(candidates)]
    candidates = len(words)
    config = make_config("age", None, concepts=[concept], candidates=words, iterations=iterations // 2 + 1,
                         precision=precision, k_closest=candidates, num_centers=candidates,
                         loss_space=overrides.pop("loss_space", "x0"), **overrides)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        steps, peak = timed_steps(AGERun(bundle, config, tmp), iterations)
    info = {"peak_gib": peak, "ddim_steps": config.ddim_steps, "candidates": candidates, "steps": steps}
    return sum(s["seconds"] for s in steps) / len(steps), info


def esd_seconds(bundle: ModelBundle, iterations: int, preset: str, concept: str = "garbage truck",
                work_dir: Path | None = None, **overrides) -> tuple[float, dict]:
    """Seconds per iteration of an ESD run with ``preset`` (``overrides`` on top), steps timed as
    :func:`timed_steps` times them (an ESD iteration is one model step)."""
    import tempfile

    from ..erasure import PRESETS, make_config
    from ..erasure.esd import ESDRun

    config = make_config(PRESETS[preset][0], preset, concepts=[concept], iterations=iterations, **overrides)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        steps, peak = timed_steps(ESDRun(bundle, config, tmp), iterations)
    info = {"peak_gib": peak, "ddim_steps": config.ddim_steps, "steps": steps}
    return sum(s["seconds"] for s in steps) / len(steps), info


def timed_steps(run, iterations: int) -> tuple[list[dict], float]:
    """Run a fine-tuning run (``erasure.loop.FineTuneRun``) with each step timed; the timed steps and the
    peak GPU memory in GiB (NaN off a GPU).

    Each step records its phase, seconds, "sample till t" DDIM steps (a step's time grows with its draw;
    chains batched together count their longest), the chains in each batch and, in pool mode, the
    seconds of the frozen pools it built (one per prompt, the first time it is drawn). The first two steps
    and the step of each phase's first "till t" chain (where a compiled chain compiles) are warm-up, not
    timed."""
    device = run.bundle.device
    steps: list[dict] = []  # the timed steps
    drawn: list[int] = []  # the current step's "till t" DDIM steps, one entry per batch of chains (its longest)
    batched: list[int] = []  # the current step's chains per batch
    built: list[float] = []  # the current step's pool builds, seconds each
    chained: set[str] = set()  # the phases whose chain has run: a compiled chain compiles on its first call
    last = [time.perf_counter()]

    def clock(report):
        _sync(device)
        now = time.perf_counter()
        first_chain = any(drawn) and report.phase not in chained
        if first_chain:
            chained.add(report.phase)
        if report.step > 2 and not first_chain:  # warm-up: the first two steps and each phase's first chain
            steps.append({"step": report.step, "phase": report.phase, "seconds": now - last[0],
                          "chain_batches": list(batched), "chain_ddim_steps": sum(drawn), "pool_builds": len(built),
                          "pool_build_seconds": sum(built)})
        drawn.clear()
        batched.clear()
        built.clear()
        last[0] = now

    run.callbacks.append(clock)
    sample_till_each = run.sample_till_each  # every chain runs through it

    def counted_sample_till_each(chains):
        drawn.append(max(n for _, n in chains))  # the batch's UNet calls: its longest chain's steps
        batched.append(len(chains))
        return sample_till_each(chains)

    pool_latents = run.pool_latents

    def timed_pool_latents(key, cond, t):
        new = key not in run.pools
        _sync(device)
        started = time.perf_counter()
        out = pool_latents(key, cond, t)
        if new:
            _sync(device)
            built.append(time.perf_counter() - started)
        return out

    run.sample_till_each, run.pool_latents = counted_sample_till_each, timed_pool_latents
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    last[0] = time.perf_counter()
    try:
        run.run()
    finally:
        run.predictor.restore()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if not steps:
        raise ValueError(f"none of the {iterations} iterations was timed (all warm-up); time more iterations")
    return steps, peak


def preset_seconds(bundle: ModelBundle, preset: str, concept: str, run_dir: Path, **overrides) -> dict:
    """Wall-clock seconds of one whole erasure with a preset (the run is written to ``run_dir``)."""
    import resource

    from ..erasure import PRESETS, erase, make_config

    config = make_config(PRESETS[preset][0], preset, concepts=[concept], **overrides)
    started = time.perf_counter()
    result = erase(bundle, config, run_dir)
    return {"seconds": time.perf_counter() - started, "steps": result.steps_done,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def method_seconds(bundle: ModelBundle, method: str, preset: str | None, concept: str, run_dir: Path,
                   **overrides) -> dict:
    """One erasure with ``method``: whole seconds, model steps, and seconds per step after the first
    (the set-up a method does before its loop, such as sampling anchor images, is not a step's)."""
    from ..erasure import erase, make_config
    from ..runs import read_history

    config = make_config(method, preset, concepts=[concept], **overrides)
    started = time.perf_counter()
    try:
        result = erase(bundle, config, run_dir)
    except (ValueError, RuntimeError) as err:
        return {"method": method, "preset": preset, "refused": str(err).splitlines()[0]}
    seconds = time.perf_counter() - started
    elapsed = [row["elapsed"] for row in read_history(run_dir) if "elapsed" in row]
    per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else float("nan")
    return {"method": method, "preset": preset, "seconds": seconds, "steps": result.steps_done,
            "seconds_per_step": per_step}
