from PIL import Image

from age_explorer.core.cli import main


def test_generate_writes_view_and_raw_pngs(tmp_path, capsys):
    out = tmp_path / "imgs"
    assert main(["generate", "--model", "toy", "--prompt", "a blue square", "--seeds", "0-2",
                 "--steps", "5", "--out", str(out)]) == 0
    views = sorted(out.glob("*.png"))
    assert [p.name for p in views] == ["seed0000.png", "seed0001.png", "seed0002.png"]
    assert Image.open(views[0]).size == (128, 128)
    assert Image.open(out / "raw" / "seed0000.png").size == (32, 32)


def test_generate_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["generate", "--prompt", "a red ring", "--seeds", "3", "--steps", "5",
                     "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a/raw/seed0003.png").read_bytes() == (tmp_path / "b/raw/seed0003.png").read_bytes()


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red ring", "--seeds", "5-1", "--out", str(tmp_path)]) == 2
    assert "end (1) is below the start (5)" in capsys.readouterr().err
    assert main(["generate", "--prompt", "", "--out", str(tmp_path)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_words_warn_on_the_cli(tmp_path, capsys):
    assert main(["generate", "--prompt", "a zebra", "--seeds", "0", "--steps", "2", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "zebra" in err and "toy vocabulary is" in err


def test_bench_presets_prints_a_row_per_run_and_a_mean(capsys):
    assert main(["bench", "presets", "--preset", "toy-fast", "--preset", "toy-esd", "--concept", "red circle",
                 "--iterations", "2", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("toy-fast", "toy-esd"))]
    assert [r[:3] for r in rows[:2]] == [["toy-fast", "red", "circle"], ["toy-esd", "red", "circle"]]
    assert [r[:2] for r in rows[2:]] == [["toy-fast", "mean"], ["toy-esd", "mean"]]
    assert rows[0][3] == "4" and rows[1][3] == "2"  # AGE: model + pi steps; ESD: model steps
    assert float(rows[0][4]) > 0 and float(rows[2][2]) == float(rows[0][4])


def test_steps_zero_is_an_error_not_the_default(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red ring", "--steps", "0", "--out", str(tmp_path / "g")]) == 2
    assert "steps must be a whole number from 1 to 1000, got 0" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_diverging_lr_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["erase", "--concept", "red circle", "--method", "esd", "--preset", "toy-esd", "--iterations", "3",
                 "--lr", "1e30", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the loss diverged at step") and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_erase_into_an_existing_run_needs_resume_or_force(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["erase", "--concept", "red circle", "--method", "uce", "--out", str(out)]
    assert main(args) == 0
    first = (out / "delta.safetensors").read_bytes()
    assert main(args) == 2
    assert "exists and is not empty; pass --resume" in capsys.readouterr().err
    assert (out / "delta.safetensors").read_bytes() == first
    assert main(args + ["--force"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(args[:-1] + [str(tmp_path / "mine"), "--force"]) == 2
    assert "not a run" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_export_out_is_the_folder_and_force_keeps_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["erase", "--concept", "red circle", "--method", "uce", "--out", str(run)]) == 0
    out = tmp_path / "my-export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "delta.safetensors", "manifest.json"]
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("old card")
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() != "old card"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
