"""Where the shipped data lives.

The embedded model and concept data sit in ``assets/`` at the project root. ``AGE_EXPLORER_ASSETS``
points elsewhere (for example a copy outside the source tree).
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_ENV = "AGE_EXPLORER_ASSETS"


def assets_dir() -> Path:
    override = os.environ.get(ASSETS_ENV)
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "assets"
    if not path.is_dir():
        raise FileNotFoundError(
            f"assets folder not found at {path}. Install the project from its source tree "
            f"(`pip install -e .`) or set {ASSETS_ENV} to a folder holding the shipped assets."
        )
    return path


def toy_model_dir() -> Path:
    return assets_dir() / "toyworld"
