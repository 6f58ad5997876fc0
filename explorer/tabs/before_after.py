"""The Before / after tab: a finished run's images beside the original model's, same seeds, its
evaluation (ESR/PSR, a background job) beside them, and its spillover row measured into the page's graph."""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from age_explorer.core.app.evaluate import default_out as evaluation_dir
from age_explorer.explorer.workflows import (EVALUATION_COLUMNS, PAGE_IMAGES_PER_CLASS, before_after, evaluation_view,
                                             plan_evaluation, spillover_row)
from age_explorer.core.runs import RunManifest
from age_explorer.core.sampling import parse_seeds

from .. import plots
from ..service import before_after_rows
from ..space import gpu
from .common import ACTIVE, COMPUTE_SLOT, Page, bind, job_line, owner_of, plain, progress_html, shown_as_error, whole_number
from .graph import GraphTab

MAX_SEEDS = 8


def run_path(page: Page, run_label, owner, request) -> str:
    if not run_label:
        raise gr.Error("no finished run yet: erase a concept first")
    with shown_as_error():
        return page.explorer.run(run_label, owner_of(owner, request)).path


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def show_before_after(page: Page, run_label, seeds_text, owner="", request: gr.Request = None, progress=gr.Progress()):
    ex = page.explorer
    if not run_label:
        raise gr.Error("no finished run yet: erase a concept first")
    with shown_as_error():
        seeds = parse_seeds(seeds_text, limit=MAX_SEEDS)
        run_dir = ex.run(run_label, owner_of(owner, request)).path
    manifest = RunManifest.read(Path(run_dir))
    columns = [("original", None), ("erased", run_dir)]
    esd_dir = ex.esd_counterpart(run_dir, manifest, owner_of(owner, request))
    if esd_dir:
        columns.append(("ESD " + repr(RunManifest.read(Path(esd_dir)).config.get("target", "")), esd_dir))
    with shown_as_error(), ex.model() as bundle, ex.compute():
        shown = before_after(bundle, columns, before_after_rows(ex, manifest), seeds, seeds_text,
                             progress=lambda share, desc: progress(share, desc=desc))
    legend = shown.legend
    picks = manifest.neighbour_picks
    if picks and picks.get("share") is not None:  # did the target search find the concept's neighbours?
        legend = (f"AGE's model steps used a neighbour of the erased concept as target {picks['share']:.0%} "
                  f"of the time; picking among its candidates at random gives {picks['chance']:.0%}. " + legend)
    return shown.sheet, plain(legend), shown.pair


def measure_row(page: Page, run_label, owner="", request: gr.Request = None, progress=gr.Progress()):
    ex, settings = page.explorer, page.settings
    if not run_label:
        raise gr.Error("no finished run yet: erase a concept first")
    with shown_as_error():
        run_dir = ex.run(run_label, owner_of(owner, request)).path
        method = RunManifest.read(Path(run_dir)).method
        with ex.model() as bundle, ex.compute():
            row, store = spillover_row(bundle, run_dir, ex.concept_set(), ex.user_graph(method).folder,
                                       settings.spillover_images,
                                       progress=lambda share, desc: progress(share, desc=desc),
                                       evaluator_name=settings.evaluator)
    erased = row.erased.iloc[0]
    own = row[row.affected == erased]
    return plots.spillover_bar_figure(row, erased), (
        f"Row added to the graph **{store.folder.name}** ({settings.spillover_images} images per concept). "
        f"Erased concept: G {own.G_before_top1.iloc[0]:.2f} → {own.G_after_top1.iloc[0]:.2f}."
    ), gr.Dropdown(choices=list(ex.graph_dirs()))


def evaluation_of(page: Page, run_label, owner="", request: gr.Request = None):
    """The run's last evaluation (``RUN/evaluation``), or a line saying there is none yet."""
    folder = evaluation_dir(run_path(page, run_label, owner, request))
    if not (folder / "results.json").is_file():
        return "No evaluation of this run yet: press **Evaluate**.", None
    with shown_as_error():
        shown = evaluation_view(folder)
    return shown.summary, shown.table


def on_run(page: Page, run_label, owner="", request: gr.Request = None):
    return evaluation_of(page, run_label, owner, request) if run_label else ("", None)


def start_evaluate(page: Page, run_label, images_per_class, owner="", request: gr.Request = None):
    run_dir = run_path(page, run_label, owner, request)
    settings = page.settings
    with shown_as_error():
        config = plan_evaluation(images_per_class, settings.evaluator, settings.concept_set)
        job_id = page.explorer.submit_evaluate(run_dir, config, owner=owner_of(owner, request))
    return job_id, gr.Timer(active=True), f"Job `{job_id}` queued: ESR/PSR of {plain(run_label)}, " \
                                          f"{config.images_per_class} images per class."


