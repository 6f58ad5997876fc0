"""The method registry: each erasure method registers its name, config and runner.

The CLI's ``--method`` choices and flags, the explorer's method and preset lists, and the manifest
all read this registry; adding a built-in method touches its own module (and its tests) plus one
registration in ``erasure/__init__.py``. ``docs/erasure.md`` ("Adding a method") shows a complete example.

The registry, the configs and the presets import no torch: a runner may be given as ``"module:function"``
and is imported by its method's first run, so that ``age-explorer erase --help`` and the explorer's
lists do not load torch and diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ..named_import import import_named

if TYPE_CHECKING:
    import torch

    from ..bundle import ModelBundle


@dataclass
class MethodResult:
    """What a runner hands back: the weights it changed and what the manifest records."""

    status: str  # "done" or "stopped"
    steps_done: int
    changed: dict[str, torch.Tensor]  # name -> new value (CPU)
    originals: dict[str, torch.Tensor]  # name -> value before the run, for the changed names
    extra: dict = field(default_factory=dict)  # method-specific manifest fields
    history: list[dict] = field(default_factory=list)  # one row per step
    pi_history: list[dict] = field(default_factory=list)  # {"step", "concept", "pi": {candidate: p}} snapshots


class Runner(Protocol):
    def __call__(self, bundle: ModelBundle, config, run_dir: Path, callbacks: list | None,
                 stop: Callable[[], bool] | None, resume: bool) -> MethodResult: ...


@dataclass(frozen=True)
class Method:
    name: str  # the CLI's --method value and the manifest's "method"
    display_name: str  # what the explorer shows
    config: type  # the config dataclass (fields with help metadata, validated on construction)
    # the runner, or where it lives: "module:function", a module relative to this package when it
    # starts with a dot (".age:run_age"), imported when the method first runs
    runner: Runner | str
    summary: str  # one line for help texts

    # ---- capabilities, read from the config's fields so that no caller names a method -------------
    @property
    def options(self) -> frozenset[str]:
        """The config's field names: what a form or a flag may set for this method."""
        return frozenset(f.name for f in fields(self.config))

    @property
    def fine_tuned(self) -> bool:
        """Trained for a number of model steps (``iterations``); False for a closed-form edit."""
        return "iterations" in self.options

    @property
    def checkpointable(self) -> bool:
        """Writes resumable checkpoints (``checkpoint_every``) a background job can stop and resume at."""
        return "checkpoint_every" in self.options

    def load_runner(self) -> Runner:
        if not isinstance(self.runner, str):
            return self.runner
        return import_named(self.runner, __package__, f"method {self.name!r}: runner", "module:function")


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.config.method != method.name:
        raise ValueError(f"method {method.name!r}: its config class says {method.config.method!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
