"""Target preservation: the top-1 target's own G after, recorded in the run and explained below 0.9."""

import json
import types

import pytest

from age_explorer.core.app.cli.main import main
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.erasure.preservation import (PRESERVED_G, check_target_preservation, measurable_targets,
                                                     notes, target_preservation)
from age_explorer.core.runs import RunManifest

CONCEPT = "red circle"
# whole toy concepts only, so that the top-1 target is one the toy classifier can judge
CANDIDATES = ["red square", "blue circle", "green triangle", "yellow ring"]


def _manifest(target="red square", output_vs_median=0.3):
    return RunManifest(status="done", method="age", concepts=[CONCEPT], config={}, steps_done=2, base_model="toy",
                       targets={CONCEPT: [[target, 0.6], ["blue ring", 0.1]]},
                       near_copy={CONCEPT: [{"candidate": target, "pi": 0.6, "text_rank": 0, "output_rank": 1,
                                             "output_vs_median": output_vs_median}]})


def test_a_lost_target_gets_a_note_with_the_signs_of_why():
    record = target_preservation(_manifest(), {"red square": 0.0, CONCEPT: 0.0}, images=32)
    entry = record[CONCEPT]
    assert (entry["target"], entry["G_after"], entry["preserved"], entry["images"]) == ("red square", 0.0, False, 32)
    assert "near copy" in entry["note"] and "'red'" in entry["note"] and "0.00 < 0.9" in entry["note"]
    assert notes(record) == [entry["note"]]


def test_a_kept_target_has_no_note_and_an_unmeasured_one_no_entry():
    assert target_preservation(_manifest(), {"red square": PRESERVED_G}, 32)[CONCEPT]["preserved"]
    assert notes(target_preservation(_manifest(), {"red square": 1.0}, 32)) == []
    assert target_preservation(_manifest(), {"blue ring": 1.0}, 32) == {}


def test_without_a_sign_the_note_says_the_erasure_spilled_onto_it():
    note = target_preservation(_manifest("blue ring", output_vs_median=1.2), {"blue ring": 0.5}, 32)[CONCEPT]["note"]
    assert "no near-copy sign" in note and "1.20 of the median" in note


def test_no_classifier_no_check():
    stub = types.SimpleNamespace(backend=types.SimpleNamespace(has_evaluator=False))
    assert measurable_targets(stub, _manifest()) == []


def test_an_age_run_records_its_top1_targets_own_g(toy_bundle, tmp_path):
    config = make_config("age", "toy-fast", concepts=[CONCEPT], candidates=CANDIDATES, iterations=2)
    erase(toy_bundle, config, tmp_path / "run")
    before = json.loads((tmp_path / "run" / "manifest.json").read_text())
    record = check_target_preservation(toy_bundle, tmp_path / "run", images=2)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest == {**before, "target_preservation": record}  # the rest of the manifest as it was
    assert RunManifest.read(tmp_path / "run").target_preservation == record
    entry = record[CONCEPT]
    assert entry["target"] == manifest["targets"][CONCEPT][0][0] and entry["images"] == 2
    assert 0.0 <= entry["G_after"] <= 1.0 and entry["preserved"] == (entry["G_after"] >= PRESERVED_G)


def test_the_erase_command_checks_the_target(tmp_path, capsys):
    words = tmp_path / "candidates.txt"
    words.write_text("\n".join(CANDIDATES))
    out = tmp_path / "run"
    assert main(["erase", "--concept", CONCEPT, "--preset", "toy-fast", "--iterations", "2", "--search",
                 "damage_floor", "--candidates", str(words), "--target-check-images", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["target_search"] == "damage_floor" and manifest["config"]["near_copy_floor"] == 0.5
    entry = manifest["target_preservation"][CONCEPT]
    assert f"top-1 target {entry['target']} keeps G {entry['G_after']:.2f} (2 images)" in printed
    assert ("note: top-1 target" in printed) == (not entry["preserved"])


@pytest.mark.parametrize("value", ["-1", "5000"])
def test_the_check_size_is_bounded(tmp_path, capsys, value):
    assert main(["erase", "--concept", CONCEPT, "--target-check-images", value, "--out", str(tmp_path / "r")]) == 2
    assert "--target-check-images must be a whole number from 0 (skip) to 1024" in capsys.readouterr().err


def test_an_explorer_job_records_the_check_and_its_page_shows_the_note(tmp_path):
    from age_explorer.core.app.job_kinds import run_erase_job
    from age_explorer.explorer.tabs.erase import status_text

    ctx = types.SimpleNamespace(
        job=types.SimpleNamespace(resume=False, config={
            "model": "toy", "method": "age", "preset": "toy-fast",
            "options": {"concepts": [CONCEPT], "candidates": CANDIDATES, "iterations": 2}}),
        work_dir=tmp_path, device="cpu", report=lambda *args, **kwargs: None, should_stop=lambda: False)
    artifacts = run_erase_job(ctx)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert artifacts["target_notes"] == notes(manifest["target_preservation"])
    shown = types.SimpleNamespace(status="done", error=None, progress={}, cancel_requested=False,
                                  artifacts={"run_dir": "/r", "target_notes": ["top-1 target 'a' <b>"]})
    assert "Note: top-1 target 'a' &lt;b&gt;" in status_text(shown, public=True)
