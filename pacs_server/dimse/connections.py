"""DICOM connections from the TCP accept to the A-ASSOCIATE-RQ: ports, TLS, limits and deadlines.

pynetdicom gives each accepted connection its threads at once, counts it against its association
limit, and waits 30 s (the ACSE timeout) for the A-ASSOCIATE-RQ; a TLS handshake even runs in
its accept loop. So 100 idle TCP connections (a port scanner, a slowloris) filled
``dicom.max_associations`` and blocked DICOM, and one silent client on a TLS port would have
stopped all TLS accepts. Here, in front of pynetdicom:

- ``Listeners`` own the listening sockets (the DICOM port, and the TLS port when
  ``dicom.tls_cert``/``tls_key`` are set) and accept; each connection goes through the gate, then
  to a ``dispatch`` (a worker process, or this process).
- ``ConnectionGate`` counts connections per IP address (``dicom.max_associations_per_peer``:
  more are marked, and the listener rejects their A-ASSOCIATE-RQ with "local limit exceeded"),
  and watches each one until its A-ASSOCIATE-RQ has arrived: after
  ``dicom.pre_association_timeout`` seconds (TLS handshake included) it is closed, and at most
  ``dicom.max_associations`` connections wait at once: a new one closes the oldest waiting one
  (one over its peer's limit first). It holds a duplicate of each waiting socket to close it
  from the accepting process. Waiting connections do not count against ``max_associations``.
- ``serve`` runs, in the process that serves the association, one thread per connection: the
  TLS handshake, then a wait (no pynetdicom threads yet, so no polling) until the client sends
  its first bytes, then pynetdicom's association.
- ``AssociationSlots`` counts admitted associations across processes (shared memory, one count
  per process so that a dead worker's count is simply zeroed): ``dicom.max_associations``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import selectors
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from .. import tls_files
from ..config import DicomSettings

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.25  # how often the gate looks for connections past their deadline
SAFETY_MARGIN_S = 5.0  # a serving thread's own last-resort wait beyond the gate's deadline
GATE_FIRST_S = REAP_INTERVAL_S + 1.0  # pynetdicom's and the handshake's timeouts wait this much longer


@dataclass(frozen=True)
class Connection:
    """One accepted connection, as the accepting process describes it to the serving one."""

    id: int
    ip: str
    tls: bool
    peer_over_limit: bool  # more than dicom.max_associations_per_peer connections from ``ip``


@dataclass
class _Waiting:
    connection: Connection
    since: float
    handle: socket.socket  # a duplicate of the connection's socket, to close it from here


class ConnectionGate:
    """Open connections per IP address, and the deadline of each until its A-ASSOCIATE-RQ."""

    def __init__(self, d: DicomSettings) -> None:
        self.per_peer = d.max_associations_per_peer
        self.max_waiting = d.max_associations
        self.timeout = d.pre_association_timeout
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._per_ip: Counter[str] = Counter()
        self._ip_of: dict[int, str] = {}
        self._waiting: OrderedDict[int, _Waiting] = OrderedDict()  # oldest first
        self._timed_out: Counter[str] = Counter()  # since the last log line, by IP address
        self._evicted: Counter[str] = Counter()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def open(self, sock: socket.socket, ip: str, tls: bool) -> Connection:
        """Count a new connection; close the oldest waiting one if too many wait."""
        handle = sock.dup()  # first: without a descriptor left (OSError), nothing is counted
        with self._lock:
            self._per_ip[ip] += 1
            connection = Connection(next(self._ids), ip, tls, self._per_ip[ip] > self.per_peer)
            self._ip_of[connection.id] = ip
            self._waiting[connection.id] = _Waiting(connection, time.monotonic(), handle)
            victims = []
            while len(self._waiting) > self.max_waiting:
                victim = next((w for w in self._waiting.values() if w.connection.peer_over_limit), None)
                victim = victim or next(iter(self._waiting.values()))
                del self._waiting[victim.connection.id]
                self._evicted[victim.connection.ip] += 1
                victims.append(victim)
        for victim in victims:
            _close(victim.handle)
        return connection

    def requested(self, connection_id: int) -> None:
        """Its A-ASSOCIATE-RQ arrived: no deadline any more (pynetdicom's timeouts apply)."""
        with self._lock:
            waiting = self._waiting.pop(connection_id, None)
        if waiting is not None:
            waiting.handle.close()

    def closed(self, connection_id: int) -> None:
        """The connection ended (reported once by the serving side)."""
        with self._lock:
            ip = self._ip_of.pop(connection_id, None)
            if ip is not None:
                self._per_ip[ip] -= 1
                if self._per_ip[ip] <= 0:
                    del self._per_ip[ip]
            waiting = self._waiting.pop(connection_id, None)
        if waiting is not None:
            waiting.handle.close()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"connections": len(self._ip_of), "awaiting_request": len(self._waiting)}

    # -- the deadline ------------------------------------------------------------------------------
    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap_loop, name="dicom-gate", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(2.0)
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), OrderedDict()
        for w in waiting:
            _close(w.handle)

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            self.reap()

    def reap(self) -> None:
        """Close connections that sent no A-ASSOCIATE-RQ in time; one log line for all of them."""
        deadline = time.monotonic() - self.timeout
        with self._lock:
            late = [w for w in self._waiting.values() if w.since <= deadline]
            for w in late:
                del self._waiting[w.connection.id]
                self._timed_out[w.connection.ip] += 1
            timed_out, self._timed_out = self._timed_out, Counter()
            evicted, self._evicted = self._evicted, Counter()
        for w in late:
            _close(w.handle)
        if timed_out:
            log.warning(
                "closed %d DICOM connection(s) that sent no A-ASSOCIATE-RQ within %g s of connecting "
                "(dicom.pre_association_timeout), from %s: a port scan, a client stalled or not speaking DICOM "
                "(or plain DICOM on the TLS port)",
                sum(timed_out.values()),
                self.timeout,
                _by_address(timed_out),
            )
        if evicted:
            log.warning(
                "closed %d DICOM connection(s) still waiting for their A-ASSOCIATE-RQ to make room for new ones "
                "(at most dicom.max_associations = %d wait at once), from %s: many idle connections at once, "
                "possibly an attack",
                sum(evicted.values()),
                self.max_waiting,
                _by_address(evicted),
            )


