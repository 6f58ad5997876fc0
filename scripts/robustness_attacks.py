"""The docs/robustness.md measurement: every attack on the erased runs of a folder, concept-major, 1 thread.

    python scripts/robustness_attacks.py runs/robustness   # run folders named esd-/age-/age-damage-/uce-<concept>
"""

import sys
import time
from pathlib import Path

import torch

from age_explorer.core.attacks import compare_runs

torch.set_num_threads(1)
folder = Path(sys.argv[1])
runs = [folder / f"{m}-{c}" for c in ("red_circle", "blue_square", "yellow_triangle", "green_cross", "purple_ring")
        for m in ("esd", "age", "age-damage", "uce") if (folder / f"{m}-{c}" / "manifest.json").is_file()]
start = time.time()
table = compare_runs(runs, ["prompts", "embedding", "perturb"], {"seeds": "1000-1007"}, device="cpu",
                     log=lambda line: print(line, flush=True))
table.to_csv(folder / "asr.csv", index=False)
print(f"elapsed {time.time() - start:.0f} s")
