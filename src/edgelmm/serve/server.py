"""Start the server: `run_server` in the foreground (the CLI), `BackgroundServer` in a thread
(tests and benchmarks, which talk to it over loopback like any client)."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError, MissingExtraError
from edgelmm.serve.schemas import Limits


def _uvicorn() -> Any:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("the OpenAI-compatible server", "serve", exc.name or "fastapi") from None
    return uvicorn


def _media_dir(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise EdgelmmError(f"--allowed-local-media-path {folder}: not a folder", "give an existing folder of images")
    return folder.resolve()


def build(spec: ModelSpec, backend: str = "torch", api_key: str | None = None, local_media_dir: str | Path | None = None,
          limits: Limits | None = None, served_name: str | None = None, wrap: Callable[[Any], Any] | None = None,
          ) -> tuple[Any, Any]:
    """(app, engine): the model loaded into `backend` (methods in spec.methods applied at load);
    local image files are read only under `local_media_dir`. `wrap` puts another engine with the
    Engine's interface in front of it (`edgelmm collab serve`: routing); one with an `attach(app)`
    method is handed the app once it exists."""
    _uvicorn()
    from edgelmm.backends.registry import load
    from edgelmm.serve.app import ServerConfig, create_app
    from edgelmm.serve.engine import Engine

    limits = limits or Limits()
    media_dir = _media_dir(local_media_dir)
    engine = Engine(load(spec, backend), limits.max_batch_size, limits.max_queue, limits.max_context)
    if wrap is not None:
        engine = wrap(engine)
    config = ServerConfig(served_name or spec.display_name, api_key, media_dir, limits)
    app = create_app(engine, config)
    if hasattr(engine, "attach"):
        engine.attach(app)
    return app, engine


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_address(host: str, port: int) -> None:
    """The address can be bound: checked before the model loads, so a port in use fails in a second."""
    if not 1 <= port <= 65535:
        raise EdgelmmError(f"--port {port} is not a TCP port", "use a port in 1..65535, e.g. 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EdgelmmError(f"--host {host}: cannot resolve it ({exc.strerror})", "use an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise EdgelmmError(f"cannot listen on {host}:{port}: {exc.strerror}",
                               "is another server running there? pick another --port") from None


def run_server(spec: ModelSpec, backend: str = "torch", host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, local_media_dir: str | Path | None = None, limits: Limits | None = None,
               served_name: str | None = None, log_level: str = "info", wrap: Callable[[Any], Any] | None = None,
               access_log: bool = True) -> None:
    """Serve until interrupted. Binding beyond loopback without an API key gets a warning; the
    address is checked before the model loads."""
    uvicorn = _uvicorn()
    check_address(host, port)
    limits = limits or Limits()
    app, engine = build(spec, backend, api_key, local_media_dir, limits, served_name, wrap)
    if not _is_loopback(host) and api_key is None:
        print(f"edgelmm: warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                    **connection_limits(limits))
    finally:
        engine.close()
        engine.backend.close()


def connection_limits(limits: Limits) -> dict[str, Any]:
    """uvicorn's settings for `limits`: connections past max_connections get 503 at once."""
    return {"limit_concurrency": limits.max_connections, "timeout_keep_alive": 5}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """`with BackgroundServer(app) as server: httpx.get(server.url + "/health")` — loopback only."""

    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1"):
        uvicorn = _uvicorn()
        self.host, self.port = host, port or free_port(host)
        server = getattr(app.state, "server", None)  # an edgelmm app; any other ASGI app gets the default limits
        limits = server.config.limits if server is not None else Limits()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2, **connection_limits(limits)))
        self.thread = threading.Thread(target=self.server.run, name="edgelmm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise EdgelmmError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
