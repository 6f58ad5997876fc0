"""LPIPS (the paper's Table 3): the perceptual distance between an erased run's image and its base
model's image of the same prompt and seed, averaged over the pairs.

The metric is LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018; the ``lpips`` package's default
``LPIPS(net="alex")``), computed here in plain torch from two local files:

- the AlexNet ImageNet weights torchvision downloads, ``alexnet-owt-7be5be79.pth`` in torch.hub's
  checkpoint folder (``$TORCH_HOME/hub/checkpoints``);
- the linear layers calibrated on human judgements, ``weights/v0.1/alex.pth`` inside the installed
  ``lpips`` package (its wheel ships them; the package is not imported, so its torchvision import is
  not needed).

Per pair: inputs scaled to [-1, 1] then by LPIPS' fixed shift and scale, AlexNet's five ReLU outputs,
each unit-normalised over channels, squared differences weighted by the linear layers, averaged over
space and summed over the five layers. Images under 32 px (AlexNet needs 31) are resized up to 32 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..files import file_sha256
from .weights import Unavailable, cached_checkpoint, checkpoints_dir, load_checked, load_state, package_file

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LINEAR_FILE = ("weights", "v0.1", "alex.pth")
CHANNELS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)  # the ReLUs of torchvision's AlexNet.features whose outputs LPIPS compares
MIN_SIZE = 32
# LPIPS v0.1's ScalingLayer: inputs in [-1, 1] are shifted and scaled as ImageNet statistics say
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def how_to_get() -> str:
    return (f"LPIPS (AlexNet, v0.1) needs two local files: torchvision's AlexNet weights {ALEXNET_FILE} in "
            f"{checkpoints_dir()} (download {ALEXNET_URL} on a connected machine, or run "
            f"`python -c \"import torchvision; torchvision.models.alexnet(weights='DEFAULT')\"` there, and copy "
            f"the file into that folder; TORCH_HOME moves it), and the lpips package's linear layers "
            f"(pip install lpips, or pip install 'age-explorer[eval]')")


class AlexNetFeatures(nn.Module):
    """torchvision's ``AlexNet.features``, layer for layer (so its state dict loads by name)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out


class LPIPS(nn.Module):
    """LPIPS v0.1 (AlexNet) between image batches in [0, 1], one distance per pair."""

    def __init__(self):
        super().__init__()
        self.net = AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float()
        if min(x.shape[-2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1])), mode="bilinear",
                              align_corners=False)
        x = ((2 * x - 1) - self.shift) / self.scale
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in self.net(x)]

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        total = 0
        for lin, fa, fb in zip(self.lins, self._features(a), self._features(b)):
            total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
        return total.view(-1)


def load_lpips(device="cpu") -> tuple[LPIPS, dict]:
    """The metric with its weights, and a description of them for the results (files, sha256);
    :class:`Unavailable` (with how to get them) when either file is missing."""
    backbone, linear = cached_checkpoint((ALEXNET_FILE,)), package_file("lpips", *LINEAR_FILE)
    if backbone is None or linear is None:
        missing = [what for what, path in (("AlexNet weights", backbone), ("linear layers", linear)) if path is None]
        raise Unavailable(f"not available: the {' and the '.join(missing)} are missing. {how_to_get()}")
    model = LPIPS()
    load_checked(model.net, load_state(backbone), backbone, "torchvision's AlexNet weights")
    state = load_state(linear)
    lins = {f"{i}.weight": state.get(f"lin{i}.model.1.weight") for i in range(len(CHANNELS))}
    if any(v is None for v in lins.values()):
        raise Unavailable(f"not available: {linear} holds no LPIPS linear layers (lin0..lin4); reinstall lpips")
    load_checked(model.lins, lins, linear, "the LPIPS linear layers")
    described = {"net": "alex", "version": "0.1", "backbone": str(backbone), "backbone_sha256": file_sha256(backbone),
                 "linear_layers": str(linear), "linear_layers_sha256": file_sha256(linear)}
    return model.eval().requires_grad_(False).to(device), described


def lpips_distances(model: LPIPS, erased: torch.Tensor, base: torch.Tensor, batch_size: int = 32) -> list[float]:
    device = model.shift.device
    out = []
    for start in range(0, len(erased), batch_size):
        out += model(erased[start:start + batch_size].to(device), base[start:start + batch_size].to(device)).tolist()
    return out


class LpipsMeasurement:
    """The ``lpips`` family: each image against the base model's image of the same prompt and seed,
    which it generates with the run's base weights swapped in."""

    def __init__(self, context):
        bundle = context.bundle
        if bundle.run_manifest is None:
            raise Unavailable("not available: LPIPS compares a run's images with its base model's for the same "
                              "prompts and seeds; evaluate a run folder")
        self.model, self.described = load_lpips(bundle.device)
        from ..bundle import load_base
        from ..runs import BaseWeights

        self.base = BaseWeights(bundle, load_base(bundle, context.local_files_only))
        self.context = context
        self.samples: list[dict] = []

    def add(self, prompts, seeds, images, label=None) -> None:
        base = self._base_images(prompts, seeds, label)
        for prompt, seed, value in zip(prompts, seeds, lpips_distances(self.model, images, base,
                                                                       self.context.config.batch_size)):
            self.samples.append({"prompt": prompt, "seed": int(seed), "lpips": round(value, 6)})

    def _base_images(self, prompts, seeds, label):
        c = self.context
        with self.base.active() as bundle:
            if label is None:  # prompt rows, each with its own seed and guidance
                from .prompts import generate_rows

                return generate_rows(bundle, c.rows, c.config.steps, c.config.batch_size, c.progress, c.stop,
                                     stage="base model, prompts")
            from ..sampling import generate

            return generate(bundle, prompts[:1], seeds, steps=c.config.steps, guidance_scale=c.config.guidance,
                            batch_size=c.config.batch_size)

    def finish(self):
        from .registry import Measured

        if not self.samples:
            return Measured()
        values = [s["lpips"] for s in self.samples]
        value, what = sum(values) / len(values), self.context.shared_images
        details = {**self.described, "against": f"the base model {self.context.bundle.base_source}, same prompts, "
                                                f"seeds and sampler", "images": what, "samples": self.samples,
                   "description": f"LPIPS: v0.1 AlexNet, {what} against the base model's of the same prompts and "
                                  f"seeds, mean over {len(values)} pairs (0 = identical)."}
        return Measured({"lpips": value}, [{"metric": "lpips", "scope": "all", "value": value, "n": len(values)}],
                        {"lpips": details})
