"""Send bad inputs to the CLI and the app, check each answer, and write the table of docs/bad-inputs.md.

Usage: python -m tests.bad_inputs_table [--out docs/bad-inputs.md] [--work DIR] [--jobs 3]

CLI rows run ``python -m age_explorer.core.app.cli ...`` as a real subprocess in a work folder (a temporary
one unless --work is given). Each row records the exit code and the last line of stderr, and checks:

- one line: exactly one line of error output (progress bars aside), nothing printed after it, no
  "Traceback", at most MAX_MESSAGE characters;
- nothing written: a listing (name, kind, SHA-1 of content) of the folders the command was told to write
  to, taken before and after, is unchanged, except for the files a row exists to write.

App rows start one real server (build_app on the toy model, a temporary data folder, a free 127.0.0.1
port) and call its API with gradio_client. Each row records the error message the client raises (or the
answer when there is none), and checks: one line (no newline, no traceback text, not Gradio's generic
"upstream app has raised an exception", at most MAX_MESSAGE characters), and that the server still
answers (/list_graphs right after) with no new job and no new export left behind by a refusal.

Every row is an observation of this run; a row that misses a check says "no" and why.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MESSAGE = 600  # characters: longer is not "one clear line" (e.g. a refusal that repeats 10k characters)
TINY = ["--seeds", "0", "--steps", "2"]  # generate rows that get past validation stay quick
PROGRESS = re.compile(r"(?:[\w .-]*:\s*)?\d+%\|[^|]*\|\s*[\d.?]+[kMG]?/[\d.?]+[kMG]?\s*\[[^\]]*\]")  # a tqdm bar
GENERIC = "upstream Gradio app has raised an exception"
LONG_PROMPT = "a " + "red circle " * 910  # 10,012 characters


def unused_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


# ---- file listings ------------------------------------------------------------------------------
def listing(work: Path, watch: list[str]) -> dict[str, str]:
    """{path relative to work: 'dir' or the file's SHA-1} of the watched paths, recursively."""
    found = {}
    for rel in watch:
        top = work / rel
        if not (top.exists() or top.is_symlink()):
            continue
        items = [top] + (sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])
        for path in items:
            key = str(path.relative_to(work))
            if path.is_dir() and not path.is_symlink():
                found[key] = "dir"
            else:
                try:
                    found[key] = hashlib.sha1(path.read_bytes()).hexdigest()
                except OSError as err:
                    found[key] = f"unreadable {type(err).__name__}"
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# ---- CLI rows -----------------------------------------------------------------------------------
@dataclass
class CliCase:
    what: str  # the bad input, in words
    argv: list[str]  # after `age-explorer`; W/ means the work folder
    watch: list[str] = field(default_factory=list)  # folders the command is told to write to (relative to W)
    writes: list[str] = field(default_factory=list)  # fnmatch patterns of what it may write (writing is the point)
    writes_note: str = ""  # what those writes are, for the table
    env: dict = field(default_factory=dict)  # extra environment; a None value removes the variable
    expect: str = "error"  # 'error': a refusal; 'warning': a warning, then the work; 'ok': the work
    timeout: float = 180.0


@dataclass
class Row:
    surface: str
    what: str
    command: str
    code: str
    message: str
    one_line: str
    checked: str
    seconds: float = 0.0


def split_stderr(text: str) -> tuple[list[str], set[int], bool]:
    """The message lines of stderr (progress bars taken out, also from inside a line), the indexes of
    those that shared a line with a progress bar, and whether the output ends with a progress bar.
    Carriage returns end lines too, as a terminal shows them."""
    messages, glued, ends_with_bar = [], set(), False
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # terminal escapes (tqdm moves the cursor up)
    for line in re.split(r"[\r\n]+", text):
        if not line.strip():
            continue
        bars = PROGRESS.findall(line)
        rest = PROGRESS.sub("", line).strip()
        if rest:
            if bars:
                glued.add(len(messages))
            messages.append(rest)
        ends_with_bar = bool(bars) and not PROGRESS.split(line)[-1].strip()
    return messages, glued, ends_with_bar


def judge_cli(code: int, stderr: str, expect: str = "error") -> tuple[str, str]:
    """(message, one-line verdict) of a command's stderr. ``expect``: 'error' (a refusal), 'warning' (a
    warning, then the work) or 'ok' (the work itself, no message needed)."""
    messages, glued, ends_with_bar = split_stderr(stderr)
    if not messages:
        if expect == "ok" and code == 0:
            return "", "n/a"
        return "(nothing on stderr)", "no (silent)" if code else "no (no message)"
    pick = len(messages) - 1
    if expect == "warning":
        pick = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].startswith("warning:")), pick)
    message = messages[pick]
    problems = []
    if "Traceback" in stderr:
        problems.append("traceback")
    if len(messages) > 1:
        other = next(m for i, m in enumerate(messages) if i != pick)
        problems.append(f"{len(messages)} lines, also: {other[:60]}{'…' if len(other) > 60 else ''}")
    if pick in glued:
        problems.append("on the same line as a progress bar")
    if expect != "warning" and ends_with_bar:
        problems.append("a progress bar printed after it")
    if len(message) > MAX_MESSAGE:
        problems.append(f"{len(message):,} characters")
    return message, "yes" if not problems else "no (" + "; ".join(problems) + ")"


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
                "TQDM_MININTERVAL": "0"})
    env.pop("HF_TOKEN", None)
    env.pop("AGE_EXPLORER_DATA_DIR", None)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def expand(arg: str, work: Path) -> str:
    return str(work) + arg[1:] if arg == "W" or arg.startswith("W/") else arg


