"""Web users, their rights and API tokens, kept in the index (``web_user``, ``api_token``).

Passwords are stored as argon2 hashes; API tokens are random 256-bit strings stored as SHA-256
hashes (a token is already high-entropy, so a slow hash would only slow every request down).

**Rights**, per user, in the manner of OsiriX's web portal users: ``read`` (search and view),
``download`` (ZIP and DICOM files), ``send`` (to a DICOM node), ``upload`` (STOW-RS, the upload
page), ``delete`` (studies) and ``admin`` (nodes, and every other right). A role is a named set
of them (``ROLES``), given at ``macpacs users add``; ``macpacs users rights`` adds or removes
single rights afterwards.

**Login throttling**, counted in the index so that it holds across restarts and across several
server nodes sharing one index, and counted *before* any password is hashed (one transaction
with ``UPDATE ... SET n = n + 1``: ``users_table.count_attempt``), so parallel guesses are each
counted:

- per user: ``FAILURES_BEFORE_LOCK`` consecutive failures lock the account for ``LOCK_BASE_S``,
  doubling with each further one up to ``LOCK_MAX_S``; a locked account refuses even the right
  password until the lock expires (the caller answers HTTP 429 with the time left);
- per client address: ``ADDRESS_FAILURES`` attempts within ``ADDRESS_WINDOW_S`` that did not
  succeed refuse further tries from that address, whatever the user name.

At most ``MAX_VERIFICATIONS`` argon2 checks (64 MiB and ~50 ms each) run at once in a process;
an attempt that cannot start one within ``VERIFY_WAIT_S`` gets ``Busy`` (HTTP 503). A user name
that does not exist costs the same: its password is checked against a dummy hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .index import Index
from .index.users_table import USER_COLUMNS, UserTable
from .sessions import Sessions

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
RIGHTS = ("read", "download", "send", "upload", "delete", "admin")
RIGHT_WORDS = {
    "read": "search and view studies",
    "download": "download studies (ZIP, DICOM files)",
    "send": "send studies to DICOM nodes",
    "upload": "upload DICOM files",
    "delete": "delete studies",
    "admin": "manage DICOM nodes and approve workstations",
}
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(RIGHTS),
    "user": frozenset({"read", "download", "send"}),
    "uploader": frozenset({"upload"}),
    "read": frozenset({"read", "download"}),
}
# What a caller without credentials may do where ``web.anonymous_read`` lets it in (as before
# rights existed): everything but deleting and administration.
ANONYMOUS_RIGHTS = frozenset({"read", "download", "send", "upload"})
MIN_PASSWORD = 8
FAILURES_BEFORE_LOCK = 5
LOCK_BASE_S = 30.0
LOCK_MAX_S = 900.0
ADDRESS_FAILURES = 20
ADDRESS_WINDOW_S = 300.0
# argon2 checks at once (each holds 64 MiB for ~50 ms), and how long an attempt waits for one.
MAX_VERIFICATIONS = max(1, min(4, os.cpu_count() or 1))
VERIFY_WAIT_S = 5.0
TOKEN_PREFIX = "mpt_"
# Verified once, a password is trusted for this long while the index still holds the hash it was
# checked against and the account is not locked (argon2 costs ~50 ms per request otherwise): a
# new password, removing the user or a lock end it at once, in every process.
VERIFIED_CACHE_S = 60.0

_hasher = PasswordHasher()


class UserError(ValueError):
    """A user-management request cannot be done; the message says why."""


class AuthFailed(Exception):
    """Wrong user name, password or token (always the same message: never say which)."""


class Throttled(Exception):
    """Too many attempts: ``retry_after`` seconds until the next try is accepted."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


class Busy(Throttled):
    """Too many password checks at once in this process: try again in a moment (HTTP 503)."""


