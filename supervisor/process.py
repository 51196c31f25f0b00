"""Finding the server's process without ever touching the wrong one, and stopping it.

A PID file outlives the process that wrote it (crash, SIGKILL, power loss), and its PID may since
have been given to an unrelated program. So a PID from the file is trusted only when the process
behind it has a command line matching ``--process-match`` *and* was created no later than the file
was written: a process born after its PID file cannot be the one that wrote it. When the PID file
does not lead to the server, the fallback is a scan for ``--process-match``, which must find
exactly one process; an ambiguous match kills nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# psutil derives a Linux process's create time from the boot time, which /proc gives in whole
# seconds, so it can read up to ~1 s late; a process is "older than its PID file" within this slack.
CLOCK_SLACK = 1.0


def _cmdline(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline())


def from_pid_file(pid_file: Path, pattern: re.Pattern[str]) -> tuple[psutil.Process | None, int | None]:
    """The server named by ``pid_file`` if verified; else ``(None, pid to exclude from the scan)``."""
    try:
        text = pid_file.read_text().strip()
        written = pid_file.stat().st_mtime
    except FileNotFoundError:
        log.info("no PID file at %s: looking for the server by --process-match", pid_file)
        return None, None
    except OSError as exc:
        log.warning("cannot read PID file %s (%s): looking for the server by --process-match", pid_file, exc)
        return None, None
    if not text.isdigit():
        log.warning("PID file %s holds %r, not a PID: looking for the server by --process-match", pid_file, text[:40])
        return None, None
    pid = int(text)
    try:
        proc = psutil.Process(pid)
        cmdline = _cmdline(proc)
        created = proc.create_time()
    except psutil.NoSuchProcess:
        log.warning("PID file %s names PID %d, which is not running (stale file)", pid_file, pid)
        return None, None
    except psutil.Error as exc:
        log.warning("cannot inspect PID %d from %s (%s): not touching it", pid, pid_file, exc)
        return None, pid
    if not pattern.search(cmdline):
        log.warning(
            "PID file %s names PID %d, which is another program (%r does not match --process-match): not touching it",
            pid_file,
            pid,
            cmdline[:200],
        )
        return None, pid
    if created > written + CLOCK_SLACK:
        log.warning(
            "PID file %s names PID %d, started %.1f s after the file was written: a recycled PID, not touching it",
            pid_file,
            pid,
            created - written,
        )
        return None, pid
    return proc, None


def by_pattern(pattern: re.Pattern[str], exclude: set[int]) -> psutil.Process | None:
    """The one process whose command line matches; ``None`` when none or several do."""
    me = psutil.Process()
    # Our own command line (and a wrapping shell's) contains the pattern text itself.
    skip = exclude | {me.pid} | {p.pid for p in me.parents()}
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if info["pid"] in skip or info["status"] == psutil.STATUS_ZOMBIE or not info["cmdline"]:
            continue
        if pattern.search(" ".join(info["cmdline"])):
            found.append(proc)
    if not found:
        log.warning("no process matches --process-match %r: nothing to stop", pattern.pattern)
        return None
    if len(found) > 1:
        log.error(
            "%d processes match --process-match %r (PIDs %s): refusing to guess, nothing stopped; "
            "give a --pid-file or a narrower --process-match",
            len(found),
            pattern.pattern,
            ", ".join(str(p.pid) for p in found),
        )
        return None
    return found[0]


def find_server(pid_file: Path | None, pattern: re.Pattern[str]) -> psutil.Process | None:
    """The server's process: the verified PID file first, then a unique --process-match."""
    exclude: set[int] = set()
    if pid_file is not None:
        proc, rejected = from_pid_file(pid_file, pattern)
        if proc is not None:
            return proc
        if rejected is not None:
            exclude.add(rejected)
    return by_pattern(pattern, exclude)


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
