"""The metrics this version does not compute, with how to get them: each is reported, never skipped.

LPIPS (the paper's Table 3, AlexNet, against the base model's image of the same seed) and FID (COCO-30K
against real images) need packages and weights this project does not ship; their numbers come from
the tools named here, on the images ``--save-images`` writes.
"""

from __future__ import annotations

HOW_TO_GET = {
    "lpips": "not available: this version does not compute LPIPS. It needs the `lpips` package with its "
             "AlexNet weights (pip install lpips torchvision on a connected machine; the first use downloads "
             "the weights into TORCH_HOME); run it on the images of --save-images and of the base model",
    "fid": "not available: this version does not compute FID. It needs `clean-fid` or `torchmetrics[image]` "
           "with Inception weights (downloaded on first use on a connected machine) and a folder of reference "
           "images; run it on the images of --save-images",
}
