"""The ``age-explorer`` command: thin wrappers over the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy",
                   help="'toy' (embedded), a toy model folder, a diffusers SD 1.x/2.x folder or a Hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 (GPU only)")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")


def _load(args):
    from .bundle import load_bundle

    return load_bundle(args.model, device=args.device, dtype=args.dtype,
                       local_files_only=True if args.offline else None)


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .imageio import save_pngs
    from .sampling import generate, parse_seeds

    seeds = parse_seeds(args.seeds)
    if not args.prompt.strip():
        raise ValueError("prompt is empty: give a text such as 'a red circle'")
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = _load(args)
    bar = tqdm(total=len(seeds), desc="generate", unit="img")
    images = generate(bundle, [args.prompt], seeds, steps=args.steps, guidance_scale=args.guidance,
                      progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    paths = save_pngs(images, args.out, [f"seed{s:04d}" for s in seeds], view_size=args.size)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def cmd_toy_train(args) -> int:
    import torch

    from .paths import toy_model_dir
    from .toyworld.train import ToyTrainConfig, train_toy_model

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyTrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = ToyTrainConfig(**overrides)
    concepts = Path(args.concepts) if args.concepts else toy_model_dir() / "concepts.json"
    start = time.time()
    out = train_toy_model(args.out, concepts, cfg)
    print(f"toy model written to {out} in {time.time() - start:.0f} s")
    return 0


def cmd_toy_bench(args) -> int:
    import torch

    from .bundle import load_bundle
    from .app.experiments import toy_quality as evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_bundle(args.model, device="cpu")
    load_seconds = time.perf_counter() - start
    table, samples = evaluate.concept_accuracy(bundle, args.images_per_concept, seed=args.seed,
                                               guidance_scale=args.guidance)
    import pandas as pd

    with pd.option_context("display.width", 120, "display.max_rows", 100):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nmean accuracy {table.accuracy.mean():.3f}   min {table.accuracy.min():.3f} "
          f"({table.loc[table.accuracy.idxmin(), 'concept']})   "
          f"shape right {table.shape_right.mean():.3f}   colour right {table.colour_right.mean():.3f}")
    renders = evaluate.render_reference(bundle, args.images_per_concept)
    print("\nimage statistics        renders   samples")
    print(f"high-frequency energy   {evaluate.high_frequency_energy(renders):.5f}   "
          f"{evaluate.high_frequency_energy(samples):.5f}")
    print(f"background saturation   {evaluate.background_saturation(renders):.3f}     "
          f"{evaluate.background_saturation(samples):.3f}")
    if not args.skip_speed:
        seconds = evaluate.timed_generation(bundle, 4)
        print(f"\nspeed ({torch.get_num_threads()} threads)")
        print(f"model load              {load_seconds:.2f} s")
        print(f"4 images x 25 concepts  {seconds:.1f} s")
    if args.grid_out:
        from .imageio import grid, to_pil

        n = args.images_per_concept
        pick = torch.arange(25) * n  # first image of each concept
        side = torch.cat([grid(renders[pick], 5), torch.ones(3, 160, 8), grid(samples[pick], 5)], dim=2)
        to_pil(side).resize((side.shape[2] * 3, side.shape[1] * 3), 0).save(args.grid_out)
        print(f"\nrender grid (left) and sample grid (right) written to {args.grid_out}")
    ok = table.accuracy.mean() >= 0.9 and table.accuracy.min() >= 0.6
    print(f"\ntarget mean >= 0.90 and every concept >= 0.60: {'met' if ok else 'NOT met'}")
    return 0


def erase_overrides(args) -> dict:
    """Config fields the user set on the command line."""
    pairs = {"target": args.target, "iterations": args.iterations, "lr": args.lr, "lam": args.lam,
             "target_search": args.search, "vocab": args.vocab, "parameter_set": args.param_set,
             "batch_size": args.batch_size, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
             "xt_source": args.xt_source, "loss_space": args.loss_space, "gumbel_lr": args.gumbel_lr,
             "negative_guidance": args.eta, "precision": args.precision}
    values = {k: v for k, v in pairs.items() if v is not None}
    if args.synonym:
        values["synonyms"] = args.synonym
    if args.preserve:
        values["preserve"] = args.preserve
    if args.candidates:
        values["candidates"] = [w.strip() for w in Path(args.candidates).read_text().splitlines() if w.strip()]
    if args.allow_cpu:
        values["requires_gpu"] = False
    if args.share_draws:
        values["share_draws"] = True
    return values


def cmd_erase(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .erasure import erase, make_config

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = _load(args)
    preset = args.preset if args.preset != "none" else None
    if preset is None and args.preset is None:
        preset = bundle.backend.default_presets.get(args.method)
    config = make_config(args.method, preset, concepts=args.concept, **erase_overrides(args))
    _claim_run_folder(Path(args.out), args.resume, args.force)
    bars = []  # the bar appears with the first step, so that set-up errors print alone

    def show(report):
        if not bars:
            bars.append(tqdm(total=report.total, initial=report.step - 1, desc=args.method))
        bar = bars[0]
        bar.update(report.step - bar.n)
        post = {k: f"{v:.4g}" for k, v in report.losses.items() if k != "total"}
        if report.targets:
            post["target"] = report.targets[report.concept][0][0]
        bar.set_postfix(post, refresh=False)

    try:
        result = erase(bundle, config, args.out, callbacks=[show], resume=args.resume)
    finally:  # closed before an error is printed, so the error is the last line
        for bar in bars:
            bar.close()
    m = result.manifest
    print(f"{result.status}: {result.steps_done} steps in {m['seconds']:.1f} s -> {result.run_dir}")
    for concept, targets in m.get("targets", {}).items():
        print(f"  {concept}: targets " + ", ".join(f"{w} {p:.2f}" for w, p in targets))
    if "neighbour_picks" in m:
        n = m["neighbour_picks"]
        print(f"  picks that are real neighbours: {n['share']:.2f} (last quarter {n['share_last_quarter']:.2f}, "
              f"chance {n['chance']:.2f})")
    return 0


def _claim_run_folder(out: Path, resume: bool, force: bool) -> None:
    """An existing --out is continued (--resume) or replaced (--force, only if it is a run folder), never
    silently overwritten; ``erase`` itself locks the folder against a second process."""
    from .runs import MANIFEST

    if resume or not out.exists() or not any(p.name != ".lock" for p in out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --resume to continue the run in it, "
                              f"--force to replace it, or choose another --out")
    if not ((out / MANIFEST).is_file() or (out / "checkpoint").is_dir()):
        raise FileExistsError(f"{out} holds files that are not a run; --force replaces only a run folder")
    import shutil

    shutil.rmtree(out)


def cmd_toy_compare(args) -> int:
    import pandas as pd
    import torch

    from .bundle import load_bundle
    from .graph.capability import CapabilitySpec
    from .app.experiments.toy_compare import compare, summary

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model, device="cpu")
    spec = CapabilitySpec(images_per_concept=args.images_per_concept, seed=args.seed)
    results = compare(bundle, args.out, concepts=args.concept, variants=args.variant, spec=spec)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nper concept")
        print(results.drop(columns=["top_targets"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("\nmean over erased concepts (Delta = G before - G after, top-1)")
        print(summary(results).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_bench_erase(args) -> int:
    import torch

    from .bundle import load_bundle
    from .device import resolve_device
    from .app.bench import engine_seconds, random_sd14_bundle, reference_style_seconds

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "sd14":
        bundle = random_sd14_bundle(device)
        overrides = {}
    else:
        bundle = load_bundle("toy", device=device)
        overrides = {"loss_space": "eps"}
    n = args.iterations
    print(f"AGE iteration cost, {args.arch} UNet on {device} ({torch.get_num_threads()} CPU threads), "
          f"{n} timed iterations each, paper recipe (DDIM 50 'till t', batch 1)")
    args.precision = args.precision or ["fp32", "bf16"]
    ref = reference_style_seconds(bundle, n, candidates=args.candidates, loss_space=overrides.get("loss_space", "x0"))
    rows = [("reference-style loop (fp32, sequential)", ref, float("nan"))]
    for precision in args.precision:
        sec, info = engine_seconds(bundle, n, precision, candidates=args.candidates, **overrides)
        rows.append((f"engine ({precision})", sec, info["peak_gib"]))
    print(f"{'loop':42s} {'s/iter':>8s} {'2000 iters':>11s} {'speed-up':>9s} {'peak GiB':>9s}")
    for name, sec, peak in rows:
        print(f"{name:42s} {sec:8.3f} {sec * 2000 / 60:9.1f} m {ref / sec:8.2f}x {peak:9.2f}")
    return 0


def cmd_bench_presets(args) -> int:
    import tempfile

    import torch

    from .bundle import load_bundle
    from .app.bench import preset_seconds

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model, device=args.device)
    overrides = {"iterations": args.iterations} if args.iterations else {}
    print(f"whole erasures on {bundle.device} ({torch.get_num_threads()} CPU threads), model {args.model}")
    print(f"{'preset':10s} {'concept':16s} {'loop steps':>10s} {'seconds':>8s} {'peak RSS GiB':>13s}")
    means = {}
    for preset in args.preset:
        for concept in args.concept:
            with tempfile.TemporaryDirectory() as tmp:
                row = preset_seconds(bundle, preset, concept, Path(tmp) / "run", **overrides)
            means.setdefault(preset, []).append(row["seconds"])
            print(f"{preset:10s} {concept:16s} {row['steps']:10d} {row['seconds']:8.1f} {row['peak_rss_gib']:13.2f}")
    for preset, seconds in means.items():
        print(f"{preset:10s} {'mean':16s} {'':10s} {sum(seconds) / len(seconds):8.1f}")
    return 0


def _attack_options(args) -> dict:
    """Config fields the user set on the command line (None keeps each attack's default)."""
    return {"concept": args.concept, "seeds": args.seeds, "steps": args.steps, "prompts_file": args.prompts,
            "tokens": args.tokens, "epsilon": args.epsilon, "seed": args.seed}


def cmd_attack(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .attacks import ATTACKS, compare_runs, make_attack_config, run_attack

    if args.threads:
        torch.set_num_threads(args.threads)
    attacks = args.attack or (list(ATTACKS) if args.compare else [])
    if not attacks:
        raise ValueError("give --attack prompts|embedding|perturb (repeat for several)")
    bars: dict = {}

    def show(stage, done, total):
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars.clear()
            bars[stage] = tqdm(total=total, desc=stage)
        bars[stage].update(done - bars[stage].n)

    given = {k: v for k, v in _attack_options(args).items() if v is not None}
    known = {a: set(make_attack_config(a).to_dict()) for a in attacks}
    stray = sorted(k for k in given if not any(k in fields for fields in known.values()))
    if stray:
        raise ValueError(f"option(s) {', '.join(stray)} do not apply to the {', '.join(attacks)} attack")

    def options(attack):  # each attack takes the options it has
        return {k: v for k, v in given.items() if k in known[attack]}

    for attack in attacks:
        make_attack_config(attack, **options(attack))  # a bad option fails before any model is loaded
    if args.compare:
        if args.out:
            raise ValueError("--out does not go with --compare: each run keeps its attacks in RUN/attacks/")
        import pandas as pd

        rows = []
        for attack in attacks:
            rows.append(compare_runs(args.run_dir, [attack], options(attack), progress=show, device=args.device,
                                     log=lambda line: tqdm.write(line)))
        for bar in bars.values():
            bar.close()
        table = pd.concat(rows, ignore_index=True)
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            for attack, block in table.groupby("attack", sort=False):
                print(f"\n{attack}: ASR on the erased model (best probe), the same attack on the base model, "
                      f"the plain prompt on the erased model")
                print(block.drop(columns="attack").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if args.graph:
            from .graph.recovery import add_recovery

            for graph in args.graph:
                print(f"recovery rows written to {add_recovery(graph, args.run_dir, attacks)}")
        return 0
    if len(args.run_dir) != 1:
        raise ValueError("attack one run at a time, or compare several with --compare")
    if args.out and len(attacks) > 1:
        raise ValueError("--out takes one attack; leave it out to write each into RUN/attacks/")
    for attack in attacks:
        result = run_attack(args.run_dir[0], attack, out=args.out, progress=show, device=args.device,
                            **options(attack))
        for bar in bars.values():
            bar.close()
        bars.clear()
        learned = result.learned.get("nearest_words") or result.learned["best_probe"]
        print(f"{attack} on {result.concept}: ASR {result.asr:.3f} (best probe {result.asr_best:.3f}); "
              f"same attack on the base model {result.asr_base:.3f}; plain prompt erased {result.asr_plain:.3f}, "
              f"base {result.asr_original:.3f}; {result.seconds:.1f} s -> {result.out_dir}")
        print(f"  learned: {learned}")
    if args.graph:
        from .graph.recovery import add_recovery

        for graph in args.graph:
            print(f"recovery rows written to {add_recovery(graph, args.run_dir, attacks)}")
    return 0


def cmd_bench_attack(args) -> int:
    import torch

    from .app.attack_bench import print_table, sd14_step_seconds, toy_attack_seconds

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "sd14":
        print_table(sd14_step_seconds(args.device, args.steps), f"SD-1.4 architecture, random weights, {args.device}")
    else:
        print_table(toy_attack_seconds(args.concept, args.steps), "toy world, CPU")
    return 0


def cmd_jobs(args) -> int:
    import json

    from .app.jobs import JobStore, Worker

    store = JobStore(args.data_dir)
    if args.jobs_command == "list":
        jobs = store.list(status=args.status)
        print(f"{'id':32s}  {'kind':8s}  {'device':6s}  {'status':11s}  {'progress':>11s}  config")
        for job in jobs:
            cfg = job.config
            what = ", ".join(cfg.get("options", {}).get("concepts", [])) or ", ".join(cfg.get("prompts", []))
            print(f"{job.id:32s}  {job.kind:8s}  {job.device:6s}  {job.status:11s}  {job.step:>5d}/{job.total:<5d}  "
                  f"{cfg.get('method', '')} {what}")
    elif args.jobs_command == "show":
        job = store.get(args.job_id)
        print(json.dumps({k: v for k, v in job.__dict__.items()}, indent=2, default=str))
    elif args.jobs_command == "cancel":
        print(f"{args.job_id}: {store.cancel(args.job_id)}")
    elif args.jobs_command == "resume":
        store.resume(args.job_id)
        print(f"{args.job_id}: queued again; a worker continues it from its last checkpoint")
    elif args.jobs_command == "submit-erase":
        options = {"concepts": args.concept, **({"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {})}
        if args.iterations:
            options["iterations"] = args.iterations
        job_id = store.submit("erase", {"model": args.model, "method": args.method, "preset": args.preset,
                                        "options": options}, device=args.device)
        print(job_id)
    elif args.jobs_command == "worker":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        worker = Worker(store, args.device)
        if worker.recovered:
            print(f"marked interrupted: {', '.join(worker.recovered)}", flush=True)
        if args.once:
            while worker.run_one() is not None:
                pass
        else:
            worker.serve_forever()
    return 0


def cmd_export(args) -> int:
    import json

    from tqdm.auto import tqdm

    from .export import export_run, push_to_hub

    run = Path(args.run_dir)
    out = Path(args.out) if args.out else Path("exports") / f"{run.name}-{args.format}"
    with tqdm(desc="contact sheet images", unit="img", disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        folder = export_run(run, out.parent, fmt=args.format, name=out.name, force=args.force, rank=args.rank,
                            dtype=args.dtype, progress=progress)
    print(f"exported {args.format} to {folder}")
    if args.format == "lora":
        lora = json.loads((folder / "export_manifest.json").read_text())["lora"]
        print(f"rank {lora['rank']}, relative Frobenius error {lora['relative_frobenius_error']:.4g}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, token=args.token, private=not args.public)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


def _graph_recipe(args, bundle):
    from .graph.sweep import RowRecipe

    options = {}
    if args.target is not None:
        options["target"] = args.target
    if args.search:
        options["target_search"] = args.search
    if args.iterations:
        options["iterations"] = args.iterations
    preset = args.preset or bundle.backend.default_presets.get(args.method)
    return RowRecipe(args.method, preset, options)


def cmd_graph(args) -> int:
    import torch

    from .graph.analysis import similarity_measures, summary
    from .graph.capability import CapabilitySpec
    from .graph.concept_sets import load_concept_set
    from .graph.sweep import build_graph

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = _load(args)
    concept_set = load_concept_set(args.concepts, bundle, args.template)
    if args.subset:
        concept_set = concept_set.subset(args.subset)
    spec = CapabilitySpec(images_per_concept=args.images_per_concept, seed=args.seed, steps=args.steps)
    start = time.time()
    store = build_graph(bundle, concept_set, args.out, _graph_recipe(args, bundle), spec, args.evaluator,
                        backend=args.backend, ray_address=args.ray_address)
    meta = store.meta()
    seconds = meta.get("row_seconds", {})
    print(f"\n{len(store.rows_done())} rows in {args.out}; this run {time.time() - start:.0f} s; "
          f"G_0 {meta.get('baseline_seconds', 0):.0f} s")
    if seconds:
        print("seconds per row: " + ", ".join(f"{c} {s:.0f}" for c, s in seconds.items()))
        print(f"mean {sum(seconds.values()) / len(seconds):.1f} s per row")
    print(summary(store, concept_set, similarity_measures(bundle, concept_set)))
    return 0


def cmd_analyse(args) -> int:
    import pandas as pd

    from .bundle import load_bundle
    from .graph.analysis import (abnormal_nodes, asymmetry, compare_graphs, compare_summary, locality,
                                 similarity_measures, similarity_vs_delta, summary)
    from .graph.concept_sets import ConceptSet
    from .graph.store import GraphStore

    stores = {Path(d).name: GraphStore(d) for d in args.graph_dir}
    if len(stores) < len(args.graph_dir):
        raise ValueError("give graph folders with different names, so that the table can tell them apart")
    store = next(iter(stores.values()))
    meta = store.meta()
    concept_set = ConceptSet.from_dict(meta["concept_set"])
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    if len(stores) > 1:
        others = [name for name, s in stores.items() if s.meta()["concept_set"]["concepts"] != concept_set.concepts]
        if others:
            raise ValueError(f"{', '.join(others)} measured another concept set than {next(iter(stores))}")
        table = compare_graphs(stores, concept_set)
        print("mean Delta top-1 on the rows all graphs have; *_lower: rows below the first graph")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(compare_summary(table).to_string(index=False, float_format=fmt))
            if args.tables:
                print("\nper row\n" + table.to_string(index=False, float_format=fmt))
            _print_recovery({name: s for name, s in stores.items()}, concept_set, args.tables)
        return 0
    similarity = None
    if not args.no_similarity:
        bundle = load_bundle(meta["model"], device=args.device, local_files_only=True if args.offline else None)
        similarity = similarity_measures(bundle, concept_set)
    print(summary(store, concept_set, similarity))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        _print_recovery(stores, concept_set, True)
    if args.tables:
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print("\nlocality per row\n" + locality(store, concept_set).to_string(index=False, float_format=fmt))
            print("\nmost asymmetric pairs\n" + asymmetry(store).to_string(index=False, float_format=fmt))
            print("\nnodes\n" + abnormal_nodes(store).to_string(index=False, float_format=fmt))
            if similarity is not None:
                print("\nsimilarity vs Delta\n" + similarity_vs_delta(store, similarity).to_string(index=False, float_format=fmt))
    return 0


def _print_recovery(stores: dict, concept_set, per_row: bool) -> None:
    """Spillover against recovery, for the graphs that have a recovery layer."""
    from .graph.analysis import recovery_summary, spillover_vs_recovery

    tables = {name: t for name, s in stores.items() if (t := spillover_vs_recovery(s, concept_set)) is not None}
    if not tables:
        return
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    print("\nspillover against recovery (rows with a recovery layer): mean Delta top-1 on group neighbours and "
          "unrelated concepts; ASR of the plain prompt and of each attack on the erased model")
    print(recovery_summary(tables).to_string(index=False, float_format=fmt))
    if per_row:
        for name, table in tables.items():
            print(f"\n{name} per row\n" + table.to_string(index=False, float_format=fmt))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="age-explorer", description=(
        "See and steer concept erasure in text-to-image diffusion models (AGE, ESD, UCE)."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate images with a model or an erased run")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 1,4,9")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (model default: toy 25, SD 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (model default: toy 3, SD 7.5)")
    p.add_argument("--size", type=int, default=128, help="view size of small images; raw ones go to raw/")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_generate)

    e = sub.add_parser("erase", help="erase concepts with AGE, ESD or UCE; writes a run folder")
    _add_model_args(e)
    e.add_argument("--concept", action="append", required=True, help="concept to erase (repeat for several)")
    e.add_argument("--method", choices=["age", "esd", "uce"], default="age")
    e.add_argument("--preset", default=None, help="recipe (default: toy / toy-esd / toy-uce on the toy model, "
                   "imagenette / esd-x on SD; 'none' for the method defaults)")
    e.add_argument("--target", default=None, help="ESD/UCE fixed target ('' = empty prompt)")
    e.add_argument("--iterations", type=int, default=None, help="model steps")
    e.add_argument("--lr", type=float, default=None)
    e.add_argument("--lambda", dest="lam", type=float, default=None, help="AGE preservation weight")
    e.add_argument("--eta", type=float, default=None, help="negative guidance")
    e.add_argument("--search", choices=["gumbel", "damage"], default=None, help="AGE target search")
    e.add_argument("--gumbel-lr", type=float, default=None)
    e.add_argument("--vocab", default=None, help="AGE vocabulary: toy, imagenet, en3k or a file")
    e.add_argument("--candidates", default=None, help="file of explicit AGE candidates, one per line")
    e.add_argument("--synonym", action="append", default=None, help="candidate to exclude (repeat)")
    e.add_argument("--preserve", action="append", default=None, help="UCE: concept to preserve (repeat)")
    e.add_argument("--param-set", default=None, help="xattn, xattn_kv, noxattn, selfattn, full")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--xt-source", choices=["sample", "pool"], default=None)
    e.add_argument("--share-draws", action="store_true",
                   help="AGE: a pi step reuses its model step's latents (half the sampling)")
    e.add_argument("--loss-space", choices=["x0", "eps"], default=None)
    e.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--checkpoint-every", type=int, default=None)
    e.add_argument("--allow-cpu", action="store_true", help="run a GPU preset on CPU anyway")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    e.add_argument("--force", action="store_true", help="replace the run already in --out")
    e.add_argument("--out", required=True, help="run folder")
    e.set_defaults(func=cmd_erase)

    toy = sub.add_parser("toyworld", help="the embedded toy world: train or benchmark its model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    from .toyworld.train import ToyTrainConfig

    t = toy_sub.add_parser("train", help="train the toy text-to-image model and its classifier")
    t.add_argument("--out", required=True)
    t.add_argument("--concepts", default=None, help="concepts.json (default: the shipped one)")
    t.add_argument("--threads", type=int, default=None)
    for f in dataclasses.fields(ToyTrainConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                       help=f"{f.metadata.get('help', '')} (default {f.default})")
    t.set_defaults(func=cmd_toy_train)

    b = toy_sub.add_parser("bench", help="accuracy per concept, image statistics and speed of the toy model")
    b.add_argument("--model", default="toy")
    b.add_argument("--images-per-concept", type=int, default=16)
    b.add_argument("--seed", type=int, default=1000)
    b.add_argument("--guidance", type=float, default=None)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--skip-speed", action="store_true")
    b.add_argument("--grid-out", default=None, help="write a render-vs-sample grid PNG here")
    b.set_defaults(func=cmd_toy_bench)

    c = toy_sub.add_parser("compare", help="AGE vs ESD-'' spillover on related concepts (the paper's claim)")
    c.add_argument("--model", default="toy")
    c.add_argument("--concept", action="append", default=None, help="erased concept (repeat; default: 5)")
    c.add_argument("--variant", action="append", default=None, help="ESD '', AGE (paper search), AGE (damage search)")
    c.add_argument("--images-per-concept", type=int, default=32)
    c.add_argument("--seed", type=int, default=1000)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", required=True, help="folder for runs and results (resumes when re-run)")
    c.set_defaults(func=cmd_toy_compare)

    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    be = bench_sub.add_parser("erase", help="engine vs reference-style AGE loop on the same device")
    be.add_argument("--arch", choices=["sd14", "toy"], default="sd14", help="sd14: random SD-1.4 UNet")
    be.add_argument("--device", default="auto")
    be.add_argument("--iterations", type=int, default=10)
    be.add_argument("--candidates", type=int, default=100)
    be.add_argument("--precision", action="append", default=None, help="fp32 and/or bf16 (default both)")
    be.add_argument("--threads", type=int, default=None)
    be.set_defaults(func=cmd_bench_erase)
    bp = bench_sub.add_parser("presets", help="seconds of whole erasures with presets (e.g. toy against toy-fast)")
    bp.add_argument("--model", default="toy")
    bp.add_argument("--device", default="auto")
    bp.add_argument("--preset", action="append", required=True, help="preset to time (repeat)")
    bp.add_argument("--concept", action="append", required=True, help="concept to erase (repeat)")
    bp.add_argument("--iterations", type=int, default=None, help="override the presets' model steps (smoke runs)")
    bp.add_argument("--threads", type=int, default=None)
    bp.set_defaults(func=cmd_bench_presets)
    bat = bench_sub.add_parser("attack", help="seconds of each recovery attack (toy) or per step (SD-1.4 arch)")
    bat.add_argument("--arch", choices=["toy", "sd14"], default="toy", help="sd14: random SD-1.4 UNet and text encoder")
    bat.add_argument("--device", default="cpu")
    bat.add_argument("--concept", default="red circle", help="toy: the concept erased (ESD-'', toy-esd) and attacked")
    bat.add_argument("--steps", type=int, default=None, help="optimisation steps (toy: the defaults; sd14: 3)")
    bat.add_argument("--threads", type=int, default=None)
    bat.set_defaults(func=cmd_bench_attack)

    at = sub.add_parser("attack", help="recovery attacks on an erased run: can the concept come back?")
    at.add_argument("run_dir", nargs="+", help="erased run folder (several with --compare)")
    at.add_argument("--attack", action="append", default=None, help="prompts, embedding or perturb (repeat; "
                    "--compare default: all)")
    at.add_argument("--compare", action="store_true", help="one ASR table per attack over the runs")
    at.add_argument("--concept", default=None, help="the erased concept (default: the run's first)")
    at.add_argument("--prompts", default=None, help="prompts CSV: prompt[,seed][,guidance] (I2P / Ring-A-Bell / "
                    "UnlearnDiff format)")
    at.add_argument("--steps", type=int, default=None, help="optimisation steps (embedding, perturb)")
    at.add_argument("--seeds", default=None, help="evaluation seeds (default 1000-1015)")
    at.add_argument("--tokens", type=int, default=None, help="embedding: new tokens learned (1-4)")
    at.add_argument("--epsilon", type=float, default=None, help="perturb: per-token L2 bound, relative")
    at.add_argument("--seed", type=int, default=None, help="seed of the attack's random draws")
    at.add_argument("--graph", action="append", default=None, help="add the ASR to this graph's recovery.csv")
    at.add_argument("--device", default="auto")
    at.add_argument("--threads", type=int, default=None)
    at.add_argument("--out", default=None, help="attack folder (default RUN/attacks/ATTACK-CONCEPT)")
    at.set_defaults(func=cmd_attack)

    j = sub.add_parser("jobs", help="the background job store: list, show, cancel, resume, run a worker")
    j.add_argument("--data-dir", default=None, help="job store folder (env AGE_EXPLORER_DATA_DIR, default ./runs)")
    j_sub = j.add_subparsers(dest="jobs_command", required=True)
    jl = j_sub.add_parser("list")
    jl.add_argument("--status", default=None)
    for verb in ("show", "cancel", "resume"):
        j_sub.add_parser(verb).add_argument("job_id")
    js = j_sub.add_parser("submit-erase", help="queue an erasure job")
    js.add_argument("--model", default="toy")
    js.add_argument("--concept", action="append", required=True)
    js.add_argument("--method", choices=["age", "esd", "uce"], default="age")
    js.add_argument("--preset", default="toy")
    js.add_argument("--iterations", type=int, default=None)
    js.add_argument("--checkpoint-every", type=int, default=None)
    js.add_argument("--device", default="cpu")
    jw = j_sub.add_parser("worker", help="run the queued jobs of one device")
    jw.add_argument("--device", default="cpu")
    jw.add_argument("--threads", type=int, default=None)
    jw.add_argument("--once", action="store_true", help="exit when the queue is empty")
    j.set_defaults(func=cmd_jobs)

    from .export_lora import DEFAULT_RANK, LoraExportConfig  # the rank flag: default and help of the config

    x = sub.add_parser("export", help="export an erased run: delta (default), diffusers folder or LoRA, model card, Hub")
    x.add_argument("run_dir")
    x.add_argument("--format", choices=["delta", "diffusers", "lora"], default="delta")
    x.add_argument("--rank", default=str(DEFAULT_RANK), help=LoraExportConfig.__dataclass_fields__["rank"].metadata["help"])
    x.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of a diffusers folder (default: the base model's stored dtype)")
    x.add_argument("--out", default=None, help="the export folder itself, as save_pretrained (default: exports/RUN-FORMAT)")
    x.add_argument("--force", action="store_true",
                   help="write into an existing folder, replacing only the files the export writes")
    x.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    x.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN)")
    x.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("graph", help="build (or complete) a concept graph of spillover Delta(a -> b)")
    _add_model_args(g)
    g.add_argument("--concepts", default="toy", help="toy, netfive, imagenette or a CSV (concept[,group][,imagenet_index])")
    g.add_argument("--subset", action="append", default=None, help="only these concepts (repeat)")
    g.add_argument("--template", default=None, help="prompt template with {concept}")
    g.add_argument("--method", choices=["age", "esd", "uce"], default="esd")
    g.add_argument("--preset", default=None)
    g.add_argument("--target", default=None, help="ESD/UCE target ('' = empty prompt)")
    g.add_argument("--search", choices=["gumbel", "damage"], default=None, help="AGE target search")
    g.add_argument("--iterations", type=int, default=None)
    g.add_argument("--evaluator", default=None, help="toy, hf:<hub id>, clip:<hub id>, torchvision-resnet50")
    g.add_argument("--images-per-concept", type=int, default=32)
    g.add_argument("--steps", type=int, default=None, help="DDIM steps of the generated images")
    g.add_argument("--seed", type=int, default=1000)
    g.add_argument("--backend", choices=["local", "ray"], default="local")
    g.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_graph)

    a = sub.add_parser("analyse", help="the Section 3 findings of a graph folder, with numbers; "
                                       "several folders: their spillover compared on the same rows")
    a.add_argument("graph_dir", nargs="+")
    a.add_argument("--tables", action="store_true", help="also print the full tables")
    a.add_argument("--no-similarity", action="store_true", help="skip the similarity measures (no model load)")
    a.add_argument("--device", default="auto")
    a.add_argument("--offline", action="store_true")
    a.set_defaults(func=cmd_analyse)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when redirected to a log
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        from .bundle import PromptWarning

        warnings.filterwarnings("always", category=PromptWarning)
        warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            return args.func(args)
        # input, file and network errors are one line; FloatingPointError: a diverged loss
        except (ValueError, OSError, RuntimeError, KeyError, ArithmeticError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