def run_cli(case: CliCase, work: Path) -> Row:
    """Run one CLI row as a subprocess in ``work`` and judge it."""
    argv = [expand(a, work) for a in case.argv]
    before = listing(work, case.watch)
    start = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "age_explorer.core.app.cli", *argv], cwd=work, env=cli_env(case.env),
                              capture_output=True, text=True, timeout=case.timeout)
        code, stderr = str(done.returncode), done.stderr
        message, one_line = judge_cli(done.returncode, stderr, case.expect)
        if done.returncode == 0 and done.stdout.strip():
            message = (message + " ⏎ " if message else "") + f"(stdout: {done.stdout.strip().splitlines()[-1]})"
    except subprocess.TimeoutExpired:
        code, message, one_line = "timeout", f"still running after {case.timeout:.0f} s", "no (timeout)"
    changed = changes(before, listing(work, case.watch))
    unexpected = [c for c in changed if not any(fnmatch.fnmatch(c, p) for p in case.writes)]
    if unexpected:
        checked = "no (wrote " + ", ".join(f"W/{c}" for c in unexpected[:3]) + (" …" if len(unexpected) > 3 else "") + ")"
    elif case.writes and changed:
        checked = f"yes (wrote only {case.writes_note})"
    else:
        checked = "yes"
    command = "age-explorer " + " ".join(shlex.quote(short(a, 40)) for a in case.argv)
    return Row("CLI", case.what, command, code, message.replace(str(work), "W"), one_line, checked, time.time() - start)


