"""The start-up page: the default concept graph within seconds, on the app's port, while the app loads.

On a small CPU most of the explorer's start goes to importing gradio and torch and building the page
(about 8 s on 2 cores) before it answers at all. The concept graph needs only the shipped graph files
and plotly. So ``launch.main`` first starts this page in a process of its own (standard library
server, no gradio, no torch), then builds the app, stops this process and hands the port to the app.
The page says that the explorer is loading, draws the figure the Concept graph tab draws first (hover
works; clicks wait for the app) and reloads into the app as soon as the port answers without this
page's header.

    python -m age_explorer.explorer.preview --port 7860 [--model toy] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HEADER = "X-AGE-Explorer-Start-Page"  # present on every answer of this page, absent on the app's

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>AGE Explorer</title>
<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}#note{color:#555}</style></head>
<body><h1>AGE Explorer</h1>
<p id="note">Loading the explorer… The concept graph below is the first one it shows: hover it now; the whole
page (tabs, clicks, erasure) replaces this one in a few seconds.</p>
<div id="concept_graph"><div id="network" style="min-height:640px"></div></div>
<script src="/start/plotly.min.js"></script>
<script>
fetch("/start/figure.json").then(r => r.ok ? r.json() : null).then(fig => fig &&
  Plotly.newPlot("network", fig.data, fig.layout, {responsive: true, displaylogo: false}).then(() => {
    document.getElementById("network").dataset.ready = "1";
  }));
async function poll() {
  try {
    const r = await fetch("/", {method: "HEAD", cache: "no-store"});
    if (r.ok && !r.headers.has("HEADER")) { location.reload(); return; }
  } catch (e) {}  // between this page and the app the port answers nothing for a moment
  setTimeout(poll, 300);
}
setTimeout(poll, 300);
</script></body></html>
""".replace("HEADER", HEADER)


def first_graph(model: str, data_dir: str | None) -> Path | None:
    """The graph the app draws first, found without torch: only for the embedded toy model, whose
    weights revision is in a JSON file (another model's needs its backend, which loads torch)."""
    from age_explorer.core.app.job_store import default_data_dir
    from age_explorer.core.graph.store import model_graphs
    from age_explorer.core.paths import assets_dir, toy_model_dir

    if model != "toy":
        return None
    revision = json.loads((toy_model_dir() / "manifest.json").read_text()).get("revision")
    roots = [(assets_dir() / "graphs", "shipped"), (Path(data_dir or default_data_dir()) / "graphs", "computed")]
    graphs = model_graphs(roots, model, revision)
    return next(iter(graphs.values()), None)


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class StartPage(BaseHTTPRequestHandler):
    figure: bytes | None = None  # set once built; the figure request waits for it
    built = threading.Event()

    def _answer(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header(HEADER, "1")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._answer(200, PAGE.encode(), "text/html; charset=utf-8")
        elif self.path == "/start/plotly.min.js":
            self._answer(200, plotly_js().read_bytes(), "application/javascript")
        elif self.path == "/start/figure.json":
            self.built.wait(60)
            ok = self.figure is not None
            self._answer(200 if ok else 503, self.figure or b"{}", "application/json")
        else:  # the app's own routes: not yet
            self._answer(503, b"the explorer is starting", "text/plain")

    do_HEAD = do_GET

    def log_message(self, *args):  # quiet: the app logs what matters
        pass


def serve(host: str, port: int, model: str, data_dir: str | None) -> None:
    server = ThreadingHTTPServer((host, port), StartPage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)  # the parent waits for this line: the port is taken
    try:
        folder = first_graph(model, data_dir)
        if folder is not None:
            from age_explorer.core.graph.store import GraphStore
            from age_explorer.explorer.plots import first_view

            StartPage.figure = first_view(GraphStore(folder)).to_json().encode()
    finally:
        StartPage.built.set()
    while True:
        time.sleep(3600)


class StartPageProcess:
    """The start-up page in a child process; ``stop`` frees the port for the app."""

    def __init__(self, host: str, port: int, model: str, data_dir: str | None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "age_explorer.explorer.preview", "--host", host, "--port", str(port),
             "--model", model, *(["--data-dir", data_dir] if data_dir else [])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # "ready" once it holds the port; nothing (it exited) when the port is taken or it failed: the
        # app then starts as it would without it
        self.ready = self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="age-explorer-start-page", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.model, args.data_dir)
    except OSError:  # the port is taken: say nothing, the app reports it
        sys.exit(1)


if __name__ == "__main__":
    main()
