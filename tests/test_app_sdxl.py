"""The explorer on an SDXL model (a tiny random SDXL folder), driven through gradio_client against a
real server: generate, the before / after of a run, its spillover row measured into the page's graph,
an evaluation and a recovery attack, all judged by a tiny CLIP classifier over a three-concept set (the
SD default, a Hub ResNet-50, has no weights here); and `age-explorer graph` on the same model."""

import json

import pytest
from gradio_client import Client
from PIL import Image

from age_explorer.core.app.cli.main import main
from age_explorer.core.bundle import load_bundle
from age_explorer.core.erasure import erase, make_config
from age_explorer.explorer.app import Settings, build_app
from tests.helpers import free_port, wait_for_job
from tests.tiny_models import TINY_SD_RECIPE

pytestmark = pytest.mark.slow  # a real server and its worker process

CONCEPTS = ["red circle", "cat", "car"]


@pytest.fixture(scope="module")
def concepts_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_concepts") / "three.csv"
    path.write_text("concept\n" + "".join(f"{c}\n" for c in CONCEPTS))
    return path


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir, tiny_clip_dir, concepts_csv, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("sdxl_data")
    # a finished ESD run of the tiny SDXL, where the operator puts runs (DATA/runs/NAME)
    erase(load_bundle(str(tiny_sdxl_dir), device="cpu"),
          make_config("esd", None, concepts=["red circle"], lr=1e-2, **TINY_SD_RECIPE), data_dir / "runs" / "esd-sdxl")
    demo = build_app(Settings(model=str(tiny_sdxl_dir), device="cpu", data_dir=str(data_dir), spillover_images=1,
                              evaluator=f"clip:{tiny_clip_dir}", concept_set=str(concepts_csv)))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "data_dir": data_dir, "demo": demo}
    finally:
        demo.close()
        demo.explorer.worker.stop(10)


@pytest.fixture(scope="module")
def client(server):
    return Client(server["url"], verbose=False)


def test_the_page_serves_an_sdxl_model(server, client):
    assert server["demo"].explorer.model_kind == "stable-diffusion-xl"
    result = client.predict("a red circle", "0-1", "original", api_name="/generate")
    assert [item["caption"] for item in result] == ["seed 0", "seed 1"]
    with Image.open(result[0]["image"]["path"] if isinstance(result[0]["image"], dict) else result[0]["image"]) as image:
        assert image.size[0] >= 16  # the tiny SDXL draws 16 px images


def test_before_after_and_spillover_row_of_an_sdxl_run(server, client):
    runs, _ = client.predict(api_name="/runs")
    label = runs["value"]
    assert label and "red circle" in label and "esd-sdxl" in label
    sheet, legend, pair = client.predict(label, "0-1", api_name="/before_after")
    assert "Columns: original, erased." in legend and "erased: red circle" in legend
    with Image.open(sheet) as picture:
        assert picture.width > 2 * 128 and len(pair) == 2

    bar, message, graphs = client.predict(label, api_name="/spillover")
    assert "Row added to the graph **page-esd**" in message and "1 images per concept" in message
    graph_dir = server["data_dir"] / "graphs" / "page-esd"
    meta = json.loads((graph_dir / "graph.json").read_text())
    assert meta["model_kind"] == "stable-diffusion-xl" and meta["evaluator"].startswith("clip:")
    assert meta["concept_set"]["concepts"] == CONCEPTS
    row = (server["data_dir"] / "runs" / "esd-sdxl" / "spillover.csv").read_text().splitlines()
    assert len(row) == 1 + len(CONCEPTS)
    assert any(str(g).startswith("page-esd") for g in json.dumps(graphs["choices"]).split('"'))


def test_evaluation_and_an_attack_of_an_sdxl_run_in_the_background(client):
    label = client.predict(api_name="/runs")[0]["value"]
    job_id, *_ = client.predict(label, 1, api_name="/evaluate")
    status = wait_for_job(client, job_id, deadline_s=600)
    assert status["status"] == "done", status["error"]
    summary, table = client.predict(label, api_name="/evaluation")
    assert "ESR-1" in summary and "1 images per class" in summary and "classifier clip:" in summary
    assert [row[0] for row in table["data"]] == CONCEPTS

    job_id, *_ = client.predict(label, "perturb", 1, "1000", api_name="/start_attack")
    status = wait_for_job(client, job_id, deadline_s=600)
    assert status["status"] == "done", status["error"]
    past, _, _, summary, _ = client.predict(label, api_name="/attacks")
    assert [value for _, value in past["choices"]] == ["perturb-red-circle"] and "ASR" in summary


def test_graph_command_on_sdxl_for_two_concepts(tiny_sdxl_dir, tiny_clip_dir, tmp_path, capsys):
    two = tmp_path / "two.csv"
    two.write_text("concept\nred circle\ncat\n")
    out = tmp_path / "graph"
    assert main(["graph", "--model", str(tiny_sdxl_dir), "--device", "cpu", "--concepts", str(two), "--method", "esd",
                 "--iterations", "2", "--options", '{"requires_gpu": false, "ddim_steps": 4, "batch_size": 1}',
                 "--evaluator", f"clip:{tiny_clip_dir}", "--images-per-concept", "1", "--steps", "2",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 rows in" in printed and "asymmetry" in printed
    meta = json.loads((out / "graph.json").read_text())
    assert meta["model_kind"] == "stable-diffusion-xl" and meta["preset"] == "sdxl-esd-x"
    assert meta["options"]["requires_gpu"] is False
    edges = (out / "edges.csv").read_text().splitlines()
    assert len(edges) == 1 + 2 * 2
