"""Read deadlines for requests on the web and XML-RPC ports, so that a slow client holds nothing for long.

A client that sends one header byte every few seconds (slowloris) never trips a socket timeout,
which only measures the gap between two bytes. The rule here is Apache's ``mod_reqtimeout``
(``header=10-30,MinRate=500 body=10,MinRate=500``), applied by both ports:

- the request line and headers must be in within ``HEADER_S`` seconds, extended by one second
  per ``MIN_RATE`` bytes received, to at most ``HEADER_MAX_S``;
- the body then gets ``BODY_S`` seconds, extended the same way, without a cap: a large upload at
  a steady rate is never cut, a trickle is.

A connection past its deadline is answered ``408 Request Timeout`` and closed. The log gets one
line per minute and port saying how many were closed, not one line per connection: a flood of
slow clients must not flood the log too.
"""

from __future__ import annotations

import logging
import threading
import time

HEADER_S = 10.0
HEADER_MAX_S = 30.0
BODY_S = 10.0
MIN_RATE = 500.0  # bytes per second
REPORT_EVERY_S = 60.0


class Deadline:
    """When a request's current part (headers, or body) must be complete; ``received`` extends it."""

    def __init__(self, initial: float, cap: float | None = None, now: float | None = None) -> None:
        start = time.monotonic() if now is None else now
        self.at = start + initial
        self.cap = None if cap is None else start + cap

    @classmethod
    def headers(cls, now: float | None = None) -> Deadline:
        return cls(HEADER_S, HEADER_MAX_S, now)

    @classmethod
    def body(cls, now: float | None = None) -> Deadline:
        return cls(BODY_S, None, now)

    def received(self, count: int) -> None:
        self.at += count / MIN_RATE
        if self.cap is not None:
            self.at = min(self.at, self.cap)

    def remaining(self, now: float | None = None) -> float:
        return self.at - (time.monotonic() if now is None else now)


class SlowClientReport:
    """Counts connections closed for being slow, and logs them at most once per ``REPORT_EVERY_S``."""

    def __init__(self, logger: logging.Logger, port_name: str) -> None:
        self.log = logger
        self.port_name = port_name
        self._lock = threading.Lock()
        self._count = 0
        self._peers: set[str] = set()
        self._next = 0.0

    def closed(self, peer: str, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if len(self._peers) < 5:
                self._peers.add(peer)
            if now < self._next:
                return
            count, peers = self._count, sorted(self._peers)
            self._count, self._peers, self._next = 0, set(), now + REPORT_EVERY_S
        self.log.warning(
            "%s: closed %d connection(s) that did not send a complete request in time (%s; from %s). "
            "One is a client on a slow link; many at once are a client holding connections open on "
            "purpose: find it by address",
            self.port_name,
            count,
            what,
            ", ".join(peers),
        )
