"""The explorer driven as a person uses it: a real server on 127.0.0.1 and gradio_client."""

import contextlib
import json
import time

import pytest
from gradio_client import Client
from PIL import Image

from age_explorer.core.runs import RunManifest
from tests.helpers import free_port, wait_for_job
from age_explorer.explorer.app import Settings, build_app
from age_explorer.explorer.launch import LAUNCH_OPTIONS

pytestmark = pytest.mark.slow  # a real server per module, and background erasures


def tiny_graph(data_dir, bundle):
    """A 3-concept ESD graph computed into the data dir, as the explorer's "computed" graphs are."""
    from age_explorer.core.graph.capability import CapabilitySpec
    from age_explorer.core.graph.concept_sets import load_concept_set
    from age_explorer.core.graph.sweep import RowRecipe, build_graph

    subset = load_concept_set("toy", bundle).subset(["red circle", "blue circle", "red square"])
    build_graph(bundle, subset, data_dir / "graphs" / "test-esd", RowRecipe("esd", "toy-esd", {"iterations": 4, "batch_size": 2}),
                CapabilitySpec(images_per_concept=2, steps=5), progress=False, log=lambda m: None)


@contextlib.contextmanager
def running_explorer(data_dir, bundle):
    """The explorer on the toy model, with a tiny computed graph, served on a free local port."""
    tiny_graph(data_dir, bundle)
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(data_dir), spillover_images=2))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **LAUNCH_OPTIONS)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        demo.explorer.worker.stop(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, toy_bundle):
    data_dir = tmp_path_factory.mktemp("data")
    with running_explorer(data_dir, toy_bundle) as (demo, url):
        yield {"url": url, "graphs": list(demo.explorer.graph_dirs()), "data_dir": data_dir}


@pytest.fixture(scope="module")
def client(server):
    return Client(server["url"], verbose=False)


def test_generate_through_the_server(client):
    result = client.predict("a green triangle", "0-2", "original", api_name="/generate")
    assert [item["caption"] for item in result] == ["seed 0", "seed 1", "seed 2"]
    with pytest.raises(Exception, match="below the start"):
        client.predict("a green triangle", "5-1", "original", api_name="/generate")


def test_selecting_a_concept_shows_its_row(client, server):
    name = next(g for g in server["graphs"] if g.startswith("test-esd"))
    graph, heatmap, details, bar = client.predict(name, 0.0, "shape", "red circle",
                                                  api_name="/select_concept")
    graph = json.loads(graph)
    assert any(trace.get("name") == "circle" for trace in graph["data"])
    assert "red circle" in details and "G₀" in details and "Erasing it hurts most" in details
    assert bar is not None and heatmap is not None


