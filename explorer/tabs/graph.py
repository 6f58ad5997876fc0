"""The Concept graph tab: the clickable spillover network (with the recovery layer's ASR as rings,
when the graph has one), the selected concept's row, the Δ heatmap, the difference of two graphs, UMAP
of the prompts and similarity against Δ."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import gradio as gr
from gradio.components.plot import PlotData

from age_explorer.explorer.workflows import prompt_for
from age_explorer.core.graph.embedding_map import compute_map, read_map
from age_explorer.core.graph.methods import graph_label
from age_explorer.core.graph.store import GraphStore, delta_matrix

from .. import plots
from ..components import concept_graph
from .common import COMPUTE_SLOT, Page, bind, bounded_slider, plain, shown_as_error

EMPTY_FIG = "{}"
DEFAULT_THRESHOLD = plots.DEFAULT_THRESHOLD


class ReadGraph:
    """A graph's files as read once: the figures of a view use each of them several times."""

    def __init__(self, store: GraphStore):
        self.meta, self.nodes, self.edges, self.recovery = store.meta(), store.nodes(), store.edges(), store.recovery()
        self.rows_done = list(dict.fromkeys(self.edges.erased))


@dataclass
class GraphTab:
    graph_dd: gr.Dropdown  # other tabs add graphs to it (a spillover row measured from the page)
    concepts: list[str]


def store_of(page: Page, name: str) -> GraphStore:
    with shown_as_error():
        return GraphStore(page.explorer.graph_folder(name))


# Each view of a graph (graph, threshold, grouping, selected concept) is drawn once while the graph's files
# are unchanged (``version``): many visitors click the same nodes, and each figure is built and cached on its
# own, so a concept not picked before costs its network and its row only (the heatmap does not depend on
# it), and the files are read once per version, not once per figure.
@functools.lru_cache(maxsize=16)
def files(folder: str, version: tuple) -> ReadGraph:
    return ReadGraph(GraphStore(folder))


@functools.lru_cache(maxsize=512)
def network_json(folder: str, version: tuple, threshold: float, grouping: str | None, selected: str | None) -> str:
    graph = files(folder, version)
    col = f"group_{grouping}" if grouping else None
    return plots.network_figure(graph.nodes, graph.edges, threshold, col, selected, recovery=graph.recovery).to_json()


@functools.lru_cache(maxsize=64)
def heatmap_json(folder: str, version: tuple, name: str, grouping: str | None) -> str:
    col = f"group_{grouping}" if grouping else None
    graph = files(folder, version)
    return plots.heatmap_figure(delta_matrix(graph.nodes, graph.edges), graph.nodes, col,
                                f"Δ (rows = erased): {name}").to_json()


@functools.lru_cache(maxsize=512)
def row_json(folder: str, version: tuple, selected: str | None) -> tuple[str, str | None]:
    text, bar = details_of(files(folder, version), selected)
    return text, bar.to_json() if bar is not None else None


