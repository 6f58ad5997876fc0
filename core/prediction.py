"""The conversions between a diffusion model's outputs and its images, in one place.

``a`` is alpha-bar at the timestep (``scheduler.alphas_cumprod[t]``), broadcast to the latents.
"""

from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x_t from a clean latent and Gaussian noise."""
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What a v-prediction model should output for x_t = add_noise(x0, noise, a)."""
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_output(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean-latent estimate of a model output at x_t (epsilon or v prediction)."""
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    return (x - (1 - a).sqrt() * out) / a.sqrt()


def eps_from_x0(x0: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - a.sqrt() * x0) / (1 - a).sqrt()
