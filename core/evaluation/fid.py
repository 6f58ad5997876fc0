"""FID: the Fréchet distance between Inception features of the evaluated model's images and of a
folder of reference images (the paper: COCO-30K prompts against the COCO photos).

The network is the Inception-v3 of the FID reference implementation (TensorFlow's 2015-12-05 graph as
ported by pytorch-fid: ``FIDInceptionA/C/E`` blocks, 1008 classes), written here in plain torch with
torchvision's layer names, and its weights come from a local file in torch.hub's checkpoint folder:
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or ``weights-inception-2015-12-05-6726825d.pth``
(torch-fidelity and torchmetrics; the same weights). Images in [0, 1] are resized to 299 × 299
(bilinear) and scaled to [-1, 1], as pytorch-fid does; the features are the 2048 pool3 outputs.

FID = |mu_1 - mu_2|² + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^½), with tr((S_1 S_2)^½) from the
eigenvalues of S_1^½ S_2 S_1^½ (the same number as pytorch-fid's ``sqrtm`` in exact arithmetic, and
stable for the rank-deficient covariances of small sets). Sets well under 2048 images give a biased
(too high) FID: compare numbers of the same set sizes only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import file_sha256
from .weights import Unavailable, cached_checkpoint, checkpoints_dir, load_checked, load_state

INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIZE = 299
FEATURES = 2048


def how_to_get() -> str:
    return (f"FID needs the FID Inception weights {INCEPTION_FILES[0]} in {checkpoints_dir()}: download "
            f"{INCEPTION_URL} on a connected machine (pytorch-fid, clean-fid's torch mode and torchmetrics fetch "
            f"the same file) and copy it into that folder (TORCH_HOME moves it)")


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):  # pytorch-fid's FIDInceptionA: the pool branch leaves padding out of the mean
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pool)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # FIDInceptionC
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(pool)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (average pool without padding) and _2 (max pool, Mixed_7c)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else
                F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to pool3, images (N, 3, H, W) in [0, 1] -> features (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception(device="cpu") -> tuple[FIDInception, dict]:
    """The FID network with its weights and their description (file, sha256); :class:`Unavailable`
    (with how to get them) when no weights file is in the checkpoint folder."""
    path = cached_checkpoint(INCEPTION_FILES)
    if path is None:
        raise Unavailable(f"not available: the FID Inception weights are missing. {how_to_get()}")
    model = FIDInception()
    load_checked(model, load_state(path), path, "the FID Inception weights")
    described = {"network": "Inception-v3 (FID, TensorFlow 2015-12-05 graph), pool3 2048", "weights": str(path),
                 "weights_sha256": file_sha256(path), "resize": f"bilinear to {SIZE} x {SIZE}"}
    return model.eval().requires_grad_(False).to(device), described


def features(model: FIDInception, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    device = next(model.parameters()).device
    return np.concatenate([model(images[i:i + batch_size].to(device)).cpu().double().numpy()
                           for i in range(0, len(images), batch_size)]) if len(images) else np.zeros((0, FEATURES))


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"FID reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"FID reference folder {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                         f"FID needs at least 2, and thousands for a number to compare with the literature")
    return files


def folder_features(model: FIDInception, folder: str | Path, batch_size: int = 32, stop=None) -> np.ndarray:
    """Features of every image in ``folder`` (and its subfolders), each resized on its own, as RGB."""
    from PIL import Image

    out, batch = [], []
    files = image_files(folder)
    for i, path in enumerate(files):
        if stop is not None and stop():
            raise InterruptedError("evaluation stopped")
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        except OSError as err:
            raise ValueError(f"FID reference image {path} cannot be read: {err}") from None
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        batch.append(F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False))
        if len(batch) == batch_size or i == len(files) - 1:
            out.append(features(model, torch.cat(batch), batch_size))
            batch = []
    return np.concatenate(out)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D), each of at least 2 rows."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    (mu1, s1), (mu2, s2) = statistics(a), statistics(b)
    values, vectors = np.linalg.eigh(s1)
    root = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = np.linalg.eigvalsh(root @ s2 @ root)
    trace_root = np.sqrt(product.clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_root)


class FidMeasurement:
    """The ``fid`` family: the shared images' Inception features against the reference folder's."""

    def __init__(self, context):
        config = context.config
        image_files(config.fid_reference)  # a folder without images is bad input, weights or not
        self.model, self.described = load_inception(context.bundle.device)
        # the reference set first: a bad image fails before any generation
        self.reference = folder_features(self.model, config.fid_reference, config.batch_size, context.stop)
        self.context = context
        self.features: list[np.ndarray] = []

    def add(self, prompts, seeds, images, label=None) -> None:
        self.features.append(features(self.model, images, self.context.config.batch_size))

    def finish(self):
        from .registry import Measured

        if not self.features:
            return Measured()
        feats, what, reference = np.concatenate(self.features), self.context.shared_images, self.context.config.fid_reference
        value = frechet_distance(feats, self.reference)
        details = {**self.described, "reference": str(reference), "reference_images": len(self.reference),
                   "images": what, "evaluated_images": len(feats),
                   "description": f"FID: {what} ({len(feats)}) against the {len(self.reference)} images of "
                                  f"`{Path(str(reference)).name}`, Inception pool3 features (pytorch-fid's weights)."}
        return Measured({"fid": value}, [{"metric": "fid", "scope": "all", "value": value, "n": len(feats)}],
                        {"fid": details})
