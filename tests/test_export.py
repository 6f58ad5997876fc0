import re

import pytest
import torch

from age_explorer.core.app.bench import SD14_UNET
from age_explorer.core.app.random_pipelines import SD_VAE, SDXL_UNET
from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.export.writers import export_run, push_to_hub, validate_name, validate_repo_id
from age_explorer.core.sampling import generate
from tests.hub_standin import HubStandIn
from tests.tiny_models import TINY_SD_RECIPE

TINY = dict(TINY_SD_RECIPE, lr=1e-2)


@pytest.fixture(scope="module")
def sd_run(tiny_sd_dir, tmp_path_factory):
    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    run_dir = tmp_path_factory.mktemp("runs") / "age-red-circle"
    config = make_config("age", None, concepts=["a red circle"], candidates=["a dog", "a cat", "a car"], **TINY)
    erase(bundle, config, run_dir)
    return run_dir


def test_delta_export_loads_on_the_base_with_identical_outputs(sd_run, tmp_path):
    folder = export_run(sd_run, tmp_path, fmt="delta")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "delta.safetensors", "manifest.json"]
    a = generate(load_bundle(str(folder), device="cpu"), ["a red circle"], [3], steps=3)
    b = generate(load_bundle(str(sd_run), device="cpu"), ["a red circle"], [3], steps=3)
    assert torch.equal(a, b)


