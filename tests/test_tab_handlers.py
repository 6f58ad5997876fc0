"""The tabs' handlers as plain functions of a page and the tab's inputs, without a server: what the
Erase form shows for each method and preset, and what it queues."""

import pytest

from age_explorer.core.erasure import get_method, make_config
from age_explorer.explorer.service import Explorer, Settings
from age_explorer.explorer.tabs import erase
from age_explorer.explorer.tabs.common import Page

from .test_plugins import shrink  # noqa: F401,F811  (the fixture: a closed-form plugin method)


@pytest.fixture
def page(tmp_path):
    explorer = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True))
    # the handlers read the explorer and its settings; the session's components are the server's business
    return Page(explorer, "public", owner=None, job_id=None, saved_job=None, exported=None, runs_changed=None)


def shown(update) -> dict:
    return {key: update.get(key) for key in ("visible", "value")}


@pytest.mark.parametrize("method, preset", [("age", "toy"), ("esd", "toy-esd"), ("uce", "toy-uce"),
                                             ("mace", "toy-mace")])
def test_each_method_shows_its_own_fields_with_its_presets_values(page, method, preset):
    preset_box, steps, *fields = erase.on_method(page, method)
    assert preset_box.value == preset and (preset, preset) in preset_box.choices
    config = make_config(method, preset, concepts=["x"])
    assert steps == getattr(config, "iterations", None)
    for name, update in zip(erase.FORM_FIELDS, fields):
        if name in get_method(method).options:
            assert shown(update) == {"visible": True, "value": getattr(config, name)}
            assert update["info"]  # the config field's help text
        else:
            assert update == {"visible": False, "__type__": "update"}


def test_the_form_sent_back_unedited_is_the_preset_itself(page):
    """UCE's preset λ is 0.5: the form shows it and sends it, so the run records no deviation."""
    _, _, lam, search, target = erase.on_method(page, "uce")
    options = erase.form_options(get_method("uce"), None, lam["value"], search.get("value"), target["value"],
                                 erase.PRESET_VOCAB, "")
    assert options == {"lam": 0.5, "target": ""}
    assert make_config("uce", "toy-uce", concepts=["red circle"], **options).deviations == []


def test_a_plugin_method_gets_the_form_fields_its_config_has(page, shrink):  # noqa: F811
    _, steps, lam, search, target = erase.on_method(page, "shrink-values")
    assert steps is None and not lam["visible"] and not search["visible"]
    assert target["visible"] and target["value"] == "" and "unused" in target["info"]


def test_start_erase_queues_the_checked_job_and_the_owner_sees_and_cancels_it(page):
    job_id, saved, timer, queued = erase.start_erase(page, ["red circle"], "", "esd", "toy-esd", 3, None, None, "",
                                                     owner="browser-a")
    assert saved == job_id and timer.active and queued.startswith(f"Job `{job_id}` queued")
    job = page.explorer.job(job_id, "browser-a")
    assert job.kind == "erase" and job.config["options"] == {"concepts": ["red circle"], "iterations": 3,
                                                             "target": "", "checkpoint_every": 25}
    table, choice = erase.list_jobs(page, "browser-a")
    assert list(table.job) == [job_id] and choice.value == job_id
    assert list(erase.list_jobs(page, "browser-b")[0].job) == []  # public mode: another visitor sees none
    assert "cancel" in erase.cancel_chosen(page, job_id, "browser-a")
    assert page.explorer.job(job_id, "browser-a").status == "cancelled"


def test_bad_form_input_is_one_line_and_queues_nothing(page):
    import gradio as gr

    for args, message in ((([], "", "age", "toy", 5, 1.0, "gumbel", ""), "pick at least one concept"),
                          ((["red circle"], "", "age", "toy", 5, -1.0, "gumbel", ""), "lam"),
                          ((["red circle"], "", "age", "toy-esd", 5, 1.0, "gumbel", ""), "preset")):
        with pytest.raises(gr.Error, match=message) as err:
            erase.start_erase(page, *args, owner="browser-a")
        assert "\n" not in str(err.value)
    assert page.explorer.store.list() == []


def test_the_graph_tab_draws_a_concepts_view_and_names_an_unknown_graph_in_one_line(page):
    import gradio as gr

    from age_explorer.explorer.tabs import graph

    network, heatmap, details, bar = graph.graph_outputs(page, "toy-esd (shipped)", 0.3, "shape", "red circle")
    assert '"red circle"' in network and heatmap.type == "plotly" and bar.type == "plotly"
    assert "**red circle**" in details and "Erasing it hurts most" in details
    assert details.startswith("**ESD (toy-esd, target '')**, 25 rows, 32 images per concept")
    # a graph that differs from its preset by an option says which, as the Methods table does
    assert graph.graph_outputs(page, "toy-age-ddim5 (shipped)", 0.3, "shape", None)[2].startswith(
        "**AGE (toy, ddim_steps 5)**, 25 rows")
    assert graph.graph_outputs(page, "toy-esd (shipped)", 0.3, "shape", "red circle")[0] is network  # drawn once, cached
    with pytest.raises(gr.Error, match="no graph named 'nowhere'") as err:
        graph.graph_outputs(page, "nowhere", 0.3, "shape", None)
    assert "\n" not in str(err.value)


def test_a_graph_of_one_concept_is_drawn_and_says_it_measured_no_other(tmp_path):
    from age_explorer.explorer.tabs import graph

    from .test_analysis import write_graph

    store = write_graph(tmp_path / "one", {"A": {"A": 0.75}})
    folder, version = str(store.folder), store.version()
    assert '"A"' in graph.network_json(folder, version, 0.3, "g", "A")
    details, bar = graph.row_json(folder, version, "A")
    assert details.endswith("**A**: G₀ = 1.00. No other concept is measured in this graph.") and bar is None


def test_the_views_the_page_opens_on_are_drawn_before_anyone_clicks(page):
    """A fresh server draws the first graph's view of each concept in the background, so that the first
    visitors' clicks are served from the cache instead of each waiting for the others' figures."""
    from age_explorer.explorer.tabs import graph

    names, first, groupings = graph.opening_view(page)
    graph.network_json.cache_clear()
    graph.warm_first_views(page).join(60)
    concepts = list(first.nodes().concept)
    assert graph.network_json.cache_info().currsize == len(concepts) > 1
    for concept in concepts:  # the same arguments a click sends: every one a cache hit
        graph.graph_outputs(page, names[0], graph.DEFAULT_THRESHOLD, groupings[0], concept)
    assert graph.network_json.cache_info().misses == len(concepts)
