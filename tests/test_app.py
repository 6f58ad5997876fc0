import socket

import pytest
from gradio_client import Client

from explorer.app import Settings, build_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    demo = build_app(Settings(model="toy", device="cpu", data_dir=str(tmp_path_factory.mktemp("data"))))
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    demo.explorer.worker.stop(5)


def test_app_generates_through_the_server(server):
    client = Client(server, verbose=False)
    result = client.predict("a green triangle", "0-2", "original", api_name="/generate")
    assert len(result) == 3
    assert [item["caption"] for item in result] == ["seed 0", "seed 1", "seed 2"]


def test_app_reports_bad_seeds(server):
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="below the start"):
        client.predict("a green triangle", "5-1", "original", api_name="/generate")
