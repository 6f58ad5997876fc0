"""The compiled "sample till t" chain (``compile_chain``) and the channels-last UNet (``channels_last``)
against the eager chain: the same latents and the same erasure within float rounding, on a tiny SD-1.x
and a tiny SDXL pipeline; an unavailable compiler refused in one line; checkpoints resume across them;
and the chain's UNet calls per AGE step, from the counter of benchmarks/unet_calls.py.

Compiling a tiny UNet takes one to three minutes of CPU, hence ``slow``. Bounds (docs/erasure.md,
"The compiled chain"), measured on CPU (torch 2.13, one thread): the chain's latents differ from the
eager ones by at most 1.4e-6 of their largest magnitude (SD 1.4e-6, SDXL 1.2e-6; channels-last 1.1e-6
and 1.3e-6; two SD chains batched together 1.2e-6 and 7.5e-7), the tests allow 1e-5; a 3-step ESD delta by 2.1e-3 of its largest change (channels-last
3.8e-3: Adam divides small gradients by their own size), the tests allow 1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import make_config
from age_explorer.core.erasure.esd import ESDRun, run_esd
from tests.tiny_models import TINY_SD_RECIPE

CHAIN_STEPS = 4
LATENT_BOUND = 1e-5  # max |compiled - eager| / max |eager| of the chain's latents
DELTA_BOUND = 1e-2  # max |delta compiled - delta eager| / max |delta eager| of a 3-step ESD run


def _config(**options):
    return make_config("esd", "esd-x", concepts=["a red circle"],
                       **{**TINY_SD_RECIPE, "ddim_steps": CHAIN_STEPS}, **options)


def _chain_latents(bundle, run_dir, **options) -> torch.Tensor:
    """The two-trajectory chain an AGE model step runs (erased concept and target), all the way down."""
    run = ESDRun(bundle, _config(**options), run_dir)
    try:
        conds = [run.erased_states[0:1], bundle.encode(["a dog"])]
        latents, _ = run.sample_till(conds, CHAIN_STEPS)
    finally:
        run.predictor.restore()
    return torch.cat(latents)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sd_bundle(tiny_sd_dir):
    return load_bundle(str(tiny_sd_dir), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["sd", "sdxl"])
def test_compiled_chain_gives_the_eager_latents(pipeline, request, tmp_path, one_thread):
    folder = request.getfixturevalue("tiny_sd_dir" if pipeline == "sd" else "tiny_sdxl_dir")
    bundle = load_bundle(str(folder), device="cpu")
    eager = _chain_latents(bundle, tmp_path / "eager")
    compiled = _chain_latents(bundle, tmp_path / "compiled", compile_chain=True)
    assert compiled.shape == eager.shape and torch.isfinite(compiled).all()
    assert _relative_difference(compiled, eager) <= LATENT_BOUND
    channels_last = _chain_latents(bundle, tmp_path / "channels_last", channels_last=True)
    assert _relative_difference(channels_last, eager) <= LATENT_BOUND
    # the bundle's UNet is back in its own memory format, and gives the eager latents exactly again
    assert all(p.is_contiguous() for p in bundle.unet.parameters())
    assert torch.equal(_chain_latents(bundle, tmp_path / "again"), eager)


@pytest.mark.slow
def test_compiled_chains_batched_together_give_the_eager_latents(sd_bundle, tmp_path, one_thread):
    """batch_pi_chain's batch through the compiled chain: a two-trajectory chain of 3 DDIM steps and a
    one-trajectory chain of 1 step, the batch shrinking from three trajectories to two after the first step
    (a new shape, so a second compilation), each chain within the latent bound of the eager batch."""
    def latents(**options):
        run = ESDRun(sd_bundle, _config(**options), tmp_path / str(options))
        try:
            chains = [([run.erased_states[0:1], sd_bundle.encode(["a dog"])], 3), ([run.erased_states[0:1]], 1)]
            return [torch.cat(z) for z, _ in run.sample_till_each(chains)]
        finally:
            run.predictor.restore()

    eager, compiled = latents(), latents(compile_chain=True)
    for e, c in zip(eager, compiled):
        assert c.shape == e.shape and _relative_difference(c, e) <= LATENT_BOUND


@pytest.mark.slow
def test_a_short_erasure_with_the_compiled_chain_gives_the_eager_delta(sd_bundle, tmp_path, one_thread):
    def delta(**options):
        result = run_esd(sd_bundle, _config(**options), tmp_path / str(options))
        assert result.status == "done" and result.steps_done == TINY_SD_RECIPE["iterations"]
        return {n: result.changed[n] - result.originals[n] for n in result.changed}

    eager, compiled = delta(), delta(compile_chain=True)
    assert eager.keys() == compiled.keys() and eager
    eager_all = torch.cat([v.flatten() for v in eager.values()])
    compiled_all = torch.cat([compiled[n].flatten() for n in eager])
    assert _relative_difference(compiled_all, eager_all) <= DELTA_BOUND


def test_an_unavailable_compiler_is_refused_in_one_line(sd_bundle, tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(RuntimeError) as err:
        ESDRun(sd_bundle, _config(compile_chain=True, channels_last=True), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "C++ compiler" in message and "compile_chain=False" in message
    # refused before the UNet was touched
    assert all(p.is_contiguous() for p in sd_bundle.unet.parameters())


def test_the_options_are_off_by_default_and_typed():
    config = make_config("age", "imagenette", concepts=["garbage truck"])
    assert (config.compile_chain, config.channels_last) == (False, False)
    # an execution option, not a departure from the paper's recipe
    assert make_config("age", "imagenette", concepts=["garbage truck"], compile_chain=True).deviations == []
    with pytest.raises(ValueError, match="compile_chain must be true or false"):
        make_config("esd", "toy-esd", concepts=["red circle"], compile_chain="yes")


def test_a_checkpoint_resumes_under_other_execution_options(sd_bundle, tmp_path, one_thread):
    """A run stopped with the eager chain resumes channels-last (an execution option, not the recipe),
    and ends with the uninterrupted run's delta within the same bound as the compiled chain."""
    whole = run_esd(sd_bundle, _config(), tmp_path / "whole")
    stops = iter([False, True])
    stopped = run_esd(sd_bundle, _config(), tmp_path / "split", stop=lambda: next(stops, False))
    assert (stopped.status, stopped.steps_done) == ("stopped", 1)
    # as a checkpoint written before these options existed: its config lacks them
    state = tmp_path / "split" / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["config"].pop("compile_chain") is False and meta["config"].pop("channels_last") is False
    state.write_text(json.dumps(meta))
    resumed = run_esd(sd_bundle, _config(channels_last=True), tmp_path / "split", resume=True)
    assert (resumed.status, resumed.steps_done) == ("done", TINY_SD_RECIPE["iterations"])
    for name, value in whole.changed.items():
        change = value - whole.originals[name]
        assert (resumed.changed[name] - value).abs().max() <= DELTA_BOUND * change.abs().max()
    # the recipe itself still has to match
    with pytest.raises(ValueError, match="another configuration"):
        run_esd(sd_bundle, _config(lr=2e-5), tmp_path / "split", resume=True)