def test_whole_erase_flow(client):
    job_id, *_ = client.predict(["red circle"], "", "age", "toy", 6, 1.0, "damage", "", "(preset)", "", api_name="/start_erase")
    assert job_id
    deadline, status = time.time() + 300, None
    seen_steps = set()
    while time.time() < deadline:
        status = json.loads(client.predict(job_id, api_name="/job_status"))
        seen_steps.add(status["step"])
        if status["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert status["status"] == "done", status.get("error")
    assert status["step"] == status["total"] == 12 and status["progress"]["targets"]["red circle"]
    assert "erase" in status["progress"]["losses"] or "pi_objective" in status["progress"]["losses"]

    runs, _ = client.predict(api_name="/runs")
    label = runs["value"]
    assert "red circle" in label
    sheet, legend, pair = client.predict(label, "0-1", api_name="/before_after")
    assert "Columns: original, erased." in legend
    picks = RunManifest.read(status["artifacts"]["run_dir"]).neighbour_picks  # the search's neighbour share
    assert legend.startswith(f"AGE's model steps used a neighbour of the erased concept as target "
                             f"{picks['share']:.0%} of the time; picking among its candidates at random gives "
                             f"{picks['chance']:.0%}.")
    rows = legend.split("Rows: ")[1].rstrip(".").split("; ")
    assert rows[0] == "erased: red circle" and any(r.startswith("AGE target of red circle: ") for r in rows)
    assert any(r.startswith("same shape") for r in rows) and any(r.startswith("unrelated") for r in rows)
    with Image.open(sheet) as picture:  # one 64 px strip of 2 seeds per row and column, under a header
        assert picture.height == 24 + len(rows) * (64 + 8)
        two_columns = picture.width
    assert len(pair) == 2

    bar, message, graphs = client.predict(label, api_name="/spillover")
    assert "Row added to the graph" in message and "page-age" in " ".join(str(g) for g in graphs["choices"])

    files, folder = client.predict(label, "delta", api_name="/export")
    names = sorted(str(f).rsplit("/", 1)[-1] for f in files)
    assert names == ["README.md", "delta.safetensors", "manifest.json"]

    # once an ESD run of the same concept exists, the AGE before/after shows it in a third column
    esd_id, *_ = client.predict(["red circle"], "", "esd", "toy-esd", 2, 1.0, "gumbel", "", "(preset)", "", api_name="/start_erase")
    while json.loads(client.predict(esd_id, api_name="/job_status"))["status"] not in ("done", "failed", "cancelled"):
        time.sleep(0.5)
    sheet, legend, _ = client.predict(label, "0-1", api_name="/before_after")
    assert "Columns: original, erased, ESD ''." in legend
    with Image.open(sheet) as picture:
        assert picture.width == two_columns + 2 * 64 + 8


def test_bad_inputs_get_messages(client):
    with pytest.raises(Exception, match="pick at least one concept"):
        client.predict([], "", "age", "toy", 5, 1.0, "gumbel", "", "(preset)", "", api_name="/start_erase")
    with pytest.raises(Exception, match="lambda must be"):
        client.predict(["red circle"], "", "age", "toy", 5, -1.0, "gumbel", "", "(preset)", "", api_name="/start_erase")
    with pytest.raises(Exception, match="does not know spaceship"):
        client.predict(["red circle"], "", "age", "toy", 5, 1.0, "gumbel", "", "(preset)", "blue circle, spaceship",
                       api_name="/start_erase")
    with pytest.raises(Exception, match="en3k"):  # not offered on the toy model
        client.predict(["red circle"], "", "age", "toy", 5, 1.0, "gumbel", "", "en3k", "", api_name="/start_erase")
    with pytest.raises(Exception, match="unknown job id"):
        client.predict("nope", api_name="/job_status")


def _erase(client, **changes):
    args = {"chosen": ["red circle"], "free_text": "", "method": "age", "preset": "toy", "iterations": 5, "lam": 1.0,
            "search": "gumbel", "target": "", "vocab": "(preset)", "own_candidates": ""}
    args.update(changes)
    return client.predict(*args.values(), api_name="/start_erase")


@pytest.mark.parametrize("changes, message", [
    ({"iterations": "abc"}, "Model steps \\(blank: preset\\): 'abc' is not a whole number"),
    ({"iterations": 10**12}, "iterations must be a whole number from 1 to 100,000"),
    ({"preset": "imagenette"}, "sized for a GPU and this server runs on the CPU"),
    ({"method": "esd", "preset": "toy-esd", "target": "zebra 🦓"}, "has words the toy model does not know \\(zebra"),
    ({"chosen": [], "free_text": "x" * 10_000}, "concept 'xxxx.*is too long: at most 500 characters"),
    ({"chosen": [], "free_text": "x" * 400}, "unknown concept 'xxxx"),
    ({"method": "esd", "preset": "toy"}, "preset 'toy' is for method 'age', not 'esd': pick one of toy-esd"),
    ({"method": "uce", "preset": "imagenette"}, "preset 'imagenette' is for method 'age', not 'uce': pick one of toy-uce"),
])
def test_bad_erase_inputs_are_one_short_line(client, changes, message):
    with pytest.raises(Exception, match=message) as caught:
        _erase(client, **changes)
    assert len(str(caught.value)) < 600 and "\n" not in str(caught.value).strip()


def test_uploads_are_capped_and_prompts_have_a_length_limit(client, server):
    import requests

    url = server["url"] + "gradio_api/upload"
    big = requests.post(url, files={"files": ("big.bin", b"\0" * (2 * 1024 * 1024))}, timeout=60)
    assert big.status_code == 413 and "big.bin" not in big.text
    small = requests.post(url, files={"files": ("small.txt", b"hello")}, timeout=60)
    assert small.status_code == 200  # Gradio's own route stays, within the cap
    with pytest.raises(Exception, match="the prompt 'xxxx.*is too long: at most 500 characters") as caught:
        client.predict("x" * 100_000, "0", "original", api_name="/generate")
    assert "\n" not in str(caught.value).strip() and len(str(caught.value)) < 300


@pytest.mark.parametrize("seeds, message", [(str(2**64), "out of range"), ("0-1000000000", "at most 16 at a time")])
def test_bad_seeds_in_the_app(client, seeds, message):
    with pytest.raises(Exception, match=message):
        client.predict("a red circle", seeds, "original", api_name="/generate")


@pytest.mark.parametrize("api, args, message", [
    ("/nearest_concepts", ("red circle", float("inf"), ""), "k must be a whole number of at least 1, got '?inf"),
    ("/nearest_concepts", ("red circle", float("nan"), ""), "k must be a whole number of at least 1, got '?nan"),
    ("/nearest_concepts", ("red circle", "abc", ""), "k must be a whole number of at least 1, got 'abc'"),
    ("/nearest_concepts", ("red circle", 2.5, ""), "k must be a whole number of at least 1, got '?2.5"),
    ("/select_concept", ("toy-esd (shipped)", "abc", "shape", "red circle"),
     "the edge threshold \(Δ ≥\) must be a number from 0 to 1, got 'abc'"),
    ("/select_concept", ("toy-esd (shipped)", float("nan"), "shape", "red circle"),
     "the edge threshold \(Δ ≥\) must be a number from 0 to 1, got '?nan"),
])
def test_bad_query_numbers_are_one_line(server, api, args, message):
    """Sent as raw JSON (gradio_client cannot send NaN or Infinity): the event is an error with its line."""
    import re

    import httpx

    name = api.strip("/")
    with httpx.Client(timeout=60) as http:
        event = http.post(f"{server['url']}gradio_api/call/{name}", content=json.dumps({"data": list(args)}),
                          headers={"Content-Type": "application/json"}).json()["event_id"]
        text = http.get(f"{server['url']}gradio_api/call/{name}/{event}").text
    assert re.findall(r"^event: (\w+)", text, re.M)[-1] == "error"
    shown = json.loads(re.findall(r"^data: (.*)$", text, re.M)[-1])
    shown = shown.get("error") if isinstance(shown, dict) else shown
    assert re.search(message, shown or "") and "\n" not in shown.strip(), text


def test_uce_runs_from_the_app(client):
    job_id, *_ = _erase(client, method="uce", preset="toy-uce", iterations=None)
    deadline = time.time() + 120
    while (status := json.loads(client.predict(job_id, api_name="/job_status")))["status"] not in ("done", "failed"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert status["status"] == "done", status["error"]


def test_public_mode_sessions_see_and_cancel_only_their_own_jobs(tmp_path):
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        alice, bob = (Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2))
        job_id, _, queued = _erase(alice)  # no worker: it stays queued
        assert len(job_id) == 32
        assert json.loads(alice.predict(job_id, api_name="/job_status"))["status"] == "queued"
        with pytest.raises(Exception, match="unknown job id"):
            bob.predict(job_id, api_name="/job_status")
        bob_job, _, bob_queued = _erase(bob)
        assert job_id not in bob_queued  # queue lines name no other session's job
        # /cancel and /resume act on the session's own job (server-side state); the service refuses the rest
        with pytest.raises(KeyError, match="unknown job id"):
            demo.explorer.cancel(job_id, bob.session_hash)
        with pytest.raises(KeyError, match="unknown job id"):
            demo.explorer.resume(job_id, bob.session_hash)
        assert "cancelled" in bob.predict(api_name="/cancel")
        assert demo.explorer.store.get(bob_job).status == "cancelled" and demo.explorer.store.get(job_id).status == "queued"
        demo.explorer.store.finish(job_id, "done", artifacts={"run_dir": str(tmp_path / "run")})
        assert alice.predict(api_name="/runs")[0]["choices"] and not bob.predict(api_name="/runs")[0]["choices"]
        assert alice.predict(api_name="/list_graphs")  # shipped graphs stay shared
        assert bob.predict(api_name="/list_graphs")
    finally:
        demo.close()


def test_public_mode_caps_a_sessions_jobs_and_lists_each_to_cancel(tmp_path):
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True,
                              max_jobs_per_session=2))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        alice, bob = (Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2))
        first, second = _erase(alice)[0], _erase(alice)[0]
        with pytest.raises(Exception, match=r"you already have 2 job\(s\) queued or running") as refused:
            _erase(alice)
        assert "\n" not in str(refused.value).strip()
        table, choice = alice.predict(api_name="/my_jobs")
        assert [row[0] for row in table["data"]] == [first, second] and choice["value"] == second
        assert [row[2] for row in table["data"]] == ["queued", "queued"] and table["data"][0][4] == "AGE: red circle"
        assert bob.predict(api_name="/my_jobs")[0]["data"] in ([], [["", "", "", "", ""]])  # none of hers
        with pytest.raises(Exception, match="unknown job id"):
            bob.predict(first, api_name="/cancel_job")
        assert "cancelled" in alice.predict(first, api_name="/cancel_job")  # not only her latest job
        assert demo.explorer.store.get(first).status == "cancelled" and demo.explorer.store.get(second).status == "queued"
        third = _erase(alice)[0]
        assert [row[0] for row in alice.predict(api_name="/my_jobs")[0]["data"]] == [second, third]
    finally:
        demo.close()


