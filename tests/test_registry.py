"""The method registry and the backend registry: what the CLI, the explorer and the manifest read."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from age_explorer.core.backends import backends, get_backend
from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import METHODS, PRESETS, erase, make_config, presets_for
from age_explorer.core.erasure.registry import Method, register_method

DOCS = Path(__file__).resolve().parent.parent / "docs" / "erasure.md"


def test_every_registered_method_has_a_validated_config_and_presets_of_its_own():
    assert set(METHODS) >= {"age", "esd", "uce"}  # the built-ins; plugins may add more
    for name, method in METHODS.items():
        assert method.config.method == name and method.display_name and method.summary
        assert callable(method.load_runner())  # a built-in's runner is named "module:function", imported here
        assert all(method.config.field_help()[f] for f in ("concepts", "seed", "prompt_template"))
        for preset in presets_for(name):
            assert PRESETS[preset][0] == name
            make_config(name, preset, concepts=["red circle"])
    assert presets_for("uce") == ["toy-uce"]


def test_a_method_whose_config_names_another_method_is_refused():
    with pytest.raises(ValueError, match="its config class says 'age'"):
        register_method(Method("other", "Other", METHODS["age"].config, METHODS["age"].runner, "x"))


def test_the_documented_plugin_example_registers_and_runs(tiny_sd_dir, tmp_path):
    """docs/erasure.md's "Adding a method" example, run as written."""
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    code = code.replace("from .", "from age_explorer.core.erasure.")
    try:
        exec(compile(code, "docs/erasure.md", "exec"), {})
        assert "esd-plain" in METHODS
        bundle = load_bundle(str(tiny_sd_dir), device="cpu")
        before = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}
        config = make_config("esd-plain", None, concepts=["a red circle"], iterations=2, ddim_steps=3)
        result = erase(bundle, config, tmp_path / "run")
        assert result.status == "done" and result.manifest.method == "esd-plain"
        assert result.manifest.changed_parameters > 0
        assert all(torch.equal(p, before[n]) for n, p in bundle.unet.named_parameters())  # weights restored
        with pytest.raises(ValueError, match="unknown esd-plain option"):
            make_config("esd-plain", None, concepts=["x"], lam=1.0)
    finally:
        METHODS.pop("esd-plain", None)


def test_the_toy_model_loads_whatever_backend_module_was_imported_first():
    """Stable Diffusion's backend claims any Hub id, "toy" included, so the built-in backends claim in their
    fixed order: a process that imports the SDXL backend (and with it SD's) first still loads the toy world."""
    code = ("import age_explorer.core.backends.stable_diffusion_xl\n"
            "from age_explorer.core.backends import backends\n"
            "from age_explorer.core.bundle import load_bundle\n"
            "print(list(backends()), load_bundle('toy', device='cpu').backend.name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['toy',", "'stable-diffusion',", "'stable-diffusion-xl']", "toy"]


def test_backends_say_what_each_model_family_offers(toy_bundle, tiny_sd_dir):
    assert set(backends()) == {"toy", "stable-diffusion", "stable-diffusion-xl"}
    sd = load_bundle(str(tiny_sd_dir), device="cpu")
    assert toy_bundle.backend.has_evaluator and not sd.backend.has_evaluator
    assert toy_bundle.backend.neighbours("red circle") >= {"red square", "blue circle", "red", "circle"}
    assert sd.backend.neighbours("a red circle") is None
    assert toy_bundle.backend.concept_set().concepts == toy_bundle.backend.world.names
    assert sd.backend.concept_set() is None and sd.vocabulary() is None
    assert get_backend("toy").default_presets == {"age": "toy", "esd": "toy-esd", "uce": "toy-uce"}
    with pytest.raises(ValueError, match="unknown model backend 'sdxl'"):
        get_backend("sdxl")
