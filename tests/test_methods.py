"""One table of checks that every registered erasure method inherits.

A new method adds its row to ``CASES`` (a test fails until it does): the extra config fields its tiny
runs need, and whether Stable Diffusion runs it without more downloads. Each method then gets the same
checks: registry and presets, config bounds, one-line errors, a toy erasure that moves the erased
concept more than an unrelated one and is then attacked and evaluated, and on tiny random SD-1.x /
SDXL pipelines an erasure whose diffusers export and full-rank LoRA reload in plain diffusers (a
process that does not import the project) with the project's own images, whose delta export loads on
the base with the run's images, and which is evaluated (NudeNet on a prompt CSV).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from age_explorer.core.app.evaluate import evaluate
from age_explorer.core.attacks import run_attack
from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import METHODS, PRESETS, erase, get_method, make_config
from age_explorer.core.evaluation import EvaluationConfig
from age_explorer.core.export.writers import export_run
from age_explorer.core.export.options import PEFT_FOLDER
from age_explorer.core.sampling import generate
from age_explorer.core.toyworld.backend import ToyBackend
from tests.tiny_models import TINY_SD_RECIPE

ERASED, UNRELATED = "red circle", "blue square"
FEW_CANDIDATES = ["green circle", "red square", "blue square", "yellow triangle"]


@dataclass
class Case:
    toy: dict = field(default_factory=dict)  # fields over the toy preset for a tiny run
    sd: dict = field(default_factory=dict)  # fields for a tiny SD-1.x / SDXL run
    sd_refusal: str | None = None  # the one-line error SD gives without a download, if it cannot run


CASES: dict[str, Case] = {
    "age": Case(toy={"iterations": 8, "candidates": FEW_CANDIDATES},
                sd={"candidates": ["a dog", "a cat", "a car"]}),
    "ap": Case(toy={"iterations": 8, "candidates": FEW_CANDIDATES},
               sd={"candidates": ["a dog", "a cat", "a car"]}),
    "ca": Case(toy={"iterations": 8, "anchor_images": 4}, sd={"anchor_images": 2}),
    "esd": Case(toy={"iterations": 8}),
    "mace": Case(toy={"iterations": 4, "num_images": 2}, sd={"iterations": 2, "num_images": 1},
                 sd_refusal="MACE's LoRA stage needs object masks"),
    "mace-cfr": Case(),
    "rece": Case(),
    "uce": Case(),
}


def fields_for_tiny_sd(method: str) -> dict:
    m = get_method(method)
    values = {k: v for k, v in TINY_SD_RECIPE.items() if k in m.options}
    return {**values, **CASES[method].sd}


def test_every_registered_method_has_a_row_and_presets_for_each_family():
    assert set(CASES) == set(METHODS), "add the new method's row to CASES"
    for name in METHODS:
        toy = ToyBackend.default_preset(name)
        assert toy is not None and PRESETS[toy][0] == name, f"{name}: no toy preset"


@pytest.mark.parametrize("method", sorted(CASES))
def test_config_bounds_are_one_line_errors(method):
    cls = get_method(method).config
    assert cls.method == method
    for bad in ({"concepts": []}, {"concepts": ["  "]}, {"concepts": ["a", "A"]}, {"concepts": ["a"], "seed": "x"}):
        try:
            cls(**bad)
        except (ValueError, TypeError) as e:
            assert "\n" not in str(e) and str(e)
        else:
            if "seed" not in bad:  # seeds are not range-checked
                pytest.fail(f"{method} accepted {bad}")
    with pytest.raises(ValueError, match="unknown .* option") as e:
        make_config(method, None, concepts=["x"], no_such_field=1)
    assert "\n" not in str(e.value)
    if get_method(method).fine_tuned:
        with pytest.raises(ValueError) as e:
            make_config(method, None, concepts=["x"], iterations=0)
        assert "\n" not in str(e.value)


def prediction(bundle, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn((4, *bundle.latent_shape), generator=g)
    t = torch.tensor([100, 300, 500, 700])
    states = bundle.encode([prompt]).expand(4, -1, -1)
    with torch.no_grad():
        return bundle.unet(z, t, **bundle.unet_kwargs(states)).sample


@pytest.mark.parametrize("method", sorted(CASES))
def test_toy_erasure_moves_the_erased_concept_more_than_an_unrelated_one(method, toy_bundle, tmp_path, one_thread):
    preset = ToyBackend.default_preset(method)
    config = make_config(method, preset, concepts=[ERASED], **CASES[method].toy)
    before = {c: prediction(toy_bundle, f"a {c}") for c in (ERASED, UNRELATED)}
    result = erase(toy_bundle, config, tmp_path / "run")
    assert result.status == "done"
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    moved = {c: float((prediction(erased, f"a {c}") - before[c]).pow(2).mean()) for c in before}
    assert moved[ERASED] > 0
    # the stated bound: the unrelated concept moves less than the erased one
    assert moved[UNRELATED] < moved[ERASED], moved
    for c, value in before.items():  # the bundle itself is left as it was
        assert torch.equal(prediction(toy_bundle, f"a {c}"), value)

    # the run is attacked and evaluated like any other: the same entries, its method recorded
    attacked = run_attack(tmp_path / "run", "prompts", seeds="1000-1001", sample_steps=3, device="cpu")
    assert attacked.concept == ERASED and 0 <= attacked.asr <= 1 and 0 <= attacked.asr_base <= 1
    classes = tmp_path / "classes.csv"
    classes.write_text("concept\n" + "\n".join([ERASED, UNRELATED, "green circle"]) + "\n")
    evaluated = evaluate(tmp_path / "run", EvaluationConfig(concept_set=str(classes), images_per_class=2, steps=3),
                         device="cpu", log=lambda line: None).results
    assert evaluated["model"]["method"] == method and evaluated["erased"] == [ERASED]
    assert {"ESR-1", "PSR-1"} <= set(evaluated["metrics"])


# argv: output file, base folder, then each export: a diffusers folder, or "lora=<PEFT folder>" (on the base)
PLAIN_DIFFUSERS = """
import sys, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
out = {}
for item in sys.argv[3:]:
    lora = item[len("lora="):] if item.startswith("lora=") else None
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2] if lora else item, safety_checker=None,
                                                   requires_safety_checker=False)
    if lora:  # the model card's lines: the project's DDIM sampler, then the LoRA
        pipe.scheduler = DDIMScheduler.from_config({k: v for k, v in pipe.scheduler.config.items()
                                                    if k != "_use_default_values"})
        pipe.load_lora_weights(lora)
    out[item] = pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                     generator=torch.Generator().manual_seed(9), output_type="pt").images
