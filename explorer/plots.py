"""Plotly figure builders: pure functions of core's tables (no model, no state)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PALETTE = ["#e4572e", "#29a36a", "#3d6fd9", "#d9a400", "#9b4fcf", "#17a2b8", "#6c757d", "#fd7e14", "#20c997", "#e83e8c"]


# named colours a group label may be (the toy world's colours): such a group is drawn in its own colour
NAMED = {"red": "#d62728", "green": "#2ca02c", "blue": "#1f77b4", "yellow": "#e6b800", "purple": "#9467bd",
         "orange": "#ff7f0e", "black": "#222222", "white": "#dddddd", "brown": "#8c564b", "pink": "#e377c2"}
EDGE_TRACE, ARROWHEADS = "edge", "arrowheads"  # the names of each arrow's line trace and of the arrowheads' trace
OUT_EDGE, IN_EDGE = "#c0392b", "#2471a3"  # the selected concept's out-edges (what its erasure hurts), in-edges
TOP_K = 3  # out-edges drawn per node: its strongest, so the graph stays readable
# the recovery layer: a ring around each attacked concept, wider and darker as more of it comes back
# (a colour no toy-world group has, so rings never read as a group)
RECOVERY_ATTACK = "embedding"  # the strongest attack on the toy world (docs/robustness.md)
RECOVERY_SCALE = [[0.0, "#e8a3c2"], [1.0, "#9c0f4d"]]


def recovery_by_concept(recovery: pd.DataFrame | None) -> dict[str, dict[str, float]]:
    """``recovery.csv`` rows as concept -> {attack: ASR on the erased model}."""
    rates: dict[str, dict[str, float]] = {}
    for r in recovery.itertuples() if recovery is not None else []:
        rates.setdefault(r.erased, {})[r.attack] = float(r.asr)
    return rates


def recovery_text(rates: dict[str, float], attack: str = RECOVERY_ATTACK) -> str:
    """Hover lines of a concept's recovery: the ringed attack first, then the others."""
    order = [attack] + sorted(a for a in rates if a != attack)
    return "".join(f"<br>recovery ASR ({a}) {rates[a]:.2f}" for a in order if a in rates)


def group_colours(labels: list[str]) -> dict[str, str]:
    groups = list(dict.fromkeys(labels))
    if all(str(g).lower() in NAMED for g in groups):
        return {g: NAMED[str(g).lower()] for g in groups}
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}


# The concept graph's geometry. The figure has a fixed height and equal x/y scales, so at the default
# view (a page wide enough for the x range, as in docs/screenshots) one data unit is PX_PER_UNIT pixels
# and label boxes can be placed in pixels: labels are 11 px text beside their marker.
GRAPH_HEIGHT = 640
GRAPH_MARGIN = dict(l=10, r=10, t=40, b=10)
GRAPH_X_RANGE, GRAPH_Y_RANGE = (-1.9, 1.9), (-1.45, 1.45)
PX_PER_UNIT = (GRAPH_HEIGHT - GRAPH_MARGIN["t"] - GRAPH_MARGIN["b"]) / (GRAPH_Y_RANGE[1] - GRAPH_Y_RANGE[0])
LABEL_SIZE = 11  # px
DEFAULT_THRESHOLD = 0.3  # the Concept graph's first view: edges with Δ ≥ 0.3
LABEL_EM = 0.6  # width of a character in em, generous for plotly's sans-serif fonts
LABEL_HALO = "auto"  # plotly's light halo behind dark text: a label stays legible where an edge crosses it
GROUP_RADIUS = 0.95  # group centres on this circle
CLUSTER_RADIUS = 0.3  # each group's concepts on a circle of this radius around its centre
# plotly's text positions as (dx, dy) directions from the marker
TEXT_POSITIONS = {"middle right": (1, 0), "top right": (1, 1), "top center": (0, 1), "top left": (-1, 1),
                  "middle left": (-1, 0), "bottom left": (-1, -1), "bottom center": (0, -1),
                  "bottom right": (1, -1)}


