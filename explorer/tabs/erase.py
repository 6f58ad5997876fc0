"""The Erase tab: a form whose method, preset and step count agree, a background job and its live
progress; a finished job says where its run is and opens it in every tab that takes a run."""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass, fields

import gradio as gr
import pandas as pd

from age_explorer.core.app.job_kinds import erase_run_dir
from age_explorer.explorer.workflows import plan_erase, preset_values, presets_offered
from age_explorer.core.backends import get_backend
from age_explorer.core.checks import help_text
from age_explorer.core.erasure import METHODS, get_method
from age_explorer.core.runs import read_history

from .. import plots
from .common import ACTIVE, Page, bind, job_line, job_state, owner_of, plain, progress_html, shown_as_error, whole_number

PRESET_VOCAB = "(preset)"
JOBS_HEADERS = ["job", "kind", "status", "step", "what"]


def status_text(job, public: bool) -> str:
    """What the job is doing, or what became of it and what to do next."""
    text = job_line(job)
    progress = job.progress
    if job.status in ("interrupted", "failed"):
        text += "  \nPress **Resume** to continue from the last checkpoint."
    if job.status == "done":
        where = "" if public else f" in `{job.artifacts.get('run_dir')}`"
        text += (f": the run is saved{where}. Next: compare it in **Before / after** or download it in "
                 "**Export** (it is chosen there), or pick it in **Generate**'s model list.")
        text += "".join(f"  \nNote: {plain(line)}" for line in job.artifacts.get("target_notes", []))
    if progress.get("targets"):
        text += "  \nTop targets: " + "; ".join(f"{plain(c)}: " + ", ".join(f"{plain(w)} {p:.2f}" for w, p in t[:3])
                                               for c, t in progress["targets"].items())
    if progress.get("pick") is not None and progress.get("pick_is_neighbour") is not None:
        text += f"  \nLast target used: {plain(progress['pick'])} ({'a neighbour' if progress['pick_is_neighbour'] else 'not a neighbour'})"
    return text


# The method options the form offers, in the order of /start_erase's inputs after the step count. Each
# one's widget, help text, choices and visibility come from the chosen method's config field, and its
# value from the chosen preset, so a new method with one of these fields gets it with no edit here.
FORM_FIELDS = ("lam", "target_search", "target")


def config_field(method, name: str):
    """The ``dataclasses.Field`` ``name`` of a registry ``Method``'s config, or None."""
    return next((f for f in fields(method.config) if f.name == name), None)


def field_widget(name: str, method, value, visible: bool):
    """The form's widget for config field ``name``, as the method ``method`` (which has it) declares it."""
    spec = config_field(method, name)
    label, info = name.replace("_", " "), help_text(spec)
    if spec.metadata.get("choices"):
        return gr.Dropdown(list(spec.metadata["choices"]), value=value, label=label, info=info, visible=visible)
    if spec.type in (float, "float", int, "int"):
        return gr.Number(value=value, label=label, info=info, visible=visible)
    return gr.Textbox(value=value, label=label, info=info, visible=visible)


def preset_form(method_name: str, preset: str | None) -> list:
    """The form's model steps (None for a closed-form method) and each option field's update for a method
    and preset: shown with the method's help and the preset's value where the method's config has the
    field, hidden where it has not."""
    method = get_method(method_name)
    values = preset_values(method_name, preset, ("iterations", *FORM_FIELDS))
    return [values.get("iterations"), *[
        gr.update(visible=True, value=values[name], info=help_text(config_field(method, name)))
        if name in values else gr.update(visible=False) for name in FORM_FIELDS]]


