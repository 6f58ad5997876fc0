"""The erasure engine on a tiny random SD pipeline (mechanics) and on the toy model (behaviour)."""

import math

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.erasure.age import gumbel_softmax
from age_explorer.core.erasure.params import PARAMETER_SETS, select_parameters
from age_explorer.core.runs import CorruptRunError, run_weights
from age_explorer.core.sampling import generate
from tests.tiny_models import CANDIDATES
from tests.tiny_models import TINY_SD_RECIPE as TINY


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


def _snapshot(bundle):
    return {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}


@pytest.mark.parametrize("method, options, parameter_set", [
    ("esd", dict(parameter_set="xattn"), "xattn"),
    ("esd", dict(parameter_set="noxattn", preserve_weight=0.1), "noxattn"),
    ("age", dict(parameter_set="xattn", candidates=CANDIDATES, lr=1e-3), "xattn"),
    ("age", dict(parameter_set="selfattn", candidates=CANDIDATES, target_search="damage"), "selfattn"),
    ("age", dict(parameter_set="full", candidates=CANDIDATES, gumbel_hard=True, pi_l1=True), "full"),
    ("uce", dict(preserve=["a cat"]), "xattn_kv"),
])
def test_each_method_changes_only_its_parameter_set(sd, tmp_path, method, options, parameter_set):
    before = _snapshot(sd)
    opts = dict(options) if method == "uce" else {**TINY, **options}
    config = make_config(method, None, concepts=["a red circle"], **opts)
    result = erase(sd, config, tmp_path / "run")
    assert result.status == "done"
    # The bundle is left as it was.
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    allowed = PARAMETER_SETS[parameter_set][0]
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"the method changed nothing: {result.manifest.changed_parameters}"
    assert all(allowed(n) for n in changed), [n for n in changed if not allowed(n)]
    assert result.manifest.changed_parameters == len(changed)


def test_save_load_reproduces_outputs_exactly(sd, tmp_path):
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, lr=1e-2, **TINY)
    captured = {}

    def keep_weights(report):
        if report.step == config.iterations * config.pgd_num_steps:
            captured.update({n: p.detach().clone() for n, p in sd.unet.named_parameters()})

    erase(sd, config, tmp_path / "run", callbacks=[keep_weights])
    loaded = load_bundle(str(tmp_path / "run"), device="cpu")
    for name, p in loaded.unet.named_parameters():
        assert torch.equal(p, captured[name]), name
    a = generate(loaded, ["a red circle"], [0], steps=3)
    b = generate(load_bundle(str(tmp_path / "run"), device="cpu"), ["a red circle"], [0], steps=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(sd, ["a red circle"], [0], steps=3))


@pytest.mark.parametrize("options", [{}, dict(share_draws=True, concepts=["a red circle", "a dog"]),
                                     dict(batch_pi_chain=True, concepts=["a red circle", "a dog"])])
def test_resume_continues_the_same_run(sd, tmp_path, options):
    # Stopping after step 3 (a model step) leaves a pi step next: with share_draws or batch_pi_chain it
    # needs the saved draws.
    config = make_config("age", None, **{"concepts": ["a red circle"], "candidates": CANDIDATES, "lr": 1e-3,
                                         **TINY, "iterations": 4, **options})
    erase(sd, config, tmp_path / "whole")
    stop_after = {"n": 0}

    def stop():
        return stop_after["n"] >= 3

    def count(report):
        stop_after["n"] = report.step

    stopped = erase(sd, config, tmp_path / "split", callbacks=[count], stop=stop)
    assert stopped.status == "stopped" and stopped.steps_done == 3
    assert (tmp_path / "split" / "checkpoint" / "state.safetensors").is_file()
    with pytest.raises(CorruptRunError, match="did not finish"):
        load_bundle(str(tmp_path / "split"), device="cpu")
    resumed = erase(sd, config, tmp_path / "split", resume=True)
    assert resumed.status == "done" and resumed.steps_done == 8
    whole = load_bundle(str(tmp_path / "whole"), device="cpu")
    split = load_bundle(str(tmp_path / "split"), device="cpu")
    for (name, p), (_, q) in zip(whole.unet.named_parameters(), split.unet.named_parameters()):
        assert torch.equal(p, q), name



