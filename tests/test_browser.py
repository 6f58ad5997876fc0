"""The explorer in a real headless Chromium: graph drawn, a node click selects a concept, an
erasure runs to completion, its run appears in Generate, Export and Before / after with no refresh
click (and so does a run written into DATA/runs meanwhile), and the before/after images appear. Screenshots go to
$AGE_EXPLORER_SCREENSHOTS (default: the test's temp folder)."""

import itertools
import math
import os
import re
import shutil
from pathlib import Path

import pytest


playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, toy_bundle):
    from tests.test_app import running_explorer

    data_dir = tmp_path_factory.mktemp("data")
    with running_explorer(data_dir, toy_bundle) as (_, url):
        yield url, data_dir


def test_explorer_in_chromium(served, toy_bundle, tmp_path):
    page_url, data_dir = served
    shots = Path(os.environ.get("AGE_EXPLORER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.wait_for_selector("#concept_graph [data-ready='1'] .scatterlayer .point", timeout=60_000)
        page.screenshot(path=str(shots / "01-graph.png"), full_page=True)
        # every label as drawn: no two overlap, none covers a node or a recovery ring
        drawn = page.evaluate("""() => {
            const labels = [], circles = [];
            document.querySelectorAll('#concept_graph .scatterlayer .trace').forEach(tr => {
                const trace = tr.__data__ && tr.__data__[0] && tr.__data__[0].trace;
                if (!trace || !(trace.mode === 'markers+text' || trace.marker?.symbol === 'circle-open')) return;
                tr.querySelectorAll('.textpoint text').forEach(t => {
                    const r = t.getBoundingClientRect();
                    labels.push([t.textContent, r.left, r.top, r.right, r.bottom]);
                });
                tr.querySelectorAll('path.point').forEach(p => {
                    const r = p.getBoundingClientRect();
                    if (r.width) circles.push([(r.left + r.right) / 2, (r.top + r.bottom) / 2, r.width / 2]);
                });
            });
            return {labels, circles};
        }""")
        labels = drawn["labels"]
        assert len(labels) == 25 and len(drawn["circles"]) >= 25
        for (a, *p), (b, *q) in itertools.combinations(labels, 2):
            assert not (p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]), (a, b)
        for text, x0, y0, x1, y1 in labels:
            for cx, cy, r in drawn["circles"]:
                assert math.hypot(min(max(cx, x0), x1) - cx, min(max(cy, y0), y1) - cy) >= r, text

        # Click the node of "blue circle" (its trace and index come from the figure itself).
        box = page.evaluate("""() => {
            const div = document.querySelector('#concept_graph .cg-plot');
            const xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis, r = div.getBoundingClientRect();
            for (const trace of div.data) {
                const idx = (trace.customdata || []).indexOf('blue circle');
                if (idx >= 0) return {x: r.left + xa._offset + xa.l2p(trace.x[idx]), y: r.top + ya._offset + ya.l2p(trace.y[idx])};
            }
            return null;
        }""")
        assert box, "the node is not drawn"
        page.mouse.move(box["x"], box["y"])
        page.mouse.click(box["x"], box["y"])
        playwright.expect(page.locator("#concept_dd input")).to_have_value("blue circle", timeout=20_000)
        playwright.expect(page.locator("#graph_details")).to_contain_text("blue circle", timeout=20_000)
        page.screenshot(path=str(shots / "02-node-clicked.png"), full_page=True)

        # Erase "red circle" with a tiny run.
        page.get_by_role("tab", name="Erase").click()
        page.locator("#erase_concepts input").click()
        page.get_by_role("option", name="red circle", exact=True).click()
        page.keyboard.press("Escape")
        page.locator("#iterations input").fill("6")
        page.locator("#start_btn").click()
        playwright.expect(page.locator("#job_text")).to_contain_text("done", timeout=240_000)
        page.screenshot(path=str(shots / "03-erase-done.png"), full_page=True)

        # a reloaded page re-attaches to its job and draws the whole loss curve from the run's history
        from age_explorer.core.runs import read_history

        run_dir = next((data_dir / "jobs").glob("*/run"))
        steps = sorted({row["step"] for row in read_history(run_dir) if row.get("losses")})
        assert len(steps) > 1
        page.reload()
        page.get_by_role("tab", name="Erase").click()
        page.wait_for_function("() => { const d = document.querySelector('#loss_plot .js-plotly-plot');"
                               " return d && d.data && d.data.length > 0; }", timeout=60_000)
        # _fullData: the traces as plotly.js decoded them (the figure's JSON packs arrays as base64)
        drawn = page.evaluate("() => [...new Set(document.querySelector('#loss_plot .js-plotly-plot')._fullData"
                              ".flatMap(trace => Array.from(trace.x)))].sort((a, b) => a - b)")
        assert drawn == steps

        # the finished job says where its run went, and every tab that takes a run has it, no refresh click
        playwright.expect(page.locator("#job_status")).to_contain_text("Next: compare it in Before / after")
        playwright.expect(page.locator("#queue_line")).not_to_contain_text("queued")
        page.get_by_role("tab", name="Generate").click()
        playwright.expect(page.locator("#gen_model input")).to_have_value("original")
        page.locator("#gen_model input").click()
        playwright.expect(page.get_by_role("option", name=re.compile("^AGE: red circle"))).to_be_visible()
        page.keyboard.press("Escape")
        page.get_by_role("tab", name="Export").click()
        playwright.expect(page.locator("#export_run_dd input")).to_have_value(re.compile("^AGE: red circle"))

        # a run written by the CLI into DATA/runs while the page is open appears when a tab is opened
        from age_explorer.core.erasure import erase, make_config

        erase(toy_bundle, make_config("esd", "toy-esd", concepts=["green square"], iterations=2),
              data_dir / "runs" / "cli-green-square")
        page.get_by_role("tab", name="Before / after").click()
        playwright.expect(page.locator("#run_dd input")).to_have_value(re.compile("^AGE: red circle"))
        page.locator("#run_dd input").click()
        playwright.expect(page.get_by_role("option", name="ESD: green square (cli-green-square)")).to_be_visible()
        page.keyboard.press("Escape")
        page.locator("#show_btn").click()
        page.wait_for_selector("#before_after img", timeout=120_000)
        playwright.expect(page.locator("#before_after_legend")).to_contain_text("Rows: erased: red circle")
        playwright.expect(page.locator("#slider img").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(shots / "04-before-after.png"), full_page=True)
        browser.close()


def test_robustness_tab_after_an_attack(served, toy_bundle, tmp_path):
    """A run's recovery attack from the page: progress while it runs, then its contact sheet, ASR and
    learned words; the attack is listed under the run."""
    from age_explorer.core.erasure import erase, make_config

    page_url, data_dir = served
    shots = Path(os.environ.get("AGE_EXPLORER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    # a short run: the page's views are under test here, not the erasure's strength
    erase(toy_bundle, make_config("esd", "toy-esd", concepts=["purple ring"], iterations=20),
          data_dir / "runs" / "esd-purple-ring")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.get_by_role("tab", name="Robustness").click()
        playwright.expect(page.locator("#attack_run_dd input")).to_have_value("ESD: purple ring (esd-purple-ring)",
                                                                               timeout=30_000)
        playwright.expect(page.locator("#attack_summary")).to_contain_text("No attack of this run yet")
        page.locator("#attack_steps input").fill("40")
        page.locator("#attack_seeds textarea, #attack_seeds input").first.fill("1000-1003")
        page.locator("#attack_btn").click()
        playwright.expect(page.locator("#attack_text")).to_contain_text("running", timeout=60_000)
        playwright.expect(page.locator("#attack_text")).to_contain_text("done", timeout=300_000)
        page.wait_for_selector("#attack_sheet img", timeout=60_000)
        playwright.expect(page.locator("#attack_summary")).to_contain_text("nearest words")
        playwright.expect(page.locator("#attack_past input")).to_have_value(re.compile("^embedding on purple ring"))
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "05-robustness.png"), full_page=True)
        browser.close()


def test_methods_view_ranks_sorts_and_compares_two_methods(served, toy_bundle, tmp_path):
    """The Methods tab: the ranked table (sorted by a header click), every method's row of a concept,
    and two methods' runs of that concept before/after on the same seeds."""
    from age_explorer.core.erasure import erase, make_config

    page_url, data_dir = served
    shots = Path(os.environ.get("AGE_EXPLORER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    erase(toy_bundle, make_config("esd", "toy-esd", concepts=["red circle"], iterations=20),
          data_dir / "runs" / "esd-red-circle-methods")
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), data_dir / "runs" / "uce-red-circle")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(page_url)
        page.get_by_role("tab", name="Methods").click()
        table = page.locator("#methods_table")
        playwright.expect(table).to_contain_text("toy-esd", timeout=30_000)
        # Gradio's table draws its body as virtual rows, one child per cell
        cells = lambda: table.evaluate("e => Array.from(e.querySelectorAll('.virtual-row')).map("  # noqa: E731
                                       "r => Array.from(r.children).map(c => c.innerText.trim()))")
        before = cells()
        assert len(before) >= 2 and any(row[1].startswith("ESD") for row in before), before
        header = table.locator("thead th", has_text="unrelated").first  # sort by a column, from its menu
        header.hover()
        header.locator("button.cell-menu-button").click(force=True)
        page.locator("[role=menu]").get_by_text("Sort descending").click()
        page.wait_for_timeout(1000)
        unrelated = [float(row[4]) for row in cells()]
        assert unrelated == sorted(unrelated, reverse=True) and unrelated != [float(r[4]) for r in before], unrelated
        page.locator("#methods_rows_btn").click()
        page.wait_for_selector("#methods_rows .heatmaplayer, #methods_rows .hm", timeout=60_000)
        playwright.expect(page.locator("#methods_run_a input")).to_have_value(re.compile(r"\(uce-red-circle\)|\(esd-red-circle-methods\)"),
                                                                              timeout=30_000)
        playwright.expect(page.locator("#methods_run_b input")).to_have_value(re.compile(r"red circle"), timeout=30_000)
        page.locator("#methods_pair_btn").click()
        page.wait_for_selector("#methods_sheet img", timeout=120_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "06-methods.png"), full_page=True)
        browser.close()


