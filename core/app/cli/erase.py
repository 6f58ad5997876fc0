"""``age-explorer erase``: erase concepts with a registered method; writes a run folder."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from .common import THREADS_HELP, add_model_args, load_model, use_threads
from .config_flags import add_config_flags, flag_name, given_values

HELP = "erase concepts (AGE, ESD, UCE: the method registry); writes a run folder"

# Spellings the command had before its flags were generated from the configs; they keep working.
EARLIER_SPELLINGS = {"concepts": ["--concept"], "lam": ["--lambda"], "negative_guidance": ["--eta"],
                     "target_search": ["--search"], "parameter_set": ["--param-set"], "synonyms": ["--synonym"]}
# Fields whose flag is not the generated one: the preset is make_config's own argument (with 'none' and
# the backend's default), and explicit candidates come from a file, one per line.
OWN_FLAGS = {"preset", "candidates"}
MAX_CHECK_IMAGES = 1024  # images of the top-1 target's check (the graphs use 32)
INTERRUPTED = 130  # the shell's exit status of a command stopped by Ctrl-C (128 + SIGINT)


def config_classes() -> dict[str, type]:
    """Method name -> config dataclass, from the method registry."""
    from ...erasure import METHODS

    return {name: method.config for name, method in METHODS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...erasure import PRESETS

    configs = config_classes()
    add_model_args(parser)
    parser.add_argument("--method", choices=list(configs), default="age", help="erasure method (default age)")
    parser.add_argument("--preset", default=None, help=(
        "recipe: " + ", ".join(f"{name} ({method})" for name, (method, _, _) in PRESETS.items())
        + "; default: the model's own (toy / toy-esd / toy-uce on the toy model, imagenette / esd-x on SD); "
          "'none' for the method defaults"))
    fields = add_config_flags(parser, configs, skip=OWN_FLAGS, aliases=EARLIER_SPELLINGS, required={"concepts"})
    parser.add_argument("--candidates", default=None, metavar="FILE",
                        help="file of explicit AGE candidates, one per line (overrides vocab) [age]")
    parser.add_argument("--allow-cpu", dest="requires_gpu", action="store_const", const=False,
                        help="run a GPU preset on CPU anyway (the same as --no-requires-gpu)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    parser.add_argument("--force", action="store_true", help="replace the run already in --out")
    parser.add_argument("--target-check-images", type=int, default=32, metavar="N", help=(
        "after an AGE run, measure each erased concept's top-1 target's G after on N images with the model's "
        "classifier when the target is one of its concepts (the toy world), record it in the manifest and "
        "say why when it is below 0.9; 0 skips it (default 32, the graphs' N)"))
    parser.add_argument("--out", required=True, help="run folder")
    parser.set_defaults(func=run, config_fields=fields, on_interrupt=interrupted_hint)


def interrupted_hint(args: argparse.Namespace) -> str:
    """What to do after a Ctrl-C that came before the run's steps (loading) or as a second press."""
    if (Path(args.out) / "checkpoint").is_dir():
        return f"the run in {args.out} keeps its last checkpoint; run the same command with --resume to continue it"
    return f"no checkpoint was written yet; run the same command again (with --force if {args.out} exists)"


