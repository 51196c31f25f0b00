"""Header and body read timeouts on the web port: uvicorn has neither.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection that
has sent part of a request waits for the rest forever, and so does one that never sends anything.
``TimedProtocol`` (passed as ``http=`` to ``uvicorn.Config``) is ``ZeroCopyProtocol`` plus the
deadlines of ``request_deadline``: the headers from the connection's first byte (or its opening),
then the body. While uvicorn itself has paused reading (the application has not taken the body
so far, or a pipelined request waits its turn) the client is not the one late, so the body's
clock starts again. Past a deadline the client gets ``408 Request Timeout`` (when no answer has
started) and the connection is closed; the application, if it was reading the body, sees the
client disconnect. Asyncio connections cost no thread, so slow clients hold no worker: these
timeouts bound the descriptors and buffers they hold.
"""

from __future__ import annotations

import asyncio
import logging

from ..request_deadline import BODY_S, HEADER_S, MIN_RATE, Deadline, SlowClientReport
from .zerocopy import ZeroCopyProtocol

log = logging.getLogger(__name__)
_REPORT = SlowClientReport(log, "web")
_TIMEOUT_BODY = b"request not received in time\n"
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class TimedProtocol(ZeroCopyProtocol):
    """uvicorn's protocol with a deadline while a request's headers or body are being received."""

    _deadline: Deadline | None = None
    _phase = "idle"  # "headers", "body" or "idle" (answering, or waiting between requests)
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start("headers", Deadline.headers())

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._start("headers", Deadline.headers())  # the next request on a kept-alive connection
        if self._deadline is not None:
            self._deadline.received(len(data))
        super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._start("body", Deadline.body())

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._start("idle", None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._start("idle", None)
        super().connection_lost(exc)

    def _start(self, phase: str, deadline: Deadline | None) -> None:
        self._phase, self._deadline = phase, deadline
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_later(max(0.0, deadline.remaining()), self._check)

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport.is_closing():
            return
        if self.flow.read_paused:  # we stopped reading, not the client: its clock starts again
            self._start(self._phase, Deadline.body())
            return
        remaining = deadline.remaining()
        if remaining > 0:  # extended by what arrived meanwhile
            self._timer = self.loop.call_later(remaining, self._check)
            return
        limit = HEADER_S if self._phase == "headers" else BODY_S
        client = self.client[0] if self.client else "?"
        _REPORT.closed(client, f"request {self._phase} not in within {limit:g} s at {MIN_RATE:g} bytes/s")
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_ANSWER)
        self._phase, self._deadline = "idle", None
        self.transport.close()
