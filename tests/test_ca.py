"""CA (concept ablation): registry and config, the toy world's behaviour, tiny SD-1.x / SDXL runs, resume."""

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, get_method, make_config
from age_explorer.core.erasure.ca import CARun, install_start_token_detach
from age_explorer.core.erasure.config import PRESETS, CAConfig
from age_explorer.core.erasure.params import PARAMETER_SETS
from age_explorer.core.runs import run_weights

# a few steps on a couple of anchor images: the mechanics, not the recipe
TINY = dict(iterations=3, batch_size=1, anchor_images=2, ddim_steps=3, requires_gpu=False)


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


def _snapshot(bundle):
    return {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}


def _hooks(bundle):
    return sum(len(m._forward_hooks) for n, m in bundle.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))


def test_registry_presets_and_defaults(toy_bundle):
    method = get_method("ca")
    assert method.config is CAConfig and method.fine_tuned and method.checkpointable
    assert {"toy-ca", "ca", "sdxl-ca"} <= {n for n, (m, _, _) in PRESETS.items() if m == "ca"}
    assert toy_bundle.backend.default_preset("ca") == "toy-ca"
    # the reference's argparse defaults (diffusers/train.py); scripts/fidelity_ca.py prints them side by side
    config = make_config("ca", None, concepts=["grumpy cat"], anchor="cat")
    assert (config.lr, config.batch_size, config.weight_decay, config.max_grad_norm) == (1e-5, 4, 1e-2, 1.0)
    assert (config.loss_type, config.prior_preservation, config.prior_loss_weight) == ("model-based", False, 1.0)
    assert (config.parameter_set, config.anchor_images, config.loss_space) == ("xattn_kv", 1000, "output")
    assert config.anchor_prompts() == ["cat"]
    sd_recipe = make_config("ca", "ca", concepts=["van gogh"])
    assert (sd_recipe.lr, sd_recipe.batch_size, sd_recipe.iterations, sd_recipe.hflip) == (1.6e-5, 8, 100, True)
    assert sd_recipe.requires_gpu and make_config("ca", "sdxl-ca", concepts=["x"]).precision == "bf16"


