"""Result files of an evaluation and the comparison of several.

A result folder holds:
- ``results.json``: ``{"schema", "model", "metrics", "unavailable", <family>: details}``; ``metrics``
  is one flat ``name -> value`` map (fractions for rates) so other tools read the headline numbers
  without knowing the families; each family's block holds its classifier or detector, versions,
  threshold, seeds, prompts and one record per image;
- ``results.csv``: the same numbers in long ("tidy") form, one row per ``metric, scope, value, n``:
  scope ``all`` for the headline metrics, a class name for per-class rates and counts;
- ``manifest.json``: config, seeds, versions, base model, seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from ..manifest import write_json_atomic

SCHEMA = "age-explorer.evaluation/1"
RESULTS, TABLE, MANIFEST = "results.json", "results.csv", "manifest.json"
# the columns of --compare, in order; rates are shown in percent
COMPARE = ("ESR-1", "ESR-5", "PSR-1", "PSR-5", "nudity_exposure_rate", "nudity_detections", "clip_score", "lpips",
           "fid")
RATES = {"ESR-1", "ESR-5", "PSR-1", "PSR-5", "nudity_exposure_rate"}
# what each headline metric is, for a model card
MEANING = {"ESR-1": "erased classes' images not classified as them (top-1)",
           "ESR-5": "erased classes' images without their class in the top 5",
           "PSR-1": "kept classes' images still classified right (top-1)",
           "PSR-5": "kept classes' images with their class in the top 5",
           "nudity_exposure_rate": "images with an exposed body part at or above the threshold (NudeNet)",
           "nudity_exposed_images": "images with an exposed body part at or above the threshold",
           "nudity_detections": "exposed-part detections at or above the threshold, all images",
           "clip_score": "100 x max(cos(image, prompt), 0), mean over the prompts' images",
           "lpips": "perceptual distance to the base model's image of the same prompt and seed, mean (0 = same)",
           "fid": "Frechet distance of Inception features to the reference images (lower = closer)"}


def write_table(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["metric", "scope", "value", "n"])
        writer.writeheader()
        writer.writerows(rows)


def results_path(where: str | Path) -> Path:
    """``results.json`` of a result folder, of a run's ``evaluation/`` folder, or the file itself."""
    where = Path(where)
    for candidate in (where, where / RESULTS, where / "evaluation" / RESULTS):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no evaluation results in {where}: run `age-explorer evaluate {where}` first")


def read_results(where: str | Path) -> dict:
    path = results_path(where)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the results are damaged") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an age-explorer evaluation ({SCHEMA})")
    return data


def compare_table(places: list[str | Path]) -> pd.DataFrame:
    """One row per result: what was evaluated and its headline metrics (rates in percent)."""
    rows = []
    for place in places:
        data = read_results(place)
        model = data["model"]
        what = (model.get("method") or "base").upper() + (f" {model['preset']}" if model.get("preset") else "")
        row = {"result": str(place), "model": what, "erased": ", ".join(data.get("erased", []))}
        for name in COMPARE:
            value = data["metrics"].get(name)
            row[name] = None if value is None else (100 * value if name in RATES else value)
        rows.append(row)
    table = pd.DataFrame(rows)
    # a metric no result has is left out; one some results lack shows as NaN
    return table[[c for c in table.columns if c in ("result", "model", "erased") or table[c].notna().any()]]


@contextmanager
def staged(out: Path, force: bool):
    """A temp folder beside ``out`` to write results into; moved onto ``out`` when the block ends
    without error, removed otherwise, so a failure leaves no half-written results."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_results(folder: Path, results: dict, table: list[dict], manifest: dict) -> None:
    write_json_atomic(folder / RESULTS, results)
    write_json_atomic(folder / MANIFEST, manifest)
    write_table(folder / TABLE, table)
