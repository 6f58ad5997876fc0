"""Share a CPU's cores between a background job and foreground requests of the same process.

Every Python thread that calls into PyTorch runs its own OpenMP team of ``torch.get_num_threads()``
threads. An erasure on the worker thread and a generation on a request thread therefore each run
a full team; on 2 cores the teams spin against each other and the erasure ran about 30 times
slower (docs/explorer.md). A ``CpuShare`` sizes the teams so that together they fit the cores:
the job takes what requests leave (it re-reads its share between steps), a request takes an equal
part while a job runs. It assumes one compute request at a time (the app gives its compute
endpoints one shared concurrency slot).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


class CpuShare:
    def __init__(self, cores: int | None = None):
        self.cores = cores or torch.get_num_threads()
        if self.cores < 1:
            raise ValueError(f"cores must be >= 1, got {self.cores}")
        self._lock = threading.Lock()
        self._requests = 0
        self._jobs = 0

    def job_threads(self) -> int:
        with self._lock:
            return max(1, self.cores - self._requests)

    def request_threads(self) -> int:
        with self._lock:
            return max(1, self.cores // max(1, self._requests + self._jobs))

    def adjust_job(self) -> None:
        """Called by the job between steps, on its own thread: take the cores requests leave now."""
        torch.set_num_threads(self.job_threads())

    @contextmanager
    def job(self):
        with self._lock:
            self._jobs += 1
        try:
            self.adjust_job()
            yield self
        finally:
            with self._lock:
                self._jobs -= 1

    @contextmanager
    def request(self):
        with self._lock:
            self._requests += 1
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(self.request_threads())
            yield self
        finally:
            torch.set_num_threads(before)
            with self._lock:
                self._requests -= 1
