"""LoRA export and the fidelity of exports in plain diffusers (a process that never imports the project)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.export.writers import export_run
from age_explorer.core.export.lora import (PEFT_FILE, PEFT_FOLDER, SafetensorsValues, kohya_file, lowrank_delta,
                                           parse_rank, truncated_svd)
from age_explorer.core.sampling import generate
from tests.tiny_models import TINY_SD_RECIPE, build_tiny_pipeline

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it (the test extra installs it)

TINY = dict(TINY_SD_RECIPE, lr=1e-2)
PROMPT, SEEDS, STEPS, GUIDANCE = "a red circle", [3, 9], 4, 7.5
# A full-rank LoRA adds up @ down beside W instead of replacing W: the same numbers summed in another
# order. Measured: 0/255 on the tiny pipeline (1.3e-6 in float), 1/255 on the toy model
# (docs/jobs-and-export.md); the bound leaves one step for other CPUs' float sums.
FULL_RANK_TOLERANCE = 2 / 255

# Run by a fresh interpreter: plain diffusers only. argv: pipeline folder, LoRA folder or "-", output file.
PLAIN_DIFFUSERS = f"""
import sys, torch
torch.set_num_threads(1)
from diffusers import DDIMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
if sys.argv[2] != "-":
    config = {{k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}}  # the card's lines
    pipe.scheduler = DDIMScheduler.from_config(config)
    pipe.load_lora_weights(sys.argv[2])
images = torch.cat([pipe({PROMPT!r}, num_inference_steps={STEPS}, guidance_scale={GUIDANCE}, height=16, width=16,
                         generator=torch.Generator().manual_seed(s), output_type="pt").images for s in {SEEDS!r}])
