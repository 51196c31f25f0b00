"""DICOM associations served by several worker processes, so that they use more than one core.

pynetdicom serves all associations of one process under one GIL: with 4 associations storing at
once, one process reached 191 small instances/s where a bare pynetdicom SCP alone reached 438
(shared/reference/performance.md). So with ``dicom.workers`` > 1 the main process (which also
runs the web server and XML-RPC) owns the listening socket, accepts each connection and hands
its file descriptor to one of N worker processes over a Unix socket (``socket.send_fds``). Each
worker runs the same ``DicomListener`` over its own ``Archive`` (``archive.open_archive``), opened from
the same settings; the SQLite index (WAL, busy timeout) takes writes from all of them.

Why the main process accepts, rather than every worker accepting on an inherited listening socket:
- it gives each new association to the worker with the fewest open ones (a kernel wake-up
  order does not know which process is busy; ``SO_REUSEPORT`` does not balance on macOS);
- it counts open associations across workers, so ``dicom.max_associations`` holds globally:
  a connection over the limit is still handed to a worker, marked, and that worker answers the
  A-ASSOCIATE-RQ with the usual rejection (transient, "local limit exceeded") and log line;
- workers hold no listening socket, so a worker that outlives a killed main process can never
  keep the port: a restarted server binds it at once.

Lifetime. Workers are started with the ``spawn`` method, so they inherit nothing but their
end of the Unix socket (no sibling's socket ends, no listening socket: the pitfall the reference
measured, where workers outlived a killed acceptor). A worker exits when its socket reaches
end-of-file, which happens however the main process ends (SIGTERM, SIGKILL from the supervisor,
a crash). Workers ignore SIGINT and SIGTERM: Ctrl-C or launchd's SIGTERM to the process group
stops the main process, which stops them. A worker that dies on its own is logged and replaced.

Wire format. Main → worker: one byte per connection, ``A`` (serve) or ``L`` (over the limit),
carrying the connection's descriptor. Worker → main: frames of kind (1 byte), length (4 bytes),
payload: ``R`` ready, ``C`` one handed-over connection has ended, ``G`` a log record (JSON), which
the main process writes to its own log, so every line still lands in the one macpacs.log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ..config import Settings
from . import pynetdicom_ext

log = logging.getLogger(__name__)

_FRAME = struct.Struct("!cI")
READY_TIMEOUT_S = 60.0  # start-up: how long to wait for the workers' first "ready"
STOP_TIMEOUT_S = 5.0  # stop: how long a worker gets to end its associations before it is killed
QUICK_CRASH_S = 10.0  # a worker that dies sooner than this after starting is restarted with a delay
MAX_RESTART_DELAY_S = 30.0


@dataclass
class _Worker:
    """The main process's view of one worker process."""

    number: int
    process: Any  # multiprocessing.Process of the spawn context
    channel: socket.socket
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    active: int = 0  # connections handed over and not yet ended


