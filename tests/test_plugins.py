"""A method, an attack and a metric registered in a test, with no edit anywhere else, reach the CLI, a
form's erasure plan, a run, an evaluation and the explorer: the plugin paths of the method, attack and
metric registries."""

from dataclasses import dataclass

import pytest
import torch

from age_explorer.core.attacks import ATTACKS, AttackConfig, AttackType, attack_folder, read_result, register_attack
from age_explorer.core.checks import help_field
from age_explorer.core.erasure import METHODS, get_method, register_method
from age_explorer.core.erasure.config import MethodConfig
from age_explorer.core.erasure.registry import Method, MethodResult
from age_explorer.core.evaluation import METRIC_FAMILIES, MetricFamily, register_metric
from age_explorer.core.evaluation.registry import SHARED, Measured
from age_explorer.core.runs import RunManifest


@dataclass
class ShrinkConfig(MethodConfig):
    """A closed-form toy edit: scale the cross-attention values (no steps, no checkpoints)."""

    method = "shrink-values"

    factor: float = help_field("scale of the to_v weights", 0.5)
    target: str = help_field("unused; here so the form's target box reaches it", "")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {self.factor}")


def run_shrink(bundle, config, run_dir, callbacks, stop, resume) -> MethodResult:
    names = [n for n, _ in bundle.unet.named_parameters() if n.endswith("attn2.to_v.weight")]
    params = dict(bundle.unet.named_parameters())
    originals = {n: params[n].detach().cpu().clone() for n in names}
    return MethodResult("done", 1, {n: originals[n] * config.factor for n in names}, originals)


@pytest.fixture
def shrink():
    register_method(Method("shrink-values", "Shrink values (closed form)", ShrinkConfig, run_shrink,
                           "a test plugin: scale the cross-attention values"))
    try:
        yield get_method("shrink-values")
    finally:
        METHODS.pop("shrink-values", None)


@dataclass
class EchoConfig(AttackConfig):
    """Probe the erased model with the concept's name after a fixed word."""

    attack = "echo"

    word: str = help_field("the word before the concept", "a")


class EchoAttack:
    name = "echo"
    config_class = EchoConfig
    depends_on_weights = False

    def learn(self, target, concept, config, progress=None, stop=None):
        from age_explorer.core.attacks.common import Probe

        prompt = f"{config.word} {concept}"
        return [Probe(prompt, target.bundle.encode([prompt]), config.seed_list, config.guidance, "echo")], {}, {}


@pytest.fixture
def echo():
    attack = register_attack(AttackType("echo", EchoConfig, EchoAttack, "a test plugin: one fixed prompt"))
    try:
        yield attack
    finally:
        ATTACKS.pop("echo", None)


def test_a_closed_form_plugin_declares_no_steps_and_no_checkpoints(shrink):
    assert not shrink.fine_tuned and not shrink.checkpointable and "target" in shrink.options
    assert get_method("esd").fine_tuned and get_method("esd").checkpointable
    assert not get_method("uce").fine_tuned


def test_a_plugin_method_runs_from_the_cli_with_flags_from_its_config(shrink, tmp_path, one_thread, capsys):
    from age_explorer.core.app.cli.main import main

    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    assert "--factor" in capsys.readouterr().out
    assert main(["erase", "--model", "toy", "--concept", "red circle", "--method", "shrink-values",
                 "--factor", "0.25", "--out", str(tmp_path / "run")]) == 0
    manifest = RunManifest.read(tmp_path / "run")
    assert manifest.method == "shrink-values" and manifest.config["factor"] == 0.25
    assert manifest.changed_parameters > 0 and manifest.steps_done == 1
    assert main(["erase", "--model", "toy", "--concept", "red circle", "--method", "shrink-values",
                 "--factor", "2", "--out", str(tmp_path / "bad")]) == 2  # its own check, one line
    assert not (tmp_path / "bad").exists()


def test_the_erase_form_sends_a_plugin_only_its_own_fields(shrink, toy_bundle):
    from age_explorer.explorer.workflows import plan_erase, preset_values
    from age_explorer.explorer.tabs.erase import form_options

    options = form_options(shrink, None, 1.0, "gumbel", "a red square", "(preset)", "")
    assert options == {"target": "a red square"}  # no λ, search, vocabulary or checkpoints: not its fields
    config = plan_erase(toy_bundle, "cpu", ["red circle"], "shrink-values", None, options)
    assert isinstance(config, ShrinkConfig) and config.target == "a red square"
    assert preset_values("shrink-values", None, ["iterations"]) == {}
    with pytest.raises(ValueError, match="closed-form edit with no model steps"):
        plan_erase(toy_bundle, "cpu", ["red circle"], "shrink-values", None,
                   form_options(shrink, 5, None, None, None, None, ""))
    esd = form_options(get_method("esd"), 4, 1.0, "gumbel", "", "(preset)", "")
    assert esd == {"iterations": 4, "target": "", "checkpoint_every": 25}