assert not any(m.startswith("age_explorer") for m in sys.modules), "the project was imported"
torch.save({{"images": images, "scheduler": type(pipe.scheduler).__name__}}, sys.argv[3])
"""


def plain_diffusers(pipeline, lora, tmp_path) -> dict:
    out = tmp_path / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not even importable
    done = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(pipeline), str(lora or "-"), str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


def project_images(run_dir) -> torch.Tensor:
    return generate(load_bundle(str(run_dir), device="cpu"), [PROMPT], SEEDS, steps=STEPS, guidance_scale=GUIDANCE)


def max_pixel_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """In 1/255 units of the 8-bit images both would be saved as."""
    return float(((a * 255).round() - (b * 255).round()).abs().max())


@pytest.fixture(scope="module")
def sd_run(tiny_sd_dir, tmp_path_factory):
    config = make_config("age", None, concepts=[PROMPT], candidates=["a dog", "a cat", "a car"], **TINY)
    return erase(load_bundle(str(tiny_sd_dir), device="cpu"), config, tmp_path_factory.mktemp("runs") / "age").run_dir


@pytest.fixture(scope="module")
def pndm_run(tmp_path_factory):
    """A tiny pipeline saved with the PNDM scheduler SD-1.4 ships, and an AGE run on it."""
    from diffusers import PNDMScheduler

    work = tmp_path_factory.mktemp("pndm")
    pipe = build_tiny_pipeline(work)
    # SD-1.4's scheduler_config.json, clip_sample included: PNDM has no such option, but the config carries
    # it to the DDIM sampler built from it (without it DDIM clips, and StableDiffusionPipeline's
    # constructor turns that off, so no pipeline folder could reproduce it)
    pipe.scheduler = PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False))
    pipe.save_pretrained(work / "pipeline")
    config = make_config("age", None, concepts=[PROMPT], candidates=["a dog", "a cat", "a car"], **TINY)
    return work / "pipeline", erase(load_bundle(str(work / "pipeline"), device="cpu"), config, work / "run").run_dir


def test_full_rank_factors_reproduce_the_delta_and_low_ranks_are_the_best_approximation():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3)
    unet = torch.nn.ModuleDict({"lin": linear, "conv": conv, "norm": torch.nn.GroupNorm(1, 4)})
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    erased = {n: v + torch.randn_like(v) for n, v in base.items()}
    full = lowrank_delta(unet, erased, None)
    assert full.rank == 5 and full.relative_error < 1e-7  # conv: 4 x 27, linear: 5 x 6 -> padded to 5
    for module in ("lin", "conv"):
        assert torch.allclose(full.module_delta(module), erased[f"{module}.weight"] - base[f"{module}.weight"], atol=1e-5)
        assert torch.allclose(full.bias[module], erased[f"{module}.bias"] - base[f"{module}.bias"])
    assert set(full.left_out) == {"norm.weight", "norm.bias"}
    one = lowrank_delta(unet, erased, 1)
    delta = erased["lin.weight"] - base["lin.weight"]
    s = torch.linalg.svdvals(delta.double())
    assert torch.linalg.matrix_rank(one.module_delta("lin")) == 1
    assert float((delta - one.module_delta("lin")).norm()) == pytest.approx(float(s[1:].norm()), rel=1e-4)
    assert full.relative_error < 1e-12 and 0.1 < one.relative_error < 1


def test_rank_parsing():
    assert parse_rank("full") is None and parse_rank(None) is None and parse_rank("16") == 16
    for bad in ["0", "-3", "x", "1.5"]:
        with pytest.raises(ValueError, match="bad LoRA rank"):
            parse_rank(bad)


def test_kohya_file_carries_the_changed_biases_as_diff_b_and_its_lora_keys_are_what_diffusers_expects(
        sd_run, tiny_sd_dir, tmp_path):
    """The kohya file's LoRA keys (without its diff_b keys, which diffusers' converter refuses) convert with
    diffusers' own kohya converter and load to the PEFT file's weights; each diff_b is the bias change."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    folder = export_run(sd_run, tmp_path, fmt="lora", rank=2)
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")} == {
        f"{PEFT_FOLDER}/{PEFT_FILE}", kohya_file(folder.name)}
    assert kohya_file(folder.name) == f"{folder.name}-comfyui-a1111.safetensors"
    kohya = load_file(str(folder / kohya_file(folder.name)))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha", ".diff_b"))
               for k in kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in kohya
    delta, base = load_file(str(sd_run / "delta.safetensors")), load_bundle(str(tiny_sd_dir), device="cpu").unet
    params = dict(base.named_parameters())
    changed = {n.removesuffix(".bias") for n in delta if n.endswith(".bias") and not torch.equal(delta[n], params[n])}
    diff_b = {k.removesuffix(".diff_b"): v for k, v in kohya.items() if k.endswith(".diff_b")}
    assert changed and set(diff_b) == {"lora_unet_" + m.replace(".", "_") for m in changed}
    for module in changed:
        assert torch.allclose(diff_b["lora_unet_" + module.replace(".", "_")],
                              delta[f"{module}.bias"] - params[f"{module}.bias"].detach(), atol=1e-7)
    with pytest.raises(ValueError):  # why diffusers gets its own folder
        _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    lora_only = {k: v for k, v in kohya.items() if not k.endswith(".diff_b")}
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(lora_only))  # raises on a key it cannot map
    assert len(converted) == 2 * len(alphas) == 2 * sum(k.endswith(".alpha") for k in kohya)
    assert set(alphas.values()) == {2.0}
    from safetensors.torch import save_file

    save_file(lora_only, str(tmp_path / "lora_only.safetensors"))

    def lora_weights(where, weights):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(where, weight_name=weights, adapter_name="erased")
        return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".lora_" in n and n.endswith("weight")}

    peft = lora_weights(folder / PEFT_FOLDER, PEFT_FILE)
    from_kohya = lora_weights(tmp_path, "lora_only.safetensors")
    layers = json.loads((folder / "export_manifest.json").read_text())["lora"]["layers"]
    assert layers == len(alphas) and len(peft) == 2 * layers and peft.keys() == from_kohya.keys()
    assert all(torch.equal(peft[n], from_kohya[n]) for n in peft)
    with safe_open(str(folder / PEFT_FOLDER / PEFT_FILE), framework="pt") as f:
        assert any(k.endswith("lora_B.bias") for k in f.keys())  # the changed to_out biases


def test_low_ranks_use_a_seeded_randomized_svd_as_close_as_the_exact_one():
    torch.manual_seed(1)
    # a weight change with a decaying spectrum, as a fine-tuned layer's is
    u, _ = torch.linalg.qr(torch.randn(320, 320, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(768, 320, dtype=torch.float64))
    matrix = (u * (0.9 ** torch.arange(320, dtype=torch.float64))) @ v.T
    exact = torch.linalg.svdvals(matrix)
    before = torch.random.get_rng_state()
    left, values, right, tail = truncated_svd(matrix, 8)
    assert torch.equal(torch.random.get_rng_state(), before)  # the export leaves the caller's random stream alone
    assert left.shape == (320, 8) and right.shape == (8, 768)
    best = float(exact[8:].norm())
    missed = float((matrix - (left.double() * values.double()) @ right.double()).norm())
    assert missed <= best * (1 + 1e-5) and tail == pytest.approx(missed ** 2, rel=1e-4)
    again = truncated_svd(matrix, 8)
    assert all(torch.equal(x, y) for x, y in zip((left, values, right), again[:3]))  # the same file every time
    full = truncated_svd(matrix, 300)  # near the layer's size: the exact SVD
    assert torch.allclose(full[1], exact[:300]) and full[3] == pytest.approx(float((exact[300:] ** 2).sum()))


def test_lora_factors_stream_from_the_delta_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 5), "conv": torch.nn.Conv2d(3, 4, 3)})
    erased = {n: p.detach() + torch.randn_like(p) for n, p in unet.named_parameters()}
    save_file(erased, str(tmp_path / "delta.safetensors"))
    seen = []
    streamed = lowrank_delta(unet, SafetensorsValues(tmp_path / "delta.safetensors"), 2,
                             lambda done, total: seen.append((done, total)))
    in_memory = lowrank_delta(unet, erased, 2)
    assert seen == [(1, 2), (2, 2)]
    assert all(torch.equal(streamed.down[m], in_memory.down[m]) and torch.equal(streamed.up[m], in_memory.up[m])
               for m in ("lin", "conv"))


