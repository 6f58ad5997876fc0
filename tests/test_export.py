import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.export import export_run, push_to_hub, validate_name, validate_repo_id
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

    from age_explorer.core.app.evaluation import evaluate
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
