"""Serve the explorer: `python app.py`, `age-explorer-app` or `python -m age_explorer.explorer` (all the
same), on http://127.0.0.1:7860 with the embedded toy model.

Environment: AGE_EXPLORER_MODEL (model, default toy), AGE_EXPLORER_DEVICE (auto/cpu/cuda),
AGE_EXPLORER_DATA_DIR (jobs, runs, exports; default ./runs, or /data on a Space with storage),
AGE_EXPLORER_EVALUATOR and AGE_EXPLORER_CONCEPT_SET (the classifier and concepts of spillover rows,
attacks and evaluations),
AGE_EXPLORER_MCP=1 (serve the read-only graph queries as MCP tools; needs `pip install "gradio[mcp]"`),
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, HF_TOKEN with AGE_EXPLORER_ALLOW_SERVER_TOKEN=1 (Hub pushes
with the server's token when the token field is left empty; off by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from .preview import StartPageProcess

# No component of the page takes a file, but Gradio's upload route is always there: cap what it accepts
# (a file over it is refused with HTTP 413 and never stays on disk).
LAUNCH_OPTIONS = {"max_file_size": "1mb"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="age-explorer-app", description="AGE Explorer web app")
    parser.add_argument("--model", default=os.environ.get("AGE_EXPLORER_MODEL", "toy"),
                        help="toy (default), a Hub id or a diffusers folder; env AGE_EXPLORER_MODEL")
    parser.add_argument("--device", default=os.environ.get("AGE_EXPLORER_DEVICE", "auto"))
    parser.add_argument("--data-dir", default=os.environ.get("AGE_EXPLORER_DATA_DIR"))
    parser.add_argument("--evaluator", default=os.environ.get("AGE_EXPLORER_EVALUATOR"),
                        help="classifier of spillover rows, attacks and evaluations: toy, hf:<hub id>, clip:<hub id or "
                             "folder>, torchvision-resnet50 (default: the toy world's own, else hf:microsoft/resnet-50 "
                             "from the local cache); env AGE_EXPLORER_EVALUATOR")
    parser.add_argument("--concept-set", default=os.environ.get("AGE_EXPLORER_CONCEPT_SET"),
                        help="concepts of spillover rows and evaluations: toy, netfive, imagenette or a CSV (default: "
                             "the toy world's own, else netfive for rows and imagenette for evaluations); env "
                             "AGE_EXPLORER_CONCEPT_SET")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--mcp", action="store_true", default=os.environ.get("AGE_EXPLORER_MCP") == "1",
                        help="also serve list_graphs, list_concepts, concept_spillover and nearest_concepts "
                             "as MCP tools (needs gradio[mcp]); env AGE_EXPLORER_MCP=1")
    parser.add_argument("--allow-server-token", action="store_true",
                        default=os.environ.get("AGE_EXPLORER_ALLOW_SERVER_TOKEN") == "1",
                        help="let 'Push to the Hub' use the server's HF_TOKEN when the token field is empty; "
                             "only for a server that you alone use; env AGE_EXPLORER_ALLOW_SERVER_TOKEN=1")
    parser.add_argument("--max-jobs-per-session", type=int,
                        default=os.environ.get("AGE_EXPLORER_MAX_JOBS_PER_SESSION", "3"),
                        help="public mode: the most jobs one session may have queued or running at once "
                             "(default 3); env AGE_EXPLORER_MAX_JOBS_PER_SESSION")
    parser.add_argument("--public", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("AGE_EXPLORER_PUBLIC", "1" if os.environ.get("SPACE_ID") else "0") == "1",
                        help="a server for strangers: each session sees and cancels only its own jobs and runs "
                             "(default on a Space, i.e. when SPACE_ID is set; env AGE_EXPLORER_PUBLIC=0/1)")
    parser.add_argument("--start-page", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("AGE_EXPLORER_START_PAGE", "1") == "1",
                        help="while the app loads, serve a page with the first concept graph on its port (the "
                             "embedded toy model's graphs; default on); env AGE_EXPLORER_START_PAGE=0/1")
    args = parser.parse_args(argv)
    if args.mcp and importlib.util.find_spec("mcp") is None:
        parser.error('--mcp needs the MCP extra of gradio: pip install "gradio[mcp]"')
    # the start-up page holds the port while gradio and torch load (explorer/preview.py)
    start_page = StartPageProcess(args.host, args.port, args.model, args.data_dir) if args.start_page else None
    try:
        from .app import Settings, build_app

        demo = build_app(Settings(model=args.model, device=args.device, data_dir=args.data_dir, mcp=args.mcp,
                                  allow_server_token=args.allow_server_token, public=args.public,
                                  evaluator=args.evaluator, concept_set=args.concept_set,
                                  max_jobs_per_session=args.max_jobs_per_session))
    except OSError as err:  # a read-only data folder, a data folder under a file
        where = f"{err.filename}: " if err.filename else ""
        parser.exit(2, f"error: cannot use the data folder: {where}{err.strerror or err}\n")
    except ValueError as err:  # e.g. a damaged job store
        parser.exit(2, f"error: {err}\n")
    finally:
        if start_page is not None:
            start_page.stop()  # the app takes the port; the page reloads into it
    from .tabs.graph import warm_first_views

    warm_first_views(demo.page)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   mcp_server=args.mcp, **LAUNCH_OPTIONS)
