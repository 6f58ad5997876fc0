"""Run manifests as values: RunManifest reads every manifest.json and writes back exactly what it read."""

import json

import pytest

from age_explorer.core.erasure import erase, make_config
from age_explorer.core.runs import MANIFEST, RUN_KIND, CorruptRunError, RunManifest

CONCEPT = "red circle"
CANDIDATES = ["red square", "blue circle", "green triangle", "yellow ring"]
VERSIONS = {"python": "3.11.7", "age-explorer": "0.1.0", "torch": "2.13.0+cpu", "diffusers": "0.42.1",
            "transformers": "5.25.0", "safetensors": "0.8.0", "numpy": "2.4.6"}
DEVIATIONS = [
    "loss in eps space, the space the toy recipe was tuned in (x0 space weights steps by (1-a)/a, up to 212 at t=999)",
    "200 model steps at lr 3e-4, batch 2, instead of 1000 at 1e-5, batch 1: a 1.7 M-parameter model",
    "'sample till t' on a 5-step DDIM schedule instead of 50",
    "each pi step reuses its model step's concept, Gumbel sample and latents (the paper samples afresh every iteration)",
    "pi lr 5e-2 instead of 1e-2: 5x fewer pi steps",
    "iterations=2 instead of the preset's 200"]
# the manifest.json of a toy AGE run (toy-fast, 2 iterations) and its target check, as the code wrote
# it before manifests were RunManifest values
OLD_AGE = {
    "kind": "age-explorer erasure run", "status": "done", "method": "age", "preset": "toy-fast",
    "deviations_from_paper": DEVIATIONS, "concepts": ["red circle"],
    "config": {
        "method": "age", "concepts": ["red circle"], "preset": "toy-fast", "prompt_template": "a {c}", "seed": 0,
        "requires_gpu": False, "deviations": DEVIATIONS, "parameter_set": "xattn", "iterations": 2, "lr": 0.0003,
        "batch_size": 2, "negative_guidance": 1.0, "start_guidance": 3.0, "ddim_steps": 5, "loss_space": "eps",
        "xt_source": "sample", "pool_size": 16, "precision": "fp32", "checkpoint_every": 0, "lam": 1.0,
        "pgd_num_steps": 2, "gumbel_lr": 0.05, "gumbel_temp": 0.1, "gumbel_hard": True, "gumbel_topk": 5,
        "k_closest": 100, "num_centers": 100, "vocab": "toy", "candidates": CANDIDATES, "synonyms": [],
        "target_search": "gumbel", "damage_samples": 2, "pi_mode": "learned", "damage_probe_steps": 20,
        "near_copy_floor": 0.0, "neighbourhood_size": 5, "damage_stage_fraction": 0.25, "erase_check_every": 0,
        "erase_target_g": 0.05, "erase_check_images": 8, "erase_weight_growth": 2.0, "erase_weight_max": 16.0,
        "share_draws": True, "pi_l1": False, "neighbour_groups": None},
    "seed": 0, "steps_done": 4, "base_model": "toy", "base_model_kind": "toy", "base_revision": "toy-14dcaf843ec3",
    "base_fingerprint": "0c5eb1ea911116fde5cd74f0e28b561a99202c8ded62b7018aba3c113bc1e187", "device": "cpu",
    "dtype": "float32", "cpu_threads": 1, "loss_space": "eps", "seconds": 0.65, "versions": VERSIONS,
    "targets": {"red circle": [["green triangle", 0.2576], ["yellow ring", 0.2504], ["blue circle", 0.2503],
                               ["red square", 0.2417]]},
    "candidates": {"red circle": 4}, "excluded_candidates": {"red circle": []}, "pi_mode": "learned",
    "near_copy": {"red circle": [
        {"candidate": "green triangle", "pi": 0.2576, "text_l2": 25.873, "text_rank": 3, "output_distance": 0.01759,
         "output_rank": 2, "output_vs_median": 1.619},
        {"candidate": "yellow ring", "pi": 0.2504, "text_l2": 24.5858, "text_rank": 2, "output_distance": 0.02827,
         "output_rank": 3, "output_vs_median": 2.601},
        {"candidate": "blue circle", "pi": 0.2503, "text_l2": 19.9763, "text_rank": 1, "output_distance": 0.01087,
         "output_rank": 1, "output_vs_median": 1.0},
        {"candidate": "red square", "pi": 0.2417, "text_l2": 8.0413, "text_rank": 0, "output_distance": 0.00259,
         "output_rank": 0, "output_vs_median": 0.238}]},
    "erase_term": {"red circle": [0.232453, 0.056365]},
    "neighbour_picks": {"share": 0.5, "share_last_quarter": 0.0, "chance": 0.5},
    "delta_file": "delta.safetensors",
    "delta_sha256": "bc7eddb9e8c9cc1aea86cbe59bca88ce0cdc0f3880814362ee0239d4667b63dc",
    "changed_parameters": 35, "changed_values": 115136,
    "target_preservation": {"red circle": {"target": "green triangle", "pi": 0.2576, "G_after": 1.0, "images": 2,
                                           "preserved": True}}}
