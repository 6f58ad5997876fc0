"""Export an erased run: the delta (default), a full diffusers folder, a LoRA, a single-file checkpoint, a
model card, a Hub push.

The model card holds the run's spillover row and its evaluation (``RUN/evaluation``: ESR/PSR, nudity,
CLIP score... as measured), whose result files the export carries in ``evaluation/``.

Exports are written to a temp folder next to the destination and renamed into place, so an
interrupted export never leaves a folder that looks complete. An export reads and copies only regular
files from inside the run folder: a symbolic link among them (or above them, inside the run folder)
is refused with one line, never followed, so a link planted in a run cannot carry another file out.
The Hub token is only ever passed to ``huggingface_hub``; it is never written to a log, manifest or card.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from ..bundle import PromptWarning
from ..device import resolve_dtype
from .lora import (DEFAULT_RANK, FULL_RANK, PEFT_FILE, PEFT_FOLDER, LoraExportConfig, SafetensorsValues,
                          kohya_file, lowrank_delta, lowrank_summary)
from .checkpoint import refuse_checkpoint_kind, write_checkpoint
from .options import CHECKPOINT_SUFFIX, FORMATS
from ..files import environment_versions, write_json_atomic
from ..runs import DELTA, MANIFEST, RunManifest

SHEET = "before_after.png"  # the before/after contact sheet a run folder or an export holds
SHEET_SEEDS = [0, 1, 2, 3]
EXPORT_MANIFEST = "export_manifest.json"  # what a LoRA export holds and how well it approximates the delta
EVALUATION = "evaluation"  # a run's evaluation folder (age-explorer evaluate RUN); exports copy its results
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


def model_card(manifest: RunManifest, run_dir: Path, fmt: str, lora: dict | None = None, sheet: bool = False,
               checkpoint: str | None = None, checkpoint_config: str | None = None) -> str:
    """README.md with YAML front matter for the Hub. ``lora``: the LoRA export's summary; ``sheet``:
    the export holds the before/after contact sheet; ``checkpoint``: the single file's name."""
    from ..backends import get_backend

    backend = get_backend(manifest.base_model_kind or "stable-diffusion")
    base = manifest.base_model
    tags = ["concept-erasure", "age-explorer", manifest.method, *backend.card_tags] + (["lora"] if fmt == "lora" else [])
    front = ["---"]
    license_ = backend.card_license or base_license(base)
    if license_:
        front.append(f"license: {license_}")
    if backend.card_base_on_hub and is_hub_base(base):
        front.append(f"base_model: {base}")
    if fmt in ("diffusers", "lora"):  # the delta is this project's own format: diffusers cannot load it
        front.append("library_name: diffusers")
    if fmt == "diffusers":
        front.append("pipeline_tag: text-to-image")
    front += ["tags:"] + [f"  - {t}" for t in tags] + ["---", ""]
    concepts = ", ".join(f"\"{c}\"" for c in manifest.concepts)
    lines = [f"# {manifest.method.upper()} erasure of {concepts}", "",
             f"Base model: `{base}`{backend.card_base_note}. "
             f"Made with AGE Explorer: method **{manifest.method}**, preset **{manifest.preset}**, "
             f"seed {manifest.seed}, {_steps_text(manifest)} on {manifest.device}.", ""]
    if fmt == "delta":
        lines += [f"This export holds only the changed UNet weights (`{DELTA}`, "
                  f"{manifest.changed_parameters} tensors). Load them on top of the base model with "
                  f"`age-explorer generate --model FOLDER` or `age_explorer.core.bundle.load_bundle(FOLDER)`.", ""]
    elif fmt == "lora":
        lines += _lora_section(lora or {}, backend.name)
    elif fmt == "checkpoint":
        lines += _checkpoint_section(checkpoint or "", backend.pipeline_loader().__name__, checkpoint_config)
    else:
        lines += ["This export is a complete pipeline folder." + backend.card_pipeline_hint, ""]
    lines += backend.card_usage(fmt)
    if sheet:
        lines += ["## Before and after", "", f"Same prompts and seeds ({', '.join(map(str, SHEET_SEEDS))}), "
                  f"the base model against the erased one.", "", f"![before and after]({SHEET})", ""]
    if manifest.targets:
        lines += ["## Targets found by AGE", "", "| erased concept | top targets (pi) |", "|---|---|"]
        for concept, targets in manifest.targets.items():
            lines.append(f"| {concept} | " + ", ".join(f"{w} ({p:.2f})" for w, p in targets) + " |")
        lines.append("")
    if manifest.deviations_from_paper:
        lines += ["## Deviations from the paper's recipe", ""] + [f"- {d}" for d in manifest.deviations_from_paper] + [""]
    spill = run_dir / "spillover.csv"
    if spill.is_file():
        table = pd.read_csv(spill)
        lines += ["## Measured spillover", "", "Delta = G before - G after (share of generated images the "
                  "classifier recognises), same prompts and seeds.", "", _markdown(table), ""]
    lines += _evaluation_section(run_dir)
    lines += ["## Configuration", "", "```json", _json(manifest.config), "```", "",
              "## Versions", "", "```json", _json(manifest.versions or environment_versions()), "```", ""]
    return "\n".join(front + lines)


