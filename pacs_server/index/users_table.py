"""The ``web_user``, ``api_token`` and ``rate_limit`` tables: reads and writes for ``pacs_server.users``.

``users`` keeps the rules (password hashing, throttling, token generation, rights); this module
keeps the SQL, so that no statement is written outside the index. A user row comes out as a
dictionary of ``USER_COLUMNS`` (plus ``password_hash`` and ``failed_logins`` for a login).

Attempts are counted atomically, before any password is hashed: each login attempt is one
transaction whose first statement is ``UPDATE ... SET n = n + 1`` (or an upsert doing the same),
and whose decision reads the value that statement wrote. On SQLite that statement takes the
write lock, on PostgreSQL the row lock, so concurrent attempts, from threads or from several
server nodes, are serialized and each one is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, case, delete, func, insert, select, update

from . import upsert
from .db import Index
from .schema import api_token, rate_limit, web_session, web_user

# What a caller may know of a user without checking a password.
USER_COLUMNS = ("pk", "username", "role", "rights", "created_at", "locked_until")
_PUBLIC = [web_user.c[name] for name in USER_COLUMNS]
# Counters older than this are deleted (longer than any window a caller uses).
PRUNE_AFTER_S = 3600.0


@dataclass(frozen=True)
class Attempt:
    """A login attempt as counted: what the password check needs, and whether it may go on."""

    address_count: int  # attempts from the address in its window, this one included
    address_window_start: float
    user: dict[str, Any] | None  # USER_COLUMNS + password_hash + failed_logins; None: no such user
    locked_until: float  # the lock in force before this attempt (0.0: none)


class UserTable:
    """The users and tokens of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.engine = index.engine

    # -- users ----------------------------------------------------------------------------------
    def insert(self, username: str, password_hash: str, role: str, rights: str) -> dict[str, Any]:
        """Add a user (no failed logins, not locked); returns its row."""
        row = {"username": username, "role": role, "rights": rights, "created_at": time.time(), "locked_until": 0.0}
        with self.engine.begin() as conn:
            result = conn.execute(insert(web_user).values(**row, password_hash=password_hash, failed_logins=0))
        return {"pk": result.inserted_primary_key[0], **row}

    def get(self, username: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_PUBLIC).where(web_user.c.username == username)).mappings().first()
        return dict(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        """Every user, by name, with ``failed_logins`` and ``sessions`` (how many logins are open)."""
        sessions = (
            select(func.count())
            .select_from(web_session)
            .where(web_session.c.user_pk == web_user.c.pk)
            .scalar_subquery()
            .label("sessions")
        )
        stmt = select(*_PUBLIC, web_user.c.failed_logins, sessions).order_by(web_user.c.username)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(stmt).mappings()]

    def delete(self, user_pk: int) -> None:
        """Remove a user, its tokens and its sessions, in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(delete(web_session).where(web_session.c.user_pk == user_pk))
            conn.execute(delete(api_token).where(api_token.c.user_pk == user_pk))
            conn.execute(delete(web_user).where(web_user.c.pk == user_pk))

    def set_password(self, user_pk: int, password_hash: str) -> None:
        """A new password hash; the failure count, any lock and every session end with the old one."""
        with self.engine.begin() as conn:
            conn.execute(
                update(web_user)
                .where(web_user.c.pk == user_pk)
                .values(password_hash=password_hash, failed_logins=0, locked_until=0.0)
            )
            conn.execute(delete(web_session).where(web_session.c.user_pk == user_pk))

    def set_rights(self, user_pk: int, role: str, rights: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(web_user).where(web_user.c.pk == user_pk).values(role=role, rights=rights))

    # -- logins -------------------------------------------------------------------------------
    def for_login(self, username: str) -> dict[str, Any] | None:
        """The user's row with ``password_hash`` and ``failed_logins`` (a read: no attempt counted)."""
        u = web_user.c
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(*_PUBLIC, u.password_hash, u.failed_logins).where(u.username == username))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def count_attempt(
        self,
        username: str,
        address_key: str,
        window_s: float,
        now: float,
        lock_for: Callable[[int], float],
    ) -> Attempt:
        """Count one login attempt against the address and the user, before the password is checked.

        The attempt counts as a failure until ``login_succeeded`` says otherwise. When the user's
        count reaches what ``lock_for`` locks (a positive number of seconds), the lock is set now,
        so that attempts arriving while this one's password is being checked are refused too.
        """
        u = web_user.c
        with self.engine.begin() as conn:
            address_count, window_start = _hit(conn, address_key, window_s, now)
            conn.execute(update(web_user).where(u.username == username).values(failed_logins=u.failed_logins + 1))
            row = (
                conn.execute(select(*_PUBLIC, u.password_hash, u.failed_logins).where(u.username == username))
                .mappings()
                .first()
            )
            user = dict(row) if row else None
            locked_until = 0.0
            if user is not None:
                locked_until = user["locked_until"] if user["locked_until"] > now else 0.0
                seconds = lock_for(user["failed_logins"])
                if not locked_until and seconds > 0:
                    user["locked_until"] = now + seconds
                    conn.execute(update(web_user).where(u.pk == user["pk"]).values(locked_until=now + seconds))
        return Attempt(address_count, window_start, user, locked_until)

    def login_succeeded(self, user_pk: int, address_key: str) -> None:
        """The password was right: the user's failures and lock are cleared, the address's attempt uncounted."""
        with self.engine.begin() as conn:
            conn.execute(update(web_user).where(web_user.c.pk == user_pk).values(failed_logins=0, locked_until=0.0))
            _unhit(conn, address_key)

    # -- attempt counters (per address) ---------------------------------------------------------
    def hit(self, key: str, window_s: float, now: float) -> tuple[int, float]:
        """Count one attempt under ``key``: (attempts in the current window, when the window began)."""
        with self.engine.begin() as conn:
            return _hit(conn, key, window_s, now)

    # -- API tokens ---------------------------------------------------------------------------
    def insert_token(self, user_pk: int, name: str, token_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_token).values(user_pk=user_pk, name=name, token_hash=token_hash, created_at=time.time())
            )

    def tokens(self, user_pk: int) -> list[tuple[int, str, float]]:
        """(id, name, created_at) of a user's tokens, oldest first."""
        t = api_token.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.pk, t.name, t.created_at).where(t.user_pk == user_pk).order_by(t.pk))
            return [(row.pk, row.name, row.created_at) for row in rows]

    def delete_token(self, user_pk: int, token_pk: int) -> bool:
        """Remove one of a user's tokens; False when the user has no such token."""
        with self.engine.begin() as conn:
            stmt = delete(api_token).where(api_token.c.pk == token_pk, api_token.c.user_pk == user_pk)
            return conn.execute(stmt).rowcount > 0

    def by_token(self, token_hash: str) -> dict[str, Any] | None:
        """The user owning the token with this hash, or None (unknown or revoked)."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(*_PUBLIC)
                    .select_from(api_token.join(web_user, web_user.c.pk == api_token.c.user_pk))
                    .where(api_token.c.token_hash == token_hash)
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None


def _hit(conn: Connection, key: str, window_s: float, now: float) -> tuple[int, float]:
    """Upsert ``key``'s counter (+1, or 1 in a new window) and read it back, in the caller's transaction."""
    r = rate_limit.c
    expired = r.window_start < now - window_s
    stmt = upsert.insert(rate_limit, conn.dialect.name).values(key=key, count=1, window_start=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[r.key],
        set_={
            "count": case((expired, 1), else_=r.count + 1),
            "window_start": case((expired, now), else_=r.window_start),
        },
    )
    conn.execute(stmt)
    count, start = conn.execute(select(r.count, r.window_start).where(r.key == key)).one()
    conn.execute(delete(rate_limit).where(r.window_start < now - PRUNE_AFTER_S))
    return int(count), float(start)


def _unhit(conn: Connection, key: str) -> None:
    r = rate_limit.c
    conn.execute(update(rate_limit).where(r.key == key, r.count > 0).values(count=r.count - 1))
