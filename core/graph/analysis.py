"""Section 3 analyses of a concept graph; each returns a table the explorer can plot.

- locality: mean Delta inside vs outside the erased concept's group(s), per row and overall;
- asymmetry: Delta(a->b) - Delta(b->a) and the most asymmetric pairs;
- abnormal nodes: low G_0, or hurt by most erasures;
- comparison of graphs (e.g. ESD against AGE): each graph's locality on the rows they all have;
- similarity measures between concepts (text-embedding L2 and cosine on flattened prompt hidden
  states; output-space distance of the frozen model's noise predictions over fixed latents and
  timesteps) and their Spearman correlation with Delta.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from ..bundle import ModelBundle
from .concept_sets import ConceptSet
from .store import GraphStore

HURT = 0.2  # a concept counts as hurt by an erasure when it loses at least this much G


def _off_diagonal(edges: pd.DataFrame) -> pd.DataFrame:
    return edges[edges.erased != edges.affected]


def locality(store: GraphStore, concept_set: ConceptSet, kind: str = "delta_top1") -> pd.DataFrame:
    """Per row: mean Delta in each grouping's group, outside it, and on concepts related by no grouping."""
    all_edges = store.edges()
    edges = _off_diagonal(all_edges)
    rows = []
    # every row done, also one with no other concept measured (a one-concept graph: its self Delta alone)
    for erased in dict.fromkeys(all_edges.erased):
        block = edges[edges.erased == erased]
        delta = dict(zip(block.affected, block[kind]))
        row = {"erased": erased, "self": float(all_edges[(all_edges.erased == erased) & (all_edges.affected == erased)][kind].mean())}
        related_any: set[str] = set()
        for grouping in concept_set.groups:
            inside = set(concept_set.related(erased, grouping))
            related_any |= inside
            row[f"in_{grouping}"] = _mean([delta[c] for c in inside if c in delta])
            row[f"out_{grouping}"] = _mean([delta[c] for c in delta if c not in inside])
        row["unrelated"] = _mean([delta[c] for c in delta if c not in related_any])
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        overall = table.drop(columns="erased").mean().to_dict()
        table = pd.concat([table, pd.DataFrame([{"erased": "(mean)", **overall}])], ignore_index=True)
    return table


def asymmetry(store: GraphStore, kind: str = "delta_top1", top: int = 10) -> pd.DataFrame:
    m = store.matrix(kind)
    rows = []
    names = list(m.index)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if b in m.columns and a in m.columns:
                ab, ba = m.loc[a, b], m.loc[b, a]
                if pd.notna(ab) and pd.notna(ba):
                    rows.append({"a": a, "b": b, "delta_ab": ab, "delta_ba": ba, "difference": ab - ba})
    table = pd.DataFrame(rows, columns=["a", "b", "delta_ab", "delta_ba", "difference"])
    return table.reindex(table.difference.abs().sort_values(ascending=False).index).head(top).reset_index(drop=True)


def asymmetry_score(store: GraphStore, kind: str = "delta_top1") -> float:
    """||Delta - Delta^T|| / ||Delta|| over the rows present in both directions (0: symmetric)."""
    m = store.matrix(kind)
    common = [c for c in m.index if c in m.columns]
    sub = m.loc[common, common].to_numpy(dtype=float, copy=True)
    np.fill_diagonal(sub, 0)
    return float(np.linalg.norm(sub - sub.T) / max(np.linalg.norm(sub), 1e-12))


def abnormal_nodes(store: GraphStore, kind: str = "delta_top1", hurt: float = HURT) -> pd.DataFrame:
    nodes = store.nodes()
    edges = _off_diagonal(store.edges())
    rows = edges.erased.nunique()
    hurt_by = edges[edges[kind] >= hurt].groupby("affected").size()
    table = nodes[["concept", "G0_top1"]].copy()
    table["hurt_by"] = table.concept.map(hurt_by).fillna(0).astype(int)
    table["hurt_share"] = table.hurt_by / max(1, rows - 1)
    table["mean_delta_received"] = table.concept.map(edges.groupby("affected")[kind].mean())
    table["abnormal"] = nodes.low_G0 | (table.hurt_share > 0.5)
    return table.sort_values(["abnormal", "hurt_share", "G0_top1"], ascending=[False, False, True]).reset_index(drop=True)


