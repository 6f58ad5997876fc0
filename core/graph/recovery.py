"""The recovery layer of a concept graph: per erased concept, how much of it an attacker gets back.

``recovery.csv`` beside ``nodes.csv``/``edges.csv`` holds one row per erased concept and attack (ASR on
the erased model, best probe, the same attack on the base model, the plain prompt), read from the
attack folders of runs (``RUN/attacks/``). ``graph.json`` records the file, the attacks' configs and the
runs the rows came from. Rows come from runs of the graph's own model and method.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..attacks import RESULT, attack_folder, get_attack, read_result
from ..runs import RunManifest
from .store import RECOVERY, RECOVERY_COLUMNS, GraphStore, _write_csv_atomic


def add_recovery(graph_dir: str | Path, run_dirs: list[str | Path], attacks: list[str]) -> Path:
    """Add (or replace) the recovery rows of ``run_dirs``' attacks to the graph in ``graph_dir``."""
    store = GraphStore(graph_dir)
    meta = store.meta()
    concepts = set(meta["concept_set"]["concepts"])
    new_rows, sources = [], {}
    for run_dir in run_dirs:
        run = Path(run_dir)
        manifest = RunManifest.read(run)
        if manifest.method != meta.get("method") or manifest.base_model != meta.get("model"):
            raise ValueError(f"run {run} ({manifest.method} on {manifest.base_model}) does not belong to the "
                             f"graph {graph_dir} ({meta.get('method')} on {meta.get('model')})")
        for attack in attacks:
            get_attack(attack)  # an unknown attack is an error that lists the known ones
            for concept in manifest.concepts:
                folder = attack_folder(run, attack, concept)
                if not (folder / RESULT).is_file():
                    raise FileNotFoundError(f"{folder} holds no attack result: run `age-explorer attack {run} "
                                            f"--attack {attack}` first")
                if concept not in concepts:
                    raise ValueError(f"{concept!r} is not a concept of the graph {graph_dir}")
                data = read_result(folder)
                new_rows.append({"erased": concept, "attack": attack, "asr": data["asr"], "asr_best": data["asr_best"],
                                 "asr_base": data["asr_base"], "asr_plain": data["asr_plain"],
                                 "images_per_probe": data["images_per_probe"], "probes": data["probes"],
                                 "seeds": data["seeds"], "run_preset": data.get("run_preset"),
                                 "seconds": data["seconds"]})
                sources.setdefault(attack, {"config": {k: v for k, v in data["config"].items() if k != "concept"},
                                            "evaluator": data["evaluator"], "runs": {}})
                sources[attack]["runs"][concept] = str(run)
    table = store.recovery()
    keys = {(r["erased"], r["attack"]) for r in new_rows}
    if table is not None:
        table = table[[(e, a) not in keys for e, a in zip(table.erased, table.attack)]]
    table = pd.concat([t for t in (table, pd.DataFrame(new_rows, columns=RECOVERY_COLUMNS)) if t is not None and len(t)],
                      ignore_index=True)
    _write_csv_atomic(table[RECOVERY_COLUMNS], store.folder / RECOVERY)
    recovery = meta.get("recovery", {"file": RECOVERY, "attacks": {}})
    for attack, info in sources.items():
        old = recovery["attacks"].get(attack, {"runs": {}})
        recovery["attacks"][attack] = {**info, "runs": {**old.get("runs", {}), **info["runs"]}}
    store.update_meta(recovery=recovery)
    return store.folder / RECOVERY