assert not any(m.startswith("age_explorer") for m in sys.modules), "the project was imported"
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def sd_exports(tiny_sd_dir, tmp_path_factory):
    """Every method that runs on SD: erased on the tiny SD-1.x pipeline and exported as a diffusers folder."""
    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    work = tmp_path_factory.mktemp("methods-sd")
    runs, refusals = {}, {}
    for method, case in CASES.items():
        config = make_config(method, None, concepts=["a red circle"], **fields_for_tiny_sd(method))
        if case.sd_refusal:
            with pytest.raises(Exception) as e:
                erase(bundle, config, work / method)
            refusals[method] = str(e.value)
            continue
        run_dir = work / method
        erase(bundle, config, run_dir)
        folder = export_run(run_dir, work / "exports", fmt="diffusers", name=method)
        lora = export_run(run_dir, work / "exports", fmt="lora", rank="full", name=f"{method}-lora") / PEFT_FOLDER
        runs[method] = (run_dir, folder, lora)
    out = work / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # our thread count: on some CPUs a matmul split over another number of threads rounds differently
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    exports = [str(e) for _, folder, lora in runs.values() for e in (folder, f"lora={lora}")]
    done = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), str(tiny_sd_dir), *exports],
                          env=env, cwd=work, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return runs, refusals, torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_tiny_sd_erasure_reloads_in_plain_diffusers_with_the_projects_images(method, sd_exports, tiny_sd_dir):
    runs, refusals, plain = sd_exports
    case = CASES[method]
    if case.sd_refusal:
        assert case.sd_refusal in refusals[method] and "\n" not in refusals[method]
        return
    run_dir, folder, lora = runs[method]
    ours = generate(load_bundle(str(run_dir), device="cpu"), ["a red circle"], [9], steps=4, guidance_scale=7.5)
    theirs = plain[str(folder)]
    assert float(((ours * 255).round() - (theirs * 255).round()).abs().max()) == 0
    # the full-rank LoRA on the base: the same images within float rounding of the factors
    assert float(((ours * 255).round() - (plain[f"lora={lora}"] * 255).round()).abs().max()) <= 2
    base = generate(load_bundle(str(tiny_sd_dir), device="cpu"), ["a red circle"], [9], steps=4, guidance_scale=7.5)
    assert not torch.equal(ours, base), "the erasure changed nothing"
    delta = export_run(run_dir, run_dir.parent / "delta-exports", fmt="delta", name=method)
    again = generate(load_bundle(str(delta), device="cpu"), ["a red circle"], [9], steps=4, guidance_scale=7.5)
    assert torch.equal(again, ours), "the delta export loads on the base with other weights"
    # evaluated like any run: NudeNet's real detector on a two-row prompt CSV, offline
    prompts = run_dir.parent / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance\na red circle,1,7.5\na photo,2,7.5\n")
    results = evaluate(run_dir, EvaluationConfig(metrics=["nudity"], prompts=str(prompts), steps=2),
                       device="cpu", out=run_dir.parent / f"{method}-evaluation", log=lambda line: None).results
    assert results["model"]["method"] == method and 0 <= results["metrics"]["nudity_exposure_rate"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_tiny_sdxl_erasure_runs_and_generates(method, tiny_sdxl_dir, tmp_path):
    case = CASES[method]
    bundle = load_bundle(str(tiny_sdxl_dir), device="cpu")
    config = make_config(method, None, concepts=["a red circle"], **fields_for_tiny_sd(method))
    if case.sd_refusal:
        with pytest.raises(Exception, match=case.sd_refusal):
            erase(bundle, config, tmp_path / "run")
        return
    erase(bundle, config, tmp_path / "run")
    images = generate(load_bundle(str(tmp_path / "run"), device="cpu"), ["a red circle"], [1], steps=2)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
