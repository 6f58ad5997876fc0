import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from age_explorer.core.app.cpu_split import CpuSplit
from age_explorer.core.app.job_store import JobStore, UnknownJobError
from age_explorer.core.app.worker import Worker, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]


def _erase_config(model: str, iterations: int, checkpoint_every: int = 0) -> dict:
    return {"model": model, "method": "age", "preset": None,
            "options": {"concepts": ["a red circle"], "candidates": ["a dog", "a cat", "a car"], "iterations": iterations,
                        "ddim_steps": 4, "batch_size": 1, "lr": 1e-3, "seed": 7,
                        "checkpoint_every": checkpoint_every}}


def _wait(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")




@pytest.mark.slow
def test_sigkilled_worker_job_is_interrupted_and_resumes_to_the_same_weights(tiny_sd_dir, tmp_path, one_thread):
    store = JobStore(tmp_path / "data")
    job_id = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=30, checkpoint_every=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "age_explorer.core.app.cli", "jobs", "--data-dir", str(tmp_path / "data"),
                               "worker", "--device", "cpu", "--once"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = tmp_path / "data" / "jobs" / job_id / "run"
        _wait(lambda: (run_dir / "checkpoint").exists() and store.get(job_id).step >= 12, 180, "a checkpoint")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert store.get(job_id).status == "running"  # nobody told the store
    assert not (run_dir / "delta.safetensors").exists()

    restarted = Worker(JobStore(tmp_path / "data"), "cpu")
    assert restarted.recovered == [job_id]
    assert store.get(job_id).status == "interrupted"
    store.resume(job_id)
    assert restarted.run_one().status == "done"

    reference = JobStore(tmp_path / "reference")
    ref_id = reference.submit("erase", _erase_config(str(tiny_sd_dir), iterations=30))
    assert Worker(reference, "cpu").run_one().status == "done"
    resumed = load_file(str(run_dir / "delta.safetensors"))
    uninterrupted = load_file(str(tmp_path / "reference" / "jobs" / ref_id / "run" / "delta.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_twenty_concurrent_jobs_all_finish_in_order_per_device(tmp_path):
    store = JobStore(tmp_path)
    ran: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(ctx):
        with lock:
            ran.append((ctx.device, ctx.job.id))
        time.sleep(0.01)
        return {"n": ctx.job.config["n"]}

    submitted: list[str] = []

    def submit(i):
        job_id = store.submit("record", {"n": i}, device="cpu" if i % 2 else "cuda:0")
        with lock:
            submitted.append(job_id)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    workers = [Worker(store, d, {"record": record}, poll_interval=0.02).start() for d in ("cpu", "cuda:0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        _wait(lambda: all(j.status == "done" for j in store.list()) and len(store.list()) == 20, 60, "20 jobs")
    finally:
        for w in workers:
            w.stop(5)
    assert sorted(job_id for _, job_id in ran) == sorted(submitted)  # none lost, none run twice
    for device in ("cpu", "cuda:0"):
        order = [job_id for d, job_id in ran if d == device]
        expected = [j.id for j in store.list(device=device)]  # submission (seq) order
        assert order == expected


def test_cancelling_a_running_job_frees_the_worker_within_one_step(tiny_sd_dir, tmp_path):
    store = JobStore(tmp_path)
    long_job = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=500))
    next_job = store.submit("generate", {"model": str(tiny_sd_dir), "prompts": ["a cat"], "seeds": "0", "steps": 2})
    worker = Worker(store, "cpu", poll_interval=0.05, progress_interval=0).start()  # exact step in the store
    try:
        _wait(lambda: store.get(long_job).step >= 3, 120, "the job to run")
        assert store.cancel(long_job) == "cancelling"
        at_cancel = store.get(long_job).step
        _wait(lambda: store.get(long_job).status == "cancelled", 30, "the cancel")
        _wait(lambda: store.get(next_job).status == "done", 60, "the next job")
    finally:
        worker.stop(10)
    history = (tmp_path / "jobs" / long_job / "run" / "history.csv").read_text().splitlines()
    assert len(history) - 1 <= at_cancel + 1  # the step in flight finishes, no more
    assert (tmp_path / "jobs" / long_job / "run" / "checkpoint" / "state.safetensors").exists()
    assert list((tmp_path / "jobs" / next_job / "images").glob("*.png"))


def test_queued_cancel_unknown_ids_and_failures(tmp_path):
    store = JobStore(tmp_path)
    queued = store.submit("erase", {"method": "age", "options": {"concepts": []}})
    assert store.cancel(queued) == "cancelled"
    with pytest.raises(UnknownJobError, match="unknown job id 'nope'"):
        store.get("nope")
    with pytest.raises(UnknownJobError):
        store.cancel("nope")
    bad = store.submit("erase", {"method": "age", "options": {"concepts": []}})
    job = Worker(store, "cpu").run_one()
    assert job.id == bad and job.status == "failed" and "at least one non-empty concept" in job.error
    with pytest.raises(ValueError, match="only interrupted or failed"):
        store.resume(queued)



@pytest.mark.parametrize("cores, job, requests", [(1, 1, 1), (2, 1, 1), (4, 3, 1), (16, 12, 4)])
def test_cpu_split_leaves_the_job_and_the_requests_cores_of_their_own(cores, job, requests):
    assert CpuSplit.of(cores) == CpuSplit(job_threads=job, request_threads=requests)


def test_cpu_split_refuses_a_negative_core_count():
    with pytest.raises(ValueError, match="cores must be >= 1"):
        CpuSplit.of(-1)


@pytest.mark.slow
def test_worker_process_runs_jobs_in_its_own_process_with_its_threads(tiny_sd_dir, tmp_path):
    store = JobStore(tmp_path)
    worker = WorkerProcess(tmp_path, "cpu", threads=1, poll_interval=0.05).start()
    try:
        long_job = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=500))
        _wait(lambda: store.get(long_job).step >= 2, 120, "the job to make progress in the worker process")
        assert worker.process.pid != os.getpid() and worker.process.is_alive()
        # a lower CPU priority than the server's: requests go first on a busy CPU
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10
        assert store.cancel(long_job) == "cancelling"
        _wait(lambda: store.get(long_job).status == "cancelled", 60, "the cancel to reach the worker process")
        short_job = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=2))
        _wait(lambda: store.get(short_job).status == "done", 60, "a second job in the same worker process")
        assert not worker.ensure_alive()
        worker.process.kill()  # e.g. the out-of-memory killer
        worker.process.join(10)
        assert worker.ensure_alive()
        after_crash = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=2))
        _wait(lambda: store.get(after_crash).status == "done", 120, "a job in the restarted worker process")
    finally:
        worker.stop(10)
    assert not worker.process.is_alive()
    manifest = json.loads((Path(store.get(short_job).artifacts["run_dir"]) / "manifest.json").read_text())
    assert manifest["cpu_threads"] == 1  # set in the child, whatever the test process uses


