import pytest
from PIL import Image

from age_explorer.core.app.cli.main import COMMANDS, main


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


def test_resource_warnings_of_libraries_stay_off_the_one_line_error(tmp_path, capsys, monkeypatch):
    import warnings

    from age_explorer.core import sampling

    def leaky_parse(seeds):  # what the garbage collector reports when a library left a loop open
        warnings.warn("unclosed event loop", ResourceWarning)
        raise ValueError("bad seeds")
    monkeypatch.setattr(sampling, "parse_seeds", leaky_parse)
    assert main(["generate", "--prompt", "a red ring", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: bad seeds"]


def test_bench_presets_prints_a_row_per_run_and_a_mean(capsys):
    assert main(["bench", "presets", "--preset", "toy-fast", "--preset", "toy-esd", "--concept", "red circle",
                 "--iterations", "2", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("toy-fast", "toy-esd"))]
    assert [r[:3] for r in rows[:2]] == [["toy-fast", "red", "circle"], ["toy-esd", "red", "circle"]]
    assert [r[:2] for r in rows[2:]] == [["toy-fast", "mean"], ["toy-esd", "mean"]]
    assert rows[0][3] == "4" and rows[1][3] == "2"  # AGE: model + pi steps; ESD: model steps
    assert float(rows[0][4]) > 0 and float(rows[2][2]) == float(rows[0][4])


def test_bench_presets_times_a_shortcut_beside_its_recipe(capsys, monkeypatch):
    """PRESET+FIELD=VALUE: the fields reach the erasure's config; a bad spec is one line before any run."""
    configs = []
    real_erase = __import__("age_explorer.core.erasure", fromlist=["erase"]).erase
    monkeypatch.setattr("age_explorer.core.erasure.erase",
                        lambda bundle, config, run_dir: configs.append(config) or real_erase(bundle, config, run_dir))
    assert main(["bench", "presets", "--preset", "toy-esd", "--preset", "toy-esd+xt_source=pool+pool_size=2",
                 "--concept", "red circle", "--iterations", "2", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("toy-esd")]
    assert [r[0] for r in rows] == ["toy-esd", "toy-esd+xt_source=pool+pool_size=2"] * 2
    assert [(c.xt_source, c.pool_size) for c in configs] == [("sample", 16), ("pool", 2)]
    for spec, message in (("toy-esd+pool", "write its fields as PRESET+FIELD=VALUE"),
                          ("toy-esd+warp=9", "unknown esd option(s): warp"), ("nope", "unknown preset 'nope'")):
        assert main(["bench", "presets", "--preset", spec, "--concept", "red circle"]) == 2
        printed = capsys.readouterr()
        assert message in printed.err and "\n" not in printed.err.strip() and "whole erasures" not in printed.out


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
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "before_after.png", "delta.safetensors",
                                                     "manifest.json"]
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("old card")
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() != "old card"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- erase: every config field of every registered method has a flag, and its value lands in the config ----

# Text fields need a valid value other than their default; the other types get one from their default.
TEXT_VALUES = {"prompt_template": "a {c}", "parameter_set": "noxattn", "xt_source": "pool", "precision": "bf16",
               "vocab": "toy", "target_search": "damage", "target": "a blue square", "pi_mode": "uniform",
               "token_alignment": "all", "adv_token_alignment": "last_word", "anchor": "a blue square",
               "loss_type": "noise-based", "anchor_prediction": "frozen",
               "preset": None}  # preset: the method's first preset, below
NUMBER_VALUES = {"preserve_scale": 0.5}  # numbers whose default is None ("computed")
LIST_VALUES = {"concepts": ["red circle", "blue ring"], "synonyms": ["crimson"], "preserve": ["green square"],
               "deviations": ["a note"], "candidates": ["red square", "ring"], "anchor_templates": ["a {c}", "{c}"],
               "templates": ["a {c}", "an image of a {c}"]}
# (method, field): changing the field alone gives a config the method refuses, with this message
REFUSED = {("ap", "pi_l1"): "pi_l1 needs the erasure term to depend on pi"}


def _changed(field, method_name):
    """A valid value other than the field's default, and the flags that give it."""
    from age_explorer.core.app.cli.config_flags import flag_name
    from age_explorer.core.erasure import presets_for

    name, flag = field.name, flag_name(field.name)
    if name == "preset":
        preset = presets_for(method_name)[0]
        return preset, ["--preset", preset]
    if name == "candidates":  # read from a file, one per line
        return LIST_VALUES[name], ["--candidates", "CANDIDATES_FILE"]
    if name in LIST_VALUES:
        return LIST_VALUES[name], [arg for value in LIST_VALUES[name] for arg in (flag, value)]
    if name == "loss_space":  # eps is ESD's default, x0 AGE's
        other = "x0" if field.default == "eps" else "eps"
        return other, [flag, other]
    if name in TEXT_VALUES:
        return TEXT_VALUES[name], [flag, TEXT_VALUES[name]]
    if name in NUMBER_VALUES:
        return NUMBER_VALUES[name], [flag, str(NUMBER_VALUES[name])]
    if isinstance(field.default, bool):
        return not field.default, [flag if not field.default else "--no-" + flag[2:]]
    if name == "neighbour_groups":
        return {"red circle": ["red square"]}, [flag, '{"red circle": ["red square"]}']
    if isinstance(field.default, int):
        return field.default + 1, [flag, str(field.default + 1)]
    if isinstance(field.default, float):
        return field.default + 0.5, [flag, str(field.default + 0.5)]
    raise AssertionError(f"add a test value for {method_name}'s field {name!r}")


def _erase_cases():
    import dataclasses

    from age_explorer.core.erasure import METHODS

    return [pytest.param(name, field, id=f"{name}-{field.name}")
            for name, method in METHODS.items() for field in dataclasses.fields(method.config)]


class _Stop(Exception):
    """Raised by the stand-in for ``erase``: the config was built; the test ends the command there."""


@pytest.fixture
def erase_config(monkeypatch, tmp_path):
    """Run ``age-explorer erase ARGS`` up to the erasure and return the config it built (no model loads)."""
    import types

    from age_explorer.core import erasure
    from age_explorer.core.app.cli import erase as erase_command

    built = []

    def fake_erase(bundle, config, *args, **kwargs):
        built.append(config)
        raise _Stop

    stub = types.SimpleNamespace(backend=types.SimpleNamespace(default_preset=lambda method: None))
    monkeypatch.setattr(erase_command, "load_model", lambda args: stub)
    monkeypatch.setattr(erasure, "erase", fake_erase)
    (tmp_path / "candidates.txt").write_text("red square\nring\n")

    def run(method, flags):
        flags = [str(tmp_path / "candidates.txt") if f == "CANDIDATES_FILE" else f for f in flags]
        argv = ["erase", "--method", method, "--out", str(tmp_path / "run"), *flags]
        if "--concepts" not in flags and "--concept" not in flags:
            argv += ["--concept", "red circle"]
        with pytest.raises(_Stop):
            main(argv)
        return built.pop()

    return run


@pytest.mark.parametrize("method, field", _erase_cases())
def test_every_config_field_is_a_flag_that_lands_in_the_config(method, field, erase_config):
    value, flags = _changed(field, method)
    assert value != field.default and not (field.default is None and value is None)
    if (method, field.name) in REFUSED:
        from age_explorer.core.erasure import make_config

        with pytest.raises(ValueError, match=REFUSED[method, field.name]) as refused:
            make_config(method, None, concepts=["red circle"], **{field.name: value})
        assert "\n" not in str(refused.value)
        return
    config = erase_config(method, flags)
    assert type(config).method == method and getattr(config, field.name) == value


@pytest.mark.parametrize("method, flags, field, value", [
    ("age", ["--concept", "red circle", "--concept", "blue ring"], "concepts", ["red circle", "blue ring"]),
    ("age", ["--lambda", "0.25"], "lam", 0.25),
    ("uce", ["--lambda", "0.25"], "lam", 0.25),
    ("esd", ["--eta", "2"], "negative_guidance", 2.0),
    ("age", ["--search", "damage"], "target_search", "damage"),
    ("age", ["--search", "damage_floor"], "target_search", "damage_floor"),
    ("esd", ["--param-set", "noxattn"], "parameter_set", "noxattn"),
    ("age", ["--synonym", "crimson"], "synonyms", ["crimson"]),
    ("age", ["--preset", "imagenette", "--allow-cpu"], "requires_gpu", False),
    ("age", ["--share-draws"], "share_draws", True),
    ("age", ["--batch-pi-chain"], "batch_pi_chain", True),
    ("esd", ["--target", ""], "target", ""),
])
def test_the_flags_spelled_before_generation_still_work(method, flags, field, value, erase_config):
    assert getattr(erase_config(method, flags), field) == value


def test_a_flag_of_another_method_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    from age_explorer.core.app.cli import erase as erase_command

    monkeypatch.setattr(erase_command, "load_model", lambda args: pytest.fail("the model loaded before the check"))
    assert main(["erase", "--method", "esd", "--concept", "red circle", "--gumbel-temp", "1", "--candidates", "f",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: --gumbel-temp, --candidates do not apply to the esd method; "
                                       "see erase --help for the methods each flag belongs to\n")
    assert not (tmp_path / "run").exists()


def test_help_imports_neither_torch_nor_diffusers():
    """`age-explorer --help` builds every command's entry without the engine (it once took 34 s)."""
    import subprocess
    import sys

    probe = ("import sys; from age_explorer.core.app.cli.main import build_parser; build_parser([]).format_help(); "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, message", [
    (["erase", "--concept", "red circle", "--iterations", "0"], "error: iterations must be a whole number from 1"),
    (["erase", "--method", "esd", "--concept", "red circle", "--target", "red circle"], "is the erased concept itself"),
    (["toyworld", "train", "--concepts", "LIST"], "holds a JSON list, not an object"),
], ids=["erase iterations", "erase target", "toyworld concepts"])
def test_a_bad_flag_value_is_refused_before_the_engine_loads(argv, message, tmp_path):
    """A value the config or the concepts file refuses is one line within the CLI's own start-up, not after
    torch, diffusers and the model have loaded (seconds on the toy model, minutes from the Hub)."""
    import subprocess
    import sys

    (tmp_path / "list.json").write_text("[]")
    argv = [str(tmp_path / "list.json") if a == "LIST" else a for a in argv] + ["--out", str(tmp_path / "out")]
    probe = ("import sys\n"
             "from age_explorer.core.app.cli.main import main\n"
             f"code = main({argv!r})\n"
             "print(code, sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []" and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_commands_help_imports_no_engine(command):
    """`age-explorer COMMAND --help` builds that command's flags (from the method registry, the configs
    and the export options) without torch, diffusers or pandas, so that it prints at once."""
    import subprocess
    import sys

    probe = ("import contextlib, io, sys\n"
             "from age_explorer.core.app.cli.main import main\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "    try:\n"
             f"        main([{command!r}, '--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             "assert 'usage: age-explorer' in out.getvalue()\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'pandas', 'umap') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_bench_methods_on_the_sd14_stand_in_runs_the_closed_form_methods(monkeypatch, capsys):
    """`bench methods --arch sd14` on its stand-in text side (a hash tokenizer, random states): the closed-form
    edits find a prompt's last word through the tokenizer and run (a small UNet of SD-1.4's text width here)."""
    from age_explorer.core.app import bench

    monkeypatch.setattr(bench, "SD14_UNET", dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32))
    assert main(["bench", "methods", "--arch", "sd14", "--method", "uce", "--method", "rece", "--method", "mace-cfr",
                 "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["uce", "rece", "mace-cfr"] and not any("refused" in r for r in rows)
    assert all(float(r[2]) >= 0 for r in rows)
