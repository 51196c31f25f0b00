"""Who may call the XML-RPC port: checks on a request's headers, made before its body is parsed.

The port speaks plain HTTP, so any web page open in a browser on the Mac could otherwise POST to
it: delete studies, stop the server, and (through DNS rebinding, a name of the attacker's that
resolves to 127.0.0.1) read the answers. Three rules close that, none of which an XML-RPC client
(OsiriX, Horos, Python's ``xmlrpc.client``, curl) ever trips:

- no ``Origin`` header: browsers add one to every cross-site POST, XML-RPC clients never do;
- a ``Content-Type`` of ``text/xml`` or ``application/xml``: a page can only send other types
  without a CORS preflight, and this port answers no preflight;
- a ``Host`` that is one of this server's own names or addresses (``own_host_names``, plus
  ``xmlrpc.allowed_host_names``): a rebound name is not. A request without ``Host`` (HTTP/1.0)
  is allowed, as browsers always send one.

Calls that change or stop something also need credentials (``authenticate``): HTTP Basic with a
macpacs user (``macpacs users``, with the web's throttling of wrong passwords) or an API token
(as the Basic password, or ``Authorization: Bearer``), unless ``xmlrpc.open_changes`` is on.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from email.message import Message

from ..users import TOKEN_PREFIX, AuthFailed, Throttled, User, Users, basic_credentials

log = logging.getLogger(__name__)

XML_TYPES = ("text/xml", "application/xml")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
REALM = 'Basic realm="macpacs XML-RPC", charset="UTF-8"'


class Refused(Exception):
    """The request is not served: ``status`` and a one-line ``message`` for the caller and the log."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address (an IPv6 zone dropped, an IPv4-mapped one as IPv4), None if it is none."""
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _normal(name: str) -> str:
    """A host name or address as compared: lower case, no trailing dot, IPv6 without brackets."""
    name = name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    address = ip_address(name)
    return name if address is None else str(address)


def own_host_names(extra: Iterable[str]) -> frozenset[str]:
    """Names a client may put in ``Host``: localhost, this machine's names and addresses, ``extra``.

    Resolved once, at start. On a Mac the Bonjour name (``<name>.local``) counts as one of its
    names. The address a connection arrived on is accepted as well (``check_headers``), so a
    client that types the server's IP address passes even when the name does not resolve.
    """
    names = set(LOCAL_NAMES)
    hostname = socket.gethostname()
    short = hostname.split(".")[0]
    candidates = {hostname, short, f"{short}.local"}
    names |= candidates
    for candidate in candidates:
        try:
            infos = socket.getaddrinfo(candidate, None, proto=socket.IPPROTO_TCP, flags=socket.AI_CANONNAME)
        except (OSError, UnicodeError):
            continue
        for _family, _type, _proto, canonical, address in infos:
            names.add(str(address[0]))
            if canonical:
                names.add(canonical)
    names |= set(extra)
    return frozenset(_normal(name) for name in names if name)


def host_of(header: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``); None if malformed."""
    value = header.strip()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        host, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    if not host or any(not (ch.isalnum() or ch in "-._:%") or not ch.isascii() for ch in host):
        return None
    return _normal(host)


def check_headers(headers: Message, local_address: str, allowed_names: frozenset[str]) -> None:
    """Raise Refused (403) unless the request is an XML-RPC client's: see the module's rules."""
    if headers.get_all("Origin"):
        raise Refused(
            403,
            "XML-RPC: refused a request with an Origin header (sent by a web browser): web pages may not call "
            "this port; XML-RPC clients send none",
        )
    types = headers.get_all("Content-Type") or []
    media = types[0].split(";")[0].strip().lower() if len(types) == 1 else ""
    if media not in XML_TYPES:
        shown = ", ".join(types)[:60] or "none"
        raise Refused(
            403, f"XML-RPC: refused a request with Content-Type {shown!r}: send the call as text/xml (as OsiriX does)"
        )
    hosts = headers.get_all("Host") or []
    if len(hosts) > 1:
        raise Refused(403, "XML-RPC: refused a request with more than one Host header")
    if hosts:
        host = host_of(hosts[0])
        if host is None or (host not in allowed_names and host != _normal(local_address)):
            raise Refused(
                403,
                f"XML-RPC: refused a request for Host {hosts[0][:80]!r}, which is not a name of this server; "
                "if clients reach the server by that name, add it to xmlrpc.allowed_host_names",
            )


def authenticate(headers: Message, users: Users, address: str) -> User | None:
    """The user the request's credentials name, None without any; Refused (401, 429) if they fail.

    Basic carries a user name and its password, or the user's API token as the password (for
    clients that can only put ``user:secret@`` in a URL); Bearer carries a token alone.
    """
    header = headers.get("Authorization", "")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    try:
        if scheme.lower() == "bearer":
            return users.verify_token(value.strip())
        if scheme.lower() != "basic":
            raise AuthFailed("unsupported Authorization scheme: use Basic (user and password or token) or Bearer")
        username, password = basic_credentials(value.strip())
        if password.startswith(TOKEN_PREFIX):
            try:
                user = users.verify_token(password)
            except AuthFailed:
                pass  # not a token of ours: perhaps a password that starts like one
            else:
                if user.username == username:
                    return user
        return users.verify_password(username, password, address)
    except AuthFailed as exc:
        raise Refused(401, f"XML-RPC: {exc}", {"WWW-Authenticate": REALM}) from None
    except Throttled as exc:
        raise Refused(429, f"XML-RPC: {exc}", {"Retry-After": str(exc.retry_after)}) from None


def authorize(method: str, needs: str | None, user: User | None, open_changes: bool) -> None:
    """Raise Refused unless ``user`` may make a call needing the right ``needs`` (None: no right)."""
    if needs is None:
        return
    if user is None:
        if open_changes:
            return
        raise Refused(
            401,
            f"XML-RPC: {method} changes the archive and needs credentials: HTTP Basic with a macpacs user or "
            "API token (`macpacs users add`, `macpacs users token`), or xmlrpc.open_changes = true on the server",
            {"WWW-Authenticate": REALM},
        )
    if not user.can(needs):
        raise Refused(
            403,
            f"XML-RPC: user {user.username!r} lacks the {needs!r} right that {method} needs "
            f"(`macpacs users rights {user.username} --grant {needs}`)",
        )
