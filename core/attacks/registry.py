"""The attack registry: each recovery attack registers its name, config and implementation.

The CLI's ``attack`` flags (one per config field), the explorer's attack list, the job store and the
graphs' recovery layer read this registry; a new attack is one module with its config and class,
registered with :func:`register_attack`. Like the method registry it imports no torch: the
implementation may be named ``"module:Class"`` and is imported by the attack's first run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

from ..named_import import import_named

if TYPE_CHECKING:
    from .common import AttackTarget, Probe
    from .config import AttackConfig


class Attack(Protocol):
    """What an attack implements. ``learn`` returns the probes to generate from (hidden states with
    seeds), what it learned (JSON-able, for the result file) and tensors to save beside it."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    depends_on_weights: ClassVar[bool]  # False: its probes on the base model are the erased model's

    def learn(self, target: AttackTarget, concept: str, config: AttackConfig,
              progress: Callable[[str, int, int], None] | None = None,
              stop: Callable[[], bool] | None = None) -> tuple[list[Probe], dict, dict]: ...


@dataclass(frozen=True)
class AttackType:
    name: str  # the CLI's --attack value and the result's "attack"
    config: type  # the config dataclass (fields with help metadata, validated on construction)
    # the Attack class, or "module:Class" (relative to this package when it starts with a dot)
    implementation: type | str
    summary: str  # one line for help texts

    def load(self) -> type[Attack]:
        if not isinstance(self.implementation, str):
            return self.implementation
        return import_named(self.implementation, __package__, f"attack {self.name!r}: implementation", "module:Class")


ATTACKS: dict[str, AttackType] = {}


def register_attack(attack: AttackType) -> AttackType:
    if attack.config.attack != attack.name:
        raise ValueError(f"attack {attack.name!r}: its config class says {attack.config.attack!r}")
    ATTACKS[attack.name] = attack
    return attack


def get_attack(name: str) -> AttackType:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def make_attack_config(attack: str, **options):
    """A validated config of ``attack``; unknown options are an error, ``None`` values keep the default."""
    cls = get_attack(attack).config
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {attack} option(s): {', '.join(unknown)}")
    return cls(**{k: v for k, v in options.items() if v is not None})
