"""The XML-RPC listener: OsiriX's dialect on its own port, in threads of the archive process.

POST to any path; method names are case-insensitive. Connections are accepted from localhost and
``xmlrpc.allowed_hosts`` only (checked on accept: another host is answered 403 and holds
nothing). One front-end thread reads each request whole under ``request_deadline``'s deadlines
before it takes one of the call slots (``_HttpServer``), so slow clients cannot hold the slots,
and localhost keeps a few slots of its own for the supervisor's probe. Calls are accepted only as
an XML-RPC client sends them (``guard``: no Origin, an XML Content-Type, a Host naming this
server), checked with any credentials before the body is parsed. Bodies are size-limited and
parsed by defusedxml's expat parser (no DTD, no entities: an XML bomb is refused, not expanded).
Calls that change or stop something need credentials unless ``xmlrpc.open_changes`` is on (``guard.authorize``).
With ``xmlrpc.tls`` the port speaks only HTTPS (``tls.py``): the front end tells a ClientHello from
plain HTTP by the first byte, answers plain HTTP 400, and runs each handshake non-blocking within
the request's header deadline, so that a client that never finishes one holds no slot either.

HTTP status follows OsiriX: 200 with the method's struct; 400 (a struct ``{error: "400",
message}``) for a call it cannot serve; 500 for an unknown method. The reason phrase carries the
message too, so that ``xmlrpc.client``'s ProtocolError shows it.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from xmlrpc.server import SimpleXMLRPCDispatcher

from defusedxml import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser

from ..archive import Archive
from ..request_deadline import BODY_S, HEADER_S, MIN_RATE, Deadline, SlowClientReport
from ..users import User
from .guard import Refused, authenticate, authorize, check_headers, ip_address, own_host_names
from .methods import BadRequest, OsirixMethods, needs
from .tls import handshake_failure, server_context

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # bytes; an OsiriX call is a few hundred
MAX_HEADER = 64 * 1024  # bytes of request line and headers
MAX_CONCURRENT = 32  # calls served at once; more complete calls are answered 503
LOCAL_RESERVED = 4  # more calls, from localhost only, when those are taken (the supervisor's probe)
MAX_OPEN = 1024  # connections being read at once; more are answered 503
ACCEPT_BURST = 64  # connections accepted per turn of the front end
DRAIN_S = 2.0  # after a refusal: how long the client's leftover request is read and dropped
CONNECTION_TIMEOUT = 10.0  # seconds, as OsiriX
LOCALHOST = ("127.0.0.1/32", "::1/128")
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello
PLAIN_ON_TLS = "XML-RPC: this port speaks HTTPS only (xmlrpc.tls is on): call it with an https:// URL"


class UnknownMethod(LookupError):
    pass


class Dispatcher(SimpleXMLRPCDispatcher):
    """The standard dispatcher, with OsiriX's case-insensitive method names."""

    def __init__(self, methods: dict[str, Callable[..., Any]]) -> None:
        super().__init__(allow_none=False, encoding="utf-8", use_builtin_types=True)
        for name, func in methods.items():
            self.register_function(func, name)
        self.register_introspection_functions()
        self._names = {name.lower(): name for name in self.funcs}

    def _dispatch(self, method: str, params: Any) -> Any:
        name = self._names.get(method.lower())
        if name is None:
            raise UnknownMethod(method)
        return super()._dispatch(name, params)


def parse_call(body: bytes) -> tuple[tuple[Any, ...], str]:
    """A ``<methodCall>`` → (params, method name), through defusedxml's guarded expat parser."""
    target = xmlrpc.client.Unmarshaller(use_builtin_types=True)
    parser = DefusedExpatParser(target, forbid_dtd=True)
    parser.feed(body)
    parser.close()
    params = target.close()
    method = target.getmethodname()
    if not method:
        raise ValueError("no <methodName>")
    return tuple(params), method


