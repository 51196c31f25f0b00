"""``macpacs.pid``: which process is this data folder's server, proven, and held for its whole life.

The server takes an exclusive ``flock`` on its PID file at start and keeps it until it exits (the
kernel drops it when the process dies, however it dies). The lock, not the file's text, is what
"already running" means: a second ``macpacs serve`` on the same data folder finds it taken and
refuses to start, while a stale file left by a crash or a power cut (no lock holder) is simply
taken over, whatever process its old PID now names. Checking a stale PID's command line, as
before, could mistake a recycled PID for a live server.

The file says who holds it, for the supervisor (``supervisor/process.py``), which never imports
this package and reads the format itself, and for a person. The format (version 1) is text:

```
12345
format=macpacs-pid-1
create_time=1764662400.53
data_dir=/Users/Shared/macpacs
```

- line 1: the PID alone, so that ``kill $(head -1 macpacs.pid)`` works;
- then ``key=value`` lines (the value is the rest of the line): ``format``; ``create_time``, the
  process's start time as psutil's ``Process.create_time()`` gives it (seconds since the epoch),
  which tells this process from a later one given the same PID; ``data_dir``, the data folder's
  resolved absolute path.

The file is written in place (never renamed over: the lock belongs to the inode), so a reader may
catch it half-written for an instant and must then treat it as unproven. At a clean stop the
server removes the file before letting go of the lock.

A full disk does not stop the start: the lock, which needs no space, is what keeps a second
server out. The text is then left empty (unproven: the supervisor will not act on it, and says
so) and written by ``write_pending``, which the server calls once it has cleaned its staging
folder and then every second until the write succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from pathlib import Path

import psutil

from .config import ConfigError

log = logging.getLogger(__name__)

FORMAT = "macpacs-pid-1"
# The supervisor tests the lock with a shared flock for an instant; a server starting at that
# moment waits this long for the lock before it concludes that another server holds it.
LOCK_WAIT_S = 2.0
LOCK_POLL_S = 0.05


class AlreadyRunning(RuntimeError):
    """Another archive process owns this data folder."""


def render(pid: int, create_time: float, data_dir: Path) -> str:
    """The file's text for a process (the format in the module docstring)."""
    return f"{pid}\nformat={FORMAT}\ncreate_time={create_time!r}\ndata_dir={data_dir}\n"


def parse(text: str) -> dict[str, str]:
    """The fields of a PID file's text (``pid`` and the ``key=value`` lines); empty when line 1 is not a PID."""
    lines = text.split("\n")
    if not lines[0].strip().isdigit():
        return {}
    fields = {"pid": lines[0].strip()}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class PidFile:
    """The server's PID file: ``acquire`` at start (AlreadyRunning if another server holds it),
    ``release`` at a clean stop."""

    def __init__(self, path: Path, data_dir: Path) -> None:
        self.path = path
        self.data_dir = data_dir.resolve()
        if "\n" in str(self.data_dir):
            raise ConfigError(f"the data folder's path {str(self.data_dir)!r} contains a line break: rename it")
        self._fd = -1
        self._pending = b""  # the text still to write (the disk was full)
        self._waiting = False  # a write failed for want of space (logged once)

    def acquire(self) -> None:
        """Lock the file, then write this process into it; AlreadyRunning when another server holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._lock()
        try:
            previous = parse(_read(fd))
            if previous and int(previous["pid"]) != os.getpid():
                log.warning(
                    "taking over the PID file %s: PID %s, which wrote it, no longer holds it (it stopped "
                    "without cleaning up: a crash, a kill -9 or a power cut)",
                    self.path,
                    previous["pid"],
                )
            me = psutil.Process()
            self._pending = render(me.pid, me.create_time(), self.data_dir).encode()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.write_pending()

    def write_pending(self) -> None:
        """Write this process's text into the file if it is not there yet (the disk was full)."""
        if not self._pending or self._fd < 0:
            return
        try:
            # Over the old text, then cut to length: on a full disk, rewriting blocks the file
            # already has needs no new space, where truncating first would.
            os.pwrite(self._fd, self._pending, 0)
            os.ftruncate(self._fd, len(self._pending))
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not self._waiting:
                raise  # at start: a volume that cannot be written at all stops it, as before
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no stale text meanwhile; shrinking needs no space
            if not self._waiting:
                log.warning(
                    "cannot write the PID file %s: the disk is full. The server runs and holds its lock, "
                    "but the supervisor cannot prove which process it is (and will not stop it) until "
                    "space is freed; the write is retried every second",
                    self.path,
                )
                self._waiting = True
            return
        self._pending = b""
        if self._waiting:
            log.info("PID file %s written: there is space again", self.path)

    def _lock(self) -> int:
        """A descriptor of the file at ``path`` holding its exclusive lock."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(LOCK_POLL_S)
                    continue
                holder = parse(_read(fd))
                os.close(fd)
                raise AlreadyRunning(self._running_message(holder)) from None
            except BaseException:
                os.close(fd)
                raise
            # A server stopping removes the file before its lock goes: if we locked a file that
            # is no longer at ``path``, the next server would lock another one. Start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _running_message(self, holder: dict[str, str]) -> str:
        if holder:
            started = holder.get("create_time", "")
            with contextlib.suppress(ValueError):
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
            who = f"PID {holder['pid']}, started {started or 'at an unknown time'}"
        else:
            who = "a process that has not written its PID yet"
        return (
            f"another macpacs server is running on the data folder {self.data_dir} ({who}; it holds the "
            f"lock on {self.path}). Stop that one first (its launchd job or systemd unit, or "
            "`kill PID`), or give this one another --data-dir"
        )

    def release(self) -> None:
        """Remove the file, then let go of the lock (a no-op unless ``acquire`` succeeded)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.path.unlink()
        os.close(fd)


def _read(fd: int) -> str:
    """The file's text, through our descriptor (at most a few hundred bytes)."""
    return os.pread(fd, 4096, 0).decode(errors="replace")
