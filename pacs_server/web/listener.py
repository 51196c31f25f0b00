"""The web listener: uvicorn serving the FastAPI app in a thread of the archive process.

The socket is bound here (``bind``), in the caller's thread, so that a port in use or a bad TLS
certificate stops ``macpacs serve`` with a clear error instead of dying quietly in a thread;
serving starts later (``start``), once the DICOM listener accepts.
uvicorn installs no signal handlers outside the main thread; the archive's own SIGTERM handler
stops it through ``stop``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn

from ..archive import Archive
from ..config import ConfigError
from .app import create_app
from .zerocopy import ZeroCopyProtocol

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class WebListener:
    """Start, stop, and (debug fault switch) stop-only-the-listener."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        archive.stop_web_listener = self.request_exit
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.archive.settings.web.tls_cert else "http"

    def bind(self) -> None:
        """Build the app, read the TLS files and bind the port; connections wait in its backlog until ``start``."""
        web = self.archive.settings.web
        app = create_app(self.archive)
        config = uvicorn.Config(
            app,
            http=ZeroCopyProtocol,  # httptools + sendfile for whole-series retrieval (web/zerocopy.py)
            host=web.bind,
            port=web.port,
            ssl_certfile=web.tls_cert or None,
            ssl_keyfile=web.tls_key or None,
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
        try:
            config.load()  # reads the TLS certificate and key now, in this thread
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"web.tls_cert / web.tls_key cannot be used: {exc}") from None
        family = socket.AF_INET6 if ":" in web.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.bind, web.port))
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        self.server = uvicorn.Server(config)
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
