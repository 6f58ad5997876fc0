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
    assert seconds < 0.1 and peak < 100_000


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