_SERVER = """
import sys, time
from age_explorer.core.app.worker import WorkerProcess
WorkerProcess(sys.argv[1], "cpu", threads=1, poll_interval=0.05).start()
print("started", flush=True)
time.sleep(3600)
"""


def test_orphaned_worker_stops_itself_and_the_job_resumes_once_to_the_same_weights(tiny_sd_dir, tmp_path, one_thread):
    data = tmp_path / "data"
    store = JobStore(data)
    job_id = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=24, checkpoint_every=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(data)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = data / "jobs" / job_id / "run"
    try:
        _wait(lambda: (run_dir / "checkpoint").exists() and store.get(job_id).step >= 6, 180, "a checkpoint")
        orphan = store.get(job_id).owner_pid
        assert orphan not in (server.pid, os.getpid(), None) and store.get(job_id).owner_alive
    finally:
        server.send_signal(signal.SIGKILL)  # the server dies; its worker process lives on as an orphan
        server.wait()
    # the restarted server's worker finds the job still owned by a live process: it is left alone,
    # unless the orphan already stopped it
    Worker(JobStore(data), "cpu")
    if store.get(job_id).status == "running":
        with pytest.raises(ValueError, match="still running in process"):
            store.resume(job_id)
    _wait(lambda: store.get(job_id).status == "interrupted", 60, "the orphan to stop the job")
    _wait(lambda: not _alive(orphan), 30, "the orphan to exit")
    assert "its server ended" in store.get(job_id).error
    store.resume(job_id)
    assert Worker(JobStore(data), "cpu").run_one().status == "done"
    steps = [int(line.split(",")[0]) for line in (run_dir / "history.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, len(steps) + 1))  # every step once: one runner at a time

    reference = JobStore(tmp_path / "reference")
    ref_id = reference.submit("erase", _erase_config(str(tiny_sd_dir), iterations=24))
    assert Worker(reference, "cpu").run_one().status == "done"
    ref_file = tmp_path / "reference" / "jobs" / ref_id / "run" / "delta.safetensors"
    assert (run_dir / "delta.safetensors").read_bytes() == ref_file.read_bytes()


def _alive(pid: int) -> bool:
    from age_explorer.core.app.job_store import _pid_alive

    return _pid_alive(pid)


def test_a_sigkilled_worker_is_noticed_by_polling_and_the_job_resumes(tiny_sd_dir, tmp_path):
    from age_explorer.explorer.service import Explorer, Settings

    ex = Explorer(Settings(model=str(tiny_sd_dir), data_dir=str(tmp_path)))
    try:
        options = _erase_config(str(tiny_sd_dir), iterations=500)["options"]
        job_id = ex.submit_erase(options.pop("concepts"), "age", None, options)
        _wait(lambda: ex.store.get(job_id).step >= 2, 120, "the job to run")
        with pytest.raises(ValueError, match="still running in process"):
            ex.resume(job_id)
        first = ex.worker.process
        os.kill(first.pid, signal.SIGKILL)
        # polling alone (no new submit) marks the job and restarts the worker
        _wait(lambda: ex.poll(job_id).status == "interrupted" and ex.worker.process is not first, 10,
              "polling to notice the dead worker")
        assert ex.worker.process.is_alive() and "its worker stopped" in ex.store.get(job_id).error
        ex.resume(job_id)
        _wait(lambda: ex.store.get(job_id).status == "running" and ex.store.get(job_id).owner_pid == ex.worker.process.pid,
              120, "the restarted worker to take the job")
        assert ex.store.cancel(job_id) == "cancelling"
        _wait(lambda: ex.store.get(job_id).status == "cancelled", 60, "the cancel")
    finally:
        ex.worker.stop(10)


def test_a_sigkilled_worker_is_noticed_by_the_server_itself_and_the_next_job_starts(tiny_sd_dir, tmp_path):
    """No page polls here: the server's own watch of its worker process marks the job and starts a new
    worker, which takes the next queued job."""
    from age_explorer.explorer.service import Explorer, Settings

    ex = Explorer(Settings(model=str(tiny_sd_dir), data_dir=str(tmp_path), worker_start_delay=0.0))
    try:
        options = _erase_config(str(tiny_sd_dir), iterations=500)["options"]
        long_job = ex.submit_erase(options.pop("concepts"), "age", None, options)
        short_options = {**options, "iterations": 2}
        next_job = ex.submit_erase(["a red circle"], "age", None, short_options)
        _wait(lambda: ex.store.get(long_job).step >= 2, 120, "the job to run")
        first = ex.worker.process
        os.kill(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: ex.store.get(long_job).status == "interrupted", 5, "the server to notice the dead worker")
        assert time.monotonic() - killed < 5 and "its worker stopped" in ex.store.get(long_job).error
        _wait(lambda: ex.store.get(next_job).status == "done", 120, "the next queued job in a new worker")
        assert ex.worker.process is not first and ex.worker.process.is_alive()
    finally:
        ex.worker.stop(10)


def test_a_runner_whose_lease_was_taken_stops_and_writes_nothing(tmp_path):
    store = JobStore(tmp_path)
    seen = {}

    def runner(ctx):
        store._db().execute("UPDATE jobs SET lease = 'someone-else' WHERE id = ?", (ctx.job.id,))
        ctx.report(1, 10, {"x": 1}, force=True)
        seen["stopped"] = ctx.should_stop()
        from age_explorer.core.app.job_store import JobCancelled

        raise JobCancelled()

    store.submit("lease", {})
    job = Worker(store, "cpu", {"lease": runner}).run_one()
    assert seen["stopped"] and job.status == "running" and job.step == 0 and job.lease == "someone-else"


def test_a_failed_checkpoint_write_fails_the_job_with_the_real_error(tiny_sd_dir, tmp_path, monkeypatch):
    import errno

    from age_explorer.core.erasure import loop

    def full_disk(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_file", full_disk)
    store = JobStore(tmp_path)
    worker = Worker(store, "cpu")
    failing = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=4, checkpoint_every=1))
    job = worker.run_one()
    assert job.id == failing and job.status == "failed"
    assert job.error.startswith("OSError: [Errno 28] No space left on device")
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".checkpoint" in p.name]
    monkeypatch.undo()
    after = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=2))
    assert worker.run_one().status == "done" and store.get(after).status == "done"  # the worker lives on