@pytest.mark.parametrize("damaged, content", [("edges.csv", b"\x00\xff,\n\"unclosed"), ("nodes.csv", b"nope\n1\n"),
                                              ("graph.json", b"{not json")])
def test_a_damaged_graph_is_skipped_with_a_warning(tmp_path, damaged, content):
    import shutil

    from age_explorer.core.paths import assets_dir

    shutil.copytree(assets_dir() / "graphs" / "toy-esd", tmp_path / "graphs" / "test-esd")
    (tmp_path / "graphs" / "test-esd" / damaged).write_bytes(content)
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    graphs = list(demo.explorer.graph_dirs())
    assert graphs and not [g for g in graphs if g.startswith("test-esd")]  # the shipped ones still load
    assert any(damaged in w and "is damaged" in w for w in demo.explorer.warnings)
    page = json.dumps(demo.config, default=str)
    assert f"{damaged} is damaged" in page


def test_job_polling_shows_no_progress_overlay(tmp_path):
    """The Erase, Evaluate and Robustness tabs poll their job with a timer every second; its ticks are
    registered with show_progress hidden, so no "processing 0.1/0.5s" overlay flickers on the progress
    bar, the status lines and the plots they update (checked in Chromium: no status tracker shows during a
    whole toy erasure)."""
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    config = demo.get_config_file()
    kinds = {c["id"]: c["type"] for c in config["components"]}
    ticks = [d for d in config["dependencies"]
             if any(kinds.get(target) == "timer" and event == "tick" for target, event in d["targets"])]
    assert len(ticks) == 3  # erase, evaluate, attack
    assert [d["show_progress"] for d in ticks] == ["hidden"] * 3
    assert all("html" in [kinds[o] for o in d["outputs"]] for d in ticks)  # each updates a progress bar