def test_history_is_appended_per_step_and_read_once_per_step_after_a_resume(sd, tmp_path):
    """history.jsonl holds each step's report as it happens; a run killed after its checkpoint has rows
    past it, which the resumed run replaces; a run folder with only history.csv reads the same rows."""
    import json

    from age_explorer.core.runs import HISTORY, read_history

    run = tmp_path / "run"
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, lr=1e-3,
                         **{**TINY, "iterations": 3})
    lengths = []
    stopped = erase(sd, config, run, callbacks=[lambda r: lengths.append(len(read_history(run)))],
                    stop=lambda: len(lengths) >= 3)
    assert stopped.status == "stopped" and lengths == [1, 2, 3]  # on disk before each callback ran
    with open(run / HISTORY, "a") as f:  # what a run killed at step 4, after the checkpoint at 3, leaves
        f.write(json.dumps({**read_history(run)[-1], "step": 4, "losses": {"erase": -1.0}}) + "\n")
        f.write('{"step": 5, "phase": "mo')  # and a report cut short: killed, or the disk full, mid-write
    assert [r["step"] for r in read_history(run)] == [1, 2, 3, 4]
    erase(sd, config, run, resume=True)
    rows = read_history(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[3]["losses"] != {"erase": -1.0}
    (run / HISTORY).unlink()
    old = read_history(run)
    assert [(r["step"], r["phase"], r["concept"]) for r in old] == [(r["step"], r["phase"], r["concept"]) for r in rows]
    assert [r["losses"] for r in old] == [pytest.approx(r["losses"]) for r in rows]
    assert read_history(tmp_path / "nothing") == []
    (run / HISTORY).write_text('{"step": 1, "ph\n' + json.dumps(rows[1]) + "\n")  # damage before the end
    with pytest.raises(CorruptRunError, match="line 1 is not a step report"):
        read_history(run)


def test_stop_ends_within_one_step_with_a_usable_checkpoint(sd, tmp_path):
    config = make_config("esd", None, concepts=["a red circle"], **{**TINY, "iterations": 50})
    seen = []
    result = erase(sd, config, tmp_path / "run", callbacks=[lambda r: seen.append(r.step)],
                   stop=lambda: len(seen) >= 2)
    assert result.status == "stopped" and seen == [1, 2]
    resumed = erase(sd, config, tmp_path / "run", resume=True,
                    stop=lambda: len(seen) >= 4, callbacks=[lambda r: seen.append(r.step)])
    assert resumed.status == "stopped" and seen == [1, 2, 3, 4]


def test_pi_mixture_sums_to_one_and_excludes_the_concept(sd, tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7)
    for hard in (True, False):
        w = gumbel_softmax(logits, 0.5, hard, 3, torch.rand(7, generator=g))
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
        assert (w >= -1e-6).all()
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES + ["A Red Circle"],
                         synonyms=["a tree"], **TINY)
    result = erase(sd, config, tmp_path / "run")
    import pandas as pd

    targets = pd.read_csv(tmp_path / "run" / "targets.csv")
    names = set(targets.candidate)
    assert "a red circle" not in names and "A Red Circle" not in names and "a tree" not in names
    assert math.isclose(targets.pi.sum(), 1.0, rel_tol=1e-5)
    assert set(result.manifest.excluded_candidates["a red circle"]) >= {"a red circle", "A Red Circle", "a tree"}


def test_every_step_reports_what_the_ui_needs(sd, tmp_path):
    reports = []
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, **TINY)
    erase(sd, config, tmp_path / "run", callbacks=[reports.append])
    assert [r.phase for r in reports] == ["theta", "pi"] * 3
    theta, pi = reports[0], reports[1]
    assert set(theta.losses) >= {"erase", "preserve", "total"} and "pi_objective" in pi.losses
    assert len(theta.targets["a red circle"]) == 5 and theta.pick in CANDIDATES
    assert reports[-1].eta == 0 and all(r.elapsed >= 0 for r in reports)


def test_shared_draws_pair_each_pi_step_with_its_model_step(sd, tmp_path, monkeypatch):
    from age_explorer.core.erasure.loop import FineTuneRun

    calls = []
    original = FineTuneRun.sample_till
    monkeypatch.setattr(FineTuneRun, "sample_till", lambda self, *a: calls.append(1) or original(self, *a))
    config = make_config("age", None, concepts=["a red circle", "a dog"], candidates=CANDIDATES,
                         share_draws=True, seed=2, **{**TINY, "iterations": 6})
    reports = []
    erase(sd, config, tmp_path / "run", callbacks=[reports.append])
    assert len(calls) == 6  # one "sample till t" per model/pi pair
    for theta, pi in zip(reports[0::2], reports[1::2]):
        assert (theta.phase, pi.phase) == ("theta", "pi")
        assert (pi.concept, pi.pick) == (theta.concept, theta.pick)
    assert {r.concept for r in reports} == {"a red circle", "a dog"}


