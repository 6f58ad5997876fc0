"""AGE's target-search options and ablations: validation, and that each does what it says."""

import math

import pandas as pd
import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.erasure.age import AGERun
from age_explorer.core.runs import RunManifest
from tests.tiny_models import CANDIDATES
from tests.tiny_models import TINY_SD_RECIPE as TINY

CONCEPT = "purple triangle"
# two model steps of the toy-fast recipe: enough to exercise every path in a few seconds
QUICK = dict(iterations=2)


@pytest.mark.parametrize("options, message", [
    (dict(pi_mode="oracle"), "pi_mode must be one of"),
    (dict(pi_mode="nearest", target_search="damage"), "fixes pi, so it has no target search"),
    (dict(target_search="three_stage"), "target_search must be one of"),
    (dict(near_copy_floor=1.5), "near_copy_floor must be a finite number from 0 to 1"),
    (dict(near_copy_floor=float("nan")), "near_copy_floor"),
    (dict(neighbourhood_size=0), "neighbourhood_size must be a whole number"),
    (dict(damage_stage_fraction=-0.1), "damage_stage_fraction"),
    (dict(erase_check_every=-1), "erase_check_every must be a whole number"),
    (dict(erase_target_g=2.0), "erase_target_g"),
    (dict(erase_weight_growth=0.5), "erase_weight_growth"),
    (dict(damage_probe_steps=0), "damage_probe_steps"),
    (dict(pi_spread=-0.1), "pi_spread"),
    (dict(pi_spread=float("inf")), "pi_spread"),
])
def test_invalid_search_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_config("age", "toy-fast", concepts=[CONCEPT], **options)


def test_defaults_are_the_papers_search():
    config = make_config("age", "toy", concepts=[CONCEPT])
    assert (config.target_search, config.pi_mode, config.near_copy_floor, config.erase_check_every) == \
        ("gumbel", "learned", 0.0, 0)


def _run(bundle, tmp_path, name, **options):
    reports = []
    config = make_config("age", "toy-fast", concepts=[CONCEPT], **{**QUICK, **options})
    result = erase(bundle, config, tmp_path / name, callbacks=[reports.append])
    targets = pd.read_csv(tmp_path / name / "targets.csv")
    return result.manifest, reports, targets


def test_nearest_fixes_pi_on_the_candidate_closest_in_text(toy_bundle, tmp_path):
    manifest, reports, targets = _run(toy_bundle, tmp_path, "nearest", pi_mode="nearest")
    nearest = targets.loc[targets.l2_distance.idxmin(), "candidate"]
    assert targets.set_index("candidate").pi[nearest] == 1.0 and targets.pi.sum() == 1.0
    assert {r.pick for r in reports} == {nearest}
    assert all(r.targets[CONCEPT][0] == (nearest, 1.0) for r in reports)
    # frozen pi: its steps are no-ops
    assert all(r.losses == {} for r in reports if r.phase == "pi")
    assert manifest.pi_mode == "nearest"


def test_most_damaged_fixes_the_probes_argmax_and_puts_the_weights_back(toy_bundle, tmp_path):
    config = make_config("age", "toy-fast", concepts=[CONCEPT], pi_mode="most_damaged", damage_probe_steps=3, **QUICK)
    before = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
    run = AGERun(toy_bundle, config, tmp_path / "probe")
    try:
        after_probe = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
        assert all(torch.equal(before[n], after_probe[n]) for n in before)
        assert int(run.allowed[0].sum()) == 1
    finally:
        run.predictor.restore()
    manifest, reports, targets = _run(toy_bundle, tmp_path, "damaged", pi_mode="most_damaged", damage_probe_steps=3)
    fixed = targets.loc[targets.pi.idxmax(), "candidate"]
    assert targets.pi.max() == 1.0 and {r.pick for r in reports} == {fixed}


def test_uniform_keeps_pi_uniform(toy_bundle, tmp_path):
    _, reports, targets = _run(toy_bundle, tmp_path, "uniform", pi_mode="uniform")
    assert torch.allclose(torch.tensor(targets.pi.values), torch.full((len(targets),), 1 / len(targets)).double())
    assert len({r.pick for r in reports if r.phase == "theta"}) >= 1