def test_read_only_graph_queries(client, server):
    import pandas as pd

    name = next(g for g in server["graphs"] if g.startswith("test-esd"))
    graphs = {g["graph"]: g for g in client.predict(api_name="/list_graphs")}
    assert graphs[name]["method"] == "esd" and graphs[name]["rows"] == 3 and graphs[name]["concepts"] == 3
    concepts = client.predict(name, api_name="/list_concepts")
    assert [c["concept"] for c in concepts] == ["red circle", "blue circle", "red square"]
    assert concepts[0]["shape"] == "circle" and concepts[0]["colour"] == "red" and 0 <= concepts[0]["G0"] <= 1

    edges = pd.read_csv(server["data_dir"] / "graphs" / "test-esd" / "edges.csv")
    row = edges[(edges.erased == "red circle") & (edges.affected != "red circle")]
    spill = client.predict("red circle", name, api_name="/concept_spillover")
    assert {s["concept"]: s["delta"] for s in spill["spillover"]} == pytest.approx(
        dict(zip(row.affected, row.delta_top1)), abs=1e-4)
    deltas = [s["delta"] for s in spill["spillover"]]
    assert deltas == sorted(deltas, reverse=True)

    nearest = client.predict("red circle", 1, name, api_name="/nearest_concepts")
    both = {c: (row.set_index("affected").delta_top1[c]
                + edges[(edges.erased == c) & (edges.affected == "red circle")].delta_top1.iloc[0]) / 2
            for c in row.affected}
    assert len(nearest) == 1 and nearest[0]["concept"] == max(both, key=both.get)
    with pytest.raises(Exception, match="no row for 'green ring'|not a concept"):
        client.predict("green ring", name, api_name="/concept_spillover")
    with pytest.raises(Exception, match="unknown graph"):
        client.predict("nope", api_name="/list_concepts")


def test_methods_are_ranked_from_the_graphs_files(client, server):
    """/rank_methods and /methods: one row per graph of the shipped concept set, each figure from its files."""
    from age_explorer.core.graph.store import GraphStore
    from age_explorer.core.paths import assets_dir

    ranked = client.predict(api_name="/rank_methods")
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) >= 2
    erased = [r["erased"] / r["rows"] for r in ranked]
    assert erased == sorted(erased, reverse=True)
    esd = next(r for r in ranked if r["graph"] == "toy-esd")
    edges = GraphStore(assets_dir() / "graphs" / "toy-esd").edges()
    own = edges[edges.erased == edges.affected]
    assert esd["erased"] == int((own.G_after_top1 <= 0.10).sum())
    assert esd["ESR_1"] == pytest.approx(float((1 - own.G_after_top1).mean()), abs=1e-4)
    shown = client.predict(api_name="/methods")
    assert "graph (source)" in shown["headers"] and len(shown["data"]) == len(ranked)