def test_diffusers_export_loads_in_plain_diffusers_and_reproduces_images(sd_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = export_run(sd_run, tmp_path, fmt="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                  generator=torch.Generator().manual_seed(9), output_type="pt").images
    ours = generate(load_bundle(str(sd_run), device="cpu"), ["a red circle"], [9], steps=4, guidance_scale=7.5)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_model_card_lists_what_it_should(sd_run, tmp_path):
    card = (export_run(sd_run, tmp_path, fmt="delta") / "README.md").read_text()
    front = card.split("---")[1]
    # a local base folder with no card of its own: no Hub id to name and no licence to copy
    assert "base_model:" not in front and "license:" not in front and "concept-erasure" in front
    assert '"a red circle"' in card and "**age**" in card
    assert "Targets found by AGE" in card and ("a dog" in card or "a cat" in card or "a car" in card)
    assert "\"seed\": 0" in card and "versions" in card.lower()


def test_toy_diffusers_export_is_loadable_by_the_project(toy_bundle, tmp_path):
    config = make_config("uce", "toy-uce", concepts=["red circle"])
    run = erase(toy_bundle, config, tmp_path / "run")
    folder = export_run(run.run_dir, tmp_path / "exports", fmt="diffusers")
    a = generate(load_bundle(str(folder), device="cpu"), ["a red circle"], [0], steps=5)
    b = generate(load_bundle(str(run.run_dir), device="cpu"), ["a red circle"], [0], steps=5)
    assert torch.equal(a, b)


def test_export_refuses_to_overwrite_and_bad_names(sd_run, tmp_path):
    export_run(sd_run, tmp_path, fmt="delta", name="mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_run(sd_run, tmp_path, fmt="delta", name="mine")
    export_run(sd_run, tmp_path, fmt="delta", name="mine", force=True)
    for bad in ["../evil", "a/b", "..", "", ".hidden"]:
        with pytest.raises(ValueError, match="invalid export name"):
            validate_name(bad)
    for bad in ["noslash", "a/b/c", "../x", "a/..", "x/y.git"]:
        with pytest.raises(ValueError, match="invalid Hub repo id"):
            validate_repo_id(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "missing", tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left behind"


def test_push_to_hub_sends_the_files_with_the_token_only_in_the_header(sd_run, tmp_path, monkeypatch):
    folder = export_run(sd_run, tmp_path, fmt="delta")
    token = "hf_test_secret_token"
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        push_to_hub(folder, "someone/erased-red-circle")
    assert hub.repos == ["someone/erased-red-circle"]
    assert set(hub.files) == {"README.md", "delta.safetensors", "manifest.json"}
    assert hub.files["delta.safetensors"] == (folder / "delta.safetensors").read_bytes()
    authed = [r for r in hub.requests if r["method"] == "POST"]
    assert authed and all(r["authorization"] == f"Bearer {token}" for r in authed)
    assert all(token.encode() not in r["body"] for r in hub.requests)
    assert all(token.encode() not in data for data in hub.files.values())


def test_push_without_token_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_to_hub(tmp_path, "someone/x")


def test_push_to_an_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests.helpers import free_port

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(RuntimeError, match="^could not reach the Hub to push to someone/x: ") as err:
        push_to_hub(tmp_path, "someone/x", token="hf_x")
    assert "\n" not in str(err.value)


def test_push_with_env_token_off_ignores_hf_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_server_secret")
    with pytest.raises(ValueError, match="paste a token"):
        push_to_hub(tmp_path, "someone/x", env_token=False)


def test_eight_concurrent_exports_all_succeed(toy_bundle, tmp_path):
    # from_pretrained patches torch for the whole process; before the load lock, two of these threads
    # broke each other's load ("Cannot copy out of meta tensor" / "Unsupported device type 'meta'")
    from concurrent.futures import ThreadPoolExecutor

    from age_explorer.explorer.service import Explorer, Settings

    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "data" / "run")
    ex = Explorer(Settings(data_dir=str(tmp_path / "data"), start_worker=False))
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: ex.export(str(run.run_dir), "delta"), range(8)))
    assert len({f.name for f in folders}) == 8
    assert len({(f / "delta.safetensors").read_bytes() for f in folders}) == 1
    reference = generate(load_bundle(str(run.run_dir), device="cpu"), ["a red circle"], [0], steps=3)
    assert torch.equal(generate(load_bundle(str(folders[-1]), device="cpu"), ["a red circle"], [0], steps=3), reference)


def test_model_card_holds_the_runs_evaluation_table(toy_bundle, tmp_path):
    """A toy run evaluated with a few images per class, then exported: the card's table has the values of
    results.json, with images per class, seeds and classifier; the result files travel with the export."""
    import json

    import pandas as pd

    from age_explorer.core.app.evaluate import evaluate
    from age_explorer.core.evaluation import EvaluationConfig

    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "uce-red-circle").run_dir
    concepts = tmp_path / "five.csv"
    pd.DataFrame({"concept": ["red circle", "red square", "green circle", "blue triangle", "yellow ring"]}).to_csv(
        concepts, index=False)
    config = EvaluationConfig(metrics=["objects", "lpips"], concept_set=str(concepts), images_per_class=2, seed=1000)
    results = evaluate(run, config, device="cpu", log=lambda line: None).results
    folder = export_run(run, tmp_path / "exports", fmt="delta")
    card = (folder / "README.md").read_text()
    section = card.split("## Evaluation")[1].split("\n## ")[0]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row for row in cells}
    for name in ("ESR-1", "ESR-5", "PSR-1", "PSR-5"):
        value = results["metrics"][name]
        assert rows[name][1] == f"{100 * value:.1f} %", name
    assert rows["ESR-1"][2] == "2" and rows["PSR-1"][2] == "8"  # images counted: 1 erased and 4 kept classes x 2
    assert rows["lpips"][1] == "not computed" and "not available" in rows["lpips"][3]
    assert "2 images per class (seeds 1000-1001" in section and "classifier `toy`" in section
    assert "erased: red circle" in section and "| red square | kept |" in section
    assert f"torch {torch.__version__}" in section
    assert json.loads((folder / "evaluation" / "results.json").read_text())["metrics"] == results["metrics"]
    assert sorted(p.name for p in (folder / "evaluation").iterdir()) == ["manifest.json", "results.csv", "results.json"]


