"""The AGE-vs-ESD comparison shares its measurements with concept graphs."""

import pandas as pd
import pytest

from age_explorer.core.app.experiments.toy_compare import compare
from age_explorer.core.graph.capability import CapabilitySpec
from age_explorer.core.graph.concept_sets import load_concept_set
from age_explorer.core.graph.store import GraphStore
from age_explorer.core.graph.sweep import RowRecipe, build_graph

SPEC = CapabilitySpec(images_per_concept=2, seed=3, steps=3)
QUICK = {"iterations": 2, "batch_size": 1}


@pytest.mark.slow
def test_compare_rows_are_graph_rows_and_a_graph_sweep_completes_them(toy_bundle, tmp_path, one_thread):
    results = compare(toy_bundle, tmp_path, concepts=["red circle"], variants=["ESD ''", "AGE (paper search)"],
                      spec=SPEC, overrides=QUICK, log=lambda m: None)
    assert list(results.variant) == ["ESD ''", "AGE (paper search)"]
    esd = GraphStore(tmp_path / "graphs" / "esd")
    assert esd.rows_done() == ["red circle"] and len(esd.edges()) == 25
    row = esd.edges().set_index("affected")
    world = toy_bundle.backend.world
    same_shape = sum(row.delta_top1[c] for c in world.same_shape("red circle")) / 4
    assert results.delta_same_shape.iloc[0] == same_shape
    assert (tmp_path / "graphs" / "age-paper-search" / "edges.csv").is_file()

    # `age-explorer graph` with the same recipe and measurement continues the compare's graph
    logs = []
    build_graph(toy_bundle, load_concept_set("toy", toy_bundle), tmp_path / "graphs" / "esd",
                RowRecipe("esd", "toy-esd", {"target": "", **QUICK}), SPEC, rows=["red circle", "blue circle"],
                progress=False, log=logs.append)
    assert [m.split(":")[0] for m in logs] == ["row blue circle"]
    assert sorted(esd.rows_done()) == ["blue circle", "red circle"]

    # a re-run reuses everything: no new erasure, same table
    again = compare(toy_bundle, tmp_path, concepts=["red circle"], variants=["ESD ''", "AGE (paper search)"],
                    spec=SPEC, overrides=QUICK, log=lambda m: None)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), pd.read_csv(tmp_path / "comparison.csv"))