def test_umap_of_a_shipped_graph_comes_from_its_cache(client, server, monkeypatch):
    """The shipped graphs carry their UMAP map: the view draws it without umap-learn (which would
    compile for minutes); an import of umap here would fail."""
    import base64
    import sys

    import numpy as np
    import pandas as pd

    from age_explorer.core.paths import assets_dir

    monkeypatch.setitem(sys.modules, "umap", None)
    name = next(g for g in server["graphs"] if g.endswith("(shipped)"))
    plot = client.predict(name, "red circle", api_name="/umap")
    figure = json.loads(plot["plot"]) if isinstance(plot, dict) else json.loads(plot)
    trace = figure["data"][0]

    def values(array):  # plotly sends number arrays as base64 typed arrays
        if isinstance(array, dict):
            return list(np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]))
        return array

    cached = pd.read_csv(assets_dir() / "graphs" / name.split(" ")[0] / "umap.csv").set_index("concept")
    assert values(trace["x"]) == pytest.approx(list(cached.loc[trace["text"]].x))
    assert values(trace["y"]) == pytest.approx(list(cached.loc[trace["text"]].y))


def test_mcp_serves_only_the_read_only_queries(tmp_path, toy_bundle):
    import asyncio

    import requests
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    tiny_graph(tmp_path, toy_bundle)
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, mcp=True))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        mcp_server=True)
    url = f"http://127.0.0.1:{port}"
    try:
        schema = requests.get(f"{url}/gradio_api/mcp/schema", timeout=30).json()
        assert sorted(t["name"] for t in schema) == ["concept_spillover", "list_concepts", "list_graphs",
                                                     "nearest_concepts", "rank_methods"]
        assert all(t["description"] for t in schema)
        name = next(g for g in demo.explorer.graph_dirs() if g.startswith("test-esd"))

        async def call():
            async with streamablehttp_client(f"{url}/gradio_api/mcp/") as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return await session.call_tool("concept_spillover", {"concept": "red circle", "graph": name})

        result = asyncio.run(call())
        assert not result.isError
        assert "blue circle" in result.content[0].text and "red square" in result.content[0].text
        # the page's endpoints are still callable by clients, just not advertised as tools
        assert Client(url + "/", verbose=False).predict(api_name="/runs") is not None
    finally:
        demo.close()


def test_graphs_of_an_earlier_toy_model_are_not_listed(tmp_path):
    from age_explorer.core.bundle import weights_revision
    from age_explorer.explorer.service import Explorer

    for name, revision in (("current", weights_revision("toy")), ("earlier", "toy-000000000000")):
        folder = tmp_path / "graphs" / name
        folder.mkdir(parents=True)
        (folder / "graph.json").write_text(json.dumps({"model": "toy", "model_revision": revision, "method": "esd"}))
        (folder / "nodes.csv").write_text("concept,G0_top1\nred circle,1.0\n")
    explorer = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    names = list(explorer.graph_dirs())
    assert "current (computed)" in names
    assert not any(name.startswith("earlier") for name in names)


def _finished_esd_run(client) -> str:
    job_id, *_ = client.predict(["blue circle"], "", "esd", "toy-esd", 2, 1.0, "gumbel", "", "(preset)", "",
                                api_name="/start_erase")
    while json.loads(client.predict(job_id, api_name="/job_status"))["status"] not in ("done", "failed", "cancelled"):
        time.sleep(0.3)
    runs, _ = client.predict(api_name="/runs")
    return next(label for label, _ in runs["choices"] if job_id in label)


def test_push_sends_only_this_sessions_export_with_the_callers_token(server, monkeypatch):
    import huggingface_hub.constants

    from tests.hub_standin import HubStandIn

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    owner, visitor = Client(server["url"], verbose=False), Client(server["url"], verbose=False)
    label = _finished_esd_run(owner)
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_server_secret")
        # another session: nothing exported there, so nothing to push, whatever it sends
        with pytest.raises(Exception, match="export a run on this page first"):
            visitor.predict("attacker/loot", "hf_visitor", api_name="/push")
        _, folder = owner.predict(label, "delta", api_name="/export")
        # the server's token is not lent to a caller with an empty token field
        with pytest.raises(Exception, match="paste a Hugging Face token"):
            owner.predict("owner/model", "", api_name="/push")
        assert hub.requests == []
        message = owner.predict("someone/erased-blue-circle", "hf_owner_token", api_name="/push")
    assert "Pushed" in message and folder.rsplit("/", 1)[-1] in message
    assert hub.repos == ["someone/erased-blue-circle"]
    assert set(hub.files) == {"README.md", "before_after.png", "delta.safetensors", "manifest.json"}
    posts = [r for r in hub.requests if r["method"] == "POST"]
    assert posts and all(r["authorization"] == "Bearer hf_owner_token" for r in posts)
    # a second export of the same run gets its own folder instead of replacing the first
    _, again = owner.predict(label, "delta", api_name="/export")
    assert again != folder and again.startswith(folder)