@torch.no_grad()
def similarity_measures(bundle: ModelBundle, concept_set: ConceptSet, latents: int = 4,
                        timesteps: tuple[int, ...] = (250, 500, 750), seed: int = 0) -> pd.DataFrame:
    """Pairwise text L2, text cosine similarity and output-space distance between the set's prompts."""
    prompts = [concept_set.prompt(c) for c in concept_set.concepts]
    states = bundle.encode(prompts).float().flatten(1)
    l2 = torch.cdist(states, states)
    unit = torch.nn.functional.normalize(states, dim=1)
    cosine = unit @ unit.T
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn((latents, *bundle.latent_shape), generator=gen).to(bundle.device, bundle.dtype)
    alphas = bundle.train_scheduler().alphas_cumprod.to(bundle.device)
    outputs = []
    for prompt_states in bundle.encode(prompts):
        per_prompt = []
        for t in timesteps:
            a = alphas[t]
            noise = torch.randn(x0.shape, generator=gen.manual_seed(seed + t)).to(bundle.device, bundle.dtype)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            tt = torch.full((latents,), t, device=bundle.device)
            per_prompt.append(bundle.unet(xt, tt, **bundle.unet_kwargs(prompt_states[None].expand(latents, -1, -1))).sample.float().flatten())
        outputs.append(torch.cat(per_prompt))
    out = torch.stack(outputs)
    output_dist = torch.cdist(out, out) / out.shape[1] ** 0.5
    rows = []
    for i, a in enumerate(concept_set.concepts):
        for j, b in enumerate(concept_set.concepts):
            if i != j:
                rows.append({"a": a, "b": b, "text_l2": float(l2[i, j]), "text_cosine": float(cosine[i, j]),
                             "output_distance": float(output_dist[i, j])})
    return pd.DataFrame(rows, columns=["a", "b", "text_l2", "text_cosine", "output_distance"])


def similarity_vs_delta(store: GraphStore, similarity: pd.DataFrame, kind: str = "delta_top1") -> pd.DataFrame:
    """Spearman correlation of each measure with Delta(a->b). Distances should correlate negatively."""
    edges = _off_diagonal(store.edges()).rename(columns={"erased": "a", "affected": "b"})
    merged = edges.merge(similarity, on=["a", "b"])
    rows = []
    for measure, sign in (("text_l2", -1), ("text_cosine", 1), ("output_distance", -1)):
        rho, p = spearmanr(merged[measure], merged[kind])
        rows.append({"measure": measure, "spearman": float(rho), "p_value": float(p),
                     "predictive_strength": float(sign * rho), "pairs": len(merged)})
    return pd.DataFrame(rows).sort_values("predictive_strength", ascending=False).reset_index(drop=True)


def compare_graphs(stores: dict[str, GraphStore], concept_set: ConceptSet, kind: str = "delta_top1") -> pd.DataFrame:
    """Locality per erased concept of each graph (long format, column ``graph``), on the rows that
    every graph has, so that methods are compared on the same erasures."""
    tables = {name: locality(store, concept_set, kind) for name, store in stores.items()}
    tables = {name: t[t.erased != "(mean)"] for name, t in tables.items()}
    shared = set.intersection(*(set(t.erased) for t in tables.values()))
    if not shared:
        raise ValueError(f"the graphs {', '.join(stores)} have no erased concept in common")
    order = [c for c in concept_set.concepts if c in shared]
    table = pd.concat([t.set_index("erased").loc[order].reset_index().assign(graph=name)
                       for name, t in tables.items()], ignore_index=True)
    return table[["graph"] + [c for c in table.columns if c != "graph"]]


def _aligned(table: pd.DataFrame) -> tuple[list[str], list[str], pd.DataFrame, list[tuple[str, pd.DataFrame]]]:
    """The locality columns of a :func:`compare_graphs` table, its graphs in order, the first graph's rows,
    and each graph's rows (the first's included) in the first graph's row order."""
    columns = [c for c in table.columns if c.startswith("in_")] + ["unrelated", "self"]
    graphs = list(dict.fromkeys(table.graph))
    first = table[table.graph == graphs[0]].set_index("erased")[columns]
    blocks = [(name, table[table.graph == name].set_index("erased")[columns].loc[first.index]) for name in graphs]
    return columns, graphs, first, blocks


def compare_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per graph: mean of each locality column, and on how many rows it is below the first graph's."""
    columns, graphs, first, blocks = _aligned(table)
    rows = []
    for name, block in blocks:
        row = {"graph": name, "rows": len(block), **block.mean().to_dict()}
        if name != graphs[0]:
            row.update({f"{c}_lower": int((block[c] < first[c] - 1e-9).sum()) for c in columns})
        rows.append(row)
    out = pd.DataFrame(rows)
    lower = [c for c in out.columns if c.endswith("_lower")]
    return out.astype({c: "Int64" for c in lower})


