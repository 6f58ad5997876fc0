"""Export an erased run: the delta (default), a full diffusers folder, a model card, a Hub push.

Exports are written to a temp folder next to the destination and renamed into place, so an
interrupted export never leaves a folder that looks complete. The Hub token is only ever passed to
``huggingface_hub``; it is never written to a log, manifest or card.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from .manifest import environment_versions
from .runs import DELTA, MANIFEST, read_manifest

FORMATS = ("delta", "diffusers")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def validate_name(name: str) -> str:
    if not _NAME.match(name or "") or ".." in name:
        raise ValueError(f"invalid export name {name!r}: use letters, digits, '.', '_' and '-' "
                         f"(no path separators, no '..', at most 96 characters)")
    return name


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected OWNER/NAME with letters, digits, '.', '_', '-'")
    return repo_id


def model_card(manifest: dict, run_dir: Path, fmt: str) -> str:
    """README.md with YAML front matter for the Hub."""
    from .backends import get_backend

    backend = get_backend(manifest.get("base_model_kind", "stable-diffusion"))
    base = manifest["base_model"]
    tags = ["concept-erasure", "age-explorer", manifest["method"], *backend.card_tags]
    front = ["---", f"license: {backend.card_license}"]
    if backend.card_base_on_hub:
        front += [f"base_model: {base}", "library_name: diffusers", "pipeline_tag: text-to-image"]
    front += ["tags:"] + [f"  - {t}" for t in tags] + ["---", ""]
    concepts = ", ".join(f"\"{c}\"" for c in manifest["concepts"])
    lines = [f"# {manifest['method'].upper()} erasure of {concepts}", "",
             f"Base model: `{base}`{backend.card_base_note}. "
             f"Made with AGE Explorer: method **{manifest['method']}**, preset **{manifest.get('preset')}**, "
             f"seed {manifest.get('seed')}, {manifest.get('steps_done')} steps on {manifest.get('device')}.", ""]
    if fmt == "delta":
        lines += [f"This export holds only the changed UNet weights (`{DELTA}`, "
                  f"{manifest.get('changed_parameters')} tensors). Load them on top of the base model with "
                  f"`age-explorer generate --model FOLDER` or `age_explorer.core.bundle.load_bundle(FOLDER)`.", ""]
    else:
        lines += ["This export is a complete pipeline folder." + backend.card_pipeline_hint, ""]
    if manifest.get("targets"):
        lines += ["## Targets found by AGE", "", "| erased concept | top targets (pi) |", "|---|---|"]
        for concept, targets in manifest["targets"].items():
            lines.append(f"| {concept} | " + ", ".join(f"{w} ({p:.2f})" for w, p in targets) + " |")
        lines.append("")
    if manifest.get("deviations_from_paper"):
        lines += ["## Deviations from the paper's recipe", ""] + [f"- {d}" for d in manifest["deviations_from_paper"]] + [""]
    spill = run_dir / "spillover.csv"
    if spill.is_file():
        table = pd.read_csv(spill)
        lines += ["## Measured spillover", "", "Delta = G before - G after (share of generated images the "
                  "classifier recognises), same prompts and seeds.", "", _markdown(table), ""]
    cfg = manifest.get("config", {})
    lines += ["## Configuration", "", "```json", _json(cfg), "```", "",
              "## Versions", "", "```json", _json(manifest.get("versions", environment_versions())), "```", ""]
    return "\n".join(front + lines)


def _markdown(table: pd.DataFrame) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(rows)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2, default=str)


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "delta", name: str | None = None,
               force: bool = False) -> Path:
    """Write ``out_dir/name`` (default name: the run folder's) and return it. ``force`` replaces, in an
    existing folder, only the files this export writes; anything else in it is left alone."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    manifest = read_manifest(run_dir)
    name = validate_name(name or f"{run_dir.name}-{fmt}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists; pass --force to replace it")
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} is a file, not an export folder")
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    try:
        if fmt == "delta":
            from .bundle import load_bundle

            load_bundle(str(run_dir), device="cpu")  # verifies checksum and base before copying
            shutil.copy2(run_dir / DELTA, tmp / DELTA)
            shutil.copy2(run_dir / MANIFEST, tmp / MANIFEST)
        else:
            _export_diffusers(run_dir, manifest, tmp)
        (tmp / "README.md").write_text(model_card(manifest, run_dir, fmt))
        if final.exists():
            for item in tmp.iterdir():  # only what this export wrote replaces what is there
                old = final / item.name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.exists() or old.is_symlink():
                    old.unlink()
                os.replace(item, old)
            tmp.rmdir()
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _export_diffusers(run_dir: Path, manifest: dict, folder: Path) -> None:
    from .bundle import load_bundle

    erased = load_bundle(str(run_dir), device="cpu")
    erased.backend.save_pipeline(erased, folder)


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = True,
                repo_type: str = "model", env_token: bool = True) -> str:
    """Upload an export folder (or a Space folder, ``repo_type="space"``).

    The token is the argument, else ``HF_TOKEN`` when ``env_token`` is true. A server passes
    ``env_token=False`` so that its visitors never borrow the operator's token.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    validate_repo_id(repo_id)
    if repo_type not in ("model", "space"):
        raise ValueError(f"repo_type must be model or space, not {repo_type!r}")
    token = token or (os.environ.get("HF_TOKEN") if env_token else None)
    if not token:
        raise ValueError("no Hugging Face token: pass --token or set HF_TOKEN" if env_token else
                         "no Hugging Face token: paste a token with write access to push")
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to upload")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    space = {"space_sdk": "gradio"} if repo_type == "space" else {}
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **space)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                                 commit_message=f"Upload {'AGE Explorer Space' if space else 'erased model'} from AGE Explorer")
    except HfHubHTTPError as err:
        raise RuntimeError(f"the Hub refused the push to {repo_id}: {_first_line(err)}") from None
    except Exception as err:  # httpx / requests / socket errors: the Hub could not be reached
        if not _is_network_error(err):
            raise
        raise RuntimeError(f"could not reach the Hub to push to {repo_id}: {_first_line(err)}") from None
    return str(getattr(info, "commit_url", info))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_network_error(err: Exception) -> bool:
    roots = {cls.__module__.split(".")[0] for cls in type(err).__mro__}
    # huggingface_hub has moved between requests, httpx and httpx2: match the families, not one name
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        root.startswith(("httpx", "httpcore", "requests", "urllib3")) for root in roots)
