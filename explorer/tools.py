"""Read-only queries on the concept graphs, served as API endpoints (and MCP tools with ``--mcp``).

They read the graph files only: no model is loaded, so they answer at once on any machine.
"""

from __future__ import annotations

import math

from age_explorer.core.checks import short
from age_explorer.core.graph.store import GraphStore

from .service import Explorer


def _store(explorer: Explorer, graph: str):
    graphs = explorer.graph_dirs()
    if not graphs:
        raise ValueError("no concept graph yet: compute one with `age-explorer graph`")
    if not graph:
        graph = next(iter(graphs))
    if graph not in graphs:
        raise ValueError(f"unknown graph {graph!r}; available: {', '.join(graphs)}")
    return graph, GraphStore(graphs[graph])


def list_graphs(explorer: Explorer) -> list[dict]:
    """Every graph the explorer shows: name, method, preset, target, rows measured, images per concept."""
    out = []
    for name, folder in explorer.graph_dirs().items():
        store = GraphStore(folder)
        meta = store.meta()
        out.append({"graph": name, "method": meta.get("method"), "preset": meta.get("preset"),
                    "target": meta.get("target"), "rows": len(store.rows_done()),
                    "concepts": len(store.nodes()), "images_per_concept": meta.get("images_per_concept")})
    return out


def list_concepts(explorer: Explorer, graph: str = "") -> list[dict]:
    """The concepts of a graph with their groups and baseline capability G0 (top-1)."""
    _, store = _store(explorer, graph)
    nodes = store.nodes()
    groups = [c for c in nodes.columns if c.startswith("group_")]
    return [{"concept": row.concept, "G0": round(float(row.G0_top1), 4),
             **{g[len("group_"):]: getattr(row, g) for g in groups}} for row in nodes.itertuples()]


def concept_spillover(explorer: Explorer, concept: str, graph: str = "") -> dict:
    """What erasing ``concept`` did to every other concept: Δ = G0 − G after, largest first."""
    name, store = _store(explorer, graph)
    edges = store.edges()
    row = edges[edges.erased == concept]
    if row.empty:
        done = store.rows_done()
        raise ValueError(f"{name} has no row for {concept!r}; rows measured: {', '.join(done) or 'none'}")
    row = row.sort_values("delta_top1", ascending=False)
    own = row[row.affected == concept]
    return {"graph": name, "erased": concept,
            "erased_concept_G": {"before": float(own.G_before_top1.iloc[0]), "after": float(own.G_after_top1.iloc[0])}
            if len(own) else None,
            "spillover": [{"concept": r.affected, "delta": round(float(r.delta_top1), 4)}
                          for r in row.itertuples() if r.affected != concept]}


def nearest_concepts(explorer: Explorer, concept: str, k: int = 5, graph: str = "") -> list[dict]:
    """The ``k`` concepts closest to ``concept`` in the spillover graph: the largest mean of Δ(a→b)
    and Δ(b→a) over the rows measured (a row missing in one direction counts the other alone)."""
    name, store = _store(explorer, graph)
    try:
        number = float(k)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not (math.isfinite(number) and number >= 1 and number == int(number)):  # a huge finite k: every neighbour
        raise ValueError(f"k must be a whole number of at least 1, got {short(k)}")
    k = int(number)
    edges = store.edges()
    if concept not in set(store.nodes().concept):
        raise ValueError(f"{concept!r} is not a concept of {name}")
    out_edges = edges[(edges.erased == concept) & (edges.affected != concept)].set_index("affected").delta_top1
    in_edges = edges[(edges.affected == concept) & (edges.erased != concept)].set_index("erased").delta_top1
    if out_edges.empty and in_edges.empty:
        raise ValueError(f"{name} has no measured edge touching {concept!r}")
    closeness = out_edges.to_frame("out").join(in_edges.to_frame("in"), how="outer").mean(axis=1)
    top = closeness.sort_values(ascending=False).head(k)
    return [{"concept": c, "mean_delta": round(float(v), 4)} for c, v in top.items()]


def rank_methods(explorer: Explorer) -> list[dict]:
    """The methods table: one entry per graph, ranked by the share of rows erased, then spillover on group neighbours."""
    import math

    table = explorer.methods_table()
    keep = ["rank", "method", "graph", "rows", "erased", "neighbours", "unrelated", "ESR_1", "ESR_5", "PSR_1", "PSR_5",
            "embedding_asr", "row_s"]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else (round(v, 4) if isinstance(v, float) else v))
             for k, v in row.items() if k in keep} for row in table.to_dict("records")]
