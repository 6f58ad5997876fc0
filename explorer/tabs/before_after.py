"""The Before / after tab: a finished run's images beside the original model's, same seeds, and its
spillover row measured into the page's graph."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from age_explorer.core.app.workflows import before_after, spillover_row
from age_explorer.core.runs import read_manifest
from age_explorer.core.sampling import parse_seeds

from .. import plots
from ..service import before_after_rows
from ..space import gpu
from .common import COMPUTE_SLOT, Page, owner_of, shown_as_error
from .graph import GraphTab

MAX_SEEDS = 8


def build(page: Page, graph_tab: GraphTab) -> gr.Dropdown:
    """The tab's components; returns its run list."""
    ex, settings = page.explorer, page.settings

    @gpu
    def show_before_after(run_label, seeds_text, owner="", request: gr.Request = None, progress=gr.Progress()):
        if not run_label:
            raise gr.Error("no finished run yet: erase a concept first")
        with shown_as_error():
            seeds = parse_seeds(seeds_text, limit=MAX_SEEDS)
            run_dir = ex.run(run_label, owner_of(owner, request)).path
        manifest = read_manifest(Path(run_dir))
        models = [("original", ex.bundle()), ("erased", ex.erased_bundle(run_dir))]
        esd_dir = ex.esd_counterpart(run_dir, manifest, owner_of(owner, request))
        if esd_dir:
            models.append(("ESD " + repr(read_manifest(Path(esd_dir))["config"].get("target", "")), ex.erased_bundle(esd_dir)))
        with ex.compute():
            shown = before_after(models, before_after_rows(ex, manifest), seeds, seeds_text,
                                 progress=lambda share, desc: progress(share, desc=desc))
        return shown.sheet, shown.legend, shown.pair

    @gpu
    def measure_row(run_label, owner="", request: gr.Request = None, progress=gr.Progress()):
        if not run_label:
            raise gr.Error("no finished run yet: erase a concept first")
        with shown_as_error():
            run_dir = ex.run(run_label, owner_of(owner, request)).path
            method = read_manifest(Path(run_dir))["method"]
            with ex.compute():
                row, store = spillover_row(ex.bundle(), ex.erased_bundle(run_dir), run_dir, ex.concept_set(),
                                           ex.user_graph(method).folder, settings.spillover_images,
                                           progress=lambda share, desc: progress(share, desc=desc))
        erased = row.erased.iloc[0]
        own = row[row.affected == erased]
        return plots.spillover_bar_figure(row, erased), (
            f"Row added to the graph **{store.folder.name}** ({settings.spillover_images} images per concept). "
            f"Erased concept: G {own.G_before_top1.iloc[0]:.2f} → {own.G_after_top1.iloc[0]:.2f}."
        ), gr.Dropdown(choices=list(ex.graph_dirs()))

    with gr.Row():
        run_dd = gr.Dropdown([], label="Finished run", elem_id="run_dd", allow_custom_value=True)
        seeds = gr.Textbox("0-3", label="Seeds")
        show_btn = gr.Button("Show before / after", variant="primary", elem_id="show_btn")
    sheet = gr.Image(label="original | erased (| ESD of the same concepts, when run), same seeds",
                     type="pil", elem_id="before_after", show_label=True, interactive=False)
    legend = gr.Markdown(elem_id="before_after_legend")
    slider = gr.ImageSlider(label="one pair: original | erased", type="pil", elem_id="slider")
    spill_btn = gr.Button("Measure the spillover row and add it to the graph", elem_id="spill_btn")
    spill_plot = gr.Plot(label="Spillover of the erased concept")
    spill_md = gr.Markdown()
    page.run_lists.append((run_dd, False))

    show_btn.click(show_before_after, [run_dd, seeds, page.owner], [sheet, legend, slider], api_name="before_after",
                   api_visibility=page.api, **COMPUTE_SLOT)
    spill_btn.click(measure_row, [run_dd, page.owner], [spill_plot, spill_md, graph_tab.graph_dd], api_name="spillover",
                    api_visibility=page.api, **COMPUTE_SLOT)
    return run_dd
