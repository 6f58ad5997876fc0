import json

import networkx as nx
import pandas as pd
import pytest

from age_explorer.core.graph import sweep
from age_explorer.core.graph.analysis import abnormal_nodes, asymmetry, locality, similarity_measures, similarity_vs_delta, summary
from age_explorer.core.graph.capability import CapabilitySpec
from age_explorer.core.graph.concept_sets import load_concept_set, read_csv
from age_explorer.core.graph.store import GraphMismatchError, GraphStore
from age_explorer.core.graph.sweep import RowRecipe, build_graph
from tests.tiny_models import TOY_ROW_OPTIONS

SUBSET = ["red circle", "blue circle", "red square"]
TINY_SPEC = CapabilitySpec(images_per_concept=4, seed=5, steps=5)
TINY_RECIPE = RowRecipe("esd", "toy-esd", TOY_ROW_OPTIONS)




@pytest.fixture(scope="module")
def toy_subset(toy_bundle):
    return load_concept_set("toy", toy_bundle).subset(SUBSET)


def test_sweep_on_a_subset_writes_correct_files(toy_bundle, toy_subset, tmp_path):
    store = build_graph(toy_bundle, toy_subset, tmp_path / "g", TINY_RECIPE, TINY_SPEC, progress=False, log=lambda m: None)
    nodes, edges, meta = store.nodes(), store.edges(), store.meta()
    assert list(nodes.concept) == SUBSET
    assert set(nodes.columns) >= {"group_shape", "group_colour", "G0_top1", "G0_topk", "low_G0"}
    assert len(edges) == 9 and sorted(set(edges.erased)) == sorted(SUBSET)
    assert ((edges.delta_top1 - (edges.G_before_top1 - edges.G_after_top1)).abs() < 1e-9).all()
    assert meta["method"] == "esd" and meta["images_per_concept"] == 4 and meta["seeds"] == [5, 6, 7, 8]
    assert meta["template"] == "a photo of a {concept}" and meta["evaluator"] == "toy"
    assert set(meta["row_seconds"]) == set(SUBSET)
    graph = store.to_networkx()
    assert isinstance(graph, nx.DiGraph) and graph.number_of_nodes() == 3 and graph.number_of_edges() == 6
    # Pandas reads the files as they are.
    assert pd.read_csv(tmp_path / "g" / "edges.csv").shape == (9, 8)
    loc = locality(store, toy_subset)
    assert {"in_shape", "out_shape", "in_colour", "out_colour", "unrelated"} <= set(loc.columns)
    assert len(asymmetry(store)) == 3
    assert set(abnormal_nodes(store).concept) == set(SUBSET)
    sim = similarity_measures(toy_bundle, toy_subset)
    assert len(sim) == 6 and (sim.text_l2 > 0).all()
    corr = similarity_vs_delta(store, sim)
    assert set(corr.measure) == {"text_l2", "text_cosine", "output_distance"}
    text = summary(store, toy_subset, sim)
    assert "locality" in text and "asymmetry" in text and "abnormal" in text and "predicts" in text
    # the explorer's drawings of a graph are cached by its version, which a new row changes
    version = store.version()
    assert store.version() == version
    store.add_row("red circle", edges[edges.erased == "red circle"].assign(delta_top1=0.5))
    assert store.version() != version


def test_killed_sweep_resumes_without_redoing_rows(toy_bundle, toy_subset, tmp_path, monkeypatch):
    calls = []
    real = sweep.compute_row

    def counting(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "compute_row", counting)

    def die_after_first_row(message):
        if message.startswith("row "):
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        build_graph(toy_bundle, toy_subset, tmp_path / "g", TINY_RECIPE, TINY_SPEC, progress=False,
                    log=die_after_first_row)
    assert GraphStore(tmp_path / "g").rows_done() == ["red circle"]
    first = GraphStore(tmp_path / "g").edges()
    store = build_graph(toy_bundle, toy_subset, tmp_path / "g", TINY_RECIPE, TINY_SPEC, progress=False, log=lambda m: None)
    assert calls == ["red circle", "blue circle", "red square"]  # red circle ran once
    edges = store.edges()
    assert len(edges) == 9 and not edges.duplicated(["erased", "affected"]).any()
    pd.testing.assert_frame_equal(edges[edges.erased == "red circle"].reset_index(drop=True), first)