# a UCE run's, written before manifests recorded cpu_threads
OLD_UCE = {
    "kind": "age-explorer erasure run", "status": "done", "method": "uce", "preset": None,
    "deviations_from_paper": [], "concepts": ["red circle"],
    "config": {"method": "uce", "concepts": ["red circle"], "preset": None, "prompt_template": "{c}", "seed": 0,
               "requires_gpu": False, "deviations": [], "target": "", "preserve": [], "erase_scale": 1.0,
               "preserve_scale": None, "lam": 0.5, "token_alignment": "last_word", "preserve_empty": True,
               "parameter_set": "xattn_kv"},
    "seed": 0, "steps_done": 1, "base_model": "toy", "base_model_kind": "toy", "base_revision": "toy-14dcaf843ec3",
    "base_fingerprint": "a85504e2d9eff3cfb1dbf98730f2a339ed40c0b1e7e33c27699195ece33cca06", "device": "cpu",
    "dtype": "float32", "loss_space": None, "seconds": 0.02, "versions": VERSIONS,
    "delta_file": "delta.safetensors",
    "delta_sha256": "0c7f6d49501136df0e6f89634674d8c78f61b82a06f4ea0229a62e1b0c1d15f5",
    "changed_parameters": 14, "changed_values": 57344}


def _folder(tmp_path, name, data):
    folder = tmp_path / name
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def _round_trips(run_dir, tmp_path, finished=True):
    """The manifest read from ``run_dir`` gives the file's object, and writing it back the same file."""
    text = (run_dir / MANIFEST).read_text()
    manifest = RunManifest.read(run_dir, finished=finished)
    assert manifest.to_dict() == json.loads(text)
    assert list(manifest.to_dict()) == list(json.loads(text))  # the keys in the order the code writes them
    copy = tmp_path / f"{run_dir.name}-copy"
    copy.mkdir()
    manifest.write(copy)
    assert (copy / MANIFEST).read_text() == text
    assert RunManifest.read(copy, finished=finished) == manifest
    return manifest


