"""``ZeroCopyProtocol`` on a real uvicorn over loopback: the ``macpacs.sendfiles`` extension is
offered on plain HTTP and sends the files' bytes exactly, counted against Content-Length.

It reaches into uvicorn's httptools protocol (``RequestResponseCycle.send``), so this test is
what notices an uvicorn upgrade that changes those internals.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import ClassVar

import requests
import uvicorn

from macpacs.pacs_server.web.zerocopy import SENDFILES, ZeroCopyProtocol
from tests.conftest import free_port


class _RecordingProtocol(ZeroCopyProtocol):
    """Keeps each connection's socket, to look at its state after a response."""

    sockets: ClassVar[list[socket.socket]] = []

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.sockets.append(self.transport.get_extra_info("socket"))


def test_sendfiles_extension_on_real_uvicorn(tmp_path: Path):
    """Exact bytes, twice on one keep-alive connection; and the sender gives the connection back
    to the event loop as it found it: non-blocking, with TCP_NODELAY (it runs blocking and with
    Nagle on while the files go out)."""
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    files[0].write_bytes(bytes(range(256)) * 4096)  # 1 MB
    files[1].write_bytes(b"xyz" * 1000)
    offered: list[bool] = []
    states: list[tuple[bool, int]] = []

    async def app(scope, receive, send):
        offered.append(SENDFILES in scope.get("extensions", {}))
        parts = [(b"<a>", files[0], files[0].stat().st_size), (b"<b>", files[1], 10)]
        length = sum(len(p) + n for p, _f, n in parts) + len(b"<end>")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % length)]})
        await send({"type": SENDFILES, "parts": parts, "trailer": b"<end>", "more_body": False})
        sock = _RecordingProtocol.sockets[-1]
        states.append((os.get_blocking(sock.fileno()), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=_RecordingProtocol, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with requests.Session() as session:  # twice on one keep-alive connection
            for _ in range(2):
                r = session.get(f"http://127.0.0.1:{port}/", timeout=10)
                assert r.status_code == 200
                assert r.content == b"<a>" + files[0].read_bytes() + b"<b>" + b"xyzxyzxyzx" + b"<end>"
        assert offered == [True, True]
        # The app notes the state once the sending thread has returned, which can be just after
        # the client has the last byte.
        deadline = time.monotonic() + 10
        while len(states) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert states == [(False, 1), (False, 1)]
    finally:
        server.should_exit = True
        thread.join(10)
