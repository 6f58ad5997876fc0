"""The engine on a tiny randomly initialised SDXL pipeline: load, generate, erase (AGE, ESD, UCE),
graph rows, export, and the export reloaded by plain diffusers in a process that does not import the project."""

import json
import os
import subprocess
import sys

import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.erasure.params import PARAMETER_SETS
from age_explorer.core.export.writers import export_run
from age_explorer.core.sampling import generate
from tests.tiny_models import CANDIDATES, TINY_SD_RECIPE

TINY = dict(TINY_SD_RECIPE, lr=1e-2)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_bundle(str(tiny_sdxl_dir), device="cpu")


def test_sdxl_folder_loads_with_the_sdxl_backend_and_its_conditioning(sdxl):
    assert sdxl.kind == "stable-diffusion-xl"
    states = sdxl.encode(["a red circle", "a cat"])
    # both encoders' hidden states (32 + 32) on 16 tokens, plus the packed pooled row
    assert states.shape == (2, 17, 64)
    kwargs = sdxl.unet_kwargs(states)
    assert kwargs["encoder_hidden_states"].shape == (2, 16, 64)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    # original size, crop corner, target size at the UNet's native resolution (8 latents x 2 = 16 px)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    # force_zeros_for_empty_prompt: CFG's unconditional branch is zeros, as the pipeline's
    assert not sdxl.unconditional().any()


def test_generate_matches_plain_diffusers_for_the_same_seeds(sdxl, tiny_sdxl_dir, one_thread):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    ours = generate(sdxl, ["a red circle"], [4, 5], steps=4, guidance_scale=5.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the project samples DDIM
    for i, seed in enumerate([4, 5]):
        theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                      generator=torch.Generator().manual_seed(seed)).images
        # the project runs both seeds in one batch, the pipeline one at a time: float sums may differ in
        # the last bits, never in the 8-bit image
        assert (ours[i:i + 1] - theirs).abs().max() < 1e-5
        assert torch.equal((ours[i:i + 1] * 255).round(), (theirs * 255).round())


@pytest.mark.parametrize("method, options, parameter_set", [
    ("esd", dict(parameter_set="xattn", **TINY), "xattn"),
    ("age", dict(parameter_set="xattn", candidates=CANDIDATES, **TINY), "xattn"),
    ("uce", dict(preserve=["a cat"]), "xattn_kv"),
])
def test_each_method_erases_on_sdxl(sdxl, tmp_path, method, options, parameter_set):
    before = {n: p.detach().clone() for n, p in sdxl.unet.named_parameters()}
    result = erase(sdxl, make_config(method, None, concepts=["a red circle"], **options), tmp_path / "run")
    assert result.status == "done"
    assert all(torch.equal(p, before[n]) for n, p in sdxl.unet.named_parameters())  # the bundle is restored
    erased = load_bundle(str(tmp_path / "run"), device="cpu")
    changed = [n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(PARAMETER_SETS[parameter_set][0](n) for n in changed)
    if method == "uce":  # every cross-attention K/V reads both encoders' states (64 wide)
        kv = [n for n in before if ("attn2.to_k." in n or "attn2.to_v." in n) and n.endswith("weight")]
        assert sorted(changed) == sorted(kv) and all(before[n].shape[1] == 64 for n in kv)
    a = generate(sdxl, ["a red circle"], [1], steps=3)
    b = generate(erased, ["a red circle"], [1], steps=3)
    assert (a - b).abs().max() > 0


def test_graph_similarity_measures_run_on_sdxl(sdxl):
    from age_explorer.core.graph.analysis import similarity_measures
    from age_explorer.core.graph.concept_sets import ConceptSet

    concept_set = ConceptSet(name="tiny", concepts=["red circle", "cat", "car"], groups={}, template="a {concept}")
    table = similarity_measures(sdxl, concept_set, latents=1, timesteps=(500,))
    assert len(table) == 6 and (table["output_distance"] > 0).all()


_PLAIN_DIFFUSERS = """
import sys, json, torch
torch.set_num_threads(1)
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
assert "age_explorer" not in sys.modules
out = {"scheduler": type(pipe.scheduler).__name__, "images": []}
for seed in (7, 8):
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator().manual_seed(seed)).images
    out["images"].append(image.tolist())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sdxl_export_reloads_in_plain_diffusers_with_the_projects_images(sdxl, tmp_path, one_thread):
    run = tmp_path / "esd-run"
    erase(sdxl, make_config("esd", None, concepts=["a red circle"], **TINY), run)
    folder = export_run(run, tmp_path / "export", fmt="diffusers")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _PLAIN_DIFFUSERS, str(folder)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs["scheduler"] == "DDIMScheduler"  # the export carries the scheduler the project samples with
    ours = generate(load_bundle(str(run), device="cpu"), ["a red circle"], [7, 8], steps=4, guidance_scale=5.0)
    theirs_images = torch.tensor(theirs["images"]).squeeze(1)
    # 0/255: the same scheduler, the same seeds, one thread in both processes
    assert ((ours * 255).round() - (theirs_images * 255).round()).abs().max() == 0


@pytest.mark.parametrize("pipeline_class", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_an_unsupported_diffusers_model_is_one_line_naming_what_is_supported(tmp_path, pipeline_class):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(ValueError) as err:
        load_bundle(str(tmp_path), device="cpu")
    message = str(err.value)
    assert "\n" not in message and f"is a {pipeline_class}, which the engine does not support" in message
    assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message and "toy" in message