def node_size(g0: float) -> float:
    """A node's marker diameter in px: grows with G₀."""
    return 10 + 16 * g0


def ring_size(g0: float) -> float:
    return node_size(g0) + 10


def recovery_ring_width(asr: float) -> float:
    return 1.5 + 4.5 * asr


def cluster_layout(nodes: pd.DataFrame, group_col: str | None) -> dict[str, tuple[float, float]]:
    """Groups as clusters: group centres on a circle, each group's concepts on a small circle around
    its centre, the first one facing away from the graph's centre (one circle of all concepts when there
    is no grouping)."""
    if not group_col:
        n, r = len(nodes), GROUP_RADIUS + CLUSTER_RADIUS
        return {c: (r * math.cos(2 * math.pi * i / n), r * math.sin(2 * math.pi * i / n)) for i, c in enumerate(nodes.concept)}
    groups = list(dict.fromkeys(nodes.sort_values(group_col, kind="stable")[group_col]))
    pos = {}
    for g, group in enumerate(groups):
        angle = 2 * math.pi * g / len(groups) + math.pi / 2
        cx, cy = GROUP_RADIUS * math.cos(angle), GROUP_RADIUS * math.sin(angle)
        members = list(nodes[nodes[group_col] == group].concept)
        radius = 0.0 if len(members) == 1 else CLUSTER_RADIUS
        for m, concept in enumerate(members):
            a = 2 * math.pi * m / len(members) + angle
            pos[concept] = (cx + radius * math.cos(a), cy + radius * math.sin(a))
    # the clusters' bounding box centred on the plot (an odd number of groups reaches higher than low)
    mid_x = (max(x for x, _ in pos.values()) + min(x for x, _ in pos.values())) / 2
    mid_y = (max(y for _, y in pos.values()) + min(y for _, y in pos.values())) / 2
    return {c: (x - mid_x, y - mid_y) for c, (x, y) in pos.items()}


def label_box(x: float, y: float, text: str, position: str, marker: float) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) in px, y upwards, that plotly gives the label ``text`` of a marker of
    diameter ``marker`` px at (x, y) px at ``position``: plotly sets the text off by marker / 1.6 + 1."""
    width, height = len(text) * LABEL_EM * LABEL_SIZE, 1.2 * LABEL_SIZE
    off = marker / 1.6 + 1
    dx, dy = TEXT_POSITIONS[position]
    x0 = x + off if dx > 0 else x - off - width if dx < 0 else x - width / 2
    y0 = y + off if dy > 0 else y - off - height if dy < 0 else y - 0.45 * height
    return x0, y0, x0 + width, y0 + height


def boxes_overlap(a, b, gap: float = 0.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def box_meets_circle(box, cx: float, cy: float, radius: float) -> bool:
    nearest_x, nearest_y = min(max(cx, box[0]), box[2]), min(max(cy, box[1]), box[3])
    return (nearest_x - cx) ** 2 + (nearest_y - cy) ** 2 < radius ** 2


def label_positions(pos: dict[str, tuple[float, float]], sizes: dict[str, float], centre_of: dict[str, tuple[float, float]],
                    circles: list[tuple[float, float, float]] = ()) -> dict[str, str]:
    """A plotly text position per concept, so that no label covers another label or a marker: each
    label takes the first free place, trying first the direction away from its cluster's centre
    (``centre_of``), then the ones next to it. ``circles``: further (x, y, radius) in px to keep clear
    (the recovery rings). A label with no free place takes the one with the least overlap."""
    px = {c: (x * PX_PER_UNIT, y * PX_PER_UNIT) for c, (x, y) in pos.items()}
    obstacles = [(x, y, sizes[c] / 2 + 1) for c, (x, y) in px.items()] + list(circles)
    placed: dict[str, tuple] = {}
    chosen: dict[str, str] = {}
    for concept, (x, y) in px.items():
        cx, cy = centre_of[concept]
        outward = math.atan2(y - cy * PX_PER_UNIT, x - cx * PX_PER_UNIT) if (x, y) != (cx * PX_PER_UNIT, cy * PX_PER_UNIT) \
            else math.atan2(y, x)

        def turn(position):
            dx, dy = TEXT_POSITIONS[position]
            return abs((math.atan2(dy, dx) - outward + math.pi) % (2 * math.pi) - math.pi)

        def overlap(box):
            hits = sum(boxes_overlap(box, other, gap=1.0) for other in placed.values())
            return hits + sum(box_meets_circle(box, *circle) for circle in obstacles)

        options = sorted(TEXT_POSITIONS, key=turn)
        boxes = {p: label_box(x, y, concept, p, sizes[concept]) for p in options}
        best = next((p for p in options if overlap(boxes[p]) == 0), None) or min(options, key=lambda p: overlap(boxes[p]))
        chosen[concept], placed[concept] = best, boxes[best]
    return chosen


def top_out_edges(edges: pd.DataFrame, threshold: float, kind: str, k: int = TOP_K) -> pd.DataFrame:
    """Each erased concept's ``k`` strongest out-edges with Δ ≥ ``threshold`` (no self-edges)."""
    shown = edges[(edges.erased != edges.affected) & (edges[kind] >= threshold)]
    return shown.sort_values(kind, ascending=False).groupby("erased", sort=False).head(k)


