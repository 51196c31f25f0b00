"""Who is asking, and may they: HTTP Basic, bearer tokens and server-side sessions, as FastAPI dependencies.

- ``require(right)`` (``require_read``, ``require_download``, ``require_send``, ``require_upload``,
  ``require_delete``, ``require_admin``): the caller needs that right (``users.RIGHTS``). A user
  has the rights ``macpacs users`` gave it; a caller without credentials has
  ``users.ANONYMOUS_RIGHTS`` where ``web.anonymous_read`` lets it in, else it is asked to log in.
- **"The Mac itself"** (``anonymous_read = "localhost"``) is a loopback peer whose ``Host``
  header names this server, on a server with no reverse proxy configured
  (``web.forwarded_allow_ips`` empty) and without proxy headers: a page that reached
  127.0.0.1 through DNS rebinding sends the attacker's name in ``Host``, and behind a proxy
  every client would arrive from loopback.
- **Sessions** are rows in the index (``pacs_server.sessions``): the cookie carries a random
  token only. Logout, a new password and removing the user end them at once.
- ``link_host``: the host links in answers are built from, never an unchecked ``Host``.

Wrong credentials answer 401; repeated wrong passwords 429 with ``Retry-After``; too many
password checks at once 503. ``/testdbalive`` and ``/health`` use none of this: they are always open.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Response

from ..archive import Archive
from ..audit import Actor
from ..sessions import Session
from ..users import ANONYMOUS_RIGHTS, RIGHT_WORDS, AuthFailed, Busy, Throttled, User, basic_credentials, user_from_row
from ..xmlrpc.guard import host_of, ip_address, own_host_names

log = logging.getLogger(__name__)

SESSION_COOKIE = "macpacs_session"
SECRET_FILE = "web-secret"
REALM = 'Basic realm="macpacs", charset="UTF-8"'
# Headers a reverse proxy adds: on a loopback request they mean "not the Mac itself".
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip", "via")


@dataclass(frozen=True)
class Principal:
    """The caller: a user, or anonymous (``user`` is None) with the rights the settings allow it."""

    user: User | None
    address: str
    rights: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.user.username if self.user else "anonymous"

    def can(self, right: str) -> bool:
        return self.user.can(right) if self.user else right in self.rights


def load_secret(data_dir: Path) -> bytes:
    """The app's secret (CSRF tokens are derived from it), created once (0600) so it survives restarts."""
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes().strip()
        if len(secret) >= 32:
            return secret
        path.unlink()
        return load_secret(data_dir)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode())
        fh.flush()
        os.fsync(fh.fileno())
    return path.read_bytes().strip()


