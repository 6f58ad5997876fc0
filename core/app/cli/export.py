"""``age-explorer export``: an erased run as a delta or a diffusers folder, with a model card; Hub push."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export an erased run: delta (default) or diffusers folder, model card, Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--format", choices=["delta", "diffusers"], default="delta")
    parser.add_argument("--out", default=None,
                        help="the export folder itself, as save_pretrained (default: exports/RUN-FORMAT)")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing folder, replacing only the files the export writes")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...export import export_run, push_to_hub

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else Path("exports") / f"{run_dir.name}-{args.format}"
    folder = export_run(run_dir, out.parent, fmt=args.format, name=out.name, force=args.force)
    print(f"exported {args.format} to {folder}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, token=args.token, private=not args.public)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0
