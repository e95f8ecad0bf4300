"""A real cloud for the collab tests: `edgelmm serve` with the bundled shapes-vlm-s on 127.0.0.1,
and the same model as the edge, in process. Faulty clouds are real HTTP servers too (`FaultyCloud`):
one on loopback that fails the way a broken cloud does."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from edgelmm import ModelSpec  # noqa: E402
from edgelmm.backends.registry import load  # noqa: E402
from edgelmm.serve import BackgroundServer, build  # noqa: E402

MODEL = "shapes-vlm-s"


@pytest.fixture(scope="session")
def cloud() -> Iterator[BackgroundServer]:
    app, engine = build(ModelSpec(path=MODEL, device="cpu"))
    with BackgroundServer(app) as server:
        yield server
    engine.close()


@pytest.fixture(scope="session")
def cloud_url(cloud) -> str:
    return cloud.url + "/v1"


@pytest.fixture(scope="session")
def edge_backend():
    backend = load(ModelSpec(path=MODEL, device="cpu"))
    yield backend
    backend.close()


class FaultyCloud:
    """A loopback HTTP server that lists the model and then fails every generation request: with a
    status (`status`), by never answering (`hang`), or by closing the connection without an answer
    (`drop`, what a cloud killed mid-request does)."""

    def __init__(self, mode: str = "status", status: int = 503, model: str = MODEL):
        self.mode, self.status, self.calls = mode, status, 0
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, code: int, data: dict) -> None:
                body = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                owner.calls += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if owner.mode == "hang":
                    owner.stop.wait(60)
                    return
                if owner.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._json(owner.status, {"error": {"message": "the cloud is failing", "type": "server_error"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyCloud:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"
