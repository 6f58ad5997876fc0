"""``age-explorer export``: an erased run as a delta, a diffusers folder, a LoRA or a single-file checkpoint,
with a model card; Hub push."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import use_threads

HELP = "export an erased run: delta (default), diffusers folder, LoRA or single-file checkpoint, model card, Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the rank flag: default and help of the config (a module without torch, so --help is quick)
    from ...export.options import DEFAULT_RANK, FORMATS, LoraExportConfig

    parser.add_argument("run_dir")
    parser.add_argument("--format", choices=FORMATS, default="delta")
    parser.add_argument("--rank", default=str(DEFAULT_RANK),
                        help=LoraExportConfig.__dataclass_fields__["rank"].metadata["help"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of a diffusers folder or a checkpoint (default: the base model's stored dtype)")
    parser.add_argument("--out", default=None,
                        help="the export folder itself, as save_pretrained (default: exports/RUN-FORMAT)")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing folder, replacing only the files the export writes")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ...export.writers import export_run, push_to_hub

    use_threads(None)  # the contact sheet's images and the LoRA's SVDs compute
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else Path("exports") / f"{run_dir.name}-{args.format}"
    stage = [None]
    with tqdm(disable=None) as bar:
        def progress(done, total, what):
            if stage[0] != what:  # a new stage: the LoRA's layers, then the contact sheet's images
                stage[0] = what
                bar.reset(total)
                bar.set_description(what)
            bar.total = total
            bar.update(done - bar.n)

        folder = export_run(run_dir, out.parent, fmt=args.format, name=out.name, force=args.force, rank=args.rank,
                            dtype=args.dtype, progress=progress)
    print(f"exported {args.format} to {folder}")
    if args.format == "lora":
        lora = json.loads((folder / "export_manifest.json").read_text())["lora"]
        print(f"rank {lora['rank']}, relative Frobenius error {lora['relative_frobenius_error']:.4g}; "
              f"{lora['kohya_file']} for AUTOMATIC1111 and ComfyUI, {lora['peft_file']} for diffusers")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, token=args.token, private=not args.public)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0
