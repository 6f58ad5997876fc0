"""The Robustness tab: a recovery attack on a finished run as a background job with live progress and
cancel, and its result: the contact sheet (original / erased / recovered / base-attack images, same
seeds), the ASR against its two baselines and what the attack learned. An attack is written under its
run (``RUN/attacks/``), so the run's past attacks are listed whenever the run is chosen again."""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
import pandas as pd

from age_explorer.explorer.workflows import attack_defaults, attack_summary, past_attacks, plan_attack
from age_explorer.core.attacks import ATTACKS

from .common import ACTIVE, Page, bind, error, job_line, owner_of, plain, progress_html, shown_as_error, whole_number

DEFAULT_ATTACK = "embedding"
PROBE_COLUMNS = ["probe", "kind", "seeds", "asr", "asr_base"]
NO_ATTACK = (None, "No attack of this run yet: choose an attack and press **Run attack**.", None)

NAME_FIELDS = ("attack", "concept", "run_description", "evaluator")  # of an attack's result, shown in its summary


# ---- handlers: functions of the page and the tab's inputs, bound to a page by build() ------------------
def run_of(page: Page, run_label, owner, request):
    if not run_label:
        raise gr.Error("no finished run yet: erase a concept first")
    with shown_as_error():
        return page.explorer.run(run_label, owner_of(owner, request))


def shown(entry) -> tuple:
    """(contact sheet, summary, probes table) of one past attack."""
    folder = Path(entry.folder)
    probes = pd.read_csv(folder / "probes.csv")[PROBE_COLUMNS].round(3)
    # names as text; the learned words are in code spans, which show any text as it is
    named = {**entry.result, **{key: plain(entry.result.get(key, "")) for key in NAME_FIELDS}}
    return str(folder / "contact_sheet.png"), attack_summary(named), probes


def listing(run_dir: str, chosen: str | None):
    """The run's attacks as dropdown choices, and the one named ``chosen`` (default: the newest)."""
    past = past_attacks(run_dir)
    names = [Path(entry.folder).name for entry in past]
    entry = past[names.index(chosen)] if chosen in names else (past[0] if past and not chosen else None)
    return gr.Dropdown(choices=[(e.label, n) for e, n in zip(past, names)],
                       value=Path(entry.folder).name if entry else None), entry


def attacks(page: Page, run_label, owner="", request: gr.Request = None):
    """A run's past attacks, the newest shown, and the concepts it erased."""
    run = run_of(page, run_label, owner, request)
    listed, entry = listing(run.path, None)
    return (listed, gr.Dropdown(choices=list(run.concepts), value=run.concepts[0]),
            *(shown(entry) if entry else NO_ATTACK))


def on_run(page: Page, run_label, owner="", request: gr.Request = None):
    if not run_label:  # no finished run yet: nothing to list, and nothing to complain about
        return gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None), None, "", None
    return attacks(page, run_label, owner, request)


def show_attack(page: Page, run_label, chosen, owner="", request: gr.Request = None):
    run = run_of(page, run_label, owner, request)
    _, entry = listing(run.path, chosen or "")
    if entry is None:
        raise error(f"run {run_label} has no attack {chosen!r}: pick one of the run's attacks")
    return shown(entry)


def on_attack(attack):
    steps, seeds = attack_defaults(attack)
    return gr.Number(value=steps, interactive=steps is not None), seeds


def start_attack(page: Page, run_label, attack, steps, seeds, concept=None, owner="", request: gr.Request = None):
    run = run_of(page, run_label, owner, request)
    with shown_as_error():
        config = plan_attack(attack, steps, seeds, concept, list(run.concepts))
        job_id = page.explorer.submit_attack(run.path, config, owner=owner_of(owner, request))
    return job_id, gr.Timer(active=True), f"Job `{job_id}` queued: {plain(attack)} attack on {plain(run.label)}."


def tick(page: Page, job_id, run_label, owner="", request: gr.Request = None):
    if not job_id:
        return gr.Timer(active=False), progress_html(None, "attack"), *[gr.skip()] * 6
    try:
        job = page.explorer.poll(job_id, owner_of(owner, request))  # also restarts a dead worker
    except KeyError:
        return gr.Timer(active=False), progress_html(None, "attack"), "unknown job", *[gr.skip()] * 5
    # the queue line is true only while queued; afterwards the status line says what happened
    status, bar = job_line(job), progress_html(job, "attack")
    queue_line = gr.skip() if job.status == "queued" else ""
    if job.status != "done":
        return gr.Timer(active=job.status in ACTIVE), bar, status, queue_line, *[gr.skip()] * 4
    # the finished attack is shown; the list is refreshed when its run is the one chosen
    folder = Path(job.artifacts["attack_dir"])
    listed, entry = listing(job.config["run_dir"], folder.name)
    try:
        same_run = bool(run_label) and run_of(page, run_label, owner, request).path == job.config["run_dir"]
    except gr.Error:
        same_run = False
    return (gr.Timer(active=False), bar, status + f": written to `{folder.name}` in the run's attacks.", queue_line,
            listed if same_run else gr.skip(), *shown(entry))


