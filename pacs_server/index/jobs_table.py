"""The ``job`` table: reads and writes of the persistent job queue (``pacs_server.jobs``).

``jobs`` keeps the rules (back-off, alerts, what a kind does); this module keeps the SQL. A job
is taken by one runner at a time: ``claim`` moves rows from ``queued`` to ``running`` with a
conditional UPDATE (``... WHERE state = 'queued'``) under the runner's own owner token and reads
back only the rows that carry it, so two processes (DICOM workers, several servers on one
PostgreSQL) never take the same job. On PostgreSQL the selects also skip rows another
transaction has locked (``FOR UPDATE SKIP LOCKED``); SQLite has one writer at a time anyway.

Writes take the index's writer lock, as ingest does, so that a job queued from a DICOM worker
waits its turn instead of making an ingest transaction poll for SQLite's lock. On SQLite they
commit with ``synchronous=NORMAL``: the WAL is not fsynced for them, but it is written (a
killed process loses nothing) and the next ingest commit, which is ``FULL``, makes them durable
with it; only a power cut in between can lose the last ones (at worst a routed instance is not
sent). This keeps a queued job from costing one more fsync per C-STORE. On PostgreSQL they
commit with ``synchronous_commit = off``, the same bargain: the commit does not wait for the WAL
flush, the next ingest commit flushes it, and only a crash of the database server in between
loses them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, case, delete, func, or_, select, update

from . import upsert
from .db import Index, in_chunks
from .schema import job

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)


@contextmanager
def quick_write(index: Index) -> Iterator[Connection]:
    """One write transaction under the writer lock (``BEGIN IMMEDIATE`` on SQLite), without an
    fsync of its own on either database: the module's docstring says why that is safe."""
    with index._write_lock, index.engine.connect() as conn:
        if index.is_sqlite:
            conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
            conn.commit()
        try:
            with conn.begin():
                if index.is_sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                yield conn
        finally:
            if index.is_sqlite:
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()