def _by_address(counts: Counter[str]) -> str:
    shown = ", ".join(f"{ip} ({n})" for ip, n in counts.most_common(5))
    return shown + (f" and {len(counts) - 5} other addresses" if len(counts) > 5 else "")


def _close(sock: socket.socket) -> None:
    """End a connection through any of its descriptors: shutdown reaches every process holding it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class Listeners:
    """The DICOM port and (with TLS) the TLS port: bound sockets, and one accept thread each."""

    def __init__(self, d: DicomSettings, gate: ConnectionGate, dispatch: Callable[[socket.socket, Connection], None]):
        self.d = d
        self.gate = gate
        self.dispatch = dispatch  # takes the accepted socket over
        self._sockets: list[tuple[socket.socket, bool]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        # stop() writes a byte here: every accept loop wakes at once, instead of at its next poll.
        self._wake_read, self._wake_write = socket.socketpair()

    def bind(self) -> None:
        """Bind and listen now (a port in use fails here; early clients wait in the backlog)."""
        ports = [(self.d.port, False)] + ([(self.d.tls_port, True)] if self.d.tls_enabled else [])
        family = socket.AF_INET6 if ":" in self.d.bind else socket.AF_INET
        for port, tls in ports:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.d.bind, port))
            except OSError:
                sock.close()
                self.close()
                raise
            sock.listen(128)
            sock.setblocking(False)  # accepted only when the selector says so (_accept_loop)
            self._sockets.append((sock, tls))

    def start(self) -> None:
        self.gate.start()
        for sock, tls in self._sockets:
            name = "dicom-tls-acceptor" if tls else "dicom-acceptor"
            thread = threading.Thread(target=self._accept_loop, args=(sock, tls), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")  # never read: it wakes every loop's selector until they return
        for thread in self._threads:
            thread.join(2.0)
        self.close()
        self.gate.stop()
        self._wake_read.close()
        self._wake_write.close()

    def close(self) -> None:
        for sock, _tls in self._sockets:
            sock.close()
        self._sockets = []

    def _accept_loop(self, listening: socket.socket, tls: bool) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listening, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stopping:
                if any(key.fileobj is self._wake_read for key, _ in selector.select()):
                    return
                self._accept_one(listening, tls)

    def _accept_one(self, listening: socket.socket, tls: bool) -> None:
        """Accept the connection the selector announced, and hand it to the gate and the dispatcher."""
        try:
            conn, address = listening.accept()
        except BlockingIOError:
            return  # the peer gave up before we took it
        except OSError as exc:
            if not self._stopping:
                log.error("DICOM listener: accept failed: %s", exc)  # EMFILE: no descriptor left
                time.sleep(0.1)
            return
        # Blocking, whatever the listening socket is: on macOS an accepted socket inherits O_NONBLOCK.
        conn.setblocking(True)
        try:
            connection = self.gate.open(conn, address[0], tls)
        except OSError as exc:  # no descriptor left for the duplicate
            log.error("DICOM listener: cannot watch a new connection from %s (%s): closing it", address[0], exc)
            conn.close()
            return
        self.dispatch(conn, connection)


class AssociationSlots:
    """Admitted associations across the processes serving them, against ``dicom.max_associations``.

    ``counts`` is a shared ``multiprocessing`` Array of one count per serving process (``index``).
    """

    def __init__(self, counts: Any, index: int, limit: int) -> None:
        self.counts = counts
        self.index = index
        self.limit = limit

    def take(self) -> bool:
        with self.counts.get_lock():
            if sum(self.counts) >= self.limit:
                return False
            self.counts[self.index] += 1
            return True

    def give(self) -> None:
        with self.counts.get_lock():
            self.counts[self.index] = max(0, self.counts[self.index] - 1)

    def total(self) -> int:
        with self.counts.get_lock():
            return sum(self.counts)


# -- the serving side -----------------------------------------------------------------------------------
class HandoffServer(ThreadedAssociationServer):
    """pynetdicom's association server, fed with connections accepted elsewhere: it binds nothing."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