def test_near_copy_floor_removes_near_copies(toy_bundle, tmp_path):
    _, reports, targets = _run(toy_bundle, tmp_path, "floor", target_search="damage", near_copy_floor=0.9)
    median = sorted(targets.output_distance)[(len(targets) - 1) // 2]  # torch's median: the lower middle value
    dropped = targets[targets.output_distance < 0.9 * median]
    assert len(dropped) > 0 and not dropped.allowed.any() and (dropped.pi == 0).all()
    assert not {r.pick for r in reports} & set(dropped.candidate)
    assert math.isclose(targets.pi.sum(), 1.0, rel_tol=1e-5)


def test_two_stage_keeps_the_neighbourhood_of_the_damage_stage(toy_bundle, tmp_path):
    _, reports, targets = _run(toy_bundle, tmp_path, "two", target_search="two_stage", neighbourhood_size=3,
                               damage_stage_fraction=0.5, iterations=4)
    kept = set(targets[targets.allowed].candidate)
    assert len(kept) == 3 and (targets[~targets.allowed].pi == 0).all()
    # the first half's pi steps are damage steps, the second half's the paper's
    pi_steps = [r for r in reports if r.phase == "pi"]
    assert "max_damage" in pi_steps[0].losses and "preserve" in pi_steps[-1].losses
    assert reports[-2].pick in kept


def test_erasure_constraint_raises_the_weight_while_the_concept_is_made(toy_bundle, tmp_path):
    manifest, reports, _ = _run(toy_bundle, tmp_path, "constrained", erase_check_every=1, erase_check_images=2,
                                erase_target_g=0.0, erase_weight_max=3.0)
    checks = [r.losses["erase_check_G"] for r in reports if "erase_check_G" in r.losses]
    assert len(checks) == 2
    # two failed checks (G > 0 after two steps) double the weight twice, up to its ceiling
    assert [r.losses["erase_weight"] for r in reports if r.phase == "theta"] == [1.0, 2.0]
    assert manifest.erase_weight == 3.0


def test_erasure_constraint_needs_a_classifier(tiny_sd_dir, tmp_path):
    sd = load_bundle(str(tiny_sd_dir), device="cpu")
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, erase_check_every=1, **TINY)
    with pytest.raises(ValueError, match="needs a classifier"):
        erase(sd, config, tmp_path / "run")


def test_runs_record_the_near_copy_measurements(toy_bundle, tmp_path):
    manifest, _, targets = _run(toy_bundle, tmp_path, "paper")
    top = manifest.near_copy[CONCEPT]
    assert len(top) == 5 and {"text_rank", "output_rank", "output_vs_median", "pi"} <= set(top[0])
    assert (targets.output_distance > 0).all()
    quarters = manifest.erase_term[CONCEPT]
    assert 1 <= len(quarters) <= 4 and all(q > 0 for q in quarters)


def test_two_stage_resumes_exactly(toy_bundle, tmp_path):
    options = dict(target_search="two_stage", neighbourhood_size=3, damage_stage_fraction=0.5, iterations=3)
    config = make_config("age", "toy-fast", concepts=[CONCEPT], **options)
    erase(toy_bundle, config, tmp_path / "whole")
    seen = []
    # stop after the neighbourhood was chosen (step 4 of 6 is its first paper step)
    erase(toy_bundle, config, tmp_path / "split", callbacks=[lambda r: seen.append(r.step)], stop=lambda: len(seen) >= 5)
    erase(toy_bundle, config, tmp_path / "split", resume=True)
    whole, split = (RunManifest.read(tmp_path / name) for name in ("whole", "split"))
    assert whole.targets == split.targets and whole.delta_sha256 == split.delta_sha256


@pytest.mark.slow
def test_study_script_runs_and_resumes(tmp_path):
    from benchmarks.target_search_study import main

    args = ["--out", str(tmp_path), "--variants", "nearest", "--concepts", CONCEPT, "--iterations", "2",
            "--images", "2", "--workers", "1"]
    assert main(args) == 0
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert len(rows) == 1 and rows.top1_target_G_after.notna().all() and rows.neighbour_share.iloc[0] == 1.0
    assert (tmp_path / "table.md").read_text().startswith("| variant |")
    assert main(args) == 0 and len(pd.read_csv(tmp_path / "rows.csv")) == 1  # resumed: nothing re-run