@pytest.mark.slow
def test_ray_backend_gives_the_same_rows_as_local(toy_bundle, toy_subset, tmp_path, one_thread):
    pytest.importorskip("ray")
    local = build_graph(toy_bundle, toy_subset, tmp_path / "local", TINY_RECIPE, TINY_SPEC, progress=False, log=lambda m: None)
    remote = build_graph(toy_bundle, toy_subset, tmp_path / "ray", TINY_RECIPE, TINY_SPEC, backend="ray",
                         progress=False, log=lambda m: None)
    key = ["erased", "affected"]
    a = local.edges().sort_values(key).reset_index(drop=True)
    b = remote.edges().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_ray_rows_take_one_gpu_each_when_there_are_several():
    """On a Ray cluster with (declared) GPUs, a graph of a model on a GPU starts one row worker per GPU and
    Ray gives each its own device: no GPU is needed to check the scheduling."""
    import os

    ray = pytest.importorskip("ray")
    from age_explorer.core.graph.sweep import MEASURE_PARTS, ray_worker_plan

    assert ray_worker_plan({"CPU": 16.0, "GPU": 4.0}, True, 25) == (4, {"num_cpus": 1, "num_gpus": 1})
    assert ray_worker_plan({"CPU": 2.0}, False, 25) == (2, {"num_cpus": 1, "num_gpus": 0})
    assert ray_worker_plan({"CPU": 16.0, "GPU": 8.0}, True, 1)[0] == MEASURE_PARTS  # no more than the parts

    class Probe:
        def devices(self):
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False, log_to_driver=False)
    try:
        n_workers, resources = ray_worker_plan(ray.available_resources(), True, 25)
        workers = [ray.remote(**resources)(Probe).remote() for _ in range(n_workers)]
        seen = ray.get([w.devices.remote() for w in workers], timeout=120)
    finally:
        ray.shutdown()
    assert n_workers == 3
    assert sorted(str(ids[0]) for ids, _ in seen) == ["0", "1", "2"]
    assert sorted(visible for _, visible in seen) == ["0", "1", "2"]  # each worker's "cuda" is its own GPU


@pytest.mark.parametrize("content, message", [
    ("name,group\nred circle,circle\n", "no 'concept' column"),
    ("concept\nred circle\nRed Circle\n", "lists 'Red Circle' twice"),
    ("", "no concepts"),
    ("concept\n", "no concepts"),
    ("concept,imagenet_index\nchurch,church\n", "must be an integer in 0..999"),
])
def test_malformed_concept_csvs_are_rejected(tmp_path, content, message):
    path = tmp_path / "set.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_csv(path, "user")