def form_options(method, iterations, lam, search, target, vocab, own_candidates) -> dict:
    """The config fields the form sets for ``method`` (a registry ``Method``): each form field goes to the
    methods whose config has it, so a new method with a ``target`` gets the target box, and a closed-form
    one gets no checkpoints."""
    options, own = {}, method.options
    if iterations is not None:  # a closed-form method refuses it in plan_erase, after the preset check
        options["iterations"] = iterations if iterations != iterations or abs(iterations) == float("inf") else int(iterations)
    for name, value in zip(FORM_FIELDS, (lam, search, target)):
        if name not in own or value is None or (value == "" and name != "target"):  # '' is a target: the empty prompt
            continue
        options[name] = float(value) if config_field(method, name).type in (float, "float") else value
    candidates = [c.strip() for c in (own_candidates or "").split(",") if c.strip()]
    if candidates and "candidates" in own:
        options["candidates"] = candidates
    elif vocab and vocab != PRESET_VOCAB and "vocab" in own:
        options["vocab"] = vocab
    if method.checkpointable:  # a background job can be stopped and resumed at these
        options["checkpoint_every"] = 25
    return options


def job_summary(job) -> str:
    """What a job does, in words for the jobs list: no server paths (public mode shows this list too)."""
    cfg = job.config
    if job.kind == "erase":
        return f"{cfg.get('method', '').upper()}: " + ", ".join(cfg.get("options", {}).get("concepts", []))
    if job.kind == "attack":
        return f"{cfg.get('attack')} attack"
    return job.kind


def presets_of(page: Page, method: str) -> tuple[list[str], str | None]:
    """The presets that fit the method, this model and device, and the one the form starts on."""
    ex = page.explorer
    offered = presets_offered(method, ex.model_kind, ex.device)
    preferred = get_backend(ex.model_kind).default_preset(method)
    return offered, preferred if preferred in offered else (offered[0] if offered else None)


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def on_method(page: Page, method):
    offered, value = presets_of(page, method)
    return gr.Dropdown(choices=offered, value=value), *preset_form(method, value)


def on_preset(page: Page, method, preset):
    if preset not in presets_offered(method, page.explorer.model_kind, page.explorer.device):
        return gr.skip(), *[gr.skip()] * len(FORM_FIELDS)
    return tuple(preset_form(method, preset))


def queue_text(page: Page, job_id) -> str:
    ex = page.explorer
    ahead = ex.store.queue_position(job_id) if job_id else 0
    running = [j for j in ex.store.list(status="running") if j.id != job_id]
    shown = f"{len(running)} other job(s)" if page.settings.public else ", ".join(j.id for j in running)  # ids are keys
    return (f"Job `{job_id}` queued" + (f", {ahead} job(s) ahead" if ahead else "") +
            (f"; running now: {shown}" if running else ""))


def start_erase(page: Page, chosen, free_text, method, preset, iterations, lam, search, target, vocab=PRESET_VOCAB,
                own_candidates="", owner="", request: gr.Request = None):
    ex = page.explorer
    names = list(chosen or []) + [c.strip() for c in (free_text or "").split(",") if c.strip()]
    with shown_as_error():
        if not names:
            raise ValueError("pick at least one concept to erase")
        options = form_options(get_method(method), iterations, lam, search, target, vocab, own_candidates)
        plan_erase(ex.bundle(), ex.device, names, method, preset or None, options)
        job_id = ex.submit_erase(names, method, preset or None, options, owner=owner_of(owner, request))
    return job_id, job_id, gr.Timer(active=True), queue_text(page, job_id)


def tick(page: Page, job_id, owner="", request: gr.Request = None):
    ex = page.explorer
    if not job_id:
        return gr.Timer(active=False), progress_html(None), *[gr.skip()] * 4, gr.skip(), gr.skip()
    try:
        job = ex.poll(job_id, owner_of(owner, request))  # also restarts a dead worker, marks its job interrupted
    except KeyError:
        return gr.Timer(active=False), progress_html(None), "unknown job", *[gr.skip()] * 3, "", gr.skip()
    progress = job.progress
    # the whole curve from the run folder's history, so a page that re-attaches draws it all
    steps = [{"step": row["step"], **row["losses"]}
             for row in read_history(erase_run_dir(ex.store.work_dir(job.id))) if row.get("losses")]
    active = job.status in ACTIVE
    # the queue line is true only while queued; afterwards the status line says what happened
    queue_line = queue_text(page, job_id) if job.status == "queued" else ""
    return (gr.Timer(active=active), progress_html(job), status_text(job, page.settings.public),
            plots.loss_figure(steps) if steps else gr.skip(),
            plots.targets_figure(progress["targets"]) if progress.get("targets") else gr.skip(),
            progress.get("preview") or gr.skip(), queue_line,
            job_id if job.status == "done" else gr.skip())


