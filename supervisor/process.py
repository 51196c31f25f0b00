"""Proving which process is this installation's server before stopping it, and stopping it.

The supervisor stops a process only when it has proven that it is the server of *this*
installation; otherwise it does nothing to it and says why. Guessing (a scan for processes
whose command line looks like a server) once stopped another installation's server on the same
host, so there is no fallback: no PID file, no kill.

The server's PID file (``pacs_server/pidfile.py`` writes it; this package never imports the
server, so the format is read here, and both places document it) is text, version 1:

```
12345
format=macpacs-pid-1
create_time=1764662400.53
data_dir=/Users/Shared/macpacs
```

line 1 the PID, then ``key=value`` lines: the process's start time as psutil's
``Process.create_time()`` gives it, and the data folder's resolved path. The server holds an
exclusive ``flock`` on the file for its whole life.

A process is proven to be the server when all of these hold (``prove_server``):

1. the PID file exists and is in that format;
2. its data folder is the one the supervisor watches (``--data-dir``, by default the PID file's
   folder): the file is this installation's;
3. the file is locked: the server that wrote it is alive (tested with a shared ``flock`` taken
   and dropped at once; a server starting at that instant waits for it);
4. the PID runs, and its start time is the file's (within ``CLOCK_SLACK``): not a recycled PID;
5. its command line matches ``--process-match`` (``macpacs serve``);
6. where the system lets us see it, the process has the PID file open: it is the lock's holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

PID_FORMAT = "macpacs-pid-1"
# psutil derives a Linux process's start time from the boot time, which /proc gives in whole
# seconds and which moves when the clock is stepped, so two readings may differ by up to ~1 s.
CLOCK_SLACK = 1.0


@dataclass(frozen=True)
class Identity:
    """The outcome of a proof: the server's process, or None and why it could not be proven."""

    process: psutil.Process | None
    detail: str

    @property
    def proven(self) -> bool:
        return self.process is not None

    def describe(self) -> str:
        """For the status file and log lines."""
        return f"proven: {self.detail}" if self.proven else f"cannot prove the server's identity: {self.detail}"


def _unproven(detail: str) -> Identity:
    return Identity(None, detail)


def _when(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


def parse_pid_file(text: str) -> dict[str, str]:
    """The fields of a PID file (``pid``, then its ``key=value`` lines); empty when line 1 is not a PID."""
    lines = text.split("\n")
    if not lines[0].strip().isdigit():
        return {}
    fields = {"pid": lines[0].strip()}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def _is_locked(fd: int) -> bool | None:
    """Whether another open file holds the file's exclusive flock; None when it cannot be tested."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def prove_server(pid_file: Path | None, data_dir: Path | None, pattern: re.Pattern[str]) -> Identity:
    """The server's process if every check of the module docstring holds, else why not."""
    if pid_file is None:
        return _unproven("no --pid-file given, so no process can be proven to be the server")
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _unproven(f"no PID file at {pid_file} (the server is not running, or stopped cleanly)")
    except OSError as exc:
        return _unproven(f"cannot read the PID file {pid_file}: {exc.strerror}")
    try:
        fields = parse_pid_file(os.pread(fd, 4096, 0).decode(errors="replace"))
        locked = _is_locked(fd)
    finally:
        os.close(fd)
    if fields.get("format") != PID_FORMAT or not {"create_time", "data_dir"} <= fields.keys():
        return _unproven(
            f"the PID file {pid_file} is not in the format {PID_FORMAT} (being written this instant, or "
            "left by an older macpacs: restarting the server rewrites it)"
        )
    pid = int(fields["pid"])
    expected = (data_dir or pid_file.parent).resolve()
    if Path(fields["data_dir"]).resolve() != expected:
        return _unproven(
            f"the PID file {pid_file} is for the data folder {fields['data_dir']}, not {expected} "
            "(--data-dir): it belongs to another installation"
        )
    if locked is False:
        return _unproven(
            f"the PID file {pid_file} is not locked, so the server that wrote it (PID {pid}) is gone "
            "(a crash or kill -9); whatever runs as PID now is another program"
        )
    try:
        recorded = float(fields["create_time"])
        proc = psutil.Process(pid)
        with proc.oneshot():
            created, cmdline = proc.create_time(), " ".join(proc.cmdline())
            if proc.status() == psutil.STATUS_ZOMBIE:
                return _unproven(f"PID {pid} from {pid_file} has exited")
    except ValueError:
        return _unproven(f"the PID file {pid_file} has no valid create_time")
    except psutil.NoSuchProcess:
        return _unproven(f"PID {pid} from {pid_file} is not running")
    except psutil.Error as exc:
        return _unproven(f"cannot inspect PID {pid} from {pid_file} ({exc})")
    if abs(created - recorded) > CLOCK_SLACK:
        return _unproven(
            f"PID {pid} started at {_when(created)}, but the PID file {pid_file} records a start at "
            f"{_when(recorded)}: a recycled PID, another program"
        )
    if not pattern.search(cmdline):
        return _unproven(
            f"PID {pid} from {pid_file} runs {cmdline[:200]!r}, which does not match --process-match "
            f"{pattern.pattern!r}"
        )
    holds = _has_open(proc, pid_file)
    if holds is False:
        return _unproven(f"PID {pid} does not have {pid_file} open, so it is not the process holding its lock")
    lock = "locked" if locked else "lock not testable here"
    return Identity(proc, f"PID {pid}, started {_when(created)}, data folder {expected}, PID file {pid_file} ({lock})")


def _has_open(proc: psutil.Process, path: Path) -> bool | None:
    """Whether ``proc`` has ``path`` open; None when the system does not let us see its files."""
    try:
        target = os.stat(path)
        files = proc.open_files()
    except (OSError, psutil.Error):
        return None
    for opened in files:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(opened.path), target):
                return True
    return False


def terminate(proc: psutil.Process, grace: float, child: subprocess.Popen[bytes] | None = None) -> str:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; returns what happened, for the log line.

    SIGCONT follows SIGTERM (as systemd does): a frozen process could not act on SIGTERM at all.
    ``child`` is our own Popen in spawn mode: waiting through it reaps the process and keeps its
    exit status, where psutil would reap it behind Popen's back.
    """

    def wait(timeout: float) -> bool:
        if child is not None:
            try:
                child.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        gone, _alive = psutil.wait_procs([proc], timeout=timeout)
        return bool(gone)

    start = time.monotonic()
    try:
        proc.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        wait(0)
        return f"PID {proc.pid} was already gone"
    with contextlib.suppress(psutil.NoSuchProcess):  # SIGTERM may have ended it already
        proc.send_signal(signal.SIGCONT)
    if wait(grace):
        return f"PID {proc.pid} exited {time.monotonic() - start:.1f} s after SIGTERM"
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        wait(0)
        return f"PID {proc.pid} exited {time.monotonic() - start:.1f} s after SIGTERM"
    if not wait(10.0):
        return f"PID {proc.pid} survived SIGKILL for 10 s (uninterruptible I/O?)"
    return f"PID {proc.pid} ignored SIGTERM for {grace:g} s and was killed (SIGKILL)"


def own_process(pid: int) -> psutil.Process | None:
    """``psutil.Process`` for a PID we started ourselves; ``None`` once it is gone."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