def test_user_csv_and_builtin_sets(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("concept,group\nchurch,buildings\nchapel,buildings\ndog,animals\n")
    cs = load_concept_set(str(path))
    assert cs.concepts == ["church", "chapel", "dog"] and cs.related("church", "group") == ["chapel"]
    netfive = load_concept_set("netfive")
    assert len(netfive.concepts) == 25 and netfive.imagenet_index["Saxophone"] == 776
    assert netfive.imagenet_index["Clumber Spaniel"] == 216 and netfive.imagenet_index["Bassoon"] == 432
    assert len(load_concept_set("imagenette").concepts) == 10
    with pytest.raises(FileNotFoundError, match="nor an existing CSV"):
        load_concept_set(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("field, other", [
    ("model", "CompVis/stable-diffusion-v1-4"),
    ("model_revision", "toy-000000000000"),  # an earlier training of the toy model
])
def test_graph_folder_from_another_model_is_rejected(toy_bundle, toy_subset, tmp_path, field, other):
    folder = tmp_path / "g"
    build_graph(toy_bundle, toy_subset, folder, TINY_RECIPE, TINY_SPEC, rows=["red circle"], progress=False, log=lambda m: None)
    meta = json.loads((folder / "graph.json").read_text())
    assert meta["model_revision"] == toy_bundle.revision
    meta[field] = other
    (folder / "graph.json").write_text(json.dumps(meta))
    with pytest.raises(GraphMismatchError, match=f"made differently.*{field}"):
        build_graph(toy_bundle, toy_subset, folder, TINY_RECIPE, TINY_SPEC, progress=False, log=lambda m: None)


def test_compare_graphs_on_the_rows_both_have():
    from age_explorer.core.graph.analysis import compare_graphs, compare_summary
    from age_explorer.core.graph.concept_sets import ConceptSet
    from age_explorer.core.paths import assets_dir

    stores = {name: GraphStore(assets_dir() / "graphs" / name) for name in ("toy-esd", "toy-age")}
    concept_set = ConceptSet.from_dict(stores["toy-esd"].meta()["concept_set"])
    table = compare_graphs(stores, concept_set)
    shared = set(stores["toy-esd"].rows_done()) & set(stores["toy-age"].rows_done())
    assert len(table) == 2 * len(shared) and set(table.erased) == shared
    age = locality(stores["toy-age"], concept_set).set_index("erased")
    rows = table[table.graph == "toy-age"].set_index("erased")
    assert (rows.in_shape - age.loc[rows.index].in_shape).abs().max() < 1e-12
    summary_table = compare_summary(table).set_index("graph")
    esd_rows = table[table.graph == "toy-esd"].set_index("erased").loc[rows.index]
    assert summary_table.loc["toy-age", "in_colour_lower"] == int((rows.in_colour < esd_rows.in_colour - 1e-9).sum())
    assert summary_table.loc["toy-esd", "rows"] == len(shared)


def test_the_shipped_graphs_carry_their_umap_and_it_is_read_without_umap():
    """The UMAP view's cache: each shipped graph's umap.csv covers its concepts and is read without
    importing umap-learn (whose first use compiles for minutes)."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from age_explorer.core.graph.embedding_map import read_map\n"
             "from age_explorer.core.graph.store import GraphStore\n"
             "from age_explorer.core.paths import assets_dir\n"
             "for name in ('toy-esd', 'toy-age', 'toy-age-damage'):\n"
             "    store = GraphStore(assets_dir() / 'graphs' / name)\n"
             "    coords = read_map(store.folder, list(store.nodes().concept), store.meta())\n"
             "    assert coords is not None and coords.shape == (len(store.nodes()), 2), name\n"
             "print('umap' in sys.modules, 'numba' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"


def test_a_umap_cache_of_other_concepts_or_another_model_is_not_used(tmp_path):
    import numpy as np

    from age_explorer.core.graph.embedding_map import UMAP_TABLE, read_map, write_map

    meta = {"model": "toy", "model_revision": "toy-14dcaf843ec3"}
    concepts = ["red circle", "blue circle", "red square"]
    coords = np.array([[0.0, 1.0], [2.5, -1.0], [3.0, 0.25]])
    write_map(tmp_path, concepts, [f"a photo of a {c}" for c in concepts], coords, meta)
    assert np.allclose(read_map(tmp_path, concepts, meta), coords)
    assert np.allclose(read_map(tmp_path, concepts[::-1], meta), coords[::-1])  # in the graph's order
    assert read_map(tmp_path, concepts[:2], meta) is None
    assert read_map(tmp_path, concepts + ["green ring"], meta) is None
    assert read_map(tmp_path, concepts, {**meta, "model_revision": "toy-000000000000"}) is None
    (tmp_path / UMAP_TABLE).write_text("concept,x,y\nred circle,nan,1\n")
    assert read_map(tmp_path, ["red circle"], meta) is None
    assert read_map(tmp_path / "missing", concepts, meta) is None


def test_the_graph_command_on_one_concept_measures_its_self_delta(tmp_path, capsys):
    """``graph --subset`` with one concept (how one row is rechecked at other seeds) ends with its summary;
    it used to write the row and then stop on a traceback in the summary."""
    from age_explorer.core.app.cli.main import main

    out = tmp_path / "one"
    assert main(["graph", "--model", "toy", "--concepts", "toy", "--subset", "red circle", "--method", "esd",
                 "--preset", "toy-esd", "--options", json.dumps(TOY_ROW_OPTIONS), "--images-per-concept", "2",
                 "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 rows in" in printed and "no other concept measured, so no spillover" in printed
    assert list(GraphStore(out).edges().affected) == ["red circle"]