def paired_against_first(table: pd.DataFrame, tolerance: float = 1e-9) -> pd.DataFrame:
    """Each later graph against the first, row by row (the same erased concepts): for each locality
    column, the rows below, tied with and above the first graph's, and the two-sided Wilcoxon
    signed-rank p of the differences (ties dropped; none when every row ties). This is how a cheaper
    recipe is judged equivalent: no column whose p is small."""
    from scipy.stats import wilcoxon

    columns, _, first, blocks = _aligned(table)
    rows = []
    for name, block in blocks[1:]:
        for column in columns:
            diff = (block[column] - first[column]).dropna().to_numpy()  # NaN: a row with no such neighbour
            moved = diff[abs(diff) > tolerance]
            p_value = float(wilcoxon(moved).pvalue) if len(moved) else float("nan")
            rows.append({"graph": name, "column": column, "first": float(first[column].mean()),
                         "this": float(block[column].mean()), "lower": int((diff < -tolerance).sum()),
                         "tied": int((abs(diff) <= tolerance).sum()), "higher": int((diff > tolerance).sum()),
                         "wilcoxon_p": p_value})
    return pd.DataFrame(rows)


def summary(store: GraphStore, concept_set: ConceptSet, similarity: pd.DataFrame | None = None) -> str:
    """The paper's Section 3 findings, stated with this graph's numbers."""
    meta = store.meta()
    options = "".join(f", {k} {v!r}" for k, v in sorted((meta.get("options") or {}).items()) if k != "target")
    lines = [f"graph: {meta['model']} / {meta['method']} (preset {meta['preset']}, target {meta.get('target')!r}{options}), "
             f"{len(store.rows_done())} rows x {len(store.nodes())} concepts, N={meta['images_per_concept']} images, "
             f"evaluator {meta['evaluator']}"]
    loc = locality(store, concept_set)
    mean = loc[loc.erased == "(mean)"].iloc[0]
    if not len(_off_diagonal(store.edges())):  # spillover, asymmetry and similarity need a second concept
        lines.append(f"no other concept measured, so no spillover; the erased concept itself: mean Delta top-1 "
                     f"{mean['self']:.3f}")
        return "\n".join(lines)
    lines.append("1. locality (mean Delta top-1):")
    unrelated = mean["unrelated"]
    for grouping in concept_set.groups:
        inside, outside = mean[f"in_{grouping}"], mean[f"out_{grouping}"]
        line = (f"   {grouping} groups: inside {inside:.3f}, outside {outside:.3f} "
                f"(ratio {inside / max(abs(outside), 1e-3):.1f}x)")
        if len(concept_set.groups) > 1:  # "outside" one grouping still holds the neighbours of the others
            line += f"; vs related by no group {unrelated:.3f} ({inside / max(abs(unrelated), 1e-3):.1f}x)"
        lines.append(line)
    lines.append(f"   related by no group: {unrelated:.3f}; the erased concept itself: {mean['self']:.3f}")
    asym = asymmetry(store, top=3)
    lines.append(f"2. asymmetry: ||D - D^T|| / ||D|| = {asymmetry_score(store):.2f}; most asymmetric pairs: " +
                 "; ".join(f"{r.a} -> {r.b} {r.delta_ab:.2f} vs {r.delta_ba:.2f}" for r in asym.itertuples()))
    ab = abnormal_nodes(store)
    flagged = ab[ab.abnormal]
    lines.append("3. abnormal nodes: " + (", ".join(f"{r.concept} (G0 {r.G0_top1:.2f}, hurt by {r.hurt_by} erasures)"
                                                    for r in flagged.itertuples()) or "none") +
                 f"; lowest G0: {ab.sort_values('G0_top1').iloc[0].concept} ({ab.G0_top1.min():.2f})")
    if similarity is not None:
        corr = similarity_vs_delta(store, similarity)
        best = corr.iloc[0]
        lines.append("4. which similarity predicts Delta (Spearman rho): " +
                     ", ".join(f"{r.measure} {r.spearman:+.2f}" for r in corr.itertuples()) +
                     f"; best: {best.measure}")
    return "\n".join(lines)


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def spillover_vs_recovery(store: GraphStore, concept_set: ConceptSet) -> pd.DataFrame | None:
    """Per erased concept with a recovery layer: spillover on its group neighbours and on unrelated
    concepts, the plain-prompt ASR and each attack's ASR. ``None`` when the graph has no recovery layer."""
    recovery = store.recovery()
    if recovery is None or not len(recovery):
        return None
    loc = locality(store, concept_set)
    loc = loc[loc.erased != "(mean)"]
    inside = [c for c in loc.columns if c.startswith("in_")]
    table = pd.DataFrame({"erased": loc.erased, "spill_neighbours": loc[inside].mean(axis=1),
                          "spill_unrelated": loc.unrelated})
    asr = recovery.pivot(index="erased", columns="attack", values="asr").add_prefix("asr_")
    plain = recovery.groupby("erased").asr_plain.first().rename("asr_plain")
    return table.merge(plain, left_on="erased", right_index=True).merge(asr, left_on="erased", right_index=True)


def recovery_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One line per graph: mean spillover and mean ASR per attack on the rows with a recovery layer."""
    rows = []
    for name, table in tables.items():
        means = table.drop(columns="erased").mean().to_dict()
        rows.append({"graph": name, "rows": len(table), **means})
    return pd.DataFrame(rows)
