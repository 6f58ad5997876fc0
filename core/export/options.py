"""What an export can be, without torch: the formats, the LoRA files' names and the LoRA rank.

``age-explorer export --help`` builds its flags from these (``core/export/writers.py`` does the work).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMATS = ("delta", "diffusers", "lora", "checkpoint")
PEFT_FOLDER = "diffusers"  # the PEFT LoRA's folder in a LoRA export: pipe.load_lora_weights(EXPORT/diffusers)
PEFT_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
KOHYA_SUFFIX = "-comfyui-a1111.safetensors"  # the kohya LoRA's name: <export name><suffix>, for those two tools
CHECKPOINT_SUFFIX = ".safetensors"  # the single-file checkpoint's name: <export name><suffix>
FULL_RANK = "full"
DEFAULT_RANK = 64


def kohya_file(export_name: str) -> str:
    """The kohya LoRA's file name in the export ``export_name``: the name says which tools it is for, so
    that the PEFT file (in ``diffusers/``) is not the one dropped into their LoRA folder."""
    return f"{export_name}{KOHYA_SUFFIX}"


def parse_rank(text: str | int | None) -> int | None:
    """``"full"`` (or None) -> None, a positive whole number -> itself; anything else is an error."""
    if text is None or str(text).strip().lower() == FULL_RANK:
        return None
    try:
        rank = int(str(text).strip())
    except ValueError:
        raise ValueError(f"bad LoRA rank {str(text)[:40]!r}: use a whole number from 1 up, or 'full'") from None
    if rank < 1:
        raise ValueError(f"bad LoRA rank {rank}: use a whole number from 1 up, or 'full'")
    return rank


@dataclass
class LoraExportConfig:
    """How a run's delta becomes a LoRA."""

    rank: int | None = field(default=DEFAULT_RANK, metadata={
        "help": f"LoRA rank: the singular values kept per weight matrix, or '{FULL_RANK}' for all of them "
                f"(exact up to float rounding; default {DEFAULT_RANK})"})

    def __post_init__(self):
        self.rank = parse_rank(self.rank)

    def to_dict(self) -> dict:
        return asdict(self)