def test_export_follows_no_symbolic_link_planted_in_the_run_folder(toy_bundle, tmp_path):
    """Links planted where an export reads (the contact sheet, the evaluation's results, the delta, a
    linked evaluation folder): every export refuses in one line naming the link, writes nothing, and the
    secret the links point at reaches no exported file; a link planted after the check is not opened."""
    import shutil

    from age_explorer.core.export.writers import copy_run_file

    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "run").run_dir
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"server-secret-do-not-export")
    (tmp_path / "evaluation-elsewhere").mkdir()
    (tmp_path / "evaluation-elsewhere" / "results.json").write_bytes(secret.read_bytes())
    clean = export_run(run, tmp_path / "clean", fmt="delta")  # the run exports before any link is planted
    plants = {"before_after.png": secret, "evaluation/results.json": secret, "delta.safetensors": run / "delta.safetensors",
              "evaluation": tmp_path / "evaluation-elsewhere", "spillover.csv": secret}
    for relative, target in plants.items():
        planted = tmp_path / f"planted-{relative.replace('/', '-')}"
        shutil.copytree(run, planted)
        link = planted / relative
        if link.is_dir():
            shutil.rmtree(link)
        elif link.exists():
            link.unlink()
        link.parent.mkdir(exist_ok=True)
        real = tmp_path / f"copy-of-{target.name}"
        if target == run / "delta.safetensors":  # a valid delta behind the link: refused all the same
            shutil.copy2(target, real)
            target = real
        link.symlink_to(target)
        out = tmp_path / f"out-{relative.replace('/', '-')}"
        for fmt in ("delta", "lora"):
            with pytest.raises(ValueError, match="symbolic link") as err:
                export_run(planted, out, fmt=fmt, rank=2)
            assert "\n" not in str(err.value) and relative.split("/")[0] in str(err.value)
        assert not out.exists() or not any(out.iterdir()), f"{relative}: the refused export left files"
    assert all(b"server-secret" not in f.read_bytes() for f in clean.rglob("*") if f.is_file())
    late = tmp_path / "late"
    late.mkdir()
    (late / "before_after.png").symlink_to(secret)
    with pytest.raises(ValueError, match="symbolic link"):
        copy_run_file(late, "before_after.png", tmp_path / "copied.png")
    assert not (tmp_path / "copied.png").exists()


