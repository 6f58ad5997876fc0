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

from ..files import write_json_atomic

SCHEMA = "age-explorer.evaluation/1"
RESULTS, TABLE, MANIFEST = "results.json", "results.csv", "manifest.json"
# the columns of --compare, in order; rates are shown in percent
COMPARE = ("ESR-1", "ESR-5", "PSR-1", "PSR-5", "nudity_exposure_rate", "nudity_detections", "clip_score", "lpips",
           "fid")
NOT_COMPARED = {"nudity_exposed_images"}  # a count the exposure rate already shows
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
        # the paper's headline metrics first, then any other family's (a registered plugin's) in result order
        names = [*COMPARE, *(m for m in data["metrics"] if m not in COMPARE and m not in NOT_COMPARED)]
        for name in names:
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


def _value(name: str, value) -> str:
    if name in RATES:
        return f"{100 * value:.1f} %"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def card_lines(folder: str | Path) -> list[str]:
    """Markdown of an evaluation result folder for a model card: the headline metrics as a table
    (value and images counted), how each family was measured (images per class, seeds, classifier or
    detector with its version and threshold, prompts, sampler), per-class hit rates, package versions."""
    folder = Path(folder)
    data = read_results(folder)
    counts = {}
    if (folder / TABLE).is_file():
        table = pd.read_csv(folder / TABLE)
        counts = {row.metric: int(row.n) for row in table[table.scope == "all"].itertuples()}
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    lines = ["## Evaluation", "", "Measured with `age-explorer evaluate` (AGE Explorer) on the erased model; "
             "rates in percent. The numbers are in `evaluation/results.json` and `evaluation/results.csv`.", "",
             "| metric | value | images | what it counts |", "|---|---|---|---|"]
    for name, value in data["metrics"].items():
        lines.append(f"| {name} | {_value(name, value)} | {counts.get(name, '')} | {MEANING.get(name, '')} |")
    for name, why in data.get("unavailable", {}).items():  # the reason only: the how-to names local folders
        lines.append(f"| {name} | not computed | | {why.split('. ')[0].replace('|', '/')} |")
    lines.append("")
    how = []
    objects = data.get("objects")
    if objects:
        seeds = objects.get("seeds", [])
        how.append(f"- ESR / PSR: {len(seeds)} image{'s' if len(seeds) != 1 else ''} per class (seeds "
                   f"{_seeds_text(seeds)}, the same for every "
                   f"class), prompt `{objects.get('template')}`, classes of the concept set "
                   f"`{objects.get('concept_set')}` ({len(objects.get('erased', [])) + len(objects.get('kept', []))}; "
                   f"erased: {', '.join(objects.get('erased', []))}), classifier `{objects.get('classifier')}`.")
    nudity = data.get("nudity")
    if nudity:
        how.append(f"- Nudity: `{nudity.get('detector')}` (nudenet {nudity.get('nudenet')}, onnxruntime "
                   f"{nudity.get('onnxruntime')}, weights {nudity.get('weights')}), threshold "
                   f"{nudity.get('threshold')}, one image per row of `{Path(str(nudity.get('prompts_file'))).name}` "
                   f"({len(nudity.get('samples', []))} prompts, each with its own seed and guidance).")
    clip = data.get("clip")
    if clip:
        how.append(f"- CLIP score: `{clip.get('model')}`, {clip.get('definition')}, over "
                   f"{len(clip.get('samples', []))} prompt images.")
    for name in ("lpips", "fid"):
        block = data.get(name)
        if block and block.get("description"):
            how.append(f"- {block['description']}")
    sampler = data.get("sampler") or {}
    if sampler:
        how.append(f"- Images: {sampler.get('sampler')}, {sampler.get('steps')} steps, guidance "
                   f"{sampler.get('guidance')}, eta {sampler.get('eta')}.")
    lines += how + ([""] if how else [])
    per_class = (objects or {}).get("per_class") or []
    if per_class and len(per_class) <= 50:
        lines += ["Per class (hit rates: the share of the class's images with the class in the top 1 / top 5):", "",
                  "| class | role | top-1 | top-5 | images |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['role']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['images']} |" for r in per_class]
        lines.append("")
    versions = manifest.get("versions")
    if versions:
        lines += ["Versions of the evaluation: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    return lines
