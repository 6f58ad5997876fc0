"""The toy world's concepts, their relatives and prompt templates, read from ``concepts.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ToyConcept:
    name: str
    shape: str
    colour: str
    index: int


@dataclass(frozen=True)
class ToyWorld:
    shapes: tuple[str, ...]
    colours: dict[str, tuple[float, float, float]]
    concepts: tuple[ToyConcept, ...]
    train_templates: tuple[str, ...]
    paraphrase_templates: tuple[str, ...]
    default_template: str
    caption_mix: dict[str, float]
    renderer: dict

    @classmethod
    def from_json(cls, path: str | Path) -> "ToyWorld":
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
                raise ValueError(f"it holds a JSON {kind}, not an object of shapes, colours and templates")
            world = cls._from_data(data)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            what = f"no {err.args[0]!r} entry" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise ValueError(f"{path} is not a toy world's concepts file ({what}); see the shipped "
                             f"assets/toyworld/concepts.json") from None
        if not world.concepts:
            raise ValueError(f"{path} describes no concept: give it at least one shape and one colour")
        return world

    @classmethod
    def _from_data(cls, data: dict) -> "ToyWorld":
        shapes = tuple(data["shapes"])
        colours = {k: tuple(v) for k, v in data["colours"].items()}
        fmt = data["concept_format"]
        concepts = []
        # Shape-major order: concepts of one shape group are contiguous, as NetFive's groups are.
        for shape in shapes:
            for colour in colours:
                name = fmt.format(colour=colour, shape=shape)
                concepts.append(ToyConcept(name, shape, colour, len(concepts)))
        return cls(
            shapes=shapes,
            colours=colours,
            concepts=tuple(concepts),
            train_templates=tuple(data["train_templates"]),
            paraphrase_templates=tuple(data["paraphrase_templates"]),
            default_template=data["default_template"],
            caption_mix=dict(data["caption_mix"]),
            renderer=dict(data["renderer"]),
        )

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def concept(self, name: str) -> ToyConcept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"unknown toy concept {name!r}; known concepts: {', '.join(self.names)}")

    def same_shape(self, name: str) -> list[str]:
        c = self.concept(name)
        return [o.name for o in self.concepts if o.shape == c.shape and o.name != name]

    def same_colour(self, name: str) -> list[str]:
        c = self.concept(name)
        return [o.name for o in self.concepts if o.colour == c.colour and o.name != name]

    def unrelated(self, name: str) -> list[str]:
        c = self.concept(name)
        return [o.name for o in self.concepts if o.shape != c.shape and o.colour != c.colour]

    def prompt(self, name: str, template: str | None = None) -> str:
        return (template or self.default_template).format(c=name)

    def vocabulary(self) -> list[str]:
        """Every word a training caption can contain, in a stable order."""
        words: list[str] = []
        for template in self.train_templates:
            for word in template.replace("{c}", " ").split():
                if word not in words:
                    words.append(word)
        return words + list(self.colours) + list(self.shapes)
