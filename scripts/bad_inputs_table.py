"""Run the CLI on bad inputs and print a markdown table of the message each one gets.

Usage: python scripts/bad_inputs_table.py WORK_DIR > docs/bad-inputs.md
WORK_DIR must hold a finished toy run in WORK_DIR/run (made by this script when missing).
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from age_explorer.core.cli import main  # noqa: E402


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    text = err.getvalue().replace("\r", "\n")
    lines = []
    for line in text.splitlines():
        starts = [line.find(tag) for tag in ("error:", "warning:") if tag in line]
        if starts and "torch_dtype" not in line:
            lines.append(line[min(starts):])
    return code, " / ".join(lines) or err.getvalue().strip().splitlines()[-1]


def main_table(work: Path) -> None:
    run_dir = work / "run"
    if not (run_dir / "delta.safetensors").exists():
        run(["erase", "--concept", "red circle", "--method", "uce", "--out", str(run_dir)])
    other = work / "other-base"
    other.mkdir(exist_ok=True)
    import json
    import shutil

    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["base_fingerprint"] = "0" * 64  # as if made on other toy weights
    (other / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy2(run_dir / "delta.safetensors", other / "delta.safetensors")
    truncated = work / "truncated"
    truncated.mkdir(exist_ok=True)
    (truncated / "manifest.json").write_text((run_dir / "manifest.json").read_text())
    (truncated / "delta.safetensors").write_bytes((run_dir / "delta.safetensors").read_bytes()[:500])
    cases = [
        ("unknown Hub id, offline", ["generate", "--model", "CompVis/stable-diffusion-v1-4", "--offline", "--prompt", "a church", "--out", str(work / "x")]),
        ("missing model folder", ["generate", "--model", "./no/such/folder", "--prompt", "a cat", "--out", str(work / "x")]),
        ("descending seed range", ["generate", "--prompt", "a red circle", "--seeds", "5-1", "--out", str(work / "x")]),
        ("empty prompt", ["generate", "--prompt", "", "--out", str(work / "x")]),
        ("word the toy model does not know", ["generate", "--prompt", "a zebra", "--seeds", "0", "--steps", "2", "--out", str(work / "x")]),
        ("CUDA requested without a GPU", ["generate", "--device", "cuda", "--prompt", "a red circle", "--out", str(work / "x")]),
        ("float16 on CPU", ["generate", "--device", "cpu", "--dtype", "float16", "--prompt", "a red circle", "--out", str(work / "x")]),
        ("unknown toy concept", ["erase", "--concept", "pink hexagon", "--out", str(work / "e1")]),
        ("negative lambda", ["erase", "--concept", "red circle", "--lambda", "-1", "--out", str(work / "e2")]),
        ("NaN learning rate", ["erase", "--concept", "red circle", "--lr", "nan", "--out", str(work / "e3")]),
        ("unknown parameter set", ["erase", "--concept", "red circle", "--param-set", "attn9", "--out", str(work / "e4")]),
        ("GPU preset on CPU", ["erase", "--concept", "red circle", "--preset", "imagenette", "--device", "cpu", "--out", str(work / "e5")]),
        ("all candidates excluded", ["erase", "--concept", "red circle", "--candidates", str(work / "cands.txt"), "--synonym", "blue square", "--out", str(work / "e6")]),
        ("run folder already used", ["erase", "--concept", "red circle", "--method", "uce", "--out", str(run_dir)]),
        ("resume without a checkpoint", ["erase", "--concept", "red circle", "--resume", "--out", str(work / "e7")]),
        ("export name with a path", ["export", str(run_dir), "--out", str(work / "exp"), "--name", "../evil"]),
        ("export over an existing one", ["export", str(run_dir), "--out", str(work / "exp"), "--name", "same"]),
        ("export of a missing run", ["export", str(work / "nope"), "--out", str(work / "exp")]),
        ("truncated delta", ["generate", "--model", str(truncated), "--prompt", "a red circle", "--out", str(work / "x")]),
        ("run folder made on other base weights", ["export", str(other), "--out", str(work / "exp")]),
        ("bad Hub repo id", ["export", str(run_dir), "--out", str(work / "exp"), "--name", "hub", "--force", "--push-to-hub", "../x"]),
        ("push without a token", ["export", str(run_dir), "--out", str(work / "exp"), "--name", "hub2", "--force", "--push-to-hub", "me/x"]),
        ("unknown job id", ["jobs", "--data-dir", str(work / "jobs"), "show", "nope"]),
        ("resume a job that is not interrupted", ["jobs", "--data-dir", str(work / "jobs"), "resume", "JOB"]),
    ]
    (work / "cands.txt").write_text("blue square\n")
    run(["export", str(run_dir), "--out", str(work / "exp"), "--name", "same", "--force"])
    os.environ.pop("HF_TOKEN", None)
    from age_explorer.core.app.jobs import JobStore

    job = JobStore(work / "jobs").submit("erase", {"method": "age", "options": {"concepts": ["red circle"]}})
    print("| bad input | command | exit | message |")
    print("|---|---|---|---|")
    for what, argv in cases:
        argv = [a.replace("JOB", job) for a in argv]
        code, message = run(argv)
        shown = " ".join(shlex.quote(a.replace(str(work), "W")) for a in argv)
        print(f"| {what} | `age-explorer {shown}` | {code} | {message.replace(str(work), 'W').replace('|', '/')} |")


if __name__ == "__main__":
    main_table(Path(sys.argv[1]))
