"""The job store: every background job in one SQLite file, and what a job's runner sees of it.

- The store (``jobs.sqlite3`` in the data directory) holds every job: kind, config, status
  (queued, running, done, failed, cancelled, interrupted), progress, timestamps, error, artifacts.
  Every write is one transaction; artifacts are written by the engine to temp names and renamed.
- A running job's row names its owner (worker PID, host, a heartbeat every few seconds, a lease
  token). A job whose owner is gone (PID dead on this host, or heartbeat older than
  ``LEASE_SECONDS``) is marked "interrupted" by the next worker that starts or by the page's polling;
  only such a job can be resumed (:meth:`JobStore.resume`), and it continues from its checkpoint.
- :class:`JobContext` is a runner's handle on its job: progress written at most every
  ``progress_interval`` seconds, and cancel requests read at every step, so a running job stops
  within one step.

Who runs the jobs: ``worker.py``; what each kind of job does: ``job_kinds.py``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checks import short

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