def details_of(graph: ReadGraph, selected):
    meta = graph.meta
    text = (f"**{plain(graph_label(meta))}**, {len(graph.rows_done)} rows, {meta['images_per_concept']} "
            f"images per concept, classifier {plain(meta['evaluator'])}.")
    recovery = graph.recovery
    rates = plots.recovery_by_concept(recovery)
    if rates:
        text += (f" Recovery layer: {len(rates)} erased concepts attacked ({plain(', '.join(sorted(set(recovery.attack))))}); "
                 f"rings show the {plots.RECOVERY_ATTACK} attack's ASR.")
    if not selected:
        return text + " Click a node or pick a concept.", None
    nodes = graph.nodes.set_index("concept")
    if selected not in nodes.index:
        return text + f"\n\n{plain(repr(selected))} is not in this graph.", None
    text += f"\n\n**{plain(selected)}**: G₀ = {nodes.loc[selected, 'G0_top1']:.2f}."
    if selected in rates:
        text += " Recovery ASR: " + ", ".join(f"{plain(a)} {v:.2f}" for a, v in sorted(rates[selected].items())) + "."
    edges = graph.edges
    row = edges[edges.erased == selected]
    if len(row):
        worst = row[row.affected != selected].nlargest(3, "delta_top1")
        if not len(worst):  # a graph of one concept: no spillover to chart
            return text + " No other concept is measured in this graph.", None
        text += " Erasing it hurts most: " + ", ".join(f"{plain(r.affected)} (Δ {r.delta_top1:.2f})"
                                                       for r in worst.itertuples())
        return text, plots.spillover_bar_figure(row, selected)
    return text + " (no row for it in this graph)", None


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def graph_outputs(page: Page, name, threshold, grouping, selected):
    if not name:
        return EMPTY_FIG, None, "No graph yet: compute one with `age-explorer graph`.", None
    store = store_of(page, name)
    folder, version, grouping, selected = str(store.folder), store.version(), grouping or None, selected or None
    details, bar = row_json(folder, version, selected)
    heat = heatmap_json(folder, version, name, grouping)
    # gr.Plot takes the cached JSON as is (a figure would be validated and serialised again)
    return (network_json(folder, version, float(threshold), grouping, selected), PlotData(type="plotly", plot=heat),
            details, PlotData(type="plotly", plot=bar) if bar else None)


def opening_view(page: Page) -> tuple[list[str], GraphStore | None, list[str]]:
    """The graphs' names, the first graph (the one the page opens on) and its groupings."""
    graphs = page.explorer.graph_dirs()
    names = list(graphs)
    first = GraphStore(graphs[names[0]]) if names else None
    groupings = [c[len("group_"):] for c in first.nodes().columns if c.startswith("group_")] if first else []
    return names, first, groupings


def warm_first_views(page: Page) -> threading.Thread | None:
    """Draws, in a background thread, the view of each concept that the page opens on (the first graph, the
    default threshold and grouping), so that the first visitors' clicks are served from the cache: on a
    fresh server twenty visitors clicking at once otherwise each wait for the others' figures (about 0.15 s
    of one core a concept, 4 s for a 25-concept graph)."""
    names, first, groupings = opening_view(page)
    if first is None:
        return None
    grouping = groupings[0] if groupings else None

    def draw():
        for concept in first.nodes().concept:
            try:
                graph_outputs(page, names[0], DEFAULT_THRESHOLD, grouping, concept)
            except Exception:  # a graph changed or removed meanwhile: each click then draws its own view
                return

    thread = threading.Thread(target=draw, name="warm-graph-views", daemon=True)
    thread.start()
    return thread


def on_node_click(evt: gr.SelectData):
    return evt.value


def difference(page: Page, name_a, name_b, grouping):
    if not name_a or not name_b or name_b == "(none)":
        return None
    a, b = store_of(page, name_a), store_of(page, name_b)
    col = f"group_{grouping}" if grouping else None
    return plots.difference_figure(a.matrix(), b.matrix(), a.nodes(), col, f"Δ {name_a} − Δ {name_b}")


# per model and concept list (a UMAP of a model's prompt states), and per model and graph folder
_umap_maps: dict = {}
_similarities: dict = {}


def umap_view(page: Page, name, selected, progress=gr.Progress()):
    if not name:
        return None
    ex = page.explorer
    store = store_of(page, name)
    nodes = store.nodes()
    key = (ex.settings.model, tuple(nodes.concept))
    if key not in _umap_maps:
        # the map the graph folder carries (the shipped graphs do); else computed here
        cached = read_map(store.folder, list(key[1]), store.meta())
        if cached is None:
            progress(0.1, desc="computing UMAP; its first use on a server compiles umap-learn (minutes)")
            bundle = ex.bundle()
            cached = compute_map(bundle, [prompt_for(bundle, c) for c in key[1]])
        _umap_maps[key] = cached
    edges = store.edges()
    row = edges[edges.erased == selected].set_index("affected").delta_top1 if selected else None
    return plots.umap_figure(_umap_maps[key], nodes, row, "UMAP of prompt embeddings"
                             + (f", coloured by Δ of erasing {selected}" if selected else ""))