def test_damage_floor_is_the_damage_search_with_the_floor_by_name():
    from age_explorer.core.erasure.config import DAMAGE_FLOOR, TARGET_SEARCHES

    assert "damage_floor" in TARGET_SEARCHES and DAMAGE_FLOOR == 0.5
    named = make_config("age", "toy-fast", concepts=[CONCEPT], target_search="damage_floor")
    spelled = make_config("age", "toy-fast", concepts=[CONCEPT], target_search="damage", near_copy_floor=0.5)
    assert named.near_copy_floor == 0.5
    # the same settings as the damage search with the floor spelled out (the study's damage-floor rows)
    differ = {k for k, v in named.to_dict().items() if spelled.to_dict()[k] != v}
    assert differ == {"target_search"}
    assert make_config("age", "toy-fast", concepts=[CONCEPT], target_search="damage_floor",
                       near_copy_floor=0.3).near_copy_floor == 0.3
    with pytest.raises(ValueError, match="fixes pi, so it has no target search"):
        make_config("age", "toy-fast", concepts=[CONCEPT], target_search="damage_floor", pi_mode="uniform")
    from age_explorer.core.erasure import AGEConfig

    assert "damage_floor" in AGEConfig.field_help()["target_search"]


def test_damage_floor_runs_the_damage_search_without_near_copies(toy_bundle, tmp_path):
    manifest, reports, targets = _run(toy_bundle, tmp_path, "named", target_search="damage_floor")
    assert manifest.config["near_copy_floor"] == 0.5
    median = sorted(targets.output_distance)[(len(targets) - 1) // 2]
    dropped = targets[targets.output_distance < 0.5 * median]
    assert not dropped.allowed.any() and not {r.pick for r in reports} & set(dropped.candidate)
    assert all("max_damage" in r.losses for r in reports if r.phase == "pi")


@pytest.mark.parametrize("change, own, net", [
    ([[3.0, 0.0]], [1.0, 0.0], [[0.0, 0.0]]),  # all along the erasure: no damage left
    ([[1.0, 2.0]], [1.0, 0.0], [[0.0, 2.0]]),  # only the part across the erasure counts
    ([[-1.0, 2.0]], [1.0, 0.0], [[-1.0, 2.0]]),  # against the erasure: all of it is damage
    ([[0.0, 1.0]], [0.0, 0.0], [[0.0, 1.0]]),  # no erasure yet: the plain damage
])
def test_damage_net_of_erasure_drops_only_the_part_along_the_erasure(change, own, net):
    from age_explorer.core.erasure.age import net_of_erasure

    got = net_of_erasure(torch.tensor([change]), torch.tensor([own]))
    assert torch.allclose(got, torch.tensor([net]))


def test_damage_net_search_runs_and_scores_the_net_damage(toy_bundle, tmp_path):
    manifest, reports, targets = _run(toy_bundle, tmp_path, "net", target_search="damage_net")
    pi_steps = [r for r in reports if r.phase == "pi"]
    assert pi_steps and all("max_damage" in r.losses for r in pi_steps)
    assert manifest.config["target_search"] == "damage_net" and math.isclose(targets.pi.sum(), 1.0, rel_tol=1e-5)
    # after the first model step the erased concept has moved, so pi is no longer uniform
    assert targets.pi.max() > targets.pi.min()


def test_pi_spread_keeps_pi_spread_over_the_damaged_candidates(toy_bundle, tmp_path):
    def entropy(targets):
        p = torch.tensor(targets[targets.allowed].pi.values)
        return float(-(p * p.clamp(min=1e-12).log()).sum())

    *_, plain = _run(toy_bundle, tmp_path, "plain", target_search="damage_floor", iterations=4)
    *_, spread = _run(toy_bundle, tmp_path, "spread", target_search="damage_floor", iterations=4, pi_spread=10.0)
    # the entropy bonus holds pi near uniform, where the plain damage search has already moved it
    assert entropy(spread) > entropy(plain)
    assert list(spread[spread.allowed].candidate) == list(plain[plain.allowed].candidate)