def test_the_erased_concept_and_the_target_advance_in_one_batched_call_per_ddim_step(monkeypatch, one_thread):
    """The UNet call counter (benchmarks/unet_calls.py): an AGE model step runs one chain whose every DDIM
    step is one UNet call for both trajectories (and CFG), where the reference-style loop runs two chains
    one after the other; with batch_pi_chain the π step's chain joins that call and the π step runs none."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import unet_calls

    rows = {(r["setting"], r["phase"]): r for r in unet_calls.measure(torch.device("cpu"), model_steps=2)}
    for setting, batch in (("toy", 4), ("imagenette, tiny SD", 1)):
        model, pi = rows[setting, "model step"], rows[setting, "π step"]
        assert model["ddim_steps"] > 0 and model["chain_calls_per_ddim_step"] == 1
        assert model["sequential_chains"] == 1 and model["chain_batches"] == [2 * 2 * batch]
        # frozen: erased concept under target and itself, target; trainable: erased concept, target
        assert model["other_calls"] == 2 and model["other_batches"] == [2 * batch, 3 * batch]
        assert pi["chain_batches"] in ([2 * batch], [])  # the target's chain only (empty if it drew t = T)
        assert pi["other_calls"] == 2 and pi["other_batches"] == [batch]
    assert rows["toy-fast", "π step"]["chain_calls"] == 0  # share_draws: no chain of its own
    for setting, batch in (("toy, batch_pi_chain", 4), ("imagenette, tiny SD, batch_pi_chain", 1)):
        model, pi = rows[setting, "model step"], rows[setting, "π step"]
        # the π step's chain (1 trajectory) runs beside the model step's (2) while both last, then the longer alone
        assert model["sequential_chains"] == 1 and model["chain_calls_per_ddim_step"] == 1
        assert set(model["trajectories_per_chain_call"]) <= {1, 2, 3} and pi["chain_calls"] == 0
        assert model["other_batches"] == [2 * batch, 3 * batch] and pi["other_batches"] == [batch]
    reference = rows["reference-style loop, tiny SD", "iteration"]
    assert reference["sequential_chains"] == 2 and reference["trajectories_per_chain_call"] == [1]
    assert reference["other_calls"] == 5


def test_a_method_whose_setup_fails_gives_the_unet_its_memory_format_back(sd_bundle, tmp_path):
    from age_explorer.core.erasure.age import run_age
    from tests.tiny_models import CANDIDATES

    # AGE's setup refuses the erasure check after the UNet went channels-last: no classifier on tiny SD
    config = make_config("age", None, concepts=["a red circle"], candidates=CANDIDATES, k_closest=7, num_centers=7,
                         erase_check_every=1, channels_last=True, **TINY_SD_RECIPE)
    with pytest.raises(ValueError, match="cannot measure"):
        run_age(sd_bundle, config, tmp_path)
    assert all(p.is_contiguous() for p in sd_bundle.unet.parameters())