@dataclass(frozen=True)
class User:
    pk: int
    username: str
    role: str
    rights: frozenset[str] = frozenset()
    created_at: float = 0.0
    locked_until: float = 0.0

    @property
    def is_admin(self) -> bool:
        return "admin" in self.rights

    def can(self, right: str) -> bool:
        return right in self.rights or self.is_admin


def user_from_row(row: Mapping[str, Any]) -> User:
    """A ``User`` from a table row (``USER_COLUMNS``; the rights as stored, joined by commas)."""
    values = {name: row[name] for name in USER_COLUMNS}
    values["rights"] = frozenset(filter(None, (values["rights"] or "").split(",")))
    return User(**values)


def _rights_text(rights: Iterable[str]) -> str:
    return ",".join(sorted(set(rights)))


def parse_rights(names: Iterable[str]) -> frozenset[str]:
    """Rights named by a user of the CLI (``read,send``); UserError for an unknown one."""
    rights = frozenset(name.strip().lower() for name in names if name.strip())
    unknown = sorted(rights - set(RIGHTS))
    if unknown:
        raise UserError(f"unknown right {', '.join(map(repr, unknown))}: the rights are {', '.join(RIGHTS)}")
    return rights


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


def lock_seconds(failures: int) -> float:
    """How long ``failures`` consecutive wrong passwords lock an account (0: not locked)."""
    if failures < FAILURES_BEFORE_LOCK:
        return 0.0
    return min(LOCK_MAX_S, LOCK_BASE_S * 2 ** min(failures - FAILURES_BEFORE_LOCK, 16))