def serve(
    server: HandoffServer,
    sock: socket.socket,
    connection: Connection,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
    on_requested: Callable[[int], None],
    on_ended: Callable[[int, Any], None],
) -> None:
    """Serve one connection in a thread of its own; ``on_ended(id, association or None)`` once at its end."""
    threading.Thread(
        target=_serve,
        args=(server, sock, connection, tls, timeout, on_requested, on_ended),
        name=f"dicom-connection-{connection.id}",
        daemon=True,
    ).start()


def _serve(
    server: HandoffServer,
    sock: socket.socket,
    connection: Connection,
    tls: ssl.SSLContext | None,
    timeout: float,
    on_requested: Callable[[int], None],
    on_ended: Callable[[int, Any], None],
) -> None:
    ended = threading.Lock()
    handler: _Handoff | None = None
    deadline = time.monotonic() + timeout

    def end(event: Any = None) -> None:
        if ended.acquire(blocking=False):
            assoc = event.assoc if event is not None else handler.assoc if handler is not None else None
            on_ended(connection.id, assoc)

    try:
        if connection.tls:
            assert tls is not None
            sock = _handshake(sock, tls, connection, timeout)
            if sock is None:
                end()
                return
        if not _first_bytes(sock, timeout + SAFETY_MARGIN_S):
            _close(sock)
            end()
            return
        handler = _Handoff(sock, sock.getpeername(), server, connection, deadline, on_requested, end)
    except Exception:
        log.exception("DICOM: could not serve a connection from %s", connection.ip)
        _close(sock)
        end()
        return
    handler.assoc.join()
    end()


