"""Browser logins kept in the index, so that they can be ended at once, on every server node.

The cookie carries only a random 256-bit token; the ``web_session`` row holds its SHA-256 (a
copy of the table does not let anyone log in), the user, and the clocks: a session ends after
``idle_s`` without a request and ``absolute_s`` after login, whichever comes first. Logout
deletes the row; a new password and removing the user delete all the user's rows
(``users_table``), so those take effect on the next request, whichever node serves it.

Activity is written at most once per ``TOUCH_EVERY_S`` (or a tenth of the idle time, if shorter)
per session: a viewer sends hundreds of requests a second, and each would otherwise be a write
to the index.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from .index import Index
from .index.sessions_table import SessionTable

log = logging.getLogger(__name__)

TOUCH_EVERY_S = 60.0
# Expired rows are swept at most this often (by the process that happens to check a session).
SWEEP_EVERY_S = 600.0


@dataclass(frozen=True)
class Session:
    """A live session: its token (the cookie's value) and the user's row as ``users`` reads it."""

    token: str
    user_row: dict


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Sessions:
    """Start, find and end sessions in one index."""

    def __init__(self, index: Index) -> None:
        self.table = SessionTable(index)
        self._next_sweep = 0.0

    def start(self, user_pk: int, address: str, absolute_s: float) -> str:
        """A new session for the user; returns the token to put in the cookie (shown nowhere else)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        self.table.insert(token_hash(token), user_pk, now, now + absolute_s, address)
        return token

    def find(self, token: str, idle_s: float) -> Session | None:
        """The session the token opens, or None when it is unknown, idle too long or past its end."""
        if not token or len(token) > 128:
            return None
        now = time.time()
        self._sweep(now, idle_s)
        key = token_hash(token)
        row = self.table.lookup(key)
        if row is None:
            return None
        if row["expires_at"] <= now or row["last_seen"] < now - idle_s:
            self.table.delete(key)
            return None
        if row["last_seen"] < now - min(TOUCH_EVERY_S, idle_s / 10):
            self.table.touch(key, now)  # best effort: when the index is busy, the next request does it
        user = {k: v for k, v in row.items() if k not in ("last_seen", "expires_at")}
        return Session(token, user)

    def end(self, token: str) -> None:
        self.table.delete(token_hash(token))

    def end_all(self, user_pk: int) -> int:
        """End every session of the user; how many there were."""
        return self.table.delete_for_user(user_pk)

    def _sweep(self, now: float, idle_s: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        removed = self.table.delete_stale(now - idle_s, now)
        if removed:
            log.info("sessions: %d expired login(s) removed", removed)