def test_push_refuses_folders_that_are_not_this_servers_exports(tmp_path):
    from age_explorer.explorer.service import Explorer

    explorer = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    exports = explorer.exports_dir
    (exports / "good").mkdir(parents=True)
    (exports / "good" / "delta.safetensors").write_bytes(b"x")
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "id_rsa").write_text("private key")
    (exports / "link-to-outside").symlink_to(secret)
    (exports / "holds-a-link").mkdir()
    (exports / "holds-a-link" / "id_rsa").symlink_to(secret / "id_rsa")
    assert explorer.owned_export(str(exports / "good")) == exports / "good"
    for folder in (secret, exports / "link-to-outside", exports / "holds-a-link", exports / "good" / ".." / "..",
                   "/etc", str(exports / "missing")):
        with pytest.raises(ValueError):
            explorer.owned_export(str(folder))


def test_finished_runs_reach_generate_and_a_cli_run_appears(client, server, toy_bundle):
    """The loop without a restart: a run finished by a job, and one written into DATA/runs by
    `age-explorer erase --out` while the server runs, are offered to Before / after, Generate and Export."""
    from age_explorer.core.erasure import erase, make_config

    label = _finished_esd_run(client)
    original = client.predict("a blue circle", "0", "original", api_name="/generate")
    erased = client.predict("a blue circle", "0", label, api_name="/generate")
    with Image.open(original[0]["image"]) as a, Image.open(erased[0]["image"]) as b:
        assert a.tobytes() != b.tobytes()  # the run's weights, not the original's

    erase(toy_bundle, make_config("esd", "toy-esd", concepts=["green square"], iterations=2),
          server["data_dir"] / "runs" / "cli-green-square")
    runs, export_runs = client.predict(api_name="/runs")
    cli_label = "ESD: green square (cli-green-square)"
    assert runs["value"] == cli_label and cli_label in [c for c, _ in export_runs["choices"]]
    _, legend, _ = client.predict(cli_label, "0", api_name="/before_after")
    assert "Rows: erased: green square" in legend
    assert client.predict("a green square", "0", cli_label, api_name="/generate")
    with pytest.raises(Exception, match="no finished run 'nope'"):
        client.predict("a green square", "0", "nope", api_name="/generate")


def test_presets_offered_fit_the_method_the_model_and_the_device():
    from age_explorer.explorer.workflows import check_preset, preset_values, presets_offered

    assert presets_offered("age", "toy", "cpu") == ["toy", "toy-fast"]
    assert presets_offered("esd", "toy", "cpu") == ["toy-esd", "toy-esd-fast"]
    assert presets_offered("age", "stable-diffusion", "cpu") == []  # all sized for a GPU
    assert presets_offered("age", "stable-diffusion", "cuda") == ["imagenette", "nudity", "artist"]
    assert presets_offered("age", "stable-diffusion-xl", "cuda") == ["sdxl-imagenette", "sdxl-nudity", "sdxl-artist"]
    assert presets_offered("esd", "stable-diffusion-xl", "cuda") == ["sdxl-esd-x"]
    assert preset_values("age", "toy", ["iterations"]) == {"iterations": 200}
    assert preset_values("uce", "toy-uce", ["iterations"]) == {}  # closed form: no model steps
    with pytest.raises(ValueError, match="not made for the toy model: pick one of toy-esd"):
        check_preset("esd", "esd-x", "toy", "cuda")


def test_status_follows_the_job_and_messages_keep_angle_brackets():
    from types import SimpleNamespace

    from age_explorer.explorer.tabs.common import plain
    from age_explorer.explorer.tabs.erase import status_text

    def job(**fields):
        return SimpleNamespace(**{"status": "running", "error": None, "progress": {}, "cancel_requested": False,
                                  "artifacts": {}, **fields})

    assert status_text(job(cancel_requested=True), public=False).startswith("**cancelling**")
    assert status_text(job(status="cancelled", cancel_requested=True), public=False).startswith("**cancelled**")
    done = status_text(job(status="done", artifacts={"run_dir": "/data/jobs/abc/run"}), public=False)
    assert "/data/jobs/abc/run" in done and "Before / after" in done and "Export" in done
    assert "/data" not in status_text(job(status="done", artifacts={"run_dir": "/data/x"}), public=True)
    assert plain("They are read as <unk>.") == "They are read as &lt;unk&gt;."
    named = status_text(job(progress={"targets": {"<b>c</b>": [["<img src=x>", 0.5]]}, "pick": "<i>w</i>",
                                      "pick_is_neighbour": True}), public=True)
    assert "<" not in named and "&lt;img src=x&gt; 0.50" in named and "&lt;i&gt;w&lt;/i&gt;" in named


