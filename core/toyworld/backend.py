"""The toy world as a model backend: 25 coloured shapes, a word-level vocabulary, its own classifier.

Its models are the name ``toy`` (the shipped one in the package's assets) or a folder written by
``age-explorer toyworld train``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..backends import Backend, register_backend
from ..bundle import ModelBundle, ModelUnavailableError
from ..paths import toy_model_dir
from .classifier import ToyClassifier
from .concepts import ToyWorld

TOY = "toy"


class ToyEvaluator:
    """The toy classifier over a concept set of toy concepts (the paper's ResNet-50 counterpart)."""

    name = TOY

    def __init__(self, world: ToyWorld, classifier: ToyClassifier, concept_set):
        self.classifier = classifier
        self.to_set = torch.tensor([concept_set.concepts.index(n) if n in concept_set.concepts else -1
                                    for n in world.names])

    def topk(self, images: torch.Tensor, k: int) -> torch.Tensor:
        return self.to_set[self.classifier.topk(images, k)]


@register_backend
class ToyBackend(Backend):
    name = TOY
    folder_hint = "a toy model folder (concepts.json and unet/)"
    default_presets = {"age": "toy", "esd": "toy-esd", "uce": "toy-uce"}
    preset_prefix = "toy"
    preview_every = 50
    sheet_image_px = 64
    has_evaluator = True
    card_license = "apache-2.0"
    card_tags = ("toy-world",)
    card_base_on_hub = False
    card_base_note = " (the AGE Explorer toy world)"

    def __init__(self, world: ToyWorld, classifier: ToyClassifier, manifest: dict, path: Path):
        self.world, self.classifier, self.manifest, self.path = world, classifier, manifest, path

    @staticmethod
    def _folder(source: str) -> Path:
        return toy_model_dir() if source == TOY else Path(source)

    @classmethod
    def claims(cls, source: str, path: Path | None) -> bool:
        if path is None:
            return source == TOY
        return (path / "concepts.json").is_file() and (path / "unet").is_dir()

    @classmethod
    def weights_revision(cls, source: str) -> str | None:
        folder = cls._folder(source)
        manifest = folder / "manifest.json"
        if (folder / "concepts.json").is_file() and manifest.is_file():
            return json.loads(manifest.read_text()).get("revision")
        return None

    @classmethod
    def load(cls, source, path, device, dtype, local_files_only, revision) -> ModelBundle:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        folder = cls._folder(source)
        missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler", "classifier.safetensors",
                               "manifest.json") if not (folder / p).exists()]
        if missing:
            raise ModelUnavailableError(f"toy model folder {folder} is incomplete: missing {', '.join(missing)}. "
                                        f"Re-create it with `age-explorer toyworld train --out {folder}`.")
        manifest = json.loads((folder / "manifest.json").read_text())
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype).to(device).eval()
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
        scheduler_config = dict(DDPMScheduler.from_pretrained(folder / "scheduler").config)
        defaults = manifest.get("sampling_defaults", {})
        backend = cls(ToyWorld.from_json(folder / "concepts.json"),
                      ToyClassifier.load(folder / "classifier.safetensors"), manifest, folder)
        return ModelBundle(
            backend=backend, source=source if source == TOY else str(folder), unet=unet,
            text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config, device=device,
            dtype=dtype, revision=manifest.get("revision"),
            default_steps=int(defaults.get("steps", 25)), default_guidance=float(defaults.get("guidance_scale", 3.0)),
            default_eta=float(defaults.get("eta", 0.0)),
        )

    # ---- latent codec: a lossless pixel unshuffle, no VAE ------------------------------------------
    # .model imports diffusers and transformers: loaded with the model, not with the explorer's page
    def decode(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        from .model import latents_to_images

        return latents_to_images(latents.float())

    def encode_images(self, bundle: ModelBundle, images: torch.Tensor) -> torch.Tensor:
        from .model import images_to_latents

        return images_to_latents(images.to(bundle.device)).to(bundle.dtype)

    # ---- a closed world ------------------------------------------------------------------------------
    def vocabulary(self, bundle: ModelBundle) -> list[str]:
        special = set(bundle.tokenizer.all_special_tokens)
        return [w for w, _ in sorted(bundle.tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if w not in special]

    def candidate_vocabulary(self) -> list[str]:
        # the concepts and the single words (a colour or a shape alone) the toy model was trained on
        world = self.world
        return world.names + list(world.colours) + list(world.shapes)

    def neighbours(self, concept: str) -> set[str] | None:
        """Candidates sharing a shape or a colour with a toy concept (the bare words included)."""
        if concept not in self.world.names:
            return None
        c = self.world.concept(concept)
        return set(self.world.same_shape(concept)) | set(self.world.same_colour(concept)) | {c.shape, c.colour}

    def concept_set(self):
        from ..graph.concept_sets import ConceptSet

        world = self.world
        return ConceptSet(TOY, world.names,
                          {"shape": {c.name: c.shape for c in world.concepts},
                           "colour": {c.name: c.colour for c in world.concepts}},
                          world.default_template.replace("{c}", "{concept}"))

    def evaluator(self, bundle: ModelBundle, concept_set) -> ToyEvaluator:
        return ToyEvaluator(self.world, self.classifier, concept_set)

    def probe_prompts(self, concept: str) -> list[tuple[str, str]] | None:
        """Probes in the toy vocabulary only: held-out templates, word order, the bare words, and the
        concept's neighbours combined."""
        world = self.world
        if concept not in world.names:
            return None
        c = world.concept(concept)
        colour_nbr = world.concept(world.same_colour(concept)[0])  # e.g. red square for red circle
        shape_nbr = world.concept(world.same_shape(concept)[0])  # e.g. green circle
        probes = [("held-out template", t.format(c=concept)) for t in world.paraphrase_templates]
        probes += [("word order", f"{c.shape} {c.colour}"), ("word order", f"a photo of a {c.shape} {c.colour}"),
                   ("bare word", c.colour), ("bare word", c.shape),
                   ("neighbours combined", f"a {c.colour} {colour_nbr.shape} {c.shape}"),
                   ("neighbours combined", f"a {colour_nbr.name} a {shape_nbr.name}")]
        return probes

    def concept_images_with_masks(self, bundle: ModelBundle, concept: str, n: int,
                                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Renders of ``concept`` and each object's exact pixel coverage (the renderer draws them); a bare
        shape or colour ('circle', 'red') renders the concepts that have it."""
        from ..checks import short
        from .render import render_with_masks

        world, word = self.world, concept.strip().lower()
        ids = [c.index for c in world.concepts if word in (c.name, c.shape, c.colour)]
        if not ids:
            raise ValueError(f"the toy renderer cannot draw {short(concept)}: give a toy concept "
                             f"({', '.join(world.names[:3])}, ...), a shape or a colour")
        generator = torch.Generator().manual_seed(seed)
        picks = torch.tensor(ids)[torch.randint(len(ids), (n,), generator=generator)]
        return render_with_masks(world, picks, generator)

    def check_concepts(self, bundle: ModelBundle, concepts: list[str], target: str | None = None) -> None:
        from ..checks import short

        for concept in concepts:
            unknown = bundle.unknown_words(concept)
            if unknown:
                raise ValueError(f"unknown concept {short(concept)} for the toy model (unknown words: "
                                 f"{', '.join(w if len(w) <= 20 else short(w, 20) for w in unknown[:10])}); toy concepts: {', '.join(self.world.names)}")
        unknown = bundle.unknown_words(target or "")
        if unknown:
            raise ValueError(f"the target {short(target)} has words the toy model does not know "
                             f"({', '.join(w if len(w) <= 20 else short(w, 20) for w in unknown[:10])}); its words: {', '.join(self.vocabulary(bundle))}")

    def save_pipeline(self, bundle: ModelBundle, folder: Path, dtype: torch.dtype | None = None) -> None:
        for item in self.path.iterdir():
            if item.name != "unet":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        unet = bundle.unet if dtype is None else bundle.unet.to(dtype)
        unet.save_pretrained(folder / "unet")

    @classmethod
    def card_usage(cls, fmt: str) -> list[str]:
        load = ["from age_explorer.core.bundle import load_bundle",
                "bundle = load_bundle(\"toy\")  # the base; its UNet is a diffusers UNet2DConditionModel"]
        if fmt == "delta":
            apply = ["from safetensors.torch import load_file",
                     "delta = load_file(\"delta.safetensors\")  # the changed UNet tensors' new values, diffusers names",
                     "bundle.unet.load_state_dict(delta, strict=False)"]
        elif fmt == "lora":
            apply = ["bundle.unet.load_lora_adapter(\"FOLDER/diffusers/pytorch_lora_weights.safetensors\", prefix=\"unet\")  # needs peft"]
        else:
            return []
        return ["## Apply it to the toy model's UNet", "", "```python", *load, *apply, "```", ""]
