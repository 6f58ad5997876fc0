"""Screenshots of every view of the explorer for docs/screenshots, taken in headless Chromium.

Serves the app on the embedded toy world with the shipped graphs and a fresh data dir, then walks
through the views as a person would: the concept graph with a node selected, its heatmap, the
difference between two graphs, UMAP and similarity-vs-Δ, an erasure in progress and done,
before/after, generation with the erased model and export (no refresh clicks: each tab lists
the finished run by itself).

    python scripts/screenshots.py --out docs/screenshots [--iterations 60]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from age_explorer.explorer.app import Settings, build_app

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/screenshots")
    parser.add_argument("--iterations", type=int, default=60, help="model steps of the erasure shown")
    parser.add_argument("--concept", default="red circle")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"

    with tempfile.TemporaryDirectory() as data_dir:
        demo = build_app(Settings(model="toy", device="cpu", data_dir=data_dir))
        graphs = list(demo.explorer.graph_dirs())
        if len(graphs) < 2:
            print("needs at least two shipped graphs in assets/graphs", file=sys.stderr)
            return 2
        port = free_port()
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#concept_graph [data-ready='1'] .scatterlayer .point", timeout=60_000)
                pick(page, "concept_dd", args.concept)
                expect(page.locator("#graph_details")).to_contain_text(args.concept, timeout=30_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "01-graph.png"), full_page=True)

                pick(page, "compare_dd", graphs[1])
                page.wait_for_selector("#diff_plot .main-svg", timeout=60_000)
                page.locator("#umap_btn").click()
                page.wait_for_selector("#umap_plot .main-svg", timeout=180_000)
                page.locator("#scatter_btn").click()
                page.wait_for_selector("#scatter_plot .main-svg", timeout=180_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "02-heatmap-difference-umap-similarity.png"), full_page=True)

                page.get_by_role("tab", name="Erase").click()
                page.locator("#erase_concepts input").click()
                page.get_by_role("option", name=args.concept, exact=True).click()
                page.keyboard.press("Escape")
                page.locator("#iterations input").fill(str(args.iterations))
                page.locator("#start_btn").click()
                page.wait_for_function("""n => {
                    const m = (document.querySelector('#job_text') || {}).textContent?.match(/running: step (\\d+)/);
                    return m && +m[1] >= n; }""", arg=args.iterations // 2, timeout=300_000)
                page.screenshot(path=str(out / "03-erase-running.png"), full_page=True)
                expect(page.locator("#job_text")).to_contain_text("done", timeout=600_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "04-erase-done.png"), full_page=True)

                page.get_by_role("tab", name="Before / after").click()  # the new run is already chosen
                expect(page.locator("#run_dd input")).to_have_value(re.compile("^AGE: "), timeout=30_000)
                page.locator("#show_btn").click()
                page.wait_for_selector("#before_after img", timeout=180_000)
                expect(page.locator("#slider img").first).to_be_visible(timeout=60_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "05-before-after.png"), full_page=True)

                page.get_by_role("tab", name="Generate").click()
                page.locator("#gen_model input").click()
                page.get_by_role("option", name=re.compile("^AGE: ")).click()
                page.keyboard.press("Escape")
                page.locator("#generate_btn").click()
                page.wait_for_selector("#gallery img", timeout=120_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(out / "06-generate.png"), full_page=True)

                page.get_by_role("tab", name="Export").click()
                expect(page.locator("#export_run_dd input")).to_have_value(re.compile("^AGE: "), timeout=30_000)
                page.locator("#export_btn").click()
                page.wait_for_timeout(5000)
                page.screenshot(path=str(out / "07-export.png"), full_page=True)
                browser.close()
        finally:
            demo.close()
            demo.explorer.worker.stop(10)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
