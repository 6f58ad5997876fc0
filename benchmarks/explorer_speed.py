"""Speed of the explorer as a person meets it, on the toy model: prints a table.

Starts ``python app.py`` (CPU, a fresh data folder) and measures, against the real server:
- first paint: from starting the server to the concept graph drawn in headless Chromium (Debian
  ``chromium`` through Playwright), the page opened as soon as the server answers: on the first page
  the port serves (the start-up page), and in the app itself;
- concept pick (what a node click does): ``/select_concept`` for concepts not drawn before;
- threshold change: the same view at thresholds not drawn before (the slider calls the same function);
- before / after of a finished run (a 2-step ESD run made first through the page's API), 4 seeds;
then the same requests again while ``--users`` simulated users (processes at the lowest CPU priority,
as in ``benchmarks/load_test.py``) keep browsing and generating.

    python benchmarks/explorer_speed.py --users 10
    python benchmarks/explorer_speed.py --first-paint 5                         # first paint only, 5 runs
    python benchmarks/explorer_speed.py --first-paint 5 --app OLD/app.py@OLDPKG --app app.py   # two trees, alternating

(``APP@PATH``: start APP with PYTHONPATH=PATH, a folder whose ``age_explorer`` package is the other tree's.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import connect, free_port, user  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


GRAPH_DRAWN = "#concept_graph [data-ready='1'] .scatterlayer .point"


def first_paint(url: str, started: float) -> tuple[float, float]:
    """Seconds from ``started`` to the concept graph drawn on the first page the port serves (the
    start-up page, where the launcher shows one), and to the graph drawn in the app itself."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        while True:
            try:
                page.goto(url, timeout=5_000)
                break
            except Exception:  # not listening yet
                time.sleep(0.2)
        page.wait_for_selector(GRAPH_DRAWN, timeout=300_000)
        first = time.time() - started
        while True:  # the start-up page reloads into the app: the graph again, inside the app
            try:
                page.wait_for_selector("gradio-app " + GRAPH_DRAWN, timeout=300_000)
                break
            except Exception as err:  # the page navigated while waiting
                if "Timeout" in type(err).__name__:
                    raise
        app = time.time() - started
        browser.close()
    return first, app


def first_paints(apps: list[str], runs: int) -> int:
    """``runs`` first paints of each app.py, alternating between them; a table of median and max."""
    seconds = {app: [] for app in apps}
    for _ in range(runs):
        for app in apps:
            script, _, path = app.partition("@")
            env = {**os.environ, **({"PYTHONPATH": path} if path else {})}
            with tempfile.TemporaryDirectory() as data_dir:
                port = free_port()
                started = time.time()
                server = subprocess.Popen([sys.executable, script, "--device", "cpu", "--data-dir", data_dir,
                                           "--port", str(port)], cwd=Path(script).resolve().parent, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    seconds[app].append(first_paint(f"http://127.0.0.1:{port}/", started))
                finally:
                    server.terminate()
                    server.wait(30)
    print("| app | graph drawn, first page: median s | max s | in the app: median s | max s | runs (first page / app) |")
    print("|---|---|---|---|---|---|")
    for app, values in seconds.items():
        first, inside = [v[0] for v in values], [v[1] for v in values]
        print(f"| {app} | {np.median(first):.2f} | {max(first):.2f} | {np.median(inside):.2f} | {max(inside):.2f} | "
              + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in values) + " |")
    return 0


def timed(call) -> float:
    start = time.time()
    call()
    return time.time() - start


def measure(client: Client, graph: str, concepts: list[str], run_label: str, thresholds: list[float]) -> dict:
    picks = [timed(lambda c=c: client.predict(graph, 0.3, "shape", c, api_name="/select_concept")) for c in concepts]
    moves = [timed(lambda t=t: client.predict(graph, t, "shape", concepts[0], api_name="/select_concept"))
             for t in thresholds]
    before_after = [timed(lambda: client.predict(run_label, "0-3", api_name="/before_after")) for _ in range(2)]
    return {"concept pick": picks, "threshold change": moves, "before / after": before_after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--first-paint", type=int, default=0, metavar="RUNS",
                        help="measure only the first paint, RUNS times per app")
    parser.add_argument("--app", action="append", default=None,
                        help="app.py to start (repeatable, e.g. an older checkout's; default this tree's)")
    args = parser.parse_args()
    if args.first_paint:
        return first_paints(args.app or [str(ROOT / "app.py")], args.first_paint)
    targets = {"first paint": 5.0, "concept pick": 1.0, "threshold change": 1.0, "before / after": 5.0}
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        log_path = Path(data_dir) / "server.log"
        started = time.time()
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--device", "cpu", "--data-dir", data_dir,
                                       "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            paint, _ = first_paint(url, started)
            client = connect(url, server, log_path)
            graph = [g["graph"] for g in client.predict(api_name="/list_graphs")][0]
            concepts = [c["concept"] for c in client.predict(graph, api_name="/list_concepts")]
            job_id, *_ = client.predict(["blue circle"], "", "esd", "toy-esd", 2, 1.0, "gumbel", "", "(preset)", "",
                                        api_name="/start_erase")
            while json.loads(client.predict(job_id, api_name="/job_status"))["status"] not in ("done", "failed"):
                time.sleep(0.5)
            runs, _ = client.predict(api_name="/runs")
            run_label = runs["value"]
            idle = measure(client, graph, concepts[:10], run_label, [0.2, 0.35, 0.5, 0.65, 0.8])

            ctx = multiprocessing.get_context("spawn")
            stop, results = ctx.Event(), ctx.Queue()
            users = [ctx.Process(target=user, args=(url, graph, concepts, stop, i, 19, results))
                     for i in range(args.users)]
            for u in users:
                u.start()
            time.sleep(5)  # the users are connected and busy
            loaded = measure(client, graph, concepts[10:20], run_label, [0.25, 0.4, 0.55, 0.7, 0.85])
            stop.set()
            errors = []
            for _ in users:
                errors += results.get(timeout=600)[1]
            for u in users:
                u.join()
        finally:
            server.terminate()
            server.wait(30)
    print(f"{'view':<18}{'target s':>9}{'idle p50':>10}{'idle max':>10}{f'{args.users} users p50':>16}"
          f"{f'{args.users} users max':>16}")
    print(f"{'first paint':<18}{targets['first paint']:>9.0f}{paint:>10.2f}{paint:>10.2f}{'-':>16}{'-':>16}")
    for name in ("concept pick", "threshold change", "before / after"):
        a, b = np.array(idle[name]), np.array(loaded[name])
        print(f"{name:<18}{targets[name]:>9.0f}{np.median(a):>10.2f}{a.max():>10.2f}{np.median(b):>16.2f}{b.max():>16.2f}")
    print(f"errors of the simulated users: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