def _serve(data_dir: Path, port: int, public: bool, log):
    """The explorer in a process group of its own (server and worker), as `python app.py` runs it."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "AGE_EXPLORER_DATA_DIR": str(data_dir)}
    return subprocess.Popen([sys.executable, "-m", "age_explorer.explorer", "--device", "cpu", "--port", str(port),
                             "--public" if public else "--no-public"], env=env, stdout=log, stderr=log,
                            start_new_session=True)


def _wait_for_server(url: str, server, timeout: float = 180) -> None:
    import time
    import urllib.request

    from age_explorer.explorer.preview import HEADER as START_PAGE

    end = time.time() + timeout
    while time.time() < end:
        assert server.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200 and not answer.headers.get(START_PAGE):  # the app, not its start-up page
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not start")


def test_a_restarted_server_gives_the_page_back_its_job_and_its_run(tmp_path):
    """A job started from the page of a public server survives a killed process group (server and worker,
    kill -9): after a restart the reloaded page shows the job, resumes it with its Resume button and lists
    its run, which another browser does not see. After a plain restart (SIGTERM) into local mode, the page
    and the other browser both list the run. One test for both modes: each server start costs seconds."""
    import signal

    from tests.helpers import free_port

    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(tmp_path / "server.log", "ab")
    server = _serve(data_dir, port, True, log)

    def export_runs(page):
        page.get_by_role("tab", name="Export").click()
        return page.locator("#export_run_dd input")

    try:
        _wait_for_server(url, server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Erase").click()
            page.locator("#method").get_by_text("ESD (fixed target)", exact=True).click()
            playwright.expect(page.locator("#preset input")).to_have_value("toy-esd")
            page.locator("#erase_concepts input").click()
            page.get_by_role("option", name="red circle", exact=True).click()
            page.keyboard.press("Escape")
            page.locator("#iterations input").fill("40")
            page.locator("#start_btn").click()
            # past the first checkpoint (every 25 steps)
            page.wait_for_function("() => /step (2[6-9]|3[0-9])\\//.test("
                                   "document.querySelector('#job_text')?.textContent || '')", timeout=240_000)
            os.killpg(server.pid, signal.SIGKILL)  # the server and its worker, at once
            server.wait()
            job_id = next((data_dir / "jobs").iterdir()).name

            server = _serve(data_dir, port, True, log)
            _wait_for_server(url, server)
            page.reload()
            page.get_by_role("tab", name="Erase").click()
            playwright.expect(page.locator("#job_text")).to_contain_text("interrupted", timeout=60_000)
            playwright.expect(page.locator("#my_jobs")).to_contain_text(job_id, timeout=30_000)
            page.locator("#resume_btn").click()
            playwright.expect(page.locator("#job_text")).to_contain_text("done: step 40/40", timeout=300_000)
            playwright.expect(export_runs(page)).to_have_value(re.compile("^ESD: red circle"), timeout=30_000)
            stranger = browser.new_context().new_page()
            stranger.goto(url)
            runs = export_runs(stranger)
            stranger.wait_for_timeout(3000)  # the page's run lists are filled after load
            assert runs.input_value() == "", "another browser sees the page's run in public mode"

            server.send_signal(signal.SIGTERM)  # a plain restart, into local mode
            server.wait(60)
            server = _serve(data_dir, port, False, log)
            _wait_for_server(url, server)
            for each in (page, stranger):
                each.reload()
                playwright.expect(export_runs(each)).to_have_value(re.compile("^ESD: red circle"), timeout=30_000)
            browser.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
