"""`age-explorer evaluate`: ESR/PSR on the toy world agree with a graph row of the same run and seeds;
NudeNet's real detector on a tiny random SD pipeline's images, offline; CLIP score with a tiny random
CLIP; metrics that cannot run are reported; result folders are written whole; bad input is one line."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from age_explorer.core.app.evaluate import evaluate
from age_explorer.core.bundle import load_bundle
from age_explorer.core.app.cli.main import main
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.evaluation import EvaluationConfig
from age_explorer.core.evaluation.prompts import generate_rows, read_prompt_csv
from age_explorer.core.evaluation.results import compare_table
from age_explorer.core.graph.capability import CapabilitySpec, load_evaluator
from age_explorer.core.graph.concept_sets import load_concept_set
from age_explorer.core.graph.sweep import measure_row
from age_explorer.core.sampling import generate

SUBSET = ["red circle", "red square", "green circle", "blue triangle", "yellow ring"]


@pytest.fixture(scope="module")
def toy_run(toy_bundle, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluation") / "uce-red-circle"
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), run)
    return run


@pytest.fixture(scope="module")
def subset_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "five.csv"
    pd.DataFrame({"concept": SUBSET}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def i2p_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "i2p.csv"
    pd.DataFrame({"case_number": [0, 1, 2], "prompt": ["a red circle", "red", "a circle red"],
                  "evaluation_seed": [7, 3000, 12], "evaluation_guidance": [7.5, 7.5, 3.0],
                  "categories": ["sexual", "sexual,violence", ""]}).to_csv(path, index=False)
    return path


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _reference_images(folder, n):
    """``n`` PNGs of random pixels (a stand-in for a folder of real photos), one in a subfolder."""
    from PIL import Image

    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        pixels = (torch.rand(40 + 8 * i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / ("sub" if i == 0 else "") / f"photo{i}.png")
    return folder


def _random_metric_weights(torch_home, site):
    """RANDOM weights saved under the file names of the real ones (torchvision's AlexNet and the FID
    Inception in torch.hub's checkpoint folder, the lpips package's linear layers in a stand-in package
    that cannot be imported): they exercise finding, loading and computing, not the metrics' values;
    the real files cannot be downloaded here."""
    from age_explorer.core.evaluation.fid import INCEPTION_FILES, FIDInception
    from age_explorer.core.evaluation.lpips_score import ALEXNET_FILE, CHANNELS, AlexNetFeatures

    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(AlexNetFeatures().state_dict(), checkpoints / ALEXNET_FILE)
    torch.save(FIDInception().state_dict(), checkpoints / INCEPTION_FILES[0])
    weights = site / "lpips" / "weights" / "v0.1"
    weights.mkdir(parents=True)
    (site / "lpips" / "__init__.py").write_text("raise ImportError('a stand-in: only its weights file is read')\n")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}, weights / "alex.pth")


def test_esr_psr_are_a_graph_row_of_the_same_run_and_seeds(toy_run, subset_csv, tmp_path, one_thread):
    config = EvaluationConfig(concept_set=str(subset_csv), images_per_class=4, seed=1000)
    result = evaluate(toy_run, config, device="cpu", log=lambda line: None)
    assert result.out_dir == toy_run / "evaluation"
    per_class = pd.DataFrame(result.results["objects"]["per_class"]).set_index("class")

    base = load_bundle("toy", device="cpu")
    concept_set = load_concept_set(str(subset_csv), base)
    evaluator = load_evaluator("toy", base, concept_set)
    nodes = pd.DataFrame({"concept": SUBSET, "G0_top1": 1.0, "G0_topk": 1.0})
    row = measure_row(load_bundle(str(toy_run), device="cpu"), concept_set, evaluator,
                      CapabilitySpec(images_per_concept=4, seed=1000, template=config.template), "red circle",
                      nodes).set_index("affected")
    for name in SUBSET:  # the same images, so the same hit rates, class by class
        assert per_class.loc[name, "top1"] == row.loc[name, "G_after_top1"]
        assert per_class.loc[name, "top5"] == row.loc[name, "G_after_topk"]
    kept = [c for c in SUBSET if c != "red circle"]
    metrics = result.results["metrics"]
    assert metrics["ESR-1"] == pytest.approx(1 - row.loc["red circle", "G_after_top1"])
    assert metrics["PSR-1"] == pytest.approx(row.loc[kept, "G_after_top1"].mean())
    assert metrics["PSR-5"] == pytest.approx(row.loc[kept, "G_after_topk"].mean())
    assert metrics["ESR-1"] >= 0.75  # UCE toy-uce erases red circle (ESR-1 1.0 at 32 images)

    folder = result.out_dir
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "results.csv", "results.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seeds"] == [1000, 1001, 1002, 1003] and manifest["model"]["model"] == "toy"
    assert manifest["model"]["method"] == "uce" and manifest["versions"]["torch"] == torch.__version__
    table = pd.read_csv(folder / "results.csv")
    assert table.set_index(["metric", "scope"]).loc[("ESR-1", "all"), "value"] == pytest.approx(metrics["ESR-1"])
    assert len(table[table.metric == "kept_top1"]) == 4
    samples = result.results["objects"]["samples"]
    assert len(samples) == 20 and samples[0]["prompt"] == "a photo of a red circle" and samples[0]["seed"] == 1000


def test_cli_evaluates_compares_and_keeps_results_whole(toy_run, subset_csv, tmp_path, capsys, one_thread):
    base = tmp_path / "base"
    args = ["evaluate", "toy", "--erased", "red circle", "--concept-set", str(subset_csv), "--images-per-class", "2",
            "--out", str(base)]
    assert main(args) == 0
    assert "ESR-1:" in capsys.readouterr().out
    first = (base / "results.json").read_bytes()
    assert main(args) == 2  # an existing result folder is kept unless --force
    assert "exists: pass --force" in capsys.readouterr().err
    assert (base / "results.json").read_bytes() == first and not _leftovers(tmp_path)
    run_out = tmp_path / "uce"
    assert main(["evaluate", str(toy_run), "--concept-set", str(subset_csv), "--images-per-class", "2",
                 "--metrics", "objects", "--metrics", "lpips", "--out", str(run_out), "--save-images"]) == 0
    assert "lpips: not available" in capsys.readouterr().out
    assert len(list((run_out / "images" / "objects").glob("*.png"))) == 10
    assert main(["evaluate", "--compare", str(base), str(run_out)]) == 0
    out = capsys.readouterr().out
    assert "BASE" in out and "UCE toy-uce" in out and "PSR-5" in out
    table = compare_table([base, run_out])
    assert table["ESR-1"].iloc[1] >= table["ESR-1"].iloc[0]  # erasing raises ESR over the base model


@pytest.mark.parametrize("args, message", [
    (["--metrics", "bleu"], "unknown metric bleu"),
    (["--metrics", "nudity"], "needs a prompt CSV"),
    (["--images-per-class", "0"], "images_per_class must be a whole number from 1 to 1,000"),
    (["--erased", "zebra"], "not in the concept set 'toy'"),
    (["--nudity-threshold", "2"], "nudity_threshold must be a finite number from 0 to 1"),
    (["--metrics", "lpips"], "or of the objects metric (--metrics objects)"),
    (["--metrics", "objects", "--metrics", "fid"], "needs a folder of reference images (--fid-reference FOLDER)"),
    (["--metrics", "objects", "--metrics", "fid", "--fid-reference", "/no/such/folder"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = ["--erased", "red circle"] if "--erased" not in args else []
    assert main(["evaluate", "toy", "--out", str(out), *base, *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_missing_classifier_weights_say_how_to_get_them(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", str(tiny_sd_dir), "--erased", "Garbage Truck", "--out", str(out), "--offline"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not load the classifier 'hf:microsoft/resnet-50'" in errors[0]
    assert "hf download microsoft/resnet-50" in errors[0] and "Traceback" not in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_prompt_csv_reads_the_i2p_layouts(i2p_csv, tmp_path):
    rows = read_prompt_csv(i2p_csv)
    assert rows.seed.tolist() == [7, 3000, 12] and rows.guidance.tolist() == [7.5, 7.5, 3.0]
    assert rows.categories.tolist() == ["sexual", "sexual,violence", ""]
    raw = tmp_path / "raw_i2p.csv"  # the original I2P release's columns
    pd.DataFrame({"prompt": ["a red circle"], "sd_seed": [5], "sd_guidance_scale": [6.0]}).to_csv(raw, index=False)
    assert read_prompt_csv(raw)[["seed", "guidance"]].values.tolist() == [[5, 6.0]]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,evaluation_seed\na red circle,-3\n")
    with pytest.raises(ValueError, match="row 2: evaluation_seed must be a whole number"):
        read_prompt_csv(bad)
    bad.write_text("text,seed\nx,1\n")
    with pytest.raises(ValueError, match="needs the columns prompt and evaluation_seed"):
        read_prompt_csv(bad)


def test_prompt_rows_get_their_own_seed_and_guidance(tiny_sd_dir, i2p_csv):
    bundle = load_bundle(str(tiny_sd_dir), device="cpu")
    rows = read_prompt_csv(i2p_csv)
    images = generate_rows(bundle, rows, steps=2, batch_size=2)
    for i, row in rows.iterrows():
        alone = generate(bundle, [row.prompt], [int(row.seed)], steps=2, guidance_scale=float(row.guidance))
        # batches of other sizes round differently (about 1e-6), nothing more
        assert torch.allclose(images[i], alone[0], atol=1e-5)


def test_nudenet_runs_offline_on_known_images(tmp_path):
    pytest.importorskip("nudenet")
    from PIL import Image

    from age_explorer.core.evaluation.nudity import NudityDetector

    detector = NudityDetector()
    grey = torch.full((1, 3, 320, 320), 0.5)
    noise = torch.rand((1, 3, 320, 320), generator=torch.Generator().manual_seed(0))
    found = detector.detect(torch.cat([grey, noise]))
    assert found == [[], []]  # nothing to detect in a flat grey image or in pixel noise
    # the tensor path hands NudeNet what it reads from a file: the same detections for a PNG of the image
    photo = (noise[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(photo).save(tmp_path / "noise.png")
    assert detector.detector.detect(str(tmp_path / "noise.png")) == found[1]


def test_nudity_on_a_tiny_pipeline_records_detector_and_threshold(tiny_sd_dir, i2p_csv, tmp_path):
    pytest.importorskip("nudenet")
    from age_explorer.core.evaluation.nudity import COUNTED

    config = EvaluationConfig(metrics=["nudity"], prompts=str(i2p_csv), steps=2)
    result = evaluate(tiny_sd_dir, config, out=tmp_path / "nudity", device="cpu", log=lambda line: None)
    block = result.results["nudity"]
    assert block["threshold"] == 0.6 and block["nudenet"] and block["weights"].startswith("320n.onnx")
    assert list(block["class_counts"]) == list(COUNTED)
    assert [s["seed"] for s in block["samples"]] == [7, 3000, 12]
    assert block["samples"][1]["categories"] == "sexual,violence"
    rate = result.results["metrics"]["nudity_exposure_rate"]
    assert rate == sum(s["exposed"] for s in block["samples"]) / 3
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["versions"]["nudenet"] == block["nudenet"] and manifest["prompt_seeds"] == [7, 3000, 12]


def test_clip_score_with_a_cached_model_and_a_missing_one(tiny_sd_dir, tiny_clip_dir, i2p_csv, tmp_path):
    clip_dir = tiny_clip_dir
    reference = _reference_images(tmp_path / "reference", 2)
    config = EvaluationConfig(metrics=["clip", "fid"], prompts=str(i2p_csv), steps=2, clip_model=str(clip_dir),
                              fid_reference=str(reference))
    result = evaluate(tiny_sd_dir, config, out=tmp_path / "clip", device="cpu", log=lambda line: None)
    scores = [s["clip_score"] for s in result.results["clip"]["samples"]]
    assert len(scores) == 3 and all(0 <= s <= 100 for s in scores)
    assert result.results["metrics"]["clip_score"] == pytest.approx(sum(scores) / 3, abs=1e-3)
    assert result.results["unavailable"]["fid"].startswith("not available:") and "fid" not in result.results["metrics"]

    missing = EvaluationConfig(metrics=["clip"], prompts=str(i2p_csv), steps=2, clip_model="nobody/no-clip")
    result = evaluate(tiny_sd_dir, missing, out=tmp_path / "no-clip", device="cpu", log=lambda line: None)
    why = result.results["unavailable"]["clip_score"]
    assert why.startswith("not available:") and "hf download nobody/no-clip" in why
    assert "clip_score" not in result.results["metrics"]


def test_lpips_and_fid_without_weights_say_how_to_get_them(toy_run, subset_csv, tmp_path):
    from age_explorer.core.evaluation.fid import INCEPTION_FILES, INCEPTION_URL
    from age_explorer.core.evaluation.lpips_score import ALEXNET_FILE, ALEXNET_URL
    from age_explorer.core.evaluation.weights import checkpoints_dir

    reference = _reference_images(tmp_path / "reference", 2)
    config = EvaluationConfig(metrics=["objects", "lpips", "fid"], concept_set=str(subset_csv), images_per_class=1,
                              fid_reference=str(reference))
    result = evaluate(toy_run, config, device="cpu", out=tmp_path / "run", log=lambda line: None).results
    why = result["unavailable"]
    assert why["lpips"].startswith("not available: the AlexNet weights and the linear layers are missing")
    assert ALEXNET_FILE in why["lpips"] and ALEXNET_URL in why["lpips"] and str(checkpoints_dir()) in why["lpips"]
    assert "pip install lpips" in why["lpips"]
    assert why["fid"].startswith("not available:") and INCEPTION_FILES[0] in why["fid"] and INCEPTION_URL in why["fid"]
    assert "lpips" not in result["metrics"] and "fid" not in result["metrics"] and "ESR-1" in result["metrics"]
    table = pd.read_csv(tmp_path / "run" / "results.csv").set_index("metric")
    assert table.loc["lpips", "value"] == why["lpips"]
    # a plain model has no base model to compare with
    plain = evaluate("toy", EvaluationConfig(metrics=["objects", "lpips"], erased=["red circle"],
                                             concept_set=str(subset_csv), images_per_class=1),
                     device="cpu", out=tmp_path / "plain", log=lambda line: None).results
    assert "evaluate a run folder" in plain["unavailable"]["lpips"]


def test_lpips_and_fid_computed_from_local_weights(toy_run, subset_csv, tmp_path, monkeypatch):
    from scipy import linalg

    from age_explorer.core.evaluation.fid import frechet_distance
    from age_explorer.core.evaluation.lpips_score import load_lpips
    from age_explorer.core.evaluation.results import card_lines

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    _random_metric_weights(tmp_path / "torch_home", tmp_path / "site")

    model, described = load_lpips()
    assert described["net"] == "alex" and len(described["backbone_sha256"]) == 64
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    assert model(a, a).tolist() == [0.0, 0.0, 0.0]  # identical images: distance 0
    assert (model(a, b) > 0).all() and model(a, b).isfinite().all()
    assert model(a[:, :, :16, :16], b[:, :, :16, :16]).isfinite().all()  # under AlexNet's 31 px: resized

    x = torch.randn(50, 3, generator=g).double().numpy()
    y = (torch.randn(40, 3, generator=g) * 2 + 1).double().numpy()
    assert abs(frechet_distance(x, x)) < 1e-9
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)  # the formula with scipy's sqrtm, as pytorch-fid computes it
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)

    reference = _reference_images(tmp_path / "reference", 4)
    config = EvaluationConfig(metrics=["objects", "lpips", "fid"], concept_set=str(subset_csv), images_per_class=2,
                              fid_reference=str(reference))
    result = evaluate(toy_run, config, device="cpu", out=tmp_path / "evaluation", log=lambda line: None).results
    assert result["unavailable"] == {}
    assert np.isfinite(result["metrics"]["fid"]) and result["metrics"]["lpips"] >= 0
    samples = result["lpips"]["samples"]
    assert len(samples) == 10 and [s["seed"] for s in samples[:2]] == [1000, 1001]
    assert result["metrics"]["lpips"] == pytest.approx(sum(s["lpips"] for s in samples) / 10, abs=1e-6)
    # the erased concept's images moved away from the base model's; the pairs are of the same seeds
    assert max(s["lpips"] for s in samples if s["prompt"] == "a photo of a red circle") > 0
    assert result["fid"]["reference_images"] == 4 and result["fid"]["evaluated_images"] == 10
    card = "\n".join(card_lines(tmp_path / "evaluation"))
    assert "| lpips |" in card and "| fid |" in card and "LPIPS: v0.1 AlexNet" in card and "FID:" in card
    table = compare_table([tmp_path / "evaluation"])
    assert table["lpips"].iloc[0] == pytest.approx(result["metrics"]["lpips"])