def test_a_model_without_weights_is_explained_in_the_page_the_log_and_generate(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    demo = build_app(Settings(model="CompVis/stable-diffusion-v1-4", device="cpu", data_dir=str(tmp_path / "data"),
                              start_worker=False))
    page = json.dumps(demo.config, default=str)
    assert "could not be loaded" in page and "not in the local Hugging Face cache" in page
    assert "OSError" not in page and "EntryNotFound" not in page
    assert any("could not be loaded" in r.getMessage() for r in caplog.records)  # the terminal says it too
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="not in the local Hugging Face cache"):
            client.predict("a church", "0", "original", api_name="/generate")
    finally:
        demo.close()


def test_a_recovery_attack_from_the_robustness_tab(client):
    """Run attack -> background job -> the contact sheet, ASR with its baselines and the learned words;
    the attack stays listed under its run, and a second one gets a folder of its own."""
    label = _finished_esd_run(client)
    past, concept, sheet, summary, probes = client.predict(label, api_name="/attacks")
    assert past["choices"] == [] and concept["value"] == "blue circle" and "No attack of this run yet" in summary

    job_id, *_ = client.predict(label, "embedding", 4, "1000-1001", api_name="/start_attack")
    status = wait_for_job(client, job_id)
    assert status["status"] == "done", status["error"]
    assert status["kind"] == "attack" and status["artifacts"]["attack_dir"].endswith("attacks/embedding-blue-circle")
    assert status["progress"]["stage"] == "base model, plain prompt"

    past, _, sheet, summary, probes = client.predict(label, api_name="/attacks")
    assert [value for _, value in past["choices"]] == ["embedding-blue-circle"]
    with Image.open(sheet) as picture:  # four labelled rows of 2 images
        assert picture.height > 4 * 32
    assert "ASR" in summary and "same attack on the base model" in summary and "plain prompt on the erased model" in summary
    assert "nearest words" in summary and "<attack-0>" in summary
    assert probes["headers"] == ["probe", "kind", "seeds", "asr", "asr_base"]

    again, *_ = client.predict(label, "prompts", None, "1000", api_name="/start_attack")
    assert wait_for_job(client, again)["status"] == "done"
    past, *_ = client.predict(label, api_name="/attacks")
    assert [value for _, value in past["choices"]] == ["prompts-blue-circle", "embedding-blue-circle"]
    _, shown, _ = client.predict(label, "embedding-blue-circle", api_name="/show_attack")
    assert "**embedding** attack on **blue circle**" in shown


def test_an_attack_is_cancelled_within_a_step_and_writes_nothing(client):
    label = _finished_esd_run(client)
    job_id, *_ = client.predict(label, "embedding", 5000, "1000", api_name="/start_attack")
    deadline = time.time() + 120
    while json.loads(client.predict(job_id, api_name="/job_status"))["progress"].get("stage") != "optimise":
        assert time.time() < deadline
        time.sleep(0.3)
    assert "cancel" in client.predict(job_id, api_name="/cancel_attack")
    status = wait_for_job(client, job_id, 60)
    assert status["status"] == "cancelled" and status["step"] < 5000
    past, *_ = client.predict(label, api_name="/attacks")
    assert past["choices"] == []


@pytest.mark.parametrize("attack, steps, seeds, message", [
    ("embedding", 0, "1000", "steps must be a whole number from 1 to 5,000"),
    ("embedding", 10, "5-1", "below the start"),
    ("embedding", 10, "0-99", "at most 64"),
    ("embedding", 10, "0-3", "overlap"),  # the training images' seeds
    ("nope", 10, "1000", "'nope' .* is not in the list of choices"),  # the radio refuses it
])
def test_bad_attack_inputs_are_one_line(client, attack, steps, seeds, message):
    label = client.predict(api_name="/runs")[0]["value"] or _finished_esd_run(client)
    with pytest.raises(Exception, match=message) as caught:
        client.predict(label, attack, steps, seeds, api_name="/start_attack")
    assert "\n" not in str(caught.value).strip()


def test_evaluate_beside_before_after(client):
    label = _finished_esd_run(client)
    summary, table = client.predict(label, api_name="/evaluation")
    assert "No evaluation of this run yet" in summary
    job_id, *_ = client.predict(label, 2, api_name="/evaluate")
    status = wait_for_job(client, job_id)
    assert status["status"] == "done" and status["kind"] == "evaluate", status["error"]
    summary, table = client.predict(label, api_name="/evaluation")
    assert "ESR-1" in summary and "PSR-1" in summary and "2 images per class" in summary
    assert table["headers"] == ["class", "role", "top1", "top5", "images"] and len(table["data"]) == 25
    assert sum(row[1] == "erased" for row in table["data"]) == 1
    with pytest.raises(Exception, match="images per class must be a whole number from 1 to 64"):
        client.predict(label, 1000, api_name="/evaluate")