def test_full_rank_lora_in_plain_diffusers_reproduces_the_projects_images(sd_run, tiny_sd_dir, tmp_path, one_thread):
    folder = export_run(sd_run, tmp_path, fmt="lora", rank="full")
    card = (folder / "README.md").read_text()
    error = json.loads((folder / "export_manifest.json").read_text())["lora"]["relative_frobenius_error"]
    assert error < 1e-6 and "rank **" in card and "Relative Frobenius error" in card
    plain = plain_diffusers(tiny_sd_dir, folder / PEFT_FOLDER, tmp_path)
    ours = project_images(sd_run)
    base = generate(load_bundle(str(tiny_sd_dir), device="cpu"), [PROMPT], SEEDS, steps=STEPS, guidance_scale=GUIDANCE)
    assert max_pixel_difference(ours, base) > 10  # the erasure changed the images
    assert max_pixel_difference(plain["images"], ours) <= FULL_RANK_TOLERANCE * 255


def test_diffusers_export_of_a_pndm_base_reproduces_the_images_exactly_in_plain_diffusers(pndm_run, tmp_path, one_thread):
    pipeline, run_dir = pndm_run
    folder = export_run(run_dir, tmp_path, fmt="diffusers")
    assert json.loads((folder / "model_index.json").read_text())["scheduler"][1] == "DDIMScheduler"
    plain = plain_diffusers(folder, None, tmp_path)
    assert plain["scheduler"] == "DDIMScheduler"
    assert max_pixel_difference(plain["images"], project_images(run_dir)) == 0


