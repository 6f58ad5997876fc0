import os

import pytest
import torch

from age_explorer.core.cpu_threads import default_threads, usable_cores

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CI_CORES = 2
# The project's rule (core.cpu_threads): the free cores at start, so a busy CI runner gets one thread
# instead of a team that waits for its displaced member; at most the CI machine's count, shared among
# the suite's worker processes (pytest-xdist) so that they do not oversubscribe the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(CI_CORES, default_threads()[0]) // _workers))


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): a worker per usable core, at most two. Many tests wait on a server,
    a browser or a subprocess, so a second worker fills the idle core; more would only share them."""
    return min(CI_CORES, usable_cores())


@pytest.fixture(scope="session", autouse=True)
def empty_torch_home(tmp_path_factory):
    # LPIPS and FID read their weights from torch.hub's cache (TORCH_HOME): every test starts with an
    # empty one, whatever the machine has cached; a test that needs weights puts them in its own
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        yield


@pytest.fixture
def one_thread():
    # Bit-identical results across processes need the same float reduction order: one thread everywhere.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_bundle():
    from age_explorer.core.bundle import load_bundle

    return load_bundle("toy", device="cpu")


def _saved_pipeline(tmp_path_factory, build, name: str):
    work = tmp_path_factory.mktemp(name)
    build(work).save_pretrained(work / "pipeline")
    return work / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_pipeline

    return _saved_pipeline(tmp_path_factory, build_tiny_pipeline, "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sdxl_pipeline

    return _saved_pipeline(tmp_path_factory, build_tiny_sdxl_pipeline, "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP folder: the ``clip:FOLDER`` evaluator of tests on SD models (their default,
    a Hub ResNet-50, has no weights here)."""
    from tests.tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")