def _evaluation_section(run_dir: Path) -> list[str]:
    """The run's evaluation (``RUN/evaluation``, written by ``age-explorer evaluate RUN``) as card lines;
    none when it has no evaluation, a line saying why when its results cannot be read."""
    from ..evaluation.results import RESULTS, card_lines

    folder = run_dir / EVALUATION
    if not (folder / RESULTS).is_file():
        return []
    try:
        return card_lines(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return ["## Evaluation", "", f"The run's evaluation could not be read ({type(err).__name__}: "
                f"{str(err)[:200]}); run `age-explorer evaluate RUN --force` again.", ""]


def _copy_evaluation(run_dir: Path, folder: Path) -> None:
    """The evaluation's result files beside the card whose table they hold."""
    from ..evaluation.results import MANIFEST as EVAL_MANIFEST, RESULTS, TABLE

    source = run_dir / EVALUATION
    if not (source / RESULTS).is_file():
        return
    (folder / EVALUATION).mkdir()
    for name in (RESULTS, TABLE, EVAL_MANIFEST):
        if (source / name).is_file():
            copy_run_file(run_dir, f"{EVALUATION}/{name}", folder / EVALUATION / name)


def refuse_links(run_dir: Path) -> None:
    """Raise (one line) when a file an export of ``run_dir`` reads is a symbolic link or not a regular
    file, or sits under a linked folder inside the run folder: the manifest, the delta, the contact
    sheet, the spillover table and everything in ``evaluation/``."""
    names = [DELTA, SHEET, "spillover.csv", EVALUATION]
    if _checked(run_dir, MANIFEST) is not None:
        names.append(RunManifest.read(run_dir).delta_file or DELTA)
    for name in names:
        path = _checked(run_dir, name)
        if path is not None and path.is_dir():
            for inner in sorted(path.rglob("*")):
                _checked(run_dir, str(inner.relative_to(run_dir)))


def _checked(run_dir: Path, relative: str) -> Path | None:
    """``run_dir/relative`` when it is a regular file or folder reached without any link; None when it
    does not exist; a ValueError naming the link otherwise."""
    path = run_dir
    for part in Path(relative).parts:
        if part in ("", ".", "..") or os.sep in part:
            raise ValueError(f"{relative!r} is not a name inside the run folder")
        path = path / part
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link: an export copies only regular files from inside the "
                             f"run folder and follows no link; replace the link by the file itself to export")
        if not path.exists():
            return None
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"{path} is not a regular file, so it is not exported")
    return path


def copy_run_file(run_dir: Path, relative: str, dst: Path) -> None:
    """Copy ``run_dir/relative`` to ``dst`` without following a link, even one planted after
    :func:`refuse_links` looked (``O_NOFOLLOW``, and the opened file must be a regular file)."""
    import stat

    src = _checked(run_dir, relative)
    if src is None or not src.is_file():
        raise FileNotFoundError(f"{run_dir / relative} is missing from the run folder")
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise ValueError(f"{src} could not be opened as a regular file ({err.strerror})") from None
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise ValueError(f"{src} is not a regular file, so it is not exported")
        with open(dst, "wb") as target:
            shutil.copyfileobj(source, target)
    shutil.copystat(src, dst, follow_symlinks=False)


