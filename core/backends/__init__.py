"""Model backends: what differs between model families, behind one interface, and their registry.

A backend knows how to recognise and load its models, its latent codec (latents <-> images), its
vocabulary and neighbour relation when it has closed ones, its default evaluator and its default
presets. Everything else (sampling, erasure, graphs, runs, export, jobs) is written once against
:class:`~age_explorer.core.bundle.ModelBundle` and never names a backend.

Adding a model family is one module that subclasses :class:`Backend` and calls
:func:`register_backend`; the built-in ones are imported on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..bundle import ModelBundle

_REGISTRY: dict[str, type["Backend"]] = {}
# module paths of the built-in backends, imported lazily so that importing the engine stays cheap
_BUILT_IN = ("age_explorer.core.toyworld.backend", "age_explorer.core.backends.stable_diffusion",
             "age_explorer.core.backends.stable_diffusion_xl")


class Backend:
    """One model family. Class attributes describe the family; a loaded bundle holds an instance."""

    name: ClassVar[str]
    folder_hint: ClassVar[str]  # what a model folder of the family holds, for error messages
    # method -> preset used when none is given (e.g. {"age": "toy"}); empty: the method's defaults
    default_presets: ClassVar[dict[str, str]] = {}
    # presets named "<prefix>" or "<prefix>-..." are the family's own (e.g. toy-esd); None: the paper's SD presets
    preset_prefix: ClassVar[str | None] = None
    # steps between preview images written by a background erasure (0: none; they cost a generation)
    preview_every: ClassVar[int] = 0
    # the side of one image in a labelled before/after sheet (small models' images are drawn crisp at 64)
    sheet_image_px: ClassVar[int] = 128
    # whether the family ships its own classifier for G(c) (then it is the default evaluator, named after it)
    has_evaluator: ClassVar[bool] = False
    # the model card of an export: licence (None: the base model's own card's), tags, whether a base
    # model loaded by Hub id is named in the front matter, a note after the base model's name, and how
    # to load a full pipeline export
    card_license: ClassVar[str | None] = None
    card_tags: ClassVar[tuple[str, ...]] = ()
    card_base_on_hub: ClassVar[bool] = True
    card_base_note: ClassVar[str] = ""
    card_pipeline_hint: ClassVar[str] = ""

    @classmethod
    def default_preset(cls, method: str) -> str | None:
        """The preset a run of ``method`` on this family starts from when none is given: the family's
        entry in ``default_presets``, else the method's preset named ``<prefix>-<method>`` (``toy-ca``)
        or, for a family without a prefix, ``<method>`` itself (the paper's SD recipe), when it exists."""
        from ..erasure.config import PRESETS

        if method in cls.default_presets:
            return cls.default_presets[method]
        name = f"{cls.preset_prefix}-{method}" if cls.preset_prefix else method
        return name if name in PRESETS and PRESETS[name][0] == method else None

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def claims(cls, source: str, path: Path | None) -> bool:
        """Whether ``source`` (a name, or ``path`` when it is an existing folder) is one of this family's."""
        raise NotImplementedError

    @classmethod
    def load(cls, source: str, path: Path | None, device: torch.device, dtype: torch.dtype,
             local_files_only: bool, revision: str | None) -> "ModelBundle":
        raise NotImplementedError

    @classmethod
    def weights_revision(cls, source: str) -> str | None:
        """The revision of a model's weights, read without loading it (None when unknown)."""
        return None

    # ---- prompt states and the UNet's conditioning inputs ---------------------------------------------
    # "Prompt states" are one tensor (B, tokens, D) per batch of prompts: whatever the family's UNet is
    # conditioned on, packed so that the engine can concatenate, expand, slice and mix them like hidden
    # states. These four methods are the only places that know what the packing holds; the two after
    # them say which tokenizers and text encoders make them.
    def encode_prompts(self, bundle: "ModelBundle", prompts: list[str]) -> torch.Tensor:
        """Prompt states of a batch of prompts (by default the text encoder's last hidden states)."""
        ids = bundle.tokenize(prompts).to(bundle.device)
        return bundle.text_encoder(ids)[0].to(bundle.dtype)

    def unconditional_states(self, bundle: "ModelBundle") -> torch.Tensor:
        """The (1, tokens, D) states of classifier-free guidance's unconditional branch (the empty prompt)."""
        return bundle.encode([""])

    def unet_kwargs(self, bundle: "ModelBundle", states: torch.Tensor) -> dict:
        """The keyword arguments of a UNet call conditioned on ``states``."""
        return {"encoder_hidden_states": states}

    def cross_attention_states(self, bundle: "ModelBundle", states: torch.Tensor) -> torch.Tensor:
        """The part of ``states`` that the cross-attention keys and values read (B, tokens, D)."""
        return states

    def text_encoders(self, bundle: "ModelBundle") -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) of every text encoder whose outputs make the prompt states, in the
        order ``encode_prompts`` reads them (what the recovery attacks learn input embeddings of)."""
        return [(bundle.tokenizer, bundle.text_encoder)]

    def set_tokenizers(self, bundle: "ModelBundle", tokenizers: list) -> None:
        """Make ``tokenizers`` (one per text encoder, in ``text_encoders``' order) the ones
        ``encode_prompts`` uses."""
        (bundle.tokenizer,) = tokenizers

    # ---- the latent codec ---------------------------------------------------------------------------
    def decode(self, bundle: "ModelBundle", latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, bundle: "ModelBundle", images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- vocabulary, neighbours, evaluation ---------------------------------------------------------
    def vocabulary(self, bundle: "ModelBundle") -> list[str] | None:
        """The closed word list of a model that has one; None for open-vocabulary models."""
        return None

    def candidate_vocabulary(self) -> list[str] | None:
        """AGE candidates the family ships (the vocabulary named after the backend); None if none."""
        return None

    def neighbours(self, concept: str) -> set[str] | None:
        """Candidates related to ``concept`` (for reporting whether AGE picks neighbours); None if unknown."""
        return None

    def concept_set(self):
        """The family's own concept set (a :class:`~age_explorer.core.graph.concept_sets.ConceptSet`), or None."""
        return None

    def evaluator(self, bundle: "ModelBundle", concept_set):
        """The family's own classifier for G(c) over ``concept_set``, or None to pick a generic one."""
        return None

    def probe_prompts(self, concept: str) -> list[tuple[str, str]] | None:
        """(kind, prompt) probes that ask for ``concept`` without its plain wording, for the prompts
        attack; None: the family has none (a prompts CSV is needed)."""
        return None

    def check_concepts(self, bundle: "ModelBundle", concepts: list[str], target: str | None = None) -> None:
        """Refuse erased concepts, or a fixed target, that the model cannot represent (a closed
        vocabulary); open models accept all."""

    def concept_images_with_masks(self, bundle: "ModelBundle", concept: str, n: int,
                                  seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``n`` images of ``concept`` (N, 3, H, W) in [0, 1] and the concept's pixels in each (N, 1, H, W)
        in [0, 1], from a family that knows them (e.g. a renderer), for methods that train inside an
        object's mask (MACE); a ValueError of one line when it cannot show ``concept``. None (the default):
        the family has no masks of its own, and the engine segments images the model generates with a
        segmenter from the local Hub cache, or refuses in one line (``core/segmenter.py``)."""
        return None

    # ---- export -------------------------------------------------------------------------------------
    def save_pipeline(self, bundle: "ModelBundle", folder: Path, dtype: torch.dtype | None = None) -> None:
        """Write the erased model as a complete pipeline folder its ecosystem loads, in ``dtype``
        (None: the base model's stored dtype)."""
        raise ValueError(f"the {self.name} backend cannot export a full pipeline")

    @classmethod
    def card_usage(cls, fmt: str) -> list[str]:
        """Markdown lines of a model card saying how to use an export of format ``fmt`` without AGE Explorer."""
        return []


def register_backend(backend: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend known to :func:`load_bundle` and :func:`get_backend`."""
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> dict[str, type[Backend]]:
    """The registered backends in the order they claim models: other backends first (by registration), then
    the built-in ones in ``_BUILT_IN``'s order, whatever order their modules were imported in (Stable
    Diffusion's claims any Hub id, so the toy world's must come first even when SDXL's module is imported
    before it)."""
    for module in _BUILT_IN:
        importlib.import_module(module)
    built_in = sorted((b for b in _REGISTRY.values() if b.__module__ in _BUILT_IN),
                      key=lambda b: _BUILT_IN.index(b.__module__))
    others = [b for b in _REGISTRY.values() if b.__module__ not in _BUILT_IN]
    return {b.name: b for b in others + built_in}


def get_backend(name: str) -> type[Backend]:
    found = backends()
    if name not in found:
        raise ValueError(f"unknown model backend {name!r}; known: {', '.join(found)}")
    return found[name]


def backend_for(source: str, path: Path | None) -> type[Backend] | None:
    """The first backend that claims a model (None: no backend recognises it)."""
    for backend in backends().values():
        if backend.claims(source, path):
            return backend
    return None