def network_figure(nodes: pd.DataFrame, edges: pd.DataFrame, threshold: float = 0.2,
                   group_col: str | None = None, selected: str | None = None, kind: str = "delta_top1",
                   k: int = TOP_K, recovery: pd.DataFrame | None = None,
                   attack: str = RECOVERY_ATTACK) -> go.Figure:
    """Directed spillover graph: colour = group, size = G_0, arrows a → b = Δ(a → b), each node's
    ``k`` strongest out-edges above ``threshold``; the selected concept's out- and in-edges in two colours.
    ``recovery`` (a graph's ``recovery.csv``): a ring around each concept ``attack`` was run on, wider and
    darker with its ASR, so spillover and recovery show together; every attack's ASR in the hover text."""
    pos = cluster_layout(nodes, group_col)
    labels = list(nodes[group_col]) if group_col else ["concept"] * len(nodes)
    colours = group_colours(labels)
    grouping = group_col[len("group_"):] if group_col and group_col.startswith("group_") else group_col
    # traces as plain dicts, made into a figure once without plotly's validation at the end: building
    # about a hundred validated traces took most of a concept pick's time on a server
    traces = []
    shown = top_out_edges(edges, threshold, kind, k)
    mid_x, mid_y, mid_text = [], [], []
    heads = {"x": [], "y": [], "angle": [], "size": [], "color": [], "opacity": []}
    # each arrow is a line trace and an arrowhead, drawn under the nodes and their labels (annotation
    # arrows would be drawn over them); it stops short of the affected node
    for e in shown.itertuples():
        (x0, y0), (x1, y1) = pos[e.erased], pos[e.affected]
        tip = (x1 * 0.9 + x0 * 0.1, y1 * 0.9 + y0 * 0.1)
        weight = getattr(e, kind)
        colour = OUT_EDGE if e.erased == selected else IN_EDGE if e.affected == selected else "#999"
        opacity = 0.95 if not selected or selected in (e.erased, e.affected) else 0.12
        width = 0.5 + 3 * weight
        traces.append(dict(type="scatter", x=[x0, tip[0]], y=[y0, tip[1]], mode="lines", name=EDGE_TRACE,
                           line=dict(color=colour, width=width), opacity=opacity, hoverinfo="skip", showlegend=False))
        for key, value in (("x", tip[0]), ("y", tip[1]), ("angle", math.degrees(math.atan2(x1 - x0, y1 - y0))),
                           ("size", 8 + 3 * width), ("color", colour), ("opacity", opacity)):
            heads[key].append(value)  # angle: clockwise from up, the arrow symbol's direction
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_text.append(f"{e.erased} → {e.affected}: Δ = {weight:.2f}")
    traces.append(dict(type="scatter", x=heads["x"], y=heads["y"], mode="markers", name=ARROWHEADS, hoverinfo="skip",
                       showlegend=False, marker=dict(symbol="arrow", angle=heads["angle"], size=heads["size"],
                                                     color=heads["color"], opacity=heads["opacity"], line=dict(width=0))))
    traces.append(dict(type="scatter", x=mid_x, y=mid_y, mode="markers", marker=dict(size=8, opacity=0),
                       hovertext=mid_text, hoverinfo="text", name="edges", showlegend=False))
    strongest = edges[edges.erased != edges.affected].sort_values(kind, ascending=False).groupby("erased").head(1)
    worst = {r.erased: f"{r.affected} (Δ {getattr(r, kind):.2f})" for r in strongest.itertuples()}
    rates = recovery_by_concept(recovery)
    g0_of = nodes.set_index("concept").G0_top1.fillna(0.5)
    ringed = [c for c in nodes.concept if attack in rates.get(c, {})]
    # labels away from their cluster's centre (the graph's centre for a concept alone in its group),
    # each where it covers no other label, marker or ring
    sizes = {c: node_size(g0_of[c]) for c in nodes.concept}
    members_of: dict = {}
    for concept, label in zip(nodes.concept, labels):
        members_of.setdefault(label, []).append(concept)
    centre_of = {}
    for members in members_of.values():
        alone = len(members) == 1 or not group_col
        centre = (0.0, 0.0) if alone else (sum(pos[c][0] for c in members) / len(members),
                                           sum(pos[c][1] for c in members) / len(members))
        centre_of.update({c: centre for c in members})
    rings = [(pos[c][0] * PX_PER_UNIT, pos[c][1] * PX_PER_UNIT,
              ring_size(g0_of[c]) / 2 + recovery_ring_width(rates[c][attack]) / 2) for c in ringed]
    places = label_positions(pos, sizes, centre_of, rings)
    if ringed:  # drawn under the nodes; a click on a ring selects its concept as a click on the node does
        asr = [rates[c][attack] for c in ringed]
        traces.append(dict(
            type="scatter", x=[pos[c][0] for c in ringed], y=[pos[c][1] for c in ringed], mode="markers", customdata=ringed,
            marker=dict(symbol="circle-open", size=[ring_size(g0_of[c]) for c in ringed], color=asr,
                        colorscale=RECOVERY_SCALE, cmin=0, cmax=1, line=dict(width=[recovery_ring_width(a) for a in asr])),
            hovertext=[f"<b>{c}</b>{recovery_text(rates[c], attack)}" for c in ringed], hoverinfo="text",
            name=f"recovery ({attack})", showlegend=False))
    for group, colour in colours.items():
        members = nodes[[lbl == group for lbl in labels]]
        g0 = members.G0_top1.fillna(0.5)
        xs, ys = [pos[c][0] for c in members.concept], [pos[c][1] for c in members.concept]
        traces.append(dict(
            type="scatter", x=xs, y=ys, mode="markers+text", text=list(members.concept),
            textposition=[places[c] for c in members.concept],
            textfont=dict(size=LABEL_SIZE, shadow=LABEL_HALO),
            customdata=list(members.concept),
            marker=dict(size=[sizes[c] for c in members.concept], color=colour,
                        line=dict(width=[4 if c == selected else 1 for c in members.concept],
                                  color=["#111" if c == selected else "#fff" for c in members.concept])),
            hovertext=[f"<b>{c}</b><br>G₀ {g:.2f}<br>erasing it hurts most: {worst.get(c, 'no row')}"
                       + recovery_text(rates.get(c, {}), attack) for c, g in zip(members.concept, g0)],
            hoverinfo="text", name=str(group)))
    # a weight legend: arrow width grows with Δ
    for weight in (0.3, 0.6, 0.9):
        traces.append(dict(type="scatter", x=[None], y=[None], mode="lines", line=dict(color="#999", width=0.5 + 3 * weight),
                           name=f"Δ {weight:.1f}", legendgroup="weights", legendgrouptitle=dict(text="edge Δ")))
    if ringed:  # a ring legend as the width legend: ring width and colour grow with the ASR
        for rate in (0.0, 0.5, 1.0):
            traces.append(dict(type="scatter", x=[None], y=[None], mode="markers", name=f"ASR {rate:.1f}",
                               marker=dict(symbol="circle-open", size=14, color=[rate], colorscale=RECOVERY_SCALE,
                                           cmin=0, cmax=1, line=dict(width=recovery_ring_width(rate))),
                               legendgroup="recovery", legendgrouptitle=dict(text=f"recovery ASR ({attack})")))
    if selected:
        for colour, name in ((OUT_EDGE, f"{selected} → (its erasure hurts)"), (IN_EDGE, f"→ {selected}")):
            traces.append(dict(type="scatter", x=[None], y=[None], mode="lines", line=dict(color=colour, width=3),
                               name=name, legendgroup="selected", legendgrouptitle=dict(text="selected")))
    fig = go.Figure(data=traces, _validate=False)
    fig.update_layout(xaxis=dict(visible=False, range=list(GRAPH_X_RANGE)),
                      yaxis=dict(visible=False, range=list(GRAPH_Y_RANGE), scaleanchor="x"),
                      margin=GRAPH_MARGIN, height=GRAPH_HEIGHT, uirevision="graph",
                      legend=dict(title_text=grouping or "", groupclick="toggleitem"),
                      title=dict(text=f"Δ ≥ {threshold:.2f}, each concept's strongest {k} out-edges: {len(shown)} edges"),
                      clickmode="event")
    return fig


