"""``age-explorer attack``: recovery attacks on an erased run: can the concept come back?"""

from __future__ import annotations

import argparse

from .common import THREADS_HELP, use_threads
from .config_flags import add_config_flags, given_values

HELP = "recovery attacks on an erased run: can the concept come back?"


# Spellings the command had before its flags were generated from the configs; they keep working.
EARLIER_SPELLINGS = {"prompts_file": ["--prompts"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...attacks import ATTACKS

    parser.add_argument("run_dir", nargs="+", help="erased run folder (several with --compare)")
    parser.add_argument("--attack", action="append", default=None, metavar="ATTACK",
                        help="the attack (repeat for several; --compare default: all): " + "; ".join(
                            f"{name}: {attack.summary}" for name, attack in ATTACKS.items()))
    parser.add_argument("--compare", action="store_true", help="one ASR table per attack over the runs")
    # every field of every attack's config, its help and default from the config (a field several attacks
    # share is one flag that each of them takes)
    fields = add_config_flags(parser, {name: attack.config for name, attack in ATTACKS.items()},
                              aliases=EARLIER_SPELLINGS)
    parser.add_argument("--graph", action="append", default=None, help="add the ASR to this graph's recovery.csv")
    parser.add_argument("--evaluator", default=None, help="judge of the images: toy, hf:<hub id>, clip:<hub id or "
                        "folder>, torchvision-resnet50 (default: toy on the toy world, else hf:microsoft/resnet-50)")
    parser.add_argument("--concept-set", default=None, help="classes the evaluator chooses among: the model's own "
                        "set (toy), imagenette, netfive or a CSV holding the concept (default: own, else imagenette)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--out", default=None, help="attack folder (default RUN/attacks/ATTACK-CONCEPT)")
    parser.set_defaults(func=run, config_fields=fields)


def attack_options(args: argparse.Namespace) -> dict:
    """Config fields the user set on the command line (the others keep each attack's default)."""
    return given_values(args, args.config_fields)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ...attacks import ATTACKS, compare_runs, make_attack_config, run_attack

    use_threads(args.threads)
    attacks = args.attack or (list(ATTACKS) if args.compare else [])
    if not attacks:
        raise ValueError(f"give --attack {'|'.join(ATTACKS)} (repeat for several)")
    bars: dict = {}

    def show(stage, done, total):
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars.clear()
            bars[stage] = tqdm(total=total, desc=stage)
        bars[stage].update(done - bars[stage].n)

    given = attack_options(args)
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
                                     log=lambda line: tqdm.write(line), evaluator=args.evaluator,
                                     concept_set=args.concept_set))
        for bar in bars.values():
            bar.close()
        table = pd.concat(rows, ignore_index=True)
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            for attack, block in table.groupby("attack", sort=False):
                print(f"\n{attack}: ASR on the erased model (best probe), the same attack on the base model, "
                      f"the plain prompt on the erased model")
                print(block.drop(columns="attack").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if args.graph:
            from ...graph.recovery import add_recovery

            for graph in args.graph:
                print(f"recovery rows written to {add_recovery(graph, args.run_dir, attacks)}")
        return 0
    if len(args.run_dir) != 1:
        raise ValueError("attack one run at a time, or compare several with --compare")
    if args.out and len(attacks) > 1:
        raise ValueError("--out takes one attack; leave it out to write each into RUN/attacks/")
    for attack in attacks:
        result = run_attack(args.run_dir[0], attack, out=args.out, progress=show, device=args.device,
                            evaluator=args.evaluator, concept_set=args.concept_set, **options(attack))
        for bar in bars.values():
            bar.close()
        bars.clear()
        learned = result.learned.get("nearest_words") or result.learned["best_probe"]
        print(f"{attack} on {result.concept}: ASR {result.asr:.3f} (best probe {result.asr_best:.3f}); "
              f"same attack on the base model {result.asr_base:.3f}; plain prompt erased {result.asr_plain:.3f}, "
              f"base {result.asr_original:.3f}; {result.seconds:.1f} s -> {result.out_dir}")
        print(f"  learned: {learned}")
    if args.graph:
        from ...graph.recovery import add_recovery

        for graph in args.graph:
            print(f"recovery rows written to {add_recovery(graph, args.run_dir, attacks)}")
    return 0
