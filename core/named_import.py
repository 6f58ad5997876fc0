"""Import what a registry names as text: ``"module:name"``, the module relative to the registry's package
when it starts with a dot. Registries name built-ins this way so that reading them loads no torch."""

from __future__ import annotations

import importlib


def import_named(reference: str, package: str, where: str, form: str):
    """The object ``reference`` names; a ValueError that starts with ``where`` when it is not ``form``."""
    module, _, name = reference.partition(":")
    if not module or not name:
        raise ValueError(f"{where} {reference!r} is not {form!r}")
    return getattr(importlib.import_module(module, package), name)
