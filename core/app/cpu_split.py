"""Split a CPU's cores between the background job and the server's requests.

Every thread that calls into PyTorch runs its own OpenMP team of ``torch.get_num_threads()``
threads, and every process starts with one thread per core. An erasure and a generation running
side by side each start a full team; on 2 cores the teams spin against each other, and an erasure
run as a thread of a busy server also waits for the GIL behind every request (measured: about 30
times slower with 10 users). The app therefore runs jobs in a worker process with a fixed share of
the cores and gives its requests the rest. The split is fixed, not adjusted to the load, because
the thread count changes the order of floating-point sums: an erasure gives the same weights
whether or not users are generating beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu_threads import usable_cores


@dataclass(frozen=True)
class CpuSplit:
    job_threads: int
    request_threads: int

    @classmethod
    def of(cls, cores: int | None = None) -> "CpuSplit":
        """A quarter of the cores (at least one) for requests, the rest (at least one) for the job; ``cores``
        defaults to the cores this process may use (``core.cpu_threads.usable_cores``), whatever their load."""
        cores = usable_cores() if cores is None else cores
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        requests = max(1, cores // 4)
        return cls(job_threads=max(1, cores - requests), request_threads=requests)