def test_chains_in_one_batch_give_each_chain_its_own_latents(sd, tmp_path):
    """Chains advanced together, each leaving the batch after its own steps, give what each gives alone
    from the same z_T, with as many UNet calls as the longest chain has steps."""
    from age_explorer.core.erasure.age import AGERun

    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, **TINY)
    run = AGERun(sd, config, tmp_path / "run")
    a, b, c = (sd.encode([p]) for p in ("a red circle", "a dog", "a cat"))
    chain, calls = run.predictor.chain, []
    run.predictor.chain = lambda *args: calls.append(1) or chain(*args)
    for lengths in [(3, 1), (1, 3), (2, 2), (0, 2)]:
        run.generator.manual_seed(5)
        together = run.sample_till_each([([a, b], lengths[0]), ([c], lengths[1])])
        assert len(calls) == max(lengths)
        calls.clear()
        run.generator.manual_seed(5)  # alone, one after the other: the same z_T draws in the same order
        alone = [run.sample_till([a, b], lengths[0]), run.sample_till([c], lengths[1])]
        for (z_together, t_together), (z_alone, t_alone) in zip(together, alone):
            assert torch.equal(t_together, t_alone)
            for x, y in zip(z_together, z_alone):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        calls.clear()


@pytest.mark.parametrize("options", [dict(), dict(pi_l1=True), dict(target_search="damage")])
def test_batched_pi_chain_runs_each_pi_steps_own_draws_in_its_model_steps_batch(sd, tmp_path, monkeypatch, options):
    from age_explorer.core.erasure.age import AGERun
    from age_explorer.core.erasure.loop import FineTuneRun

    batches, read = [], []
    original = FineTuneRun.sample_till_each

    def recorded(self, chains):
        out = original(self, chains)
        batches.append(([[c.clone() for c in conds] for conds, _ in chains], [n for _, n in chains], out))
        return out

    def pi_step(original_step):
        def step(self, k, concept, c_e, *args):
            shared = args[-1]
            read.append((k, self.mixture(k, shared["uniform"])[1], shared))
            return original_step(self, k, concept, c_e, *args)
        return step

    monkeypatch.setattr(FineTuneRun, "sample_till_each", recorded)
    monkeypatch.setattr(AGERun, "_gumbel_pi_step", pi_step(AGERun._gumbel_pi_step))
    monkeypatch.setattr(AGERun, "_damage_pi_step", pi_step(AGERun._damage_pi_step))
    config = make_config("age", None, concepts=["a red circle", "a dog"], candidates=CANDIDATES,
                         batch_pi_chain=True, seed=2, **{**TINY, "iterations": 6, **options})
    reports = []
    erase(sd, config, tmp_path / "run", callbacks=[reports.append])
    assert [r.phase for r in reports] == ["theta", "pi"] * 6
    assert len(batches) == 6 and len(read) == 6  # one chain batch per model step, none in the pi steps
    damage = options.get("target_search") == "damage"
    reads = ["z_e"] if damage else ["z_t", "z_e"] if options.get("pi_l1") else ["z_t"]
    for (conds, lengths, out), (k, e_t, shared), pi in zip(batches, read, reports[1::2]):
        assert len(conds) == 2 and len(conds[0]) == 2 and len(conds[1]) == len(reads)
        assert pi.concept == config.concepts[k]
        latents, t = out[1]
        assert shared["t"] is t and all(shared[name] is z for name, z in zip(reads, latents))
        own = {"z_t": e_t, "z_e": sd.encode([config.concepts[k]])}
        for name, cond in zip(reads, conds[1]):  # the pi step's own concept and Gumbel sample
            torch.testing.assert_close(cond, own[name])
    # the pi steps draw apart from their model steps: not always the same concept or timestep
    assert len({(r.concept, p.concept) for r, p in zip(reports[0::2], reports[1::2])}) > 1
    assert any(a != b for _, (a, b), _ in batches)


@pytest.mark.parametrize("method, options, message", [
    ("age", dict(lam=-1.0), "lambda must be"),
    ("age", dict(lr=float("nan")), "lr must be a positive finite"),
    ("age", dict(parameter_set="attn9"), "unknown parameter set"),
    ("esd", dict(concepts=[]), "at least one non-empty concept"),
    ("age", dict(target_search="psychic"), "target_search must be"),
    ("age", dict(batch_pi_chain=True, share_draws=True), "choose one"),
    ("age", dict(batch_pi_chain=True, xt_source="pool"), "runs none"),
    ("uce", dict(preserve=["a red circle"]), "both erased and preserved"),
])
def test_invalid_configs_raise_clear_errors(method, options, message):
    values = {"concepts": ["a red circle"], **options}
    with pytest.raises(ValueError, match=message):
        make_config(method, None, **values)