def heatmap_figure(matrix: pd.DataFrame, nodes: pd.DataFrame, group_col: str | None, title: str) -> go.Figure:
    """Delta matrix (rows = erased, columns = affected) ordered by group, with group boundaries."""
    order = list(nodes.sort_values(group_col, kind="stable").concept) if group_col else list(nodes.concept)
    m = matrix.reindex(index=[c for c in order if c in matrix.index], columns=order)
    fig = go.Figure(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), colorscale="Reds", zmin=0, zmax=1,
                               colorbar=dict(title="Δ"), hovertemplate="erase %{y}<br>%{x}: Δ %{z:.2f}<extra></extra>"))
    if group_col:
        groups = nodes.set_index("concept")[group_col]
        boundaries = [i - 0.5 for i in range(1, len(order)) if groups[order[i]] != groups[order[i - 1]]]
        for b in boundaries:
            fig.add_shape(type="line", x0=b, x1=b, y0=-0.5, y1=len(m.index) - 0.5, line=dict(color="#333", width=1))
            fig.add_shape(type="line", y0=b, y1=b, x0=-0.5, x1=len(order) - 0.5, line=dict(color="#333", width=1))
    fig.update_layout(title=title, height=560, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis=dict(autorange="reversed", title="erased"), xaxis=dict(title="affected"))
    return fig