def job_status_json(page: Page, job_id, owner="", request: gr.Request = None):
    ex = page.explorer
    with shown_as_error(KeyError):
        job = ex.job(job_id, owner_of(owner, request))
    shown = {k: v for k, v in job.__dict__.items() if k not in ("lease", "session")}
    return json.dumps(ex.for_visitor(shown), default=str)


def list_jobs(page: Page, owner="", request: gr.Request = None):
    jobs = page.explorer.jobs_of(owner_of(owner, request))
    rows = [[job.id, job.kind, job_state(job), f"{job.step}/{job.total}", job_summary(job)] for job in jobs]
    ids = [job.id for job in jobs]
    return pd.DataFrame(rows, columns=JOBS_HEADERS), gr.Dropdown(choices=ids, value=ids[-1] if ids else None)


def cancel_job(page: Page, job_id, owner, request, missing: str) -> str:
    if not job_id:
        raise gr.Error(missing)
    with shown_as_error(KeyError):
        return f"Job `{job_id}`: {page.explorer.cancel(job_id, owner_of(owner, request))}"


def cancel_chosen(page: Page, job_id, owner="", request: gr.Request = None):
    return cancel_job(page, job_id, owner, request, "no job chosen: pick one of your jobs in the list")


def cancel(page: Page, job_id, owner="", request: gr.Request = None):
    return cancel_job(page, job_id, owner, request, "no job to cancel")


def resume(page: Page, job_id, owner="", request: gr.Request = None):
    if not job_id:
        raise gr.Error("no job to resume")
    with shown_as_error(KeyError):
        page.explorer.resume(job_id, owner_of(owner, request))
    return f"Job `{job_id}` queued again; it continues from its last checkpoint", gr.Timer(active=True)


def resume_chosen(page: Page, job_id, owner="", request: gr.Request = None):
    message, timer = resume(page, job_id, owner, request)
    return message, timer, job_id, job_id  # the progress follows the resumed job


def reattach(page: Page, saved_job, owner_token):
    owner_token = owner_token or secrets.token_hex(16)  # this browser's secret: its jobs and runs
    try:
        if saved_job:
            page.explorer.job(saved_job, owner_token)
            return saved_job, gr.Timer(active=True), owner_token, owner_token  # one tick redraws its state
    except KeyError:  # a job of another store or session
        pass
    return "", gr.Timer(active=False), owner_token, owner_token


@dataclass
class EraseTab:
    reattach: object  # page load: (saved job, owner secret) -> (job id, timer, owner, owner secret)
    timer: gr.Timer
    list_jobs: object  # (owner) -> the jobs list and its job choice
    jobs_outputs: list


