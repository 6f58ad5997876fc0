"""RECE: its registry entry and config, the closed-form adversarial embedding, and runs on the toy,
the tiny SD-1.x and the tiny SDXL pipelines."""

import json

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import METHODS, erase, make_config, presets_for
from age_explorer.core.erasure.params import PARAMETER_SETS
from age_explorer.core.erasure.rece import derive_embedding, run_rece


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


def test_registry_entry_and_reference_defaults():
    method = METHODS["rece"]
    assert not method.fine_tuned and not method.checkpointable  # closed form: epochs, no iterations
    assert {"epochs", "regular_scale", "adv_lam", "adv_preserve_scale", "adv_erase_scale", "uce_first",
            "adv_token_alignment", "target", "preserve", "lam"} <= method.options
    config = make_config("rece", None, concepts=["nudity"])
    # train.py's argparse defaults for the epochs, train_uce.py's (UCE's) for the UCE stage
    assert (config.epochs, config.regular_scale, config.adv_lam, config.adv_preserve_scale, config.adv_erase_scale) \
        == (3, 0.1, 0.1, 0.1, 1.0)
    assert (config.lam, config.erase_scale, config.preserve_scale, config.token_alignment) \
        == (0.5, 1.0, None, "last_word")
    assert config.uce_first and config.adv_token_alignment == "all" and config.to_dict()["parameter_set"] == "xattn_kv"
    assert presets_for("rece") == ["toy-rece", "rece", "sdxl-rece"]
    assert make_config("rece", "toy-rece", concepts=["red circle"]).epochs == 1