# names every SD-1.x / SDXL single file has, written out from the original checkpoints' layout: the
# places a wrong index would move (resamplers, shortcuts, the last levels, the SDXL embedding)
GOLDEN_SD1 = [
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.2.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.9.0.op.bias", "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight", "model.diffusion_model.output_blocks.9.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.norm_out.weight", "first_stage_model.quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.bias"]
GOLDEN_SDXL = [
    "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight", "model.diffusion_model.out.2.weight",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.bias", "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight"]


def _meta_bundle(unet_config, xl: bool):
    """A stand-in bundle of the real sizes on the meta device (no weights): the key map reads only names and shapes."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    with torch.device("meta"):
        bundle = SimpleNamespace(unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**SD_VAE),
                                 text_encoder=CLIPTextModel(clip_l),
                                 backend=SimpleNamespace(name="stable-diffusion-xl" if xl else "stable-diffusion"))
        if xl:
            bundle.backend.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu"))
    return bundle


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_single_file_key_names_are_the_original_layouts(xl):
    """SD-1.4 and SDXL sizes: the golden names are there, the UNet has the original file's 686 / 1680 and the
    VAE its 248 tensors, and diffusers' own single-file converters map the file back to every diffusers name
    with the right shape."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)

    from age_explorer.core.export.checkpoint import checkpoint_state_dict

    bundle = _meta_bundle(SDXL_UNET if xl else SD14_UNET, xl)
    keys = checkpoint_state_dict(bundle)
    assert set(GOLDEN_SDXL if xl else GOLDEN_SD1) <= set(keys)
    diffusers_words = re.compile(r"(down|up|mid)_block|resnets|attentions\.|conv_shortcut|time_emb_proj|time_embedding|group_norm|add_embedding")
    assert not [k for k in keys if k.startswith(("model.", "first_stage_model.")) and diffusers_words.search(k)]
    assert not [k for k in keys if k.startswith("first_stage_model.") and ".to_" in k]
    assert sum(k.startswith("model.diffusion_model.") for k in keys) == (1680 if xl else 686)
    assert sum(k.startswith("first_stage_model.") for k in keys) == 248
    text = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    assert sum(k.startswith(text) for k in keys) == 196  # CLIP-L: 12 layers x 16 + embeddings and final norm
    for model, converted in ((bundle.unet, convert_ldm_unet_checkpoint(keys, dict(bundle.unet.config))),
                             (bundle.vae, convert_ldm_vae_checkpoint(keys, dict(bundle.vae.config)))):
        ours = model.state_dict()
        assert converted.keys() == ours.keys() and all(converted[k].shape == ours[k].shape for k in ours)
    if xl:
        encoder = bundle.backend.text_encoder_2
        converted = convert_open_clip_checkpoint(encoder, keys, prefix="conditioner.embedders.1.model.")
        assert converted.keys() == encoder.state_dict().keys()
        assert all(converted[k].shape == v.shape for k, v in encoder.state_dict().items())


def test_checkpoint_export_loads_in_diffusers_from_single_file_with_the_runs_unet(sd_run, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = export_run(sd_run, tmp_path, fmt="checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", f"{folder.name}.safetensors"]
    pipe = StableDiffusionPipeline.from_single_file(str(folder / f"{folder.name}.safetensors"), config=str(tiny_sd_dir),
                                                    local_files_only=True, safety_checker=None)
    erased, base = load_bundle(str(sd_run), device="cpu"), load_bundle(str(tiny_sd_dir), device="cpu")
    for part, model in (("unet", erased.unet), ("vae", base.vae), ("text_encoder", base.text_encoder)):
        ours, theirs = model.state_dict(), getattr(pipe, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert not all(torch.equal(v, base.unet.state_dict()[k]) for k, v in erased.unet.state_dict().items())
    card = (folder / "README.md").read_text()
    where = card.split("## Where to put it")[1].split("\n\n")[1].splitlines()
    assert [line.split(":")[0] for line in where] == ["- AUTOMATIC1111", "- ComfyUI", "- diffusers"]
    assert all(f"`{folder.name}.safetensors`" in line or f'"{folder.name}.safetensors"' in line for line in where)


def test_sdxl_checkpoint_holds_the_unet_vae_and_both_text_encoders(tiny_sdxl_dir, tmp_path):
    """diffusers' single-file loader reads the UNet, VAE and first text encoder back exactly; the second
    (OpenCLIP layout) is read back with diffusers' own OpenCLIP converter."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    from age_explorer.core.export.checkpoint import write_checkpoint

    bundle = load_bundle(str(tiny_sdxl_dir), device="cpu")
    with torch.no_grad():  # an "erased" UNet: every tensor moved, so a misplaced one cannot match by chance
        for p in bundle.unet.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "xl.safetensors"
    write_checkpoint(bundle, path)
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_dir), local_files_only=True)
    for part, model in (("unet", bundle.unet), ("vae", bundle.vae), ("text_encoder", bundle.text_encoder)):
        ours, theirs = model.state_dict(), getattr(pipe, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    encoder = bundle.backend.text_encoder_2
    converted = convert_open_clip_checkpoint(encoder, load_file(str(path)), prefix="conditioner.embedders.1.model.")
    assert converted.keys() == encoder.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in encoder.state_dict().items())


def test_checkpoint_of_a_toy_run_is_refused_in_one_line(toy_bundle, tmp_path, capsys):
    from age_explorer.core.app.cli.main import main

    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "run").run_dir
    assert main(["export", str(run), "--format", "checkpoint", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the checkpoint format is the single-file layout of Stable Diffusion") and "\n" not in err
    assert not (tmp_path / "x").exists()


# SD-2 768-v at its real size: the UNet of stabilityai/stable-diffusion-2's config, OpenCLIP ViT-H's text
# tower as diffusers holds it (23 of its 24 layers: SD-2 reads the penultimate one)
SD2_UNET = dict(SD14_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                use_linear_projection=True)
GOLDEN_SD2 = [
    "model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias", "model.diffusion_model.out.2.weight",
    "cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias", "cond_stage_model.model.ln_final.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight"]


def test_sd2_single_file_has_the_original_layout_and_the_768_v_config():
    """At SD-2's real size: OpenCLIP names for the text encoder, linear ``proj_in`` in the UNet, and a config
    whose numbers are those of Stability's v2-inference-v.yaml (written out here from its layout)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel

    from age_explorer.core.app.bench import SD14_SCHEDULER
    from age_explorer.core.export.checkpoint import checkpoint_state_dict, ldm_config

    bundle = _meta_bundle(SD2_UNET, xl=False)
    with torch.device("meta"):
        bundle.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                           num_attention_heads=16, hidden_act="gelu"))
    bundle.scheduler_config = dict(SD14_SCHEDULER, prediction_type="v_prediction")
    keys = checkpoint_state_dict(bundle)
    assert set(GOLDEN_SD2) <= set(keys)
    assert keys["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear, not 1x1 conv
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert not [k for k in keys if k.startswith("cond_stage_model.") and not k.startswith("cond_stage_model.model.")]
    config = ldm_config(bundle)
    params = config["model"]["params"]
    unet = params["unet_config"]["params"]
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion" and params["parameterization"] == "v"
    assert (unet["model_channels"], unet["channel_mult"], unet["attention_resolutions"], unet["num_res_blocks"]) == \
        (320, [1, 2, 4, 4], [4, 2, 1], 2)
    assert (unet["num_head_channels"], unet["context_dim"], unet["use_linear_in_transformer"], unet["transformer_depth"],
            unet["legacy"]) == (64, 1024, True, 1, False)
    assert (params["linear_start"], params["linear_end"], params["timesteps"], params["scale_factor"]) == \
        (0.00085, 0.012, 1000, 0.18215)
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    assert (ddconfig["ch"], ddconfig["ch_mult"], ddconfig["z_channels"], ddconfig["num_res_blocks"]) == (128, [1, 2, 4, 4], 4, 2)
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    # diffusers' own reading of an original config builds this very UNet from it
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(config, keys))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in bundle.unet.state_dict().items()}
    bundle.scheduler_config = dict(SD14_SCHEDULER)  # SD-2 base (512 px) predicts epsilon: no parameterization key
    assert "parameterization" not in ldm_config(bundle)["model"]["params"]
    assert ldm_config(_meta_bundle(SD14_UNET, xl=False)) is None and ldm_config(_meta_bundle(SDXL_UNET, xl=True)) is None


def test_sd2_checkpoint_export_writes_the_config_beside_the_file(tmp_path_factory, tmp_path):
    """A tiny SD-2 (v-prediction) run: the file and its ``.yaml`` of the same name, from which diffusers' own
    converters rebuild the run's UNet and the base's VAE and text encoder exactly; the card names the yaml."""
    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from safetensors.torch import load_file

    from tests.tiny_models import build_tiny_sd2_pipeline

    work = tmp_path_factory.mktemp("tiny_sd2")
    build_tiny_sd2_pipeline(work).save_pretrained(work / "pipeline")
    base = load_bundle(str(work / "pipeline"), device="cpu")
    run = erase(base, make_config("age", None, concepts=["a red circle"], candidates=["a dog", "a cat"], **TINY),
                tmp_path / "run").run_dir
    folder = export_run(run, tmp_path / "exports", fmt="checkpoint")
    name = folder.name
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", f"{name}.safetensors", f"{name}.yaml"]
    config = yaml.safe_load((folder / f"{name}.yaml").read_text())
    assert config["model"]["params"]["parameterization"] == "v"
    keys = load_file(str(folder / f"{name}.safetensors"))
    erased = load_bundle(str(run), device="cpu")
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(config, keys))
    unet.load_state_dict(convert_ldm_unet_checkpoint(keys, dict(unet.config)))
    vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(config, keys))
    vae.load_state_dict(convert_ldm_vae_checkpoint(keys, dict(vae.config)))
    # transformers from 5.6 on names a CLIPTextModel's tensors without the "text_model." the converter writes
    text = {k.removeprefix("text_model."): v
            for k, v in convert_open_clip_checkpoint(base.text_encoder, keys, prefix="cond_stage_model.model.").items()}
    for ours, theirs in ((erased.unet.state_dict(), unet.state_dict()), (base.vae.state_dict(), vae.state_dict()),
                         ({k.removeprefix("text_model."): v for k, v in base.text_encoder.state_dict().items()}, text)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(v, base.unet.state_dict()[k]) for k, v in erased.unet.state_dict().items())
    card = (folder / "README.md").read_text()
    a1111 = next(line for line in card.splitlines() if line.startswith("- AUTOMATIC1111"))
    assert f"`{name}.safetensors` with `{name}.yaml` beside it" in a1111