class Users:
    """User and token management, sessions, and password/token verification over one index."""

    def __init__(self, index: Index) -> None:
        self.table = UserTable(index)
        self.sessions = Sessions(index)
        self._checks = threading.BoundedSemaphore(MAX_VERIFICATIONS)
        self._dummy: str | None = None
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[int, str, float]] = {}  # key -> (user pk, password hash, until)
        self._lock = threading.Lock()

    # -- management (CLI, admin pages) --------------------------------------------------------
    def add(self, username: str, password: str, role: str = "admin", rights: Iterable[str] | None = None) -> User:
        check_username(username)
        check_password(password)
        if role not in ROLES:
            raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
        granted = ROLES[role] if rights is None else parse_rights(rights)
        if self.get(username) is not None:
            raise UserError(f"user {username!r} exists already (use `macpacs users passwd {username}`)")
        return user_from_row(self.table.insert(username, _hasher.hash(password), role, _rights_text(granted)))

    def get(self, username: str) -> User | None:
        row = self.table.get(username)
        return user_from_row(row) if row else None

    def list(self) -> list[tuple[User, int, int]]:
        """(user, consecutive failed logins, open sessions) of every user, by name."""
        return [(user_from_row(row), row["failed_logins"], row["sessions"]) for row in self.table.all()]

    def remove(self, username: str) -> None:
        """Delete the user with its tokens and sessions: logged-in browsers are logged out at once."""
        self.table.delete(self._require(username).pk)

    def set_password(self, username: str, password: str) -> None:
        """New password; lifts a lock (an admin resetting it is the way out of one) and ends every session."""
        check_password(password)
        self.table.set_password(self._require(username).pk, _hasher.hash(password))

    def set_rights(
        self, username: str, role: str | None = None, grant: Iterable[str] = (), revoke: Iterable[str] = ()
    ) -> User:
        """Give the user a role's rights (``role``), then add ``grant`` and take away ``revoke``."""
        user = self._require(username)
        if role is not None and role not in ROLES:
            raise UserError(f"role {role!r} is not one of {', '.join(ROLES)}")
        rights = set(ROLES[role] if role else user.rights)
        rights |= parse_rights(grant)
        rights -= parse_rights(revoke)
        self.table.set_rights(user.pk, role or user.role, _rights_text(rights))
        return self._require(username)

    def end_sessions(self, username: str) -> int:
        """Log the user out of every browser (a password change and removal do this too); how many."""
        return self.sessions.end_all(self._require(username).pk)

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
        """The user, or AuthFailed / Throttled / Busy. Every attempt is counted before any hashing."""
        now = time.time()
        remembered = self._remembered(username, password, now)
        if remembered is not None:
            return remembered
        key = f"login:{address}"
        attempt = self.table.count_attempt(username, key, ADDRESS_WINDOW_S, now, lock_seconds)
        if attempt.address_count > ADDRESS_FAILURES:
            wait = attempt.address_window_start + ADDRESS_WINDOW_S - now
            raise Throttled(f"too many wrong passwords from {address}: try again in {int(wait) + 1} s", wait)
        if attempt.locked_until:
            raise Throttled(
                f"too many wrong passwords for user {username!r}: locked for {int(attempt.locked_until - now) + 1} s "
                "more (an admin can lift it with `macpacs users passwd`)",
                attempt.locked_until - now,
            )
        row = attempt.user
        if not self._check(row["password_hash"] if row else self._dummy_hash(), password) or row is None:
            raise AuthFailed("wrong user name or password")
        self.table.login_succeeded(row["pk"], key)
        user = user_from_row({**row, "locked_until": 0.0})
        with self._lock:
            if len(self._verified) > 1000:
                self._verified = {k: v for k, v in self._verified.items() if v[2] > now}
            entry = (row["pk"], row["password_hash"], now + VERIFIED_CACHE_S)
            self._verified[self._cache_entry(username, password)] = entry
        return user

    def verify_token(self, token: str) -> User:
        row = self.table.by_token(token_hash(token))
        if row is None:
            raise AuthFailed("unknown or revoked API token")
        return user_from_row(row)

    def rate_limit(self, kind: str, address: str, limit: int, window_s: float, what: str) -> None:
        """Count one ``kind`` attempt from ``address``; Throttled beyond ``limit`` per ``window_s``."""
        count, start = self.table.hit(f"{kind}:{address}", window_s, time.time())
        if count > limit:
            wait = start + window_s - time.time()
            raise Throttled(f"too many {what} from {address}: try again in {int(wait) + 1} s", wait)

    # -- helpers ------------------------------------------------------------------------------
    def _check(self, password_hash: str, password: str) -> bool:
        """argon2 verification, at most MAX_VERIFICATIONS at once (Busy when none frees up in time)."""
        if not self._checks.acquire(timeout=VERIFY_WAIT_S):
            raise Busy("the server is busy checking other passwords: try again in a moment", 1)
        try:
            return _hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        finally:
            self._checks.release()

    def _dummy_hash(self) -> str:
        """A hash no password matches, with our parameters: an unknown user costs a real check."""
        with self._lock:
            if self._dummy is None:
                self._dummy = _hasher.hash(secrets.token_urlsafe(16))
            return self._dummy

    def _cache_entry(self, username: str, password: str) -> str:
        return hmac.new(self._cache_key, f"{username}\0{password}".encode("utf-8", "replace"), "sha256").hexdigest()

    def _remembered(self, username: str, password: str, now: float) -> User | None:
        """The user when this password was verified lately and the index still holds that hash, unlocked."""
        with self._lock:
            entry = self._verified.get(self._cache_entry(username, password))
        if entry is None or entry[2] <= now:
            return None
        row = self.table.for_login(username)
        if row is None or row["pk"] != entry[0] or row["password_hash"] != entry[1] or row["locked_until"] > now:
            return None
        return user_from_row(row)

    def _require(self, username: str) -> User:
        user = self.get(username)
        if user is None:
            raise UserError(f"no user {username!r} (`macpacs users list` shows them)")
        return user


def check_username(username: str) -> None:
    if not USERNAME_RE.match(username):
        raise UserError(f"user name {username!r} is not valid: 1 to 64 letters, digits, '_', '.', '@' or '-'")


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password too short: use at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise UserError("password too long: at most 1024 characters")