@pytest.mark.parametrize("options, message", [
    (dict(epochs=-1), "epochs must be a whole number from 0 to 100"),
    (dict(epochs=1.5), "epochs must be a whole number"),
    (dict(epochs=0, uce_first=False), "epochs must be at least 1 with uce_first off"),
    (dict(regular_scale=0), "regular_scale must be a positive finite number"),
    (dict(regular_scale=float("nan")), "regular_scale must be a positive finite number"),
    (dict(adv_lam=-1), "adv_lam must be a finite number from 0"),
    (dict(adv_lam=0, preserve_empty=False), "adv_lam must be > 0 when nothing is preserved"),
    (dict(adv_token_alignment="first"), "adv_token_alignment must be one of last_word, all"),
    (dict(preserve=["red circle"]), "both erased and preserved"),
    (dict(iterations=10), "unknown rece option"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as err:
        make_config("rece", None, concepts=["red circle"], **options)
    assert "\n" not in str(err.value)


def test_the_embedding_is_the_regularised_least_squares_solution():
    torch.manual_seed(0)
    original = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    edited = [w + 0.3 * torch.randn_like(w) for w in original]
    c = torch.randn(2, 4, 5, dtype=torch.float64)
    e = derive_embedding(edited, original, c, 0.1)
    # the gradient of sum_l ||W'_l e - W_l c||^2 + 0.1 ||e||^2 vanishes at e
    grad = sum((e @ w1.T - c @ w0.T) @ w1 for w1, w0 in zip(edited, original)) + 0.1 * e
    assert grad.abs().max() < 1e-10
    # an unedited model with a vanishing regulariser gives the concept back
    assert torch.allclose(derive_embedding(original, original, c, 1e-12), c, atol=1e-8)


def _predictions(bundle, prompts, x, t):
    with torch.no_grad():
        return {p: bundle.unet(x, t, **bundle.unet_kwargs(bundle.encode([p]).expand(len(x), -1, -1))).sample
                for p in prompts}


def test_toy_run_erases_the_concept_and_bounds_the_unrelated(toy_bundle, tmp_path, one_thread):
    world = toy_bundle.backend.world
    concept, unrelated = "red circle", world.unrelated("red circle")[:6]
    prompts = [world.prompt(c) for c in [concept] + unrelated]
    x = torch.randn(4, *toy_bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 300, 600, 900])
    before = _predictions(toy_bundle, prompts, x, t)
    weights = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
    reports = []
    config = make_config("rece", toy_bundle.backend.default_preset("rece"), concepts=[concept])
    assert config.preset == "toy-rece"
    result = erase(toy_bundle, config, tmp_path / "run", callbacks=[reports.append])
    assert all(torch.equal(p, weights[n]) for n, p in toy_bundle.unet.named_parameters())  # restored
    assert result.steps_done == 2 and [(r.step, r.total, r.phase) for r in reports] == [(1, 1, "epoch")]
    # the adversarial embedding regenerates the concept's keys and values better than the concept
    # itself after UCE, and the epoch's edit takes that away
    epochs = json.loads((tmp_path / "run" / "manifest.json").read_text())["adversarial_embeddings"]
    assert epochs == result.manifest.extra["adversarial_embeddings"] and [e["epoch"] for e in epochs] == [1]
    stats = epochs[0]["concepts"][concept]
    assert stats["adv_kv_distance_before"] < stats["concept_kv_distance_before"] < stats["adv_kv_distance_after"]
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    after = _predictions(erased, prompts, x, t)
    change = {p: float((after[p] - before[p]).norm() / before[p].norm()) for p in prompts}
    # measured: the erased concept's prediction moves 0.16, the unrelated ones at most 0.05
    assert change[prompts[0]] > 0.1
    assert max(change[p] for p in prompts[1:]) < 0.08
    assert change[prompts[0]] > 2 * max(change[p] for p in prompts[1:])
    # the epoch erases beyond UCE's edit alone (epochs=0)
    uce_only = run_rece(toy_bundle, make_config("rece", "toy-rece", concepts=[concept], epochs=0), None)
    assert uce_only.steps_done == 1 and uce_only.extra["adversarial_embeddings"] == []
    with torch.no_grad():
        params = dict(toy_bundle.unet.named_parameters())
        for n, v in uce_only.changed.items():
            params[n].copy_(v)
        uce_change = float((_predictions(toy_bundle, prompts[:1], x, t)[prompts[0]] - before[prompts[0]]).norm()
                           / before[prompts[0]].norm())
        for n, v in uce_only.originals.items():
            params[n].copy_(v)
    assert change[prompts[0]] > uce_change


def test_tiny_sd_run_edits_only_the_cross_attention_keys_and_values(sd, tmp_path):
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    config = make_config("rece", sd.backend.default_preset("rece"), concepts=["a red circle", "a tree"], epochs=2,
                         preserve=["a dog"])
    assert config.preset == "rece"
    result = erase(sd, config, tmp_path / "run")
    assert result.status == "done" and result.steps_done == 3
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    allowed = PARAMETER_SETS["xattn_kv"][0]
    assert changed and all(allowed(n) for n in changed)
    epochs = result.manifest.extra["adversarial_embeddings"]
    assert [e["epoch"] for e in epochs] == [1, 2] and set(epochs[0]["concepts"]) == {"a red circle", "a tree"}
    assert all(v == v and abs(v) < 1e6 for e in epochs for s in e["concepts"].values() for v in s.values())
    # without the UCE stage the epochs start from the base model: the first embedding is nearly the concept
    scratch = run_rece(sd, make_config("rece", None, concepts=["a red circle"], epochs=1, uce_first=False,
                                       regular_scale=1e-6), None)
    assert scratch.steps_done == 1
    assert scratch.extra["adversarial_embeddings"][0]["concepts"]["a red circle"]["cosine_to_concept"] > 0.99


def test_tiny_sdxl_run(tiny_sdxl_dir, tmp_path):
    bundle = load_bundle(str(tiny_sdxl_dir), device="cpu")
    config = make_config("rece", bundle.backend.default_preset("rece"), concepts=["a red circle"], epochs=1)
    assert config.preset == "sdxl-rece"
    result = erase(bundle, config, tmp_path / "run")
    assert result.status == "done" and result.manifest.changed_parameters > 0
    assert len(result.manifest.extra["adversarial_embeddings"]) == 1