def _steps_text(manifest: RunManifest) -> str:
    """AGE's loop alternates model (theta) and pi steps; its ``steps_done`` counts both."""
    done = int(manifest.steps_done or 0)
    every = manifest.config.get("pgd_num_steps")
    if every:  # the methods with pi steps (AGE, AP)
        model = math.ceil(done / int(every))
        return f"{_count(model, 'model step')} and {_count(done - model, 'pi step')}"
    return _count(done, "model step")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# the tool version whose own loader code was run on these files (scripts/check_exports_in_tools.py)
CHECKED_WITH = "ComfyUI 0.3.64 and AUTOMATIC1111 1.10.1"


def _lora_section(lora: dict, kind: str) -> list[str]:
    kohya, peft = lora.get("kohya_file"), f"{PEFT_FOLDER}/{PEFT_FILE}"
    lines = [f"This export is a LoRA of rank **{lora.get('rank')}** of the run's weight change: a truncated SVD "
             f"(at full rank, the change itself) of each of the {lora.get('layers')} changed weight matrices (conv "
             f"kernels flattened), alpha = rank "
             f"(scale 1). Relative Frobenius error of the approximation over all of them: "
             f"**{lora.get('relative_frobenius_error', float('nan')):.4g}** "
             f"(||delta - up @ down||_F / ||delta||_F).", "",
             f"- `{kohya}`: kohya layout (`lora_unet_<layer>.lora_down/lora_up/alpha`, and `<layer>.diff_b` "
             f"for each changed bias) for AUTOMATIC1111 and ComfyUI. Not for diffusers, whose kohya converter "
             f"refuses `diff_b`.",
             f"- `{peft}`: diffusers/PEFT layout (`unet.<layer>.lora_A/lora_B`, the changed biases as "
             f"`lora_B.bias`) for diffusers. Not for AUTOMATIC1111 or ComfyUI, which ignore its keys.", ""]
    if kind in ("stable-diffusion", "stable-diffusion-xl"):
        lines += ["## Where to put it", "",
                  f"- AUTOMATIC1111: `{kohya}` into `stable-diffusion-webui/models/Lora/`, then "
                  f"`<lora:{kohya.removesuffix('.safetensors')}:1>` in the prompt.",
                  f"- ComfyUI: `{kohya}` into `ComfyUI/models/loras/`, then a LoraLoader node at strength 1.",
                  f"- diffusers: `pipe.load_lora_weights(\"FOLDER/{PEFT_FOLDER}\")` (needs peft).", ""]
    changed = lora.get("changed_biases", 0)
    if changed:
        lines += [f"Biases: the run changed {changed} bias vector(s). diffusers (`lora_B.bias`) and ComfyUI "
                  f"(`diff_b`) apply them; AUTOMATIC1111 ignores `diff_b` keys, so there these biases stay at the "
                  f"base model's values: off by up to {lora.get('bias_delta_max_abs', 0.0):.3g} per entry, Frobenius "
                  f"norm {lora.get('bias_delta_frobenius', 0.0):.3g} against {lora.get('weight_delta_frobenius', 0.0):.3g} "
                  f"for the weight matrices (checked with the loader code of {CHECKED_WITH}).", ""]
    else:
        lines += ["Biases: the run changed none, so every tool applies the whole LoRA.", ""]
    if lora.get("left_out"):
        lines.append(f"Left out of both files (no LoRA layout holds them): {len(lora['left_out'])} normalisation "
                     f"tensor(s), delta Frobenius norm {math.sqrt(sum(v * v for v in lora['left_out'].values())):.3g}.")
        lines.append("")
    return lines