def test_anchor_prompts_follow_the_templates_and_the_empty_anchor_stays_empty():
    config = make_config("ca", None, concepts=["grumpy cat"], anchor="cat",
                         anchor_templates=["a photo of a {c}", "{c} on a sofa"])
    assert config.anchor_prompts() == ["a photo of a cat", "cat on a sofa"]
    empty = make_config("ca", "toy-ca", concepts=["red circle"])
    assert empty.templates() == ["a {c}"] and empty.anchor_prompts() == [""]


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="kl"), "loss_type must be one of model-based, noise-based, got 'kl'"),
    (dict(anchor_prediction="ema"), "anchor_prediction must be one of current, frozen"),
    (dict(loss_space="v"), "loss_space must be one of output, eps, x0"),
    (dict(anchor="Red Circle"), "the anchor 'Red Circle' is the erased concept itself"),
    (dict(anchor_templates=["a photo"]), "anchor template must contain {c}"),
    (dict(anchor_images=0), "anchor_images must be a whole number from 1 to 10,000"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number from 0"),
    (dict(prior_loss_weight=float("nan")), "prior_loss_weight must be a finite number"),
    (dict(anchor_eta=2.0), "anchor_eta must be a finite number from 0 to 1"),
    (dict(parameter_set="attn"), "unknown parameter set 'attn'"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as caught:
        make_config("ca", None, concepts=["red circle"], **options)
    assert "\n" not in str(caught.value)


def test_toy_erasure_moves_the_concept_and_bounds_unrelated_ones(toy_bundle, tmp_path, one_thread):
    """30 steps of toy-ca: the erased prompt's prediction moves; prompts sharing no word with it move
    less than a third as much and under 5 % (a prompt sharing 'red' moves too: the keys and values of
    'red' are what changed)."""
    bundle = toy_bundle
    x = torch.randn(8, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 500)
    prompts = ["a red circle", "a blue square", "a green triangle"]

    @torch.no_grad()
    def outputs():
        return {p: bundle.unet(x, t, **bundle.unet_kwargs(bundle.encode([p]).expand(8, -1, -1))).sample for p in prompts}

    before = outputs()
    weights = _snapshot(bundle)
    config = make_config("ca", "toy-ca", concepts=["red circle"], iterations=30, anchor_images=8)
    result = erase(bundle, config, tmp_path / "run")
    assert result.status == "done" and result.steps_done == 30
    assert all(torch.equal(p, weights[n]) for n, p in bundle.unet.named_parameters())  # left as it was
    assert _hooks(bundle) == 0
    with run_weights(bundle, tmp_path / "run"):
        after = outputs()
    moved = {p: ((after[p] - before[p]).norm() / before[p].norm()).item() for p in prompts}
    assert moved["a red circle"] > 0.08, moved
    for other in prompts[1:]:
        assert moved[other] < 0.05 and moved[other] < moved["a red circle"] / 3, moved
    changed = result.manifest.changed_parameters
    assert changed == sum(1 for n in weights if PARAMETER_SETS["xattn_kv"][0](n))


@pytest.mark.parametrize("options", [
    dict(),
    dict(loss_type="noise-based", prior_preservation=True, hflip=True, parameter_set="full"),
    dict(anchor_prediction="frozen", anchor="a dog", anchor_templates=["{c}", "a photo of {c}"],
         concepts=["a red circle", "a cat"], batch_size=2, loss_space="x0"),
])
def test_tiny_sd_run_changes_only_its_parameter_set(sd, tmp_path, options):
    before = _snapshot(sd)
    config = make_config("ca", None, **{"concepts": ["a red circle"], **TINY, "lr": 1e-3, **options})
    result = erase(sd, config, tmp_path / "run")
    assert result.status == "done"
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    assert _hooks(sd) == 0
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    allowed = PARAMETER_SETS[config.parameter_set][0]
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(allowed(n) for n in changed)


def test_tiny_sdxl_run(tiny_sdxl_dir, tmp_path):
    sdxl = load_bundle(str(tiny_sdxl_dir), device="cpu")
    result = erase(sdxl, make_config("ca", None, concepts=["a red circle"], **{**TINY, "iterations": 2}),
                   tmp_path / "run")
    assert result.status == "done" and result.manifest.changed_parameters > 0


def test_resume_continues_the_same_run_without_regenerating_the_anchors(sd, tmp_path, monkeypatch):
    config = make_config("ca", None, concepts=["a red circle"], **{**TINY, "iterations": 4, "lr": 1e-3,
                                                                   "anchor_images": 3, "batch_size": 2, "hflip": True})
    erase(sd, config, tmp_path / "whole")
    seen = {"step": 0}
    stopped = erase(sd, config, tmp_path / "split", callbacks=[lambda r: seen.update(step=r.step)],
                    stop=lambda: seen["step"] >= 2)
    assert stopped.status == "stopped" and stopped.steps_done == 2
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "split" / "checkpoint" / "state.safetensors"))
    assert saved["pool/anchor"].shape == (3, *sd.latent_shape) and "pool/anchor_flipped" in saved

    def no_generation(self):
        raise AssertionError("a resumed run regenerated its anchor images")

    monkeypatch.setattr(CARun, "make_anchor_latents", no_generation)
    resumed = erase(sd, config, tmp_path / "split", resume=True)
    assert resumed.status == "done" and resumed.steps_done == 4
    whole = load_bundle(str(tmp_path / "whole"), device="cpu")
    split = load_bundle(str(tmp_path / "split"), device="cpu")
    for (name, p), (_, q) in zip(whole.unet.named_parameters(), split.unet.named_parameters()):
        assert torch.equal(p, q), name


def test_start_token_detach_keeps_outputs_and_changes_only_gradients(sd):
    """The hooks change no output; the key projection's gradient no longer has the start token's part."""
    x = torch.randn(1, *sd.latent_shape, generator=torch.Generator().manual_seed(0))
    states = sd.encode(["a red circle"])
    to_k = next(m for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k"))

    def forward_backward():
        to_k.weight.requires_grad_(True)
        to_k.weight.grad = None
        try:
            out = sd.unet(x, torch.tensor([500]), **sd.unet_kwargs(states)).sample
            out.square().mean().backward()
            return out.detach(), to_k.weight.grad.clone()
        finally:
            to_k.weight.requires_grad_(False)
            to_k.weight.grad = None

    plain_out, plain_grad = forward_backward()
    handles = install_start_token_detach(sd.unet)
    try:
        hooked_out, hooked_grad = forward_backward()
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(plain_out, hooked_out)
    assert not torch.allclose(plain_grad, hooked_grad)
    assert _hooks(sd) == 0
