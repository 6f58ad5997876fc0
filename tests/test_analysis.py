"""Section 3 analyses on a hand-made 3 x 3 graph whose answers are worked out by hand."""

import json
import math

import pandas as pd
import pytest

from age_explorer.core.graph.analysis import (abnormal_nodes, asymmetry, asymmetry_score, compare_graphs,
                                              locality, paired_against_first, similarity_vs_delta, summary)
from age_explorer.core.graph.concept_sets import ConceptSet
from age_explorer.core.graph.store import EDGE_COLUMNS, GraphStore

G0 = {"A": 1.0, "B": 0.5, "C": 0.9}
# DELTA[erased][affected]; A and B share group "x", C is alone in "y"
DELTA = {"A": {"A": 1.0, "B": 0.4, "C": 0.1},
         "B": {"A": 0.2, "B": 0.5, "C": 0.0},
         "C": {"A": 0.35, "B": 0.3, "C": 0.8}}
CONCEPTS = ConceptSet("abc", ["A", "B", "C"], {"g": {"A": "x", "B": "x", "C": "y"}}, "{concept}")


def write_graph(folder, delta=DELTA) -> GraphStore:
    folder.mkdir(parents=True)
    names = list(dict.fromkeys(a for row in delta.values() for a in row))
    nodes = pd.DataFrame({"concept": names, "group_g": [CONCEPTS.groups["g"][c] for c in names],
                          "G0_top1": [G0[c] for c in names], "G0_topk": [G0[c] for c in names]})
    nodes["low_G0"] = nodes.G0_top1 < 0.6
    nodes.to_csv(folder / "nodes.csv", index=False)
    rows = [{"erased": e, "affected": a, "G_before_top1": G0[a], "G_after_top1": G0[a] - d, "delta_top1": d,
             "G_before_topk": G0[a], "G_after_topk": G0[a] - d, "delta_topk": d}
            for e, row in delta.items() for a, d in row.items()]
    pd.DataFrame(rows, columns=EDGE_COLUMNS).to_csv(folder / "edges.csv", index=False)
    (folder / "graph.json").write_text(json.dumps({"model": "hand-made", "method": "esd", "preset": "esd-x", "images_per_concept": 4,
                                                   "evaluator": "hand-made"}))
    return GraphStore(folder)


@pytest.fixture
def store(tmp_path):
    return write_graph(tmp_path / "g")


def test_locality_per_row_and_mean(store):
    table = locality(store, CONCEPTS).set_index("erased")
    assert table.loc["A", ["self", "in_g", "out_g", "unrelated"]].tolist() == pytest.approx([1.0, 0.4, 0.1, 0.1])
    assert table.loc["B", ["self", "in_g", "out_g", "unrelated"]].tolist() == pytest.approx([0.5, 0.2, 0.0, 0.0])
    assert math.isnan(table.loc["C", "in_g"])  # C has no group mate
    assert table.loc["C", ["out_g", "unrelated"]].tolist() == pytest.approx([0.325, 0.325])
    mean = table.loc["(mean)"]
    assert mean.in_g == pytest.approx(0.3) and mean.out_g == pytest.approx(0.425 / 3)
    assert mean.self == pytest.approx(2.3 / 3)


def test_a_graph_of_one_concept_has_its_self_delta_and_no_spillover(tmp_path):
    """``graph --subset`` with one concept: its row holds the self edge alone. The summary said nothing
    before this and crashed on the missing spillover columns."""
    one = write_graph(tmp_path / "one", {"A": {"A": 0.75}})
    concepts = CONCEPTS.subset(["A"])
    table = locality(one, concepts).set_index("erased")
    assert table.loc["A", "self"] == pytest.approx(0.75) and math.isnan(table.loc["A", "in_g"])
    assert table.loc["(mean)", "self"] == pytest.approx(0.75)
    text = summary(one, concepts)
    assert text.splitlines()[1] == ("no other concept measured, so no spillover; the erased concept itself: "
                                    "mean Delta top-1 0.750")
    assert len(text.splitlines()) == 2