def _checkpoint_section(file: str, pipeline: str, config: str | None = None) -> list[str]:
    """``config``: the SD-2.x config written beside the file (None for SD-1.x and SDXL)."""
    lines = [f"This export is one file in the original Stable Diffusion single-file (LDM) layout, `{file}`: the "
             f"erased UNet with the base model's VAE and text encoder(s). ComfyUI's checkpoint loader detects and "
             f"loads it and the UNet class AUTOMATIC1111 builds for the model loads its UNet with no missing or "
             f"unexpected key (checked with {CHECKED_WITH}); diffusers reads it with `{pipeline}.from_single_file`.", ""]
    if config:
        lines += [f"`{config}` is the model's SD-2 config (its prediction type, v or epsilon, included): keep it "
                  f"beside `{file}` for AUTOMATIC1111, which reads a `.yaml` of the checkpoint's name before it "
                  f"guesses the config from the weights. ComfyUI and diffusers do not need it.", ""]
    beside = f" with `{config}` beside it" if config else ""
    return lines + [
        "## Where to put it", "",
        f"- AUTOMATIC1111: `{file}`{beside} into `stable-diffusion-webui/models/Stable-diffusion/`, then choose it "
        f"as the Stable Diffusion checkpoint.",
        f"- ComfyUI: `{file}` into `ComfyUI/models/checkpoints/`, then a Load Checkpoint node.",
        f"- diffusers: `{pipeline}.from_single_file(\"{file}\", config=BASE_MODEL)`.", ""]


def is_hub_base(base: str) -> bool:
    """The base was loaded by Hub id (not a local folder), so the card may name it as ``base_model``."""
    from ..bundle import looks_like_hub_id

    return not Path(base).expanduser().exists() and looks_like_hub_id(base)


def base_license(base: str) -> str | None:
    """The ``license:`` of the base model's own card (its folder's README.md, or the cached Hub copy);
    None when there is none to read."""
    readme = Path(base).expanduser() / "README.md"
    if not readme.is_file() and is_hub_base(base):
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(base, "README.md", local_files_only=True))
        except Exception:  # not in the cache (or no card): no license to copy
            return None
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    found = re.search(r"^license:\s*['\"]?([\w.+-]+)", text.split("---", 2)[1], re.MULTILINE)
    return found.group(1) if found else None


