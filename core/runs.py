"""Run folders: an erased model is its base model plus a delta of changed UNet weights.

A run folder holds ``delta.safetensors`` (only the changed parameters), ``manifest.json``
(:class:`RunManifest`: config, preset, deviations, seeds, versions, base model and a fingerprint of the
weights it changed), ``history.csv``, and ``history.jsonl``, each step's report appended as it happens
(``read_history``). ``load_bundle(run_dir)`` loads the base and applies the delta, so "generate with the
erased model", graph rows and export are the same operation; ``run_weights(bundle, run_dir)`` swaps a
run's delta into an already loaded base for a while (the explorer, graph rows).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .files import file_sha256, write_json_atomic

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


def write_delta(run_dir: Path, changed: dict[str, torch.Tensor]) -> dict:
    """Write the delta atomically; returns the manifest fields describing it."""
    tmp = run_dir / f".{DELTA}.tmp"
    save_file(changed, str(tmp))
    os.replace(tmp, run_dir / DELTA)
    return {"delta_file": DELTA, "delta_sha256": file_sha256(run_dir / DELTA),
            "changed_parameters": len(changed),
            "changed_values": int(sum(t.numel() for t in changed.values()))}


RUN_STATUSES = ("done", "stopped")
_OPTIONAL = "left out of the file while None"


_OBJECT_FIELDS = ("versions", "targets", "candidates", "excluded_candidates", "near_copy", "erase_term",
                  "neighbour_picks", "target_preservation")  # the manifest's fields that hold a JSON object


def _optional():
    return field(default=None, metadata={_OPTIONAL: True})


@dataclass(kw_only=True)
class RunManifest:
    """A run folder's ``manifest.json`` as a value, written by :meth:`write` and read by :meth:`read`.

    The file is one flat JSON object whose keys are these fields' names; ``extra`` holds any other key
    (a registered method's own results) and is written at the top level too. The fields only some runs
    have (AGE's results, a finished run's delta, the target check) are left out of the file while None.
    A manifest read from disk writes back the keys it had: one made before a field existed (e.g.
    ``cpu_threads``) stays without it until the field is set.
    """

    kind: str = RUN_KIND
    status: str  # "done" or "stopped"
    method: str
    preset: str | None = None
    deviations_from_paper: list[str] = field(default_factory=list)
    concepts: list[str]
    config: dict  # the method config's to_dict()
    seed: int | None = None
    steps_done: int
    base_model: str
    base_model_kind: str | None = None  # the backend's name ("toy", "stable-diffusion")
    base_revision: str | None = None
    base_fingerprint: str | None = None  # runs.fingerprint of the base values of the changed weights
    device: str | None = None
    dtype: str | None = None
    # the CPU thread count changes the order of float sums, so it is part of what reproduces a run (None on a GPU)
    cpu_threads: int | None = None
    loss_space: str | None = None
    seconds: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # AGE's results (erasure/age.py, extra_results)
    targets: dict[str, list] | None = _optional()  # erased concept -> [[candidate, pi], ...], best first
    candidates: dict[str, int] | None = _optional()
    excluded_candidates: dict[str, list[str]] | None = _optional()
    pi_mode: str | None = _optional()
    near_copy: dict[str, list[dict]] | None = _optional()
    erase_term: dict[str, list[float]] | None = _optional()
    erase_weight: float | None = _optional()
    neighbour_picks: dict[str, float] | None = _optional()
    extra: dict = field(default_factory=dict)  # any other key, e.g. a registered method's own results
    # the delta (write_delta): a stopped run has none
    delta_file: str | None = _optional()
    delta_sha256: str | None = _optional()
    changed_parameters: int | None = _optional()
    changed_values: int | None = _optional()
    # AGE: the top-1 targets' own G after the run (erasure/preservation.py), added to a finished run
    target_preservation: dict[str, dict] | None = _optional()
    _keys: frozenset | None = field(default=None, init=False, repr=False, compare=False)  # the keys read

    def __post_init__(self):
        if self.kind != RUN_KIND:
            raise ValueError(f"kind is {self.kind!r}, not {RUN_KIND!r}")
        if self.status not in RUN_STATUSES:
            raise ValueError(f"status is {self.status!r}, not one of {', '.join(RUN_STATUSES)}")
        if isinstance(self.concepts, str) or not isinstance(self.concepts, (list, tuple)):
            raise ValueError(f"concepts must be a list of prompts, not {self.concepts!r}")
        self.concepts = list(self.concepts)
        if not isinstance(self.config, dict):
            raise ValueError(f"config must be a JSON object, not {type(self.config).__name__}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, not {type(self.extra).__name__}")
        for name in _OBJECT_FIELDS:  # e.g. targets written as a string by hand: refused here, not mid-export
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a JSON object, not {type(value).__name__}")
        clash = sorted(set(self.extra) & set(_KEYS))
        if clash:
            raise ValueError(f"extra repeats the manifest field(s) {', '.join(clash)}; set the field itself")

    @staticmethod
    def keywords(data: dict) -> dict:
        """Constructor keywords for a flat manifest mapping: its keys that are fields, the others as ``extra``."""
        return {**{k: v for k, v in data.items() if k in _KEYS},
                "extra": {k: v for k, v in data.items() if k not in _KEYS}}

    @classmethod
    def from_dict(cls, data: dict, run_dir: str | Path | None = None) -> RunManifest:
        """The manifest of a JSON object as ``to_dict`` writes it (CorruptRunError when it is not one)."""
        where = run_dir if run_dir is not None else "the manifest"
        if not isinstance(data, dict) or data.get("kind") != RUN_KIND:
            raise CorruptRunError(f"{where} is not an erasure run folder")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CorruptRunError(f"the manifest of {where} lacks {', '.join(missing)}")
        try:
            manifest = cls(**cls.keywords(data))
        except (TypeError, ValueError) as err:
            raise CorruptRunError(f"the manifest of {where} is damaged: {err}") from err
        manifest._keys = frozenset(data)
        return manifest

    @classmethod
    def read(cls, run_dir: str | Path, finished: bool = True) -> RunManifest:
        """``run_dir``'s manifest; CorruptRunError when it is missing or damaged, and with ``finished``
        (the default) when the run did not finish (a stopped run can only be resumed)."""
        run_dir = Path(run_dir)
        try:
            data = json.loads((run_dir / MANIFEST).read_text())
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not text
            raise CorruptRunError(f"{run_dir / MANIFEST} is missing or not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("kind") != RUN_KIND:
            raise CorruptRunError(f"{run_dir} is not an erasure run folder")
        if finished and data.get("status") != "done":
            raise CorruptRunError(f"the run in {run_dir} did not finish (status {data.get('status')!r}); "
                                  f"resume it with `age-explorer erase ... --out {run_dir} --resume`")
        return cls.from_dict(data, run_dir)

    def to_dict(self) -> dict:
        """The JSON object of ``manifest.json`` (a copy: changing it leaves the manifest as it is)."""
        out = {}
        for f in fields(self):
            if f.name == "extra":
                out.update(deepcopy(self.extra))
            elif f.init and self._written(f):
                out[f.name] = deepcopy(getattr(self, f.name))
        return out

    def write(self, run_dir: str | Path) -> None:
        """Write ``run_dir/manifest.json`` atomically (readers never see half a file)."""
        write_json_atomic(Path(run_dir) / MANIFEST, self.to_dict())

    def _written(self, f) -> bool:
        value = getattr(self, f.name)
        if self._keys is not None:  # read from a file: its keys, and the ones set since
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            return f.name in self._keys or value != default
        return value is not None or not f.metadata.get(_OPTIONAL)


_KEYS = tuple(f.name for f in fields(RunManifest) if f.init and f.name != "extra")  # the fields' JSON keys
# the keys every run manifest has had: without them it cannot be loaded or described
_REQUIRED = tuple(f.name for f in fields(RunManifest)
                  if f.init and f.default is MISSING and f.default_factory is MISSING)


def read_delta(bundle, run_dir: Path, manifest: RunManifest) -> dict[str, torch.Tensor]:
    """The run's changed weights, after checking the delta's checksum and that it fits ``bundle``'s base."""
    path = run_dir / (manifest.delta_file or DELTA)
    if not path.is_file():
        raise CorruptRunError(f"{path} is missing")
    if file_sha256(path) != manifest.delta_sha256:
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
    if manifest.base_fingerprint not in (None, base_print):
        raise CorruptRunError(f"the run in {run_dir} was made on other base weights than {bundle.source!r}")
    # a checksum proves the file is the one written, not that its numbers are usable
    broken = next((n for n, t in delta.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise CorruptRunError(f"the delta in {run_dir} holds values that are not finite numbers (NaN or "
                              f"infinity, e.g. in {broken}): the run cannot be used")
    return delta


def _copy_into(bundle, weights: dict[str, torch.Tensor]) -> None:
    params = dict(bundle.unet.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def apply_delta(bundle, run_dir: Path, manifest: RunManifest) -> None:
    """Overwrite the base UNet's weights with the run's, after checking the delta and the base."""
    _copy_into(bundle, read_delta(bundle, run_dir, manifest))


@contextmanager
def run_weights(bundle, run_dir: str | Path) -> Iterator:
    """``bundle`` (a loaded base model) with a finished run's delta swapped into its UNet for the block,
    and its own weights back afterwards, even on error: viewing a run costs its delta, not a second
    copy of the base. The caller keeps other users of ``bundle`` out for the block's duration."""
    run_dir = Path(run_dir)
    manifest = RunManifest.read(run_dir)
    if manifest.base_revision and bundle.revision and manifest.base_revision != bundle.revision:
        raise ValueError(f"run {run_dir} was made on revision {manifest.base_revision} of "
                         f"{manifest.base_model}, not on the loaded revision {bundle.revision}")
    with delta_weights(bundle, read_delta(bundle, run_dir, manifest)):
        yield bundle


@contextmanager
def delta_weights(bundle, delta: dict[str, torch.Tensor]) -> Iterator:
    """``bundle`` with the UNet tensors of ``delta`` (checked by :func:`read_delta`) swapped in for the
    block, and its own back afterwards, even on error."""
    params = dict(bundle.unet.named_parameters())
    own = {name: params[name].detach().clone() for name in delta}
    _copy_into(bundle, delta)
    try:
        yield bundle
    finally:
        _copy_into(bundle, own)


class BaseWeights:
    """The base model's values of the UNet tensors a run changed, to swap into the run's loaded bundle
    (``with base.active(): ...``) instead of holding a second model on the device. The base is read
    once, on the CPU, and dropped."""

    def __init__(self, bundle, base):
        """``bundle``: a loaded run; ``base``: its base model on the CPU (``core.bundle.load_base(bundle)``)."""
        manifest = bundle.run_manifest
        names = list(load_file(str(Path(bundle.source) / (manifest.delta_file or DELTA))))
        base_params = dict(base.unet.named_parameters())
        self.names = [n for n, _ in bundle.unet.named_parameters() if n in names]
        self.base = {n: base_params[n].detach().clone() for n in self.names}
        self.bundle = bundle

    @contextmanager
    def active(self):
        """The bundle computes with the base weights inside the block; the run's are back after it."""
        params = dict(self.bundle.unet.named_parameters())
        erased = {n: params[n].detach().clone() for n in self.names}
        _copy_into(self.bundle, self.base)
        try:
            yield self.bundle
        finally:
            _copy_into(self.bundle, erased)




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
        lines = [line for line in (run_dir / HISTORY).read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # cut short by a kill or a full disk mid-write: a resume rewrites it
                    break
                raise CorruptRunError(f"{run_dir / HISTORY}: line {i + 1} is not a step report; delete the file "
                                      "to resume without the curve so far") from None
        return rows
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
