"""Who is asking: HTTP Basic, bearer tokens and a signed session cookie, as FastAPI dependencies.

- ``require_read``: DICOMweb, WADO, the JSON API. Anonymous callers are let in according to
  ``web.anonymous_read``: ``localhost`` (default: only from this machine), ``all`` or ``off``.
- ``require_admin``: a logged-in user with the ``admin`` role, whatever the client address.
- ``issue_session`` / ``clear_session``: the login and logout pages set and remove the cookie
  (the cookie is signed with a secret generated once into the data folder, mode 0600).

Wrong credentials answer 401; repeated wrong passwords answer 429 with ``Retry-After``.
``/testdbalive`` and ``/health`` use none of this: they are always open.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..users import AuthFailed, Throttled, User, Users, basic_credentials

SESSION_COOKIE = "macpacs_session"
SECRET_FILE = "web-secret"
REALM = 'Basic realm="macpacs", charset="UTF-8"'


@dataclass(frozen=True)
class Principal:
    """The caller: a user, or anonymous (``user`` is None) when the settings allow it."""

    user: User | None
    address: str

    @property
    def name(self) -> str:
        return self.user.username if self.user else "anonymous"


def load_secret(data_dir: Path) -> bytes:
    """The session-signing secret, created once (0600) so sessions survive restarts."""
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
    """Checks credentials of a request; one per app (held in ``app.state.auth``)."""

    def __init__(self, users: Users, secret: bytes, anonymous_read: str, session_hours: float, secure: bool) -> None:
        self.users = users
        self.anonymous_read = anonymous_read
        self.session_max_age = int(session_hours * 3600)
        self.secure = secure
        self._serializer = URLSafeTimedSerializer(secret, salt="macpacs-session")

    # -- sessions --------------------------------------------------------------------------------
    def issue_session(self, response: Response, username: str) -> None:
        token = self._serializer.dumps({"u": username})
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=self.session_max_age,
            httponly=True,
            samesite="lax",
            secure=self.secure,
            path="/",
        )

    def clear_session(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/")

    # -- checks ----------------------------------------------------------------------------------
    def identify(self, request: Request) -> User | None:
        """The user the request authenticates as, None without credentials; raises HTTPException."""
        address = client_address(request)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        try:
            if scheme.lower() == "basic":
                username, password = basic_credentials(value.strip())
                return self.users.verify_password(username, password, address)
            if scheme.lower() == "bearer":
                return self.users.verify_token(value.strip())
            if header:
                raise HTTPException(
                    401, "unsupported Authorization scheme: use Basic or Bearer", {"WWW-Authenticate": REALM}
                )
        except AuthFailed as exc:
            raise HTTPException(401, str(exc), {"WWW-Authenticate": REALM}) from None
        except Throttled as exc:
            raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            try:
                data = self._serializer.loads(cookie, max_age=self.session_max_age)
            except BadSignature:
                return None  # expired or forged: treated as no session (the login page follows)
            if isinstance(data, dict) and isinstance(data.get("u"), str):
                return self.users.get(data["u"])
        return None

    def anonymous_allowed(self, request: Request) -> bool:
        if self.anonymous_read == "all":
            return True
        return self.anonymous_read == "localhost" and is_loopback(client_address(request))


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def authenticator(request: Request) -> Authenticator:
    return request.app.state.auth


def require_read(request: Request, auth: Authenticator = Depends(authenticator)) -> Principal:  # noqa: B008
    """Read access: any valid user, or anonymous when ``web.anonymous_read`` allows this client."""
    user = auth.identify(request)
    if user is None and not auth.anonymous_allowed(request):
        raise HTTPException(
            401,
            "login required: use HTTP Basic, a bearer token or the login page "
            "(anonymous reading is allowed from this machine only, see web.anonymous_read)",
            {"WWW-Authenticate": REALM},
        )
    return Principal(user, client_address(request))


def require_admin(request: Request, auth: Authenticator = Depends(authenticator)) -> Principal:  # noqa: B008
    """Admin access: a user with the ``admin`` role."""
    user = auth.identify(request)
    if user is None:
        raise HTTPException(401, "login required", {"WWW-Authenticate": REALM})
    if not user.is_admin:
        raise HTTPException(403, f"user {user.username!r} is not an admin")
    return Principal(user, client_address(request))


def issue_session(request: Request, response: Response, username: str) -> None:
    """Log ``username`` in (the login page calls this after checking the password)."""
    authenticator(request).issue_session(response, username)


def clear_session(request: Request, response: Response) -> None:
    authenticator(request).clear_session(response)


def check_login(request: Request, username: str, password: str) -> User:
    """Check a login form's password (with the same throttling); raises HTTPException 401/429."""
    try:
        return authenticator(request).users.verify_password(username, password, client_address(request))
    except AuthFailed as exc:
        raise HTTPException(401, str(exc)) from None
    except Throttled as exc:
        raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