def cancel(page: Page, job_id, owner="", request: gr.Request = None):
    if not job_id:
        raise gr.Error("no attack to cancel")
    with shown_as_error(KeyError):
        return f"Job `{job_id}`: {page.explorer.cancel(job_id, owner_of(owner, request))}"


def build(page: Page) -> gr.Dropdown:
    """The tab's components; returns its run list."""
    on = functools.partial(bind, page=page)
    steps_default, seeds_default = attack_defaults(DEFAULT_ATTACK)
    gr.Markdown("Can the erased concept come back? An attack searches for an input that makes the erased model "
                "draw it again; its ASR is the share of its images the evaluator recognises as the concept. The "
                "same attack on the base model shows whether it works at all; the plain prompt on the erased "
                "model is the erasure as measured without an attacker. Details: `docs/robustness.md`.")
    with gr.Row():
        run_dd = gr.Dropdown([], label="Finished run", elem_id="attack_run_dd", allow_custom_value=True)
        concept = gr.Dropdown([], label="Erased concept", elem_id="attack_concept", allow_custom_value=True)
        attack = gr.Radio(list(ATTACKS), value=DEFAULT_ATTACK, label="Attack", elem_id="attack_kind")
        steps = whole_number(value=steps_default, label="Optimisation steps (embedding, perturb)", precision=0,
                             elem_id="attack_steps")
        seeds = gr.Textbox(seeds_default, label="Evaluation seeds (the same for every image set)",
                           elem_id="attack_seeds")
    with gr.Row():
        start_btn = gr.Button("Run attack", variant="primary", elem_id="attack_btn")
        cancel_btn = gr.Button("Cancel", elem_id="attack_cancel_btn")
    queue_md = gr.Markdown(elem_id="attack_queue")
    progress_box = gr.HTML(progress_html(None, "attack"))
    status_md = gr.Markdown(elem_id="attack_status")
    past_dd = gr.Dropdown([], label="Attacks of this run (newest first)", elem_id="attack_past")
    with gr.Row():
        sheet = gr.Image(label="original | erased | recovered | base model under the same attack (same seeds)",
                         type="filepath", elem_id="attack_sheet", interactive=False)
        with gr.Column():
            summary = gr.Markdown(elem_id="attack_summary")
            probes = gr.Dataframe(label="ASR per probe: erased model (asr) and base model (asr_base)",
                                  headers=PROBE_COLUMNS, value=[], elem_id="attack_probes", interactive=False,
                                  wrap=True, column_widths=["40%", "20%", "16%", "12%", "12%"])
    timer = gr.Timer(1.0, active=False)
    job_id = gr.Textbox(visible=False)  # the session's attack job; a component, so API clients get its id
    page.run_lists.append((run_dd, False))

    listed = [past_dd, concept, sheet, summary, probes]
    run_dd.change(on(on_run), [run_dd, page.owner], listed, api_visibility="private")
    # the same for API clients: a run's past attacks, the newest shown
    gr.Button(visible=False).click(on(attacks), [run_dd, page.owner], listed, api_name="attacks", api_visibility=page.api)
    past_dd.input(on(show_attack), [run_dd, past_dd, page.owner], [sheet, summary, probes], api_name="show_attack",
                  api_visibility=page.api)
    attack.input(on_attack, attack, [steps, seeds], api_visibility="private")
    start_btn.click(on(start_attack), [run_dd, attack, steps, seeds, concept, page.owner], [job_id, timer, queue_md],
                    api_name="start_attack", api_visibility=page.api)
    timer.tick(on(tick), [job_id, run_dd, page.owner], [timer, progress_box, status_md, queue_md, *listed[:1], *listed[2:]],
               show_progress="hidden", api_visibility="private")
    cancel_btn.click(on(cancel), [job_id, page.owner], queue_md, api_name="cancel_attack", api_visibility=page.api)
    return run_dd
