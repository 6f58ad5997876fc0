"""Running a recovery attack on an erased run: the attack's probes, their images judged on the erased
and the base model, the result folder; ``compare_runs`` over several runs."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from safetensors.torch import save_file

from ..imageio import contact_sheet
from ..files import environment_versions, write_json_atomic
from .common import AttackTarget, Judge, Probe, Progress, default_judge, generate_states
from .config import AttackConfig
from .registry import get_attack, make_attack_config

ATTACK_KIND = "age-explorer attack"
RESULT = "attack.json"


@dataclass
class AttackResult:
    attack: str
    concept: str
    run_dir: Path
    asr: float  # share of attack images showing the concept, erased model
    asr_best: float  # the best single probe's ASR (an attacker keeps the prompt that works)
    asr_base: float  # the same attack on the base model
    asr_plain: float  # the plain prompt on the erased model
    asr_original: float  # the plain prompt on the base model
    learned: dict
    seconds: float  # the attack on the erased model: optimisation and its images
    seconds_total: float
    config: dict
    probes: pd.DataFrame  # per probe: label, kind, seeds, ASR erased / base
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # original, erased, recovered, base_attack
    out_dir: Path | None = None

    def row(self) -> dict:
        return {"run": self.run_dir.name, "concept": self.concept, "attack": self.attack, "asr": self.asr,
                "asr_best": self.asr_best, "asr_base": self.asr_base, "asr_plain": self.asr_plain,
                "asr_original": self.asr_original, "seconds": round(self.seconds, 1)}


def _images(target: AttackTarget, which: str, probes: list[Probe], config: AttackConfig, judge: Judge,
            progress: Progress | None, stop, stage: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    images, hits = [], []
    total = sum(len(p.seeds) for p in probes)
    with target.weights(which) as bundle:
        for p in probes:
            batch = generate_states(bundle, p.cond, p.seeds, config.sample_steps,
                                    config.guidance if p.guidance is None else p.guidance, stop)
            images.append(batch)
            hits.append(judge(batch))
            if progress:
                progress(stage, sum(len(i) for i in images), total)
    return images, hits


def _share(hits: list[torch.Tensor]) -> float:
    return float(torch.cat(hits).float().mean())


def run_attack(run_dir: str | Path, attack: str, config: AttackConfig | None = None, *, out: str | Path | None = None,
               write: bool = True, progress: Progress | None = None, stop: Callable[[], bool] | None = None,
               judge: Judge | None = None, device="auto", dtype=None, target: AttackTarget | None = None,
               cache: dict | None = None, evaluator: str | None = None, concept_set: str | None = None,
               **options) -> AttackResult:
    """Attack the erased run in ``run_dir``; ``options`` are config fields when no ``config`` is given.

    Writes the attack folder (default ``RUN_DIR/attacks/<attack>-<concept>``) unless ``write=False``.
    Without ``judge``, the images are judged by ``evaluator`` (default: the graph's default for the
    model) over ``concept_set`` (default: the model's own, else Imagenette).
    ``cache`` (a dict the caller keeps) shares base-model baselines between runs of the same base model.
    ``stop`` is polled between steps and images; a stopped attack raises :class:`AttackStopped` and
    writes nothing.
    """
    get_attack(attack)  # an unknown attack is an error that lists the known ones
    config = config or make_attack_config(attack, **options)
    if config.attack != attack:
        raise ValueError(f"a {config.attack} config cannot configure the {attack} attack")
    target = target or AttackTarget(run_dir, device=device, dtype=dtype)
    concept = target.concept(config.concept)
    out_dir = Path(out) if out else attack_folder(target.run_dir, attack, concept)
    if write and out_dir.exists():
        raise FileExistsError(f"{out_dir} already holds an attack result; choose another --out or remove it")
    judge = judge or default_judge(target.bundle, concept, evaluator, concept_set)
    runner = get_attack(attack).load()()
    started = time.time()
    probes, learned, tensors = runner.learn(target, concept, config, progress, stop)
    attack_images, attack_hits = _images(target, "erased", probes, config, judge, progress, stop, "attack images")
    seconds = time.time() - started
    plain = [Probe(config.template.format(c=concept), target.bundle.encode([config.template.format(c=concept)]),
                   config.seed_list, config.guidance, "plain prompt")]
    plain_images, plain_hits = _images(target, "erased", plain, config, judge, progress, stop, "plain prompt")
    key = json.dumps([target.manifest.base_model, target.manifest.base_revision, concept,
                      config.to_dict(), judge.name], sort_keys=True)
    if cache is not None and key in cache:
        base_images, base_hits, original_images, original_hits = cache[key]
    else:
        # the optimisation redone on the base weights reports its stages as the base model's
        base_progress = (lambda stage, done, total: progress(f"base model, {stage}", done, total)) if progress else None
        with target.weights("base"):
            base_probes = runner.learn(target, concept, config, base_progress, stop)[0] \
                if runner.depends_on_weights else probes
            base_images, base_hits = _images(target, "base", base_probes, config, judge, progress, stop,
                                             "base model, attack")
            original_images, original_hits = _images(target, "base", plain, config, judge, progress, stop,
                                                     "base model, plain prompt")
        if cache is not None:
            cache[key] = (base_images, base_hits, original_images, original_hits)
    rates = [float(h.float().mean()) for h in attack_hits]
    best = max(range(len(rates)), key=rates.__getitem__)
    table = pd.DataFrame({"probe": [p.label for p in probes], "kind": [p.kind for p in probes],
                          "seeds": [_seeds_text(p.seeds) for p in probes],
                          "guidance": [p.guidance for p in probes], "asr": rates,
                          "asr_base": [float(h.float().mean()) for h in base_hits]})
    result = AttackResult(
        attack=attack, concept=concept, run_dir=target.run_dir, asr=_share(attack_hits), asr_best=rates[best],
        asr_base=_share(base_hits), asr_plain=_share(plain_hits), asr_original=_share(original_hits),
        learned={**learned, "best_probe": probes[best].label}, seconds=seconds,
        seconds_total=time.time() - started, config=config.to_dict(), probes=table,
        images={"original": original_images[0], "erased": plain_images[0], "recovered": attack_images[best],
                "base_attack": base_images[best]})
    if write:
        result.out_dir = _write(result, target, judge, tensors, out_dir)
    return result


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def _slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def attack_folder(run_dir: str | Path, attack: str, concept: str) -> Path:
    """Where ``attack`` on a run's ``concept`` is written by default: ``RUN/attacks/ATTACK-CONCEPT``
    (``--compare`` and a graph's recovery layer read it there)."""
    return Path(run_dir) / "attacks" / f"{attack}-{_slug(concept)}"


def free_attack_folder(run_dir: str | Path, attack: str, concept: str) -> Path:
    """:func:`attack_folder`, or ``...-2``, ``-3`` once that is taken: a background attack never
    replaces an earlier one."""
    base = attack_folder(run_dir, attack, concept)
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def _write(result: AttackResult, target: AttackTarget, judge: Judge, tensors: dict, out_dir: Path) -> Path:
    """Everything goes to a temp folder beside ``out_dir`` that is renamed at the end: no half-written result."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if tensors:
            save_file(tensors, str(tmp / "learned.safetensors"))
        result.probes.to_csv(tmp / "probes.csv", index=False)
        im = result.images
        label = f"{result.attack}: {result.learned['best_probe']}"
        sheet = contact_sheet([[im["original"]], [im["erased"]], [im["recovered"]], [im["base_attack"]]],
                              [f"original (base), plain prompt  {result.asr_original:.2f}",
                               f"erased, plain prompt  {result.asr_plain:.2f}",
                               f"erased, attack  {result.asr_best:.2f}",
                               f"base, attack  {result.probes.asr_base.iloc[result.probes.asr.idxmax()]:.2f}"],
                              [f"seeds {result.probes.seeds.iloc[result.probes.asr.idxmax()]}; {label}"[:120]])
        sheet.save(tmp / "contact_sheet.png")
        bundle = target.bundle
        write_json_atomic(tmp / RESULT, {
            "kind": ATTACK_KIND, "attack": result.attack, "concept": result.concept,
            "run_dir": str(target.run_dir), "run_method": target.manifest.method,
            "run_preset": target.manifest.preset, "run_description": target.describe(),
            "base_model": target.manifest.base_model, "evaluator": judge.name,
            "asr": result.asr, "asr_best": result.asr_best, "asr_base": result.asr_base,
            "asr_plain": result.asr_plain, "asr_original": result.asr_original,
            "images_per_probe": len(result.images["recovered"]), "probes": len(result.probes),
            "seeds": result.config["seeds"], "config": result.config, "learned": result.learned,
            "seconds": round(result.seconds, 2), "seconds_total": round(result.seconds_total, 2),
            "device": str(bundle.device), "dtype": str(bundle.dtype).replace("torch.", ""),
            "cpu_threads": torch.get_num_threads() if bundle.device.type == "cpu" else None,
            "versions": environment_versions()})
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_result(folder: str | Path) -> dict:
    path = Path(folder) / RESULT
    data = json.loads(path.read_text())
    if data.get("kind") != ATTACK_KIND:
        raise ValueError(f"{path} is not an attack result")
    return data


def compare_runs(run_dirs: list[str | Path], attacks: list[str], options: dict | None = None,
                 progress: Progress | None = None, log=print, device="auto", evaluator: str | None = None,
                 concept_set: str | None = None) -> pd.DataFrame:
    """One row per run and attack. An attack folder already in a run is reused when its config is the
    same; base-model baselines are computed once per base model and concept."""
    cache: dict = {}
    rows = []
    for run_dir in run_dirs:
        target = None
        for attack in attacks:
            config = make_attack_config(attack, **(options or {}))
            if target is None:
                target = AttackTarget(run_dir, device=device)
            concept = target.concept(config.concept)
            folder = attack_folder(target.run_dir, attack, concept)
            if (folder / RESULT).is_file():
                data = read_result(folder)
                if json.loads(json.dumps(config.to_dict())) != data["config"]:
                    raise FileExistsError(f"{folder} holds a {attack} attack with another configuration; "
                                          f"remove it to measure again")
            else:
                run_attack(run_dir, attack, config, target=target, progress=progress, cache=cache,
                           evaluator=evaluator, concept_set=concept_set)
                data = read_result(folder)
            row = {"run": Path(run_dir).name, "method": data.get("run_description", data["run_method"]),
                   "concept": concept, "attack": attack,
                   **{k: data[k] for k in ("asr", "asr_best", "asr_base", "asr_plain", "asr_original", "seconds")}}
            rows.append(row)
            log(f"{row['run']:28s} {attack:9s} ASR {row['asr']:.2f} (best {row['asr_best']:.2f})  base "
                f"{row['asr_base']:.2f}  plain {row['asr_plain']:.2f}  {row['seconds']:.1f} s")
    return pd.DataFrame(rows)
