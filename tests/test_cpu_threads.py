"""The CPU thread rule (core.cpu_threads): free cores at start, explicit counts first, resume keeps its count."""

import subprocess
import sys

import pytest
import torch

from age_explorer.core import cpu_threads


def fake_stat(busy_per_cpu: dict[int, int], idle_per_cpu: dict[int, int]) -> str:
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu in busy_per_cpu:
        # user nice system idle iowait irq softirq steal guest guest_nice
        lines.append(f"cpu{cpu} {busy_per_cpu[cpu]} 0 0 {idle_per_cpu[cpu]} 0 0 0 0 0 0")
    return "\n".join(lines) + "\nintr 1 2 3\n"


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: None)


@pytest.mark.parametrize("busy_jiffies, threads", [
    ((0, 0), 2),      # idle: a team of both cores, as torch's default
    ((20, 0), 1),     # one core kept busy by another process
    ((20, 20), 1),    # both busy: one thread, never zero
    ((4, 2), 2),      # background noise (0.3 cores) rounds to none
])
def test_the_rule_leaves_the_busy_cores_to_their_owners(two_cores, monkeypatch, busy_jiffies, threads):
    samples = iter([fake_stat({0: 0, 1: 0}, {0: 100, 1: 100}),
                    fake_stat({0: busy_jiffies[0], 1: busy_jiffies[1]},
                              {0: 120 - busy_jiffies[0], 1: 120 - busy_jiffies[1]})])
    monkeypatch.setattr(cpu_threads.Path, "read_text", lambda self: next(samples))
    assert cpu_threads.default_threads()[0] == threads


def test_cores_outside_the_affinity_do_not_count(two_cores, monkeypatch):
    samples = iter([fake_stat({0: 0, 1: 0, 2: 0}, {0: 100, 1: 100, 2: 100}),
                    fake_stat({0: 0, 1: 0, 2: 20}, {0: 120, 1: 120, 2: 100})])  # cpu2 busy, but not ours
    monkeypatch.setattr(cpu_threads.Path, "read_text", lambda self: next(samples))
    assert cpu_threads.default_threads()[0] == 2


def test_a_cgroup_quota_caps_the_usable_cores(monkeypatch):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu_threads.Path, "read_text", lambda self: "200000 100000\n")
    assert cpu_threads.usable_cores() == 2
    monkeypatch.setattr(cpu_threads.Path, "read_text", lambda self: "max 100000\n")
    assert cpu_threads.usable_cores() == 64


def test_an_explicit_count_wins_and_a_bad_one_is_refused(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_chosen", {})
    monkeypatch.setattr(cpu_threads, "default_threads", lambda: pytest.fail("the rule ran despite an explicit count"))
    try:
        assert cpu_threads.configure(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(cpu_threads, "_chosen", {})
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu_threads.configure() == 1 and cpu_threads.chosen()["reason"] == "OMP_NUM_THREADS"
        with pytest.raises(ValueError, match="--threads must be a whole number >= 1"):
            cpu_threads.configure(0)
    finally:
        torch.set_num_threads(before)


def test_the_cli_uses_the_rule_and_records_it_in_the_manifest(tmp_path):
    """A CLI erase in a fresh process: the manifest's cpu_threads is the count the rule chose there."""
    probe = ("import json, sys\n"
             "from age_explorer.core.app.cli.main import main\n"
             "from age_explorer.core import cpu_threads\n"
             f"code = main(['erase', '--model', 'toy', '--concept', 'red circle', '--method', 'esd', '--target', '',"
             f" '--iterations', '1', '--out', {str(tmp_path / 'run')!r}])\n"
             "print(json.dumps(cpu_threads.chosen()))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    chosen = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    manifest = __import__("json").loads((tmp_path / "run" / "manifest.json").read_text())
    assert chosen["reason"].endswith("busy") or chosen["reason"] == "1 usable core"
    assert manifest["cpu_threads"] == chosen["threads"]


def test_resume_continues_with_the_thread_count_the_run_started_with(tmp_path, toy_bundle, one_thread):
    from age_explorer.core.app.cli.erase import started_threads
    from age_explorer.core.erasure import erase, make_config

    assert started_threads(tmp_path / "run") is None  # nothing there yet: the rule decides
    config = make_config("esd", "toy-esd", concepts=["red circle"], target="", iterations=4, checkpoint_every=1)
    result = erase(toy_bundle, config, tmp_path / "run", stop=lambda: True)
    assert result.status == "stopped"
    torch.set_num_threads(2)  # the resuming process would choose otherwise
    assert started_threads(tmp_path / "run") == 1
