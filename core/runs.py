"""Run folders: an erased model is its base model plus a delta of changed UNet weights.

A run folder holds ``delta.safetensors`` (only the changed parameters), ``manifest.json`` (config,
preset, deviations, seeds, versions, base model and a fingerprint of the weights it changed) and
``history.csv``, and ``history.jsonl``, each step's report appended as it happens (``read_history``).
``load_bundle(run_dir)`` loads the base and applies the delta, so "generate with the
erased model", graph rows and export are the same operation; ``run_weights(bundle, run_dir)`` swaps
a run's delta into an already loaded base for a while (the explorer, graph rows).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

RUN_KIND = "age-explorer erasure run"
DELTA = "delta.safetensors"
MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
HISTORY_TABLE = "history.csv"  # written at the end of a run; the only history of runs made before history.jsonl


class CorruptRunError(RuntimeError):
    """A run folder's files are missing, truncated or do not match their manifest."""


def is_run_dir(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest} is not valid JSON ({err}); the folder is damaged") from None
    return isinstance(data, dict) and data.get("kind") == RUN_KIND


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes: identifies the base weights a delta was made on."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_delta(run_dir: Path, changed: dict[str, torch.Tensor]) -> dict:
    """Write the delta atomically; returns the manifest fields describing it."""
    tmp = run_dir / f".{DELTA}.tmp"
    save_file(changed, str(tmp))
    os.replace(tmp, run_dir / DELTA)
    return {"delta_file": DELTA, "delta_sha256": file_sha256(run_dir / DELTA),
            "changed_parameters": len(changed),
            "changed_values": int(sum(t.numel() for t in changed.values()))}


def read_manifest(run_dir: Path) -> dict:
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptRunError(f"{run_dir / MANIFEST} is missing or not valid JSON: {err}") from err
    if manifest.get("kind") != RUN_KIND:
        raise CorruptRunError(f"{run_dir} is not an erasure run folder")
    if manifest.get("status") != "done":
        raise CorruptRunError(f"the run in {run_dir} did not finish (status {manifest.get('status')!r}); "
                              f"resume it with `age-explorer erase ... --out {run_dir} --resume`")
    return manifest


def read_delta(bundle, run_dir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The run's changed weights, after checking the delta's checksum and that it fits ``bundle``'s base."""
    path = run_dir / manifest.get("delta_file", DELTA)
    if not path.is_file():
        raise CorruptRunError(f"{path} is missing")
    if file_sha256(path) != manifest.get("delta_sha256"):
        raise CorruptRunError(f"{path} does not match the checksum in its manifest (truncated or modified)")
    try:
        delta = load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise CorruptRunError(f"{path} cannot be read: {err}") from err
    params = dict(bundle.unet.named_parameters())
    unknown = [n for n in delta if n not in params or params[n].shape != delta[n].shape]
    if unknown:
        raise CorruptRunError(f"the delta in {run_dir} does not fit the base model {bundle.source!r} "
                              f"({len(unknown)} parameter(s) missing or of another shape, e.g. {unknown[0]})")
    base_print = fingerprint({n: params[n] for n in delta})
    if manifest.get("base_fingerprint") not in (None, base_print):
        raise CorruptRunError(f"the run in {run_dir} was made on other base weights than {bundle.source!r}")
    return delta


def _copy_into(bundle, weights: dict[str, torch.Tensor]) -> None:
    params = dict(bundle.unet.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def apply_delta(bundle, run_dir: Path, manifest: dict) -> None:
    """Overwrite the base UNet's weights with the run's, after checking the delta and the base."""
    _copy_into(bundle, read_delta(bundle, run_dir, manifest))


@contextmanager
def run_weights(bundle, run_dir: str | Path) -> Iterator:
    """``bundle`` (a loaded base model) with a finished run's delta swapped into its UNet for the block,
    and its own weights back afterwards, even on error: viewing a run costs its delta, not a second
    copy of the base. The caller keeps other users of ``bundle`` out for the block's duration."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("base_revision") and bundle.revision and manifest["base_revision"] != bundle.revision:
        raise ValueError(f"run {run_dir} was made on revision {manifest['base_revision']} of "
                         f"{manifest['base_model']}, not on the loaded revision {bundle.revision}")
    delta = read_delta(bundle, run_dir, manifest)
    params = dict(bundle.unet.named_parameters())
    own = {name: params[name].detach().clone() for name in delta}
    _copy_into(bundle, delta)
    try:
        yield bundle
    finally:
        _copy_into(bundle, own)


class HistoryLog:
    """A step callback that appends each report (``asdict``) to the run folder's ``history.jsonl`` as it
    happens, so that a page can re-attach to a running job and draw its whole curve. A resumed run first
    drops the rows from its checkpoint's step on, which the stopped run had already written."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / HISTORY
        self.started = False

    def __call__(self, report) -> None:
        if not self.started:
            kept = [row for row in read_history(self.path.parent) if row["step"] < report.step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
            self.started = True
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(report)) + "\n")


def read_history(run_dir: str | Path) -> list[dict]:
    """A run's step reports, oldest first, each ``{"step", "phase", "concept", "losses": {...}, ...}``: from
    ``history.jsonl``, or from ``history.csv`` in a run folder written before it ([] when neither exists)."""
    run_dir = Path(run_dir)
    if (run_dir / HISTORY).is_file():
        lines = (run_dir / HISTORY).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if not (run_dir / HISTORY_TABLE).is_file():
        return []
    meta = {"step", "phase", "concept", "elapsed", "pick", "pick_is_neighbour"}
    rows = []
    with open(run_dir / HISTORY_TABLE, newline="") as f:
        for record in csv.DictReader(f):
            row = {"step": int(record["step"]), "phase": record["phase"], "concept": record["concept"],
                   "elapsed": float(record["elapsed"]),
                   "losses": {k: float(v) for k, v in record.items() if k not in meta and v != ""}}
            if record.get("pick"):
                row["pick"] = record["pick"]
                row["pick_is_neighbour"] = record["pick_is_neighbour"] == "True"
            rows.append(row)
    return rows
