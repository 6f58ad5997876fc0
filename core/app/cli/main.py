"""The ``age-explorer`` entry point: the parser assembled from the command modules, and one-line errors."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# name -> module of this package; each defines HELP and add_arguments(parser)
COMMANDS = ("generate", "erase", "graph", "analyse", "export", "jobs", "attack", "evaluate", "toyworld", "bench")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line that points at --help, not the whole usage block; subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    """The parser of every command; only the flags of ``commands`` are built, because some read the
    engine's registries (torch and diffusers imports) that ``--help`` and the other commands do not need."""
    parser = OneLineParser(prog="age-explorer", description=(
        "See and steer concept erasure in text-to-image diffusion models (AGE, ESD, UCE)."))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __package__)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if name in commands:
            module.add_arguments(command)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option (the top level has only --help)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    # the libraries' own log lines (tokenizer length, optional processors) would add lines to one-line
    # messages; the project warns about what matters itself. A user's setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser([chosen_command(argv)]).parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when redirected to a log
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        # the garbage collector's notes on libraries' unclosed sockets and loops are not the user's to act on
        warnings.filterwarnings("ignore", category=ResourceWarning)
        from tqdm.auto import tqdm

        from ...bundle import PromptWarning

        warnings.filterwarnings("always", category=PromptWarning)
        # tqdm.write keeps a warning off the line of a running progress bar
        warnings.showwarning = lambda msg, cat, *a, **k: tqdm.write(f"warning: {msg}", file=sys.stderr)
        try:
            return args.func(args)
        except KeyboardInterrupt:  # Ctrl-C: one line, with what to do next where the command knows it
            hint = getattr(args, "on_interrupt", None)
            print("interrupted" + (f": {hint(args)}" if hint else ""), file=sys.stderr)
            return 130
        # input, file and network errors are one line; FloatingPointError: a diverged loss
        except (ValueError, OSError, RuntimeError, KeyError, ArithmeticError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

