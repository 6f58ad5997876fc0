import pytest
import torch

from age_explorer.core.bundle import load_bundle
from age_explorer.core.device import resolve_device, resolve_dtype
from age_explorer.core.sampling import generate, parse_seeds


@pytest.mark.parametrize("text, seeds", [("0-3", [0, 1, 2, 3]), ("1,4,9", [1, 4, 9]), ("7", [7]),
                                         ("0-1,5", [0, 1, 5]), (" 2 - 3 ", [2, 3])])
def test_seed_parsing(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [("5-1", "end \\(1\\) is below the start \\(5\\)"),
                                           ("abc", "bad seeds"), ("", "bad seeds"), ("1-", "bad seeds"),
                                           ("0-1000000000", "ask for 1000000001 images; at most 1000"),
                                           ("0-100000", "ask for 100001 images"),
                                           ("0-600,1000-1500", "ask for 1102 images"),
                                           (str(2**64), "seed 18446744073709551616 is out of range"),
                                           ("0-" + str(2**64), "out of range"),
                                           ("9" * 10000, "bad seeds '9999999999"),
                                           ([2**64], "out of range"), ([-1], "out of range")])
def test_bad_seeds_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_seeds(text)
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)


@pytest.mark.parametrize("text, limit", [("0-1000000000", 1000), ("0-4294967295", 16), ("0-30000000,5", 8)])
def test_huge_seed_ranges_are_refused_at_once_without_memory(text, limit):
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"at most {limit} at a time"):
        parse_seeds(text, limit=limit)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # generous: counting through a billion seeds takes tens of seconds; a loaded machine must not fail a refusal
    assert seconds < 2.0 and peak < 100_000


def test_seed_limit_allows_exactly_the_limit():
    assert parse_seeds("0-15", limit=16) == list(range(16))
    assert parse_seeds(str(2**32 - 1)) == [2**32 - 1]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(str(tmp_path / "nowhere"), device="cpu")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="is not a model"):
        load_bundle(str(tmp_path), device="cpu")


def test_empty_model_name():
    with pytest.raises(ValueError, match="model is empty"):
        load_bundle("  ", device="cpu")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_a_clear_error(toy_bundle, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(toy_bundle, [prompt], [0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_not_a_silent_fallback():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_dtype_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


def test_run_of_an_earlier_toy_model_is_refused(toy_bundle, tmp_path):
    import json

    from age_explorer.core.erasure import erase, make_config

    run = erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), tmp_path / "run")
    manifest_path = run.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["base_revision"] == toy_bundle.revision
    manifest["base_revision"] = "toy-000000000000"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="only apply to the model they were trained from"):
        load_bundle(str(run.run_dir), device="cpu")


