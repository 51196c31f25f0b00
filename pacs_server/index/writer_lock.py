"""The SQLite index's writer lock: one writer at a time across threads *and* processes.

SQLite admits one writer; a second one's ``BEGIN IMMEDIATE`` fails with "database is locked" and
the driver retries it with growing sleeps (1, 2, 5, 10 ... ms, SQLite's busy handler). Within one
process a ``threading.Lock`` queues writers instead. With DICOM worker processes
(``dicom.workers``) several processes write, and their C-STOREs then waited on those sleeps:
4 associations over 2 workers stored fewer small instances per second than one process did.
So the lock also takes an exclusive ``flock`` on a file beside the database: the kernel queues
the processes and wakes the next one as soon as the lock is released. A process that dies
holding it loses it with its descriptors. SQLite's own locking still guarantees correctness for
writers that do not take this lock (another tool, another machine's process on a shared disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

POLL_S = 0.005  # with a timeout, how often a busy lock file is tried again


class WriterLock:
    """``threading.Lock``-like (``with``, ``acquire(timeout=)``, ``release``), across processes too."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".writer-lock")
        self._thread_lock = threading.Lock()
        self._fd = -1

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._thread_lock.acquire(blocking, timeout):
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return True  # an unwritable folder: SQLite's busy timeout still serialises the processes
        try:
            if blocking and timeout < 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + max(0.0, timeout)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking or time.monotonic() >= deadline:
                            os.close(fd)
                            self._thread_lock.release()
                            return False
                        time.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            self._thread_lock.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock
        self._thread_lock.release()

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