def tick(page: Page, job_id, run_label, owner="", request: gr.Request = None):
    if not job_id:
        return gr.Timer(active=False), progress_html(None, "eval"), *[gr.skip()] * 4
    try:
        job = page.explorer.poll(job_id, owner_of(owner, request))
    except KeyError:
        return gr.Timer(active=False), progress_html(None, "eval"), "unknown job", *[gr.skip()] * 3
    # the queue line is true only while queued; afterwards the status line says what happened
    status, bar = job_line(job), progress_html(job, "eval")
    queue_line = gr.skip() if job.status == "queued" else ""
    if job.status != "done":
        return gr.Timer(active=job.status in ACTIVE), bar, status, queue_line, gr.skip(), gr.skip()
    try:  # shown when its run is still the chosen one
        chosen = bool(run_label) and run_path(page, run_label, owner, request) == job.config["model"]
    except gr.Error:
        chosen = False
    if not chosen:
        return gr.Timer(active=False), bar, status + ": choose its run again to see it", queue_line, gr.skip(), \
            gr.skip()
    shown = evaluation_view(job.artifacts["evaluation_dir"])
    return gr.Timer(active=False), bar, status, queue_line, shown.summary, shown.table


def cancel(page: Page, job_id, owner="", request: gr.Request = None):
    if not job_id:
        raise gr.Error("no evaluation to cancel")
    with shown_as_error(KeyError):
        return f"Job `{job_id}`: {page.explorer.cancel(job_id, owner_of(owner, request))}"


def build(page: Page, graph_tab: GraphTab) -> gr.Dropdown:
    """The tab's components; returns its run list."""
    with gr.Row():
        run_dd = gr.Dropdown([], label="Finished run", elem_id="run_dd", allow_custom_value=True)
        seeds = gr.Textbox("0-3", label="Seeds")
        show_btn = gr.Button("Show before / after", variant="primary", elem_id="show_btn")
    with gr.Row():
        with gr.Column(scale=3):
            sheet = gr.Image(label="original | erased (| ESD of the same concepts, when run), same seeds",
                             type="pil", elem_id="before_after", show_label=True, interactive=False)
            legend = gr.Markdown(elem_id="before_after_legend")
        with gr.Column(scale=2):
            with gr.Row():
                images_per_class = whole_number(value=PAGE_IMAGES_PER_CLASS, precision=0, elem_id="eval_images",
                                                label="Images per class (the paper: 500)")
                evaluate_btn = gr.Button("Evaluate (ESR / PSR)", elem_id="evaluate_btn")
                cancel_btn = gr.Button("Cancel", elem_id="evaluate_cancel_btn")
            eval_queue = gr.Markdown(elem_id="eval_queue")
            eval_progress = gr.HTML(progress_html(None, "eval"))
            eval_status = gr.Markdown(elem_id="eval_status")
            eval_summary = gr.Markdown(elem_id="eval_summary")
            eval_table = gr.Dataframe(label="Per class: top-1 and top-5 hit rates", elem_id="eval_table",
                                      headers=EVALUATION_COLUMNS, value=[], interactive=False)
    slider = gr.ImageSlider(label="one pair: original | erased", type="pil", elem_id="slider")
    spill_btn = gr.Button("Measure the spillover row and add it to the graph", elem_id="spill_btn")
    spill_plot = gr.Plot(label="Spillover of the erased concept")
    spill_md = gr.Markdown()
    page.run_lists.append((run_dd, False))

    # the session's evaluation job; a component, so API clients get its id
    eval_job, eval_timer = gr.Textbox(visible=False), gr.Timer(1.0, active=False)
    on = functools.partial(bind, page=page)
    run_dd.change(on(on_run), [run_dd, page.owner], [eval_summary, eval_table], api_visibility="private")
    gr.Button(visible=False).click(on(evaluation_of), [run_dd, page.owner], [eval_summary, eval_table],
                                   api_name="evaluation", api_visibility=page.api)
    evaluate_btn.click(on(start_evaluate), [run_dd, images_per_class, page.owner], [eval_job, eval_timer, eval_queue],
                       api_name="evaluate", api_visibility=page.api)
    eval_timer.tick(on(tick), [eval_job, run_dd, page.owner], [eval_timer, eval_progress, eval_status, eval_queue,
                                                           eval_summary, eval_table], show_progress="hidden",
                    api_visibility="private")
    cancel_btn.click(on(cancel), [eval_job, page.owner], eval_queue, api_name="cancel_evaluate", api_visibility=page.api)
    show_btn.click(gpu(on(show_before_after)), [run_dd, seeds, page.owner], [sheet, legend, slider], api_name="before_after",
                   api_visibility=page.api, **COMPUTE_SLOT)
    spill_btn.click(gpu(on(measure_row)), [run_dd, page.owner], [spill_plot, spill_md, graph_tab.graph_dd], api_name="spillover",
                    api_visibility=page.api, **COMPUTE_SLOT)
    return run_dd
