"""The concept graph's figure: every label legible at the default view (no label covers another label,
a node or a recovery ring) on the shipped graphs under each grouping the Concept graph tab offers."""

import itertools
import math

import pytest

from age_explorer.core.graph.store import GraphStore
from age_explorer.core.paths import assets_dir
from age_explorer.explorer import plots

SHIPPED = ["toy-esd", "toy-age", "toy-age-damage"]
# width of a character in em: the widest label measured in headless Chromium is 0.49 em per character
# (plotly's "Open Sans", verdana, arial at 11 px); 0.55 leaves a margin
EM = 0.55


def groupings(nodes):
    return [c for c in nodes.columns if c.startswith("group_")]


def drawn(fig):
    """Label boxes and round obstacles (nodes, recovery rings) in px, y upwards, at the figure's scale:
    its fixed height and y range with equal x/y scales (the page is wide enough for its x range)."""
    layout = fig.layout
    scale = (layout.height - layout.margin.t - layout.margin.b) / (layout.yaxis.range[1] - layout.yaxis.range[0])
    assert layout.yaxis.scaleanchor == "x"
    labels, circles = [], []
    for trace in fig.data:
        if trace.mode == "markers+text":
            font = trace.textfont.size
            for x, y, text, place, size in zip(trace.x, trace.y, trace.text, trace.textposition, trace.marker.size):
                x, y = x * scale, y * scale
                width, height = len(text) * EM * font, font
                off = size / 1.6 + 1  # plotly sets text off its marker by this
                x0 = x + off if "right" in place else x - off - width if "left" in place else x - width / 2
                y0 = y + off if "top" in place else y - off - height if "bottom" in place else y - height / 2
                labels.append((text, (x0, y0, x0 + width, y0 + height)))
                circles.append((text, x, y, size / 2))
        elif trace.marker is not None and trace.marker.symbol == "circle-open" and trace.x[0] is not None:
            for x, y, concept, size, line in zip(trace.x, trace.y, trace.customdata, trace.marker.size,
                                                 trace.marker.line.width):
                circles.append((f"{concept}'s ring", x * scale, y * scale, size / 2 + line / 2))
    return labels, circles


def collisions(fig) -> list:
    labels, circles = drawn(fig)
    found = [(a, b) for (a, p), (b, q) in itertools.combinations(labels, 2)
             if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]]
    for text, (x0, y0, x1, y1) in labels:
        for name, cx, cy, r in circles:
            if math.hypot(min(max(cx, x0), x1) - cx, min(max(cy, y0), y1) - cy) < r:
                found.append((text, name))
    return found


@pytest.mark.parametrize("graph", SHIPPED)
def test_no_label_of_a_shipped_graph_collides(graph):
    store = GraphStore(assets_dir() / "graphs" / graph)
    nodes, edges, recovery = store.nodes(), store.edges(), store.recovery()
    assert groupings(nodes) == ["group_shape", "group_colour"] and recovery is not None
    for group_col in groupings(nodes):
        for selected in (None, "red circle"):
            fig = plots.network_figure(nodes, edges, 0.3, group_col, selected, recovery=recovery)
            labels, _ = drawn(fig)
            assert sorted(text for text, _ in labels) == sorted(nodes.concept)
            assert collisions(fig) == [], (graph, group_col)
            # the figure keeps its parts: each concept's 3 strongest out-edges, the legends
            names = [t.name for t in fig.data]
            assert {"Δ 0.3", "Δ 0.6", "Δ 0.9", "ASR 0.0"} <= set(names)
            shown = plots.top_out_edges(edges, 0.3, "delta_top1")
            arrows = [t for t in fig.data if t.name == plots.EDGE_TRACE]
            heads = next(t for t in fig.data if t.name == plots.ARROWHEADS)
            assert len(arrows) == len(shown) == len(heads.x) and shown.groupby("erased").size().max() <= 3
            # the arrows are drawn first, under the nodes and their labels
            assert [t.name for t in fig.data[:len(arrows) + 1]] == [plots.EDGE_TRACE] * len(arrows) + [plots.ARROWHEADS]
            assert list(heads.marker.color) == [t.line.color for t in arrows]
            if selected:  # its out-edges red, its in-edges blue, the others grey
                x, y = next((t.x[list(t.customdata).index(selected)], t.y[list(t.customdata).index(selected)])
                            for t in fig.data if t.mode == "markers+text" and selected in t.customdata)
                out = {t.line.color for t in arrows if (t.x[0], t.y[0]) == (x, y)}
                assert out <= {plots.OUT_EDGE} and len(out) == int((shown.erased == selected).any())
                assert {t.line.color for t in arrows} <= {plots.OUT_EDGE, plots.IN_EDGE, "#999"}


def test_labels_of_a_crowded_cluster_move_aside():
    """Labels try the side away from their cluster's centre first, and take another side when it is taken."""
    pos = {"a": (0.0, 0.0), "b": (0.0, 0.07)}  # b sits just above a: a's top label would cover b
    sizes = {"a": 20.0, "b": 20.0}
    places = plots.label_positions(pos, sizes, {"a": (0.0, -1.0), "b": (0.0, -1.0)})
    assert places["b"] == "top center" and places["a"] != "top center"


def test_the_network_figure_built_without_validation_is_a_valid_figure():
    """The network's traces skip plotly's validation when built (it took most of a concept pick's time):
    the same figure passes it, so nothing in it is misspelt or out of range."""
    import plotly.graph_objects as go

    store = GraphStore(assets_dir() / "graphs" / "toy-esd")
    fig = plots.network_figure(store.nodes(), store.edges(), 0.3, "group_shape", "red circle", recovery=store.recovery())
    checked = go.Figure(fig.to_dict())  # validates every trace and the layout; raises on a bad property
    assert len(checked.data) == len(fig.data) and checked.layout.title.text.startswith("Δ ≥ 0.30")
    assert checked.data[-1].legendgrouptitle.text == "selected" and checked.layout.legend.title.text == "shape"