def test_a_full_database_on_finish_does_not_kill_the_worker(tmp_path, monkeypatch, capsys):
    import sqlite3

    store = JobStore(tmp_path)
    first = store.submit("ok", {})
    worker = Worker(store, "cpu", {"ok": lambda ctx: {}})
    real_finish = store.finish

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "finish", full)
    assert worker.run_one().status == "running"
    assert "could not record job" in capsys.readouterr().err
    monkeypatch.setattr(store, "finish", real_finish)
    second = store.submit("ok", {})
    assert worker.run_one().id == second and store.get(second).status == "done"
    assert store.get(first).heartbeat is not None  # its lease expires: then it is marked interrupted



def test_a_jobs_progress_is_its_last_step_report_and_its_history_is_in_the_run_folder(tiny_sd_dir, tmp_path):
    from age_explorer.core.runs import read_history

    store = JobStore(tmp_path)
    job_id = store.submit("erase", _erase_config(str(tiny_sd_dir), iterations=2))
    assert Worker(store, "cpu", progress_interval=0).run_one().status == "done"
    history = read_history(tmp_path / "jobs" / job_id / "run")
    assert [row["step"] for row in history] == [1, 2, 3, 4]  # AGE: a pi step after each model step
    assert store.get(job_id).progress == {**history[-1], "preview": None}  # the report itself, as asdict