def scatter_view(page: Page, name, measure, progress=gr.Progress()):
    if not name:
        return None
    from age_explorer.core.graph.analysis import similarity_measures, similarity_vs_delta
    from age_explorer.core.graph.concept_sets import ConceptSet

    ex = page.explorer
    store = store_of(page, name)
    key = (ex.settings.model, str(store.folder))
    if key not in _similarities:
        progress(0.2, desc="similarity measures")
        with ex.compute():
            _similarities[key] = similarity_measures(ex.bundle(), ConceptSet.from_dict(store.meta()["concept_set"]))
    similarity = _similarities[key]
    pairs = store.edges().rename(columns={"erased": "a", "affected": "b"}).merge(similarity, on=["a", "b"])
    correlation = similarity_vs_delta(store, similarity).set_index("measure").loc[measure]
    return plots.scatter_figure(pairs, measure, rho=correlation.spearman, p_value=correlation.p_value)


def build(page: Page) -> GraphTab:
    names, first, groupings = opening_view(page)
    concepts = list(first.nodes().concept) if first else []
    on = functools.partial(bind, page=page)
    with gr.Row():
        graph_dd = gr.Dropdown(names, value=names[0] if names else None, label="Graph", elem_id="graph_dd")
        group_radio = gr.Radio(groupings, value=groupings[0] if groupings else None, label="Group by")
        threshold = bounded_slider("the edge threshold (Δ ≥)", 0, 1, DEFAULT_THRESHOLD, step=0.05,
                                   label="Show edges with Δ ≥", elem_id="threshold")
        concept_dd = gr.Dropdown(concepts, value=None, label="Concept", elem_id="concept_dd")
    init = graph_outputs(page, names[0] if names else None, DEFAULT_THRESHOLD, groupings[0] if groupings else None, None)
    graph_view = concept_graph(init[0])
    details = gr.Markdown(init[2], elem_id="graph_details")
    row_plot = gr.Plot(label="Spillover of the selected concept")
    heatmap = gr.Plot(init[1], label="Δ heatmap")
    with gr.Row():
        other_dd = gr.Dropdown(["(none)"] + names, value="(none)", label="Compare with", elem_id="compare_dd")
    diff_plot = gr.Plot(label="Difference of two graphs", elem_id="diff_plot")
    with gr.Row():
        umap_btn = gr.Button("UMAP of the concepts", elem_id="umap_btn")
        measure = gr.Radio(["text_l2", "text_cosine", "output_distance"], value="text_l2", label="Similarity measure")
        scatter_btn = gr.Button("Similarity vs Δ", elem_id="scatter_btn")
    umap_plot = gr.Plot(label="UMAP of the concepts' prompt embeddings", elem_id="umap_plot")
    scatter_plot = gr.Plot(label="Similarity against Δ", elem_id="scatter_plot")

    inputs, outputs = [graph_dd, threshold, group_radio, concept_dd], [graph_view, heatmap, details, row_plot]
    # a typed threshold (Enter) redraws too; always_last: a drag does not queue one redraw per step
    for trigger in (graph_dd.change, threshold.change, group_radio.change):
        trigger(on(graph_outputs), inputs, outputs, api_visibility="private", trigger_mode="always_last")
    concept_dd.change(on(graph_outputs), inputs, outputs, api_name="select_concept", api_visibility=page.api)
    graph_view.select(on_node_click, None, concept_dd, api_visibility="private")
    other_dd.change(on(difference), [graph_dd, other_dd, group_radio], diff_plot, api_visibility="private")
    umap_btn.click(on(umap_view), [graph_dd, concept_dd], umap_plot, api_name="umap", api_visibility=page.api)
    scatter_btn.click(on(scatter_view), [graph_dd, measure], scatter_plot, api_name="similarity", api_visibility=page.api,
                      **COMPUTE_SLOT)
    return GraphTab(graph_dd, concepts)
