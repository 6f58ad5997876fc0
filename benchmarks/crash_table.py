"""The crash table: an erasure stopped in each way a server or a terminal can stop it, then resumed, against
an uninterrupted run of the same configuration.

On the toy model (CPU), each server row starts ``python app.py`` (local mode, a fresh data folder) as a
deployment runs it, starts a 30-step AGE erasure through the page's API (``/start_erase``; the page's jobs
write a checkpoint every 25 steps), and once the job is past its checkpoint:

- **kill -9 worker**: SIGKILL to the job's worker process; the server stays up;
- **kill -9 server**: SIGKILL to the server process alone, then a new server on the same data folder;
- **kill process group**: SIGKILL to the server's process group (server and worker), then a new server;
- **full disk**: the data folder is a small tmpfs, filled up to its last byte; freed again once the job
  has stopped (needs root, for the mount);

then resumes the job as the page's Resume button of the jobs list does (``/resume_job``, on the restarted
server where the row killed it). The **Ctrl-C** row runs ``age-explorer erase``, sends SIGINT mid-way and
continues with ``erase --resume``. Each row: whether the run folder and its checkpoint survived, whether the
job could be resumed (from the page, or with ``--resume``), and whether the finished delta's sha256 equals an
uninterrupted run's (one through a server, one through the CLI, each computed once).

    python benchmarks/crash_table.py              # about 8 minutes on 2 cores
    python benchmarks/crash_table.py --iterations 40 --rows worker,server
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client
from safetensors.torch import load_file

from age_explorer.core.app.job_store import JobStore
from load_test import connect, free_port  # benchmarks/: the same server start-up as the load test

ROOT = Path(__file__).resolve().parent.parent
CONCEPT, PRESET = "red circle", "toy"
PAGE_CHECKPOINT = 25  # the page's jobs checkpoint every 25 model steps (explorer/tabs/erase.py)
ENDED = ("done", "failed", "cancelled", "interrupted")
BAR = re.compile(r"age:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")  # the CLI's progress bar (tqdm) of an AGE run


def wait_for(predicate, timeout: float, what: str, every: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def checkpoint_intact(run_dir: Path) -> tuple[bool, int | None]:
    """Whether the run folder holds a checkpoint that loads (its state and tensors), and its next step."""
    folder = run_dir / "checkpoint"
    try:
        step = json.loads((folder / "state.json").read_text())["next_step"]
        load_file(str(folder / "state.safetensors"))
        return True, step
    except (OSError, ValueError, KeyError, RuntimeError):
        return False, None


class Server:
    """``python app.py`` on a free port, in a process group of its own (so that one row can kill it whole)."""

    def __init__(self, data_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--device", "cpu", "--no-public",
                                             "--no-start-page", "--data-dir", str(data_dir), "--port", str(self.port)],
                                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = connect(self.url, self.process, log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_job(client: Client, iterations: int) -> str:
    job_id, *_ = client.predict([CONCEPT], "", "age", PRESET, iterations, 1.0, "gumbel", "", "(preset)", "",
                                api_name="/start_erase")
    return job_id


def status(client: Client, job_id: str) -> dict:
    return json.loads(client.predict(job_id, api_name="/job_status"))


def wait_ended(client: Client, job_id: str, timeout: float) -> dict:
    return wait_for(lambda: (s := status(client, job_id))["status"] in ENDED and s, timeout, f"job {job_id} to end", 0.5)


def resume_from_page(client: Client, job_id: str, timeout: float = 120) -> float:
    """Resume as the jobs list's Resume button does; a job whose worker the store does not yet know to be
    gone (its lease still fresh) is refused with one line, and asked again. Returns the seconds until it
    was accepted."""
    started = time.time()
    while True:
        try:
            client.predict(job_id, api_name="/resume_job")
            return time.time() - started
        except Exception as err:  # the page's refusal, one line
            if time.time() - started > timeout:
                raise RuntimeError(f"resume refused: {err}") from None
            time.sleep(1)


def kill_worker(server: Server, store: JobStore, job_id: str) -> Server:
    os.kill(store.get(job_id).owner_pid, signal.SIGKILL)
    return server


def kill_server(server: Server, store: JobStore, job_id: str) -> Server:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    return None


def kill_group(server: Server, store: JobStore, job_id: str) -> Server:
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    return None


def fill_disk(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system is full; returns it (deleting it frees the disk)."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 16))
                out.flush()
        except OSError:
            pass
    return filler


def server_row(name: str, interrupt, iterations: int, work: Path, full_disk: bool = False) -> dict:
    """One server row: start a job, interrupt it past its checkpoint, resume it from the (restarted) page."""
    data_dir = work / name.replace(" ", "-")
    data_dir.mkdir()
    mounted = False
    if full_disk:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(data_dir)], check=True)
        mounted = True
    log = work / f"{data_dir.name}.log"
    server = Server(data_dir, log)
    row = {"row": name}
    try:
        store = JobStore(data_dir)
        job_id = start_job(server.client, iterations)
        run_dir = store.work_dir(job_id) / "run"
        wait_for(lambda: store.get(job_id).step > PAGE_CHECKPOINT and (run_dir / "checkpoint" / "state.json").is_file(),
                 300, "the job to pass its checkpoint")
        job = store.get(job_id)
        stopped_at = f"{job.step}/{job.total}"
        if full_disk:
            filler = fill_disk(data_dir)
            # the job fails at its next write; with the disk full the store cannot record that either (the
            # worker says so in its log): the row stays "running" until its lease expires, and the page's
            # next poll or Resume marks it interrupted
            failure = wait_for(lambda: next((line for line in log.read_text(errors="replace").splitlines()
                                             if "could not record job" in line), None)
                               or (store.get(job_id).status in ENDED and store.get(job_id).error), 300,
                               "the job to stop on the full disk")
            filler.unlink()  # the operator frees the disk
            row["how it stopped"] = f"failed after step {stopped_at}: {failure.strip().splitlines()[0][:110]}"
        else:
            server = interrupt(server, store, job_id)
            if server is None:  # the row killed the server: a new one on the same data folder
                server = Server(data_dir, log)
            ended = wait_ended(server.client, job_id, 120)
            row["how it stopped"] = f"{ended['status']} after step {stopped_at}"
        row["survived"], row["checkpoint step"] = checkpoint_intact(run_dir)
        row["survived"] = row["survived"] and run_dir.is_dir()
        try:
            row["resume accepted after s"] = resume_from_page(server.client, job_id)
            finished = wait_ended(server.client, job_id, 600)
            row["resumed"] = finished["status"] == "done"
            if not row["resumed"]:
                row["how it stopped"] += (f"; resumed, it ended {finished['status']}: "
                                          f"{((finished.get('error') or '').strip().splitlines() or [''])[0][:110]}")
        except (RuntimeError, TimeoutError) as err:
            row["resumed"], row["how it stopped"] = False, f"{row['how it stopped']}; {err}"
        row["sha256"] = sha256(run_dir / "delta.safetensors")
    finally:
        server.stop()
        orphan = JobStore(data_dir).get(job_id).owner_pid if "job_id" in locals() else None
        if orphan:  # a worker a killed server left behind (it stops itself; this is only a safety net)
            try:
                os.kill(orphan, signal.SIGKILL)
            except OSError:
                pass
        if mounted:
            subprocess.run(["umount", "-l", str(data_dir)], check=False)
    return row


def reference_through_server(iterations: int, work: Path) -> str:
    data_dir = work / "reference-server"
    data_dir.mkdir()
    server = Server(data_dir, work / "reference-server.log")
    try:
        job_id = start_job(server.client, iterations)
        ended = wait_ended(server.client, job_id, 600)
        if ended["status"] != "done":
            raise RuntimeError(f"the uninterrupted job ended {ended['status']}: {ended.get('error')}")
        return sha256(JobStore(data_dir).work_dir(job_id) / "run" / "delta.safetensors")
    finally:
        server.stop()


def cli_erase(out: Path, iterations: int, resume: bool = False) -> subprocess.Popen:
    # one thread, as the worker of a 2-core server uses, so that both references can be compared
    command = [sys.executable, "-m", "age_explorer.core.app.cli", "erase", "--model", "toy", "--preset", PRESET,
               "--concepts", CONCEPT, "--iterations", str(iterations), "--threads", "1",
               "--target-check-images", "0", "--out", str(out)] + (["--resume"] if resume else [])
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def ctrl_c_row(iterations: int, work: Path) -> tuple[dict, str]:
    """Ctrl-C (SIGINT) of ``age-explorer erase`` mid-way, then ``erase --resume``; and the CLI reference."""
    reference = cli_erase(work / "reference-cli", iterations)
    _, reference_err = reference.communicate(timeout=600)
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted CLI run failed: {reference_err[-500:]}")
    out = work / "ctrl-c"
    run = cli_erase(out, iterations)
    seen = ProgressReader(run)
    wait_for(lambda: run.poll() is not None or 2 * seen.step()[0] >= seen.step()[1], 300, "half the steps", 0.2)
    run.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
    stderr = seen.rest()
    run.wait(120)
    lines = [line for line in stderr.replace("\r", "\n").splitlines()  # what it printed besides its progress bars
             if line.strip() and not line.startswith(("age:", "Loading weights"))]
    survived, step = checkpoint_intact(out)
    resumed = cli_erase(out, iterations, resume=True)
    _, resume_err = resumed.communicate(timeout=600)
    row = {"row": "Ctrl-C of age-explorer erase", "how it stopped": f"exit {run.returncode} at step {step}: "
           + (lines[-1][:120] if lines else "(nothing)") + (f" ({len(lines)} lines)" if len(lines) != 1 else ""),
           "survived": survived and out.is_dir(), "checkpoint step": step, "resumed": resumed.returncode == 0,
           "sha256": sha256(out / "delta.safetensors")}
    if resumed.returncode != 0:
        row["how it stopped"] += f"; --resume: {resume_err.strip().splitlines()[-1][:90]}"
    return row, sha256(work / "reference-cli" / "delta.safetensors")


class ProgressReader:
    """The CLI's stderr (its progress bar, then its last lines), read as it comes without blocking."""

    def __init__(self, run: subprocess.Popen):
        self.fd, self.text = run.stderr.fileno(), ""
        os.set_blocking(self.fd, False)

    def _read(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                self.text += chunk.decode(errors="replace")
        except BlockingIOError:
            pass

    def step(self) -> tuple[int, int]:
        """(step, total) the run's progress bar last showed ("age:  45%|####  | 27/60 [...]")."""
        self._read()
        bars = BAR.findall(self.text[-2000:])
        return (int(bars[-1][0]), int(bars[-1][1])) if bars else (0, 1)

    def rest(self) -> str:
        os.set_blocking(self.fd, True)
        self.text += os.fdopen(os.dup(self.fd), errors="replace").read()
        return self.text


ROWS = {"worker": ("kill -9 worker", kill_worker), "server": ("kill -9 server", kill_server),
        "group": ("kill the server's process group", kill_group), "disk": ("full disk", None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=30, help=f"model steps (more than {PAGE_CHECKPOINT})")
    parser.add_argument("--rows", default="worker,server,group,disk,ctrl-c",
                        help="comma-separated: worker, server, group, disk, ctrl-c")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        page_reference = reference_through_server(args.iterations, work)
        print(f"uninterrupted run through a server: delta sha256 {page_reference}", flush=True)
        for key in [k for k in ROWS if k in wanted]:
            name, interrupt = ROWS[key]
            if key == "disk" and os.geteuid() != 0:
                rows.append({"row": name, "how it stopped": "not run: mounting a small tmpfs needs root"})
                continue
            started = time.time()
            rows.append(server_row(name, interrupt, args.iterations, work, full_disk=key == "disk"))
            print(f"{name}: {rows[-1]} ({time.time() - started:.0f} s)", flush=True)
        cli_reference = None
        if "ctrl-c" in wanted:
            row, cli_reference = ctrl_c_row(args.iterations, work)
            rows.append(row)
            print(f"uninterrupted run through the CLI: delta sha256 {cli_reference}", flush=True)
    print(f"\nAGE, preset {PRESET}, {CONCEPT!r}, {args.iterations} steps, toy model on the CPU; reference delta sha256: "
          f"server {page_reference[:12]}…, CLI {cli_reference[:12] + '…' if cli_reference else '-'}"
          + (" (the same)" if page_reference == cli_reference else ""))
    print("\n| interruption | how it stopped | run folder + checkpoint intact | resumed (page / `--resume`) | "
          "same delta sha256 as uninterrupted |")
    print("|---|---|---|---|---|")
    ok = True
    for row in rows:
        if "survived" not in row:
            print(f"| {row['row']} | {row['how it stopped']} | - | - | - |")
            continue
        reference = cli_reference if row["row"].startswith("Ctrl-C") else page_reference
        same = row.get("sha256") is not None and row["sha256"] == reference
        ok &= row["survived"] and row["resumed"] and same
        how = row["how it stopped"].replace("|", "/")
        waited = row.get("resume accepted after s", 0)
        resumed = ("yes" if row["resumed"] else "no") + (f" (accepted after {waited:.0f} s)" if waited >= 2 else "")
        print(f"| {row['row']} | {how} | {'yes' if row['survived'] else 'no'} (checkpoint at step "
              f"{row['checkpoint step']}) | {resumed} | {'yes' if same else 'no'} "
              f"(`{(row.get('sha256') or 'none')[:12]}…`) |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
