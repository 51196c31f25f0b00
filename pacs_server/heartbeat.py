"""The server's heartbeat: how long ago each of its parts last showed life, for the supervisor.

A probe that times out cannot say whether a server is hung or only busy. The heartbeat can: it
is answered from memory on the web port's event loop (``GET /heartbeat``, web/listener.py), by no
worker thread and no database connection, so client load does not delay it, and it reports what
the server's own parts last did:

- ``web``: the web event loop's last turn (uvicorn turns it every 0.1 s);
- ``xmlrpc``: the XML-RPC front end's last turn (at least once a second);
- ``index read``: the last read of the index by this module's thread, once a second through the
  server's connection pool (an error, such as a corrupt file, is a read that came back: it is
  reported in ``index_error``, and the corruption handling deals with it, not a restart);
- ``dicom worker N``: each ready DICOM worker's last beat (an index read of its own, then a
  message to the main process, once a second: dimse/workers.py).

A part is stale when it has not shown life for ``STALE_S`` (``INDEX_STALE_S`` for the index read,
which may wait for a pooled connection under load). The answer is 200 with ``"ok": true``, or 503
with ``"ok": false`` and the stale parts named. A frozen process does not answer at all. The
supervisor (``--heartbeat-url``) restarts the server when no good heartbeat came for
``--hung-after`` seconds, and otherwise takes a slow probe for a busy server (docs/supervisor.md).
It also reads ``free_mb`` (free space where instances are stored, refreshed every
``FREE_SPACE_EVERY_S``) for its low-space alert.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .archive import Archive

log = logging.getLogger(__name__)

BEAT_S = 1.0  # the heartbeat thread's period
STALE_S = 5.0
INDEX_STALE_S = 10.0
FREE_SPACE_EVERY_S = 10.0


class Heartbeat:
    """Collects signs of life from the server's parts; ``snapshot`` is safe to call from any thread."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.beats = 0
        self._parts: dict[str, Callable[[], float | None]] = {}
        self._index_read_at = time.monotonic()
        self._index_error: str | None = None
        self._free_mb: int | None = None
        self._free_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, last_seen: Callable[[], float | None]) -> None:
        """Report ``name``'s age: ``last_seen`` gives the monotonic time it last showed life (None: not running)."""
        self._parts[name] = last_seen

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(INDEX_STALE_S)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.archive.index.ping()
                self._index_error = None
            except Exception as exc:  # it came back: alive, whatever the error (reported, not a hang)
                self._index_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            now = time.monotonic()
            self._index_read_at = now
            if now >= self._free_at:
                self._free_at = now + FREE_SPACE_EVERY_S
                try:
                    self._free_mb = self.archive.blobs.free_bytes() // (1024 * 1024)
                except OSError:
                    self._free_mb = None
            self.beats += 1
            self._stop.wait(BEAT_S)

    def ages(self, now: float) -> dict[str, float]:
        """Seconds since each part last showed life."""
        ages = {"index read": now - self._index_read_at}
        for name, last_seen in self._parts.items():
            seen = last_seen()
            if seen is not None:
                ages[name] = now - seen
        status = self.archive.dicom_status() if self.archive.dicom_status is not None else {}
        for worker in status.get("workers", []):
            if worker.get("ready") and worker.get("beat_age_s") is not None:
                ages[f"dicom worker PID {worker['pid']}"] = worker["beat_age_s"]
        return ages

    def snapshot(self) -> dict[str, Any]:
        """The heartbeat answer: ``ok``, the parts' ages, which are stale, free space."""
        ages = self.ages(time.monotonic())
        stale = [
            f"{name}: no sign of life for {age:.1f} s"
            for name, age in ages.items()
            if age > (INDEX_STALE_S if name == "index read" else STALE_S)
        ]
        return {
            "ok": not stale,
            "pid": os.getpid(),
            "beats": self.beats,
            "parts": {name: round(age, 2) for name, age in ages.items()},
            "stale": stale,
            "index_error": self._index_error,
            "free_mb": self._free_mb,
        }
