"""The ``web_user`` and ``api_token`` tables: reads and writes for ``pacs_server.users``.

``users`` keeps the rules (password hashing, throttling, token generation); this module keeps
the SQL, so that no statement is written outside the index. A user row comes out as a
dictionary of ``USER_COLUMNS`` (plus ``password_hash`` and ``failed_logins`` for a login).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, insert, select, update

from .db import Index
from .schema import api_token, web_user

# What a caller may know of a user without checking a password.
USER_COLUMNS = ("pk", "username", "role", "created_at", "locked_until")
_PUBLIC = [web_user.c[name] for name in USER_COLUMNS]


class UserTable:
    """The users and tokens of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.engine = index.engine

    # -- users ----------------------------------------------------------------------------------
    def insert(self, username: str, password_hash: str, role: str) -> dict[str, Any]:
        """Add a user (no failed logins, not locked); returns its row."""
        row = {"username": username, "role": role, "created_at": time.time(), "locked_until": 0.0}
        with self.engine.begin() as conn:
            result = conn.execute(insert(web_user).values(**row, password_hash=password_hash, failed_logins=0))
        return {"pk": result.inserted_primary_key[0], **row}

    def get(self, username: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_PUBLIC).where(web_user.c.username == username)).mappings().first()
        return dict(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        """Every user, by name."""
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(select(*_PUBLIC).order_by(web_user.c.username)).mappings()]

    def delete(self, user_pk: int) -> None:
        """Remove a user and its tokens, in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(delete(api_token).where(api_token.c.user_pk == user_pk))
            conn.execute(delete(web_user).where(web_user.c.pk == user_pk))

    def set_password(self, user_pk: int, password_hash: str) -> None:
        """A new password hash; the failure count and any lock are cleared with it."""
        with self.engine.begin() as conn:
            conn.execute(
                update(web_user)
                .where(web_user.c.pk == user_pk)
                .values(password_hash=password_hash, failed_logins=0, locked_until=0.0)
            )

    # -- logins -------------------------------------------------------------------------------
    def for_login(self, username: str) -> dict[str, Any] | None:
        """The user's row with what a password check needs: ``password_hash``, ``failed_logins``."""
        u = web_user.c
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(*_PUBLIC, u.password_hash, u.failed_logins).where(u.username == username))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def set_failures(self, user_pk: int, failed_logins: int, locked_until: float) -> None:
        """Record consecutive wrong passwords and the lock they earned (0, 0.0: a good login)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(web_user)
                .where(web_user.c.pk == user_pk)
                .values(failed_logins=failed_logins, locked_until=locked_until)
            )

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
