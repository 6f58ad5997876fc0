"""Hugging Face Space support: the ``spaces.GPU`` wrapper and a builder for a ready-to-push Space folder.

The project README must open with its two commands, so the Space's README (whose YAML front
matter configures the Space) is written by this builder rather than kept in the source tree::

    python -m age_explorer.explorer.space build --out space/            # folder ready for `git push` or upload
    python -m age_explorer.explorer.space push OWNER/NAME [--hardware t4-small]   # build and upload (HF_TOKEN)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

ROOT = Path(__file__).resolve().parent.parent
# source path -> path in the Space folder: the code in its installed layout (the age_explorer package),
# so that the Space runs app.py from its folder without installing the project
SHIPPED = {"app.py": "app.py", "core": "age_explorer/core", "explorer": "age_explorer/explorer",
           "assets": "age_explorer/assets"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store", "static")
# Spaces take these from the hardware they run on, or install gradio from sdk_version themselves.
NOT_REQUIRED = {"gradio"}


def gpu(fn=None, *, duration: int = 60):
    """``spaces.GPU`` on a ZeroGPU Space (a GPU is attached while ``fn`` runs); a no-op elsewhere."""
    def wrap(func):
        try:
            import spaces
        except ImportError:
            return func
        return spaces.GPU(duration=duration)(func)

    return wrap(fn) if fn is not None else wrap


def space_requirements() -> list[str]:
    """The package's runtime requirements (its extras left out), as written in pyproject.toml."""
    try:
        declared = metadata.requires("age-explorer") or []
    except metadata.PackageNotFoundError as err:
        raise RuntimeError("age-explorer is not installed: run `pip install -e .` first") from err
    keep = []
    for requirement in declared:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        if name.lower() not in NOT_REQUIRED:
            keep.append(requirement)
    return keep


def space_card(hardware: str | None) -> SpaceCard:
    import gradio

    data = SpaceCardData(title="AGE Explorer", sdk="gradio", sdk_version=gradio.__version__, app_file="app.py",
                         python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
                         license="apache-2.0", tags=["concept-erasure", "diffusion", "stable-diffusion"],
                         emoji="🧽", colorFrom="indigo", colorTo="gray", pinned=False,
                         short_description="See and steer concept erasure in diffusion models",
                         **({"suggested_hardware": hardware} if hardware else {}))
    body = (
        "# AGE Explorer\n\n"
        "Concept graphs, Adaptive Guided Erasure (AGE) with ESD and UCE baselines, and before/after views "
        "for text-to-image diffusion models. This Space starts on the embedded toy world (CPU is enough); "
        "set the variable `AGE_EXPLORER_MODEL` to a Stable Diffusion 1.x/2.x Hub id on GPU hardware.\n\n"
        "Variables: `AGE_EXPLORER_MODEL`, `AGE_EXPLORER_DEVICE` (auto/cpu/cuda), `AGE_EXPLORER_DATA_DIR` "
        "(default: `/data/age-explorer` when persistent storage is attached), `AGE_EXPLORER_MCP=1` "
        "(read-only MCP tools). Visitors push exports with their own token; on a private Space, the secret "
        "`HF_TOKEN` with the variable `AGE_EXPLORER_ALLOW_SERVER_TOKEN=1` lets an empty token field use yours.\n\n"
        "Erasure jobs run in a background worker process, which needs dedicated GPU hardware (or the CPU): "
        "ZeroGPU attaches a GPU only inside a request, so there it serves generation, not erasure.\n"
    )
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def build_space(out: str | Path, hardware: str | None = None, force: bool = False) -> Path:
    """Write a Space folder (code, assets, README with front matter, requirements.txt) at ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    requirements = space_requirements()
    card = space_card(hardware)
    staging = Path(tempfile.mkdtemp(prefix=".space-", dir=out.parent if out.parent.is_dir() else None))
    try:
        for name, target in SHIPPED.items():
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, staging / target, ignore=IGNORED)
            else:
                shutil.copy2(source, staging / target)
        (staging / "requirements.txt").write_text("\n".join(requirements) + "\n")
        card.save(staging / "README.md")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m age_explorer.explorer.space", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write a Space folder")
    build.add_argument("--out", required=True)
    build.add_argument("--force", action="store_true", help="replace a non-empty --out")
    push = sub.add_parser("push", help="build the Space and upload it to OWNER/NAME")
    push.add_argument("repo_id")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN)")
    push.add_argument("--public", action="store_true", help="create the Space public (default private)")
    for p in (build, push):
        p.add_argument("--hardware", help="suggested hardware in the front matter, e.g. t4-small, a10g-small")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build_space(args.out, args.hardware, args.force))
        else:
            from age_explorer.core.export.writers import push_to_hub

            with tempfile.TemporaryDirectory() as tmp:
                folder = build_space(Path(tmp) / "space", args.hardware)
                print(push_to_hub(folder, args.repo_id, args.token, private=not args.public, repo_type="space"))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
