"""How many CPU threads PyTorch computes with, chosen from the cores this process may use and how busy
they are when it starts.

Why: torch starts one OpenMP thread per core, and every operator ends with its team waiting for its
slowest member. When another process holds a core, that member waits a scheduler time slice for it,
so a small model's operators (well under a millisecond each) take milliseconds: on 2 cores, 4 toy ESD
steps ran 2.7x slower beside a one-thread Python loop and 5.5x beside a two-thread matmul loop, and
130x slower with several processes computing. One thread has no team to wait for and degrades as a
fair share of the cores. On idle cores a team is faster (a toy graph row: 62 s on 2 threads, 83 s on
1), so the count depends on the cores that are free when the process starts:

    threads = max(1, usable cores - busy cores)

- usable cores: the CPUs this process may run on (``os.sched_getaffinity``), capped by a cgroup CPU
  quota (a container started with ``--cpus``);
- busy cores: the cores other processes kept busy over a short sample of ``/proc/stat`` (0.2 s, this
  process asleep), rounded to the nearest whole core.

An explicit count wins: ``--threads N`` on the command line, else ``OMP_NUM_THREADS`` in the
environment. The count changes the order of floating-point sums, so an erasure's weights are
byte-identical across machines and loads only for the same count: every run's manifest records it
(``cpu_threads``), ``erase --resume`` continues with the count the run started with, and a user who
needs identical bytes pins ``--threads``. OpenMP's wait policy is left at its default: a passive
(sleeping) wait made a two-thread team 2.1x slower on idle cores (docs/contention.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SAMPLE_SECONDS = 0.2
_chosen: dict = {}  # what configure() decided in this process: threads, and why


def usable_cores() -> int:
    """The CPUs this process may run on, capped by a cgroup (v2) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, round(int(quota) / int(period)))


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus``, from /proc/stat; None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's cores other processes keep busy, sampled over ``seconds`` while
    this process sleeps (0.0 where /proc/stat cannot be read)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return 0.0
    before = _cpu_times(cpus)
    time.sleep(seconds)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def default_threads() -> tuple[int, str]:
    """The rule's thread count and a short reason (for logs and the benchmark)."""
    usable = usable_cores()
    if usable == 1:
        return 1, "1 usable core"
    busy = busy_cores()
    threads = max(1, usable - round(busy))
    return threads, f"{usable} usable cores, {busy:.1f} busy"


def configure(threads: int | None = None) -> int:
    """Set torch's CPU thread count: ``threads`` when given, else ``OMP_NUM_THREADS`` when the user
    set it, else the rule above. Call it once a process, before heavy work (the rule is measured
    only once); returns the count."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a whole number >= 1, got {threads}")
        reason = "given"
    elif "threads" in _chosen:
        return torch.get_num_threads()
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads, reason = max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    else:
        threads, reason = default_threads()
    # the rule leaves torch's own default untouched, because set_num_threads also turns off MKL's choice of
    # fewer threads for small products (the same weights, ~10 % slower toy steps on 2 cores)
    if reason in ("given", "OMP_NUM_THREADS") or threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _chosen.update(threads=threads, reason=reason)
    return threads


def chosen() -> dict:
    """What ``configure`` set in this process ({} before it ran)."""
    return dict(_chosen)
