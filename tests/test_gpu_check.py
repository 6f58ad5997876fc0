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


def test_parts_that_no_longer_fit_the_budget_are_recorded_as_skipped(tmp_path):
    """A budget too small for any part: nothing is started, each part says why in the JSON, and the run ends
    normally; a budget of 0 is refused in one line."""
    out = tmp_path / "g.json"
    done = _run("--tiny", "--device", "cpu", "--parts", "graph_row,evaluate", "--budget-min", "0.001",
                "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["budget_min"] == 0.001 and list(figures["parts"]) == ["graph_row", "evaluate"]
    for name, estimate in (("graph_row", "2.7"), ("evaluate", "0.5")):
        assert set(figures["parts"][name]) == {"skipped"}  # not started: no figures, no wall time
        assert figures["parts"][name]["skipped"].startswith(f"skipped: its estimate, {estimate} min, does not fit")
    refused = _run("--tiny", "--device", "cpu", "--budget-min", "0", "--out", str(tmp_path / "h.json"), timeout=300)
    assert refused.returncode == 2 and "--budget-min must be positive" in refused.stderr
    assert not (tmp_path / "h.json").exists()


def test_the_default_budget_plans_the_first_three_parts_of_a_gpu_run(gpu_check):
    """By the estimates, 8 minutes hold the first three parts (the engine against the reference, the compiled
    chain, the graph row) and then only evaluate; a part is started only while its estimate fits."""
    assert tuple(gpu_check.PART_MINUTES) == gpu_check.PARTS
    assert gpu_check.PARTS[:5] == ("bench", "compiled_chain", "graph_row", "shortcuts", "sdxl_esd")
    assert sum(gpu_check.PART_MINUTES[p] for p in gpu_check.PARTS[:3]) == pytest.approx(6.9)
    assert "does not fit in the 1.1 min left of the 8 min budget" in gpu_check.over_budget("shortcuts", 6.9 * 60, 8.0)
    assert all(gpu_check.over_budget(p, 6.9 * 60, 8.0) for p in ("sdxl_esd", "imagenette"))
    assert gpu_check.over_budget("evaluate", 6.9 * 60, 8.0) is None
    assert gpu_check.over_budget("sdxl_esd", 0.0, None) is None


@pytest.mark.slow
def test_the_graph_row_part_on_cpu(gpu_check, monkeypatch, tmp_path, one_thread):
    """The graph row part end to end on a small UNet, its second erasure row on a channels-last UNet instead
    of the compiled chain (compiling takes minutes on a CPU; tests/test_compiled_chain.py checks it)."""
    monkeypatch.setattr(gpu_check, "ESD_ROWS", [("eager", {}), ("channels_last", {"channels_last": True})])
    row = gpu_check.part_graph_row(gpu_check.torch.device("cpu"), True, 1, 2, 4, tmp_path)
    assert (row["concepts"], row["images"], row["steps"]) == (25, 25, 50)
    assert row["generate_s"] > 0 and row["classify_s"] > 0 and 0 <= row["mean_G_top1"] <= 1
    assert row["estimate_row_n32_min"] > row["estimate_row_n32_erase_min"] > 0
    assert list(row["erase_rows"]) == ["eager", "channels_last"] and row["esd_iterations"] == 4
    images_min = row["s_per_image"] * 32 * 25 / 60
    for erase in row["erase_rows"].values():
        assert erase["expected_chain_ddim_steps_per_iter"] == pytest.approx(24.5)
        assert erase["estimate_row_n32_min"] == pytest.approx(erase["s_per_model_step"] * 1000 / 60 + images_min)


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    return gpu_check


def _step(phase, seconds, ddim, builds=0, build_seconds=0.0):
    return {"phase": phase, "seconds": seconds, "chain_batches": [1], "chain_ddim_steps": ddim, "pool_builds": builds,
            "pool_build_seconds": build_seconds}


def test_the_chain_step_cost_is_fitted_within_each_run_and_phase(gpu_check):
    """Two runs whose phases have different fixed costs, every step 0.1 s a chain DDIM step, and a pool
    build (2 s) that is not the chain's: the fit gives 0.1 exactly; with no draw varying, no slope."""
    recipe = [_step("theta", 1.0 + 0.1 * n, n) for n in (3, 40, 17)] + [_step("pi", 0.3 + 0.1 * n, n) for n in (9, 0)]
    other = [_step("theta", 5.0 + 0.1 * n, n) for n in (2, 11)] + [_step("theta", 7.0 + 0.1 * 6, 6, 1, 2.0)]
    assert gpu_check.seconds_per_chain_step([recipe, other]) == pytest.approx(0.1)
    assert gpu_check.seconds_per_chain_step([[_step("theta", 1.0, 4), _step("theta", 1.3, 4)]]) is None


def test_the_chain_step_cost_keeps_noisy_rows_at_a_positive_time(gpu_check):
    """A few noisy steps of a fast model: a falling fit is taken as no cost a DDIM step, and a fit so steep that
    the fixed cost would be negative is clipped to where it is zero, so no row is brought below 0 s."""
    falling = [_step("theta", 1.0, 2), _step("theta", 0.1, 4)]
    assert gpu_check.seconds_per_chain_step([falling]) == 0.0
    steep = [_step("theta", 0.1, 2), _step("theta", 1.0, 4)]  # least squares: 0.45 s a step, -0.8 s fixed
    assert gpu_check.seconds_per_chain_step([steep]) == pytest.approx(0.55 / 3)
    info = {"steps": steep, "ddim_steps": 50, "peak_gib": None, "candidates": 100}
    row = gpu_check.at_expected_draw({"recipe": ({}, info, 1.0)}, baseline="recipe")["recipe"]
    assert row["s_per_model_step"] == pytest.approx(2 * 0.55 / 3 * 24.5)


def test_the_shortcuts_part_times_each_shortcut_beside_the_recipe(gpu_check, toy_bundle, monkeypatch, one_thread):
    """The part's arithmetic on the toy model (the SD UNet is what a GPU run times): each row's draws are
    counted, the π steps of share_draws draw none of their own, the pool's builds are timed apart."""
    monkeypatch.setattr(gpu_check, "bundle_for", lambda device, tiny: toy_bundle)
    monkeypatch.setattr(gpu_check, "SHORTCUTS", [*gpu_check.SHORTCUTS[:4], ("pool", {"xt_source": "pool",
                                                                                      "pool_size": 2})])
    part = gpu_check.part_shortcuts(toy_bundle.device, True, 4)
    rows = part["rows"]
    assert list(rows) == ["recipe", "ddim_steps_25", "share_draws", "batch_pi_chain", "pool"]
    assert part["iterations_timed"] == 4
    # every step of the recipe draws one chain of n ~ U{0..49} DDIM steps; share_draws only its model steps;
    # batch_pi_chain runs each model step's chains and its pi step's in one batch: the longer of two draws
    assert rows["recipe"]["expected_chain_ddim_steps_per_iter"] == pytest.approx(24.5)
    assert rows["ddim_steps_25"]["expected_chain_ddim_steps_per_iter"] == pytest.approx(12.0)
    assert rows["share_draws"]["expected_chain_ddim_steps_per_iter"] == pytest.approx(24.5 / 2)
    assert rows["batch_pi_chain"]["expected_chain_ddim_steps_per_iter"] == pytest.approx((50 - 51 * 101 / 300) / 2)
    assert 0 <= rows["ddim_steps_25"]["chain_ddim_steps_per_iter"] <= 24
    assert rows["pool"]["chain_ddim_steps_per_iter"] == 0 and rows["pool"]["s_per_pool_build"] > 0
    assert rows["pool"]["estimate_1000_model_steps_every_pool_min"] > rows["pool"]["estimate_1000_model_steps_min"]
    assert rows["recipe"]["speedup"] == 1.0
    for row in rows.values():
        assert row["s_per_model_step"] > 0
        assert row["estimate_1000_model_steps_min"] == pytest.approx(row["s_per_model_step"] * 1000 / 60)
        assert row["speedup"] == pytest.approx(rows["recipe"]["s_per_model_step"] / row["s_per_model_step"])


def _measured(options, slope, draws, fixed=1.0, ddim_steps=50):
    """An engine_seconds result whose steps cost ``fixed`` + ``slope`` per chain DDIM step."""
    steps = [_step(phase, fixed + slope * n, n) for phase in ("theta", "pi") for n in draws]
    return options, {"steps": steps, "ddim_steps": ddim_steps, "peak_gib": None, "candidates": 100}, 1.0


def test_rows_that_run_the_chain_alike_share_its_fitted_cost(gpu_check):
    """Eager rows at 0.1 s a chain DDIM step, compiled ones at 0.02: each row is brought to its expected draw
    (24.5 DDIM steps for 50, 12 for 25) with the cost of its own kind of chain, not a pooled one."""
    measured = {"eager": _measured({}, 0.1, (3, 40, 10)),
                "compiled": _measured({"compile_chain": True}, 0.02, (30, 45, 2)),
                "compiled_ddim_steps_25": _measured({"compile_chain": True, "ddim_steps": 25}, 0.02, (0, 7, 20),
                                                    ddim_steps=25)}
    rows = gpu_check.at_expected_draw(measured, baseline="eager")
    assert rows["eager"]["s_per_chain_ddim_step"] == pytest.approx(0.1)
    assert rows["compiled"]["s_per_chain_ddim_step"] == pytest.approx(0.02)
    assert rows["compiled_ddim_steps_25"]["s_per_chain_ddim_step"] == pytest.approx(0.02)
    assert rows["eager"]["s_per_model_step"] == pytest.approx(2 * (1.0 + 0.1 * 24.5))
    assert rows["compiled"]["s_per_model_step"] == pytest.approx(2 * (1.0 + 0.02 * 24.5))
    assert rows["compiled_ddim_steps_25"]["s_per_model_step"] == pytest.approx(2 * (1.0 + 0.02 * 12))
    assert rows["compiled"]["speedup"] == pytest.approx(3.45 / 1.49)
    assert rows["eager"]["speedup"] == 1.0


def test_the_compiled_chain_part_has_its_five_rows_against_the_eager_one(gpu_check, monkeypatch):
    """The part's rows and arithmetic, engine_seconds stubbed (the compiled chain itself is checked against
    the eager one in tests/test_compiled_chain.py; compiling the tiny UNet takes minutes on a CPU)."""
    cost = {(False, False, False): 0.1, (False, True, False): 0.12, (True, False, False): 0.02,
            (True, False, True): 0.03}

    def fake_engine_seconds(bundle, iterations, precision, **options):
        slope, ddim_steps = cost[gpu_check.chain_kind(options)], options.get("ddim_steps", 50)
        _, info, _ = _measured(options, slope, (5, 30, 12), ddim_steps=ddim_steps)
        if options.get("batch_pi_chain"):  # a model step runs its chains and its pi step's; the pi step none
            info["steps"] = [{**_step("theta", 1.0 + slope * n, n), "chain_batches": [2]} for n in (5, 20, 12)] + [
                {**_step("pi", 1.0, 0), "chain_batches": []} for _ in range(3)]
        return None, info

    monkeypatch.setattr(gpu_check, "bundle_for", lambda device, tiny: None)
    monkeypatch.setattr(gpu_check, "engine_seconds", fake_engine_seconds)
    part = gpu_check.part_compiled_chain(gpu_check.torch.device("cpu"), True, 6)
    rows = part["rows"]
    assert list(rows) == ["eager", "eager_channels_last", "compiled", "compiled_ddim_steps_25",
                          "compiled_ddim_steps_25_batch_pi_chain"]
    assert part["precision"] == "fp32" and part["iterations_timed"] == 6
    assert rows["compiled_ddim_steps_25"]["options"] == {"compile_chain": True, "ddim_steps": 25}
    assert rows["compiled_ddim_steps_25"]["speedup"] == pytest.approx(6.9 / (2 * (1.0 + 0.02 * 12)))
    assert rows["eager_channels_last"]["speedup"] == pytest.approx(6.9 / (2 * (1.0 + 0.12 * 24.5)))
    # the longer of two draws on 25 steps, once per model/pi pair: 25 - 26 x 51 / 150 DDIM steps
    batched = rows["compiled_ddim_steps_25_batch_pi_chain"]
    assert batched["s_per_chain_ddim_step"] == pytest.approx(0.03)
    assert batched["expected_chain_ddim_steps_per_iter"] == pytest.approx((25 - 26 * 51 / 150) / 2)
    assert batched["s_per_model_step"] == pytest.approx(2 * (1.0 + 0.03 * (25 - 26 * 51 / 150) / 2))


def test_the_sdxl_esd_part_times_the_eager_and_the_compiled_chain_at_the_expected_draw(gpu_check, monkeypatch,
                                                                                       tmp_path):
    """The part's rows and arithmetic with esd_seconds stubbed: an ESD iteration is one model step, so a row
    is its steady seconds brought to 24.5 DDIM steps, not twice that (an AGE iteration's model and pi steps)."""
    cost = {False: 0.2, True: 0.05}

    def fake_esd_seconds(bundle, iterations, preset, concept, work_dir=None, **options):
        assert preset == "sdxl-esd-x" and options["precision"] == "fp32" and not options["requires_gpu"]
        slope = cost[bool(options.get("compile_chain"))]
        steps = [_step("theta", 2.0 + slope * n, n) for n in (3, 40, 17, 9)]
        return None, {"steps": steps, "ddim_steps": 50, "peak_gib": None}

    monkeypatch.setattr(gpu_check, "esd_seconds", fake_esd_seconds)
    monkeypatch.setattr(gpu_check, "random_sdxl_pipeline",
                        lambda *a, **k: type("Pipe", (), {"unet": gpu_check.torch.nn.Linear(2, 2)})())
    monkeypatch.setattr("age_explorer.core.backends.stable_diffusion_xl.StableDiffusionXLBackend.bundle_from_pipeline",
                        lambda *a, **k: None)
    part = gpu_check.part_sdxl_esd(gpu_check.torch.device("cpu"), True, 6, tmp_path)
    rows = part["rows"]
    assert list(rows) == ["eager", "compiled"] and part["iterations_timed"] == 4
    assert rows["eager"]["s_per_model_step"] == pytest.approx(2.0 + 0.2 * 24.5)
    assert rows["compiled"]["s_per_model_step"] == pytest.approx(2.0 + 0.05 * 24.5)
    assert rows["compiled"]["speedup"] == pytest.approx((2.0 + 0.2 * 24.5) / (2.0 + 0.05 * 24.5))
    assert rows["compiled"]["options"] == {"compile_chain": True}


@pytest.mark.slow
def test_the_sdxl_esd_part_on_a_small_sdxl_unet(gpu_check, monkeypatch, tmp_path, one_thread):
    """The part end to end on a small SDXL UNet, its second row on a channels-last UNet instead of the
    compiled chain (compiling takes minutes on a CPU; tests/test_compiled_chain.py checks it on SDXL)."""
    monkeypatch.setattr(gpu_check, "ESD_ROWS", [("eager", {}), ("channels_last", {"channels_last": True})])
    part = gpu_check.part_sdxl_esd(gpu_check.torch.device("cpu"), True, 5, tmp_path)
    assert part["preset"] == "sdxl-esd-x" and part["iterations_timed"] == 3
    for row in part["rows"].values():
        assert row["expected_chain_ddim_steps_per_iter"] == pytest.approx(24.5) and row["s_per_model_step"] > 0
        assert 0 <= row["chain_ddim_steps_per_iter"] <= 49


def test_esd_seconds_times_each_step_after_the_warm_up(toy_bundle, one_thread):
    """An ESD iteration is one step of one phase: the first two steps (at this seed the first holds the first
    chain) are warm-up, every later step is timed with the DDIM steps of its one chain."""
    from age_explorer.core.app.bench import esd_seconds

    _, info = esd_seconds(toy_bundle, 6, "toy-esd", concept="red circle")
    assert [s["step"] for s in info["steps"]] == [3, 4, 5, 6]
    assert all(s["phase"] == "theta" and s["chain_batches"] == [1] and 0 <= s["chain_ddim_steps"] < 10
               for s in info["steps"]) and info["ddim_steps"] == 10


def test_each_phases_first_chain_is_warm_up(toy_bundle, monkeypatch, one_thread):
    """A compiled chain compiles on its first call, so engine_seconds does not time the step of each phase's
    first chain, even after the first two steps: here the first three draws are 0 DDIM steps (no chain)."""
    from age_explorer.core.app.bench import engine_seconds
    from age_explorer.core.erasure.loop import FineTuneRun

    draws = iter([0, 0, 0, 3, 2, 1, 4, 2])
    real_randint = FineTuneRun.randint
    monkeypatch.setattr(FineTuneRun, "randint",
                        lambda self, high: next(draws) if high == self.cfg.ddim_steps else real_randint(self, high))
    _, info = engine_seconds(toy_bundle, 6, "fp32", ddim_steps=5, loss_space="eps")
    # steps 1-2 warm-up; step 3 (theta) draws no chain; step 4 is pi's first chain, step 5 theta's
    assert [(s["step"], s["phase"], s["chain_ddim_steps"]) for s in info["steps"]] == [
        (3, "theta", 0), (6, "pi", 1), (7, "theta", 4), (8, "pi", 2)]
