"""Where the metrics' network weights come from: local files only, never a download.

A metric whose weights are missing raises :class:`Unavailable`, whose message starts with
``not available:`` and says how to get them; the evaluation records it and goes on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


class Unavailable(Exception):
    """A metric that cannot run here; its message says how to get it."""


def checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder, where torchvision and pytorch-fid keep downloaded weights
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_checkpoint(names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` present in the checkpoint folder."""
    for name in names:
        path = checkpoints_dir() / name
        if path.is_file():
            return path
    return None


def package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package (so its own
    imports, e.g. torchvision for ``lpips``, need not work here)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, *parts)
        if path.is_file():
            return path
    return None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save`` (tensors only: nothing else is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise Unavailable(f"not available: {path} is not a readable weights file ({type(err).__name__}); "
                          f"remove it and copy it again") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Unavailable(f"not available: {path} holds no state dict of tensors; remove it and copy it again")
    return state


def load_checked(module: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    """Load ``state`` into ``module``: every tensor of the module must be in it (extra ones are ignored)."""
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        first = (missing or wrong)[0]
        raise Unavailable(f"not available: {path} is not {what} ({'no' if missing else 'a wrong shape of'} "
                          f"{first}); remove it and copy the right file")
    module.load_state_dict({k: state[k] for k in own}, strict=False)