def cli_cases(hub: str) -> list[CliCase]:
    """The CLI rows. W/run is a finished toy UCE run; the other W/ inputs are made by make_fixtures.
    ``hub``: an HF_ENDPOINT where nothing listens."""
    gen = lambda *a, out="W/gen": ["generate", *a, "--out", out]  # noqa: E731
    ers = lambda *a, out="W/er": ["erase", "--concept", "red circle", *a, "--out", out]  # noqa: E731
    unreachable = {"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": None}
    cases = [
        # seeds, steps, guidance, prompts (generate)
        CliCase("seed range 0-30000000", gen("--prompt", "a red circle", "--seeds", "0-30000000"), ["gen"]),
        CliCase("seed range 0-1000000000", gen("--prompt", "a red circle", "--seeds", "0-1000000000"), ["gen"]),
        CliCase("seed range 0-100000", gen("--prompt", "a red circle", "--seeds", "0-100000"), ["gen"]),
        CliCase("seed 2**64", gen("--prompt", "a red circle", "--seeds", str(2**64)), ["gen"]),
        CliCase("descending seed range", gen("--prompt", "a red circle", "--seeds", "5-1"), ["gen"]),
        CliCase("seeds that are not numbers", gen("--prompt", "a red circle", "--seeds", "abc"), ["gen"]),
        CliCase("--steps 0", gen("--prompt", "a red circle", "--seeds", "0", "--steps", "0"), ["gen"]),
        CliCase("--steps 1000000", gen("--prompt", "a red circle", "--seeds", "0", "--steps", "1000000"), ["gen"]),
        CliCase("guidance NaN", gen("--prompt", "a red circle", *TINY, "--guidance", "nan"), ["gen"]),
        CliCase("guidance 1e308", gen("--prompt", "a red circle", *TINY, "--guidance", "1e308"), ["gen"]),
        CliCase("empty prompt", gen("--prompt", "", *TINY), ["gen"]),
        CliCase("10,000-character prompt (warned, then generated)", gen("--prompt", LONG_PROMPT, *TINY, out="W/gen-long"),
                ["gen-long"], ["gen-long*"], "its image", expect="warning"),
        CliCase("word the toy model does not know (warned, then generated)",
                gen("--prompt", "a zebra", *TINY, out="W/gen-zebra"), ["gen-zebra"], ["gen-zebra*"], "its image",
                expect="warning"),
        CliCase("CUDA requested without a GPU", gen("--prompt", "a red circle", "--device", "cuda"), ["gen"]),
        CliCase("float16 on CPU", gen("--prompt", "a red circle", "--device", "cpu", "--dtype", "float16"), ["gen"]),
        # model folders
        CliCase("missing model folder", gen("--model", "./no/such/folder", "--prompt", "a cat"), ["gen"]),
        CliCase("Hub id not in the cache, --offline",
                gen("--model", "CompVis/stable-diffusion-v1-4", "--offline", "--prompt", "a church"), ["gen"]),
        CliCase("garbage model_index.json", gen("--model", "W/garbage-index", "--prompt", "a cat"), ["gen", "garbage-index"]),
        CliCase("truncated UNet weights", gen("--model", "W/truncated-unet", "--prompt", "a cat"), ["gen", "truncated-unet"]),
        CliCase("run folder whose manifest is not JSON", gen("--model", "W/bad-manifest", "--prompt", "a red circle"),
                ["gen", "bad-manifest"]),
        CliCase("truncated delta.safetensors", gen("--model", "W/truncated-delta", "--prompt", "a red circle"),
                ["gen", "truncated-delta"]),
        CliCase("empty folder as the model", gen("--model", "W/empty", "--prompt", "a red circle"), ["gen", "empty"]),
        # erase: bounds and checks
        CliCase("--iterations 10**12", ers("--iterations", str(10**12)), ["er"]),
        CliCase("--iterations abc", ers("--iterations", "abc"), ["er"]),
        CliCase("--iterations 0 (ESD)", ers("--method", "esd", "--iterations", "0"), ["er"]),
        CliCase("10,000-character concept", ["erase", "--concept", "x" * 10_000, "--out", "W/er"], ["er"]),
        CliCase("unknown toy concept", ["erase", "--concept", "pink hexagon", "--out", "W/er"], ["er"]),
        CliCase("ESD target 'zebra 🦓' on the toy model", ers("--method", "esd", "--target", "zebra 🦓", "--iterations", "2"), ["er"]),
        CliCase("UCE target 'a zebra' on the toy model", ers("--method", "uce", "--target", "a zebra"), ["er"]),
        CliCase("--lr 1e30 (ESD, diverges)", ers("--method", "esd", "--iterations", "3", "--lr", "1e30"), ["er"]),
        CliCase("--lr nan", ers("--lr", "nan"), ["er"]),
        CliCase("--lambda -1", ers("--lambda", "-1"), ["er"]),
        CliCase("--eta nan (ESD)", ers("--method", "esd", "--eta", "nan"), ["er"]),
        CliCase("--eta 1e308 (ESD)", ers("--method", "esd", "--eta", "1e308"), ["er"]),
        CliCase("unknown parameter set", ers("--param-set", "attn9"), ["er"]),
        CliCase("GPU preset on CPU", ers("--preset", "imagenette", "--device", "cpu"), ["er"]),
        CliCase("all AGE candidates excluded", ers("--candidates", "W/cands.txt", "--synonym", "blue square"), ["er"]),
        CliCase("--resume without a checkpoint", ers("--resume", out="W/er-resume"), ["er-resume"]),
        CliCase("a second erase with the same --out as a finished run", ers("--method", "uce", out="W/run"), ["run"]),
        CliCase("erase --force into a folder of user files", ers("--method", "uce", "--force", out="W/userfiles"),
                ["userfiles"]),
        CliCase("empty --candidates file", ers("--candidates", "W/empty-cands.txt"), ["er"]),
        CliCase("run whose delta is all NaN, with a matching checksum", gen("--model", "W/nan-delta", "--prompt", "a red circle"),
                ["gen", "nan-delta"]),
        CliCase("toyworld train with a concepts.json holding []",
                ["toyworld", "train", "--concepts", "W/empty-list.json", "--out", "W/toy-out"], ["toy-out"]),
        # export and push
        CliCase("export of a missing run", ["export", "W/nope", "--out", "W/exp-missing"], ["exp-missing"]),
        CliCase("export over an existing export", ["export", "W/run", "--out", "W/exp-existing"], ["exp-existing"]),
        CliCase("export --force next to user files", ["export", "W/run", "--out", "W/userdir", "--force"], ["userdir"],
                ["userdir", "userdir/delta.safetensors", "userdir/manifest.json", "userdir/README.md",
                 "userdir/before_after.png"],
                "its 4 files; notes.txt and data/ kept", expect="ok"),
        CliCase("export of a run made on other base weights", ["export", "W/other-base", "--out", "W/exp-other"],
                ["exp-other"]),
        CliCase("export of a run whose manifest is not JSON", ["export", "W/bad-manifest", "--out", "W/exp-bad"],
                ["exp-bad"]),
        CliCase("export of a run whose manifest's targets is a string",
                ["export", "W/targets-string", "--out", "W/exp-targets"], ["exp-targets"]),
        CliCase("push to a bad Hub repo id", ["export", "W/run", "--out", "W/exp-repo", "--push-to-hub", "../x"],
                ["exp-repo"], ["exp-repo*"], "the export"),
        CliCase("push without a token", ["export", "W/run", "--out", "W/exp-notoken", "--push-to-hub", "me/x"],
                ["exp-notoken"], ["exp-notoken*"], "the export"),
        CliCase("push to an unreachable Hub (HF_ENDPOINT on a closed port)",
                ["export", "W/run", "--out", "W/exp-hub", "--push-to-hub", "me/x", "--token", "hf_x"], ["exp-hub"],
                ["exp-hub*"], "the export", env=unreachable),
        # job store, graphs
        CliCase("garbage jobs.sqlite3", ["jobs", "--data-dir", "W/garbage-jobs", "list"], ["garbage-jobs"]),
        CliCase("unknown job id", ["jobs", "--data-dir", "W/jobs", "show", "nope"], ["jobs"]),
        CliCase("cancel an unknown job", ["jobs", "--data-dir", "W/jobs", "cancel", "nope"], ["jobs"]),
        CliCase("resume a queued job", ["jobs", "--data-dir", "W/jobs", "resume", "QUEUED"], ["jobs"]),
        # a data folder of their own: other rows open W/jobs meanwhile
        CliCase("jobs submit-erase of an unknown concept", ["jobs", "--data-dir", "W/jobs-submit", "submit-erase",
                                                            "--concept", "pink hexagon"], ["jobs-submit"]),
        CliCase("jobs submit-erase with an unknown preset", ["jobs", "--data-dir", "W/jobs-submit", "submit-erase",
                                                             "--concept", "red circle", "--preset", "nope"], ["jobs-submit"]),
        CliCase("jobs submit-erase --iterations -5", ["jobs", "--data-dir", "W/jobs-submit", "submit-erase", "--concept",
                                                      "red circle", "--iterations", "-5"], ["jobs-submit"]),
        CliCase("jobs list with one damaged job row (warned, the others listed)",
                ["jobs", "--data-dir", "W/jobs-damaged", "list"], ["jobs-damaged"], expect="warning"),
        CliCase("graph whose classifier cannot be loaded (no half-written graph folder)",
                ["graph", "--model", "toy", "--method", "esd", "--evaluator", "hf:nonexistent/model",
                 "--images-per-concept", "2", "--out", "W/graph-fail"], ["graph-fail"]),
        CliCase("analyse a graph with a corrupt edges.csv", ["analyse", "W/graph-bad-edges", "--no-similarity"],
                ["graph-bad-edges"]),
        CliCase("analyse a graph with a corrupt graph.json", ["analyse", "W/graph-bad-json", "--no-similarity"],
                ["graph-bad-json"]),
        CliCase("analyse a missing graph folder", ["analyse", "W/no-graph", "--no-similarity"], ["no-graph"]),
    ]
    for i, case in enumerate(cases, 1):  # rows run at once: each its own output folder
        case.argv = [f"{a}-{i}" if a in ("W/gen", "W/er") else a for a in case.argv]
        case.watch = [f"{w}-{i}" if w in ("gen", "er") else w for w in case.watch]
    return cases


