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
- it sees every connection, so its gate (``connections.ConnectionGate``) counts connections per
  peer address and closes those that send no A-ASSOCIATE-RQ in time, across workers; a
  connection over its peer's limit is still handed to a worker, marked, and that worker answers
  the A-ASSOCIATE-RQ with the usual rejection (transient, "local limit exceeded") and log line;
  ``dicom.max_associations`` holds globally through a count in shared memory
  (``connections.AssociationSlots``, one entry per worker, zeroed when a worker dies);
- workers hold no listening socket, so a worker that outlives a killed main process can never
  keep the port: a restarted server binds it at once.
The TLS port is accepted the same way; the worker does the handshake, in the connection's thread.

Lifetime. Workers are started with the ``spawn`` method, so they inherit nothing but their
end of the Unix socket (no sibling's socket ends, no listening socket: the pitfall the reference
measured, where workers outlived a killed acceptor). A worker exits when its socket reaches
end-of-file, which happens however the main process ends (SIGTERM, SIGKILL from the supervisor,
a crash). Workers ignore SIGINT and SIGTERM: Ctrl-C or launchd's SIGTERM to the process group
stops the main process, which stops them. A worker that dies on its own is logged and replaced.

Wire format. Main → worker: one 10-byte message per connection, carrying its descriptor: ``A``
(serve) or ``P`` (over its peer's limit), TLS (1 byte, 0 or 1), connection id (8 bytes).
Worker → main: frames of kind (1 byte), length (4 bytes), payload: ``R`` ready, ``Q`` a
connection's A-ASSOCIATE-RQ arrived and ``C`` a connection ended (payload: its id), ``G`` a log
record (JSON), which the main process writes to its own log, so every line still lands in the one
macpacs.log, and
``H`` a heartbeat: once a second, after an index read of the worker's own (heartbeat.py).
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
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from . import connections, pynetdicom_ext, tls
from .connections import AssociationSlots, Connection

log = logging.getLogger(__name__)

_FRAME = struct.Struct("!cI")
_HANDOFF = struct.Struct("!c?Q")  # A/P, TLS, connection id
_ID = struct.Struct("!Q")
READY_TIMEOUT_S = 60.0  # start-up: how long to wait for the workers' first "ready"
STOP_TIMEOUT_S = 5.0  # stop: how long a worker gets to end its associations before it is killed
QUICK_CRASH_S = 10.0  # a worker that dies sooner than this after starting is restarted with a delay
BEAT_S = 1.0  # a worker's heartbeat period
MAX_RESTART_DELAY_S = 30.0


@dataclass
class _Worker:
    """The main process's view of one worker process."""

    number: int
    process: Any  # multiprocessing.Process of the spawn context
    channel: socket.socket
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    connections: set[int] = field(default_factory=set)  # handed over and not yet ended
    beat: float = field(default_factory=time.monotonic)  # its last heartbeat

    @property
    def active(self) -> int:
        return len(self.connections)


class WorkerPool:
    """The main process's side: listening socket, accept loop, workers, restarts, global count."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._cond = threading.Condition()
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._quick_crashes = 0
        self._rotation = itertools.count()
        # Admitted associations, one count per worker (connections.AssociationSlots).
        self._slots = self._ctx.Array("i", count)
        self._gate = connections.ConnectionGate(settings.dicom)
        self._listeners = connections.Listeners(settings.dicom, self._gate, self._hand_over)

    # -- start and stop -----------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen (a port in use fails now; early connections wait in the backlog), start
        the workers; ``serve`` then accepts, once they are ready.
        A pynetdicom the workers could not run with, or an unusable TLS certificate or key
        (ConfigError), stops the server here, not in each worker.
        """
        pynetdicom_ext.check()
        tls.server_context(self.settings.dicom)  # each worker builds its own; the errors show here
        self._listeners.bind()
        for number in range(1, self.count + 1):
            self._spawn(number)

    def serve(self) -> None:
        """Accept as soon as one worker is ready: the others take associations once they are
        (``_hand_over`` chooses among the ready ones), so that a restart after a hang waits for
        the quickest worker's start-up (each imports everything again), not the slowest one's."""
        d = self.settings.dicom
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self._cond:
            while not any(w.ready for w in self._workers.values()) and time.monotonic() < deadline:
                self._cond.wait(0.2)
            ready = sum(w.ready for w in self._workers.values())
        if not ready:
            raise RuntimeError(f"no DICOM worker process became ready within {READY_TIMEOUT_S:.0f} s (see the log)")
        self._listeners.start()
        log.info(
            "DICOM listener on %s:%d, AE title %s, %d worker processes (dicom.workers), %d ready%s",
            d.bind,
            d.port,
            d.ae_title,
            self.count,
            ready,
            tls.listening_line(d),
        )

    def stop(self) -> None:
        """Stop accepting, end every worker (closing its socket is its signal), wait for them."""
        with self._cond:
            self._stopping = True
            workers = list(self._workers.values())
            self._cond.notify_all()
        self._listeners.stop()
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
        """Admitted associations in total and per worker PID, how long ago each worker's heartbeat came,
        and open connections (``connections``; ``awaiting_request``: not yet associated)."""
        now = time.monotonic()
        with self._cond:
            workers = [
                {
                    "pid": w.process.pid,
                    "ready": w.ready,
                    "associations": self._slots[w.number - 1],
                    "beat_age_s": round(now - w.beat, 2),
                }
                for w in self._workers.values()
            ]
        return {"associations": sum(self._slots), "workers": workers, **self._gate.snapshot()}

    # -- workers ----------------------------------------------------------------------------------
    def _spawn(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = self._ctx.Process(
            target=worker_main,
            args=(number, theirs, self.settings, self._slots),
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
                if kind == b"Q":
                    self._gate.requested(_ID.unpack(payload)[0])
                elif kind == b"C":
                    (connection_id,) = _ID.unpack(payload)
                    with self._cond:
                        worker.connections.discard(connection_id)
                    self._gate.closed(connection_id)
                elif kind == b"H":
                    worker.beat = time.monotonic()
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
            cut, worker.connections = worker.connections, set()
            stopping = self._stopping
        for connection_id in cut:
            self._gate.closed(connection_id)
        with self._slots.get_lock():
            self._slots[worker.number - 1] = 0  # its associations died with it
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
            len(cut),
            f" in {delay:.0f} s" if delay else "",
        )
        with self._cond:
            if self._cond.wait_for(lambda: self._stopping, timeout=delay):
                return
        self._spawn(worker.number)

    # -- accepting ----------------------------------------------------------------------------------
    def _hand_over(self, conn: socket.socket, connection: Connection) -> None:
        """Give an accepted connection to the ready worker with the fewest open ones."""
        with conn:
            message = _HANDOFF.pack(b"P" if connection.peer_over_limit else b"A", connection.tls, connection.id)
            while True:
                with self._cond:
                    while not self._stopping and not any(w.ready for w in self._workers.values()):
                        self._cond.wait(0.5)  # all workers restarting: the client waits, it is not refused
                    if self._stopping:
                        break
                    ready = [w for w in self._workers.values() if w.ready]
                    turn = next(self._rotation)
                    worker = min(ready, key=lambda w: (w.active, (w.number - turn) % len(ready)))
                    worker.connections.add(connection.id)
                try:
                    socket.send_fds(worker.channel, [message], [conn.fileno()])
                    return
                except OSError:
                    # The worker died this instant: its reader thread replaces it; try another.
                    with self._cond:
                        worker.ready = False
                        worker.connections.discard(connection.id)
        self._gate.closed(connection.id)  # stopping: never served


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


def worker_main(number: int, sock: socket.socket, settings: Settings, slots: Any) -> None:
    """Entry point of a worker process (spawned): serve handed-over connections until end-of-file."""
    from .. import logs

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _Channel(sock)
    logs.setup_handler(_ForwardHandler(channel), settings.server.log_level)
    try:
        server = _serve(settings, AssociationSlots(slots, number - 1, settings.dicom.max_associations))
        context = tls.server_context(settings.dicom)
    except Exception:
        log.exception("DICOM worker %d could not start", number)
        os._exit(3)
    channel.send(b"R")
    threading.Thread(target=_beat, args=(channel, server.listener.archive), name="heartbeat", daemon=True).start()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _HANDOFF.size, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the main process is gone, or stopping: so are we
        if len(data) != _HANDOFF.size or len(fds) != 1:
            log.error(
                "DICOM worker %d: malformed hand-over (%d bytes, %d descriptors): stopping", number, len(data), len(fds)
            )
            break
        kind, is_tls, connection_id = _HANDOFF.unpack(data)
        connection = Connection(connection_id, "", is_tls, peer_over_limit=kind == b"P")
        _serve_connection(server, channel, socket.socket(fileno=fds[0]), connection, context, settings)
    _abort_all(server)
    logging.shutdown()
    os._exit(0)


def _beat(channel: _Channel, archive: Any) -> None:
    """Once a second: an index read, then a heartbeat to the main process. An index error is a read
    that came back (not a hang): the corruption handling deals with it."""
    while True:
        with contextlib.suppress(Exception):
            archive.index.ping()
        channel.send(b"H")
        time.sleep(BEAT_S)


def _serve(settings: Settings, slots: AssociationSlots) -> Any:
    """This worker's own Archive and listener, and a server that does not listen."""
    from ..archive import open_archive
    from .scp import DicomListener

    archive = open_archive(settings, "dicom-worker", migrate=False)  # the main process migrated the index
    return DicomListener(archive, slots).handoff_server()


def _serve_connection(
    server: Any, channel: _Channel, sock: socket.socket, connection: Connection, context: Any, settings: Settings
) -> None:
    """Serve one handed-over connection (connections.serve); tell the main process of its request and end."""
    with contextlib.suppress(OSError):  # else already gone: it ends at once
        connection = Connection(connection.id, sock.getpeername()[0], connection.tls, connection.peer_over_limit)

    def ended(connection_id: int, assoc: Any) -> None:
        server.listener.connection_ended(assoc)
        channel.send(b"C", _ID.pack(connection_id))

    connections.serve(
        server,
        sock,
        connection,
        tls=context,
        timeout=settings.dicom.pre_association_timeout,
        on_requested=lambda connection_id: channel.send(b"Q", _ID.pack(connection_id)),
        on_ended=ended,
    )


def _abort_all(server: Any) -> None:
    """The main process went away: abort open associations (at most a second), so peers know."""
    from .scp import abort_all

    abort_all(server)
