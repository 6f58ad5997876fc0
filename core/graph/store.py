"""A concept graph on disk, as plain files a data scientist opens with pandas.

- ``nodes.csv``: concept, its group(s), G_0 top-1 / top-k, flags;
- ``edges.csv``: erased, affected, G before, G after, Delta top-1, Delta top-k (one block per row);
- ``graph.json``: model, method, preset, classifier, prompt template, seeds, N, versions, timings;
- ``recovery.csv`` (optional): per erased concept and recovery attack, its ASR (``graph/recovery.py``).
- ``umap.csv`` / ``umap.json`` (optional): the explorer's UMAP map of the concepts (``graph/embedding_map.py``).
Each file is replaced atomically (temp + rename), so a killed sweep loses at most the row in progress.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import networkx as nx
import pandas as pd

from ..files import publish, write_json_atomic

NODES, EDGES, META = "nodes.csv", "edges.csv", "graph.json"
EDGE_COLUMNS = ["erased", "affected", "G_before_top1", "G_after_top1", "delta_top1",
                "G_before_topk", "G_after_topk", "delta_topk"]
RECOVERY = "recovery.csv"
RECOVERY_COLUMNS = ["erased", "attack", "asr", "asr_best", "asr_base", "asr_plain", "images_per_probe", "probes",
                    "seeds", "run_preset", "seconds"]


class DamagedGraphError(ValueError):
    """A graph file that cannot be read as one; the message names the file."""


def _read(path: Path, reader, required: tuple[str, ...] = ()):
    try:
        data = reader(path)
    except (ValueError, OSError) as err:  # pandas' parser errors and JSONDecodeError are ValueErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DamagedGraphError(f"{path} is damaged: {first[:150]}") from None
    missing = [c for c in required if c not in data]
    if missing:
        raise DamagedGraphError(f"{path} is damaged: it has no {', '.join(missing)} "
                                f"{'field' if isinstance(data, dict) else 'column'}")
    return data


class GraphMismatchError(ValueError):
    """A graph folder was made with another model, method or measurement."""


def _json_object(text: str) -> dict:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_csv(tmp, index=False)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GraphStore:
    """Identity fields of ``graph.json`` must match for rows to be added to an existing folder."""

    IDENTITY = ("model", "model_revision", "method", "preset", "target", "options", "evaluator", "concept_set", "template", "capability")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def exists(self) -> bool:
        return (self.folder / META).is_file()

    def meta(self) -> dict:
        if not self.exists:
            raise FileNotFoundError(f"{self.folder} holds no graph ({META} is missing)")
        return _read(self.folder / META, lambda p: _json_object(p.read_text()), ("model", "method"))

    def open(self, meta: dict) -> None:
        """Create the folder, or check that an existing graph was made the same way."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.exists:
            old = self.meta()
            diffs = [k for k in self.IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(meta.get(k), sort_keys=True)]
            if diffs:
                details = "; ".join(f"{k}: {old.get(k)!r} here, {meta.get(k)!r} asked" for k in diffs)
                raise GraphMismatchError(f"{self.folder} holds a graph made differently ({details}); "
                                         f"use another folder")
            return
        write_json_atomic(self.folder / META, {**meta, "row_seconds": {}})

    def update_meta(self, **fields) -> None:
        meta = self.meta()
        meta.update(fields)
        write_json_atomic(self.folder / META, meta)

    def nodes(self) -> pd.DataFrame | None:
        path = self.folder / NODES
        return _read(path, pd.read_csv, ("concept",)) if path.is_file() else None

    def write_nodes(self, nodes: pd.DataFrame) -> None:
        _write_csv_atomic(nodes, self.folder / NODES)

    def edges(self) -> pd.DataFrame:
        path = self.folder / EDGES
        if not path.is_file():
            return pd.DataFrame(columns=EDGE_COLUMNS)
        return _read(path, lambda p: pd.read_csv(p, keep_default_na=False), tuple(EDGE_COLUMNS))

    def version(self) -> tuple:
        """Changes whenever a file of the graph is rewritten (files are replaced atomically): a key for
        caching what is drawn from it."""
        return tuple((name, path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else (name,)
                     for name in (META, NODES, EDGES, RECOVERY) for path in [self.folder / name])

    def check(self) -> None:
        """Read every file once: a damaged one raises :class:`DamagedGraphError` naming it."""
        self.meta(), self.nodes(), self.edges()

    def recovery(self) -> pd.DataFrame | None:
        """ASR per erased concept and attack, when the graph has a recovery layer."""
        path = self.folder / RECOVERY
        return pd.read_csv(path, keep_default_na=False) if path.is_file() else None

    def rows_done(self) -> list[str]:
        return list(dict.fromkeys(self.edges().erased))

    def add_row(self, erased: str, row: pd.DataFrame, seconds: float | None = None) -> None:
        """Add (or replace) the row of one erased concept."""
        edges = self.edges()
        edges = edges[edges.erased != erased]
        edges = pd.concat([edges, row[EDGE_COLUMNS]], ignore_index=True) if len(edges) else row[EDGE_COLUMNS]
        _write_csv_atomic(edges, self.folder / EDGES)
        if seconds is not None:
            meta = self.meta()
            meta.setdefault("row_seconds", {})[erased] = round(seconds, 1)
            write_json_atomic(self.folder / META, meta)

    def matrix(self, kind: str = "delta_top1") -> pd.DataFrame:
        """Delta as a matrix: rows = erased, columns = affected, ordered as the nodes."""
        return delta_matrix(self.nodes(), self.edges(), kind)

    def to_networkx(self) -> nx.DiGraph:
        graph = nx.DiGraph(**{k: v for k, v in self.meta().items() if isinstance(v, (str, int, float))})
        for node in self.nodes().to_dict("records"):
            graph.add_node(node["concept"], **{k: v for k, v in node.items() if k != "concept"})
        for edge in self.edges().to_dict("records"):
            if edge["erased"] != edge["affected"]:
                graph.add_edge(edge["erased"], edge["affected"], weight=edge["delta_top1"],
                               **{k: v for k, v in edge.items() if k not in ("erased", "affected")})
        return graph


def model_graphs(roots: list[tuple[Path, str]], model: str, revision: str | None,
                 readable=lambda store: True) -> dict[str, Path]:
    """The graphs of ``model`` (at weights ``revision``, when known) under each (root, tag), labelled
    ``"<name> (<tag>)"``: per root the most complete first, on a tie the ESD graph (the paper's
    Section 3 baseline the others are compared with). The first one is the graph a page draws first."""
    found = {}
    for root, tag in roots:
        if not root.is_dir():
            continue
        stores = [s for s in map(GraphStore, sorted(root.iterdir())) if s.exists and readable(s)]
        metas = [(s, s.meta()) for s in stores]
        # a graph of another model, or of an earlier training of the toy model, is not this one's
        metas = [(s, m) for s, m in metas if m.get("model") == model
                 and (revision is None or m.get("model_revision") == revision)]
        for store, _ in sorted(metas, key=lambda sm: (-len(sm[0].rows_done()), sm[1].get("method") != "esd")):
            found[f"{store.folder.name} ({tag})"] = store.folder
    return found


def delta_matrix(nodes: pd.DataFrame, edges: pd.DataFrame, kind: str = "delta_top1") -> pd.DataFrame:
    """A graph's edges as a matrix: rows = erased, columns = affected, ordered as the nodes (from files
    already read, so a caller holding them does not read them again)."""
    order = list(nodes.concept)
    erased = set(edges.erased)
    return edges.pivot(index="erased", columns="affected", values=kind).reindex(
        index=[c for c in order if c in erased], columns=order)