def _handshake(sock: socket.socket, tls: ssl.SSLContext, connection: Connection, timeout: float) -> Any:
    """The TLS socket after a completed handshake, or None (logged) when it failed."""
    peer = f"{connection.ip}:{_port(sock)}"
    started = time.monotonic()
    # Per operation, a little longer than the gate's deadline, which bounds the whole and logs it.
    sock.settimeout(timeout + GATE_FIRST_S)
    try:
        wrapped = tls.wrap_socket(sock, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        # A client that went away, or one the gate closed (its own log line counts those), is no news.
        gone = isinstance(exc, ssl.SSLEOFError | ConnectionError) or time.monotonic() - started >= timeout
        level = logging.DEBUG if gone else logging.WARNING
        log.log(level, "DICOM TLS connection from %s refused: %s", peer, _handshake_failure(exc))
        _close(sock)
        return None
    wrapped.settimeout(None)
    return wrapped


def _port(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[1])
    except OSError:
        return "?"


def _handshake_failure(exc: BaseException) -> str:
    """What a failed server-side handshake means, for an administrator: the client-certificate cases
    (only the DICOM port asks for one), then what every TLS port shares (tls_files)."""
    text = str(exc)
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return (
            "the client sent no certificate, and dicom.tls_require_client_cert is on: give it a certificate "
            "signed by a CA in dicom.tls_ca"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"its certificate is not signed by a CA in dicom.tls_ca, or has expired ({text})"
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "no complete handshake in time (dicom.pre_association_timeout)"
    return tls_files.handshake_failure(
        exc,
        not_tls="plain DICOM on the TLS port? That is dicom.port",
        untrusted="give it dicom.tls_cert to trust, or a certificate from a CA it trusts",
        otherwise="the client went away, or the gate closed it",
    )


def _first_bytes(sock: Any, timeout: float) -> bool:
    """Wait, without any pynetdicom thread, until the client sends; False when it went away.

    The gate closes a connection past its deadline; ``timeout`` is only a last resort.
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # not select: no limit on the descriptor number
    poller.register(sock, select.POLLIN)
    if not poller.poll(timeout * 1000):
        return False
    if isinstance(sock, ssl.SSLSocket):
        return True  # no peek through TLS: pynetdicom reads the end of the stream, if that is what came
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


class _Handoff(RequestHandler):
    """pynetdicom's request handler for one connection: marks it, and reports its request and end."""

    def __init__(
        self,
        request: Any,
        address: Any,
        server: Any,
        connection: Connection,
        deadline: float,
        on_requested: Callable[[int], None],
        on_close: Callable[[Any], None],
    ) -> None:
        self.connection = connection
        self.deadline = deadline
        self.on_requested = on_requested
        self.on_close = on_close
        self.assoc: Any = None
        super().__init__(request, address, server)

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.macpacs_peer_over_limit = self.connection.peer_over_limit
        # Until the request: pynetdicom's wait for it (and its ARTIM timer) ends with the gate's deadline,
        # so that the threads of a connection the gate closed do not linger for the whole ACSE timeout.
        # (A little later than the gate, which logs what it closes.)
        assoc.acse_timeout = max(0.1, self.deadline - time.monotonic()) + GATE_FIRST_S
        assoc.bind(evt.EVT_REQUESTED, self._requested)
        assoc.bind(evt.EVT_CONN_CLOSE, self.on_close)
        self.assoc = assoc
        return assoc

    def _requested(self, event: Any) -> None:
        event.assoc.acse_timeout = self.server.ae.acse_timeout
        self.on_requested(self.connection.id)
