"""The XML-RPC listener: OsiriX's dialect on its own port, in threads of the archive process.

POST to any path; method names are case-insensitive. Calls are accepted from localhost and from
``xmlrpc.allowed_hosts`` only, and only as an XML-RPC client sends them (``guard``: no Origin,
an XML Content-Type, a Host naming this server), checked with any credentials before the body
is read. Bodies are size-limited before they are read and parsed by defusedxml's expat parser
(no DTD, no entities: an XML bomb is refused, not expanded). Calls that change or stop something
need credentials unless ``xmlrpc.open_changes`` is on (``guard.authorize``).

HTTP status follows OsiriX: 200 with the method's struct; 400 (a struct ``{error: "400",
message}``) for a call it cannot serve; 500 for an unknown method. The reason phrase carries the
message too, so that ``xmlrpc.client``'s ProtocolError shows it.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import logging
import socket
import socketserver
import threading
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Iterable
from typing import Any
from xmlrpc.server import SimpleXMLRPCDispatcher

from defusedxml import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser

from ..archive import Archive
from ..users import User
from .guard import Refused, authenticate, authorize, check_headers, ip_address, own_host_names
from .methods import BadRequest, OsirixMethods, needs

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # bytes; an OsiriX call is a few hundred
MAX_CONCURRENT = 32  # calls served at once; more connections are answered 503
CONNECTION_TIMEOUT = 10.0  # seconds, as OsiriX
LOCALHOST = ("127.0.0.1/32", "::1/128")


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
    timeout = CONNECTION_TIMEOUT
    server: _HttpServer

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


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True  # a hung call must not hold up the process's stop
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: XmlRpcServer) -> None:
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded before a thread exists: a flood of connections cannot pile up threads.
        if not self.slots.acquire(blocking=False):
            log.warning(
                "XML-RPC: %d calls in progress; refused a connection from %s", MAX_CONCURRENT, client_address[0]
            )
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 XML-RPC server busy, try again\r\nContent-Length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class XmlRpcServer:
    """The XML-RPC interface of one archive process: ``start`` in a thread, ``stop`` cleanly."""

    def __init__(self, archive: Archive) -> None:
        self.settings = archive.settings
        self.users = archive.users
        self.methods = OsirixMethods(archive)
        self.dispatcher = Dispatcher(self.methods.table())
        self.networks = allowed_networks(self.settings.xmlrpc.allowed_hosts)
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
        self._httpd = _HttpServer((s.bind, s.port), self)

    def start(self) -> None:
        """Serve the bound port in a thread."""
        s = self.settings.xmlrpc
        assert self._httpd is not None, "bind() first"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xmlrpc", daemon=True)
        self._thread.start()
        log.info("XML-RPC (OsiriX) listening on %s:%d", s.bind, self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:  # shutdown() waits for a serve_forever that must have begun
                self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def is_allowed(self, host: str) -> bool:
        address = ip_address(host)
        if address is None:
            return False
        return any(address.version == net.version and address in net for net in self.networks)

    # -- one request -------------------------------------------------------------------------------
    def handle(self, req: _Handler) -> None:
        host = req.client_address[0]
        if not self.is_allowed(host):
            log.warning("XML-RPC: refused a call from %s: not localhost and not in xmlrpc.allowed_hosts", host)
            message = f"XML-RPC calls from {host} are not allowed; add it to xmlrpc.allowed_hosts on the server"
            req.reply(403, message, _error_struct("403", message))
            return
        try:
            check_headers(req.headers, req.connection.getsockname()[0], self.host_names)
            user = authenticate(req.headers, self.users, host)
        except Refused as exc:
            _discard_body(req)
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


def _discard_body(req: _Handler) -> None:
    """Read and drop the body of a call refused on its headers (never parsed), up to MAX_BODY:
    closing a connection with unread data resets it, and the client might lose the answer."""
    try:
        length = int(req.headers.get("Content-Length") or "0")
    except ValueError:
        return
    if 0 < length <= MAX_BODY:
        with contextlib.suppress(OSError):
            req.rfile.read(length)


def _error_struct(code: str, message: str) -> bytes:
    """OsiriX's error reply, ``{error: code}``, with a ``message`` saying what went wrong."""
    return xmlrpc.client.dumps(({"error": code, "message": message},), methodresponse=True).encode("utf-8")
