"""The paper's evaluation protocol, one module per metric family, each registered in ``registry``:
``objects`` (ESR/PSR with an image classifier), ``nudity`` (NudeNet on an I2P-format prompt CSV),
``clip_score``, ``lpips_score`` (a run against its base model) and ``fid`` (against a folder of
reference images), whose network weights ``weights`` finds in local caches only; ``results`` writes
and compares result folders. The entry that runs them on a model or a run is
:func:`age_explorer.core.app.evaluate.evaluate`."""

from .config import EvaluationConfig
from .registry import METRIC_FAMILIES, MetricFamily, get_metric, metric_names, register_metric

__all__ = ["METRIC_FAMILIES", "EvaluationConfig", "MetricFamily", "get_metric", "metric_names", "register_metric"]
