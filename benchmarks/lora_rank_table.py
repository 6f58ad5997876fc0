"""How much of an erasure a LoRA of each rank keeps, on the toy world.

For one toy run (by default AGE, preset toy-fast, of "red circle", made here when --run is not given)
and each rank: export the LoRA, apply its diffusers/PEFT file to the toy model's UNet (a diffusers
UNet2DConditionModel) with diffusers' own ``load_lora_adapter``, and measure, with the same prompts
and seeds as the graph's G (``CapabilitySpec``, the toy classifier):
- the relative Frobenius error of the approximation,
- the max pixel difference (0-255) against the full delta's images, over every concept's images,
- G after of the erased concept and the mean same-shape / same-colour / unrelated spillover
  Delta = G_0 - G_after, beside the full delta's.

    OMP_NUM_THREADS=1 python benchmarks/lora_rank_table.py --out lora-ranks/

Writes OUT/rank_table.csv and OUT/manifest.json (config, seeds, versions, base model); needs peft.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.core.export.writers import export_run
from age_explorer.core.export.lora import PEFT_FILE, PEFT_FOLDER, parse_rank
from age_explorer.core.graph.capability import CapabilitySpec, load_evaluator
from age_explorer.core.graph.concept_sets import load_concept_set
from age_explorer.core.files import environment_versions, write_json_atomic
from age_explorer.core.runs import RunManifest, is_run_dir
from age_explorer.core.sampling import generate


def images_and_g(bundle, concept_set, evaluator, spec: CapabilitySpec) -> tuple[torch.Tensor, dict[str, float]]:
    """Every concept's images (the graph's prompts and seeds) and its G top-1, as ``capability`` counts it."""
    prompts = [(spec.template or concept_set.template).format(concept=c) for c in concept_set.concepts]
    images = generate(bundle, prompts, spec.seeds(), steps=spec.steps, guidance_scale=spec.guidance_scale, eta=spec.eta)
    top1 = evaluator.topk(images, 1).view(len(prompts), spec.images_per_concept)
    return images, {c: (top1[i] == i).float().mean().item() for i, c in enumerate(concept_set.concepts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the run, the exports and the table")
    parser.add_argument("--run", default=None, help="an existing toy run folder (default: make AGE toy-fast of --concept)")
    parser.add_argument("--concept", default="red circle")
    parser.add_argument("--ranks", default="1,4,16,64,full")
    parser.add_argument("--images-per-concept", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = [parse_rank(r) for r in args.ranks.split(",")]
    base = load_bundle("toy", device="cpu")
    run_dir = Path(args.run) if args.run else out / "run"
    started = time.time()
    if not is_run_dir(run_dir):
        erase(base, make_config("age", "toy-fast", concepts=[args.concept]), run_dir)
    manifest = RunManifest.read(run_dir)
    concept = manifest.concepts[0]
    world = base.backend.world
    concept_set = load_concept_set("toy", base)
    evaluator = load_evaluator("toy", base, concept_set)
    spec = CapabilitySpec(images_per_concept=args.images_per_concept).resolved(base)

    models = [("full delta", None)] + [(f"LoRA rank {r or 'full'}", r) for r in ranks]
    bar = tqdm(total=len(models) + 1, desc="models")
    _, g0 = images_and_g(base, concept_set, evaluator, spec)
    bar.update()
    reference = None
    rows = []
    for label, rank in models:
        if label == "full delta":
            bundle, error, file_rank = load_bundle(str(run_dir), device="cpu"), 0.0, None
        else:
            folder = export_run(run_dir, out / "exports", fmt="lora", rank=rank, name=f"rank-{rank or 'full'}", force=True)
            lora = read_lora_summary(folder)
            error, file_rank = lora["relative_frobenius_error"], lora["rank"]
            bundle = load_bundle("toy", device="cpu")
            bundle.unet.load_lora_adapter(str(folder / PEFT_FOLDER / PEFT_FILE), prefix="unet")
        images, g = images_and_g(bundle, concept_set, evaluator, spec)
        reference = images if reference is None else reference
        delta = {c: g0[c] - g[c] for c in world.names}
        mean = lambda names: sum(delta[n] for n in names) / len(names)  # noqa: E731
        rows.append({"model": label, "file_rank": file_rank, "relative_frobenius_error": error,
                     "max_pixel_diff_vs_full_delta": float(((images * 255).round() - (reference * 255).round()).abs().max()),
                     "G_before": g0[concept], "G_after": g[concept],
                     "delta_same_shape": mean(world.same_shape(concept)),
                     "delta_same_colour": mean(world.same_colour(concept)),
                     "delta_unrelated": mean(world.unrelated(concept))})
        bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    table.to_csv(out / "rank_table.csv", index=False)
    write_json_atomic(out / "manifest.json", {
        "kind": "age-explorer LoRA rank table", "run": str(run_dir), "run_method": manifest.method,
        "run_preset": manifest.preset, "concept": concept, "base_model": manifest.base_model,
        "base_revision": manifest.base_revision, "ranks": args.ranks, "capability": spec.to_dict(),
        "seeds": spec.seeds(), "threads": args.threads, "seconds": round(time.time() - started, 1),
        "versions": environment_versions()})
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    cell = lambda v: "" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)])


def read_lora_summary(folder: Path) -> dict:
    import json

    return json.loads((folder / "export_manifest.json").read_text())["lora"]


if __name__ == "__main__":
    main()
