"""The checks config dataclasses run on construction (erasure methods, attacks, evaluation, the
sampler's options), one copy each, so that the CLI and the app refuse bad values with the same line.
Imports nothing heavy: ``--help`` builds flags from configs that use these."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import field, fields

MAX_TEXT_CHARS = 500  # a concept or target; the text encoder reads 77 tokens anyway


def short(text: str, n: int = 40) -> str:
    """``text`` for a message: its first ``n`` characters, so an error never repeats a huge input."""
    text = str(text)
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def check_text(name: str, text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{name} {short(text)} is too long: at most {MAX_TEXT_CHARS} characters")


def check_range(name: str, value, lo: float, hi: float) -> None:
    """``value`` is a finite number in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ValueError(f"{name} must be a finite number from {lo:g} to {hi:g}, got {value!r}")


def check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_count(name: str, value, lo: int, hi: int) -> None:
    """``value`` is a whole number in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi:,}, got {short(value)}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_choice(name: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")


def check_template(name: str, template: str, placeholder: str) -> None:
    if placeholder not in template:
        raise ValueError(f"{name} must contain {placeholder}, got {short(template)}")


def help_field(text: str | Callable[[], str], default, choices: tuple | None = None):
    """A config field with its help text (the CLI flag's and the app's), or a function giving it when a
    registry's current entries belong in it; a list or dict default is copied for each instance.
    ``choices``: the values a form offers for it (the config still checks them on construction)."""
    metadata = {"help": text} if choices is None else {"help": text, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def help_text(config_field) -> str:
    text = config_field.metadata.get("help", "")
    return text() if callable(text) else text


def field_help(config_class) -> dict[str, str]:
    """Each field's help text, by field name."""
    return {f.name: help_text(f) for f in fields(config_class)}