def test_the_explorer_lists_a_plugin_method_and_attack(shrink, echo, tmp_path):
    from age_explorer.explorer.app import Settings, build_app

    demo = build_app(Settings(data_dir=str(tmp_path / "data"), device="cpu", start_worker=False))
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert ("Shrink values (closed form)", "shrink-values") in [tuple(c) for c in by_id["method"].choices]
    assert "echo" in [c[1] for c in by_id["attack_kind"].choices]


def test_a_plugin_attack_runs_from_the_cli_with_flags_from_its_config(echo, shrink, tmp_path, one_thread, capsys):
    from age_explorer.core.app.cli.main import main

    run = tmp_path / "run"
    assert main(["erase", "--model", "toy", "--concept", "red circle", "--method", "shrink-values", "--out", str(run)]) == 0
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "--word" in capsys.readouterr().out
    assert main(["attack", str(run), "--attack", "echo", "--word", "one", "--seeds", "1000-1001",
                 "--sample-steps", "3"]) == 0
    data = read_result(attack_folder(run, "echo", "red circle"))
    assert data["attack"] == "echo" and data["config"]["word"] == "one" and 0 <= data["asr"] <= 1
    assert main(["attack", str(run), "--attack", "echo", "--tokens", "2"]) == 2  # another attack's field


def test_plugin_weights_are_what_its_runner_computed(shrink, toy_bundle, tmp_path):
    from age_explorer.core.erasure import erase, make_config
    from age_explorer.core.runs import run_weights

    before = {n: p.detach().clone() for n, p in toy_bundle.unet.named_parameters()}
    erase(toy_bundle, make_config("shrink-values", None, concepts=["red circle"], factor=0.5), tmp_path / "run")
    with run_weights(toy_bundle, tmp_path / "run"):
        for name, param in toy_bundle.unet.named_parameters():
            expected = before[name] * 0.5 if name.endswith("attn2.to_v.weight") else before[name]
            assert torch.equal(param, expected), name
    assert all(torch.equal(p, before[n]) for n, p in toy_bundle.unet.named_parameters())


class BrightnessMeasurement:
    """Mean pixel value of the shared images (the objects metric's here), one sample per image."""

    def __init__(self, context):
        self.values = []

    def add(self, prompts, seeds, images, label=None):
        self.values += images.mean(dim=(1, 2, 3)).tolist()

    def finish(self):
        value = sum(self.values) / len(self.values)
        return Measured({"brightness": value}, [{"metric": "brightness", "scope": "all", "value": value,
                                                 "n": len(self.values)}], {"brightness": {"images": len(self.values)}})


@pytest.fixture
def brightness():
    family = register_metric(MetricFamily("brightness", "mean pixel value", SHARED, BrightnessMeasurement))
    try:
        yield family
    finally:
        METRIC_FAMILIES.pop("brightness", None)


def test_a_plugin_metric_runs_from_the_cli_and_shows_in_results_card_and_explorer(brightness, shrink, tmp_path,
                                                                                 one_thread, capsys):
    import json

    import pandas as pd

    from age_explorer.core.app.cli.main import main
    from age_explorer.explorer.workflows import EVALUATION_COLUMNS, evaluation_view
    from age_explorer.core.evaluation.results import card_lines, compare_table

    run, classes = tmp_path / "run", tmp_path / "three.csv"
    pd.DataFrame({"concept": ["red circle", "red square", "green circle"]}).to_csv(classes, index=False)
    assert main(["erase", "--model", "toy", "--concept", "red circle", "--method", "shrink-values", "--out", str(run)]) == 0
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "brightness (mean pixel value)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
    # a shared-images family needs images to measure: alone, it is refused in one line
    assert main(["evaluate", str(run), "--metrics", "brightness", "--out", str(tmp_path / "bad")]) == 2
    assert "or of the objects metric (--metrics objects)" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--metrics", "objects", "--metrics", "brightness", "--concept-set", str(classes),
                 "--images-per-class", "2"]) == 0
    assert "brightness: " in capsys.readouterr().out
    folder = run / "evaluation"
    data = json.loads((folder / "results.json").read_text())
    assert data["brightness"] == {"images": 6} and 0 < data["metrics"]["brightness"] < 1  # 3 classes x 2 seeds
    assert "ESR-1" in data["metrics"] and data["unavailable"] == {}
    table = pd.read_csv(folder / "results.csv").set_index("metric")
    assert table.loc["brightness", "n"] == 6
    assert compare_table([folder])["brightness"].iloc[0] == pytest.approx(data["metrics"]["brightness"])
    assert any(line.startswith("| brightness |") for line in card_lines(folder))
    assert "brightness **" in evaluation_view(folder).summary  # the explorer's Before/after evaluation
    assert list(evaluation_view(folder).table.columns) == EVALUATION_COLUMNS
    # without the objects family the per-class table is empty and keeps its column names (no "1 2 3" headers)
    data.pop("objects")
    (folder / "results.json").write_text(json.dumps(data))
    shown = evaluation_view(folder)
    assert shown.table.empty and list(shown.table.columns) == EVALUATION_COLUMNS and "brightness **" in shown.summary
