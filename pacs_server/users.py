"""Web users and API tokens, kept in the index (``web_user`` and ``api_token`` tables).

Passwords are stored as argon2 hashes; API tokens are random 256-bit strings stored as SHA-256
hashes (a token is already high-entropy, so a slow hash would only slow every request down).

Repeated wrong passwords are throttled in two ways:

- per user, in the index (``failed_logins``, ``locked_until``), so the lock holds across
  restarts and across several server processes sharing one index;
- per client address, in memory, so one address cannot try many user names.

A locked account refuses even the right password until the lock expires; the caller answers
HTTP 429 with the time left.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .index import Index
from .index.users_table import USER_COLUMNS, UserTable

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
ROLES = ("admin", "read")
MIN_PASSWORD = 8
# Per user: this many consecutive wrong passwords lock the account, for LOCK_BASE_S doubling
# with every further failure, at most LOCK_MAX_S.
FAILURES_BEFORE_LOCK = 5
LOCK_BASE_S = 30.0
LOCK_MAX_S = 900.0
# Per client address: this many wrong passwords within ADDRESS_WINDOW_S refuse further tries.
ADDRESS_FAILURES = 20
ADDRESS_WINDOW_S = 300.0
TOKEN_PREFIX = "mpt_"

_hasher = PasswordHasher()
# Verified once, a password is trusted for this long (argon2 costs ~50 ms per request otherwise).
VERIFIED_CACHE_S = 60.0


class UserError(ValueError):
    """A user-management request cannot be done; the message says why."""


class AuthFailed(Exception):
    """Wrong user name, password or token (always the same message: never say which)."""


class Throttled(Exception):
    """Too many wrong passwords: ``retry_after`` seconds until the next try is accepted."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


@dataclass(frozen=True)
class User:
    pk: int
    username: str
    role: str
    created_at: float = 0.0
    locked_until: float = 0.0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _user(row: Mapping[str, Any]) -> User:
    return User(**{name: row[name] for name in USER_COLUMNS})


def basic_credentials(value: str) -> tuple[str, str]:
    """User name and password of an HTTP Basic ``Authorization`` value (RFC 7617); AuthFailed if malformed.

    The web and XML-RPC ports both take Basic credentials, so both parse them here.
    """
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthFailed("malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise AuthFailed("malformed Basic credentials")
    return username, password


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Users:
    """User and token management plus password/token verification over one index."""

    def __init__(self, index: Index) -> None:
        self.table = UserTable(index)
        self._address_failures: dict[str, deque[float]] = {}
        self._verified: dict[str, tuple[User, float]] = {}
        self._lock = threading.Lock()

    # -- management (CLI, admin pages) --------------------------------------------------------
    def add(self, username: str, password: str, role: str = "admin") -> User:
        check_username(username)
        check_password(password)
        if role not in ROLES:
            raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if self.get(username) is not None:
            raise UserError(f"user {username!r} exists already (use `macpacs users passwd {username}`)")
        return _user(self.table.insert(username, _hasher.hash(password), role))

    def get(self, username: str) -> User | None:
        row = self.table.get(username)
        return _user(row) if row else None

    def list(self) -> list[User]:
        return [_user(row) for row in self.table.all()]

    def remove(self, username: str) -> None:
        self.table.delete(self._require(username).pk)
        self._forget(username)

    def set_password(self, username: str, password: str) -> None:
        """New password; also lifts a lock (an admin resetting it is the way out of one)."""
        check_password(password)
        self.table.set_password(self._require(username).pk, _hasher.hash(password))
        self._forget(username)

    def create_token(self, username: str, name: str = "") -> str:
        """A new API token for ``username``; shown once, only its hash is kept."""
        user = self._require(username)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.table.insert_token(user.pk, name[:64], token_hash(token))
        return token

    def tokens(self, username: str) -> list[tuple[int, str, float]]:
        """(id, name, created_at) of a user's tokens."""
        return self.table.tokens(self._require(username).pk)

    def revoke_token(self, username: str, token_id: int) -> None:
        if not self.table.delete_token(self._require(username).pk, token_id):
            raise UserError(f"user {username!r} has no token {token_id}")

    # -- verification (every authenticated request) ------------------------------------------
    def verify_password(self, username: str, password: str, address: str = "") -> User:
        """The user, or AuthFailed / Throttled. Counts failures per user and per address."""
        now = time.time()
        self._check_address(address, now)
        cache_key = hashlib.sha256(f"{username}\0{password}".encode("utf-8", "replace")).hexdigest()
        with self._lock:
            cached = self._verified.get(cache_key)
        if cached and cached[1] > now:
            return cached[0]
        row = self.table.for_login(username)
        if row is None:
            _hasher.hash(password)  # same cost as a real check: no timing hint that the user is unknown
            self._address_failed(address, now)
            raise AuthFailed("wrong user name or password")
        user = _user(row)
        if user.locked_until > now:
            raise Throttled(
                f"too many wrong passwords for user {username!r}: locked for {int(user.locked_until - now) + 1} s "
                "more (an admin can lift it with `macpacs users passwd`)",
                user.locked_until - now,
            )
        try:
            _hasher.verify(row["password_hash"], password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            failures = row["failed_logins"] + 1
            locked_until = 0.0
            if failures >= FAILURES_BEFORE_LOCK:
                locked_until = now + min(LOCK_MAX_S, LOCK_BASE_S * 2 ** (failures - FAILURES_BEFORE_LOCK))
            self.table.set_failures(user.pk, failures, locked_until)
            self._address_failed(address, now)
            self._forget(username)  # a lock must not be bypassed by a remembered password
            raise AuthFailed("wrong user name or password") from None
        if row["failed_logins"]:
            self.table.set_failures(user.pk, 0, 0.0)
        with self._lock:
            self._verified[cache_key] = (user, now + VERIFIED_CACHE_S)
        return user

    def verify_token(self, token: str) -> User:
        row = self.table.by_token(token_hash(token))
        if row is None:
            raise AuthFailed("unknown or revoked API token")
        return _user(row)

    # -- helpers ------------------------------------------------------------------------------
    def _require(self, username: str) -> User:
        user = self.get(username)
        if user is None:
            raise UserError(f"no user {username!r} (`macpacs users list` shows them)")
        return user

    def _forget(self, username: str) -> None:
        with self._lock:
            self._verified = {k: v for k, v in self._verified.items() if v[0].username != username}

    def _check_address(self, address: str, now: float) -> None:
        if not address:
            return
        with self._lock:
            recent = self._address_failures.get(address)
            while recent and recent[0] < now - ADDRESS_WINDOW_S:
                recent.popleft()
            if recent and len(recent) >= ADDRESS_FAILURES:
                wait = recent[0] + ADDRESS_WINDOW_S - now
                raise Throttled(f"too many wrong passwords from {address}: try again in {int(wait) + 1} s", wait)

    def _address_failed(self, address: str, now: float) -> None:
        if not address:
            return
        with self._lock:
            self._address_failures.setdefault(address, deque()).append(now)
            if len(self._address_failures) > 10_000:  # bound memory under a spray of addresses
                oldest = min(self._address_failures, key=lambda a: self._address_failures[a][-1])
                del self._address_failures[oldest]


def check_username(username: str) -> None:
    if not USERNAME_RE.match(username):
        raise UserError(f"user name {username!r} is not valid: 1 to 64 letters, digits, '_', '.', '@' or '-'")


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password too short: use at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise UserError("password too long: at most 1024 characters")
