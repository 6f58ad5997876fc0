"""The attacks' configs and the prompts-CSV reader, without torch: the registry, ``attack --help`` and
the explorer's forms read them before any model loads.

Each attack's config lists its fields with help text and defaults and validates them on construction.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from ..checks import check_count, check_finite, check_positive, check_template, field_help, help_field
from ..erasure.config import MAX_BATCH, MAX_DDIM_STEPS, MAX_ITERATIONS
from ..seeds import MAX_SEEDS, parse_seeds

SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale", "guidance_scale")


@dataclass
class AttackConfig:
    """Fields every attack shares. Evaluation seeds are the same for recovered, original and erased images."""

    attack: ClassVar[str] = ""

    concept: str | None = help_field("the erased concept to recover (default: the run's first)", None)
    seeds: str = help_field("evaluation seeds (N images per prompt)", "1000-1015")
    template: str = help_field("prompt of the concept, {c} = concept; learned tokens take the place of {c}",
                          "a photo of a {c}")
    sample_steps: int | None = help_field("DDIM steps of evaluation images (default: the model's)", None)
    guidance: float | None = help_field("CFG scale of evaluation images (default: the model's)", None)
    seed: int = help_field("seed of the attack's own random draws", 0)

    def __post_init__(self):
        if self.concept is not None:
            self.concept = self.concept.strip()
            if not self.concept:
                raise ValueError("concept is empty: give the erased concept, or leave it out for the run's own")
        self.seeds = str(self.seeds)
        parse_seeds(self.seeds)
        check_template("template", self.template, "{c}")
        if self.sample_steps is not None:
            check_count("sample_steps", self.sample_steps, 1, MAX_DDIM_STEPS)
        if self.guidance is not None:
            check_finite("guidance", self.guidance)

    @property
    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    def to_dict(self) -> dict:
        return {"attack": self.attack, **asdict(self)}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return field_help(cls)


@dataclass
class OptimConfig(AttackConfig):
    """Fields of the attacks that optimise an input against the denoising objective."""

    steps: int = help_field("optimisation steps", 200)
    lr: float = help_field("Adam learning rate", 5e-2)
    batch_size: int = help_field("noised images per step", 4)
    train_images: int = help_field("images of the concept made by the base model (the attack's data)", 8)
    train_seed: int = help_field("first seed of the training images (seeds train_seed .. train_seed+N-1)", 0)

    def __post_init__(self):
        super().__post_init__()
        for name, most in (("steps", MAX_ITERATIONS), ("batch_size", MAX_BATCH), ("train_images", MAX_SEEDS)):
            check_count(name, getattr(self, name), 1, most)
        check_positive("lr", self.lr)
        overlap = set(self.train_seeds) & set(self.seed_list)
        if overlap:
            raise ValueError(f"training seeds and evaluation seeds overlap ({min(overlap)}, ...): an attack is "
                             f"judged on images it was not fitted to; move train_seed or seeds")

    @property
    def train_seeds(self) -> list[int]:
        return list(range(self.train_seed, self.train_seed + self.train_images))


@dataclass
class PromptsConfig(AttackConfig):
    """Probe the erased model with prompts that avoid the erased wording."""

    attack = "prompts"

    prompts_file: str | None = help_field("CSV of prompts (prompt, optional seed and guidance); "
                                     "default on the toy world: probes built from the world", None)

    def __post_init__(self):
        super().__post_init__()
        if self.prompts_file is not None:
            read_prompts_csv(self.prompts_file)  # a bad file fails at construction, before any work


def read_prompts_csv(path: str | Path) -> list[dict]:
    """Rows ``{prompt, seed, guidance}`` (seed and guidance may be None); one clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable UTF-8 CSV file: {err}") from err
    if "prompt" not in columns:
        raise ValueError(f"{path} has no 'prompt' column (columns: {', '.join(c for c in columns if c) or 'none'}); "
                         f"expected prompt[,seed|evaluation_seed][,guidance|evaluation_guidance]")
    if not rows:
        raise ValueError(f"{path} has no prompts (an empty file, or a header only)")
    seed_col = next((columns[c] for c in SEED_COLUMNS if c in columns), None)
    guid_col = next((columns[c] for c in GUIDANCE_COLUMNS if c in columns), None)
    out = []
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise ValueError(f"{path} line {line}: more fields than columns (quote prompts that contain commas)")
        prompt = (row[columns["prompt"]] or "").strip()
        if not prompt:
            raise ValueError(f"{path} line {line}: the prompt is empty")
        seed = guidance = None
        if seed_col and (row[seed_col] or "").strip():
            value = row[seed_col].strip()
            try:
                seed = int(float(value))
            except ValueError:
                raise ValueError(f"{path} line {line}: seed {value!r} is not an integer") from None
            if seed < 0 or seed != float(value):
                raise ValueError(f"{path} line {line}: seed {value!r} must be a whole number >= 0")
        if guid_col and (row[guid_col] or "").strip():
            value = row[guid_col].strip()
            try:
                guidance = float(value)
            except ValueError:
                raise ValueError(f"{path} line {line}: guidance {value!r} is not a number") from None
            if not math.isfinite(guidance):
                raise ValueError(f"{path} line {line}: guidance must be finite, got {value!r}")
        out.append({"prompt": prompt, "seed": seed, "guidance": guidance})
    return out


@dataclass
class EmbeddingConfig(OptimConfig):
    """Learn 1-4 new tokens on the erased model; generate with them in the concept's place."""

    attack = "embedding"

    tokens: int = help_field("number of new tokens learned (1-4)", 2)
    lr: float = help_field("Adam learning rate of the new embeddings", 0.1)
    placeholder: str = help_field("text of the new tokens; token i is '<placeholder-i>'", "attack")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.tokens <= 4:
            raise ValueError(f"tokens must be between 1 and 4, got {self.tokens}")
        if not self.placeholder.strip() or any(ch.isspace() or ch in "<>" for ch in self.placeholder):
            raise ValueError(f"placeholder must be one word without < or >, got {self.placeholder!r}")


@dataclass
class PerturbConfig(OptimConfig):
    """Perturb the plain prompt's word embeddings within an L2 ball per token."""

    attack = "perturb"

    epsilon: float = help_field("per-token L2 bound, relative to the mean norm of the vocabulary's embeddings", 0.5)
    lr: float = help_field("Adam learning rate, relative to the absolute bound", 0.1)

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon}")
