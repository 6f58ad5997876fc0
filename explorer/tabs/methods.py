"""The Methods tab: which method should I use for this concept?

A ranked table of every graph of this model (one row per method and recipe, from
``core/graph/methods.py``), each method's spillover row of a picked concept side by side, and the
before/after images of two finished runs of that concept on the same seeds.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from age_explorer.explorer.workflows import before_after
from age_explorer.core.runs import RunManifest
from age_explorer.core.sampling import parse_seeds

from .. import plots
from ..service import before_after_rows
from ..space import gpu
from .common import COMPUTE_SLOT, Page, bind, error, owner_of, plain, shown_as_error

MAX_SEEDS = 8
SHOWN_COLUMNS = {"rank": "rank", "method": "method", "erased_of": "erased", "neighbours": "neighbour Δ",
                 "unrelated": "unrelated Δ", "ESR_1": "ESR-1", "ESR_5": "ESR-5", "PSR_1": "PSR-1", "PSR_5": "PSR-5",
                 "embedding_asr": "embedding ASR", "row_s": "row s", "graph": "graph (source)"}


def ranked_table(page: Page) -> pd.DataFrame:
    """The table as the page shows it: rates in %, the graph folder each row comes from."""
    table = page.explorer.methods_table()
    if table.empty:
        return pd.DataFrame(columns=list(SHOWN_COLUMNS.values()))
    table = table.assign(erased_of=[f"{e}/{r}" for e, r in zip(table.erased, table.rows)])
    for column in ("neighbours", "unrelated", "ESR_1", "ESR_5", "PSR_1", "PSR_5", "embedding_asr"):
        table[column] = (100 * table[column]).round(1)
    table["row_s"] = table.row_s.round(0)
    return table[list(SHOWN_COLUMNS)].rename(columns=SHOWN_COLUMNS)


def show_rows(page: Page, erased: str):
    """Every method's spillover row of ``erased``, as a heatmap."""
    ex = page.explorer
    if not erased:
        raise gr.Error("pick a concept")
    rows = ex.method_rows(erased)
    if rows.empty:
        raise error(f"no graph has a row of {erased!r} yet")
    order = [c for c in ex.concept_set().concepts if c in rows.columns] or list(rows.columns)
    return plots.methods_rows_figure(rows[order], erased)


def runs_of(page: Page, erased: str, owner="", request: gr.Request = None):
    """The two run lists: the finished runs that erased ``erased`` (newest first), each method's newest two."""
    labels = [run.label for run in page.explorer.runs(owner_of(owner, request)) if erased in run.concepts]
    first = labels[0] if labels else None
    second = next((label for label in labels[1:]), None)
    return gr.Dropdown(choices=labels, value=first), gr.Dropdown(choices=labels, value=second)


def show_pair(page: Page, run_a, run_b, seeds_text, owner="", request: gr.Request = None, progress=gr.Progress()):
    """The original and two runs of the same concept on the same seeds, as one contact sheet."""
    ex = page.explorer
    if not run_a or not run_b:
        raise gr.Error("pick two finished runs of the concept (erase it in the Erase tab with two methods)")
    with shown_as_error():
        seeds = parse_seeds(seeds_text, limit=MAX_SEEDS)
        a = ex.run(run_a, owner_of(owner, request))
        b = ex.run(run_b, owner_of(owner, request))
    manifest = RunManifest.read(Path(a.path))
    columns = [("original", None), ("A: " + run_a, a.path), ("B: " + run_b, b.path)]
    with shown_as_error(), ex.model() as bundle, ex.compute():
        shown = before_after(bundle, columns, before_after_rows(ex, manifest), seeds, seeds_text,
                             progress=lambda share, desc: progress(share, desc=desc))
    return shown.sheet, plain(shown.legend)


def build(page: Page, concepts: list[str], tab: gr.Tab) -> None:
    gr.Markdown("Which method should I use for this concept? One row per graph of this model: the rows it "
                "erased (G after ≤ 0.10), the mean spillover Δ (%) on the concept's group neighbours and on "
                "unrelated concepts, ESR/PSR (%), the embedding attack's success rate (%) where the graph has a "
                "recovery layer, and seconds per row as built. Click a header to sort; the last column names the "
                "graph folder each row comes from (open it in the Concept graph tab).")
    table = gr.Dataframe(interactive=False, elem_id="methods_table",
                         label="Methods, ranked by the share of rows erased, then spillover on neighbours")
    with gr.Row():
        concept = gr.Dropdown(concepts, value=concepts[0] if concepts else None, label="Concept",
                              elem_id="methods_concept")
        rows_btn = gr.Button("Show every method's row", elem_id="methods_rows_btn")
    rows_plot = gr.Plot(label="Spillover rows, side by side", elem_id="methods_rows")
    with gr.Row():
        run_a = gr.Dropdown([], label="Run A (of the concept)", elem_id="methods_run_a")
        run_b = gr.Dropdown([], label="Run B (of the concept)", elem_id="methods_run_b")
        seeds = gr.Textbox(value="0-3", label=f"Seeds (at most {MAX_SEEDS})", elem_id="methods_seeds")
        pair_btn = gr.Button("Before / after of A and B", elem_id="methods_pair_btn")
    sheet = gr.Image(label="original | A | B, same seeds", type="pil", elem_id="methods_sheet", interactive=False)
    legend = gr.Markdown(elem_id="methods_legend")

    on = partial(bind, page=page)
    rows_btn.click(on(show_rows), concept, rows_plot, api_name="method_rows", api_visibility=page.api)
    # filled when the tab opens, so graphs and runs made meanwhile appear
    tab.select(on(ranked_table), None, table, api_visibility="private", show_progress="hidden")
    for event in (concept.change, tab.select):
        event(on(runs_of), [concept, page.owner], [run_a, run_b], api_visibility="private")
    gr.Button(visible=False).click(on(runs_of), [concept, page.owner], [run_a, run_b],
                                   api_name="method_runs", api_visibility=page.api)
    pair_btn.click(gpu(on(show_pair)), [run_a, run_b, seeds, page.owner], [sheet, legend],
                   api_name="method_pair", api_visibility=page.api, **COMPUTE_SLOT)
    gr.Button(visible=False).click(on(ranked_table), None, table, api_name="methods",
                                   api_visibility=page.api)
