"""Concept sets: the concepts of a graph, their groups, prompt template and how G is classified.

Built in: a model backend's own set (the toy world's 25 shapes x colours, grouped by shape and by
colour, as ``toy``), ``netfive`` (25 ImageNet classes in 5 groups) and ``imagenette`` (10 classes), the latter two with explicit ImageNet class
indices (never name matching: ImageNet says "clumber", "sax"...). A user set is a CSV with a
``concept`` column and optional ``group`` and ``imagenet_index`` columns.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import assets_dir

DEFAULT_TEMPLATE = "a photo of {concept}"


@dataclass
class ConceptSet:
    name: str
    concepts: list[str]
    groups: dict[str, dict[str, str]]  # grouping name -> concept -> group label
    template: str = DEFAULT_TEMPLATE
    imagenet_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.concepts:
            raise ValueError(f"concept set {self.name!r} is empty")
        seen: set[str] = set()
        for c in self.concepts:
            if not c.strip():
                raise ValueError(f"concept set {self.name!r} has an empty concept name")
            if c.lower() in seen:
                raise ValueError(f"concept set {self.name!r} lists {c!r} twice")
            seen.add(c.lower())
        if "{concept}" not in self.template:
            raise ValueError(f"prompt template must contain {{concept}}, got {self.template!r}")

    def prompt(self, concept: str) -> str:
        return self.template.format(concept=concept)

    def group_of(self, concept: str, grouping: str) -> str | None:
        return self.groups.get(grouping, {}).get(concept)

    def related(self, concept: str, grouping: str) -> list[str]:
        label = self.group_of(concept, grouping)
        return [c for c in self.concepts if c != concept and label is not None and self.group_of(c, grouping) == label]

    def subset(self, concepts: list[str]) -> "ConceptSet":
        missing = [c for c in concepts if c not in self.concepts]
        if missing:
            raise ValueError(f"not in concept set {self.name!r}: {', '.join(missing)}")
        return ConceptSet(self.name, list(concepts),
                          {g: {c: m[c] for c in concepts if c in m} for g, m in self.groups.items()},
                          self.template, {c: i for c, i in self.imagenet_index.items() if c in concepts})

    def to_dict(self) -> dict:
        return {"name": self.name, "concepts": self.concepts, "groups": self.groups, "template": self.template,
                "imagenet_index": self.imagenet_index}

    @classmethod
    def from_dict(cls, data: dict) -> "ConceptSet":
        """The set a graph recorded (``graph.json``'s ``concept_set``)."""
        return cls(data["name"], data["concepts"], data["groups"], data["template"], data.get("imagenet_index", {}))


def load_concept_set(name: str, bundle=None, template: str | None = None) -> ConceptSet:
    """The model's own set (named after its backend, e.g. ``toy``; needs ``bundle``), ``netfive``,
    ``imagenette``, or a CSV path."""
    own = bundle.backend.concept_set() if bundle is not None and name == bundle.kind else None
    if own is not None:
        cs = own
    elif name in ("netfive", "imagenette"):
        cs = read_csv(assets_dir() / "concept_sets" / f"{name}.csv", name)
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"concept set {name!r}: not the model's own set, netfive, imagenette, "
                                    f"nor an existing CSV file")
        cs = read_csv(path, path.stem)
    if template:
        cs.template = template
        cs.__post_init__()
    return cs


def read_csv(path: Path, name: str) -> ConceptSet:
    """A CSV with a ``concept`` column and optional ``group`` / ``imagenet_index`` columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file") from err
    if not rows:
        raise ValueError(f"{path} has no concepts (an empty file, or a header only)")
    if "concept" not in columns:
        raise ValueError(f"{path} has no 'concept' column (columns: {', '.join(c for c in columns if c) or 'none'})")
    concepts = [(r["concept"] or "").strip() for r in rows]
    groups: dict[str, dict[str, str]] = {}
    if "group" in columns:
        groups["group"] = {c: (r["group"] or "").strip() for c, r in zip(concepts, rows) if (r["group"] or "").strip()}
    index: dict[str, int] = {}
    if "imagenet_index" in columns:
        for c, r in zip(concepts, rows):
            value = (r["imagenet_index"] or "").strip()
            if value:
                if not value.isdigit() or not 0 <= int(value) < 1000:
                    raise ValueError(f"{path}: imagenet_index of {c!r} must be an integer in 0..999, got {value!r}")
                index[c] = int(value)
    return ConceptSet(name, concepts, groups, imagenet_index=index)
