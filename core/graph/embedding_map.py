"""A 2-D map (UMAP) of a graph's concepts: their prompts' text-encoder states, cached beside the graph.

umap-learn compiles itself with numba on its first use in a process (minutes on a CPU), so a graph
folder may carry its map: ``umap.csv`` (``concept,x,y``) and ``umap.json`` (the model and revision, the
prompts, the UMAP parameters and seed, the library versions). The explorer reads the cache when it
matches the graph (same concepts, same model and revision) and computes the map otherwise.
``python scripts/umap_cache.py [GRAPH_DIR ...]`` writes it (the shipped graphs' maps were made so).
"""

from __future__ import annotations

import csv
import json
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from ..files import write_json_atomic

UMAP_TABLE, UMAP_META = "umap.csv", "umap.json"
SEED = 0
NEIGHBOURS = 8  # at most; a graph of n concepts uses n - 1 when that is fewer


def umap_parameters(n_concepts: int) -> dict:
    """The UMAP arguments of a map of ``n_concepts`` points (the rest are umap-learn's defaults)."""
    return {"n_neighbors": min(NEIGHBOURS, n_concepts - 1), "random_state": SEED}


def compute_map(bundle, prompts: list[str]) -> np.ndarray:
    """UMAP of the flattened text-encoder states of ``prompts``: one (x, y) row per prompt."""
    import umap

    states = bundle.encode(list(prompts)).float().flatten(1).cpu().numpy()
    return umap.UMAP(**umap_parameters(len(prompts))).fit_transform(states)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_map(folder: str | Path, concepts: list[str], prompts: list[str], coords: np.ndarray,
              graph_meta: dict) -> None:
    """Write ``umap.csv`` and ``umap.json`` into a graph folder; ``graph_meta``: its ``graph.json``."""
    folder = Path(folder)
    partial = folder / f".{UMAP_TABLE}.partial"
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["concept", "x", "y"])
        for concept, (x, y) in zip(concepts, np.asarray(coords, dtype=float)):
            writer.writerow([concept, f"{x:.6f}", f"{y:.6f}"])
    os.replace(partial, folder / UMAP_TABLE)
    write_json_atomic(folder / UMAP_META, {
        "model": graph_meta.get("model"),
        "model_revision": graph_meta.get("model_revision"),
        "input": "text-encoder states of each concept's prompt, flattened",
        "prompts": dict(zip(concepts, prompts)),
        "umap": umap_parameters(len(concepts)),
        "versions": {p: _version(p) for p in ("umap-learn", "numba", "pynndescent", "numpy", "torch")},
    })


def read_map(folder: str | Path, concepts: list[str], graph_meta: dict) -> np.ndarray | None:
    """The cached map of ``concepts`` in their order, or None when the folder has none or it is not
    this graph's (other concepts, another model or revision, a damaged file)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / UMAP_META).read_text())
        with open(folder / UMAP_TABLE, newline="") as f:
            rows = {r["concept"]: (float(r["x"]), float(r["y"])) for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != graph_meta.get(k) for k in ("model", "model_revision")):
        return None
    if set(rows) != set(concepts) or len(rows) != len(concepts):
        return None
    coords = np.array([rows[c] for c in concepts], dtype=float)
    return coords if all(math.isfinite(v) for v in coords.flat) else None
