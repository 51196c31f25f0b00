"""What an index on PostgreSQL needs that an SQLite file does not: the engine and its failures.

The engine is psycopg 3's (``postgresql://`` URLs are taken to mean it; SQLAlchemy alone would
pick psycopg2). Its pool is sized by ``index.pool_size``; every connection is pinged when taken
from the pool, so that the first request after the database restarted gets a fresh connection
instead of an error; every new connection gets ``statement_timeout`` (``index.statement_timeout``)
and opening one waits at most ``index.connect_timeout``.

A database that cannot answer (down, restarting, unreachable, a statement cancelled by the
timeout, a deadlock) raises ``IndexUnavailable``: ingest answers 0xA700 (out of resources: the
sender retries later), C-FIND fails with 0xA700, HTTP answers 503 with Retry-After, as for
SQLite's writer lock held too long. Nothing was written by the failed transaction.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

DRIVER = "postgresql+psycopg"
MAX_OVERFLOW = 10  # connections opened beyond pool_size for a burst, closed after it


class IndexUnavailable(Exception):
    """The index's database server cannot answer now; the message says why, for an administrator."""


def engine(url: str, *, pool_size: int, statement_timeout: float, connect_timeout: float) -> Engine:
    """A pooled psycopg 3 engine whose connections cancel statements after ``statement_timeout`` s."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername=DRIVER)
    try:
        import psycopg  # noqa: F401  (the optional extra: say how to get it)
    except ImportError:
        raise IndexUnavailable(
            "index.url names PostgreSQL but psycopg 3 is not installed: pip install 'macpacs[postgresql]'"
        ) from None
    created = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=MAX_OVERFLOW,
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, math.ceil(connect_timeout)), "application_name": "macpacs"},
    )
    timeout_ms = str(max(1, round(statement_timeout * 1000)))

    @event.listens_for(created, "connect")
    def _session_settings(dbapi_connection: Any, _record: Any) -> None:
        # set_config() takes a bound value (SET does not); committed, it lasts for the session.
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, false)", (timeout_ms,))
        dbapi_connection.commit()

    return created


def pipelines_supported() -> bool:
    """Whether psycopg can send statements without waiting for each answer (pipeline mode: libpq
    14 or later, which psycopg's binary wheels bundle). Without it the index waits statement by
    statement, as it does on SQLite."""
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


def retryable(created: Engine) -> tuple[type[Exception], ...]:
    """The driver's errors after which the same transaction, run again, may well succeed (a
    deadlock, a serialization failure: SQLSTATE class 40); none for SQLite."""
    if created.dialect.name != "postgresql":
        return ()
    import psycopg.errors

    return (psycopg.errors.TransactionRollback,)


def is_unavailable(exc: BaseException) -> bool:
    """True for psycopg's errors that mean "the server cannot answer now", not a bug or bad data:
    connection failures, shutdowns, cancelled statements (the timeout), deadlocks (SQLSTATE
    classes 08, 57 and 40 are all ``OperationalError``)."""
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError)


def describe(exc: BaseException, statement_timeout: float) -> str:
    """What went wrong, in one line an administrator can act on."""
    import psycopg.errors

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return (
            f"the index database did not answer within index.statement_timeout = {statement_timeout:g} s "
            f"(PostgreSQL: {first}); the server is overloaded or a lock is held"
        )
    return f"the index database (PostgreSQL) is unavailable: {first}"
