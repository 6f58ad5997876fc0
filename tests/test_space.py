"""The Hugging Face Space: the folder the builder writes, its upload, and the spaces.GPU wrapper."""

import os
import subprocess
import sys
import types

import gradio
import pytest
from huggingface_hub import SpaceCard

from age_explorer.explorer.space import build_space, gpu, main
from tests.hub_standin import HubStandIn


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return build_space(tmp_path_factory.mktemp("built") / "space", hardware="t4-small")


def test_space_folder_has_front_matter_requirements_and_the_code(space):
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and card.data.suggested_hardware == "t4-small"
    assert "AGE_EXPLORER_MODEL" in card.text
    requirements = (space / "requirements.txt").read_text().split()
    names = {r.split(">")[0].split("<")[0].split("=")[0] for r in requirements}
    assert {"torch", "diffusers", "transformers", "plotly", "umap-learn"} <= names
    assert "gradio" not in names and "pytest" not in names and "ray" not in names
    for path in ("app.py", "age_explorer/core/bundle.py", "age_explorer/explorer/app.py",
                 "age_explorer/assets/toyworld/manifest.json"):
        assert (space / path).is_file(), path
    assert not list(space.rglob("__pycache__"))


@pytest.mark.slow
def test_space_app_builds_from_its_own_copy(space, tmp_path):
    """The Space runs `app.py` from its folder: it must import its own code and find its assets."""
    code = ("import age_explorer.explorer.app as a, age_explorer.core.paths as p; "
            "d = a.build_app(a.Settings(start_worker=False)); "
            "print(a.__file__); print(p.assets_dir()); print(len(d.explorer.graph_dirs()))")
    env = {k: v for k, v in os.environ.items() if k not in ("AGE_EXPLORER_ASSETS", "PYTHONPATH")}
    env["AGE_EXPLORER_DATA_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module, assets, graphs = out.stdout.split("\n")[-4:-1]
    assert module.startswith(str(space)) and assets == str(space / "age_explorer" / "assets")
    assert int(graphs) == len(list((space / "age_explorer" / "assets" / "graphs").glob("*/graph.json")))


def test_build_refuses_a_non_empty_folder_and_says_why(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["build", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "mine"


def test_push_uploads_the_space(space, monkeypatch):
    import huggingface_hub.constants

    from age_explorer.core.export.writers import push_to_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        push_to_hub(space, "someone/age-explorer", token="hf_x", repo_type="space")
    created = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert b'"type": "space"' in created[0]["body"] or b'"type":"space"' in created[0]["body"]
    assert b"gradio" in created[0]["body"]
    assert hub.files["README.md"] == (space / "README.md").read_bytes()
    assert hub.files["age_explorer/assets/toyworld/manifest.json"] == (space / "age_explorer/assets/toyworld/manifest.json").read_bytes()


@pytest.mark.parametrize("has_spaces", [False, True])
def test_gpu_wrapper_uses_spaces_only_when_present(monkeypatch, has_spaces):
    calls = []
    if has_spaces:
        fake = types.ModuleType("spaces")

        def GPU(duration):
            def decorate(fn):
                def wrapped(*a, **k):
                    calls.append(duration)
                    return fn(*a, **k)
                return wrapped
            return decorate

        fake.GPU = GPU
        monkeypatch.setitem(sys.modules, "spaces", fake)
    else:
        monkeypatch.setitem(sys.modules, "spaces", None)  # import fails

    def double(x):
        return 2 * x

    assert gpu(double)(3) == 6 and gpu(duration=120)(double)(4) == 8
    assert calls == ([60, 120] if has_spaces else [])