def test_lora_export_with_a_rank(client):
    label = _finished_esd_run(client)
    files, folder = client.predict(label, "lora", "4", api_name="/export")
    names = {str(f).rsplit("/", 1)[-1] for f in files}
    assert {"pytorch_lora_weights.safetensors", f"{folder.rsplit('/', 1)[-1]}-comfyui-a1111.safetensors", "README.md"} <= names
    assert json.loads(open(f"{folder}/export_manifest.json").read())["lora"]["requested_rank"] == 4
    with pytest.raises(Exception, match="bad LoRA rank"):
        client.predict(label, "lora", "abc", api_name="/export")


def test_the_graph_shows_its_recovery_layer(client):
    graph, _, details, _ = client.predict("toy-esd (shipped)", 0.3, "shape", "purple ring", api_name="/select_concept")
    traces = {trace.get("name"): trace for trace in json.loads(graph)["data"]}
    rings = traces["recovery (embedding)"]
    assert "purple ring" in rings["customdata"] and traces["ASR 1.0"]["legendgrouptitle"]["text"] == \
        "recovery ASR (embedding)"
    assert any("recovery ASR (embedding) 0.62" in text for text in rings["hovertext"])
    assert "Recovery layer" in details and "Recovery ASR: embedding 0.62" in details


def test_names_show_as_text_and_a_public_server_shows_no_path_or_traceback(tmp_path, toy_bundle):
    """A graph's preset and target, a concept name and an echoed choice are escaped wherever the page
    draws Markdown or a toast; in public mode /job_status and /export give no server path, and a job's
    error is its first line."""
    import shutil

    from age_explorer.core.erasure import erase, make_config
    from age_explorer.core.paths import assets_dir

    evil = "<img src=x onerror=alert(1)>"
    folder = tmp_path / "graphs" / "evil-esd"
    shutil.copytree(assets_dir() / "graphs" / "toy-esd", folder)
    meta = json.loads((folder / "graph.json").read_text())
    # the target as a sweep writes it: in the options, and repeated at the top
    (folder / "graph.json").write_text(json.dumps({**meta, "preset": evil, "target": evil,
                                                   "options": {**meta["options"], "target": evil}}))
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "runs" / "uce-red-circle")
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        name = next(g for g in demo.explorer.graph_dirs() if g.startswith("evil-esd"))
        *_, details, _ = client.predict(name, 0.0, "shape", "red circle", api_name="/select_concept")
        assert "<img" not in details and details.count("&lt;img src=x onerror=alert(1)&gt;") == 2
        with pytest.raises(Exception) as caught:  # the choice is echoed in the toast, as text
            client.predict("a red circle", "0", evil, api_name="/generate")
        assert "&lt;img src=x" in str(caught.value) and "<img" not in str(caught.value)

        job_id = _erase(client)[0]
        store = demo.explorer.store
        store.finish(job_id, "failed", error='ValueError: bad\nTraceback (most recent call last):\n  File "/srv/x.py"',
                     artifacts={"run_dir": str(store.work_dir(job_id) / "run")})
        status = json.loads(client.predict(job_id, api_name="/job_status"))
        assert status["error"] == "ValueError: bad" and status["artifacts"]["run_dir"] == f"jobs/{job_id}/run"
        assert str(tmp_path) not in json.dumps(status)
        _, shown = client.predict("UCE: red circle (uce-red-circle)", "delta", api_name="/export")
        assert shown == "uce-red-circle-delta" and (tmp_path / "exports" / shown / "delta.safetensors").is_file()
    finally:
        demo.close()


def test_a_public_servers_error_toasts_and_job_lines_name_no_server_path(tmp_path, toy_bundle):
    """A damaged run's toast names the file by its place in the data folder; a job's error names no server
    folder; a local server keeps the full path, which helps its operator."""
    from age_explorer.core.erasure import erase, make_config

    run_dir = tmp_path / "runs" / "uce-red-circle"
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), run_dir)
    (run_dir / "delta.safetensors").write_bytes(b"damaged")
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="runs/uce-red-circle/delta.safetensors does not match") as caught:
            client.predict("UCE: red circle (uce-red-circle)", "delta", api_name="/export")
        assert str(tmp_path) not in str(caught.value)
        job_id = _erase(client)[0]
        demo.explorer.store.finish(job_id, "failed", error=f"OSError: cannot write {tmp_path}/jobs/{job_id}/run "
                                                             "nor /srv/app/cache/x.bin\nTraceback ...")
        status = json.loads(client.predict(job_id, api_name="/job_status"))
        assert status["error"] == f"OSError: cannot write jobs/{job_id}/run nor x.bin"
        # URLs and ratios are not paths
        assert demo.explorer.without_paths("see https://hf.co/a/b, 3/4 done") == "see https://hf.co/a/b, 3/4 done"
    finally:
        demo.close()
    local = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    assert local.explorer.without_paths(f"{run_dir} is missing") == f"{run_dir} is missing"
