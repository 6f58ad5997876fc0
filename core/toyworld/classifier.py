"""The toy world's evaluator: a small CNN that names the concept in a 32x32 image.

It plays the role of the paper's ResNet-50: G(c) is the share of generated images of c it recognises as c.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class ToyClassifier(nn.Module):
    def __init__(self, num_classes: int = 25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(128, num_classes))
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1], shape (N, 3, 32, 32)."""
        return self.head(self.features(images * 2 - 1))

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int = 1, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        out = [self(images[i:i + batch_size].float()).topk(k, dim=1).indices for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"num_classes": str(self.num_classes)})

    @classmethod
    def load(cls, path: str | Path) -> "ToyClassifier":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            num_classes = int(f.metadata()["num_classes"])
        model = cls(num_classes)
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Artefacts generated images may carry: noise, blur and a faint 2x2-periodic offset.

    Without them the classifier is misled by sample backgrounds rather than judging shape and colour.
    """
    n = len(images)
    sigma = 0.25 * torch.rand(n, 1, 1, 1, generator=generator)
    images = images + sigma * torch.randn(images.shape, generator=generator)
    blur = torch.rand(n, generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    periodic = 0.06 * torch.rand(n, 12, 1, 1, generator=generator) - 0.03
    images = images + F.pixel_shuffle(periodic.expand(n, 12, 16, 16), 2) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    return images.clamp(0, 1)
