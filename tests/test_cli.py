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