@pytest.mark.parametrize("method, options, message", [
    ("age", {"iterations": 10**12}, "iterations must be a whole number from 1 to 100,000"),
    ("esd", {"iterations": 0}, "iterations must be a whole number from 1"),
    ("esd", {"negative_guidance": float("nan")}, "negative_guidance \\(eta\\) must be a finite number"),
    ("esd", {"negative_guidance": 1e308}, "from 0 to 100"),
    ("age", {"start_guidance": float("inf")}, "start_guidance must be a finite number"),
    ("esd", {"ddim_steps": 0}, "ddim_steps must be a whole number from 1 to 1,000"),
    ("esd", {"lr": 0.0}, "lr must be a positive finite number"),
    ("esd", {"target": "x" * 10_000}, "target 'xxxxxxxx"),
    ("uce", {"target": "y" * 10_000}, "too long: at most 500 characters"),
    ("age", {"concepts": ["z" * 10_000]}, "concept 'zzzz"),
])
def test_config_bounds_are_one_short_line(method, options, message):
    from age_explorer.core.erasure import make_config

    options = {"concepts": ["red circle"], **options}
    with pytest.raises(ValueError, match=message) as caught:
        make_config(method, None, **options)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
    ({"steps": 10**6}, "steps must be"),
    ({"guidance_scale": float("nan")}, "guidance must be a finite number"),
    ({"guidance_scale": 1e308}, "guidance must be a finite number from 0 to 100"),
    ({"eta": -1.0}, "eta must be"),
])
def test_sampling_bounds(toy_bundle, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(toy_bundle, ["a red circle"], [0], **kwargs)


@pytest.mark.parametrize("method, target", [("esd", "zebra 🦓"), ("uce", "a zebra")])
def test_toy_targets_are_checked_like_concepts(toy_bundle, tmp_path, method, target):
    from age_explorer.core.erasure import erase, make_config

    config = make_config(method, None, concepts=["red circle"], target=target, iterations=1) if method == "esd" \
        else make_config(method, None, concepts=["red circle"], target=target)
    with pytest.raises(ValueError, match="target 'a? ?zebra.*does not know \\(zebra\\)"):
        erase(toy_bundle, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_long_prompt_warns_briefly(toy_bundle):
    from age_explorer.core.bundle import LongPromptWarning

    with pytest.warns(LongPromptWarning, match="has 10003 tokens; the model reads only the first 10") as caught:
        toy_bundle.encode("a " + "red " * 10_000)
    assert all(len(str(w.message)) < 400 for w in caught)


def test_a_garbage_model_index_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text("garbage")
    with pytest.raises(RuntimeError, match="model_index.json' is not a valid JSON file"):
        load_bundle(str(tmp_path), device="cpu")


@pytest.mark.parametrize("argv, message", [
    (["erase", "--concept", "red circle", "--iterations", "abc"], "argument --iterations: invalid int value: 'abc'"),
    (["generate", "--seeds"], "argument --seeds: expected one argument"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
])
def test_cli_usage_errors_are_one_line(argv, message, capsys):
    from age_explorer.core.app.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err and "--help" in err


@pytest.mark.parametrize("flags, message", [(["--steps", "0"], "steps must be a whole number"),
                                            (["--guidance", "nan"], "guidance must be a finite number"),
                                            (["--guidance", "1e308"], "guidance must be a finite number")])
def test_cli_generate_refuses_bad_options_before_loading_the_model(flags, message, tmp_path, capsys, monkeypatch):
    from age_explorer.core.app.cli import generate
    from age_explorer.core.app.cli.main import main

    monkeypatch.setattr(generate, "load_model", lambda args: pytest.fail("the model loaded before the options were checked"))
    code = main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_truncated_unet_weights_are_one_line_naming_the_file(tiny_sd_dir, tmp_path):
    import shutil

    folder = tmp_path / "truncated"
    shutil.copytree(tiny_sd_dir, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    from age_explorer.core.bundle import ModelUnavailableError

    with pytest.raises(ModelUnavailableError) as caught:
        load_bundle(str(folder), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message and "unet/diffusion_pytorch_model.safetensors" in message


@pytest.mark.parametrize("damage", ["under a file", "garbage job store"])
def test_the_app_launcher_refuses_a_bad_data_folder_in_one_line(damage, tmp_path, capsys):
    from age_explorer.explorer.launch import main

    if damage == "under a file":
        (tmp_path / "a-file").write_text("not a folder")
        data = tmp_path / "a-file" / "data"
    else:
        data = tmp_path / "data"
        data.mkdir()
        (data / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SystemExit) as stop:
        main(["--data-dir", str(data), "--port", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_ctrl_c_during_erase_is_one_line_and_resume_gives_the_uninterrupted_delta(tmp_path):
    """A Ctrl-C stops the run after its step with a checkpoint, says in one line how to continue and exits
    130; --resume then ends with the same delta as a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def erase(out, *extra):
        return [sys.executable, "-m", "age_explorer.core.app.cli", "erase", "--concepts", "red circle", "--method",
                "esd", "--preset", "toy-esd", "--iterations", "40", "--checkpoint-every", "10", "--threads", "1",
                "--out", str(out), *extra]

    run = tmp_path / "run"
    # the uninterrupted run on the other core, meanwhile
    reference_err = tmp_path / "reference.err"
    with open(reference_err, "w") as err_file:  # a file, not a pipe: the progress bar would fill a pipe
        reference = subprocess.Popen(erase(tmp_path / "reference"), env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    cli = subprocess.Popen(erase(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "history.jsonl").exists() or len((run / "history.jsonl").read_text().splitlines()) < 4:
        assert time.time() < deadline and cli.poll() is None
        time.sleep(0.2)
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "--resume" in last and "Traceback" not in err
    assert not (run / "delta.safetensors").exists()

    resumed = subprocess.run(erase(run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference_err.read_text()[-2000:]
    assert (run / "delta.safetensors").read_bytes() == (tmp_path / "reference" / "delta.safetensors").read_bytes()


def test_a_delta_of_nan_with_a_matching_checksum_is_refused(toy_bundle, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from age_explorer.core.erasure import erase, make_config
    from age_explorer.core.files import file_sha256
    from age_explorer.core.runs import CorruptRunError, run_weights

    run = tmp_path / "run"
    erase(toy_bundle, make_config("uce", "toy-uce", concepts=["red circle"]), run)
    delta = load_file(str(run / "delta.safetensors"))
    save_file({name: torch.full_like(t, float("nan")) for name, t in delta.items()}, str(run / "delta.safetensors"))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "delta_sha256": file_sha256(run / "delta.safetensors")}))
    before = {n: p.clone() for n, p in toy_bundle.unet.named_parameters() if n in delta}
    with pytest.raises(CorruptRunError, match="holds values that are not finite numbers") as caught:
        with run_weights(toy_bundle, run):
            pass
    assert "\n" not in str(caught.value)
    assert all(torch.equal(p, before[n]) for n, p in toy_bundle.unet.named_parameters() if n in before)
