"""Load test of the explorer: simulated users browse graphs and generate images while one erasure runs.

Starts ``python app.py`` on a free local port (toy model on the CPU, a fresh data dir) as its own
process, as a deployment runs it, runs the same erasure twice through the page's API, first alone
and then while ``--users`` gradio_client users keep selecting concepts, reading spillover rows and
generating images, and prints a table: requests served, errors, latency percentiles per endpoint,
the erasure's time alone and under load, and whether both runs produced the same weights (same
checksum of the delta).

The users stand for browsers on other machines, but run on this one. By default each is its own
process at niceness 5 (``--client-niceness``): below the server (0), so that the server, not the
clients' own work, is what is measured, and above the server's erasure worker (10), which a browser
never waits for; a user at niceness 19 waits for the worker's core before it can send a request or
read its answer. ``--clients threads --client-niceness 0`` runs them as threads of this process at
normal priority (they then also wait for each other's GIL).

    python benchmarks/load_test.py --users 20 --iterations 30
    python benchmarks/load_test.py --users 20 --iterations 30 --public --jobs-per-user 4   # each user also submits
                                                                                        # jobs, one past the cap
    python benchmarks/load_test.py ... --app OLD/app.py@OLDPKG --app app.py   # two trees, one after the other

(``APP@PATH``: start APP with PYTHONPATH=PATH, a folder whose ``age_explorer`` package is the other tree's.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from gradio_client import Client

from age_explorer.core.runs import RunManifest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 180) -> Client:
    end = time.time() + timeout
    while time.time() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            return Client(url, verbose=False)
        except Exception:  # not listening yet
            time.sleep(1)
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s")


def erase_and_wait(client: Client, concept: str, iterations: int) -> tuple[dict, float]:
    start = time.time()
    job_id, *_ = client.predict([concept], "", "age", "toy", iterations, 1.0, "gumbel", "", "(preset)", "", api_name="/start_erase")
    while True:
        status = json.loads(client.predict(job_id, api_name="/job_status"))
        if status["status"] in ("done", "failed", "cancelled", "interrupted"):
            return status, time.time() - start
        time.sleep(0.5)


SLOW = 1.0  # s: a graph query slower than this is reported with when it was sent
CAP_REFUSAL = "the most one visitor may have"  # the per-session job cap's one line (public mode)


def user(url: str, graph: str, concepts: list[str], stop, seed: int, niceness: int, results, jobs: int = 0) -> None:
    """One simulated user: first ``jobs`` short erasures submitted (a public server refuses those over its
    per-session cap), then random requests, one at a time, until ``stop``; puts (latencies, errors,
    jobs accepted, jobs refused at the cap)."""
    if niceness:
        os.nice(niceness)
    rng = random.Random(seed)
    client = Client(url, verbose=False)
    accepted = refused = 0
    errors = []
    for _ in range(jobs):
        try:
            client.predict([rng.choice(concepts)], "", "esd", "toy-esd", 2, 1.0, "gumbel", "", "(preset)", "",
                           api_name="/start_erase")
            accepted += 1
        except Exception as err:  # the cap's refusal is the expected answer; anything else is an error
            if CAP_REFUSAL in str(err):
                refused += 1
            else:
                errors.append(f"start_erase: {err}")
    first = rng.randrange(1000)
    actions = [
        ("select_concept", lambda c: client.predict(graph, 0.3, "shape", c, api_name="/select_concept")),
        ("concept_spillover", lambda c: client.predict(c, graph, api_name="/concept_spillover")),
        ("generate", lambda c: client.predict(f"a {c}", f"{first}-{first + 1}", "original", api_name="/generate")),
    ]
    latencies = defaultdict(list)
    while not stop.is_set():
        name, action = rng.choice(actions)
        start = time.time()
        try:
            action(rng.choice(concepts))
            latencies[name].append((start, time.time() - start))
        except Exception as err:  # recorded and reported: the point is to count them
            errors.append(f"{name}: {err}")
    results.put((dict(latencies), errors, accepted, refused))


def measure(args, app: str) -> dict:
    """One load test against ``app`` (``APP.py`` or ``APP.py@PATH``); prints its table, returns its numbers."""
    script, _, path = app.partition("@")
    env = {**os.environ, **({"PYTHONPATH": path} if path else {})}
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        log_path = Path(data_dir) / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, script, "--device", "cpu", "--data-dir", data_dir,
                                       "--port", str(port), "--public" if args.public else "--no-public"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = connect(url, server, log_path)
            graphs = [g["graph"] for g in client.predict(api_name="/list_graphs")]
            if not graphs:
                raise SystemExit("no graph to browse: assets/graphs is empty")
            graph = graphs[0]
            concepts = [c["concept"] for c in client.predict(graph, api_name="/list_concepts")]

            alone, alone_s = erase_and_wait(client, args.concept, args.iterations)
            if args.clients == "processes":
                ctx = multiprocessing.get_context("spawn")
                stop, results, start_user = ctx.Event(), ctx.Queue(), ctx.Process
            else:
                stop, results, start_user = threading.Event(), queue.Queue(), threading.Thread
            users = [start_user(target=user, args=(url, graph, concepts, stop, i,
                                                   args.client_niceness if args.clients == "processes" else 0,
                                                   results, args.jobs_per_user)) for i in range(args.users)]
            window_start = time.time()
            for u in users:
                u.start()
            loaded, loaded_s = erase_and_wait(client, args.concept, args.iterations)
            stop.set()
            latencies, errors, accepted, refused = defaultdict(list), [], 0, 0
            for _ in users:
                user_latencies, user_errors, user_accepted, user_refused = results.get(timeout=600)
                for name, values in user_latencies.items():  # (seconds into the window, latency)
                    latencies[name] += [(start - window_start, seconds) for start, seconds in values]
                errors += user_errors
                accepted, refused = accepted + user_accepted, refused + user_refused
            for u in users:
                u.join()
        finally:
            server.terminate()
            server.wait(30)

        # a public server names run folders relative to its data folder
        sums = [RunManifest.read(Path(data_dir) / s["artifacts"]["run_dir"]).delta_sha256 if s["status"] == "done"
                else None for s in (alone, loaded)]
    print(f"{app}: {args.users} users ({args.clients}, niceness {args.client_niceness}) for {loaded_s:.0f} s "
          f"against graph {graph!r}")
    print(f"{'endpoint':<20}{'requests':>9}{'p50 s':>8}{'p95 s':>8}{'max s':>8}")
    for name, values in sorted(latencies.items()):
        v = np.array([seconds for _, seconds in values])
        print(f"{name:<20}{len(v):>9}{np.percentile(v, 50):>8.2f}{np.percentile(v, 95):>8.2f}{v.max():>8.2f}")
    for name, values in sorted(latencies.items()):  # when the slow ones were sent: a burst, or all along
        slow = sorted(at for at, seconds in values if seconds > SLOW and name != "generate")
        if slow:
            print(f"{name}: {len(slow)} requests over {SLOW:.0f} s, sent {slow[0]:.0f}-{slow[-1]:.0f} s into the window")
    if args.jobs_per_user:
        print(f"jobs submitted by the users: {accepted} accepted, {refused} refused at the per-session cap")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    print(f"erasure alone: {alone['status']} in {alone_s:.0f} s; under load: {loaded['status']} in {loaded_s:.0f} s "
          f"({loaded_s / alone_s:.2f}x)")
    same = sums[0] is not None and sums[0] == sums[1]
    print(f"same weights alone and under load: {same} ({sums[0]} / {sums[1]})")
    ok = not errors and alone["status"] == loaded["status"] == "done" and same
    print("result:", "all requests served, erasure unaffected" if ok else "FAILED", flush=True)
    return {"ok": ok, "window": loaded_s, "latencies": latencies, "errors": len(errors)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40, help="model steps of the erasure (toy preset)")
    parser.add_argument("--concept", default="red circle")
    parser.add_argument("--clients", choices=["processes", "threads"], default="processes",
                        help="each user a process of its own (default), or a thread of this process")
    parser.add_argument("--client-niceness", type=int, default=5,
                        help="CPU niceness of the users (default 5: below the server, above its erasure worker "
                             "at 10; 0: as the server)")
    parser.add_argument("--public", action="store_true", help="serve in public mode (per-session jobs and cap)")
    parser.add_argument("--jobs-per-user", type=int, default=0,
                        help="short erasures each user submits first (with --public: up to the cap and past it)")
    parser.add_argument("--app", action="append", default=None,
                        help="app.py to serve, APP or APP@PATH (PYTHONPATH=PATH: a folder whose age_explorer "
                             "package is another tree's); repeatable, one load test each, in turn; default this tree's")
    args = parser.parse_args()
    if args.clients == "threads" and args.client_niceness:  # threads share the process's priority: it steps back
        os.nice(args.client_niceness)

    apps = args.app or [str(ROOT / "app.py")]
    measured = {app: measure(args, app) for app in apps}
    if len(apps) > 1:
        names = sorted({name for m in measured.values() for name in m["latencies"]})
        print("\n| app | window s | " + " | ".join(f"{n} p50 / p95 / max s (requests)" for n in names) + " | errors |")
        print("|---" * (len(names) + 3) + "|")
        for app, m in measured.items():
            cells = []
            for name in names:
                v = np.array([seconds for _, seconds in m["latencies"].get(name, [(0, np.nan)])])
                cells.append(f"{np.percentile(v, 50):.2f} / {np.percentile(v, 95):.2f} / {v.max():.2f} ({len(v)})")
            print(f"| {app} | {m['window']:.0f} | " + " | ".join(cells) + f" | {m['errors']} |")
    return 0 if all(m["ok"] for m in measured.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