def allowed_networks(hosts: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Localhost plus ``xmlrpc.allowed_hosts``: addresses, networks (CIDR) or host names."""
    networks = [ipaddress.ip_network(net) for net in LOCALHOST]
    for entry in hosts:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(entry.strip(), None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            log.error("xmlrpc.allowed_hosts: cannot resolve %r (%s); it is ignored", entry, exc)
            continue
        for info in infos:
            networks.append(ipaddress.ip_network(info[4][0]))
    return networks


def _reason(message: str) -> str:
    """An HTTP reason phrase: one line of printable ASCII."""
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in message)
    return text[:300]


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "macpacs-xmlrpc"
    protocol_version = "HTTP/1.0"  # one call per connection
    timeout = CONNECTION_TIMEOUT  # for writing the answer: the request is already read
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # The whole request was read by the front end (``_HttpServer``): parse it from memory.
        self.rfile.close()
        self.rfile = io.BytesIO(self.server.request_bytes())

    def do_POST(self) -> None:
        self.server.app.handle(self)

    def do_GET(self) -> None:
        self.reply(405, "XML-RPC: POST a <methodCall> to this port", b"")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def reply(self, status: int, reason: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send the answer; ``headers`` are constants or numbers, never text from the request."""
        self.send_response(status, _reason(reason))
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _answer(status: int, reason: str, body: bytes = b"") -> bytes:
    """A complete HTTP/1.0 answer sent by the front end itself (refusals, time-outs)."""
    head = f"HTTP/1.0 {status} {_reason(reason)}\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


@dataclass(eq=False)
class _Connection:
    """A connection the front end is reading a request from (or, once refused, draining)."""

    sock: socket.socket
    host: str
    deadline: Deadline
    data: bytearray = field(default_factory=bytearray)
    header_end: int | None = None  # offset of the body, once the headers are in
    total: int | None = None  # bytes of the whole request, once known
    draining: bool = False  # answered and shut for writing: read and drop until the client closes
    # "hello" (HTTPS port, nothing received yet), "handshake" (TLS under way), "request".
    phase: str = "request"


class _HttpServer(http.server.HTTPServer):
    """Bind and listen as ``HTTPServer``; serve with one front-end thread and threads per call.

    The front end (``serve``) accepts, checks the allow-list, and reads each request whole
    (headers, then ``Content-Length`` bytes of body, up to MAX_BODY) from non-blocking sockets
    in one selector, under ``request_deadline``'s deadlines. Only a complete request takes one
    of the MAX_CONCURRENT call slots and a thread. So slow or stalled clients hold a buffer and
    a descriptor for at most the deadline, never a slot; a host not allowed holds nothing; and
    localhost (the supervisor's probe, OsiriX on the Mac itself) has LOCAL_RESERVED more slots
    that remote callers cannot take. With ``tls``, each connection first goes through its
    handshake in the same selector, under the same header deadline.
    """

    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: XmlRpcServer, tls: ssl.SSLContext | None) -> None:
        self.app = app
        self.tls = tls
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self.local_slots = threading.BoundedSemaphore(LOCAL_RESERVED)
        self.last_loop = time.monotonic()  # the front end's last turn (heartbeat.py reads it)
        self._selector = selectors.DefaultSelector()
        self._open: dict[int, _Connection] = {}
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()
        self._request = threading.local()
        self._slow = SlowClientReport(log, "XML-RPC")
        super().__init__(address, _Handler)

    # -- the front end ---------------------------------------------------------------------------
    def serve(self) -> None:
        self.socket.setblocking(False)
        self._wake_read.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        while not self._stopping.is_set():
            now = time.monotonic()
            self.last_loop = now
            soonest = min((c.deadline.at for c in self._open.values()), default=now + 1.0)
            for key, _events in self._selector.select(max(0.0, min(1.0, soonest - now))):
                if key.fileobj is self.socket:
                    self._accept()
                elif key.fileobj is self._wake_read:
                    with contextlib.suppress(OSError):
                        self._wake_read.recv(64)
                elif key.data.phase == "hello":
                    self._hello(key.data)
                elif key.data.phase == "handshake":
                    self._handshake(key.data)
                else:
                    self._receive(key.data)
            self._expire(time.monotonic())
        for conn in list(self._open.values()):
            self._close(conn)
        self._selector.close()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_read.close()
        self._wake_write.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: say so, and give the system a moment
                log.error("XML-RPC: cannot accept a connection: %s", exc)
                time.sleep(0.05)
                return
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        host = address[0]
        conn = _Connection(sock, host, Deadline.headers(), phase="hello" if self.tls else "request")
        if len(self._open) >= MAX_OPEN:
            log.warning("XML-RPC: %d connections open; refused one from %s", MAX_OPEN, host)
            self._refuse_on_accept(conn, _answer(503, "XML-RPC server busy, try again"))
        elif not self.app.is_allowed(host):
            log.warning("XML-RPC: refused a call from %s: not localhost and not in xmlrpc.allowed_hosts", host)
            message = f"XML-RPC calls from {host} are not allowed; add it to xmlrpc.allowed_hosts on the server"
            self._refuse_on_accept(conn, _answer(403, message, _error_struct("403", message)))
        else:
            self._open[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _refuse_on_accept(self, conn: _Connection, answer: bytes) -> None:
        """Answer in plain HTTP; on the HTTPS port close at once: an answer there needs a
        handshake, which a connection refused on accept is not worth (the log line says why)."""
        if self.tls is None:
            self._refuse(conn, answer)
        else:
            conn.sock.close()

    def _hello(self, conn: _Connection) -> None:
        """HTTPS port, first bytes in: a ClientHello starts the handshake, plain HTTP is answered 400."""
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            first = b""
        if not first:
            self._close(conn)
        elif first[0] == TLS_HANDSHAKE:
            assert self.tls is not None
            self._forget(conn)
            try:
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError) as exc:
                log.warning("XML-RPC: cannot start TLS with %s: %s", conn.host, exc)
                conn.sock.close()
                return
            conn.phase = "handshake"
            self._open[conn.sock.fileno()] = conn
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._handshake(conn)
        else:
            log.warning("XML-RPC: refused a plain-HTTP request from %s: this port speaks HTTPS (xmlrpc.tls)", conn.host)
            conn.phase = "request"
            self._refuse(conn, _answer(400, PLAIN_ON_TLS, _error_struct("400", PLAIN_ON_TLS)))

    def _handshake(self, conn: _Connection) -> None:
        """One non-blocking step of the TLS handshake; the request is read once it completes."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, conn)
            return
        except (OSError, ssl.SSLError) as exc:
            # A client that went away is no news; one that cannot or will not speak TLS with us is.
            gone = isinstance(exc, ssl.SSLEOFError | ConnectionError)
            log.log(
                logging.DEBUG if gone else logging.WARNING,
                "XML-RPC: TLS connection from %s refused: %s",
                conn.host,
                handshake_failure(exc),
            )
            self._close(conn)
            return
        conn.phase = "request"
        self._selector.modify(sock, selectors.EVENT_READ, conn)
        self._receive(conn)  # the request may have come with the handshake's last flight

    def _receive(self, conn: _Connection) -> None:
        # Through TLS, a record read from the socket may hold more than one recv returns, and
        # the selector does not see what the TLS layer keeps: read until it keeps nothing.
        while self._receive_once(conn) and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            pass

    def _receive_once(self, conn: _Connection) -> bool:
        """Read what one recv gives; True while the connection is still being read."""
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            chunk = b""
        if not chunk:  # the client went away (or, draining, read our answer and closed)
            self._close(conn)
            return False
        if conn.draining:
            return False
        if not conn.data and chunk[0] == TLS_HANDSHAKE and self.tls is None:
            log.warning(
                "XML-RPC: refused an https:// client from %s: this port speaks plain HTTP "
                "(xmlrpc.tls is off): call it with an http:// URL, or turn xmlrpc.tls on",
                conn.host,
            )
            self._close(conn)
            return False
        conn.data += chunk
        conn.deadline.received(len(chunk))
        if conn.header_end is None:
            end = conn.data.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.data) > MAX_HEADER:
                    self._refuse(conn, _answer(431, f"XML-RPC: request headers over {MAX_HEADER} bytes"))
                    return False
                return True
            conn.header_end = end + 4
            length = _content_length(bytes(conn.data[: conn.header_end]))
            # Without a usable length, the call's handler answers 411 or 413 from the headers alone.
            conn.total = conn.header_end + length if 0 <= length <= MAX_BODY else conn.header_end
            conn.deadline = Deadline.body()
        assert conn.total is not None
        if len(conn.data) >= conn.total:
            self._forget(conn)
            self._dispatch(conn)
            return False
        return True

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._open.values() if c.deadline.at <= now]:
            if conn.draining:
                self._close(conn)
                continue
            if conn.phase != "request":  # no TLS session to answer through
                self._slow.closed(conn.host, f"TLS handshake not completed within {HEADER_S:g} s")
                self._close(conn)
                continue
            what = "request headers" if conn.header_end is None else "request body"
            limit = HEADER_S if conn.header_end is None else BODY_S
            self._slow.closed(conn.host, f"{what} not in within {limit:g} s at {MIN_RATE:g} bytes/s")
            self._refuse(conn, _answer(408, f"XML-RPC: {what} not received in time"))

    def _refuse(self, conn: _Connection, answer: bytes) -> None:
        """Answer at once without a thread, then drain what the client still sends for a moment:
        closing with unread data resets the connection, and the client might lose the answer."""
        try:
            conn.sock.send(answer)
            _close_notify(conn.sock)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.draining = True
        conn.deadline = Deadline(DRAIN_S)
        if conn.sock.fileno() not in self._open:
            self._open[conn.sock.fileno()] = conn
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _forget(self, conn: _Connection) -> None:
        if self._open.pop(conn.sock.fileno(), None) is not None:
            self._selector.unregister(conn.sock)

    def _close(self, conn: _Connection) -> None:
        self._forget(conn)
        conn.sock.close()

    # -- calls -------------------------------------------------------------------------------------
    def _dispatch(self, conn: _Connection) -> None:
        """A complete request: a slot and a thread for it, or 503 when every slot is taken."""
        slot = self.slots
        if not slot.acquire(blocking=False):
            slot = self.local_slots
            if not (self.app.is_local(conn.host) and slot.acquire(blocking=False)):
                log.warning("XML-RPC: %d calls in progress; refused a call from %s", MAX_CONCURRENT, conn.host)
                self._refuse(conn, _answer(503, "XML-RPC server busy, try again"))
                return
        conn.sock.setblocking(True)
        thread = threading.Thread(target=self._serve_call, args=(conn, slot), name="xmlrpc-call", daemon=True)
        thread.start()

    def _serve_call(self, conn: _Connection, slot: threading.BoundedSemaphore) -> None:
        try:
            self._request.data = bytes(conn.data)
            address = (conn.host, 0)
            with contextlib.suppress(OSError):
                address = conn.sock.getpeername()
            try:
                self.finish_request(conn.sock, address)
            except OSError as exc:  # the client gave up (a probe's time-out, say): nothing to answer
                log.info("XML-RPC: the client at %s went away before its answer was sent (%s)", conn.host, exc)
            except Exception:
                log.exception("XML-RPC: a call from %s failed", conn.host)
            _close_notify(conn.sock)
            self.shutdown_request(conn.sock)
        finally:
            slot.release()

    def request_bytes(self) -> bytes:
        """The request this thread serves, as the front end read it."""
        data: bytes = self._request.data
        return data


def _close_notify(sock: socket.socket) -> None:
    """End a TLS session with its close_notify alert, without waiting for the client's own:
    clients that read to the end of the stream (curl, openssl) then see a clean end."""
    if isinstance(sock, ssl.SSLSocket):
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # SSLWantReadError: the client's alert is not awaited
            sock.unwrap()


def _content_length(head: bytes) -> int:
    """The Content-Length of a request's header block; -1 when absent, repeated or not a number."""
    values = [
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:] if line[:15].lower() == b"content-length:"
    ]
    if len(values) != 1 or not values[0].isdigit():
        return -1
    return int(values[0])


