"""The explorer's shared state without a server: one copy of the model, runs swapped into it."""

import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.sampling import generate
from age_explorer.explorer import service
from age_explorer.explorer.service import Explorer, Settings


def test_viewing_runs_swaps_their_deltas_into_the_one_loaded_base(toy_bundle, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for concept in ("red circle", "blue square"):
        erase(toy_bundle, make_config("uce", "toy-uce", concepts=[concept]), runs / concept.replace(" ", "-"))
    loads = []
    monkeypatch.setattr(service, "load_bundle", lambda *a, **k: loads.append(a) or load_bundle(*a, **k))
    explorer = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False))
    prompt, seeds = ["a red circle"], [0, 1]
    with explorer.model() as base:
        original = generate(base, prompt, seeds, steps=5)
    for run in sorted(runs.iterdir()):
        with explorer.model(str(run)) as bundle:
            assert bundle is base
            erased = generate(bundle, prompt, seeds, steps=5)
        assert torch.equal(erased, generate(load_bundle(str(run), device="cpu"), prompt, seeds, steps=5))
        assert not torch.equal(erased, original)  # UCE edits the keys and values every prompt reads
    assert len(loads) == 1  # the base, once; no run loaded a model of its own
    with explorer.model() as again:
        assert torch.equal(generate(again, prompt, seeds, steps=5), original)


def test_the_pages_browser_key_is_made_once_owner_only_and_rotated_by_deleting_it(tmp_path):
    import os
    import stat

    from age_explorer.explorer.service import BROWSER_KEY_FILE, browser_state_key

    key = browser_state_key(tmp_path)
    path = tmp_path / BROWSER_KEY_FILE
    assert len(key) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert browser_state_key(tmp_path) == key  # a restart reads the same key
    assert not list(tmp_path.glob(".*.tmp"))
    path.chmod(0o644)  # e.g. copied with another umask: made owner-only again, same key
    assert browser_state_key(tmp_path) == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("cut")  # a damaged key is replaced
    replaced = browser_state_key(tmp_path)
    assert replaced != key and len(replaced) >= 32
    path.unlink()  # rotation
    rotated = browser_state_key(tmp_path)
    assert rotated not in (key, replaced) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.access(path, os.R_OK)


def test_the_page_encrypts_its_browser_state_with_the_data_folders_key(tmp_path):
    from age_explorer.explorer.app import build_app

    settings = Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False)
    secrets = []
    for _ in range(2):  # two starts of the server on one data folder
        config = build_app(settings).get_config_file()
        states = [c["props"] for c in config["components"] if c["type"] == "browserstate"]
        assert {s["storage_key"] for s in states} == {"age_explorer_job", "age_explorer_owner"}
        secrets.append({s["secret"] for s in states})
    assert secrets[0] == secrets[1] == {(tmp_path / "browser-state.key").read_text().strip()}


def test_public_mode_caps_each_sessions_queued_and_running_jobs(tmp_path):
    import threading

    import pytest

    ex = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path), start_worker=False, public=True,
                           max_jobs_per_session=2))

    def submit(owner):
        return ex.submit_erase(["red circle"], "age", "toy", {"iterations": 5}, owner=owner)

    first, second = submit("alice"), submit("alice")
    with pytest.raises(ValueError, match=r"you already have 2 job\(s\) queued or running, the most one visitor may "
                                         r"have on this server: wait for one to end or cancel one") as refused:
        submit("alice")
    assert "\n" not in str(refused.value)
    bob = submit("bob")  # another session has its own allowance
    assert [job.id for job in ex.jobs_of("alice")] == [first, second] and [j.id for j in ex.jobs_of("bob")] == [bob]
    assert ex.cancel(first, "alice") == "cancelled"  # each of her jobs, not only the latest
    third = submit("alice")
    assert [job.id for job in ex.jobs_of("alice")] == [second, third]

    # parallel submits of one session never pass the cap together: it is counted in the submit's transaction
    results = []

    def racer():
        try:
            results.append(submit("carol"))
        except ValueError:
            results.append(None)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results) == 2 and len(ex.jobs_of("carol")) == 2

    local = Explorer(Settings(model="toy", device="cpu", data_dir=str(tmp_path / "local"), start_worker=False))
    assert all(local.submit_erase(["red circle"], "age", "toy", {}, owner=None) for _ in range(4))  # one user: no cap
    with pytest.raises(ValueError, match="jobs per session must be a whole number of at least 1"):
        Settings(max_jobs_per_session=0)
