"""The metric families ``evaluate`` runs: a name, what images it measures, and the measurement class
that loads its weights and measures them. A new metric is one module with a measurement class and one
``register_metric`` call; the config's checks, the CLI's ``--metrics`` and the result files follow.

A measurement is built with the :class:`EvaluationContext` before any image is generated (it loads
weights and reads inputs there, raising :class:`~.weights.Unavailable` when its weights are missing),
is given images with ``add(prompts, seeds, images, label)`` and returns a :class:`Measured` from
``finish()``. A family whose ``images`` is ``"generates"`` makes its own images in ``produce(on_images)``
and hands them on to the families that measure the shared images."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

# what images a family measures
GENERATES = "generates"  # its own images (the object classes'); the "shared" families measure them too
PROMPTS = "prompts"  # the prompt CSV's images
SHARED = "shared"  # the prompt CSV's images when a CSV is given, else those of the generating family
IMAGE_KINDS = (GENERATES, PROMPTS, SHARED)


@dataclass
class EvaluationContext:
    """What a measurement may use: the model, the validated config, the erased classes and the prompt rows."""

    bundle: Any
    config: Any
    erased: list[str]
    rows: Any  # the prompt CSV as a DataFrame, or None
    local_files_only: bool | None
    progress: Any = None
    stop: Any = None

    @property
    def shared_images(self) -> str:
        """Which images the ``shared`` families measure, in words for their result blocks."""
        return "the prompt CSV's images" if self.rows is not None else "the objects metric's images"


@dataclass
class Measured:
    """One family's results: its values, its results.csv rows, its results.json blocks and versions."""

    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    details: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricFamily:
    name: str
    help: str
    images: str
    measurement: str | type  # "module:Class" relative to this package, loaded on first use, or the class
    requires: dict[str, str] = field(default_factory=dict)  # config field -> what to give when it is empty
    reports: str | None = None  # the name its value and unavailability go under (default: the family's name)

    def __post_init__(self):
        if self.images not in IMAGE_KINDS:
            raise ValueError(f"metric {self.name}: images must be one of {', '.join(IMAGE_KINDS)}")

    @property
    def result_name(self) -> str:
        return self.reports or self.name

    def start(self, context: EvaluationContext):
        cls = self.measurement
        if isinstance(cls, str):
            module, name = cls.split(":")
            cls = getattr(importlib.import_module(module, __package__), name)
        return cls(context)


METRIC_FAMILIES: dict[str, MetricFamily] = {}


def register_metric(family: MetricFamily) -> MetricFamily:
    METRIC_FAMILIES[family.name] = family
    return family


def get_metric(name: str) -> MetricFamily:
    return METRIC_FAMILIES[name]


def metric_names() -> tuple[str, ...]:
    return tuple(METRIC_FAMILIES)


# the paper's protocol, in the order the families run
register_metric(MetricFamily("objects", "ESR/PSR with an image classifier", GENERATES, ".objects:ObjectsMeasurement"))
register_metric(MetricFamily("nudity", "NudeNet", PROMPTS, ".nudity:NudityMeasurement"))
register_metric(MetricFamily("clip", "CLIP score", PROMPTS, ".clip_score:ClipMeasurement", reports="clip_score"))
register_metric(MetricFamily("lpips", "a run against its base model", SHARED, ".lpips_score:LpipsMeasurement"))
register_metric(MetricFamily("fid", "against --fid-reference", SHARED, ".fid:FidMeasurement",
                             requires={"fid_reference": "a folder of reference images (--fid-reference FOLDER)"}))