def test_empty_candidate_set_after_exclusion(sd, tmp_path):
    config = make_config("age", None, concepts=["a red circle"], candidates=["a red circle", "a tree"],
                         synonyms=["a tree"], **TINY)
    with pytest.raises(ValueError, match="no candidate target left"):
        erase(sd, config, tmp_path / "run")


def test_gpu_preset_refuses_cpu(sd, tmp_path):
    config = make_config("age", "imagenette", concepts=["a red circle"], candidates=CANDIDATES)
    with pytest.raises(RuntimeError, match="GPU recipe"):
        erase(sd, config, tmp_path / "run")


def test_preset_overrides_are_recorded_as_deviations():
    config = make_config("age", "imagenette", concepts=["x"], lam=0.5)
    assert config.preset == "imagenette"
    assert any("lam=0.5" in d for d in config.deviations)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("age", "nudityy", concepts=["x"])
    with pytest.raises(ValueError, match="is for method 'age'"):
        make_config("esd", "imagenette", concepts=["x"])


def test_unknown_toy_concept_is_rejected(toy_bundle, tmp_path):
    config = make_config("esd", "toy-esd", concepts=["pink hexagon"])
    with pytest.raises(ValueError, match="unknown concept 'pink hexagon'"):
        erase(toy_bundle, config, tmp_path / "run")


def test_corrupted_delta_is_detected(sd, tmp_path):
    config = make_config("esd", None, concepts=["a red circle"], **TINY)
    erase(sd, config, tmp_path / "run")
    delta = tmp_path / "run" / "delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:-100])
    with pytest.raises(CorruptRunError, match="checksum"):
        load_bundle(str(tmp_path / "run"), device="cpu")


def test_a_run_swapped_into_its_base_is_the_loaded_run_and_the_base_comes_back(sd, tmp_path):
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, lr=1e-2, **TINY)
    erase(sd, config, tmp_path / "run")
    before = _snapshot(sd)
    base_image = generate(sd, ["a red circle"], [0], steps=3)
    loaded = load_bundle(str(tmp_path / "run"), device="cpu")
    with run_weights(sd, tmp_path / "run") as swapped:
        assert swapped is sd
        for name, p in loaded.unet.named_parameters():
            assert torch.equal(dict(sd.unet.named_parameters())[name], p), name
        assert torch.equal(generate(sd, ["a red circle"], [0], steps=3),
                           generate(loaded, ["a red circle"], [0], steps=3))
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    with pytest.raises(RuntimeError, match="inside"):  # an error in the block also gives the base back
        with run_weights(sd, tmp_path / "run"):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    assert torch.equal(generate(sd, ["a red circle"], [0], steps=3), base_image)


def test_a_damaged_run_is_refused_before_the_base_changes(sd, tmp_path):
    erase(sd, make_config("esd", None, concepts=["a red circle"], **TINY), tmp_path / "run")
    before = _snapshot(sd)
    delta = tmp_path / "run" / "delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:-100])
    with pytest.raises(CorruptRunError, match="checksum"):
        with run_weights(sd, tmp_path / "run"):
            pass
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())


def test_select_parameters_rejects_unknown_sets(sd):
    with pytest.raises(ValueError, match="unknown parameter set"):
        select_parameters(sd.unet, "nope")


def test_esd_matches_noise_predictions_by_default_and_x0_is_an_option(sd, tmp_path):
    """ESD's own code compares noise predictions: eps is its default everywhere (no preset, the CLI,
    the explorer), x0 (AGE's paper) an option; AGE keeps x0."""
    from age_explorer.core.erasure.esd import ESDRun

    default = make_config("esd", None, concepts=["a red circle"], **TINY)
    assert default.loss_space == "eps" and make_config("age", None, concepts=["x"]).loss_space == "x0"
    assert all(make_config("esd", p, concepts=["x"]).loss_space == "eps" for p in ("esd-x", "esd-u", "toy-esd"))
    run = ESDRun(sd, default, tmp_path / "probe")
    out, z = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert run.to_loss_space(out, z, torch.tensor([500])) is out  # the loss is on eps itself
    run.predictor.restore()

    first = {}
    for space in ("eps", "x0"):
        config = make_config("esd", None, concepts=["a red circle"], loss_space=space, **TINY)
        result = erase(sd, config, tmp_path / space, callbacks=[lambda r, s=space: first.setdefault(s, r.losses)])
        assert result.manifest.loss_space == space
    assert first["eps"]["erase"] != first["x0"]["erase"]  # the same draws, another space
