"""What the tabs share: the page's per-session state, input helpers and the run lists of every tab."""

from __future__ import annotations

import functools
import html
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import gradio as gr

from age_explorer.core.bundle import ModelUnavailableError
from age_explorer.core.checks import short
from age_explorer.core.runs import CorruptRunError

from ..service import Explorer, Settings

# Model work from the page (generation, spillover, similarity) runs one request at a time, beside the
# background job: on a CPU, parallel requests would split the cores until none makes progress.
COMPUTE_SLOT = {"concurrency_limit": 1, "concurrency_id": "compute"}
ORIGINAL = "original"  # the Generate tab's choice of the unerased model
ACTIVE = ("queued", "running")  # job states a page keeps polling


@dataclass
class Page:
    """The explorer shared by all sessions, plus the per-session state every tab may read or set."""

    explorer: Explorer
    api: str  # visibility of the page's own endpoints ("public", or "undocumented" beside MCP)
    owner: gr.State  # the browser's secret, copied on load; empty for API clients
    job_id: gr.State  # the session's erasure job
    saved_job: gr.BrowserState  # the same, kept across page reloads
    exported: gr.State  # export folders this session made, newest last
    runs_changed: gr.State  # set to a job id when it finishes: every run list refreshes
    # (dropdown, offers "original" first) per tab that takes a run; filled as the tabs are built. They
    # take any value (allow_custom_value): the server checks a label against the runs on disk, which
    # may be newer than the list a page or API client last saw
    run_lists: list[tuple[gr.Dropdown, bool]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.explorer.settings


def bind(handler, page: Page):
    """``handler(page, *inputs)`` as the event handler of one page: a module-level handler is a plain
    function of the page and the tab's inputs (testable without a server), and Gradio sees the inputs'
    signature without ``page``, its ``gr.Request`` annotation included (``functools.partial`` hides it)."""
    @functools.wraps(handler)
    def on_page(*args, **kwargs):
        return handler(page, *args, **kwargs)

    signature = inspect.signature(handler)
    on_page.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return on_page


def owner_of(owner: str, request) -> str | None:
    """Who a request acts for: the secret its browser keeps (set on page load), else, for API clients,
    their Gradio session. Matters only in public mode."""
    return owner or (request.session_hash if request is not None else None)


@contextmanager
def shown_as_error(*kinds: type[Exception]):
    """An ordinary input error (``ValueError`` and ``kinds``), a model whose weights cannot be loaded, or a
    damaged run folder becomes one line on the page, with no traceback."""
    try:
        yield
    except (ValueError, ModelUnavailableError, CorruptRunError, *kinds) as err:
        # a bare KeyError's str() is the repr of its key; its subclasses (UnknownJobError) say more
        message = err.args[0] if type(err) is KeyError and err.args else err
        raise error(str(message)) from None


def plain(text: str) -> str:
    """Text for a toast or Markdown, with ``<`` and ``>`` escaped (``<unk>`` would vanish as a tag, and a
    name such as ``<img src=...>`` from a run, a graph or an input would be drawn): names show as text."""
    return html.escape(str(text), quote=False)


def for_visitor(message: str) -> str:
    """``message`` as the app serving this request shows it: a public server names no server path
    (:meth:`Explorer.without_paths`). Gradio keeps the app whose event runs in a context variable."""
    from gradio.context import LocalContext

    explorer = getattr(LocalContext.blocks.get(None), "explorer", None)
    return explorer.without_paths(message) if isinstance(explorer, Explorer) else message


def error(message: str) -> gr.Error:
    """An error toast whose text is shown as text (Gradio draws a toast's message as HTML), with no
    server path in public mode."""
    return gr.Error(plain(for_visitor(message)))


def number_from(value, name: str, lo: float, hi: float) -> float:
    """``value`` sent by a page or an API client as a finite number in [lo, hi], else a ValueError naming
    ``name`` ("abc", NaN, Infinity and None included)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not (math.isfinite(number) and lo <= number <= hi):
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {short(value)}")
    return number


def bounded_slider(name: str, lo: float, hi: float, value: float, **kwargs) -> gr.Slider:
    """A ``gr.Slider`` whose API input outside [lo, hi] or not a number ("abc", NaN) is one line naming
    ``name``, not Gradio's own refusal (which reaches a client as an empty error)."""
    box = gr.Slider(lo, hi, value, **kwargs)

    def preprocess(payload):
        try:
            return number_from(payload, name, lo, hi)
        except ValueError as err:
            raise error(str(err)) from None

    box.preprocess = preprocess
    return box


def whole_number(**kwargs) -> gr.Number:
    """A ``gr.Number`` whose non-numeric API input ("abc") is a readable error naming the field, not
    Gradio's generic "upstream app has raised an exception". (Wrapped on the instance: a subclass
    would make Gradio write a .pyi file next to this module.)"""
    box = gr.Number(**kwargs)
    parse = box.preprocess

    def preprocess(payload):
        try:
            return parse(payload)
        except (TypeError, ValueError, OverflowError):
            raise error(f"{box.label}: {short(payload)} is not a whole number") from None

    box.preprocess = preprocess
    return box


def progress_html(job, prefix: str = "job") -> str:
    """A job's progress bar and line (elements ``PREFIX_progress`` and ``PREFIX_text``). A job that
    reports stages (attack, evaluation) shows the stage; an erasure its model step."""
    if job is None:
        return f"<div id='{prefix}_progress'></div>"
    share = job.step / job.total if job.total else 0.0
    eta = job.progress.get("eta")
    eta_text = f", about {eta:.0f} s left" if eta and job.status == "running" else ""
    stage = job.progress.get("stage")
    if stage:  # a stage's count means nothing once the job has ended
        what = f": {html.escape(stage)} {job.step}/{job.total}" if job.status == "running" else ""
    else:
        what = f": step {job.step}/{job.total}"
    return (f"<div id='{prefix}_progress' data-status='{job.status}' style='border:1px solid #ccc;border-radius:4px;height:22px'>"
            f"<div style='width:{share * 100:.1f}%;height:100%;background:#3d6fd9'></div></div>"
            f"<div id='{prefix}_text'>{job.status}{what}{eta_text}</div>")


def job_state(job) -> str:
    """A job's status word as a visitor sees it ("cancelling" once a cancel was asked for)."""
    return "cancelling" if job.cancel_requested and job.status in ACTIVE else job.status


def job_line(job) -> str:
    """What a background job is doing or what became of it, in one Markdown line."""
    return f"**{job_state(job)}**" + (f": {plain(for_visitor(job.error.splitlines()[0]))}" if job.error else "")


def run_list_updates(page: Page, owner: str, current: list, newest: bool = False) -> list:
    """New choices for every run list; each keeps its choice while that run exists, else (or with
    ``newest``) shows the newest run. The Generate list offers the runs but keeps its choice."""
    labels = [run.label for run in page.explorer.runs(owner)]
    updates = []
    for (_, with_original), value in zip(page.run_lists, current):
        choices = [ORIGINAL] + labels if with_original else labels
        if newest and labels and not with_original:
            value = labels[0]
        elif value not in choices:
            value = choices[0] if choices else None
        updates.append(gr.Dropdown(choices=choices, value=value))
    return updates


def wire_run_lists(page: Page, loaded, tabs: list[gr.Tab]) -> None:
    """Every tab's run list follows the runs on disk, with no button: filled on page load (after the
    owner is known), refreshed when a job of this page finishes (choosing the new run), and when a
    tab that takes a run is opened (runs made meanwhile with the CLI in DATA/runs appear).
    ``loaded``: the page-load event that sets the owner."""
    lists = [dropdown for dropdown, _ in page.run_lists]

    def refresh(owner, *current, request: gr.Request = None):
        return run_list_updates(page, owner_of(owner, request), list(current))

    def refresh_to_newest(owner, *current, request: gr.Request = None):
        return run_list_updates(page, owner_of(owner, request), list(current), newest=True)

    loaded.then(refresh, [page.owner, *lists], lists, api_visibility="private", show_progress="hidden")
    page.runs_changed.change(refresh_to_newest, [page.owner, *lists], lists, api_visibility="private",
                             show_progress="hidden")
    for tab in tabs:
        tab.select(refresh, [page.owner, *lists], lists, api_visibility="private", show_progress="hidden")


def wire_runs_endpoint(page: Page, outputs: list[gr.Dropdown]) -> None:
    """``/runs`` for API clients: the finished runs as the Before / after and Export lists, newest
    chosen (the page refreshes its lists by itself)."""
    def runs(owner="", request: gr.Request = None):
        labels = [run.label for run in page.explorer.runs(owner_of(owner, request))]
        return [gr.Dropdown(choices=labels, value=labels[0] if labels else None) for _ in outputs]

    gr.Button(visible=False).click(runs, page.owner, outputs, api_name="runs", api_visibility=page.api)
