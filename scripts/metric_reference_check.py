"""Check the project's LPIPS and FID networks against the reference packages, on one set of weights.

    pip download --no-deps -d wheels lpips==0.1.4 torch-fidelity==0.4.0
    (cd wheels && for w in *.whl; do python -m zipfile -e "$w" unpacked; done)
    python scripts/metric_reference_check.py wheels/unpacked

LPIPS: the lpips package's own ``LPIPS(net="alex")`` with its real linear layers against ours; both get
the same random AlexNet trunk (through a stand-in ``torchvision.models.alexnet``, so torchvision need not
be importable). FID: torch-fidelity's ``FeatureExtractorInceptionV3`` (pure torch; its weight file is the
one pytorch-fid and torchmetrics use) loads our network's random state dict by name, strictly, and both
compute pool3 features of the same normalised input. Prints the largest absolute differences.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from age_explorer.core.evaluation.fid import FIDInception
from age_explorer.core.evaluation.lpips_score import LPIPS, AlexNetFeatures


def check_lpips(root: Path) -> float:
    torch.manual_seed(0)
    trunk = AlexNetFeatures()
    stand_in, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.alexnet = lambda pretrained=True, **kwargs: trunk
    stand_in.models = models
    sys.modules.update({"torchvision": stand_in, "torchvision.models": models})
    sys.path.insert(0, str(root))
    import lpips

    theirs = lpips.LPIPS(net="alex", verbose=False)
    ours = LPIPS()
    ours.net.load_state_dict(trunk.state_dict())
    linear = torch.load(root / "lpips" / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    ours.lins.load_state_dict({f"{i}.weight": linear[f"lin{i}.model.1.weight"] for i in range(5)})
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(6, 3, 64, 64, generator=g), torch.rand(6, 3, 64, 64, generator=g)
    b[:2] = a[:2]
    with torch.no_grad():
        return float((theirs(a, b, normalize=True).view(-1) - ours(a, b)).abs().max())


def check_fid(root: Path) -> float:
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root / "torch_fidelity")]  # its submodules, without its __init__'s imports
    sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    ours = FIDInception().eval()
    for m in ours.modules():  # batch-norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    state = {**ours.state_dict(), "fc.weight": torch.randn(1008, 2048) * 0.01, "fc.bias": torch.zeros(1008)}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "inception.pth")
        theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                             feature_extractor_weights_path=str(Path(tmp) / "inception.pth"))
    x = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8)
    z = (x.float() - 128) / 128  # torch-fidelity's normalisation, given to our layers (299 px: no resize)
    with torch.no_grad():
        h = F.max_pool2d(ours.Conv2d_2b_3x3(ours.Conv2d_2a_3x3(ours.Conv2d_1a_3x3(z))), 3, 2)
        h = F.max_pool2d(ours.Conv2d_4a_3x3(ours.Conv2d_3b_1x1(h)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            h = getattr(ours, f"Mixed_{name}")(h)
        mine = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return float((theirs(x)[0] - mine).abs().max())


if __name__ == "__main__":
    unpacked = Path(sys.argv[1])
    print(f"LPIPS (alex, v0.1): largest |ours - lpips package| over 6 pairs = {check_lpips(unpacked):.3g}")
    print(f"FID Inception pool3: largest |ours - torch-fidelity| over 3 images = {check_fid(unpacked):.3g}")