@pytest.fixture(scope="module")
def age_run(toy_bundle, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "age"
    config = make_config("age", "toy-fast", concepts=[CONCEPT], candidates=CANDIDATES, iterations=2)
    return erase(toy_bundle, config, run_dir)


def test_an_age_run_reads_back_as_written(age_run, tmp_path):
    manifest = _round_trips(age_run.run_dir, tmp_path)
    # what erase returned is what it wrote (tuples of the targets become JSON lists)
    assert json.loads(json.dumps(age_run.manifest.to_dict())) == manifest.to_dict()
    assert manifest.method == "age" and manifest.concepts == [CONCEPT] and manifest.status == "done"
    assert manifest.config["candidates"] == CANDIDATES and manifest.config.get("target") is None
    assert manifest.targets[CONCEPT][0][0] in CANDIDATES and manifest.candidates == {CONCEPT: 4}
    assert manifest.delta_sha256 and manifest.changed_parameters > 0 and manifest.extra == {}
    assert manifest.target_preservation is None and "target_preservation" not in manifest.to_dict()


def test_a_uce_run_has_no_age_fields(toy_bundle, tmp_path):
    result = erase(toy_bundle, make_config("uce", None, concepts=[CONCEPT]), tmp_path / "uce")
    manifest = _round_trips(result.run_dir, tmp_path)
    assert manifest.targets is None and manifest.loss_space is None
    assert set(manifest.to_dict()) == set(OLD_UCE) | {"cpu_threads"}


def test_a_stopped_run_reads_only_when_asked(toy_bundle, tmp_path):
    config = make_config("age", "toy-fast", concepts=[CONCEPT], candidates=CANDIDATES, iterations=2)
    steps = []
    result = erase(toy_bundle, config, tmp_path / "stopped", callbacks=[steps.append], stop=lambda: len(steps) >= 1)
    assert result.status == "stopped"
    with pytest.raises(CorruptRunError, match=r"did not finish \(status 'stopped'\); resume it with"):
        RunManifest.read(result.run_dir)
    manifest = _round_trips(result.run_dir, tmp_path, finished=False)
    assert manifest.status == "stopped" and manifest.delta_file is None and manifest.targets
    assert not {"delta_file", "delta_sha256", "changed_parameters", "changed_values"} & set(manifest.to_dict())


@pytest.mark.parametrize("old", [OLD_AGE, OLD_UCE], ids=["age", "uce-without-cpu-threads"])
def test_a_manifest_written_before_reads_and_writes_back_the_same(tmp_path, old):
    manifest = _round_trips(_folder(tmp_path, "old", old), tmp_path)
    assert manifest.to_dict() == old
    assert RunManifest.from_dict(old) == manifest


def test_old_values_are_fields():
    age, uce = RunManifest.from_dict(OLD_AGE), RunManifest.from_dict(OLD_UCE)
    assert (age.method, age.preset, age.base_model, age.base_revision) == ("age", "toy-fast", "toy", "toy-14dcaf843ec3")
    assert age.target_preservation[CONCEPT]["target"] == age.targets[CONCEPT][0][0] == "green triangle"
    assert age.neighbour_picks["chance"] == 0.5 and age.erase_weight is None and "erase_weight" not in age.to_dict()
    assert uce.cpu_threads is None and "cpu_threads" not in uce.to_dict()


def test_a_field_set_after_reading_is_written(tmp_path):
    folder = _folder(tmp_path, "old", OLD_UCE)
    manifest = RunManifest.read(folder)
    manifest.cpu_threads = 4
    manifest.target_preservation = {}  # set, even though empty
    manifest.write(folder)
    written = json.loads((folder / MANIFEST).read_text())
    assert written == {**OLD_UCE, "cpu_threads": 4, "target_preservation": {}}


def test_a_new_manifest_writes_its_fields_and_leaves_out_the_unset_optional_ones():
    manifest = RunManifest(status="done", method="esd", concepts=(CONCEPT,), config={}, steps_done=3, base_model="toy")
    data = manifest.to_dict()
    assert manifest.concepts == [CONCEPT] and data["kind"] == RUN_KIND
    assert data["cpu_threads"] is None and data["base_revision"] is None  # part of every manifest, even when None
    assert not {"targets", "delta_file", "target_preservation", "extra"} & set(data)


def test_unknown_keys_are_kept_as_extra_at_the_top_level(tmp_path):
    # a registered method's own results, where erase writes them: after versions, before the delta
    cut = list(OLD_UCE).index("delta_file")
    data = dict([*list(OLD_UCE.items())[:cut], ("score", {"red circle": 0.25}), ("extra", [1, 2]),
                 *list(OLD_UCE.items())[cut:]])
    folder = _folder(tmp_path, "plugin", data)
    manifest = _round_trips(folder, tmp_path)
    assert manifest.extra == {"score": {"red circle": 0.25}, "extra": [1, 2]}
    assert RunManifest.keywords({"targets": {}, "score": 1}) == {"targets": {}, "extra": {"score": 1}}
    made = RunManifest(status="done", method="plugin", concepts=[CONCEPT], config={}, steps_done=1, base_model="toy",
                       **RunManifest.keywords({"score": 0.5, "pi_mode": "learned"}))
    assert made.pi_mode == "learned" and made.to_dict()["score"] == 0.5
    # to_dict is a copy: changing it leaves the manifest as it was
    made.to_dict()["config"]["x"] = 1
    assert made.config == {}


@pytest.mark.parametrize("text, message", [
    (None, "manifest.json is missing or not valid JSON"),
    ("{not json", "manifest.json is missing or not valid JSON"),
    ("[1, 2]", "is not an erasure run folder"),
    (json.dumps({**OLD_UCE, "kind": "age-explorer LoRA export"}), "is not an erasure run folder"),
    (json.dumps({**OLD_UCE, "status": "stopped"}), "did not finish"),
    (json.dumps({k: v for k, v in OLD_UCE.items() if k != "concepts"}), "lacks concepts"),
    (json.dumps({**OLD_UCE, "concepts": "red circle"}), "is damaged: concepts must be a list"),
    (json.dumps({**OLD_UCE, "config": ["x"]}), "is damaged: config must be a JSON object"),
])
def test_a_damaged_manifest_is_a_corrupt_run(tmp_path, text, message):
    folder = tmp_path / "run"
    folder.mkdir()
    if text is not None:
        (folder / MANIFEST).write_text(text)
    with pytest.raises(CorruptRunError, match=message):
        RunManifest.read(folder)


def test_an_unknown_status_is_refused_even_for_a_stopped_run_check(tmp_path):
    folder = _folder(tmp_path, "run", {**OLD_UCE, "status": "paused"})
    with pytest.raises(CorruptRunError, match="status is 'paused', not one of done, stopped"):
        RunManifest.read(folder, finished=False)


@pytest.mark.parametrize("options, message", [
    (dict(status="paused"), "status is 'paused'"),
    (dict(kind="age-explorer evaluation"), "kind is 'age-explorer evaluation'"),
    (dict(extra={"targets": {}}), "extra repeats the manifest field"),
    (dict(concepts="red circle"), "concepts must be a list"),
])
def test_construction_is_validated(options, message):
    fields = dict(status="done", method="age", concepts=[CONCEPT], config={}, steps_done=0, base_model="toy")
    with pytest.raises(ValueError, match=message):
        RunManifest(**{**fields, **options})
