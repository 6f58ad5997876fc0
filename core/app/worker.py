"""Workers: one per device runs that device's queued jobs in submission order, one at a time.

- A runner that finds its lease taken stops at once, and the job folder is held with ``flock``
  while a job runs, so two processes never run one job.
- A worker whose parent (the server) dies stops its job at the next step, checkpointed and marked
  "interrupted", and exits.
- :class:`WorkerProcess` runs a worker in a child process for servers, and notices its death at once.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from ..files import folder_lock
from .job_kinds import default_runners
from .job_store import HEARTBEAT_SECONDS, Job, JobCancelled, JobContext, JobStore, Runner


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
