"""Shorter polling in pynetdicom's reactors, the largest cost of a pynetdicom server.

pynetdicom's association reactor sleeps 1 ms between looks at its queue, and its DUL thread
sleeps 1 ms after each idle loop. Every DIMSE round trip pays for those sleeps, which caps
small-instance C-STORE at ~300/s. With 0.1 ms polls, shared/reference/performance.md measured
~440 inst/s for small instances and ~300 for CT; here a bare SCP went from 326 to 524 small
inst/s and 178 to 230 CT inst/s. The price is CPU while an association is idle, so the value is
a setting (``dicom.reactor_poll_ms``).

pynetdicom has no option for the association reactor's sleep, so its module's ``time`` is
replaced by a proxy whose ``sleep`` shortens exactly that 1 ms poll and nothing else.
"""

from __future__ import annotations

import time
from typing import Any

import pynetdicom.association

DEFAULT_POLL = 0.001  # pynetdicom's own interval


class _ReactorClock:
    """``time`` as pynetdicom.association sees it, with its 1 ms polling sleep shortened."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll if seconds == DEFAULT_POLL else seconds)


def shorten_polling(poll_ms: float) -> None:
    """Make every association of this process poll every ``poll_ms`` milliseconds."""
    pynetdicom.association.time = _ReactorClock(poll_ms / 1000.0)  # type: ignore[assignment]


def tune_association(assoc: Any, poll_ms: float) -> None:
    """The DUL thread's idle delay is per association: set it when the connection opens."""
    assoc.dul._run_loop_delay = poll_ms / 1000.0
