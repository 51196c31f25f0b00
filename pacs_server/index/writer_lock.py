"""The SQLite index's writer lock: one writer at a time across threads *and* processes, waited for a bounded time.

SQLite admits one writer; a second one's ``BEGIN IMMEDIATE`` fails with "database is locked" and
the driver retries it with growing sleeps (1, 2, 5, 10 ... ms, SQLite's busy handler). Within one
process a ``threading.Lock`` queues writers instead. With DICOM worker processes
(``dicom.workers``) several processes write, and their C-STOREs then waited on those sleeps:
4 associations over 2 workers stored fewer small instances per second than one process did.
So the lock also takes an exclusive ``flock`` on a file beside the database: the kernel queues
the processes and wakes the next one as soon as the lock is released. A process that dies
holding it loses it with its descriptors. SQLite's own locking still guarantees correctness for
writers that do not take this lock (another tool, another machine's process on a shared disk).

Every wait is bounded (``timeout``, the index passes SQLite's busy timeout): a holder that is
stopped (``kill -STOP``, a debugger) or hung must cost a store its documented failure status
(0xA700 after 10 s), not hang every writer of every process behind it. A blocking ``flock``
cannot be given a timeout, and polling it with ``LOCK_NB`` would add up to a poll interval to
every hand-over between processes (the kernel's wake-up is what this lock is for). So when the
lock is busy, one helper thread per lock blocks in ``flock`` for the process while the waiting
thread waits on a condition with a deadline. A waiter that gives up leaves that ``flock`` in
flight for the next one; when it completes with nobody waiting, the helper releases it at once.

Whoever takes the lock writes who it is into the lock file (PID, time, command line; one
``pwrite``, no fsync), so that a waiter that gives up can name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOLDER_RECORD_SIZE = 512  # bytes of the holder record at the start of the lock file, space-padded


class WriterLockTimeout(TimeoutError):
    """The writer lock stayed taken longer than the bounded wait; the message names the holder if known."""


@dataclass(frozen=True)
class Holder:
    """Who last took the lock, as its record in the lock file says."""

    pid: int
    since: float  # wall-clock time it took the lock
    command: str

    def describe(self, now: float) -> str:
        taken = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"PID {self.pid} ({self.command}) since {taken}, {now - self.since:.0f} s ago"


class WriterLock:
    """One writer at a time (``with``, or ``acquire`` and ``release``) among this process's threads
    and, with a ``database`` file, among processes; never waits longer than ``timeout`` seconds,
    then raises WriterLockTimeout. ``database=None`` (an in-memory database) locks threads only."""

    def __init__(self, database: Path | None, timeout: float) -> None:
        self.path = database.with_name(database.name + ".writer-lock") if database is not None else None
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd = -1
        # The helper thread's state, under _cond: the descriptor it blocks in flock on (-1: none),
        # the descriptor it got the lock on and hands over, and whether a thread waits for it.
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = -1
        self._granted = -1
        self._wanted = False
        self._helper_pid = 0  # the process whose helper thread runs (none yet, or we were forked)

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (default: the lock's own)."""
        timeout = self.timeout if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=timeout):
            raise self._timed_out(timeout, thread_lock=True)
        try:
            self._fd = self._flock(deadline, timeout)
        except BaseException:
            self._thread_lock.release()
            raise
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # the record only helps to name us: never fail for it
                os.pwrite(self._fd, _record(), 0)

    def _flock(self, deadline: float, timeout: float) -> int:
        """The descriptor holding the flock, or -1 without a lock file (none, or it cannot be opened)."""
        if self.path is None:
            return -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return -1  # an unwritable folder: SQLite's busy timeout still serialises the processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except BaseException:
            os.close(fd)
            raise
        with self._cond:
            if self._helper_pid != os.getpid():  # first contention in this process
                self._in_flight, self._granted = -1, -1
                threading.Thread(target=self._helper, name="index-writer-lock", daemon=True).start()
                self._helper_pid = os.getpid()
            if self._in_flight < 0:
                self._in_flight = fd
                self._cond.notify_all()
            else:
                os.close(fd)  # the helper already waits in flock, on an earlier waiter's descriptor
            self._wanted = True
            try:
                if self._cond.wait_for(lambda: self._granted >= 0, max(0.0, deadline - time.monotonic())):
                    fd, self._granted = self._granted, -1
                    return fd
            finally:
                self._wanted = False
        raise self._timed_out(timeout, thread_lock=False)

    def _helper(self) -> None:
        """Blocks in flock for this process's waiters; hands the lock over, or releases it when none waits."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._in_flight >= 0)
                fd = self._in_flight
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:
                locked = False  # the waiter times out and says so; the next one starts again
            with self._cond:
                self._in_flight = -1
                if locked and self._wanted:
                    self._granted = fd
                    self._cond.notify_all()
                    continue
            os.close(fd)

    def _timed_out(self, timeout: float, *, thread_lock: bool) -> WriterLockTimeout:
        """The error for a wait that gave up, naming the holder from the lock file's record.

        ``thread_lock``: the wait was for another thread of this process, which is either the
        holder or itself waiting for the process the record names.
        """
        known = self.holder()
        unrecorded = "a process that did not record itself (`lsof` on the lock file shows it)"
        if known is None:
            holder = f"another thread of this process (PID {os.getpid()})" if thread_lock else unrecorded
        elif known.pid != os.getpid():
            holder = known.describe(time.time())
        elif thread_lock:
            holder = f"another thread of this process: {known.describe(time.time())}"
        else:  # our own record, yet we do not hold the flock: someone who writes no record does
            holder = unrecorded
        return WriterLockTimeout(
            f"the index writer lock ({self.path or 'in memory'}) is held by {holder}; gave up after "
            f"{timeout:g} s. If that process is stopped or hung (`ps -o stat= -p PID` shows T when "
            "stopped), resume it (`kill -CONT PID`) or end it: writes succeed again as soon as it lets go"
        )

    def holder(self) -> Holder | None:
        """The last taker's record in the lock file, or None (no file, or not a record)."""
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as fh:
                fields = fh.read(HOLDER_RECORD_SIZE).decode(errors="replace").strip().split(" ", 2)
            return Holder(int(fields[0]), float(fields[1]), fields[2] if len(fields) > 2 else "?")
        except (OSError, ValueError, IndexError):
            return None

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


def _record() -> bytes:
    """This process's holder record: ``PID TIME COMMAND``, space-padded to a fixed size."""
    command = " ".join(sys.argv) or sys.executable
    text = f"{os.getpid()} {time.time():.3f} {command}"
    return text.encode(errors="replace")[: HOLDER_RECORD_SIZE - 1].ljust(HOLDER_RECORD_SIZE - 1) + b"\n"
