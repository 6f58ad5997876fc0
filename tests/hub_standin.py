"""A local HTTP stand-in for the parts of the Hugging Face Hub API that an upload uses."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.repos: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, data) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = self._body()
                owner.requests.append({"method": "POST", "path": self.path,
                                       "authorization": self.headers.get("Authorization"), "body": body})
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or data.get('namespace', 'user')}/{data['name']}" \
                        if "/" not in data["name"] else data["name"]
                    owner.repos.append(repo)
                    return self._reply(200, {"url": f"{owner.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            owner.files[value["path"]] = base64.b64decode(value["content"])
                    repo = re.split(r"/api/(?:models|spaces)/", self.path)[1].split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{owner.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                             "success": True})
                return self._reply(404, {"error": f"unexpected POST {self.path}"})

            def do_GET(self):
                owner.requests.append({"method": "GET", "path": self.path,
                                       "authorization": self.headers.get("Authorization"), "body": b""})
                if "/revision/" in self.path or self.path.startswith(("/api/models/", "/api/spaces/")):
                    return self._reply(200, {"id": "x", "sha": "1" * 40, "siblings": []})
                return self._reply(404, {"error": f"unexpected GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