class Authenticator:
    """Checks the credentials of a request; one per app (held in ``app.state.auth``)."""

    def __init__(self, archive: Archive) -> None:
        web = archive.settings.web
        self.users = archive.users
        self.anonymous_read = web.anonymous_read
        self.proxied = bool(web.forwarded_allow_ips)
        self.session_absolute_s = web.session_hours * 3600
        self.session_idle_s = web.session_idle_minutes * 60
        self.tls = bool(web.tls_cert)
        public_host = urlsplit(web.public_url).hostname if web.public_url else None
        self.own_names = own_host_names([public_host] if public_host else [])
        self._warned_proxy = False

    # -- the server's names ------------------------------------------------------------------------
    def host_is_ours(self, request: Request) -> bool:
        """Whether the ``Host`` header names this server (or is absent: HTTP/1.0, never a browser)."""
        values = [value for name, value in request.scope["headers"] if name == b"host"]
        if not values:
            return True
        if len(values) > 1:
            return False
        host = host_of(values[0].decode("latin-1"))
        if host is None:
            return False
        server = request.scope.get("server")
        return host in self.own_names or (server is not None and host == str(ip_address(server[0]) or server[0]))

    def secure(self, request: Request) -> bool:
        """Cookies get ``Secure`` when the browser reached us over HTTPS (directly or through a trusted proxy)."""
        return self.tls or request.url.scheme == "https"

    # -- sessions --------------------------------------------------------------------------------
    def session(self, request: Request) -> Session | None:
        """The request's live session (looked up once per request), or None."""
        if "macpacs_session" in request.scope.setdefault("state", {}):
            return request.scope["state"]["macpacs_session"]
        token = request.cookies.get(SESSION_COOKIE, "")
        found = self.users.sessions.find(token, self.session_idle_s) if token else None
        request.scope["state"]["macpacs_session"] = found
        return found

    def issue_session(self, request: Request, response: Response, user: User) -> None:
        """Log ``user`` in: a new session (any current one of this browser ends), its token in the cookie."""
        current = self.session(request)
        if current is not None:
            self.users.sessions.end(current.token)
        token = self.users.sessions.start(user.pk, client_address(request), self.session_absolute_s)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(self.session_absolute_s),
            httponly=True,
            samesite="lax",
            secure=self.secure(request),
            path="/",
        )

    def clear_session(self, request: Request, response: Response) -> None:
        """Log out: the session's row is deleted (so a copied cookie is worthless), the cookie removed."""
        current = self.session(request)
        if current is not None:
            self.users.sessions.end(current.token)
        response.delete_cookie(SESSION_COOKIE, path="/")

    # -- checks ----------------------------------------------------------------------------------
    def identify(self, request: Request) -> User | None:
        """The user the request authenticates as, None without credentials; raises HTTPException."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        try:
            if scheme.lower() == "basic":
                username, password = basic_credentials(value.strip())
                try:
                    return self.users.verify_password(username, password, client_address(request))
                except (AuthFailed, Throttled) as exc:  # a success is in the records of what it then does
                    actor = Actor(username[:64], client_address(request), "web")
                    request.app.state.archive.audit.record("login", actor, outcome="failure", detail=f"Basic: {exc}")
                    raise
            if scheme.lower() == "bearer":
                return self.users.verify_token(value.strip())
            if header:
                raise HTTPException(
                    401, "unsupported Authorization scheme: use Basic or Bearer", {"WWW-Authenticate": REALM}
                )
        except AuthFailed as exc:
            raise HTTPException(401, str(exc), {"WWW-Authenticate": REALM}) from None
        except Busy as exc:
            raise HTTPException(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except Throttled as exc:
            raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        found = self.session(request)
        return None if found is None else user_from_row(found.user_row)

    def anonymous_allowed(self, request: Request) -> bool:
        """Whether a caller without credentials may come in (``web.anonymous_read``; see the module)."""
        if self.anonymous_read == "all":
            return True
        if self.anonymous_read != "localhost" or self.proxied or not is_loopback(client_address(request)):
            return False
        if any(name.decode("latin-1") in PROXY_HEADERS for name, _ in request.scope["headers"]):
            if not self._warned_proxy:
                self._warned_proxy = True
                log.warning(
                    "a request from %s carries proxy headers (X-Forwarded-For, Forwarded, X-Real-IP or Via): a "
                    "reverse proxy seems to be in front of the server. Proxied requests get no anonymous access; "
                    "list the proxy in web.forwarded_allow_ips (docs/security.md)",
                    client_address(request),
                )
            return False
        return self.host_is_ours(request)

    def principal(self, request: Request) -> Principal | None:
        """The caller with its rights, or None when it must log in first; raises HTTPException 401/429/503."""
        user = self.identify(request)
        if user is not None:
            return Principal(user, client_address(request), user.rights)
        if self.anonymous_allowed(request):
            return Principal(None, client_address(request), ANONYMOUS_RIGHTS)
        return None


def client_address(request: Request) -> str:
    """The client's address: the TCP peer, or what a trusted proxy says (``web.forwarded_allow_ips``)."""
    return request.client.host if request.client else ""


def is_loopback(address: str) -> bool:
    parsed = ip_address(address)
    return parsed is not None and parsed.is_loopback


def authenticator(request: Request) -> Authenticator:
    return request.app.state.auth


def link_host(request: Request) -> str:
    """``host[:port]`` for links in answers: the ``Host`` header when it names this server, else the
    address and port the connection arrived on (``web.public_url``, when set, comes before both)."""
    if authenticator(request).host_is_ours(request) and request.headers.get("host"):
        return request.headers["host"]
    host, port = request.scope["server"]
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def denied(who: Principal | None, right: str) -> HTTPException:
    """The 401 (log in) or 403 (logged in without the right) for a caller lacking ``right``."""
    if who is None or who.user is None:
        anonymous = "" if who is None else f" (callers without a login may not {RIGHT_WORDS[right]})"
        return HTTPException(
            401,
            "login required: use HTTP Basic, a bearer token or the login page "
            f"(anonymous access is allowed from this machine only, see web.anonymous_read){anonymous}",
            {"WWW-Authenticate": REALM},
        )
    return HTTPException(
        403,
        f"user {who.name!r} may not {RIGHT_WORDS[right]}: an admin can allow it with "
        f"`macpacs users rights {who.name} --grant {right}`",
    )


def require(right: str) -> Callable[[Request, Authenticator], Principal]:
    """A dependency admitting callers with ``right``; the Principal is its value."""

    def dependency(request: Request, auth: Authenticator = Depends(authenticator)) -> Principal:  # noqa: B008
        who = auth.principal(request)
        if who is None or not who.can(right):
            raise denied(who, right)
        return who

    dependency.__name__ = f"require_{right}"
    return dependency


# ``require_read(request, auth)`` is also called directly, by the frame short path.
require_read = require("read")
require_download = require("download")
require_send = require("send")
require_upload = require("upload")
require_delete = require("delete")
require_admin = require("admin")


def check_login(request: Request, username: str, password: str) -> User:
    """Check a login form's password (with the same throttling); raises HTTPException 401/429/503."""
    try:
        return authenticator(request).users.verify_password(username, password, client_address(request))
    except AuthFailed as exc:
        raise HTTPException(401, str(exc)) from None
    except Busy as exc:
        raise HTTPException(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except Throttled as exc:
        raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
