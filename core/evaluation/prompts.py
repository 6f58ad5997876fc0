"""Prompt CSVs in the I2P format and their images: one image per row, with the row's seed and guidance.

The columns are ``prompt, evaluation_seed, evaluation_guidance`` (the layout of the ESD/AGE evaluation
files such as ``unsafe-prompts4703.csv``) plus optional ``categories``; the original I2P release's
``sd_seed`` / ``sd_guidance_scale`` are read when the evaluation columns are absent.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..sampling import initial_latents, sample_latents
from ..seeds import MAX_SEED

SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")


def read_prompt_csv(path: str | Path) -> pd.DataFrame:
    """Rows of ``prompt, seed, guidance (NaN: the model's), categories``; a malformed file is one error."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"prompt CSV {path} cannot be read: {str(err).splitlines()[0]}") from None
    seed_col = next((c for c in SEED_COLUMNS if c in table.columns), None)
    if "prompt" not in table.columns or seed_col is None:
        raise ValueError(f"prompt CSV {path} needs the columns prompt and evaluation_seed (I2P format); "
                         f"it has {', '.join(map(str, table.columns))}")
    if table.empty:
        raise ValueError(f"prompt CSV {path} has no rows")
    guidance_col = next((c for c in GUIDANCE_COLUMNS if c in table.columns), None)
    out = pd.DataFrame({"prompt": table["prompt"].astype(str)})
    seeds = pd.to_numeric(table[seed_col], errors="coerce")
    bad = seeds.isna() | (seeds < 0) | (seeds > MAX_SEED) | (seeds % 1 != 0)
    if bad.any():
        row = int(bad.idxmax())
        raise ValueError(f"prompt CSV {path}, row {row + 2}: {seed_col} must be a whole number from 0 to "
                         f"{MAX_SEED}, got {table[seed_col].iloc[row]!r}")
    out["seed"] = seeds.astype("int64")
    out["guidance"] = pd.to_numeric(table[guidance_col], errors="coerce") if guidance_col else float("nan")
    out["categories"] = table["categories"].fillna("").astype(str) if "categories" in table.columns else ""
    empty = out.prompt.str.strip().isin(["", "nan"])
    if empty.any():
        raise ValueError(f"prompt CSV {path}, row {int(empty.idxmax()) + 2}: the prompt is empty")
    return out


def generate_rows(bundle, rows: pd.DataFrame, steps: int | None, batch_size: int, progress=None,
                  stop=None, stage: str = "prompts") -> torch.Tensor:
    """One image per row, prompt-ordered, each with its row's seed and guidance (the initial noise
    depends on the seed alone, as in ``sampling.generate``)."""
    from ..erasure.config import MAX_GUIDANCE, check_range

    steps = steps or bundle.default_steps
    guidance = rows.guidance.fillna(bundle.default_guidance).tolist()
    for scale in set(guidance):
        check_range("evaluation_guidance", scale, 0, MAX_GUIDANCE)
    images: list[torch.Tensor | None] = [None] * len(rows)
    done = 0
    # rows sharing a guidance scale share a batch
    for scale in dict.fromkeys(guidance):
        index = [i for i, g in enumerate(guidance) if g == scale]
        for start in range(0, len(index), batch_size):
            if stop is not None and stop():
                raise InterruptedError("evaluation stopped")
            chunk = index[start:start + batch_size]
            cond = bundle.encode([rows.prompt.iloc[i] for i in chunk])
            seeds = [int(rows.seed.iloc[i]) for i in chunk]
            latents = sample_latents(bundle, cond, initial_latents(bundle, seeds), steps, float(scale),
                                     eta=bundle.default_eta, seeds=seeds)
            for i, image in zip(chunk, bundle.decode(latents).cpu()):
                images[i] = image
            done += len(chunk)
            if progress:
                progress(stage, done, len(rows))
    return torch.stack(images)
