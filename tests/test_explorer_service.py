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
