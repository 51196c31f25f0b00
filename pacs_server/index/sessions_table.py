"""The ``web_session`` table: reads and writes for ``pacs_server.sessions``.

A row is one browser login, keyed by the SHA-256 of the random token its cookie carries. The
rules (token generation, idle and absolute expiry) are in ``sessions``; this module keeps the
SQL. A user's sessions are also deleted by ``users_table`` when the user is removed or gets a
new password, in the same transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import OperationalError

from .db import Index
from .schema import web_session, web_user
from .users_table import USER_COLUMNS

_USER = [web_user.c[name] for name in USER_COLUMNS]


class SessionTable:
    """The sessions of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.engine = index.engine

    def insert(self, token_hash: str, user_pk: int, now: float, expires_at: float, address: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(web_session).values(
                    token_hash=token_hash,
                    user_pk=user_pk,
                    created_at=now,
                    last_seen=now,
                    expires_at=expires_at,
                    address=address[:64],
                )
            )

    def lookup(self, token_hash: str) -> dict[str, Any] | None:
        """The session's ``last_seen`` and ``expires_at`` with its user's ``USER_COLUMNS``; None if unknown."""
        s = web_session.c
        stmt = (
            select(*_USER, s.last_seen, s.expires_at)
            .select_from(web_session.join(web_user, web_user.c.pk == s.user_pk))
            .where(s.token_hash == token_hash)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return dict(row) if row else None

    def touch(self, token_hash: str, now: float) -> bool:
        """Record activity (the idle clock restarts); False when the index was too busy to take it."""
        try:
            with self.engine.begin() as conn:
                stmt = update(web_session).where(web_session.c.token_hash == token_hash).values(last_seen=now)
                conn.execute(stmt)
        except OperationalError:
            return False
        return True

    def delete(self, token_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(web_session).where(web_session.c.token_hash == token_hash))

    def delete_for_user(self, user_pk: int) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(web_session).where(web_session.c.user_pk == user_pk)).rowcount

    def delete_stale(self, idle_before: float, now: float) -> int:
        """Remove sessions idle since before ``idle_before`` or past their absolute end; how many
        (0 when the index was too busy: the next sweep does it)."""
        s = web_session.c
        try:
            with self.engine.begin() as conn:
                stale = (s.last_seen < idle_before) | (s.expires_at <= now)
                return conn.execute(delete(web_session).where(stale)).rowcount
        except OperationalError:
            return 0
