"""Target preservation: does AGE's top-1 target keep its own capability after the erasure?

AGE maps the erased concept onto its targets while preserving them, so each erased concept's top-1
target should still be made: G after ≥ ``PRESERVED_G``. The check measures it with the backend's own
classifier, with the graphs' settings (N images, seeds 1000.., the concept set's template, top-1),
when the target is a concept of the backend's concept set; a target below the bar gets a one-line
note on why, from what the run recorded (its output distance to the erased concept, the words they share).

``target_preservation`` turns already measured G values into the record (the target-search study
measures the targets with the rest of its row); ``check_target_preservation`` measures them on a run
folder and writes the record into its manifest (``RunManifest.target_preservation``).
"""

from __future__ import annotations

from pathlib import Path

from ..runs import RunManifest

PRESERVED_G = 0.9
# a target whose frozen output on the erased concept's latents is closer than this share of the median
# candidate's is a near copy (the share damage_floor drops)
NEAR_COPY_SHARE = 0.5


def top1_targets(manifest: RunManifest) -> dict[str, tuple[str, float]]:
    """Erased concept -> (its top-1 target, π) of an AGE run's manifest."""
    return {concept: (targets[0][0], float(targets[0][1]))
            for concept, targets in (manifest.targets or {}).items() if targets}


def why_not_preserved(concept: str, target: str, g_after: float, manifest: RunManifest) -> str:
    """One line: the top-1 target lost capability, and the signs in the run's record of why."""
    reasons = []
    near = next((n for n in (manifest.near_copy or {}).get(concept, []) if n["candidate"] == target), None)
    if near is not None and near["output_vs_median"] < NEAR_COPY_SHARE:
        reasons.append(f"it is a near copy (its output on the latents of {concept!r} is {near['output_vs_median']:.2f} "
                       f"of the median candidate's distance, rank {near['output_rank']})")
    shared = [w for w in target.lower().split() if w in concept.lower().split()]
    if shared:
        reasons.append(f"it shares {' '.join(map(repr, shared))} with the erased concept")
    if not reasons:
        far = f" (output distance {near['output_vs_median']:.2f} of the median)" if near is not None else ""
        reasons.append(f"no near-copy sign in the run's record{far}: the erasure spilled onto it")
    return (f"top-1 target {target!r} of {concept!r} keeps G {g_after:.2f} < {PRESERVED_G}: "
            + "; ".join(reasons))


def target_preservation(manifest: RunManifest, g_after: dict[str, float], images: int) -> dict[str, dict]:
    """Erased concept -> its top-1 target's record, for the targets ``g_after`` holds (the measured ones)."""
    out = {}
    for concept, (target, pi) in top1_targets(manifest).items():
        if target not in g_after:
            continue
        g = float(g_after[target])
        entry = {"target": target, "pi": round(pi, 4), "G_after": g, "images": images, "preserved": g >= PRESERVED_G}
        if not entry["preserved"]:
            entry["note"] = why_not_preserved(concept, target, g, manifest)
        out[concept] = entry
    return out


def measurable_targets(bundle, manifest: RunManifest) -> list[str]:
    """The top-1 targets the backend's classifier can judge (concepts of its concept set)."""
    backend = bundle.backend
    if not backend.has_evaluator or backend.concept_set() is None:
        return []
    names = set(backend.concept_set().concepts)
    return sorted({target for target, _ in top1_targets(manifest).values() if target in names})


def check_target_preservation(bundle, run_dir: str | Path, images: int = 32) -> dict[str, dict]:
    """Measure the top-1 targets' G after on the erased model in ``run_dir`` (made from ``bundle``, the
    base model, into which the run's delta is swapped for the measurement) and record them in its
    manifest; {} and nothing written when no target is a concept the backend can judge."""
    from ..graph.capability import CapabilitySpec, capability
    from ..runs import run_weights

    run_dir = Path(run_dir)
    manifest = RunManifest.read(run_dir, finished=False)  # load_bundle refuses an unfinished run, once it is loaded
    targets = measurable_targets(bundle, manifest)
    if not targets:
        return {}
    concept_set = bundle.backend.concept_set()
    spec = CapabilitySpec(images_per_concept=images).resolved(bundle)
    with run_weights(bundle, run_dir):
        after = capability(bundle, concept_set, bundle.backend.evaluator(bundle, concept_set), spec, targets)
    record = target_preservation(manifest, dict(zip(after.concept, after.G_top1)), images)
    manifest.target_preservation = record
    manifest.write(run_dir)
    return record


def notes(record: dict[str, dict]) -> list[str]:
    """The lines to print: one per erased concept whose top-1 target was not preserved."""
    return [entry["note"] for entry in record.values() if not entry["preserved"]]