def erase_overrides(args: argparse.Namespace) -> dict:
    """Config fields the user set on the command line; a flag of another method is an error."""
    from ...erasure import get_method

    values = given_values(args, args.config_fields)
    given = [*values, *(["candidates"] if args.candidates else [])]
    own = {field.name for field in dataclasses.fields(get_method(args.method).config)}
    stray = [flag_name(name) for name in given if name not in own]
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise ValueError(f"{', '.join(stray)} {verb} not apply to the {args.method} method; see erase --help "
                         f"for the methods each flag belongs to")
    if args.candidates:
        values["candidates"] = [w.strip() for w in Path(args.candidates).read_text().splitlines() if w.strip()]
        if not values["candidates"]:  # else the vocabulary would be used, as if no file were given
            raise ValueError(f"the candidates file {args.candidates} holds no candidate: write one per line")
    return values


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ...erasure import erase, get_method, make_config

    overrides = erase_overrides(args)  # before the model loads
    if not 0 <= args.target_check_images <= MAX_CHECK_IMAGES:
        raise ValueError(f"--target-check-images must be a whole number from 0 (skip) to {MAX_CHECK_IMAGES}, "
                         f"got {args.target_check_images}")
    # built before the model loads, so a bad value is refused in seconds (minutes from the Hub); with no
    # --preset it is rebuilt on the preset of the model's family once the model is known
    config = make_config(args.method, args.preset if args.preset != "none" else None, **overrides)
    use_threads(args.threads or (started_threads(Path(args.out)) if args.resume else None))
    bundle = load_model(args)
    if args.preset is None:
        config = make_config(args.method, bundle.backend.default_preset(args.method), **overrides)
    claim_run_folder(Path(args.out), args.resume, args.force)
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
        with StopOnCtrlC() as ctrl_c:
            result = erase(bundle, config, args.out, callbacks=[show], stop=ctrl_c.pressed, resume=args.resume)
    finally:  # closed before an error is printed, so the error is the last line
        for bar in bars:
            bar.close()
    if result.status == "stopped":
        print(f"interrupted at step {result.steps_done}: the run is checkpointed in {args.out}; "
              f"run the same command with --resume to continue it", file=sys.stderr)
        return INTERRUPTED
    m = result.manifest
    print(f"{result.status}: {result.steps_done} steps in {m.seconds:.1f} s -> {result.run_dir}")
    for concept, targets in (m.targets or {}).items():
        print(f"  {concept}: targets " + ", ".join(f"{w} {p:.2f}" for w, p in targets))
    if m.neighbour_picks is not None:
        n = m.neighbour_picks
        print(f"  picks that are real neighbours: {n['share']:.2f} (last quarter {n['share_last_quarter']:.2f}, "
              f"chance {n['chance']:.2f})")
    if result.status == "done" and "pgd_num_steps" in get_method(args.method).options and args.target_check_images:
        from ...erasure.preservation import check_target_preservation, notes

        record = check_target_preservation(bundle, result.run_dir, args.target_check_images)
        for concept, entry in record.items():
            print(f"  {concept}: top-1 target {entry['target']} keeps G {entry['G_after']:.2f} "
                  f"({entry['images']} images)")
        for line in notes(record):
            print(f"  note: {line}")
    return 0


class StopOnCtrlC:
    """While active, a first Ctrl-C asks the run to stop after its current step (it then writes a
    checkpoint that --resume continues exactly); a second one interrupts at once."""

    def __init__(self):
        self._pressed = False

    def pressed(self) -> bool:
        return self._pressed

    def _on_sigint(self, signum, frame):
        if self._pressed:
            raise KeyboardInterrupt
        self._pressed = True

    def __enter__(self):
        self._before = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._before)


def started_threads(out: Path) -> int | None:
    """The CPU thread count a stopped run started with, so that its resumed steps sum in the same order."""
    from ...runs import CorruptRunError, RunManifest

    try:
        return RunManifest.read(out, finished=False).cpu_threads
    except CorruptRunError:  # no manifest yet (a killed process): the rule decides
        return None


def claim_run_folder(out: Path, resume: bool, force: bool) -> None:
    """An existing --out is continued (--resume) or replaced (--force, only if it is a run folder), never
    silently overwritten; ``erase`` itself locks the folder against a second process."""
    from ...runs import MANIFEST

    if resume or not out.exists() or not any(p.name != ".lock" for p in out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --resume to continue the run in it, "
                              f"--force to replace it, or choose another --out")
    if not ((out / MANIFEST).is_file() or (out / "checkpoint").is_dir()):
        raise FileExistsError(f"{out} holds files that are not a run; --force replaces only a run folder")
    import shutil

    shutil.rmtree(out)