def test_diffusers_export_keeps_an_fp16_base_in_fp16(tmp_path):
    work = tmp_path / "fp16"
    build_tiny_pipeline(work).to(torch.float16).save_pretrained(work / "pipeline")
    (work / "pipeline" / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    config = make_config("esd", None, concepts=[PROMPT], **TINY)
    run = erase(load_bundle(str(work / "pipeline"), device="cpu"), config, tmp_path / "run").run_dir
    folder = export_run(run, tmp_path / "out", fmt="diffusers")
    for part in ("unet", "vae", "text_encoder"):
        for weights in (folder / part).glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, part
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.safetensors"))  # noqa: E731
    assert size(folder) <= 1.01 * size(work / "pipeline")
    explicit = export_run(run, tmp_path / "out", fmt="diffusers", name="fp32", dtype="float32")
    with safe_open(str(next((explicit / "unet").glob("*.safetensors"))), framework="pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F32"
    front = (folder / "README.md").read_text().split("---")[1]
    assert "license: mit" in front  # the base's own licence
    assert "base_model:" not in front  # a local folder is not a Hub id
    with pytest.raises(ValueError, match="diffusers and checkpoint formats only"):
        export_run(run, tmp_path / "out", fmt="delta", dtype="float16")


def test_cards_say_what_each_format_is(sd_run, tmp_path):
    delta = (export_run(sd_run, tmp_path, fmt="delta") / "README.md").read_text()
    front = delta.split("---")[1]
    assert "library_name" not in front and "base_model:" not in front and "creativeml" not in front
    assert "load_file(\"delta.safetensors\")" in delta and "load_state_dict(delta, strict=False)" in delta
    assert "DDIMScheduler.from_config(config)" in delta and '!= "_use_default_values"' in delta
    assert "3 model steps and 3 pi steps" in delta  # TINY: 3 iterations, pgd_num_steps 2
    folder = export_run(sd_run, tmp_path, fmt="lora", rank=4)
    lora, summary = (folder / "README.md").read_text(), json.loads((folder / "export_manifest.json").read_text())["lora"]
    assert "library_name: diffusers" in lora and "  - lora" in lora and "rank **4**" in lora
    kohya = kohya_file(folder.name)
    where = lora.split("## Where to put it")[1].split("\n\n")[1].splitlines()
    assert where == [
        f"- AUTOMATIC1111: `{kohya}` into `stable-diffusion-webui/models/Lora/`, then "
        f"`<lora:{kohya.removesuffix('.safetensors')}:1>` in the prompt.",
        f"- ComfyUI: `{kohya}` into `ComfyUI/models/loras/`, then a LoraLoader node at strength 1.",
        '- diffusers: `pipe.load_lora_weights("FOLDER/diffusers")` (needs peft).']
    assert summary["changed_biases"] > 0 and summary["bias_delta_max_abs"] > 0
    assert (f"AUTOMATIC1111 ignores `diff_b` keys, so there these biases stay at the base model's values: off by up "
            f"to {summary['bias_delta_max_abs']:.3g} per entry") in lora
    assert "diffusers (`lora_B.bias`) and ComfyUI (`diff_b`) apply them" in lora
    assert "no key for them" not in lora  # the old sentence, wrong for ComfyUI


def test_toy_lora_export_has_a_contact_sheet_and_applies_to_the_toy_unet(toy_bundle, tmp_path):
    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "run").run_dir
    folder = export_run(run, tmp_path / "out", fmt="lora", rank="full")
    assert (folder / "before_after.png").is_file() and "before_after.png" in (folder / "README.md").read_text()
    base = load_bundle("toy", device="cpu")
    base.unet.load_lora_adapter(str(folder / PEFT_FOLDER / PEFT_FILE), prefix="unet")
    ours = generate(load_bundle(str(run), device="cpu"), ["a red circle"], [0, 1], steps=5)
    assert max_pixel_difference(generate(base, ["a red circle"], [0, 1], steps=5), ours) <= FULL_RANK_TOLERANCE * 255


def test_cli_refuses_a_bad_rank_in_one_line(sd_run, tmp_path, capsys):
    from age_explorer.core.app.cli.main import main

    assert main(["export", str(sd_run), "--format", "lora", "--rank", "zero", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad LoRA rank") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_lora_export_names_each_file_for_its_tool(sd_run, tmp_path, capsys):
    from age_explorer.core.app.cli.main import main

    out = tmp_path / "erased"
    assert main(["export", str(sd_run), "--format", "lora", "--rank", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"{kohya_file('erased')} for AUTOMATIC1111 and ComfyUI, {PEFT_FOLDER}/{PEFT_FILE} for diffusers"
            in printed)
    assert (out / kohya_file("erased")).is_file() and (out / PEFT_FOLDER / PEFT_FILE).is_file()


# the kohya names of the layers AUTOMATIC1111 finds only by their original (LDM) name (its diffusers-name
# conversion has no rule for SDXL's label_emb and puts up_blocks.0's upsampler at position 1); ComfyUI reads both
GOLDEN_KOHYA_SDXL = {"add_embedding.linear_1": "lora_unet_label_emb_0_0",
                     "add_embedding.linear_2": "lora_unet_label_emb_0_2",
                     "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv"}


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_kohya_names_of_layers_a1111_finds_only_by_their_original_name(xl):
    """At the published sizes: SDXL's three such layers get their LDM names, SD-1.x none. On a small random
    SDXL UNet, each such name is the original-layout key (as the single-file export writes it, '_' for '.')
    that holds the very tensor, and the kohya file uses it."""
    from diffusers import UNet2DConditionModel

    from age_explorer.core.app.bench import SD14_UNET
    from age_explorer.core.app.random_pipelines import SDXL_UNET
    from age_explorer.core.export.checkpoint import unet_state_dict
    from age_explorer.core.export.lora import original_layout_names

    with torch.device("meta"):
        published = UNet2DConditionModel(**(SDXL_UNET if xl else SD14_UNET))
    assert original_layout_names(published) == (GOLDEN_KOHYA_SDXL if xl else {})
    if not xl:
        return
    torch.manual_seed(0)
    small = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    names = original_layout_names(small)
    assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_1_2_conv"  # one layer per block here
    ldm = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): v for k, v in unet_state_dict(small).items()}
    params = dict(small.named_parameters())
    for module, name in names.items():
        assert torch.equal(ldm[name], params[f"{module}.weight"])
    erased = {f"{m}.weight": params[f"{m}.weight"].detach() + 1 for m in names}
    kohya = lowrank_delta(small, erased, 1).kohya_state_dict()
    assert {k.rsplit(".", 2)[0] for k in kohya} == set(names.values())
