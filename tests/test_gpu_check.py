"""benchmarks/gpu_check.py on CPU with a small UNet (``--tiny --device cpu``): the parts run and each is
written to the JSON as it ends (the GPU figures themselves come from a CUDA machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_an_unknown_part_is_refused(tmp_path):
    done = _run("--tiny", "--device", "cpu", "--parts", "bench,warp_drive", "--out", str(tmp_path / "g.json"),
                timeout=300)
    assert done.returncode == 2 and "unknown part(s) warp_drive" in done.stderr
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_the_graph_row_part_on_cpu(tmp_path):
    """The graph row part end to end. The compiled_chain part is left out here: on a cold compiler cache
    it compiles a UNet for minutes on a CPU, and what it times (``compile_chain``) is checked against the
    eager chain in tests/test_compiled_chain.py."""
    out = tmp_path / "g.json"
    done = _run("--tiny", "--device", "cpu", "--parts", "graph_row", "--row-images", "1",
                "--row-erase-iterations", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["graph_row"] and "error" not in parts["graph_row"], parts
    row = parts["graph_row"]
    assert (row["concepts"], row["images"], row["steps"]) == (25, 25, 50)
    assert row["generate_s"] > 0 and row["classify_s"] > 0 and 0 <= row["mean_G_top1"] <= 1
    assert row["estimate_row_n32_min"] > row["estimate_row_n32_erase_min"] > 0
