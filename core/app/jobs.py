"""Background jobs that survive crashes: a SQLite job store and one worker per device.

- The store (``jobs.sqlite3`` in the data directory) holds every job: kind, config, status
  (queued, running, done, failed, cancelled, interrupted), progress, timestamps, error, artifacts.
  Every write is one transaction; artifacts are written by the engine to temp names and renamed.
- A worker runs the jobs of one device in submission order, one at a time. Progress from the
  engine's callbacks is written at most every ``progress_interval`` seconds; cancel requests are
  read at every step, so a running job stops within one step.
- A running job's row names its owner (worker PID, host, a heartbeat every few seconds, a lease
  token). A job whose owner is gone (PID dead on this host, or heartbeat older than
  ``LEASE_SECONDS``) is marked "interrupted" by the next worker that starts or by the page's polling;
  only such a job can be resumed (:meth:`JobStore.resume`), and it continues from its checkpoint.
  A runner that finds its lease taken stops at once, and the job folder is held with ``flock``
  while a job runs, so two processes never run one job.
- A worker whose parent (the server) dies stops its job at the next step, checkpointed and marked
  "interrupted", and exits.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..checks import short
from ..manifest import folder_lock

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled")
DATA_DIR_ENV = "AGE_EXPLORER_DATA_DIR"
HOST = socket.gethostname()
HEARTBEAT_SECONDS = 2.0
# A heartbeat older than this means the owner is gone even if its PID exists (reused, or another host).
LEASE_SECONDS = 30.0

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
# added after the first release: a store made before them gets them on open
_OWNER_COLUMNS = {"owner_pid": "INTEGER", "owner_host": "TEXT", "heartbeat": "REAL", "lease": "TEXT",
                  "session": "TEXT"}


class TooManyJobsError(ValueError):
    def __init__(self, active: int):
        super().__init__(f"you already have {active} job(s) queued or running, the most one visitor may have "
                         f"on this server: wait for one to end or cancel one")


class DamagedJobError(ValueError):
    pass


class UnknownJobError(KeyError):
    def __str__(self) -> str:
        return f"unknown job id {short(self.args[0])}; `age-explorer jobs list` shows the jobs"


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
    owner_pid: int | None = None
    owner_host: str | None = None
    heartbeat: float | None = None
    lease: str | None = None
    session: str | None = None

    @property
    def owner_alive(self) -> bool:
        """Whether a live process holds this job: a fresh heartbeat and, on this host, a live PID."""
        return _owner_alive(self.owner_pid, self.owner_host, self.heartbeat)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        for key in ("config", "progress", "artifacts"):
            try:
                d[key] = json.loads(d[key])
            except (TypeError, ValueError):  # a row written by hand or by another program
                raise DamagedJobError(f"job {short(d.get('id'))} is damaged in the job store: its {key} is not "
                                      f"JSON; cancel it or remove its row") from None
        d["cancel_requested"], d["resume"] = bool(d["cancel_requested"]), bool(d["resume"])
        return cls(**d)


class JobStore:
    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "jobs.sqlite3"
        self._local = threading.local()
        try:
            db = self._db()
            db.executescript(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _OWNER_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as err:
            self._local.db = None
            if "readonly" in str(err) or "unable to open" in str(err):
                raise PermissionError(f"cannot write the job store {self.path}: {err}; make the data folder "
                                      f"writable or choose another with {DATA_DIR_ENV}") from None
            raise ValueError(f"{self.path} is not a readable job store ({err}); move it away and a new "
                             f"one is created") from None

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
            # SQLite may already have rolled back (disk full): the error to report is the first one
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def work_dir(self, job_id: str) -> Path:
        """Where a job writes: ``DATA/jobs/<id>``; an erase job's run folder is its ``run`` (``erase_run_dir``)."""
        return self.data_dir / "jobs" / job_id

    # ---- writing ---------------------------------------------------------------------------------
    def submit(self, kind: str, config: dict, device: str = "cpu", session: str | None = None,
               session_limit: int | None = None) -> str:
        """Queue a job. ``session_limit``: refuse it (:class:`TooManyJobsError`) while ``session`` already
        has that many jobs queued or running; counted in the same transaction, so parallel submits of
        one session cannot pass it together."""
        job_id = uuid.uuid4().hex  # 122 random bits: an id cannot be guessed
        with self._tx() as db:
            if session_limit is not None:
                active = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE session IS ? AND status IN "
                                    "('queued', 'running')", (session,)).fetchone()["n"]
                if active >= session_limit:
                    raise TooManyJobsError(active)
            db.execute("INSERT INTO jobs (id, kind, device, config, status, created, session) "
                       "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                       (job_id, kind, device, json.dumps(config), time.time(), session))
        return job_id

    def claim_next(self, device: str) -> Job | None:
        """Atomically take the oldest queued job of ``device``, mark it running and owned by this process."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE device = ? AND status = 'queued' ORDER BY seq LIMIT 1",
                             (device,)).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status = 'running', started = ?, error = NULL, owner_pid = ?, owner_host = ?, "
                       "heartbeat = ?, lease = ? WHERE id = ?",
                       (now, os.getpid(), HOST, now, uuid.uuid4().hex, row["id"]))
        try:
            return self.get(row["id"])
        except DamagedJobError as err:  # it fails, and the worker goes on with the next job
            self.finish(row["id"], "failed", error=str(err))
            return self.claim_next(device)

    def heartbeat(self, job_id: str, lease: str) -> bool:
        """Renew a running job's lease; False when the job is no longer this runner's."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND lease = ? AND status = 'running'",
                              (time.time(), job_id, lease)).rowcount == 1

    def report(self, job_id: str, step: int, total: int, progress: dict, lease: str | None = None) -> bool:
        """Write progress; returns whether a cancel was requested. With ``lease``, a runner whose job
        was taken from it gets :class:`LeaseLost` and writes nothing."""
        with self._tx() as db:
            changed = db.execute("UPDATE jobs SET step = ?, total = ?, progress = ?, heartbeat = ? WHERE id = ? "
                                 "AND (? IS NULL OR lease = ?)",
                                 (step, total, json.dumps(progress), time.time(), job_id, lease, lease)).rowcount
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not changed:
            raise LeaseLost(job_id)
        return bool(row["cancel_requested"])

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def finish(self, job_id: str, status: str, error: str | None = None, artifacts: dict | None = None,
               lease: str | None = None) -> None:
        """End a job; it has no owner afterwards. With ``lease``, only while the job is still that runner's."""
        assert status in STATUSES
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, artifacts = ?, resume = 0, "
                       "owner_pid = NULL, heartbeat = NULL, lease = NULL WHERE id = ? AND (? IS NULL OR lease = ?)",
                       (status, time.time(), error, json.dumps(artifacts or {}), job_id, lease, lease))

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job at once, or ask a running one to stop; returns the resulting status."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            # a "running" job whose worker is gone has no one to hear a cancel request
            if row["status"] in ("queued", "interrupted") or (row["status"] == "running" and not _row_owner_alive(row)):
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return "cancelling"
            return row["status"]

    def resume(self, job_id: str) -> None:
        """Queue an interrupted (or failed) job again, or a running one whose worker is dead; it continues
        from its last checkpoint. A job that a live process still runs is refused."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            job = Job.from_row(row)
            if job.owner_alive:
                raise ValueError(f"job {job_id} is still running in process {job.owner_pid} on {job.owner_host}; "
                                 f"cancel it or wait for it")
            if job.status not in ("interrupted", "failed", "running"):
                raise ValueError(f"job {job_id} is {job.status}; only interrupted or failed jobs can be resumed")
            db.execute("UPDATE jobs SET status = 'queued', resume = 1, cancel_requested = 0, finished = NULL, "
                       "owner_pid = NULL, heartbeat = NULL, lease = NULL WHERE id = ?", (job_id,))

    def mark_interrupted(self, device: str | None = None) -> list[str]:
        """Jobs left 'running' (on ``device``, or any) by a worker that is gone become 'interrupted'.
        Cheap when nothing is orphaned (one read), so the page can call it on every poll."""
        where, args = ("status = 'running'", ()) if device is None else ("status = 'running' AND device = ?", (device,))
        # read from the owner columns alone, so a row whose JSON is damaged is still looked after
        if all(_row_owner_alive(r) for r in self._db().execute(f"SELECT * FROM jobs WHERE {where}", args)):
            return []
        with self._tx() as db:
            dead = [r for r in db.execute(f"SELECT id, lease, owner_pid, owner_host, heartbeat FROM jobs WHERE {where}",
                                          args) if not _row_owner_alive(r)]
            for job in dead:
                db.execute("UPDATE jobs SET status = 'interrupted', finished = ?, error = ?, owner_pid = NULL, "
                           "heartbeat = NULL, lease = NULL WHERE id = ? AND status = 'running' AND lease IS ?",
                           (time.time(), "its worker stopped (killed or crashed); resume it to continue from its "
                            "last checkpoint", job["id"], job["lease"]))
        return [job["id"] for job in dead]

    # ---- reading ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(job_id)
        return Job.from_row(row)

    def list(self, status: str | None = None, device: str | None = None,
             damaged: list[str] | None = None) -> list[Job]:
        """The jobs, oldest first. A damaged row is left out (the others still list); its message is added
        to ``damaged`` when given."""
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
        jobs = []
        for row in self._db().execute(query + " ORDER BY seq", args):
            try:
                jobs.append(Job.from_row(row))
            except DamagedJobError as err:
                if damaged is not None:
                    damaged.append(str(err))
        return jobs

    def queue_position(self, job_id: str) -> int:
        job = self.get(job_id)
        row = self._db().execute("SELECT COUNT(*) AS n FROM jobs WHERE device = ? AND status = 'queued' AND seq < ?",
                                 (job.device, job.seq)).fetchone()
        return int(row["n"])


class JobCancelled(Exception):
    pass


class LeaseLost(Exception):
    """The job was taken from this runner (its lease expired and it was resumed elsewhere)."""


def _owner_alive(pid: int | None, host: str | None, heartbeat: float | None) -> bool:
    if pid is None or heartbeat is None or time.time() - heartbeat > LEASE_SECONDS:
        return False
    return host != HOST or _pid_alive(pid)


def _row_owner_alive(row: sqlite3.Row) -> bool:
    return _owner_alive(row["owner_pid"], row["owner_host"], row["heartbeat"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: it answers kill(0) but runs nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


Runner = Callable[["JobContext"], dict]


@dataclass
class JobContext:
    """What a job's runner gets: its job, where to write, and progress/stop hooks for the engine."""

    job: Job
    store: JobStore
    work_dir: Path
    device: str
    progress_interval: float = 0.5
    keep_going: Callable[[], bool] = lambda: True  # False: the worker is stopping (its server died)

    def __post_init__(self):
        self._last_write = 0.0
        self._cancel = False
        self.lost = False  # the lease was taken: stop and write nothing more to the job's row

    def report(self, step: int, total: int, progress: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= self.progress_interval or step >= total:
            try:
                self._cancel = self.store.report(self.job.id, step, total, progress, lease=self.job.lease)
            except LeaseLost:
                self.lost = True
            self._last_write = now
        elif not self._cancel:
            self._cancel = self.store.cancel_requested(self.job.id)

    @property
    def interrupted(self) -> bool:
        return not self.keep_going()

    def should_stop(self) -> bool:
        return self._cancel or self.lost or self.interrupted or self.store.cancel_requested(self.job.id)


class Worker:
    """Runs the queued jobs of one device, in order, one at a time."""

    def __init__(self, store: JobStore, device: str, runners: dict[str, Runner] | None = None,
                 poll_interval: float = 0.2, progress_interval: float = 0.5,
                 keep_going: Callable[[], bool] | None = None):
        self.store, self.device = store, device
        self.progress_interval = progress_interval
        self.runners = runners if runners is not None else default_runners()
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._keep_going = keep_going
        self._thread: threading.Thread | None = None
        self.recovered = store.mark_interrupted(device)

    def keep_going(self) -> bool:
        return not self._stop.is_set() and (self._keep_going is None or self._keep_going())

    def run_one(self) -> Job | None:
        job = self.store.claim_next(self.device)
        if job is None:
            return None
        work_dir = self.store.work_dir(job.id)
        ctx = JobContext(job, self.store, work_dir, self.device, self.progress_interval, self.keep_going)
        beating = threading.Event()
        heart = threading.Thread(target=self._beat, args=(ctx, beating), daemon=True)
        heart.start()
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            with folder_lock(work_dir, f"another process is still running job {job.id}; resume it once "
                                       f"that process has stopped"):
                runner = self.runners.get(job.kind)
                if runner is None:
                    raise ValueError(f"unknown job kind {job.kind!r}")
                artifacts = runner(ctx)
        except JobCancelled:
            outcome = ("interrupted", "the worker stopped (its server ended); resume the job to continue "
                       "from its checkpoint", None) if ctx.interrupted and not self.store.cancel_requested(job.id) \
                else ("cancelled", None, None)
        except Exception as err:  # a failed job must never take the worker down
            outcome = ("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}", None)
        else:
            outcome = ("done", None, artifacts)
        finally:
            beating.set()
            heart.join()
        if not ctx.lost:
            try:
                self.store.finish(job.id, outcome[0], error=outcome[1], artifacts=outcome[2], lease=job.lease)
            except sqlite3.Error as err:
                # e.g. the disk is full: the row stays "running" without a heartbeat and is marked
                # interrupted once its lease expires; the worker lives on
                print(f"age-explorer worker: could not record job {job.id} as {outcome[0]}: {err}", file=sys.stderr)
        return self.store.get(job.id)

    def _beat(self, ctx: JobContext, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                if not self.store.heartbeat(ctx.job.id, ctx.job.lease):
                    ctx.lost = True
                    return
            except sqlite3.Error:
                pass  # a busy or full database: the next beat tries again

    def serve_forever(self, keep_going: Callable[[], bool] | None = None) -> None:
        if keep_going is not None:
            self._keep_going = keep_going
        while self.keep_going():
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
    (see ``age_explorer.core.app.cpu_split``). ``niceness``: the child runs at a lower CPU priority, so
    that on a busy CPU the pages' requests go first and a job takes the time they leave (a job's result
    does not depend on its speed). ``stop`` waits up to ``timeout`` for the job in progress, then ends the
    process; a job cut short is marked interrupted, and resumes from its checkpoint."""

    def __init__(self, data_dir: str | Path, device: str, threads: int | None = None, poll_interval: float = 0.2,
                 niceness: int = 10):
        self.data_dir, self.device, self.threads, self.poll_interval = Path(data_dir), device, threads, poll_interval
        self.niceness = niceness
        self._ctx = multiprocessing.get_context("spawn")  # fork would copy a server's threads and CUDA state
        # A lock-free flag, not an Event: a child killed inside Event.wait leaves its condition locked,
        # and the next set() would wait forever.
        self._stop = self._ctx.RawValue("b", 0)
        self.process: multiprocessing.process.BaseProcess | None = None
        self._start_lock = threading.Lock()

    def start(self) -> "WorkerProcess":
        process = self._ctx.Process(target=_serve_in_process, name=f"age-worker-{self.device}", daemon=True,
                                    args=(str(self.data_dir), self.device, self.threads, self.poll_interval,
                                          self._stop, self.niceness))
        process.start()
        self.process = process  # only a started process: the watch waits on its sentinel
        return self

    def ensure_alive(self) -> bool:
        """Start the child if none runs yet, or a new one if the last one died (killed, out of memory):
        True when it did. The new worker marks the job the dead one was running as interrupted, ready
        to resume. Safe from several threads (a page's poll and a delayed start)."""
        with self._start_lock:
            if self._stop.value or (self.process is not None and self.process.is_alive()):
                return False
            self.start()
            return True

    def supervise(self, store: "JobStore", interval: float = 1.0) -> threading.Thread:
        """Watch the child from a thread of the server: once it dies (killed, out of memory), its job is
        marked interrupted within ``interval`` seconds and a new child starts with the next queued job,
        whether or not any page is polling. Ends with :meth:`stop`."""
        thread = threading.Thread(target=self._supervise, args=(store, interval), daemon=True,
                                  name=f"age-worker-watch-{self.device}")
        thread.start()
        return thread

    def _supervise(self, store: "JobStore", interval: float) -> None:
        while not self._stop.value:
            process = self.process
            if process is None:  # not started yet (delayed start)
                time.sleep(interval)
                continue
            # the sentinel becomes ready the moment the child ends, so a death is seen at once
            multiprocessing.connection.wait([process.sentinel], timeout=interval)
            if self._stop.value or process.is_alive():
                continue
            try:
                store.mark_interrupted(self.device)
            except sqlite3.Error as err:  # a busy or full database: the new worker marks it on start
                print(f"age-explorer: could not mark the dead worker's job interrupted: {err}", file=sys.stderr)
            self.ensure_alive()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.value = 1
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)


def _serve_in_process(data_dir: str, device: str, threads: int | None, poll_interval: float, stop,
                      niceness: int = 0) -> None:
    import torch

    if niceness and hasattr(os, "nice"):
        os.nice(niceness)
    if threads:
        torch.set_num_threads(threads)
    worker = Worker(JobStore(data_dir), device, poll_interval=poll_interval)
    parent = multiprocessing.parent_process()
    # a server killed without cleanup (SIGKILL, a crash) must not leave its worker behind: the job in
    # progress stops at its next step, checkpointed and marked interrupted, and the process exits
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


def erase_run_dir(work_dir: Path) -> Path:
    """The run folder an erase job writes in its work folder (``JobStore.work_dir``)."""
    return work_dir / "run"


def run_erase_job(ctx: JobContext) -> dict:
    """config: {"model": ..., "method": ..., "preset": ..., "options": {...concepts...}}."""
    from ..erasure import erase, get_method, make_config

    cfg = ctx.job.config
    config = make_config(cfg["method"], cfg.get("preset"), **cfg.get("options", {}))
    bundle = _bundle(cfg.get("model", "toy"), ctx.device)
    run_dir = erase_run_dir(ctx.work_dir)
    resume = ctx.job.resume and (run_dir / "checkpoint").exists()

    preview_every = int(cfg.get("preview_every", bundle.backend.preview_every))
    preview = {}

    def on_step(report):
        if preview_every and report.step % preview_every == 0:
            preview["path"] = str(_write_preview(bundle, config, ctx.work_dir, report.step))
        ctx.report(report.step, report.total, {**asdict(report), "preview": preview.get("path")})

    if not resume and run_dir.exists():
        # A run killed before its first checkpoint left nothing to continue from: start it over.
        import shutil

        shutil.rmtree(run_dir)
    result = erase(bundle, config, run_dir, callbacks=[on_step], stop=ctx.should_stop, resume=resume)
    if result.status == "stopped":
        raise JobCancelled()
    artifacts = {"run_dir": str(run_dir)}
    if "pgd_num_steps" in get_method(config.method).options:  # AGE, AP: the top-1 targets' own G after, where judged
        from ..erasure.preservation import check_target_preservation, notes

        artifacts["target_notes"] = notes(check_target_preservation(bundle, run_dir))
    return artifacts


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


class StageProgress:
    """The ``(stage, done, total)`` callbacks of attacks and evaluation as job progress: the job's step
    and total are the current stage's, and the progress names the stage with its own ETA."""

    def __init__(self, ctx: JobContext):
        self.ctx, self.stage, self.started = ctx, None, time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.stage, self.started = stage, time.monotonic()
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done) if done else None
        self.ctx.report(done, total, {"stage": stage, "eta": eta}, force=done == 1)