def test_a_damaged_job_row_is_named_and_the_other_jobs_go_on(tmp_path):
    import sqlite3

    from age_explorer.core.app.job_store import DamagedJobError

    store = JobStore(tmp_path)
    broken, good = (store.submit("erase", {"options": {"concepts": [c]}}) for c in ("red circle", "blue circle"))
    with sqlite3.connect(store.path) as db:  # written by hand or by another program
        db.execute("UPDATE jobs SET config = '{broken' WHERE id = ?", (broken,))
    damaged = []
    assert [job.id for job in store.list(damaged=damaged)] == [good]
    assert damaged == [f"job '{broken}' is damaged in the job store: its config is not JSON; cancel it or remove "
                       f"its row"]
    with pytest.raises(DamagedJobError, match="is damaged in the job store") as caught:
        store.get(broken)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    ran = []
    worker = Worker(store, "cpu", runners={"erase": lambda ctx: ran.append(ctx.job.id) or {}})
    assert worker.run_one().id == good and ran == [good]  # the damaged one failed, the next one ran
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT status FROM jobs WHERE id = ?", (broken,)).fetchone()[0] == "failed"
        db.execute("UPDATE jobs SET status = 'running', owner_pid = 999999999, heartbeat = 0 WHERE id = ?", (broken,))
    assert store.mark_interrupted() == [broken]  # a dead owner is found without reading the damaged JSON
    assert store.cancel(broken) == "cancelled"
