"""The start-up page: served at once on the app's port by a process without gradio or torch, it draws
the same figure the Concept graph tab draws first, marks every answer so the page knows when the app
has taken over, and frees the port when stopped."""

import json
import socket
import urllib.error
import urllib.request

import pytest

from age_explorer.core.graph.store import GraphStore
from age_explorer.explorer.plots import first_view
from age_explorer.explorer.preview import HEADER, StartPageProcess, first_graph


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, method="GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.mark.slow
def test_the_start_page_draws_the_apps_first_figure_and_hands_over_the_port(tmp_path):
    from age_explorer.explorer.app import Settings, build_app

    port = free_port()
    page = StartPageProcess("127.0.0.1", port, "toy", str(tmp_path / "data"))
    try:
        assert page.ready
        url = f"http://127.0.0.1:{port}"
        code, headers, body = get(url + "/")
        assert code == 200 and headers[HEADER] == "1" and b"Loading the explorer" in body
        assert get(url + "/", "HEAD")[1][HEADER] == "1"  # what the page polls
        code, _, figure = get(url + "/start/figure.json")
        assert code == 200
        assert get(url + "/start/plotly.min.js")[0] == 200
        assert get(url + "/config")[0] == 503  # the app's routes are not there yet
        # the same graph and figure as the app's Concept graph tab on first paint
        folder = first_graph("toy", str(tmp_path / "data"))
        assert json.loads(figure) == json.loads(first_view(GraphStore(folder)).to_json())
        demo = build_app(Settings(data_dir=str(tmp_path / "data"), device="cpu", start_worker=False))
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert json.loads(by_id["concept_graph"].value) == json.loads(figure)
        assert by_id["graph_dd"].value == f"{folder.name} (shipped)"
    finally:
        page.stop()
    with socket.socket() as s:  # the port is free for the app
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_taken_port_leaves_the_start_page_out(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        page = StartPageProcess("127.0.0.1", taken.getsockname()[1], "toy", None)
        assert not page.ready
        page.stop()


def test_no_start_page_graph_for_a_model_whose_revision_needs_torch():
    assert first_graph("CompVis/stable-diffusion-v1-4", None) is None
    assert first_graph("toy", None).name == "toy-esd"  # the most complete graph; on a tie, ESD


@pytest.mark.slow
def test_the_launcher_serves_the_start_page_then_hands_the_port_to_the_app(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    app = Path(__file__).resolve().parent.parent / "app.py"
    server = subprocess.Popen([sys.executable, str(app), "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = []
    try:
        end = time.time() + 300
        while time.time() < end and "app" not in seen:
            assert server.poll() is None, "the launcher exited"
            try:
                code, headers, _ = get(url)
            except OSError:  # not listening, or between the start page and the app
                time.sleep(0.1)
                continue
            what = "start page" if headers.get(HEADER) else "app"
            if not seen or seen[-1] != what:
                seen.append(what)
            time.sleep(0.1)
        assert seen == ["start page", "app"]
        assert get(url + "config")[0] == 200  # gradio's own routes answer now
    finally:
        server.terminate()
        server.wait(60)