def difference_figure(a: pd.DataFrame, b: pd.DataFrame, nodes: pd.DataFrame, group_col: str | None, title: str) -> go.Figure:
    """Delta_a - Delta_b, e.g. ESD-'' minus AGE: red where AGE spills over less."""
    diff = a.subtract(b.reindex(index=a.index, columns=a.columns))
    fig = heatmap_figure(diff, nodes, group_col, title)
    fig.update_traces(colorscale="RdBu_r", zmin=-1, zmax=1, zmid=0, colorbar=dict(title="ΔΔ"))
    return fig


def umap_figure(coords: np.ndarray, nodes: pd.DataFrame, colour_values: pd.Series | None, title: str) -> go.Figure:
    values = colour_values.reindex(nodes.concept).fillna(0).values if colour_values is not None else None
    fig = go.Figure(go.Scatter(
        x=coords[:, 0], y=coords[:, 1], mode="markers+text", text=list(nodes.concept), textposition="top center",
        marker=dict(size=14, color=values if values is not None else "#3d6fd9", colorscale="Reds", cmin=0, cmax=1,
                    showscale=values is not None, colorbar=dict(title="Δ")),
        hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(title=title, height=480, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(title="UMAP 1"), yaxis=dict(title="UMAP 2"))
    return fig


def scatter_figure(pairs: pd.DataFrame, measure: str, kind: str = "delta_top1", rho: float | None = None,
                   p_value: float | None = None) -> go.Figure:
    """Δ against one similarity measure, titled with its Spearman ρ and p-value when given."""
    fig = go.Figure(go.Scatter(x=pairs[measure], y=pairs[kind], mode="markers",
                               text=[f"{a} → {b}" for a, b in zip(pairs.a, pairs.b)],
                               hovertemplate="%{text}<br>%{x:.3f}, Δ %{y:.2f}<extra></extra>", marker=dict(size=7, opacity=0.7)))
    correlation = f": Spearman ρ = {rho:+.2f} (p = {p_value:.2g}, {len(pairs)} pairs)" if rho is not None else ""
    fig.update_layout(title=f"{measure} vs Δ{correlation}<br><sub>each dot: erased → affected</sub>", height=420,
                      xaxis_title=measure, yaxis_title="Δ (top-1)", margin=dict(l=10, r=10, t=40, b=10))
    return fig


def loss_figure(history: list[dict]) -> go.Figure:
    fig = go.Figure()
    frame = pd.DataFrame(history)
    if len(frame):
        for column in ("erase", "preserve", "pi_objective"):
            if column in frame:
                part = frame.dropna(subset=[column])
                fig.add_trace(go.Scatter(x=part.step, y=part[column], mode="lines", name=column))
    # plain numbers on the log axis (1e-4, not plotly's SI "100μ")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title="loss terms", legend=dict(orientation="h"),
                      xaxis_title="step", yaxis=dict(type="log", exponentformat="e", title="loss"))
    return fig


def targets_figure(targets: dict[str, list]) -> go.Figure:
    fig = go.Figure()
    for concept, top in targets.items():
        fig.add_trace(go.Bar(x=[p for _, p in top], y=[w for w, _ in top], orientation="h", name=concept))
    # π spreads over ~100 candidates (0.01-0.2 each), so the axis follows the data, not 0-1
    largest = max((p for top in targets.values() for _, p in top), default=1.0)
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title="π: current top targets",
                      yaxis=dict(autorange="reversed"), xaxis=dict(range=[0, min(1.0, largest * 1.15)], title="π"))
    return fig


