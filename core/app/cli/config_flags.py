"""Command-line flags generated from config dataclasses: one flag per field, its help from the field's
``help`` metadata, its type from the field's annotation.

Flags default to None ("not given"), so that a preset or the config's own default fills what the user
left out; the config validates the values when it is built, so a flag knows no bounds or choices of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from ...checks import help_text


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def json_object(text: str) -> dict:
    """An argparse type: a JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def _flag_kind(annotation) -> dict:
    """argparse keywords for a field's type: bool -> --x/--no-x, list -> repeat the flag, dict -> JSON."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))  # X | None -> X
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        item = (typing.get_args(annotation) or (str,))[0]
        return {"action": "append", "type": item}
    if origin is dict:
        return {"type": json_object, "metavar": "JSON"}
    if origin in (int, float, str):
        return {"type": origin}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def _default_text(field: dataclasses.Field) -> str | None:
    if field.default is dataclasses.MISSING or field.default is None:
        return None  # a list's empty default or "none" says nothing
    return repr(field.default) if isinstance(field.default, str) else str(field.default)


def add_config_flags(parser: argparse.ArgumentParser, configs: dict[str, type], *, skip: set[str] = frozenset(),
                     aliases: dict[str, list[str]] | None = None, required: set[str] = frozenset()) -> list[str]:
    """Add one flag per field of the ``configs`` (label -> dataclass); a field several configs share gets
    one flag whose help names each config's help and default where they differ. ``aliases`` are extra
    spellings of a field's flag; ``skip`` leaves fields to the caller. Returns the fields that got a flag."""
    aliases = aliases or {}
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    kinds: dict[str, dict] = {}
    for label, config in configs.items():
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            if field.name in skip:
                continue
            kind = _flag_kind(hints[field.name])
            if kinds.setdefault(field.name, kind) != kind:
                raise TypeError(f"field {field.name!r} has different types in {', '.join(configs)}")
            owners.setdefault(field.name, []).append((label, field))
    for name, owned in owners.items():
        helps = {help_text(f) for _, f in owned}
        defaults = {label: _default_text(f) for label, f in owned}
        if len(helps) == 1:
            text = helps.pop()
        else:
            text = "; ".join(f"{label}: {help_text(f)}" for label, f in owned)
        if len(set(defaults.values())) == 1:
            default = next(iter(defaults.values()))
            text += f" (default {default})" if default is not None else ""
        else:
            text += " (defaults: " + ", ".join(f"{label} {d}" for label, d in defaults.items() if d is not None) + ")"
        if len(owned) < len(configs):
            text += f" [{', '.join(label for label, _ in owned)}]"
        parser.add_argument(flag_name(name), *aliases.get(name, []), dest=name, default=None,
                            required=name in required, help=text.replace("%", "%%"), **kinds[name])
    return list(owners)


def given_values(args: argparse.Namespace, names: list[str]) -> dict:
    """The fields among ``names`` that the user set on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
