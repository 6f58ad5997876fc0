"""The methods table: every graph of one concept set ranked by how well its method erases and preserves.

One row per graph (a method and its recipe); every figure is measured on that graph's own rows with
the same prompts, seeds and classifier, so the rows compare like with like:

- ``erased``: rows whose erased concept keeps G top-1 after <= ``ERASED_G`` (out of ``rows``);
- ``same_<grouping>`` (e.g. same shape, same colour) and ``unrelated``: mean spillover Delta top-1
  on the concept's group neighbours and on concepts related by no group, with the spread across rows;
- ESR-k / PSR-k (the paper's Imagenette metrics, here on the graph's images): the share of the erased
  concept's images whose class is not in the top-k, and of the other concepts' images whose class is;
- ``embedding_asr``: the recovery layer's embedding attack success rate (mean over its rows), when
  the graph has one;
- ``row_s``: mean seconds of a row (erasure and the measurement of every concept) as recorded while
  the graph was built; the measurement part is the same work for every method.

Ranked by the share of rows erased (a method that does not erase cannot win), then by the mean
spillover on group neighbours.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .analysis import locality
from .concept_sets import ConceptSet
from .store import GraphStore

ERASED_G = 0.10


def graph_label(meta: dict) -> str:
    """A short name of a graph's method and recipe: "AGE (toy-fast, target_search damage_floor)"."""
    from ..erasure import METHODS

    method = meta.get("method", "?")
    name = METHODS[method].display_name.split(" (")[0] if method in METHODS else method
    options = {k: v for k, v in (meta.get("options") or {}).items() if k != "target"}
    parts = [meta.get("preset") or "defaults"] + [f"{k} {v}" for k, v in sorted(options.items())]
    target = (meta.get("options") or {}).get("target")
    if target is not None:
        parts.append(f"target {target!r}")
    return f"{name} ({', '.join(parts)})"


def _mean_spread(values: pd.Series) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=0)) if len(values) > 1 else 0.0


def graph_figures(store: GraphStore, concept_set: ConceptSet, rows: list[str] | None = None) -> dict:
    """One graph's row of the methods table (means, and each figure's spread across rows as ``*_sd``),
    on ``rows`` (erased concepts) only when given."""
    meta = store.meta()
    edges = store.edges()
    if rows is not None:
        edges = edges[edges.erased.isin(rows)]
    own = edges[edges.erased == edges.affected].set_index("erased")
    others = edges[edges.erased != edges.affected]
    loc = locality(store, concept_set)
    loc = loc[(loc.erased != "(mean)") & (loc.erased.isin(rows) if rows is not None else True)]
    row = {"method": graph_label(meta), "graph": store.folder.name, "rows": len(own),
           "erased": int((own.G_after_top1 <= ERASED_G).sum())}
    for grouping in concept_set.groups:
        row[f"same_{grouping}"], row[f"same_{grouping}_sd"] = _mean_spread(loc[f"in_{grouping}"])
    row["unrelated"], row["unrelated_sd"] = _mean_spread(loc["unrelated"])
    for k, column in (("1", "G_after_top1"), ("5", "G_after_topk")):
        row[f"ESR_{k}"], row[f"ESR_{k}_sd"] = _mean_spread(1 - own[column])
        row[f"PSR_{k}"], row[f"PSR_{k}_sd"] = _mean_spread(others.groupby("erased")[column].mean())
    recovery = store.recovery()
    embedding = recovery[recovery.attack == "embedding"] if recovery is not None else None
    if embedding is not None and rows is not None:
        embedding = embedding[embedding.erased.isin(rows)]
    if embedding is not None and len(embedding):
        row["embedding_asr"], row["embedding_asr_sd"] = _mean_spread(embedding.asr.astype(float))
        row["embedding_rows"] = len(embedding)
    else:
        row["embedding_asr"] = row["embedding_asr_sd"] = float("nan")
        row["embedding_rows"] = 0
    seconds = list((meta.get("row_seconds") or {}).values())
    row["row_s"] = float(sum(seconds) / len(seconds)) if seconds else float("nan")
    return row


def methods_table(graph_dirs: list[str | Path], shared_rows: bool = False) -> pd.DataFrame:
    """The ranked table of the graphs in ``graph_dirs`` (all of one concept set and model); with
    ``shared_rows`` every graph is measured on the rows all of them have (like for like)."""
    stores = [GraphStore(d) for d in graph_dirs]
    if not stores:
        return pd.DataFrame(columns=["rank", "method", "graph", "rows", "erased"])
    concept_set = ConceptSet.from_dict(stores[0].meta()["concept_set"])
    revision = stores[0].meta().get("model_revision")
    for store in stores[1:]:
        meta = store.meta()
        if meta["concept_set"]["concepts"] != concept_set.concepts or meta.get("model_revision") != revision:
            raise ValueError(f"{store.folder} measured another model or concept set than {stores[0].folder}")
    stores = [s for s in stores if len(s.rows_done())]
    rows = None
    if shared_rows:
        shared = set.intersection(*(set(s.rows_done()) for s in stores))
        if not shared:
            raise ValueError("the graphs have no erased concept in common")
        rows = [c for c in concept_set.concepts if c in shared]
    table = pd.DataFrame([graph_figures(s, concept_set, rows) for s in stores])
    neighbours = [f"same_{g}" for g in concept_set.groups]
    table["neighbours"] = table[neighbours].mean(axis=1)
    table["erased_share"] = table.erased / table.rows
    table = table.sort_values(["erased_share", "neighbours"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, each figure as mean ± spread across rows (Delta and rates in %)."""
    groups = [c[5:] for c in table.columns if c.startswith("same_") and not c.endswith("_sd")]
    head = (["rank", "method", "erased"] + [f"same-{g} Δ" for g in groups]
            + ["unrelated Δ", "ESR-1", "ESR-5", "PSR-1", "PSR-5", "embedding ASR", "row s", "graph"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(row, column):
        value = row[column]
        if pd.isna(value):
            return "–"
        return f"{100 * value:.1f} ± {100 * row[column + '_sd']:.1f}"

    for _, row in table.iterrows():
        cells = [str(row["rank"]), row["method"], f"{row['erased']}/{row['rows']}"]
        cells += [pct(row, f"same_{g}") for g in groups]
        cells += [pct(row, c) for c in ("unrelated", "ESR_1", "ESR_5", "PSR_1", "PSR_5", "embedding_asr")]
        cells += ["–" if pd.isna(row["row_s"]) else f"{row['row_s']:.0f}", f"`{row['graph']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