class JobTable:
    """The ``job`` rows of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.engine = index.engine
        # Built once: an INSERT that skips a taken dedupe key (both dialects say ON CONFLICT DO
        # NOTHING) and returns the new key (no row when skipped: psycopg gives no rowcount for
        # it), run with each row's values as parameters (building it per row costs more than
        # the insert itself).
        skip_taken = upsert.insert(job, self.engine.dialect.name).on_conflict_do_nothing(index_elements=["dedupe_key"])
        self._insert_stmt = skip_taken.returning(job.c.pk)
        self._compiled: dict[tuple[str, ...], tuple[str, tuple[str, ...] | None]] = {}
        self._defaults = {
            "description": "",
            "payload": "{}",
            "batch_key": None,
            "dedupe_key": None,
            "state": QUEUED,
            "attempts": 0,
            "owner": "",
            "lease_until": 0.0,
            "total": 0,
            "done": 0,
            "failed": 0,
            "message": "",
            "alerted": False,
        }

    def _writing(self) -> Any:
        return quick_write(self.index)

    def _locking(self, stmt: Any) -> Any:
        # SQLite leaves FOR UPDATE out (it has one writer at a time): one statement for both.
        return stmt.with_for_update(skip_locked=True)

    # -- queueing ---------------------------------------------------------------------------------
    def insert(self, rows: Sequence[Mapping[str, Any]], conn: Connection | None = None) -> list[int]:
        """Queue ``rows`` in one transaction (the caller's ``conn``, else one of their own); the
        primary key of each, in order.

        A row whose ``dedupe_key`` is already taken is not queued again: its key's existing
        job is returned instead.
        """
        if conn is None:
            with self._writing() as own:
                return self.insert(rows, own)
        now = time.time()
        pks: list[int] = []
        # On the driver's cursor, as add_instance writes an instance's rows: through SQLAlchemy's
        # per-statement layers this insert cost 0.15 ms of a routed instance's ~0.43 ms index
        # transaction (0.08 ms this way; docs/benchmarks.md, routing).
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            for row in rows:
                key = row.get("dedupe_key")
                values = {**self._defaults, "next_run_at": now, "created_at": now, "updated_at": now, **row}
                sql, order = self._compiled_insert(tuple(values))
                cursor.execute(sql, values if order is None else tuple(values[name] for name in order))
                found = cursor.fetchone()  # RETURNING: no row when skipped
                if found is None:  # the key is taken: that job, queued before (maybe by another process)
                    pks.append(conn.execute(select(job.c.pk).where(job.c.dedupe_key == key)).scalar_one())
                else:
                    pks.append(found[0])
        except self.index._driver_error as exc:
            self.index.raise_driver_error(exc)
        finally:
            cursor.close()
        return pks

    def _compiled_insert(self, columns: tuple[str, ...]) -> tuple[str, tuple[str, ...] | None]:
        """The insert's SQL for these columns and its parameters' order (None: named), compiled once."""
        compiled = self._compiled.get(columns)
        if compiled is None:
            statement = self._insert_stmt.compile(dialect=self.engine.dialect, column_keys=list(columns))
            order = tuple(statement.positiontup) if statement.positional else None
            compiled = self._compiled[columns] = (statement.string, order)
        return compiled

    def claim(
        self, kinds: Sequence[str], owner: str, lease_s: float, batch_limit: int, batch_wait_s: float = 0.0
    ) -> list[dict[str, Any]]:
        """Take the next due job of ``kinds`` (and up to ``batch_limit - 1`` due jobs of its batch key).

        A job with a batch key is due ``batch_wait_s`` after its time, so that the instances
        that arrive with it go out on the same association. The rows come back ``running``,
        owned by ``owner``, with ``attempts`` counted; an empty list when nothing is due.
        """
        now = time.time()
        c = job.c
        due = (c.state == QUEUED, c.next_run_at <= now, c.kind.in_(list(kinds)))
        waited = or_(c.batch_key.is_(None), c.next_run_at <= now - batch_wait_s)
        with self._writing() as conn:
            first = conn.execute(
                self._locking(select(c.pk, c.batch_key).where(*due, waited).order_by(c.next_run_at, c.pk).limit(1))
            ).first()
            if first is None:
                return []
            pks = [first.pk]
            if first.batch_key is not None and batch_limit > 1:
                pks += conn.execute(
                    self._locking(
                        select(c.pk)
                        .where(*due, c.batch_key == first.batch_key, c.pk != first.pk)
                        .order_by(c.pk)
                        .limit(batch_limit - 1)
                    )
                ).scalars()
            conn.execute(
                update(job)
                .where(c.pk.in_(pks), c.state == QUEUED)
                .values(state=RUNNING, owner=owner, lease_until=now + lease_s, attempts=c.attempts + 1, updated_at=now)
            )
            rows = conn.execute(select(job).where(c.pk.in_(pks), c.owner == owner, c.state == RUNNING).order_by(c.pk))
            return [dict(row) for row in rows.mappings()]

    # -- a running job's progress and outcome -------------------------------------------------------
    def progress(
        self, pks: Sequence[int], owner: str, lease_s: float, values: Mapping[int, Mapping[str, Any]]
    ) -> set[int]:
        """Extend the lease of running jobs and record the counts in ``values``; the jobs no longer
        ours (cancelled, or re-queued after the lease ran out) are returned."""
        now = time.time()
        c = job.c
        mine = (c.owner == owner, c.state == RUNNING)
        with self._writing() as conn:
            for counts, chunk in _alike(values):
                conn.execute(update(job).where(c.pk.in_(chunk), *mine).values(**counts))
            ours: set[int] = set()
            for chunk in in_chunks(pks):
                conn.execute(
                    update(job).where(c.pk.in_(chunk), *mine).values(lease_until=now + lease_s, updated_at=now)
                )
                ours.update(conn.execute(select(c.pk).where(c.pk.in_(chunk), *mine)).scalars())
        return set(pks) - ours

    def next_due(self, kinds: Sequence[str], batch_wait_s: float = 0.0) -> float | None:
        """When the next queued job of ``kinds`` is due, as ``claim`` sees it (a read, so idle
        runners take no lock)."""
        c = job.c
        when = case((c.batch_key.is_(None), c.next_run_at), else_=c.next_run_at + batch_wait_s)
        stmt = select(func.min(when)).where(c.state == QUEUED, c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def finish(self, outcomes: Mapping[int, Mapping[str, Any]], owner: str) -> None:
        """Store the outcome of running jobs (their new ``state``, message, counts, next run)."""
        now = time.time()
        with self._writing() as conn:
            for values, chunk in _alike(outcomes):
                conn.execute(
                    update(job)
                    .where(job.c.pk.in_(chunk), job.c.owner == owner, job.c.state == RUNNING)
                    .values(**values, owner="", lease_until=0.0, updated_at=now)
                )

    # -- an administrator's actions -------------------------------------------------------------------
    def retry(self, pk: int) -> bool:
        """Queue a failed, cancelled or waiting job to run now, with its attempts counted from zero."""
        with self._writing() as conn:
            return (
                conn.execute(
                    update(job)
                    .where(job.c.pk == pk, job.c.state.in_((QUEUED, FAILED, CANCELLED)))
                    .values(state=QUEUED, attempts=0, alerted=False, next_run_at=time.time(), updated_at=time.time())
                ).rowcount
                == 1
            )

    def cancel(self, pk: int) -> bool:
        """Cancel a queued, running or failed job (a running one stops at its next progress report)."""
        with self._writing() as conn:
            return (
                conn.execute(
                    update(job)
                    .where(job.c.pk == pk, job.c.state.in_((QUEUED, RUNNING, FAILED)))
                    .values(state=CANCELLED, owner="", updated_at=time.time())
                ).rowcount
                == 1
            )

    # -- housekeeping ------------------------------------------------------------------------------------
    def requeue(self, *, owner_prefix: str | None = None) -> int:
        """Put running jobs back in the queue: those whose lease ran out (their runner died or
        hangs), or with ``owner_prefix`` every one a runner of that prefix holds (its process
        is known to be gone). Returns how many."""
        now = time.time()
        where = job.c.owner.startswith(owner_prefix, autoescape=True) if owner_prefix else job.c.lease_until < now
        with self._writing() as conn:
            return conn.execute(
                update(job)
                .where(job.c.state == RUNNING, where)
                .values(state=QUEUED, owner="", lease_until=0.0, next_run_at=now, updated_at=now)
            ).rowcount

    def purge(self, before: float) -> int:
        """Forget finished and cancelled jobs last changed before ``before``."""
        with self._writing() as conn:
            return conn.execute(
                delete(job).where(job.c.state.in_((DONE, CANCELLED)), job.c.updated_at < before)
            ).rowcount

    # -- reads ---------------------------------------------------------------------------------------------
    def get(self, pk: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(job).where(job.c.pk == pk)).mappings().first()
        return dict(row) if row else None

    def list(
        self, states: Sequence[str] = (), kinds: Sequence[str] = (), limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally only of some states and kinds."""
        stmt = select(job).order_by(job.c.pk.desc()).limit(limit).offset(offset)
        if states:
            stmt = stmt.where(job.c.state.in_(list(states)))
        if kinds:
            stmt = stmt.where(job.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(stmt).mappings()]

    def counts(self) -> dict[str, int]:
        """Jobs by state, plus ``alerting``: queued or failed jobs that raised an alert."""
        with self.engine.connect() as conn:
            found = dict(conn.execute(select(job.c.state, func.count()).group_by(job.c.state)).all())
            alerting = conn.execute(
                select(func.count()).where(job.c.alerted.is_(True), job.c.state.in_((QUEUED, RUNNING, FAILED)))
            ).scalar_one()
        return {**{state: int(found.get(state, 0)) for state in STATES}, "alerting": int(alerting)}


def _alike(values: Mapping[int, Mapping[str, Any]]) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """The jobs of ``values`` (pk → new column values) grouped by identical values, a chunk of
    pks at a time: a batch of 500 routed instances that were all sent is one UPDATE, not 500,
    and the ingest's commits wait that much less for the writer lock."""
    groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
    for pk, row in values.items():
        groups.setdefault(tuple(sorted(row.items())), []).append(pk)
    for items, pks in groups.items():
        for chunk in in_chunks(pks):
            yield dict(items), chunk
