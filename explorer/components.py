"""A clickable concept graph: ``gr.Plot`` has no click events, so the graph is a ``gr.HTML``
component that draws the plotly figure with the plotly.js shipped inside the plotly package and
sends node clicks to Python with ``trigger('select', ...)``."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import plotly

from .plots import GRAPH_HEIGHT

STATIC_DIR = Path(__file__).resolve().parent / "static"

_JS = """
const P = window.Plotly;  // captured: a gr.Plot on the page replaces window.Plotly with an older copy
const div = element.querySelector('.cg-plot');
function draw() {
  if (!props.value) return;
  const fig = JSON.parse(props.value);
  P.react(div, fig.data, fig.layout, {displaylogo: false, responsive: true});
  if (!div.dataset.bound) {
    div.dataset.bound = '1';
    div.on('plotly_click', (ev) => {
      const p = ev.points && ev.points[0];
      if (!p || p.data.name === 'edges' || p.customdata === undefined) return;
      trigger('select', {index: p.pointIndex, value: p.customdata});
    });
  }
  element.dataset.ready = '1';
}
draw();
watch('value', draw);
"""


def plotly_js_path() -> Path:
    """Copy plotly.min.js from the plotly package into the static folder (served offline)."""
    STATIC_DIR.mkdir(exist_ok=True)
    target = STATIC_DIR / "plotly.min.js"
    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copyfile(source, target)
    return target


def concept_graph(value: str, elem_id: str = "concept_graph", height: int = GRAPH_HEIGHT) -> gr.HTML:
    js_path = plotly_js_path()
    gr.set_static_paths([str(STATIC_DIR)])
    return gr.HTML(value=value, html_template=f"<div class='cg-plot' style='height:{height}px'></div>",
                   js_on_load=_JS, head=f'<script src="/gradio_api/file={js_path}"></script>',
                   apply_default_css=False, elem_id=elem_id)