def run_attack_job(ctx: JobContext) -> dict:
    """config: {"run_dir": ..., "attack": ..., "options": {...AttackConfig fields...}, optional "evaluator"
    and "concept_set" (the judge; default: the model's)}. The attack folder goes under the run
    (``RUN/attacks/``), in a name no earlier attack holds."""
    from ..attacks import AttackStopped, free_attack_folder, make_attack_config, run_attack
    from ..attacks.common import AttackTarget

    cfg = ctx.job.config
    config = make_attack_config(cfg["attack"], **cfg.get("options", {}))
    target = AttackTarget(cfg["run_dir"], device=ctx.device)
    out = free_attack_folder(cfg["run_dir"], cfg["attack"], target.concept(config.concept))
    try:
        result = run_attack(cfg["run_dir"], cfg["attack"], config, out=out, target=target,
                            progress=StageProgress(ctx), stop=ctx.should_stop, evaluator=cfg.get("evaluator"),
                            concept_set=cfg.get("concept_set"))
    except AttackStopped:
        raise JobCancelled() from None
    return {"attack_dir": str(result.out_dir)}


def run_evaluate_job(ctx: JobContext) -> dict:
    """config: {"model": a run folder (or model), "out": result folder, "config": {...EvaluationConfig...}}.
    The result folder is replaced only once every metric is done."""
    from ..evaluation.config import EvaluationConfig
    from .evaluation import evaluate

    cfg = ctx.job.config
    try:
        done = evaluate(cfg["model"], EvaluationConfig(**cfg["config"]), out=cfg["out"], device=ctx.device, force=True,
                        progress=StageProgress(ctx), stop=ctx.should_stop, log=lambda message: None)
    except InterruptedError:
        raise JobCancelled() from None
    return {"evaluation_dir": str(done.out_dir)}


def default_runners() -> dict[str, Runner]:
    return {"erase": run_erase_job, "generate": run_generate_job, "attack": run_attack_job,
            "evaluate": run_evaluate_job}
