"""Where the shipped data lives.

The embedded model and concept data are the package data ``age_explorer.assets`` (the folder ``assets/``
of the source tree), found with ``importlib.resources`` in a wheel and in an editable install alike.
``AGE_EXPLORER_ASSETS`` points elsewhere (for example a copy outside the package).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ASSETS_ENV = "AGE_EXPLORER_ASSETS"


def assets_dir() -> Path:
    override = os.environ.get(ASSETS_ENV)
    # the shipped assets are plain files on disk (never zipped), so the resource path is a real folder
    path = Path(override) if override else Path(str(resources.files("age_explorer.assets")))
    if not path.is_dir():
        raise FileNotFoundError(
            f"assets folder not found at {path}. Reinstall age-explorer, "
            f"or set {ASSETS_ENV} to a folder holding the shipped assets."
        )
    return path


def toy_model_dir() -> Path:
    return assets_dir() / "toyworld"


def shipped_graph_dirs() -> list[Path]:
    """The shipped concept graphs (``assets/graphs/<name>`` holding a ``graph.json``), by name."""
    return sorted(p.parent for p in (assets_dir() / "graphs").glob("*/graph.json"))