def build(page: Page, concepts: list[str]) -> EraseTab:
    ex = page.explorer
    methods = list(METHODS.values())
    first = get_method("age")
    offered, preset_value = presets_of(page, first.name)
    with gr.Row():
        erase_choice = gr.Dropdown(concepts if ex.is_toy else [], multiselect=True, label="Concepts to erase",
                                   elem_id="erase_concepts")
        free_text = gr.Textbox(label="or type concepts (comma-separated)", visible=not ex.is_toy)
    with gr.Row():
        method = gr.Radio([(m.display_name, m.name) for m in methods], value=first.name, label="Method", elem_id="method")
        preset = gr.Dropdown(offered, value=preset_value, label="Preset (those that fit the method and this model)",
                             elem_id="preset", allow_custom_value=True)
        values = preset_values(first.name, preset_value, ("iterations", *FORM_FIELDS))
        iterations = whole_number(value=values.get("iterations"), label="Model steps (blank: preset)",
                                  precision=0, elem_id="iterations")
    with gr.Row():
        # each widget as the first method with the field declares it; on_method shows the chosen method's
        option_fields = []
        for name in FORM_FIELDS:
            owner_method = first if name in first.options else next(m for m in methods if name in m.options)
            option_fields.append(field_widget(name, owner_method, values.get(name, config_field(owner_method, name).default),
                                              visible=name in first.options))
    with gr.Row():
        vocab = gr.Dropdown([PRESET_VOCAB, "toy"] if ex.is_toy else [PRESET_VOCAB, "imagenet", "en3k"],
                            value=PRESET_VOCAB, label="AGE candidate vocabulary")
        own_candidates = gr.Textbox(label="or your own candidates (comma-separated)")
    with gr.Row():
        start_btn = gr.Button("Erase", variant="primary", elem_id="start_btn")
        cancel_btn = gr.Button("Cancel", elem_id="cancel_btn")
        resume_btn = gr.Button("Resume", elem_id="resume_btn")
    queue_md = gr.Markdown(elem_id="queue_line")
    with gr.Accordion("Your jobs (queued, running, interrupted)", open=True):
        jobs_table = gr.Dataframe(headers=JOBS_HEADERS, value=[], interactive=False, elem_id="my_jobs")
        with gr.Row():
            chosen_job = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="chosen_job")
            refresh_jobs_btn = gr.Button("Refresh list", elem_id="refresh_jobs_btn")
            cancel_chosen_btn = gr.Button("Cancel this job", elem_id="cancel_chosen_btn")
            resume_chosen_btn = gr.Button("Resume this job", elem_id="resume_chosen_btn")
    progress_box = gr.HTML(progress_html(None), js_on_load=None)
    status_md = gr.Markdown(elem_id="job_status")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss terms per step", elem_id="loss_plot")
        targets_plot = gr.Plot(label="π: AGE's current top targets")
        preview = gr.Image(label="preview of the erased concept", height=160)
    timer = gr.Timer(1.0, active=False)

    on = functools.partial(bind, page=page)
    method.change(on(on_method), method, [preset, iterations, *option_fields], api_visibility="private")
    preset.change(on(on_preset), [method, preset], [iterations, *option_fields], api_visibility="private")
    jobs_outputs = [jobs_table, chosen_job]
    hidden = {"api_visibility": "private", "show_progress": "hidden"}
    show_jobs = on(list_jobs)
    start_btn.click(on(start_erase), [erase_choice, free_text, method, preset, iterations, *option_fields,
                                      vocab, own_candidates, page.owner],
                    [page.job_id, page.saved_job, timer, queue_md], api_name="start_erase",
                    api_visibility=page.api).then(show_jobs, page.owner, jobs_outputs, **hidden)
    refresh_jobs_btn.click(show_jobs, page.owner, jobs_outputs, api_name="my_jobs", api_visibility=page.api)
    cancel_chosen_btn.click(on(cancel_chosen), [chosen_job, page.owner], queue_md, api_name="cancel_job",
                            api_visibility=page.api).then(show_jobs, page.owner, jobs_outputs, **hidden)
    resume_chosen_btn.click(on(resume_chosen), [chosen_job, page.owner], [queue_md, timer, page.job_id, page.saved_job],
                            api_name="resume_job", api_visibility=page.api
                            ).then(show_jobs, page.owner, jobs_outputs, **hidden)
    page.runs_changed.change(show_jobs, page.owner, jobs_outputs, **hidden)  # a job of this page ended
    timer.tick(on(tick), [page.job_id, page.owner],
               [timer, progress_box, status_md, loss_plot, targets_plot, preview, queue_md, page.runs_changed],
               show_progress="hidden", api_visibility="private")
    job_box, job_json = gr.Textbox(visible=False), gr.Textbox(visible=False)
    job_box.submit(on(job_status_json), [job_box, page.owner], job_json, api_name="job_status", api_visibility=page.api)
    # the next tick replaces the cancel line; the status line says "cancelling" till the job stops
    cancel_btn.click(on(cancel), [page.job_id, page.owner], queue_md, api_name="cancel", api_visibility=page.api
                     ).then(show_jobs, page.owner, jobs_outputs, **hidden)
    resume_btn.click(on(resume), [page.job_id, page.owner], [queue_md, timer], api_name="resume", api_visibility=page.api
                     ).then(show_jobs, page.owner, jobs_outputs, **hidden)
    return EraseTab(on(reattach), timer, show_jobs, jobs_outputs)
