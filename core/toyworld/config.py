"""The toy model's training recipe as a config (defaults are the shipped model's); no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ToyTrainConfig:
    """Hyper-parameters of the toy model recipe (defaults are the shipped model's)."""

    steps: int = field(default=4200, metadata={"help": "UNet/text-encoder optimisation steps"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the UNet"})
    text_lr: float = field(default=4e-3, metadata={"help": "peak learning rate of the text encoder (faster: conditioning is learned late)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps"})
    final_lr_fraction: float = field(default=0.1, metadata={"help": "cosine decay ends at this fraction of the peak"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    ema_decay: float = field(default=0.999, metadata={"help": "decay of the evaluated EMA weights"})
    pool_size: int = field(default=40000, metadata={"help": "pre-rendered training images"})
    classifier_steps: int = field(default=2500, metadata={"help": "classifier optimisation steps"})
    classifier_lr: float = field(default=3e-3, metadata={"help": "classifier OneCycle peak learning rate"})
    prediction_type: str = field(default="v_prediction", metadata={"help": "what the UNet predicts: v_prediction (as SD 2.x) or epsilon (as SD 1.x; its samples carry a per-seed colour cast, see docs/toyworld.md)"})
    snapshot_every: int = field(default=1000, metadata={"help": "write the EMA model to the output folder every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of rendering, initialisation and batches"})
    init_from: str = field(default="", metadata={"help": "continue from this toy model folder (its weights and classifier)"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "pool_size", "snapshot_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "text_lr", "classifier_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {self.prediction_type!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