def _markdown(table: pd.DataFrame) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(rows)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2, default=str)


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "delta", name: str | None = None,
               force: bool = False, rank: int | str | None = DEFAULT_RANK, dtype: str | None = None,
               progress=None) -> Path:
    """Write ``out_dir/name`` (default name: the run folder's) and return it. ``force`` replaces, in an
    existing folder, only the files this export writes; anything else in it is left alone.

    ``rank``: the LoRA's rank (``lora`` only; None or "full": every singular value). ``dtype``: the
    dtype of a ``diffusers`` folder or a ``checkpoint`` (default: the base model's stored dtype).
    ``progress(done, total, what)`` follows the LoRA's layers and the contact sheet's images.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    lora_config = LoraExportConfig(rank=rank)  # a bad rank is refused before anything is loaded
    stored_dtype = None
    if dtype is not None:
        if fmt not in ("diffusers", "checkpoint"):
            raise ValueError("--dtype applies to the diffusers and checkpoint formats only (a delta or LoRA keeps "
                             "the run's dtype)")
        stored_dtype = resolve_dtype(dtype, torch.device("cuda"))  # any dtype can be stored, whatever the device
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    refuse_links(run_dir)  # before anything of the run is read
    manifest = RunManifest.read(run_dir)
    if fmt == "checkpoint":
        refuse_checkpoint_kind(manifest.base_model_kind or "stable-diffusion")
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
        from ..bundle import load_bundle

        erased = load_bundle(str(run_dir), device="cpu")  # verifies checksum and base before anything is written
        base_source, backend = erased.base_source, erased.backend
        lora = checkpoint = checkpoint_config = None
        if fmt == "delta":
            copy_run_file(run_dir, DELTA, tmp / DELTA)
            copy_run_file(run_dir, MANIFEST, tmp / MANIFEST)
        elif fmt == "lora":
            erased = None  # the LoRA needs the base model only: one model in memory, not two
            lora = _export_lora(run_dir, manifest, base_source, lora_config, tmp, name, progress)
        elif fmt == "checkpoint":
            checkpoint = f"{name}{CHECKPOINT_SUFFIX}"
            written = write_checkpoint(erased, tmp / checkpoint, stored_dtype)
            checkpoint_config = written.name if written else None
        else:
            erased.backend.save_pipeline(erased, tmp, stored_dtype)
        sheet = _before_after_sheet(run_dir, manifest, erased, backend, tmp / SHEET, progress)
        _copy_evaluation(run_dir, tmp)
        (tmp / "README.md").write_text(model_card(manifest, run_dir, fmt, lora=lora, sheet=sheet,
                                                         checkpoint=checkpoint, checkpoint_config=checkpoint_config))
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


def _export_lora(run_dir: Path, manifest: RunManifest, base_source: str, config: LoraExportConfig, folder: Path,
                 name: str, progress=None) -> dict:
    """The LoRA files, factored layer by layer against the base UNet with the erased tensors read from
    the delta file one at a time: besides the base model, only one layer and the factors are held."""
    from ..bundle import load_bundle

    base = load_bundle(base_source, device="cpu", revision=manifest.base_revision)
    erased = SafetensorsValues(run_dir / (manifest.delta_file or DELTA))
    layer_progress = (lambda done, total: progress(done, total, "LoRA layers")) if progress else None
    with torch.no_grad():
        factors = lowrank_delta(base.unet, erased, config.rank, layer_progress)
    del base
    (folder / PEFT_FOLDER).mkdir()
    peft_path, kohya_path = folder / PEFT_FOLDER / PEFT_FILE, folder / kohya_file(name)
    save_file(factors.peft_state_dict(), str(peft_path), metadata={"format": "pt"})
    save_file(factors.kohya_state_dict(), str(kohya_path), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(factors.rank),
        "ss_network_alpha": str(factors.rank)})
    for weights in (peft_path, kohya_path):
        os.chmod(weights, 0o644)  # readable like the other files of the folder
    summary = {**lowrank_summary(factors), "peft_file": f"{PEFT_FOLDER}/{PEFT_FILE}", "kohya_file": kohya_path.name,
               "requested_rank": config.rank or FULL_RANK}
    write_json_atomic(folder / EXPORT_MANIFEST, {
        "kind": "age-explorer LoRA export", "lora": summary, "config": config.to_dict(),
        "run": {k: getattr(manifest, k) for k in ("method", "preset", "concepts", "seed", "steps_done", "base_model",
                                             "base_revision", "base_fingerprint", "delta_sha256")},
        "versions": environment_versions()})
    return summary


def _before_after_sheet(run_dir: Path, manifest: RunManifest, erased, backend, path: Path, progress=None) -> bool:
    """Copy the run's contact sheet, or draw one when the model is cheap to sample (its backend writes
    previews during erasure); False when there is none. ``erased``: the run's bundle, or None to load it."""
    if (run_dir / SHEET).is_file():
        copy_run_file(run_dir, SHEET, path)
        return True
    if not backend.preview_every:
        return False
    from ..bundle import load_bundle
    from ..imageio import contact_sheet
    from ..sampling import generate

    erased = erased or load_bundle(str(run_dir), device="cpu")
    images = (lambda done, total: progress(done, total, "contact sheet images")) if progress else None
    concept_set = erased.backend.concept_set()
    prompts = [concept_set.template.format(concept=c) if concept_set and c in concept_set.concepts else c
               for c in manifest.concepts]
    base = load_bundle(erased.base_source, device="cpu", revision=manifest.base_revision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptWarning)
        before, after = (generate(b, prompts, SHEET_SEEDS, progress=images) for b in (base, erased))
    n = len(SHEET_SEEDS)
    strips = [[images[i * n:(i + 1) * n] for images in (before, after)] for i in range(len(prompts))]
    contact_sheet(strips, prompts, ["before (base model)", "after (erased)"]).save(path)
    return True


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
