"""DDIM sampling with classifier-free guidance, deterministic per seed, for any :class:`ModelBundle`."""

from __future__ import annotations

from typing import Callable

import torch

from .bundle import ModelBundle
# seeds are parsed without torch (the evaluation config's --help reads the limit)
from .seeds import parse_seeds


def initial_latents(bundle: ModelBundle, seeds: list[int]) -> torch.Tensor:
    """One CPU generator per seed, so an image depends only on its own seed, not on the batch."""
    shape = bundle.latent_shape
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(bundle.device, bundle.dtype)


Prediction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_prediction(bundle: ModelBundle, unet=None) -> Prediction:
    """``predict(x, t, states)`` of a plain call of ``unet`` (default: the bundle's), conditioned as the
    bundle's backend conditions it."""
    unet = unet or bundle.unet
    return lambda x, t, states: unet(x, t, **bundle.unet_kwargs(states)).sample


def guided_ddim_step(scheduler, predict: Prediction, z: torch.Tensor, t, cond: torch.Tensor,
                     uncond: torch.Tensor, guidance_scale: float, copies: tuple[list[int], list[int]] | None = None,
                     **step_options) -> torch.Tensor:
    """One DDIM step with classifier-free guidance, uncond + s * (cond - uncond), from one batched
    model call. The one step of sampling, erasure's "sample till t", benchmarks and previews.

    ``copies`` = (first, inverse): rows of ``z`` are copies of the rows ``first`` (row i of ``z`` is
    ``z[first[inverse[i]]]``), so the unconditional prediction is made once per distinct row.
    """
    if copies is None:
        out_uncond, out_cond = predict(torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
    else:
        first, inverse = copies
        out = predict(torch.cat([z[first], z]), t, torch.cat([uncond[first], cond]))
        out_uncond, out_cond = out[:len(first)][inverse], out[len(first):]
    return scheduler.step(out_uncond + guidance_scale * (out_cond - out_uncond), t, z, **step_options).prev_sample


def seed_copies(seeds: list[int]) -> tuple[list[int], list[int]] | None:
    """(first, inverse) of the repeated seeds of a batch (see :func:`guided_ddim_step`), None if none repeats."""
    position: dict[int, int] = {}
    first, inverse = [], []
    for i, seed in enumerate(seeds):
        if seed not in position:
            position[seed] = len(first)
            first.append(i)
        inverse.append(position[seed])
    return (first, inverse) if len(first) < len(seeds) else None


@torch.no_grad()
def sample_latents(bundle: ModelBundle, cond: torch.Tensor, latents: torch.Tensor, steps: int,
                   guidance_scale: float, unet=None, callback: Callable[[int, int], None] | None = None,
                   eta: float = 0.0, seeds: list[int] | None = None) -> torch.Tensor:
    """Run DDIM from ``latents`` conditioned on hidden states ``cond``.

    With ``eta`` > 0 the step noise comes from one generator per seed (offset from the one of the
    initial noise), so an image still depends only on its own seed.
    """
    predict = unet_prediction(bundle, unet)
    scheduler = bundle.sampling_scheduler()
    scheduler.set_timesteps(steps, device=bundle.device)
    uncond = bundle.unconditional().expand(len(cond), -1, -1)
    latents = latents * scheduler.init_noise_sigma
    generators = None
    if eta > 0:
        if seeds is None or len(seeds) != len(latents):
            raise ValueError("eta > 0 needs one seed per image")
        generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    # one seed's initial latents are the same under every prompt of the batch, so at the first step its
    # unconditional prediction is too: made once (a graph row's 25 prompts share 32 seeds)
    copies = seed_copies(seeds) if seeds is not None and len(seeds) == len(latents) else None
    if copies is not None and not torch.equal(latents[copies[0]][copies[1]], latents):
        copies = None  # latents not drawn from these seeds
    for i, t in enumerate(scheduler.timesteps):
        options = {}
        if generators:
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
            options = {"eta": eta, "variance_noise": noise.to(latents)}
        latents = guided_ddim_step(scheduler, predict, latents, t, cond, uncond, guidance_scale,
                                   copies=copies if i == 0 else None, **options)
        if callback:
            callback(i + 1, steps)
    return latents


def check_sampling_options(steps: int | None = None, guidance_scale: float | None = None,
                           eta: float | None = None) -> None:
    """Refuse bad sampling options (None: the model's default, checked later) before any work starts."""
    from .erasure.config import MAX_DDIM_STEPS, MAX_GUIDANCE, check_range

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= MAX_DDIM_STEPS):
        raise ValueError(f"steps must be a whole number from 1 to {MAX_DDIM_STEPS}, got {steps!r}")
    if guidance_scale is not None:
        check_range("guidance", guidance_scale, 0, MAX_GUIDANCE)
    if eta is not None:
        check_range("eta", eta, 0, 1)


def generate(bundle: ModelBundle, prompts: list[str] | str, seeds: list[int] | str,
             steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 100,
             progress: Callable[[int, int], None] | None = None, eta: float | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for every (prompt, seed) pair, prompt-major.

    A single prompt with several seeds, or one seed per prompt when the lists have equal length
    and ``seeds`` is a list, both work: pairs = prompts x seeds.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompt given")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: give a text such as 'a red circle'")
    seeds = parse_seeds(seeds)
    steps = bundle.default_steps if steps is None else steps  # 0 is an error, not "the default"
    guidance_scale = bundle.default_guidance if guidance_scale is None else guidance_scale
    eta = bundle.default_eta if eta is None else eta
    check_sampling_options(steps, guidance_scale, eta)
    pairs = [(p, s) for p in prompts for s in seeds]
    states = {p: bundle.encode([p]) for p in dict.fromkeys(prompts)}
    images = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        cond = torch.cat([states[p] for p, _ in chunk])
        chunk_seeds = [s for _, s in chunk]
        latents = sample_latents(bundle, cond, initial_latents(bundle, chunk_seeds), steps, guidance_scale,
                                 eta=eta, seeds=chunk_seeds)
        images.append(bundle.decode(latents).cpu())
        if progress:
            progress(min(start + batch_size, len(pairs)), len(pairs))
    return torch.cat(images)