class XmlRpcServer:
    """The XML-RPC interface of one archive process: ``start`` in a thread, ``stop`` cleanly."""

    def __init__(self, archive: Archive) -> None:
        self.settings = archive.settings
        self.users = archive.users
        self.methods = OsirixMethods(archive)
        self.dispatcher = Dispatcher(self.methods.table())
        self.networks = allowed_networks(self.settings.xmlrpc.allowed_hosts)
        self.local_networks = allowed_networks(())
        self.host_names = own_host_names(self.settings.xmlrpc.allowed_host_names)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def bind(self) -> None:
        """Bind and listen on the XML-RPC port; calls wait in its backlog until ``start``."""
        s = self.settings.xmlrpc
        self._httpd = _HttpServer((s.bind, s.port), self, server_context(self.settings))

    def start(self) -> None:
        """Serve the bound port in a thread."""
        s = self.settings.xmlrpc
        assert self._httpd is not None, "bind() first"
        self._thread = threading.Thread(target=self._httpd.serve, name="xmlrpc", daemon=True)
        self._thread.start()
        log.info("XML-RPC (OsiriX) listening on %s:%d%s", s.bind, self.port, " (HTTPS)" if s.tls else "")

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.stop()
            if self._thread is not None:
                self._thread.join(5)
                self._thread = None
            self._httpd.server_close()
            self._httpd = None

    @property
    def last_loop(self) -> float | None:
        """Monotonic time of the front end's last turn (it turns at least once a second), for heartbeat.py."""
        return self._httpd.last_loop if self._httpd is not None and self._thread is not None else None

    def is_allowed(self, host: str) -> bool:
        """Checked on accept, before the connection is read: a host not allowed holds nothing."""
        return self._within(host, self.networks)

    def is_local(self, host: str) -> bool:
        return self._within(host, self.local_networks)

    @staticmethod
    def _within(host: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
        address = ip_address(host)
        if address is None:
            return False
        return any(address.version == net.version and address in net for net in networks)

    # -- one request -------------------------------------------------------------------------------
    def handle(self, req: _Handler) -> None:
        host = req.client_address[0]
        try:
            check_headers(req.headers, req.connection.getsockname()[0], self.host_names)
            user = authenticate(req.headers, self.users, host)
        except Refused as exc:
            self._refuse(req, host, exc)
            return
        self._call(req, host, user)

    def _call(self, req: _Handler, host: str, user: User | None) -> None:
        """Read, parse, authorize and dispatch one call from an admitted client."""
        try:
            length = int(req.headers.get("Content-Length") or "-1")
        except ValueError:
            length = -1
        if length < 0:
            req.reply(411, "XML-RPC: Content-Length is required", b"")
            return
        if length > MAX_BODY:
            log.warning("XML-RPC: refused a %d-byte call from %s (limit %d)", length, host, MAX_BODY)
            req.reply(413, f"XML-RPC call body is {length} bytes (limit {MAX_BODY})", b"")
            return
        if req.headers.get("Content-Encoding", "identity").lower() != "identity":
            req.reply(415, "XML-RPC: compressed bodies are not accepted", b"")
            return
        body = req.rfile.read(length)
        try:
            params, method = parse_call(body)
        except DefusedXmlException as exc:
            log.warning("XML-RPC: refused a call from %s with XML entities or a DTD (%s)", host, exc)
            self._bad(req, "XML entities and DTDs are not accepted in XML-RPC calls")
            return
        except (xml.parsers.expat.ExpatError, xmlrpc.client.ResponseError, ValueError, TypeError) as exc:
            self._bad(req, f"not a valid XML-RPC <methodCall>: {exc}")
            return
        try:
            authorize(method[:80], needs(method, params), user, self.settings.xmlrpc.open_changes)
        except Refused as exc:
            self._refuse(req, host, exc)
            return
        self.methods.local.caller = f"{user.username}@{host}" if user else host
        try:
            result = self.dispatcher._dispatch(method, params)
        except UnknownMethod:
            log.info("XML-RPC: unknown method %r from %s", method[:80], host)
            message = f"unknown XML-RPC method {method[:80]!r} (system.listMethods lists them)"
            fault = xmlrpc.client.dumps(xmlrpc.client.Fault(-32601, message), methodresponse=True)
            req.reply(500, message, fault.encode())
            return
        except BadRequest as exc:
            log.info("XML-RPC %s from %s: %s", method[:80], host, exc)
            self._bad(req, str(exc))
            return
        except Exception:
            log.exception("XML-RPC %s from %s failed", method[:80], host)
            message = f"{method[:80]} failed on the server; see the server log"
            req.reply(500, message, _error_struct("-1", message))
            return
        body = xmlrpc.client.dumps((result,), methodresponse=True, encoding="utf-8").encode("utf-8")
        req.reply(200, "OK", body)

    @staticmethod
    def _refuse(req: _Handler, host: str, exc: Refused) -> None:
        log.warning("XML-RPC: refused a call from %s: %s", host, exc.message.removeprefix("XML-RPC: "))
        req.reply(exc.status, exc.message, _error_struct(str(exc.status), exc.message), exc.headers)

    @staticmethod
    def _bad(req: _Handler, message: str) -> None:
        req.reply(400, message, _error_struct("400", message))


def _error_struct(code: str, message: str) -> bytes:
    """OsiriX's error reply, ``{error: code}``, with a ``message`` saying what went wrong."""
    return xmlrpc.client.dumps(({"error": code, "message": message},), methodresponse=True).encode("utf-8")