def make_fixtures(work: Path, log=print) -> dict:
    """The inputs the CLI rows point at. Returns {'queued_job': id}."""
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    if not (run / "delta.safetensors").exists():
        log("making the toy UCE run W/run")
        subprocess.run([sys.executable, "-m", "age_explorer.core.app.cli", "erase", "--model", "toy", "--concept", "red circle",
                        "--method", "uce", "--out", str(run)], cwd=work, env=cli_env(), check=True, capture_output=True)
    manifest = json.loads((run / "manifest.json").read_text())
    for name in ("other-base", "truncated-delta", "bad-manifest", "targets-string"):
        (work / name).mkdir(exist_ok=True)
        shutil.copy2(run / "delta.safetensors", work / name / "delta.safetensors")
        (work / name / "manifest.json").write_text(json.dumps(manifest))
    (work / "other-base" / "manifest.json").write_text(json.dumps({**manifest, "base_fingerprint": "0" * 64}))
    (work / "truncated-delta" / "delta.safetensors").write_bytes((run / "delta.safetensors").read_bytes()[:500])
    (work / "bad-manifest" / "manifest.json").write_text("this is not JSON {")
    (work / "targets-string" / "manifest.json").write_text(json.dumps({**manifest, "targets": "red circle"}))
    (work / "empty").mkdir(exist_ok=True)
    (work / "garbage-index").mkdir(exist_ok=True)
    (work / "garbage-index" / "model_index.json").write_text("garbage")
    (work / "cands.txt").write_text("blue square\n")
    (work / "empty-cands.txt").write_text("\n  \n")
    (work / "empty-list.json").write_text("[]")
    nan_run = work / "nan-delta"
    nan_run.mkdir(exist_ok=True)
    import torch
    from safetensors.torch import load_file, save_file

    from age_explorer.core.files import file_sha256

    delta = load_file(str(run / "delta.safetensors"))
    save_file({name: torch.full_like(t, float("nan")) for name, t in delta.items()}, str(nan_run / "delta.safetensors"))
    (nan_run / "manifest.json").write_text(json.dumps({**manifest, "delta_sha256": file_sha256(nan_run / "delta.safetensors")}))
    (work / "userfiles").mkdir(exist_ok=True)
    (work / "userfiles" / "thesis.tex").write_text("my thesis\n")
    (work / "userdir" / "data").mkdir(parents=True, exist_ok=True)
    (work / "userdir" / "notes.txt").write_text("keep me\n")
    (work / "userdir" / "data" / "table.csv").write_text("a,b\n1,2\n")
    (work / "exp-existing").mkdir(exist_ok=True)
    (work / "exp-existing" / "README.md").write_text("an earlier export\n")
    (work / "garbage-jobs").mkdir(exist_ok=True)
    (work / "garbage-jobs" / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    from age_explorer.core.paths import assets_dir

    for name, damaged, content in (("graph-bad-edges", "edges.csv", b"\x00\xff,\n\"unclosed"),
                                   ("graph-bad-json", "graph.json", b"{not json")):
        if not (work / name).exists():
            shutil.copytree(assets_dir() / "graphs" / "toy-esd", work / name)
        (work / name / damaged).write_bytes(content)
    if not (work / "truncated-unet").exists():
        log("making a tiny diffusers pipeline with truncated UNet weights")
        from tests.tiny_models import build_tiny_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_pipeline(Path(tmp)).save_pretrained(work / "truncated-unet")
        weights = next((work / "truncated-unet" / "unet").glob("diffusion_pytorch_model*"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    from age_explorer.core.app.job_store import JobStore

    damaged = JobStore(work / "jobs-damaged")
    if not damaged.list():
        for concept in ("red circle", "blue circle"):
            damaged.submit("erase", {"model": "toy", "method": "age", "preset": "toy", "options": {"concepts": [concept]}})
        import sqlite3

        with contextlib.closing(sqlite3.connect(damaged.path)) as db, db:  # one row's config is no longer JSON
            db.execute("UPDATE jobs SET config = '{broken' WHERE seq = (SELECT MIN(seq) FROM jobs)")
    store = JobStore(work / "jobs")
    queued = [j.id for j in store.list(status="queued")]
    job = queued[0] if queued else store.submit("erase", {"model": "toy", "method": "age", "preset": "toy",
                                                         "options": {"concepts": ["red circle"]}})
    return {"queued_job": job}


def bind_cases(cases: list[CliCase], fixtures: dict) -> list[CliCase]:
    for case in cases:
        case.argv = [fixtures["queued_job"] if a == "QUEUED" else a for a in case.argv]
    return cases


def run_cli_cases(cases: list[CliCase], work: Path, jobs: int = 3) -> list[Row]:
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: run_cli(c, work), cases))


# ---- app.py start-up rows (a subprocess each) -----------------------------------------------------
def app_py_row(what: str, data_arg: str, work: Path, watch: list[str], timeout: float = 150.0) -> Row:
    port, start = unused_port(), time.time()
    before = listing(work, watch)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--data-dir", expand(data_arg, work), "--port", str(port)],
                            cwd=work, env=cli_env({"AGE_EXPLORER_DEVICE": "cpu"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        code = str(proc.returncode)
        message, one_line = judge_cli(proc.returncode, stderr)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        code, message, one_line = "started", "(served; stopped by the script)", "n/a"
    changed = changes(before, listing(work, watch))
    checked = "yes" if not changed else "no (wrote " + ", ".join(f"W/{c}" for c in changed[:3]) + ")"
    return Row("app", what, f"python app.py --data-dir {data_arg}", code, message.replace(str(work), "W"), one_line, checked,
               time.time() - start)


# ---- app rows (one server, gradio_client) ----------------------------------------------------------
def judge_app_message(message: str) -> str:
    problems = []
    if "\n" in message.strip():
        problems.append(f"{len(message.strip().splitlines())} lines")
    if "Traceback" in message or 'File "' in message:
        problems.append("traceback text")
    if GENERIC in message:
        problems.append("Gradio's generic message")
    if len(message) > MAX_MESSAGE:
        problems.append(f"{len(message):,} characters")
    return "yes" if not problems else "no (" + ", ".join(problems) + ")"


def job_logs(job) -> list[str]:
    """The gr.Warning / gr.Info messages a gradio_client job received ('warning: …'). gradio_client keeps
    them only in its queue of status updates, so this reads that queue."""
    updates = getattr(getattr(job, "communicator", None), "updates", None)
    items = list(getattr(updates, "_queue", None) or getattr(updates, "queue", None) or [])
    return [f"{u.log[1]}: {u.log[0]}" for u in items if getattr(u, "log", None)]


class AppProbe:
    """One explorer server on the toy model, and the calls the app rows make."""

    def __init__(self, data_dir: Path, hub: str):
        self.data_dir = data_dir
        self.work = str(data_dir.parent)  # shown as W
        self.hub = hub
        self.rows: list[Row] = []

    @contextlib.contextmanager
    def serve(self):
        from gradio_client import Client

        from age_explorer.explorer.app import Settings, build_app

        demo = build_app(Settings(model="toy", device="cpu", data_dir=str(self.data_dir), spillover_images=2))
        port = unused_port()
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        self.demo, self.url = demo, f"http://127.0.0.1:{port}/"
        self.client = Client(self.url, verbose=False)
        try:
            yield self
        finally:
            demo.close()
            if demo.explorer.worker:
                demo.explorer.worker.stop(10)

    def new_client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def _state(self) -> tuple[int, list[str]]:
        exports = self.data_dir / "exports"
        return len(self.demo.explorer.store.list()), sorted(str(p.relative_to(exports)) for p in exports.rglob("*")) \
            if exports.exists() else []

    def _answers(self) -> bool:
        try:
            return bool(self.client.predict(api_name="/list_graphs"))
        except Exception:  # noqa: BLE001  any failure: it does not answer
            return False

    def call(self, what: str, api: str, *args, client=None, shown: str | None = None, may_write: str = "",
             describe=None) -> object:
        """Call an endpoint; record its error (or answer) and whether the server still answers."""
        client = client or self.client
        before = self._state()
        result, code = None, "error"
        job = client.submit(*args, api_name=api)
        try:
            result = job.result()
            code = "ok"
            message = describe(result) if describe else short(str(result), 120)
            logs = job_logs(job)  # gr.Warning / gr.Info: toasts on the page
            one_line = judge_app_message(logs[-1]) if logs else "n/a"
            message = " ⏎ ".join(logs + [message])
        except Exception as err:  # noqa: BLE001  the client raises the server's message
            message = str(err)
            one_line = judge_app_message(message)
        after = self._state()
        answers = self._answers()
        new = []
        if after[0] != before[0] and may_write != "job":
            new.append(f"{after[0] - before[0]} new job(s)")
        if after[1] != before[1] and may_write != "export":
            new.append("new export files")
        checked = ("yes" if answers else "no (does not answer)") + (f"; but {', '.join(new)}" if new else "")
        if may_write and code == "ok":
            checked += f" (wrote only its {may_write})"
        args_text = shown if shown is not None else ", ".join(short(repr(a), 40) for a in args)
        self.rows.append(Row("app", what, f"{api}({args_text})", code, short(message.strip().replace("\n", " ⏎ ").replace(self.work, "W"), 300),
                             one_line, checked))
        return result

    def raw_call(self, what: str, api: str, data: list, shown: str) -> None:
        """POST to /gradio_api/call/<api> with a payload of our own (State slots included) and read the event."""
        import httpx

        before = self._state()
        name = api.strip("/")
        with httpx.Client(timeout=60) as http:  # json.dumps writes NaN as JSON's common extension does
            event = http.post(f"{self.url}gradio_api/call/{name}", content=json.dumps({"data": data}),
                              headers={"Content-Type": "application/json"}).json()["event_id"]
            text = http.get(f"{self.url}gradio_api/call/{name}/{event}").text
        kind = re.findall(r"^event: (\w+)", text, re.M)[-1]
        payload = re.findall(r"^data: (.*)$", text, re.M)[-1]
        try:
            value = json.loads(payload)
        except json.JSONDecodeError:
            value = payload
        if isinstance(value, dict):
            value = value.get("error") or value.get("message") or value
        message = value if isinstance(value, str) else json.dumps(value)
        after = self._state()
        checked = ("yes" if self._answers() else "no (does not answer)") + ("; but files or jobs changed" if after != before else "")
        self.rows.append(Row("app", what, f"POST /gradio_api/call/{name} {shown}", "error" if kind == "error" else kind,
                             short(message.replace(self.work, "W"), 300), judge_app_message(message) if kind == "error" else "n/a",
                             checked))

    def wait_job(self, job_id: str, limit: float = 240) -> dict:
        deadline = time.time() + limit
        while True:
            status = json.loads(self.client.predict(job_id, api_name="/job_status"))
            if status["status"] in ("done", "failed", "cancelled") or time.time() > deadline:
                return status
            time.sleep(0.5)

    def run_rows(self) -> list[Row]:
        def start(what, chosen=("red circle",), free="", method="age", preset="toy", iterations=5, lam=1.0, target="",
                  vocab="(preset)", candidates="", shown=None):
            args = (list(chosen), free, method, preset, iterations, lam, "gumbel", target, vocab, candidates)
            return self.call(what, "/start_erase", *args, shown=shown)

        graphs = self.demo.explorer.warnings
        self.rows.append(Row("app", "start-up with a corrupt edges.csv / nodes.csv / graph.json in DATA/graphs",
                             "build_app + launch", "started", short(" / ".join(graphs).replace(self.work, "W"), 400) or "(no warning)",
                             "yes" if len(graphs) == 3 and all(len(w) < MAX_MESSAGE and "\n" not in w for w in graphs) else "no",
                             "yes" if self._answers() else "no (does not answer)"))
        # generate
        for seeds in ("0-30000000", "0-1000000000", str(2**64), "5-1", "abc"):
            self.call(f"seeds {seeds!r}", "/generate", "a red circle", seeds, "original")
        self.call("empty prompt", "/generate", "", "0", "original")
        self.call("10,000-character prompt", "/generate", LONG_PROMPT, "0", "original",
                  shown=f"'a red circle red circle …' ({len(LONG_PROMPT):,} characters), '0', 'original'",
                  describe=lambda r: f"{len(r)} image(s)")
        self.call("model that is not a finished run", "/generate", "a red circle", "0", "../../etc")
        # erase
        start("iterations 10**12", iterations=10**12)
        start("iterations 'abc'", iterations="abc")
        erase_data = lambda **kw: [kw.get("chosen", ["red circle"]), "", "age", "toy", kw.get("iterations", 5),  # noqa: E731
                                   kw.get("lam", 1.0), "gumbel", "", "(preset)", "", ""]  # the last: the owner State
        self.raw_call("iterations NaN (JSON NaN)", "/start_erase", erase_data(iterations=float("nan")),
                      "{data: [['red circle'], …, iterations NaN, …]}")
        self.raw_call("iterations Infinity (JSON Infinity)", "/start_erase", erase_data(iterations=float("inf")),
                      "{data: [['red circle'], …, iterations Infinity, …]}")
        start("10,000-character concept", chosen=[], free="x" * 10_000, shown="[], 'xxxx…' (10,000 characters), …")
        start("concept not in the toy model", chosen=["pink hexagon"])
        start("no concept", chosen=[])
        start("ESD target 'zebra 🦓' on the toy model", method="esd", preset="toy-esd", target="zebra 🦓")
        start("GPU preset on CPU", preset="imagenette")
        start("λ = -1", lam=-1.0)
        self.raw_call("λ = NaN (JSON NaN)", "/start_erase", erase_data(lam=float("nan")), "{data: [['red circle'], …, λ NaN, …]}")
        self.raw_call("seeds as a list (JSON [2**64])", "/generate", ["a red circle", [2**64], "original", ""],
                      "{data: ['a red circle', [18446744073709551616], 'original']}")
        start("own AGE candidate the toy does not know", candidates="blue circle, spaceship")
        start("vocabulary the toy model does not have", vocab="en3k")
        start("method that does not exist", method="sd-hack")
        # jobs
        self.call("unknown job id", "/job_status", "nope")
        self.call("job id of 10,000 characters", "/job_status", "j" * 10_000, shown="'jjjj…' (10,000 characters)")
        self.call("cancel with no job in the session", "/cancel")
        self.call("resume with no job in the session", "/resume")
        # UCE from the app, then the run-based endpoints
        before = len(self.demo.explorer.store.list())
        job = self.call("UCE from the app (was: unknown uce option checkpoint_every)", "/start_erase",
                        ["blue circle"], "", "uce", "toy-uce", None, 1.0, "gumbel", "", "(preset)", "",
                        may_write="job", describe=lambda r: "queued")
        if job:
            status = self.wait_job(job[0])
            row = self.rows[-1]
            row.message = f"job {status['status']}" + (f": {status['error']}" if status.get("error") else "")
            made = len(self.demo.explorer.store.list()) - before
            if made != 1:
                row.checked = f"no ({made} jobs made)"
        runs, _ = self.client.predict(api_name="/runs")
        label = runs["value"]
        self.call("unknown run", "/before_after", "nope", "0-1")
        self.call("seeds 0-1000000000 on a run", "/before_after", label, "0-1000000000", shown="RUN, '0-1000000000'")
        self.call("spillover of an unknown run", "/spillover", "nope")
        self.call("export of an unknown run", "/export", "nope", "delta")
        self.call("export format that does not exist", "/export", label, "zip", shown="RUN, 'zip'")
        # push
        visitor = self.new_client()
        self.call("push from a session that exported nothing", "/push", "attacker/loot", "hf_visitor", client=visitor)
        secret = self.data_dir.parent / "outside" / "id_rsa"
        secret.parent.mkdir(exist_ok=True)
        secret.write_text("private key\n")
        self.raw_call("push of a foreign folder sent in the request", "/push",
                      [[str(secret.parent)], "attacker/loot", "hf_visitor"], "{data: [['W/outside'], 'attacker/loot', 'hf_visitor']}")
        owner = self.new_client()
        owner.predict(api_name="/runs")  # the page's "Refresh runs": the session's run choices
        self.call("export twice (each gets its own folder)", "/export", label, "delta", client=owner, shown="RUN, 'delta'",
                  may_write="export", describe=lambda r: "exported to " + Path(r[1]).name)
        first = self.rows[-1].message
        self.call("export twice (each gets its own folder)", "/export", label, "delta", client=owner, shown="RUN, 'delta'",
                  may_write="export", describe=lambda r: "exported to " + Path(r[1]).name)
        self.rows[-1].message = f"{first}; then {self.rows[-1].message}"
        self.rows.pop(-2)
        self.call("push with an empty token (server token not lent)", "/push", "me/model", "", client=owner)
        self.call("push to a bad repo id", "/push", "../x", "hf_x", client=owner)
        self.call("push to an unreachable Hub (HF_ENDPOINT on a closed port)", "/push", "me/model", "hf_x", client=owner)
        # read-only queries
        self.call("unknown graph", "/list_concepts", "nope")
        self.call("spillover of an unknown concept", "/concept_spillover", "pink hexagon", "")
        self.call("nearest concepts, k = -1", "/nearest_concepts", "red circle", -1, "")
        self.call("nearest concepts, k = 10**12", "/nearest_concepts", "red circle", 10**12, "",
                  describe=lambda r: f"{len(r)} concepts")
        self.raw_call("nearest concepts, k = Infinity (JSON Infinity)", "/nearest_concepts",
                      ["red circle", float("inf"), ""], "{data: ['red circle', Infinity, '']}")
        self.raw_call("nearest concepts, k = NaN (JSON NaN)", "/nearest_concepts", ["red circle", float("nan"), ""],
                      "{data: ['red circle', NaN, '']}")
        self.call("nearest concepts, k = 'abc'", "/nearest_concepts", "red circle", "abc", "")
        self.call("select a concept with the edge threshold 'abc'", "/select_concept", "toy-esd (shipped)", "abc", "shape",
                  "red circle")
        self.call("select a graph that does not exist", "/select_concept", "nope", 0.3, "shape", "red circle")
        self.call("UMAP of a graph that does not exist", "/umap", "nope", "red circle")
        self.call("similarity of a graph that does not exist", "/similarity", "nope", "text_l2")
        return self.rows


def app_data_dir(data: Path) -> None:
    """A data folder whose graphs folder holds three damaged graphs (the shipped ones still load)."""
    from age_explorer.core.paths import assets_dir

    for name, damaged, content in (("bad-edges", "edges.csv", b"\x00\xff,\n\"unclosed"), ("bad-nodes", "nodes.csv", b"nope\n1\n"),
                                   ("bad-json", "graph.json", b"{not json")):
        shutil.copytree(assets_dir() / "graphs" / "toy-esd", data / "graphs" / name)
        (data / "graphs" / name / damaged).write_bytes(content)


# ---- the table --------------------------------------------------------------------------------------
def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    lines = ["| # | surface | input | command or call | exit code | message | one line | still answers / nothing written |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | {row.surface} | {cell(row.what)} | `{cell(row.command)}` | {row.code} | {cell(row.message)} "
                     f"| {row.one_line} | {row.checked} |")
    return "\n".join(lines)


def is_miss(row: Row) -> bool:
    return row.one_line.startswith("no") or row.checked.startswith("no") or "; but" in row.checked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the page here (default: print it)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=3, help="CLI rows run at once")
    parser.add_argument("--only", choices=["cli", "app"], default=None, help="one surface only (while working on it)")
    args = parser.parse_args()
    start = time.time()
    hub = f"http://127.0.0.1:{unused_port()}"
    # this process serves the app: no Hub, but not "offline", so that a push meets an unreachable Hub
    os.environ.update({"HF_ENDPOINT": hub, "GRADIO_ANALYTICS_ENABLED": "False"})
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("HF_TOKEN", None)
    log = lambda m: print(f"[{time.time() - start:5.0f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bad-inputs-")))
        work.mkdir(parents=True, exist_ok=True)
        work = work.resolve()
        fixtures = make_fixtures(work, log)
        cases = bind_cases(cli_cases(hub), fixtures)
        (work / "app-data-junk").mkdir(exist_ok=True)
        (work / "app-data-junk" / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
        (work / "a-file").write_text("a file, not a folder\n")
        cases = cases if args.only != "app" else []
        log(f"{len(cases)} CLI rows, {args.jobs} at a time, beside the app rows")
        with ThreadPoolExecutor(args.jobs) as pool:
            cli_rows = [pool.submit(run_cli, case, work) for case in cases]
            app_py = [pool.submit(app_py_row, "app.py with a garbage jobs.sqlite3 in its data folder", "W/app-data-junk",
                                  work, ["app-data-junk"]),
                      pool.submit(app_py_row, "app.py with a data folder under a file", "W/a-file/data", work, ["a-file"])
                      ] if args.only != "cli" else []
            if os.geteuid() != 0 and args.only != "cli":  # as root, permissions do not stop writes
                (work / "read-only").mkdir(exist_ok=True)
                (work / "read-only").chmod(0o555)
                app_py.append(pool.submit(app_py_row, "app.py with a read-only data folder", "W/read-only", work,
                                          ["read-only"]))
            data = work / "app-data"
            shutil.rmtree(data, ignore_errors=True)
            app_data_dir(data)
            app_rows = []
            if args.only != "cli":
                log("starting the app")
                with AppProbe(data, hub).serve() as probe:
                    log("app rows")
                    app_rows = probe.run_rows()
            log("app rows done; waiting for the CLI rows")
            rows = [f.result() for f in cli_rows] + [f.result() for f in app_py] + app_rows
        for row in rows:
            row.message = row.message.replace(str(work), "W")
    seconds = time.time() - start
    from importlib.metadata import version

    cli_n = sum(r.surface == "CLI" for r in rows)
    page = "\n".join([
        "# Bad inputs and the answers they get",
        "",
        f"Made by `python -m tests.bad_inputs_table --out docs/bad-inputs.md` with age-explorer {version('age-explorer')} "
        f"on the toy model, on {os.cpu_count()} CPU cores, in {seconds:.0f} s: {len(rows)} inputs, {cli_n} through the CLI "
        f"and {len(rows) - cli_n} through the app. Every row is an observation of that run (W = its work folder).",
        "",
        "- **CLI** rows run `python -m age_explorer.core.app.cli …` as a subprocess. *Message*: the last line of stderr "
        "that is not a progress bar. *One line*: exactly one such line, nothing printed after it, no `Traceback`, "
        f"at most {MAX_MESSAGE} characters. *Nothing written*: a listing with checksums of the folders the command was "
        "told to write to is the same before and after, except for the files the row exists to write (named there).",
        "- **App** rows call one running explorer (`build_app` on the toy model, a temporary data folder holding three "
        "damaged graphs, 127.0.0.1) through `gradio_client`, or through raw HTTP where the client cannot send the input "
        "(JSON NaN, a value in a State slot). *Message*: what the client "
        "raises (or the answer). *One line*: no newline, no traceback text, not Gradio's generic \"upstream app has "
        f"raised an exception\", at most {MAX_MESSAGE} characters. *Still answers*: `/list_graphs` answers right after, "
        "and a refusal left no new job and no new export behind. Some rows start `app.py` itself on a bad data folder"
        + ("." if os.geteuid() != 0 else "; a read-only data folder is not among them, as this run was root, "
                                          "whom permissions do not stop."),
        "",
        "Rows with a \"no\": " + (", ".join(f"#{i}" for i, r in enumerate(rows, 1) if is_miss(r)) or "none") + ".",
        "",
        table(rows),
        "",
    ])
    if args.out:
        Path(args.out).write_text(page)
        log(f"wrote {args.out}")
    else:
        print(page)
    misses = [r for r in rows if is_miss(r)]
    log(f"{len(rows)} rows ({cli_n} CLI, {len(rows) - cli_n} app), {len(misses)} with a 'no', in {seconds:.0f} s")
    for r in misses:
        log(f"  no: {r.surface} {r.what}: {r.message[:160]} [{r.one_line}; {r.checked}]")
    for r in sorted(rows, key=lambda r: -r.seconds)[:5]:
        log(f"  slowest: {r.what} {r.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