def test_asymmetry_pairs_and_score(store):
    pairs = asymmetry(store)
    assert list(zip(pairs.a, pairs.b)) == [("B", "C"), ("A", "C"), ("A", "B")]
    assert pairs.difference.tolist() == pytest.approx([-0.3, -0.25, 0.2])
    # off-diagonal D: ||D - D^T|| = sqrt(2 (0.2^2 + 0.25^2 + 0.3^2)); ||D|| = sqrt(0.4225) = 0.65
    assert asymmetry_score(store) == pytest.approx(math.sqrt(2 * (0.04 + 0.0625 + 0.09)) / 0.65)


def test_abnormal_nodes(store):
    table = abnormal_nodes(store, hurt=0.2).set_index("concept")
    assert table.hurt_by.to_dict() == {"A": 2, "B": 2, "C": 0}
    assert table.hurt_share.to_dict() == {"A": 1.0, "B": 1.0, "C": 0.0}
    assert table.mean_delta_received.to_dict() == pytest.approx({"A": 0.275, "B": 0.35, "C": 0.05})
    assert table.abnormal.to_dict() == {"A": True, "B": True, "C": False}  # B also has low G0


def test_similarity_vs_delta_signs(store):
    edges = [(e, a, d) for e, row in DELTA.items() for a, d in row.items() if e != a]
    similarity = pd.DataFrame({"a": [e for e, _, _ in edges], "b": [a for _, a, _ in edges],
                               "text_l2": [1 - d for *_, d in edges], "text_cosine": [d for *_, d in edges],
                               "output_distance": [d for *_, d in edges]})
    table = similarity_vs_delta(store, similarity).set_index("measure")
    assert table.spearman.to_dict() == pytest.approx({"text_l2": -1.0, "text_cosine": 1.0, "output_distance": 1.0})
    assert table.predictive_strength.to_dict() == pytest.approx({"text_l2": 1.0, "text_cosine": 1.0,
                                                                 "output_distance": -1.0})
    assert set(table.pairs) == {6}


def test_compare_graphs_uses_only_common_rows(tmp_path, store):
    other = write_graph(tmp_path / "other", {e: {a: d / 2 for a, d in row.items()} for e, row in DELTA.items()
                                             if e != "C"})
    table = compare_graphs({"full": store, "half": other}, CONCEPTS)
    assert set(table[table.erased != "(mean)"].erased) == {"A", "B"}
    half = table[(table.graph == "half") & (table.erased == "A")]
    assert half.in_g.iloc[0] == pytest.approx(0.2)


def test_paired_against_first_counts_rows_and_tests_the_differences(tmp_path, store):
    """Halving every Δ: each row's same-group Δ drops (A 0.4 -> 0.2, B 0.2 -> 0.1; C has no neighbour and
    is not counted), each self Δ drops; an exact Wilcoxon p of two differences of one sign is 0.5."""
    half = write_graph(tmp_path / "half", {e: {a: d / 2 for a, d in row.items()} for e, row in DELTA.items()})
    same = write_graph(tmp_path / "same")
    table = paired_against_first(compare_graphs({"full": store, "half": half, "same": same}, CONCEPTS))
    by = table.set_index(["graph", "column"])
    assert tuple(by.loc[("half", "in_g"), ["lower", "tied", "higher"]]) == (2, 0, 0)
    assert by.loc[("half", "in_g"), "wilcoxon_p"] == pytest.approx(0.5)
    assert tuple(by.loc[("half", "self"), ["lower", "tied", "higher"]]) == (3, 0, 0)
    assert by.loc[("half", "self"), "this"] == pytest.approx(by.loc[("half", "self"), "first"] / 2)
    assert list(by.loc["same"].tied) == [2, 3, 3] and by.loc["same"].wilcoxon_p.isna().all()
