"""Prompt probes: a fixed set of prompts, no optimisation; costs only generation.

A model backend may ship probes of its own (the toy world's, built from its words); on any model a CSV in the
format of the I2P, Ring-A-Bell, MMA and UnlearnDiff prompt sets can be given instead: a ``prompt``
column, an optional seed (``seed``, ``evaluation_seed`` or ``sd_seed``) and an optional guidance
(``guidance``, ``evaluation_guidance``, ``sd_guidance_scale`` or ``guidance_scale``). Rows without a
seed use the attack's seeds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..checks import help_field
from .common import AttackConfig, AttackTarget, Probe, check_stop

SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale", "guidance_scale")


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


class PromptsAttack:
    name = "prompts"
    config_class = PromptsConfig
    # the probes do not depend on the UNet, so the base-model baseline reuses them
    depends_on_weights = False

    def learn(self, target: AttackTarget, concept: str, config: PromptsConfig, progress=None, stop=None):
        bundle = target.bundle
        if config.prompts_file:
            rows = read_prompts_csv(config.prompts_file)
            items = [("file", r["prompt"], [r["seed"]] if r["seed"] is not None else config.seed_list, r["guidance"])
                     for r in rows]
        elif (own := bundle.backend.probe_prompts(concept)) is not None:
            items = [(kind, p, config.seed_list, config.guidance) for kind, p in own]
        else:
            raise ValueError("on this model the prompts attack needs a prompts CSV (--prompts FILE: prompt, "
                             "seed, guidance, as the I2P / Ring-A-Bell / UnlearnDiff sets)")
        probes = []
        for i, (kind, prompt, seeds, guidance) in enumerate(items):
            check_stop(stop)
            probes.append(Probe(prompt, bundle.encode([prompt]), seeds, guidance, kind))
            if progress:
                progress("encode prompts", i + 1, len(items))
        return probes, {"prompts": [p.label for p in probes]}, {}
