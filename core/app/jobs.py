"""Background jobs that survive crashes: a SQLite job store and one worker per device.

- The store (``jobs.sqlite3`` in the data directory) holds every job: kind, config, status
  (queued, running, done, failed, cancelled, interrupted), progress, timestamps, error, artifacts.
  Every write is one transaction; artifacts are written by the engine to temp names and renamed.
- A worker runs the jobs of one device in submission order, one at a time. Progress from the
  engine's callbacks is written at most every ``progress_interval`` seconds; cancel requests are
  read at every step, so a running job stops within one step.
- On start-up a worker marks the jobs left "running" on its device by a dead process as
  "interrupted"; :meth:`JobStore.resume` queues one again and the run continues from its checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled")
DATA_DIR_ENV = "AGE_EXPLORER_DATA_DIR"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    device TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    artifacts TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (device, status, seq);
"""


class UnknownJobError(KeyError):
    def __str__(self) -> str:
        return f"unknown job id {self.args[0]!r}; `age-explorer jobs list` shows the jobs"


def default_data_dir() -> Path:
    """``AGE_EXPLORER_DATA_DIR``, else a Hugging Face Space's persistent volume ``/data``, else ./runs."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    if os.environ.get("SPACE_ID") and Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/age-explorer")
    return Path("runs")


@dataclass
class Job:
    id: str
    kind: str
    device: str
    config: dict
    status: str
    step: int
    total: int
    progress: dict
    cancel_requested: bool
    resume: bool
    created: float
    started: float | None
    finished: float | None
    error: str | None
    artifacts: dict
    seq: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        for key in ("config", "progress", "artifacts"):
            d[key] = json.loads(d[key])
        d["cancel_requested"], d["resume"] = bool(d["cancel_requested"]), bool(d["resume"])
        return cls(**d)


class JobStore:
    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "jobs.sqlite3"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self):
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # ---- writing ---------------------------------------------------------------------------------
    def submit(self, kind: str, config: dict, device: str = "cpu") -> str:
        job_id = uuid.uuid4().hex[:12]
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, kind, device, config, status, created) VALUES (?, ?, ?, ?, 'queued', ?)",
                       (job_id, kind, device, json.dumps(config), time.time()))
        return job_id

    def claim_next(self, device: str) -> Job | None:
        """Atomically take the oldest queued job of ``device`` and mark it running."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE device = ? AND status = 'queued' ORDER BY seq LIMIT 1",
                             (device,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', started = ?, error = NULL WHERE id = ?",
                       (time.time(), row["id"]))
        return self.get(row["id"])

    def report(self, job_id: str, step: int, total: int, progress: dict) -> bool:
        """Write progress; returns whether a cancel was requested."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET step = ?, total = ?, progress = ? WHERE id = ?",
                       (step, total, json.dumps(progress), job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row["cancel_requested"])

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def finish(self, job_id: str, status: str, error: str | None = None, artifacts: dict | None = None) -> None:
        assert status in STATUSES
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, artifacts = ?, resume = 0 WHERE id = ?",
                       (status, time.time(), error, json.dumps(artifacts or {}), job_id))

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job at once, or ask a running one to stop; returns the resulting status."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            if row["status"] in ("queued", "interrupted"):
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return "cancelling"
            return row["status"]

    def resume(self, job_id: str) -> None:
        """Queue an interrupted (or failed) job again; it continues from its last checkpoint."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            if row["status"] not in ("interrupted", "failed"):
                raise ValueError(f"job {job_id} is {row['status']}; only interrupted or failed jobs can be resumed")
            db.execute("UPDATE jobs SET status = 'queued', resume = 1, cancel_requested = 0, finished = NULL "
                       "WHERE id = ?", (job_id,))

    def mark_interrupted(self, device: str) -> list[str]:
        """Jobs a dead worker left 'running' on ``device`` become 'interrupted'."""
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE device = ? AND status = 'running'", (device,))]
            db.execute("UPDATE jobs SET status = 'interrupted', finished = ? WHERE device = ? AND status = 'running'",
                       (time.time(), device))
        return ids

    # ---- reading ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(job_id)
        return Job.from_row(row)

    def list(self, status: str | None = None, device: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        where = []
        if status:
            where.append("status = ?")
            args.append(status)
        if device:
            where.append("device = ?")
            args.append(device)
        if where:
            query += " WHERE " + " AND ".join(where)
        return [Job.from_row(r) for r in self._db().execute(query + " ORDER BY seq", args)]

    def queue_position(self, job_id: str) -> int:
        job = self.get(job_id)
        row = self._db().execute("SELECT COUNT(*) AS n FROM jobs WHERE device = ? AND status = 'queued' AND seq < ?",
                                 (job.device, job.seq)).fetchone()
        return int(row["n"])


class JobCancelled(Exception):
    pass


Runner = Callable[["JobContext"], dict]


@dataclass
class JobContext:
    """What a job's runner gets: its job, where to write, and progress/stop hooks for the engine."""

    job: Job
    store: JobStore
    work_dir: Path
    device: str
    progress_interval: float = 0.5

    def __post_init__(self):
        self._last_write = 0.0
        self._cancel = False

    def report(self, step: int, total: int, progress: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= self.progress_interval or step >= total:
            self._cancel = self.store.report(self.job.id, step, total, progress)
            self._last_write = now
        elif not self._cancel:
            self._cancel = self.store.cancel_requested(self.job.id)

    def should_stop(self) -> bool:
        return self._cancel or self.store.cancel_requested(self.job.id)


class Worker:
    """Runs the queued jobs of one device, in order, one at a time."""

    def __init__(self, store: JobStore, device: str, runners: dict[str, Runner] | None = None,
                 poll_interval: float = 0.2, progress_interval: float = 0.5):
        self.store, self.device = store, device
        self.progress_interval = progress_interval
        self.runners = runners if runners is not None else default_runners()
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recovered = store.mark_interrupted(device)

    def run_one(self) -> Job | None:
        job = self.store.claim_next(self.device)
        if job is None:
            return None
        work_dir = self.store.data_dir / "jobs" / job.id
        work_dir.mkdir(parents=True, exist_ok=True)
        ctx = JobContext(job, self.store, work_dir, self.device, self.progress_interval)
        try:
            runner = self.runners.get(job.kind)
            if runner is None:
                raise ValueError(f"unknown job kind {job.kind!r}")
            artifacts = runner(ctx)
        except JobCancelled:
            self.store.finish(job.id, "cancelled")
        except Exception as err:  # a failed job must never take the worker down
            self.store.finish(job.id, "failed", error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
        else:
            self.store.finish(job.id, "done", artifacts=artifacts)
        return self.store.get(job.id)

    def serve_forever(self, keep_going: Callable[[], bool] | None = None) -> None:
        while not self._stop.is_set() and (keep_going is None or keep_going()):
            if self.run_one() is None:
                self._stop.wait(self.poll_interval)

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self.serve_forever, name=f"age-worker-{self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)


class WorkerProcess:
    """A ``Worker`` in a child process, for servers: a job's Python loop in a thread of a busy server
    waits for the GIL behind every request thread (measured: an erasure ran ~30 times slower on a
    2-core machine with 10 users browsing). The child shares only the job store (SQLite); cancelling,
    progress and re-attaching go through it as before. ``threads``: the child's PyTorch CPU threads
    (see ``age_explorer.core.app.cpu_split``). ``stop`` waits up to ``timeout`` for the job in progress, then ends the
    process; a job cut short is marked interrupted when a worker next starts, and resumes from its
    checkpoint."""

    def __init__(self, data_dir: str | Path, device: str, threads: int | None = None, poll_interval: float = 0.2):
        self.data_dir, self.device, self.threads, self.poll_interval = Path(data_dir), device, threads, poll_interval
        self._ctx = multiprocessing.get_context("spawn")  # fork would copy a server's threads and CUDA state
        # A lock-free flag, not an Event: a child killed inside Event.wait leaves its condition locked,
        # and the next set() would wait forever.
        self._stop = self._ctx.RawValue("b", 0)
        self.process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> "WorkerProcess":
        self.process = self._ctx.Process(target=_serve_in_process, name=f"age-worker-{self.device}", daemon=True,
                                         args=(str(self.data_dir), self.device, self.threads, self.poll_interval,
                                               self._stop))
        self.process.start()
        return self

    def ensure_alive(self) -> bool:
        """Start a new child if the last one died (killed, out of memory): True when it did. The new
        worker marks the job the dead one was running as interrupted, ready to resume."""
        if self._stop.value or (self.process is not None and self.process.is_alive()):
            return False
        self.start()
        return True

    def stop(self, timeout: float | None = None) -> None:
        self._stop.value = 1
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)


def _serve_in_process(data_dir: str, device: str, threads: int | None, poll_interval: float, stop) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    worker = Worker(JobStore(data_dir), device, poll_interval=poll_interval)
    parent = multiprocessing.parent_process()
    # a server killed without cleanup (SIGKILL, a crash) must not leave its worker behind
    worker.serve_forever(lambda: not stop.value and parent.is_alive())


# ---- job kinds ---------------------------------------------------------------------------------------
_BUNDLES: dict[tuple[str, str], object] = {}
_BUNDLES_LOCK = threading.Lock()


def _bundle(model: str, device: str):
    from ..bundle import load_bundle

    with _BUNDLES_LOCK:
        key = (model, device)
        if key not in _BUNDLES:
            _BUNDLES[key] = load_bundle(model, device=device)
        return _BUNDLES[key]


def run_erase_job(ctx: JobContext) -> dict:
    """config: {"model": ..., "method": ..., "preset": ..., "options": {...concepts...}}."""
    from ..erasure import erase, make_config

    cfg = ctx.job.config
    config = make_config(cfg["method"], cfg.get("preset"), **cfg.get("options", {}))
    bundle = _bundle(cfg.get("model", "toy"), ctx.device)
    run_dir = ctx.work_dir / "run"
    resume = ctx.job.resume and (run_dir / "checkpoint").exists()

    preview_every = int(cfg.get("preview_every", bundle.backend.preview_every))
    preview = {}

    def on_step(report):
        if preview_every and report.step % preview_every == 0:
            preview["path"] = str(_write_preview(bundle, config, ctx.work_dir, report.step))
        ctx.report(report.step, report.total, {
            "phase": report.phase, "concept": report.concept, "losses": report.losses,
            "elapsed": report.elapsed, "eta": report.eta, "targets": report.targets,
            "pick": report.pick, "pick_is_neighbour": report.pick_is_neighbour, "preview": preview.get("path")})

    if not resume and run_dir.exists():
        # A run killed before its first checkpoint left nothing to continue from: start it over.
        import shutil

        shutil.rmtree(run_dir)
    result = erase(bundle, config, run_dir, callbacks=[on_step], stop=ctx.should_stop, resume=resume)
    if result.status == "stopped":
        raise JobCancelled()
    return {"run_dir": str(run_dir)}


def _write_preview(bundle, config, work_dir: Path, step: int) -> Path:
    """An image of the first erased concept with the weights as they are now (fixed seed)."""
    from ..imageio import to_pil
    from ..sampling import generate

    prompt = config.prompt_template.format(c=config.concepts[0])
    image = generate(bundle, [prompt], [0])[0]
    path = work_dir / f"preview-{step:06d}.png"
    to_pil(image, 160).save(path)
    return path


def run_generate_job(ctx: JobContext) -> dict:
    """config: {"model": ..., "prompts": [...], "seeds": "0-3", "steps": ..., "guidance_scale": ...}."""
    from ..imageio import save_pngs
    from ..sampling import generate, parse_seeds

    cfg = ctx.job.config
    bundle = _bundle(cfg.get("model", "toy"), ctx.device)
    seeds = parse_seeds(cfg.get("seeds", "0-3"))
    images = generate(bundle, cfg["prompts"], seeds, steps=cfg.get("steps"), guidance_scale=cfg.get("guidance_scale"),
                      progress=lambda done, total: ctx.report(done, total, {}))
    names = [f"p{p:02d}_seed{s:04d}" for p in range(len(cfg["prompts"])) for s in seeds]
    out = ctx.work_dir / "images"
    save_pngs(images, out, names)
    return {"images": str(out)}


def default_runners() -> dict[str, Runner]:
    return {"erase": run_erase_job, "generate": run_generate_job}
