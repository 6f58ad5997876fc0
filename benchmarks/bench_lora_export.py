"""Time and peak memory of factoring a delta into a LoRA (``core/export_lora.lowrank_delta``) on an
SD-1.4-sized UNet built from its config with random weights (no download).

Two deltas: ``xattn`` (every cross-attention weight, as ESD-x and AGE for objects change) and
``full`` (every UNet parameter). Each row runs in a fresh process, so its peak resident memory
(``ru_maxrss``) is its own; that peak includes the float32 base UNet (3.4 GB) the export holds.

- ``new``: the export's code: the erased tensors read one at a time from the delta file, factored layer
  by layer against the base UNet, a randomized truncated SVD for low ranks.
- ``old``: the code before that (this repository's ``core/export_lora.py`` at the commit named by
  ``--old-commit``, read with ``git show``): every changed tensor's base and erased values in memory,
  all float64 differences at once, an exact SVD of every layer whatever the rank.

    OMP_NUM_THREADS=2 python benchmarks/bench_lora_export.py --work /tmp/lora-bench
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_export.py --cases xattn:8:old full:8:new

Prints a markdown table (delta, rank, code, layers, wall seconds, CPU seconds of the process, peak RSS
GB, relative Frobenius error); the load average before the first row says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from age_explorer.core.app.bench import SD14_UNET

# the old code on the full-UNet delta holds about 17 GB; ask for it by name (full:8:old) on a machine that has it
DEFAULT_CASES = [f"{delta}:{rank}:new" for delta in ("full", "xattn") for rank in ("8", "64", "full")] + [
    f"xattn:{rank}:old" for rank in ("8", "64", "full")]


def build_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD14_UNET).eval()


def delta_file(work: Path, which: str) -> Path:
    """The erased values of the ``which`` parameters (base + 1e-3 noise), written once and reused."""
    import torch
    from safetensors.torch import save_file

    path = work / f"delta-{which}.safetensors"
    if path.is_file():
        return path
    from age_explorer.core.erasure.params import select_parameters

    unet = build_unet()
    chosen = select_parameters(unet, "xattn") if which == "xattn" else dict(unet.named_parameters())
    generator = torch.Generator().manual_seed(1)
    erased = {n: (p.detach() + 1e-3 * torch.randn(p.shape, generator=generator)).contiguous() for n, p in chosen.items()}
    tmp = path.with_suffix(".part")
    save_file(erased, str(tmp))
    os.replace(tmp, path)
    return path


def old_module(commit: str):
    """The pre-streaming ``core/export_lora.py`` from git, importable beside the current package."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{commit}:core/export_lora.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    # its own names from export_options: the ones it used still exist except the old kohya file name
    source = source.replace("KOHYA_FILE, ", "")
    folder = Path(tempfile.mkdtemp(prefix="old-export-lora-"))
    (folder / "old_export_lora.py").write_text(source.replace("from .export_options", "from age_explorer.core.export.options"))
    spec = importlib.util.spec_from_file_location("old_export_lora", folder / "old_export_lora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def one_case(work: Path, case: str, commit: str) -> dict:
    """Run in a child process: factor one delta at one rank with one code; its own time and peak memory."""
    import torch

    from age_explorer.core.export.lora import SafetensorsValues, lowrank_delta, parse_rank

    which, rank_text, code = case.split(":")
    rank = parse_rank(rank_text)
    path = delta_file(work, which)
    old = old_module(commit) if code == "old" else None
    unet = build_unet()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with torch.no_grad():
        if code == "new":
            factors = lowrank_delta(unet, SafetensorsValues(path), rank)
        else:  # what the old export held: the changed tensors' base and erased values, all in memory
            from safetensors.torch import load_file

            erased = {n: t.float() for n, t in load_file(str(path)).items()}
            params = dict(unet.named_parameters())
            base = {n: params[n].detach().float().clone() for n in erased}
            factors = old.lowrank_delta(unet, base, erased, rank)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux
    return {"delta": which, "rank": rank_text, "code": code, "layers": len(factors.down), "file_rank": factors.rank,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gb": peak_gb, "error": factors.relative_error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the delta files (default: a temp folder)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="DELTA:RANK:CODE, e.g. full:8:new")
    parser.add_argument("--old-commit", default="63731cc", help="the commit whose core/export_lora.py is 'old' (the last before streaming)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's case
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(one_case(work, args.one, args.old_commit)))
        return 0
    for which in sorted({c.split(":")[0] for c in args.cases}):
        delta_file(work, which)  # written before any timing, in this process
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus: {os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    print("| delta | rank | code | layers | file rank | seconds | CPU seconds | peak RSS (GB) | relative Frobenius error |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for case in args.cases:
        done = subprocess.run([sys.executable, __file__, "--work", str(work), "--old-commit", args.old_commit,
                               "--one", case], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {case} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]} |", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {row['delta']} | {row['rank']} | {row['code']} | {row['layers']} | {row['file_rank']} | "
              f"{row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['peak_gb']:.2f} | {row['error']:.4g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