class WorkerPool:
    """The main process's side: listening socket, accept loop, workers, restarts, global count."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._cond = threading.Condition()
        self._workers: dict[int, _Worker] = {}
        self._active = 0
        self._stopping = False
        self._quick_crashes = 0
        self._rotation = itertools.count()
        self._sock: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # -- start and stop -----------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen (a port in use fails now; early connections wait in the backlog), start
        the workers; ``serve`` then accepts, once they are ready.
        A pynetdicom the workers could not run with stops the server here, not in each worker.
        """
        pynetdicom_ext.check()
        d = self.settings.dicom
        family = socket.AF_INET6 if ":" in d.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((d.bind, d.port))
        sock.listen(128)
        self._sock = sock
        for number in range(1, self.count + 1):
            self._spawn(number)

    def serve(self) -> None:
        """Wait until the workers are ready, then accept."""
        d = self.settings.dicom
        assert self._sock is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self._cond:
            while not all(w.ready for w in self._workers.values()) and time.monotonic() < deadline:
                self._cond.wait(0.2)
            ready = sum(w.ready for w in self._workers.values())
        if not ready:
            raise RuntimeError(f"no DICOM worker process became ready within {READY_TIMEOUT_S:.0f} s (see the log)")
        self._sock.settimeout(0.5)  # the accept loop looks at the stop flag this often
        self._acceptor = threading.Thread(target=self._accept_loop, name="dicom-acceptor", daemon=True)
        self._acceptor.start()
        log.info(
            "DICOM listener on %s:%d, AE title %s, %d worker processes (dicom.workers)",
            d.bind,
            d.port,
            d.ae_title,
            self.count,
        )

    def stop(self) -> None:
        """Stop accepting, end every worker (closing its socket is its signal), wait for them."""
        with self._cond:
            self._stopping = True
            workers = list(self._workers.values())
            self._cond.notify_all()
        if self._acceptor is not None:
            self._acceptor.join(2.0)
        if self._sock is not None:
            self._sock.close()
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.channel.shutdown(socket.SHUT_WR)  # its end-of-file; its last log lines still arrive
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in workers:
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning(
                    "DICOM worker %d (PID %s) did not stop in time: killing it", worker.number, worker.process.pid
                )
                worker.process.kill()
                worker.process.join(2.0)
            worker.channel.close()

    # -- what the status page and tests read -------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Open associations in total and per worker PID."""
        with self._cond:
            return {
                "associations": self._active,
                "workers": [
                    {"pid": w.process.pid, "ready": w.ready, "associations": w.active} for w in self._workers.values()
                ],
            }

    # -- workers ----------------------------------------------------------------------------------
    def _spawn(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = self._ctx.Process(
            target=worker_main,
            args=(number, theirs, self.settings),
            name=f"macpacs-dicom-{number}",
            daemon=True,
        )
        process.start()
        theirs.close()  # only the worker holds its end: its death is our end-of-file, and ours is its
        worker = _Worker(number, process, ours)
        with self._cond:
            self._workers[number] = worker
        threading.Thread(target=self._read, args=(worker,), name=f"dicom-worker-{number}", daemon=True).start()

    def _read(self, worker: _Worker) -> None:
        """Events from one worker; at end-of-file, account for its death and replace it."""
        stream = worker.channel.makefile("rb")
        try:
            while True:
                head = stream.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    break
                kind, length = _FRAME.unpack(head)
                payload = stream.read(length)
                if kind == b"C":
                    with self._cond:
                        worker.active -= 1
                        self._active -= 1
                elif kind == b"G":
                    record = logging.makeLogRecord(json.loads(payload))
                    logging.getLogger(record.name).handle(record)
                elif kind == b"R":
                    with self._cond:
                        worker.ready = True
                        self._cond.notify_all()
                    log.info("DICOM worker %d ready (PID %d)", worker.number, worker.process.pid)
        except (OSError, ValueError):
            pass
        finally:
            stream.close()
        self._ended(worker)

    def _ended(self, worker: _Worker) -> None:
        worker.process.join(5.0)
        with self._cond:
            self._workers.pop(worker.number, None)
            self._active -= worker.active
            stopping = self._stopping
        worker.channel.close()
        if stopping:
            return
        lived = time.monotonic() - worker.started_at
        self._quick_crashes = self._quick_crashes + 1 if lived < QUICK_CRASH_S else 0
        delay = min(MAX_RESTART_DELAY_S, 2.0 ** (self._quick_crashes - 1)) if self._quick_crashes else 0.0
        log.error(
            "DICOM worker %d (PID %s) ended unexpectedly (%s) after %.0f s, cutting %d open association(s); "
            "starting a replacement%s",
            worker.number,
            worker.process.pid,
            _exit_reason(worker.process.exitcode),
            lived,
            worker.active,
            f" in {delay:.0f} s" if delay else "",
        )
        with self._cond:
            if self._cond.wait_for(lambda: self._stopping, timeout=delay):
                return
        self._spawn(worker.number)

    # -- accepting ----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping:
                    return
                log.error("DICOM listener: accept failed: %s", exc)
                time.sleep(0.1)
                continue
            with conn:
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        """Give the connection to the ready worker with the fewest open associations."""
        while True:
            with self._cond:
                while not self._stopping and not any(w.ready for w in self._workers.values()):
                    self._cond.wait(0.5)  # all workers restarting: the client waits, it is not refused
                if self._stopping:
                    return
                ready = [w for w in self._workers.values() if w.ready]
                turn = next(self._rotation)
                worker = min(ready, key=lambda w: (w.active, (w.number - turn) % len(ready)))
                over_limit = self._active >= self.settings.dicom.max_associations
                worker.active += 1
                self._active += 1
            try:
                socket.send_fds(worker.channel, [b"L" if over_limit else b"A"], [conn.fileno()])
                return
            except OSError:
                # The worker died this instant: its reader thread replaces it; try another.
                with self._cond:
                    worker.ready = False
                    worker.active -= 1
                    self._active -= 1


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running, its socket closed"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


# -- the worker process -----------------------------------------------------------------------------
class _Channel:
    """The worker's end of its Unix socket: framed sends from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(_FRAME.pack(kind, len(payload)) + payload)


class _ForwardHandler(logging.Handler):
    """Sends each log record to the main process, which writes it to macpacs.log and stderr."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            if record.exc_info:
                fields["msg"] += "\n" + logging.Formatter().formatException(record.exc_info)
            fields.update(args=None, exc_info=None, exc_text=None)
            self.channel.send(b"G", json.dumps(fields, default=str).encode())
        except Exception:
            self.handleError(record)


def worker_main(number: int, sock: socket.socket, settings: Settings) -> None:
    """Entry point of a worker process (spawned): serve handed-over connections until end-of-file."""
    from .. import logs

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _Channel(sock)
    logs.setup_handler(_ForwardHandler(channel), settings.server.log_level)
    try:
        server = _serve(settings)
    except Exception:
        log.exception("DICOM worker %d could not start", number)
        os._exit(3)
    channel.send(b"R")
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the main process is gone, or stopping: so are we
        for fd in fds:
            _serve_connection(server, channel, socket.socket(fileno=fd), over_limit=data == b"L")
    _abort_all(server)
    logging.shutdown()
    os._exit(0)


def _serve(settings: Settings) -> Any:
    """This worker's own Archive and listener, and a server that does not listen."""
    from ..archive import open_archive
    from .scp import DicomListener

    archive = open_archive(settings, "dicom-worker", migrate=False)  # the main process migrated the index
    listener = DicomListener(archive)
    # pynetdicom's own limit counts association threads, which outlive a closed connection by up
    # to the ACSE timeout; the main process counts connections across workers (the real limit).
    listener.ae.maximum_associations = 10 * settings.dicom.max_associations
    d = settings.dicom
    server = _HandoffServer(
        listener.ae,
        (d.bind, d.port),
        d.ae_title,
        listener.ae.supported_contexts,
        evt_handlers=listener.prepare(),
    )
    server.listener = listener  # keeps it alive for the handlers bound to its methods
    return server


def _serve_connection(server: Any, channel: _Channel, sock: socket.socket, *, over_limit: bool) -> None:
    """Start pynetdicom's association for one connection; report its end to the main process once.

    The end is the connection's close (pynetdicom's EVT_CONN_CLOSE), or else the association
    thread's end: a peer that connects and goes away at once (a port probe) closes the connection
    now, while pynetdicom's thread still waits out the ACSE timeout for an A-ASSOCIATE-RQ.
    """
    ended = threading.Lock()

    def end(_event: Any = None) -> None:
        if ended.acquire(blocking=False):
            channel.send(b"C")

    try:
        handler = _Handoff(sock, sock.getpeername(), server, over_limit, end)
    except Exception:
        log.exception("DICOM worker: could not serve a connection")
        sock.close()
        end()
        return

    def join() -> None:
        handler.assoc.join()
        end()

    threading.Thread(target=join, name="association-end", daemon=True).start()


class _HandoffServer(ThreadedAssociationServer):
    """pynetdicom's association server, fed with connections the main process accepted: no socket."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


class _Handoff(RequestHandler):
    """pynetdicom's request handler, marking an association over the global limit (scp.py rejects it)."""

    def __init__(
        self, request: socket.socket, address: Any, server: Any, over_limit: bool, on_close: Callable[[Any], None]
    ) -> None:
        self.over_limit = over_limit
        self.on_close = on_close
        self.assoc: Any = None
        super().__init__(request, address, server)

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.macpacs_over_limit = self.over_limit
        assoc.bind(evt.EVT_CONN_CLOSE, self.on_close)
        self.assoc = assoc
        return assoc


def _abort_all(server: Any) -> None:
    """The main process went away: abort open associations (at most a second), so peers know."""
    aborting = [
        threading.Thread(target=assoc.abort, daemon=True) for assoc in server.active_associations if assoc.is_alive()
    ]
    for thread in aborting:
        thread.start()
    deadline = time.monotonic() + 1.0
    for thread in aborting:
        thread.join(max(0.0, deadline - time.monotonic()))
