"""The server's own repair of a corrupt SQLite index, while it goes on serving (server mode).

Any process of the archive that meets a corruption error records it in the recovery file
(``index/corruption.py``); from then on ``/testdbalive`` and ``/health`` fail. This thread of the
server's main process looks at that file every ``POLL_S``. When it says ``"corrupt"`` it has the
file moved aside and a fresh index put in its place (``Index.replace_corrupt``, which waits until
every process, DICOM workers included, has let go of the old file), then re-indexes every stored
file into the fresh index (``reindex(..., live=True)``) while C-STOREs go on being acknowledged
into it and queries answer from what is rebuilt so far. A restart in the middle resumes the rebuild
(the file says ``"rebuilding"``). With ``server.server_mode = false`` nothing is moved: the log
and the health checks say to stop the server and run ``macpacs reindex``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .index import Index, IndexUnreadable
from .reindex import reindex
from .storage import BlobStore

log = logging.getLogger(__name__)

POLL_S = 0.25
RETRY_S = 5.0  # after a failed replacement (a full disk, say), the next attempt


class IndexRecovery:
    """Watches the recovery file of the server's index and repairs the index when it says so."""

    def __init__(self, index: Index, blobs: BlobStore, *, server_mode: bool) -> None:
        self.index = index
        self.blobs = blobs
        self.server_mode = server_mode
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = 0
        self._total: int | None = None
        self._told_manual = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a rebuild under way ends after its current file (the next start resumes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def status(self) -> dict[str, Any] | None:
        """What the status document shows: None when the index is whole."""
        state = self.index.recovery_state()
        if state is None:
            return None
        shown = {k: state[k] for k in ("state", "error", "found_at", "found_by_pid", "moved_to") if k in state}
        if state.get("state") == "rebuilding":
            with self._lock:
                done, total = self._done, self._total
            shown.update(done=done, total=total)
            shown["detail"] = (
                f"rebuilding: {done} of {total} files" if total is not None else "rebuilding: counting the files"
            )
        elif self.server_mode:
            shown["detail"] = "corrupt: moving it aside to rebuild it from the stored files"
        else:
            shown["detail"] = "corrupt: server.server_mode is false, so stop the server and run `macpacs reindex`"
        return shown

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._round()
            except Exception:
                log.exception("index recovery failed; trying again in %.0f s", RETRY_S)
                self._stop.wait(RETRY_S)

    def _round(self) -> None:
        state = self.index.recovery_state()
        if state is None:
            return
        if state.get("state") == "corrupt":
            if not self.server_mode:
                if not self._told_manual:
                    self._told_manual = True
                    log.error(
                        "index: the database is corrupt and server.server_mode is false, so the server does not "
                        "repair it: stop the server and run `macpacs reindex` (it moves the file aside and rebuilds "
                        "it from the stored files)"
                    )
                return
            self.index.replace_corrupt(str(state.get("error", "?")))
        self._rebuild()

    def _rebuild(self) -> None:
        with self._lock:
            self._done, self._total = 0, None
        start = time.monotonic()
        total = sum(1 for _ in self.blobs.iter_keys())
        with self._lock:
            self._total = total
        log.warning(
            "index: rebuilding from the %d stored files (%s); DICOM stores are accepted meanwhile, and queries "
            "answer only from what is rebuilt so far",
            total,
            self.blobs.describe(),
        )
        try:
            report = reindex(self.blobs, self.index, progress=self._advance, live=True)
        except IndexUnreadable as exc:  # the fresh index is corrupt too: the next round starts over
            log.error("index: rebuild interrupted: %s", exc)
            return
        except _Stopped:
            log.warning("index: rebuild interrupted by the server's stop; the next start resumes it")
            return
        log.warning(
            "index: rebuild finished in %.1f s: %d instances indexed, %d files skipped (listed above); queries "
            "are complete again",
            time.monotonic() - start,
            report.indexed,
            len(report.failed),
        )

    def _advance(self, n: int) -> None:
        with self._lock:
            self._done += n
        if self._stop.is_set():
            raise _Stopped


class _Stopped(Exception):
    """The server stops: the rebuild ends here (the recovery file still says "rebuilding")."""
