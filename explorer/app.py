"""Build the explorer's ``gr.Blocks`` without launching it (tests import it and drive it via a server).

One module per tab under ``tabs/``; this file only assembles them and the state they share.
"""

from __future__ import annotations

import gradio as gr

from .service import Explorer, Settings
from .tabs import before_after, erase, export, generate, graph, methods, queries, robustness
from .tabs.common import Page, wire_run_lists, wire_runs_endpoint

__all__ = ["build_app", "Settings"]


def build_app(settings: Settings | None = None) -> gr.Blocks:
    ex = Explorer(settings or Settings())
    ex.graph_dirs()  # first: a damaged graph it skips becomes a warning in the page header
    with gr.Blocks(title="AGE Explorer") as demo:
        gr.Markdown("# AGE Explorer\nSee and steer concept erasure in text-to-image diffusion models. "
                    + ex.status_line() + "".join(f"\n\n**Warning**: {w}" for w in ex.warnings))
        # With MCP on, only the read-only graph queries are public, so only they become MCP tools; the
        # page's own endpoints stay callable by clients ("undocumented").
        # The browser's values are encrypted with the data folder's own key, not one made at each start,
        # so a page still reads its visitor's secret and job after a restart.
        page = Page(ex, "undocumented" if ex.settings.mcp else "public", owner=gr.State(""), job_id=gr.State(""),
                    saved_job=gr.BrowserState("", storage_key="age_explorer_job", secret=ex.browser_key),
                    exported=gr.State([]), runs_changed=gr.State(""))
        owner_token = gr.BrowserState("", storage_key="age_explorer_owner", secret=ex.browser_key)
        with gr.Tabs():
            with gr.Tab("Concept graph", id="graph"):
                graph_tab = graph.build(page)
            with gr.Tab("Erase", id="erase"):
                erase_tab = erase.build(page, graph_tab.concepts or ex.toy_concepts())
            with gr.Tab("Before / after", id="compare") as compare_tab:
                compare_runs = before_after.build(page, graph_tab)
            with gr.Tab("Methods", id="methods") as methods_tab:
                methods.build(page, graph_tab.concepts or ex.toy_concepts(), methods_tab)
            with gr.Tab("Robustness", id="robustness") as robustness_tab:
                robustness.build(page)
            with gr.Tab("Generate", id="generate") as generate_tab:
                generate.build(page)
            with gr.Tab("Export", id="export") as export_tab:
                export_runs = export.build(page)
        queries.build(page)
        loaded = demo.load(erase_tab.reattach, [page.saved_job, owner_token],
                           [page.job_id, erase_tab.timer, page.owner, owner_token], api_visibility="private")
        loaded.then(erase_tab.list_jobs, page.owner, erase_tab.jobs_outputs, api_visibility="private",
                    show_progress="hidden")
        wire_run_lists(page, loaded, [compare_tab, robustness_tab, generate_tab, export_tab])
        wire_runs_endpoint(page, [compare_runs, export_runs])
    demo.explorer, demo.page = ex, page
    return demo
