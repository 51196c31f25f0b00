"""Slow clients over raw sockets, for the read-timeout tests of the web and XML-RPC ports.

``Slowloris`` opens connections, sends each its ``prefix`` and then one byte every ``every``
seconds (``every=None``: nothing more, an idle connection), from one thread, and records when the
server closed each one and the first bytes it answered.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time


class Slowloris:
    def __init__(
        self, port: int, count: int, prefix: bytes, every: float | None = 2.0, source: str = "127.0.0.1"
    ) -> None:
        self.port, self.count, self.prefix, self.every, self.source = port, count, prefix, every, source
        self.socks: list[socket.socket] = []
        self.closed_at: dict[int, float] = {}
        self.answers: dict[int, bytes] = {}
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((self.source, 0))
            sock.connect(("127.0.0.1", self.port))
            if self.prefix:
                sock.sendall(self.prefix)
            sock.setblocking(False)
            self.socks.append(sock)
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for number, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, number)
        next_send = time.monotonic() + (self.every or 0)
        while not self._stop.is_set() and len(self.closed_at) < self.count:
            for key, _ in selector.select(0.1):
                number, sock = key.data, key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if data:
                    self.answers[number] = self.answers.get(number, b"") + data
                else:
                    self.closed_at[number] = time.monotonic() - self.started
                    selector.unregister(sock)
            if self.every is not None and time.monotonic() >= next_send:
                next_send += self.every
                for number, sock in enumerate(self.socks):
                    if number not in self.closed_at:
                        with contextlib.suppress(OSError):
                            sock.send(b"a")
        selector.close()

    def wait_all_closed(self, timeout: float) -> list[float]:
        """Seconds after the start at which the server closed each connection (fails past ``timeout``)."""
        deadline = self.started + timeout
        while len(self.closed_at) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        open_ = self.count - len(self.closed_at)
        assert not open_, f"{open_} of {self.count} slow connections still open after {timeout} s"
        return sorted(self.closed_at.values())


def timed(call: object, bound: float) -> float:
    """Run ``call()``; fail unless it returns within ``bound`` seconds. Returns the seconds taken."""
    started = time.monotonic()
    call()  # type: ignore[operator]
    took = time.monotonic() - started
    assert took < bound, f"{call} took {took:.2f} s (bound {bound} s)"
    return took
