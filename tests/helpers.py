"""Small helpers shared by tests that start servers."""

import json
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job(client, job_id: str, deadline_s: float = 300) -> dict:
    """Poll a page job through ``/job_status`` until it is done, failed or cancelled; its status."""
    deadline = time.time() + deadline_s
    while (status := json.loads(client.predict(job_id, api_name="/job_status")))["status"] not in (
            "done", "failed", "cancelled"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    return status
