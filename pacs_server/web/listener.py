"""The web listener: uvicorn serving the FastAPI app in a thread of the archive process.

The socket is bound here (``bind``), in the caller's thread, so that a port in use or a bad TLS
certificate stops ``macpacs serve`` with a clear error instead of dying quietly in a thread;
serving starts later (``start``), once the DICOM listener accepts.
uvicorn installs no signal handlers outside the main thread; the archive's own SIGTERM handler
stops it through ``stop``.

Two things sit outside the FastAPI application, in front of it. ``GET /heartbeat`` is answered
here, on the event loop, from the heartbeat's memory (``heartbeat.py``): it must not wait behind
client work for a worker thread or a database connection, nor depend on the application's
routing and middleware. And the protocol (``request_timeouts.TimedProtocol``) closes connections
whose request headers or body do not arrive in time.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from .. import tls_files
from ..archive import Archive
from ..heartbeat import Heartbeat
from ..tls_files import PemFile
from .app import create_app
from .request_timeouts import TimedProtocol

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


HEARTBEAT_PATH = "/heartbeat"


class _HeartbeatFirst:
    """ASGI app: ``GET /heartbeat`` answered at once on the event loop; anything else to ``app``."""

    def __init__(self, app: Any, heartbeat: Heartbeat) -> None:
        self.app = app
        self.heartbeat = heartbeat

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != HEARTBEAT_PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        snapshot = self.heartbeat.snapshot()
        body = json.dumps(snapshot).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200 if snapshot["ok"] else 503, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})


class _Server(uvicorn.Server):
    """uvicorn's server, noting each turn of its main loop (every 0.1 s) for the heartbeat."""

    last_turn: float | None = None

    async def on_tick(self, counter: int) -> bool:
        self.last_turn = time.monotonic()
        return await super().on_tick(counter)


class WebListener:
    """Start, stop, and (debug fault switch) stop-only-the-listener."""

    def __init__(self, archive: Archive, heartbeat: Heartbeat) -> None:
        self.archive = archive
        self.heartbeat = heartbeat
        archive.stop_web_listener = self.request_exit
        heartbeat.watch("web", self._last_turn)
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.archive.settings.web.tls_cert else "http"

    def bind(self) -> None:
        """Build the app, read the TLS files and bind the port; connections wait in its backlog until ``start``."""
        web = self.archive.settings.web
        app = _HeartbeatFirst(create_app(self.archive), self.heartbeat)
        certfile = keyfile = None
        if web.tls_cert:
            # The files checked as on every TLS port (a passphrase would make OpenSSL prompt on a
            # terminal nobody watches); then uvicorn reads them, by the same expanded paths.
            certfile, keyfile = tls_files.server_files(
                PemFile("web.tls_cert", web.tls_cert), PemFile("web.tls_key", web.tls_key)
            )
        config = uvicorn.Config(
            app,
            # httptools + sendfile for whole-series retrieval (web/zerocopy.py) + read timeouts
            http=TimedProtocol,
            host=web.bind,
            port=web.port,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=5,
            backlog=2048,
            # X-Forwarded-For / -Proto are believed only from the proxies listed in
            # web.forwarded_allow_ips (uvicorn's default would believe any local process).
            proxy_headers=bool(web.forwarded_allow_ips),
            forwarded_allow_ips=web.forwarded_allow_ips or None,
        )
        config.load()
        family = socket.AF_INET6 if ":" in web.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.bind, web.port))
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        self.server = _Server(config)
        self._socket = sock

    def start(self) -> None:
        """Serve the bound port in a thread; returns once uvicorn accepts."""
        web = self.archive.settings.web
        assert self.server is not None and self._socket is not None, "bind() first"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name="web", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web listener did not start (see the log above)")
            time.sleep(0.01)
        log.info("web listener on %s://%s:%d", self.scheme, web.bind, web.port)

    def _last_turn(self) -> float | None:
        server = self.server
        return server.last_turn if server is not None and not server.should_exit else None

    def request_exit(self) -> None:
        """Stop accepting web requests; the rest of the process keeps running."""
        if self.server is not None:
            log.warning("web listener stopping on request")
            self.server.should_exit = True

    def stop(self) -> None:
        if self.thread is None:  # bound, never served
            if self._socket is not None:
                self._socket.close()
            self.server = self._socket = None
            return
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(2.0)
        self.server = None
        self.thread = None
