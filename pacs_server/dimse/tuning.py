"""Two costs of pynetdicom that a busy archive cannot afford, and how they are cut.

1. Every new association deep-copies the server's supported presentation contexts. With every
   Storage SOP Class in every transfer syntax (~8,000 UIDs, each re-validated by pydicom) that
   took ~50 ms per association: an echoscu took 90 ms instead of 35. The UIDs are immutable, so
   ``share_contexts`` makes that copy shallow.

2. Polling in pynetdicom's reactors. The association reactor sleeps 1 ms between looks at its
   queue, and the DUL thread 1 ms after each idle loop. Every DIMSE round trip pays for those
   sleeps, which caps small-instance C-STORE at ~300/s on one association. With 0.1 ms polls,
   shared/reference/performance.md measured ~440 inst/s for small instances and ~300 for CT; a
   bare SCP here went from 326 to 524 small inst/s. But with several associations their polling
   threads fight for the GIL: 4 CT associations fell from 95 to 65 inst/s at 0.1 ms. So the
   interval grows with the number of open associations (``dicom.reactor_poll_ms`` × open
   associations, at most pynetdicom's own 1 ms); 0.25 ms measured best for both cases then.
   Since C-STOREs after an association's first are read off the socket directly (store_scp.py)
   and associations are served by worker processes (workers.py), the default is back at 1 ms:
   with 2 workers, 4 associations of small instances stored 286 and 322 inst/s at 1 ms against
   253 and 259 at 0.25 ms, with less CPU, and 4 simultaneous C-MOVEs ran 2,110 vs 1,785 inst/s;
   a C-FIND or C-ECHO costs 1 to 3 ms more (35 → 38 ms findscu wall time). Lower values remain
   available for a site that queries more than it stores.

   pynetdicom has no option for these sleeps, so the ``time`` module seen by its association
   and DUL modules is replaced by a proxy whose ``sleep`` changes exactly that 1 ms poll.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.presentation import PresentationContext

DEFAULT_POLL = 0.001  # pynetdicom's own interval


class ReactorClock:
    """``time`` as pynetdicom's reactors see it, with their 1 ms polling sleep adapted to load."""

    def __init__(self, poll_ms: float) -> None:
        self.poll = poll_ms / 1000.0
        self.open_associations = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == DEFAULT_POLL:
            seconds = min(DEFAULT_POLL, self.poll * max(1, self.open_associations))
        time.sleep(seconds)

    def opened(self, _event: Any = None) -> None:
        with self._lock:
            self.open_associations += 1

    def closed(self, _event: Any = None) -> None:
        with self._lock:
            self.open_associations = max(0, self.open_associations - 1)


def install_clock(poll_ms: float) -> ReactorClock:
    """Put an adaptive clock under pynetdicom's reactors; the listener reports opens and closes."""
    clock = ReactorClock(poll_ms)
    pynetdicom.association.time = clock  # type: ignore[assignment]
    pynetdicom.dul.time = clock  # type: ignore[assignment]
    return clock


class _SharedContext(PresentationContext):
    """A supported context whose per-association copy shares its immutable UIDs."""

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def share_contexts(server: Any) -> None:
    """Make the association server's per-association context copies cheap (see module docstring)."""
    for context in server.contexts:
        context.__class__ = _SharedContext