def spillover_bar_figure(row: pd.DataFrame, erased: str) -> go.Figure:
    row = row[row.affected != erased].sort_values("delta_top1", ascending=False)
    fig = go.Figure(go.Bar(x=list(row.affected), y=list(row.delta_top1), marker_color="#c0392b"))
    fig.update_layout(title=f"spillover of erasing {erased}: Δ per concept", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(title="Δ top-1", range=[-0.2, 1]))
    return fig


def methods_rows_figure(rows: pd.DataFrame, erased: str) -> go.Figure:
    """Every method's spillover row of one erased concept (rows = methods, columns = affected concepts)."""
    fig = go.Figure(go.Heatmap(z=rows.values, x=list(rows.columns), y=list(rows.index), colorscale="Reds", zmin=0,
                               zmax=1, colorbar=dict(title="Δ"),
                               hovertemplate="%{y}<br>%{x}: Δ %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"Spillover of erasing {erased!r}, per method", height=120 + 34 * len(rows.index),
                      margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed"),
                      xaxis=dict(title="affected"))
    return fig


def first_grouping(nodes: pd.DataFrame) -> str | None:
    """The node grouping a graph is drawn with first: its first ``group_*`` column."""
    return next((c for c in nodes.columns if c.startswith("group_")), None)


def first_view(store) -> go.Figure:
    """A graph's network as the Concept graph tab draws it first (and the start-up page before it)."""
    nodes, edges = store.nodes(), store.edges()
    return network_figure(nodes, edges, DEFAULT_THRESHOLD, first_grouping(nodes), None, recovery=store.recovery())
