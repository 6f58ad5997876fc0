"""The built wheel, not the source tree: its files alone generate from the CLI and build the explorer,
run from another folder, with the dependencies of this environment and without its editable install."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USE_THE_WHEEL = """
import sys
from pathlib import Path
# an editable install of the project answers for modules the wheel lacks: take its finder away
editable = lambda f: "__editable__" in (getattr(f, "__module__", None) or "")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
import age_explorer
assert Path(age_explorer.__path__[0]).parent == Path(sys.argv[1]), age_explorer.__path__
from age_explorer.core.app.cli.main import main
assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--seeds", "0-1", "--steps", "2",
             "--out", "samples", "--threads", "1"]) == 0
from age_explorer.explorer.app import Settings, build_app
demo = build_app(Settings(data_dir="data", device="cpu", start_worker=False))
tabs = [b.label for b in demo.blocks.values() if type(b).__name__ == "Tab"]
print("tabs:", tabs)
"""


@pytest.mark.slow
def test_the_wheel_alone_generates_and_builds_the_explorer_from_another_folder(tmp_path):
    # built from a copy of the files git knows: a build/ folder left in the tree would add stale modules
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # without isolation when setuptools is here: no package index needed
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("age_explorer-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert not [n for n in names if n.split("/")[0] in ("core", "explorer", "assets", "tests")]  # no generic names
    assert any(n.startswith("age_explorer/assets/graphs/toy-esd/") for n in names)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the unpacked wheel on the path; the dependencies from this environment
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", USE_THE_WHEEL, str(site)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((work / "samples").glob("*.png"))) == 2
    assert "Concept graph" in done.stdout and "Methods" in done.stdout
