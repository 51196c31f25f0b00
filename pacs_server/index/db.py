"""The index database: connection set-up, migrations, the instance upsert, queries and counts.

SQLite (default) runs in WAL mode with ``synchronous=FULL``: a committed row survives a power
cut, which is what lets a C-STORE be acknowledged right after the commit. Writers are
serialised by a process lock (SQLite has one writer anyway) so that concurrent associations
queue instead of failing with "database is locked". That lock is waited for at most the busy
timeout (``SQLITE_BUSY_TIMEOUT_MS``), then a write raises ``WriterLockTimeout`` naming the holder,
which ingest answers with 0xA700 (``writer_lock.py``).

PostgreSQL (``postgres.py``) takes concurrent writers itself, row by row: no process lock, and
a database that cannot answer (restarting, a statement past ``index.statement_timeout``) raises
``IndexUnavailable``, which ingest, C-FIND and HTTP answer as they answer ``WriterLockTimeout``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    literal_column,
    select,
    update,
)
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from . import corruption, patient_records, postgres, schema
from .corruption import IndexUnreadable
from .matcher import Query, build, count_statement
from .postgres import IndexUnavailable
from .writer_lock import WriterLock

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 10_000
PARENT_CACHE_SIZE = 4096  # series whose parents' primary keys are remembered
ANALYSIS_LIMIT = 1000  # rows of each index SQLite's ANALYZE samples: milliseconds at any size

# An open write transaction of the index, as it hands one to work that must commit with its own
# (an instance's jobs, a patient's rewrite job): callers outside the index name it by this, so
# that they depend on the index and not on its SQL toolkit.
Transaction = Connection


@dataclass
class InstanceRecord:
    """Everything the index keeps about one instance, column values grouped by table."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    metadata: bytes
    charset: str = ""


@dataclass(frozen=True)
class StoredInstance:
    """The index's view of an instance already stored."""

    pk: int
    sop_instance_uid: str
    storage_key: str
    transfer_syntax_uid: str
    sop_class_uid: str


_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    # macOS: commits and checkpoints flush the drive's cache too (F_FULLFSYNC), as the file
    # store does; elsewhere SQLite ignores these.
    "PRAGMA fullfsync=ON",
    "PRAGMA checkpoint_fullfsync=ON",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA case_sensitive_like=ON",
    "PRAGMA temp_store=MEMORY",
)


def _sqlite_pragmas(cache_mb: int) -> Callable[[Any, Any], None]:
    """The pragmas of every new SQLite connection; ``cache_mb`` is ``index.sqlite_cache_mb``."""

    def apply(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for pragma in (*_SQLITE_PRAGMAS, f"PRAGMA cache_size=-{cache_mb * 1024}"):
            cursor.execute(pragma)
        cursor.close()

    return apply


class Index:
    """One index database, shared by every protocol of the process."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 20,
        statement_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        sqlite_cache_mb: int = 8,
    ) -> None:
        """``url``: ``sqlite:///path`` or ``postgresql://...``; the other arguments are the
        ``[index]`` settings (``statement_timeout`` and ``connect_timeout`` apply to PostgreSQL,
        ``sqlite_cache_mb`` to SQLite)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.statement_timeout = statement_timeout
        self.engine: Engine
        if self.is_sqlite:
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_cache_mb))
        else:
            self.engine = postgres.engine(
                url, pool_size=pool_size, statement_timeout=statement_timeout, connect_timeout=connect_timeout
            )
        self._write_lock: WriterLock | _NoLock = _NoLock()
        # The SQLite file (None for a database server or in memory), and what keeps this process
        # off it once some process found it corrupt (corruption.py: the rebuild of a corrupt index).
        self.path: Path | None = None
        self.guard: corruption.Guard | None = None
        if self.is_sqlite:  # across processes too (DICOM workers), bounded: writer_lock.py says why
            database = self.engine.url.database
            self.path = Path(database) if database and database != ":memory:" else None
            self._write_lock = WriterLock(self.path, SQLITE_BUSY_TIMEOUT_MS / 1000)
            if self.path is not None:
                self.guard = corruption.Guard(self.engine, self.path, self.reset_caches)
        # Every statement's error passes here: corruption is recorded and reported one way.
        event.listen(self.engine, "handle_error", self._on_error)
        self._driver_error = self.engine.dialect.loaded_dbapi.DatabaseError
        self._parents: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._compiled: dict[str | tuple[str, ...], _Compiled] = {}
        self._returning = bool(self.engine.dialect.insert_returning)
        self._pipelines = not self.is_sqlite and postgres.pipelines_supported()
        # Retried once by add_instance: another writer got there first (and, on PostgreSQL, a
        # deadlock with a delete, which locks series before studies, or a serialization failure).
        self._conflicts = (
            IntegrityError,
            self.engine.dialect.loaded_dbapi.IntegrityError,
            _StaleParents,
            *postgres.retryable(self.engine),
        )

    # -- schema -----------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema to the newest revision (a no-op when it is already there).

        IndexUnreadable when the database is corrupt (the server then rebuilds it: archive.py);
        IndexUnavailable for any other database error (a full disk, no permission), which moving
        a healthy file aside would not cure.
        """
        try:
            self._migrate()
        except DatabaseError as exc:
            if corruption.is_corruption(exc):
                raise IndexUnreadable(str(exc.orig or exc)) from exc
            where = self.path or self.engine.url.render_as_string()  # the password hidden
            raise IndexUnavailable(
                f"cannot open the index {where}: {str(exc.orig or exc).splitlines()[0]}. It is not corrupt and is "
                "left as it is. Usual causes: a full disk (free space on its volume), a file or folder the server "
                "may not write, a failing disk (see the system log); start again once that is fixed"
            ) from exc

    def _migrate(self) -> None:
        # Imported here: only the main process and commands migrate, and alembic's import (about
        # 0.3 s) would otherwise be in every DICOM worker's start, and so in a hung server's recovery.
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        # Revisions developed side by side may branch from one parent: every head is applied.
        heads = set(ScriptDirectory.from_config(config).get_heads())
        with self.engine.begin() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
            if current == heads:
                return
            log.info(
                "index: migrating schema from %s to %s", ", ".join(sorted(current)) or "empty", ", ".join(sorted(heads))
            )
            config.attributes["connection"] = conn
            command.upgrade(config, "heads")
        self.analyze()  # a revision may add indexes or rewrite rows: plan with fresh statistics

    def analyze(self) -> None:
        """Refresh the query planner's statistics of every table (``ANALYZE``).

        SQLite plans with what ANALYZE last recorded (``sqlite_stat1``): figures taken while the
        archive was small would describe a large one wrongly, so this runs after migrations,
        after ``macpacs import`` and ``reindex``, and periodically in the server. With
        ``analysis_limit`` each index is sampled, not read whole (measured at 25 million
        instances in docs/benchmarks.md). PostgreSQL's autovacuum analyzes on its own; the same
        statement there keeps one path for both.
        """
        with self._write_lock, self.engine.begin() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
            conn.exec_driver_sql("ANALYZE")

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        self.engine.dispose()

    # -- corruption -------------------------------------------------------------------------
    def _on_error(self, context: Any) -> Exception | None:
        """SQLAlchemy's hook for every failed statement: corruption becomes ``IndexUnreadable``, a
        database server that cannot answer ``IndexUnavailable`` (not while the pool pings a
        connection: a failed ping makes it reconnect)."""
        if corruption.is_corruption(context.original_exception):
            return self.found_corruption(context.original_exception)
        if not context.is_pre_ping and postgres.is_unavailable(context.original_exception):
            return IndexUnavailable(postgres.describe(context.original_exception, self.statement_timeout))
        return None

    def found_corruption(self, exc: BaseException) -> IndexUnreadable:
        """Record that the SQLite file is corrupt (the recovery file every process reads) and return
        the error every caller reports: ingest answers 0xA700, C-FIND and QIDO-RS fail, health fails.
        """
        reason = str(exc).splitlines()[0]
        if self.path is not None:
            corruption.mark_corrupt(self.path, reason)
        return IndexUnreadable(f"the index database is corrupt: {reason}")

    def recovery_state(self) -> dict[str, Any] | None:
        """The recovery file's content (``"corrupt"`` or ``"rebuilding"``), None when all is well."""
        return corruption.read_state(self.path) if self.path is not None else None

    def replace_corrupt(self, error: str) -> tuple[Path, dict[str, int | str]]:
        """Move the corrupt SQLite file aside and put a fresh one in its place (corruption.py says how).

        Returns where it went and the tables copied from it; the stored files are re-indexed next.
        """
        return corruption.replace_corrupt(self, error)

    def end_recovery(self) -> None:
        """The index is whole again (a rebuild finished): remove the recovery file."""
        state = self.recovery_state()
        if self.path is not None and state is not None and state.get("state") == "rebuilding":
            corruption.clear_state(self.path)

    def integrity_problem(self) -> str | None:
        """SQLite's ``quick_check``: None when the file is sound, else what it found (reads it all)."""
        if not self.is_sqlite:
            return None
        try:
            with self.engine.connect() as conn:
                found = list(conn.exec_driver_sql("PRAGMA quick_check(5)").scalars())
        except IndexUnreadable as exc:
            return str(exc)
        return None if found == ["ok"] else "; ".join(map(str, found))

    def check_tables(self) -> None:
        """IndexUnreadable when a declared table is missing (dropped by hand, a damaged schema)."""
        try:
            present = set(inspect(self.engine).get_table_names())
        except DatabaseError as exc:
            raise IndexUnreadable(str(exc.orig or exc)) from exc
        missing = sorted(set(schema.metadata.tables) - present)
        if missing:
            raise IndexUnreadable(f"table(s) {', '.join(missing)} missing from the index database")

    def reset_caches(self) -> None:
        """Forget what was remembered of the database (it was replaced)."""
        self._parents.clear()

    # -- writes -----------------------------------------------------------------------------
    def patient_ids(self, study_uids: Sequence[str]) -> list[str]:
        """The Patient IDs of these studies, sorted (the audit trail names whose data was touched)."""
        if not study_uids:
            return []
        p, st = schema.patient, schema.study
        query = (
            select(p.c.patient_id)
            .distinct()
            .select_from(st.join(p, st.c.patient_pk == p.c.pk))
            .where(st.c.study_uid.in_(list(study_uids)), p.c.patient_id != "")
        )
        with self.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    def content_hash(self, sop_instance_uid: str) -> str | None:
        """The stored instance's dataset hash, or None (not indexed, or indexed before revision 0003)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(schema.instance.c.content_hash).where(schema.instance.c.sop_instance_uid == sop_instance_uid)
            ).scalar()

    def add_instance(
        self, record: InstanceRecord, *, replace: bool = False, within: Callable[[Transaction], object] | None = None
    ) -> bool:
        """Insert (or, with ``replace``, update) one instance and its parents in one transaction.

        ``within`` runs in that transaction after the instance's rows are written: ingest queues
        the instance's jobs there, so that they commit with it or not at all.

        Returns True when a new instance row was created. Ingest calls this only once the file
        and its folder are fsynced, so a committed row always has a durable file.

        Counters and ModalitiesInStudy are maintained here so that queries never count rows.
        The primary keys of recently seen series and their parents are remembered, so that the
        usual case (the next slice of a series) is one select, three counter updates and two
        inserts, run as pre-compiled statements straight on the driver's cursor (SQLAlchemy's
        per-statement layers cost more than SQLite itself here). The counter updates also check
        that the remembered rows still are those series and study (another process may have
        deleted them); when not, or on a foreign-key or unique conflict (another process
        inserted the same parents first), the transaction is rolled back and retried once
        with everything looked up again.

        On SQLite the transaction starts with ``BEGIN IMMEDIATE``: it takes the database's write
        lock first (waiting up to the busy timeout when another process writes) so that what it
        reads cannot change before it writes, whichever process the other writer is. On
        PostgreSQL writers of other studies run side by side: the one read that a write depends
        on (the study's modalities) locks its row (``FOR UPDATE``), the counters are updated in
        place (``n = n + 1``), and the unique keys turn a race on new parents into the retry above.
        """
        now = time.time()
        series_uid = record.series["series_uid"]
        with self._write_lock:
            for attempt in range(2):
                parents = self._parents.get(series_uid) if attempt == 0 else None
                try:
                    # An explicit begin: SQLAlchemy commits at the end of the block even though
                    # most statements go to the driver's cursor behind its back.
                    with self.engine.connect() as conn, conn.begin():
                        if self.is_sqlite:
                            conn.exec_driver_sql("BEGIN IMMEDIATE")
                        cursor = conn.connection.dbapi_connection.cursor()
                        try:
                            if parents is None:
                                parents = self._find_or_create_parents(cursor, record, now)
                            created = self._upsert(conn, cursor, record, now, replace, parents)
                        finally:
                            cursor.close()
                        if within is not None:
                            within(conn)
                    self._remember(series_uid, parents)
                    return created
                except self._conflicts:
                    self._parents.clear()
                    if attempt:
                        raise
                except self._driver_error as exc:  # the driver's cursor, past SQLAlchemy's error hook
                    self.raise_driver_error(exc)
        raise AssertionError("unreachable")

    def raise_driver_error(self, exc: Exception) -> NoReturn:
        """Raise what an error of a statement run on the driver's own cursor (past SQLAlchemy's
        error hook, ``_on_error``) means: IndexUnreadable for corruption, IndexUnavailable for a
        database server that cannot answer, else the error itself. For the write paths that skip
        SQLAlchemy's per-statement layers (``add_instance``, ``JobTable.insert``)."""
        if corruption.is_corruption(exc):
            raise self.found_corruption(exc) from exc
        if postgres.is_unavailable(exc):
            raise IndexUnavailable(postgres.describe(exc, self.statement_timeout)) from exc
        raise exc

    def _remember(self, series_uid: str, parents: tuple[int, int, int]) -> None:
        self._parents[series_uid] = parents
        self._parents.move_to_end(series_uid)
        while len(self._parents) > PARENT_CACHE_SIZE:
            self._parents.popitem(last=False)

    def _find_or_create_parents(self, cursor: Any, rec: InstanceRecord, now: float) -> tuple[int, int, int]:
        self._run(
            cursor, "find_patient", {"pid": rec.patient["patient_id"], "issuer": rec.patient["issuer_of_patient_id"]}
        )
        row = cursor.fetchone()
        patient_values = rec.patient
        if row is None:  # a new patient, or one merged away (ADT^A40): then the surviving one
            self._run(
                cursor, "find_merge", {"pid": rec.patient["patient_id"], "issuer": rec.patient["issuer_of_patient_id"]}
            )
            surviving = cursor.fetchone()
            if surviving is not None:
                patient_values = {**rec.patient, "patient_id": surviving[0], "issuer_of_patient_id": surviving[1]}
                self._run(cursor, "find_patient", {"pid": surviving[0], "issuer": surviving[1]})
                row = cursor.fetchone()
        if row is not None:
            patient_pk = row[0]
        else:
            patient_pk = self._insert(
                cursor,
                "patient",
                {**patient_values, "charset": rec.charset, "created_at": now}
                | {"num_studies": 0, "num_series": 0, "num_instances": 0},
            )

        self._run(cursor, "find_study", {"uid": rec.study["study_uid"]})
        row = cursor.fetchone()
        if row is None:
            study_pk = self._insert(
                cursor,
                "study",
                {**rec.study, "patient_pk": patient_pk, "charset": rec.charset, "created_at": now, "updated_at": now}
                | {"modalities_in_study": "", "num_series": 0, "num_instances": 0},
            )
            self._run(cursor, "patient_studies", {"pk_": patient_pk})
            modalities = ""
        else:
            study_pk, modalities = row

        self._run(cursor, "find_series", {"uid": rec.series["series_uid"]})
        row = cursor.fetchone()
        if row is not None:
            series_pk = row[0]
        else:
            series_pk = self._insert(
                cursor, "series", {**rec.series, "study_pk": study_pk, "created_at": now, "num_instances": 0}
            )
            self._run(cursor, "study_series", {"pk_": study_pk})
            self._run(cursor, "patient_series", {"pk_": patient_pk})
        modality = rec.series.get("modality", "")
        if modality and modality not in modalities.split("\\"):
            merged = "\\".join(sorted(filter(None, [*modalities.split("\\"), modality])))
            self._run(cursor, "study_modalities", {"pk_": study_pk, "merged": merged})
        return patient_pk, study_pk, series_pk

    def _upsert(
        self, conn: Any, cursor: Any, rec: InstanceRecord, now: float, replace: bool, parents: tuple[int, int, int]
    ) -> bool:
        patient_pk, study_pk, series_pk = parents
        # The hot path of every C-STORE: the instance looked up, then five statements whose
        # results are looked at only once all have run. On PostgreSQL those five go in one round
        # trip (psycopg's pipeline mode) instead of one each: with the pool's ping, BEGIN, the
        # lookup and COMMIT, 5 round trips an instance instead of 9 (counted with strace).
        # Rows are locked study, series, patient, in the order ``_find_or_create_parents``
        # takes them (the study first, FOR UPDATE), so that two PostgreSQL transactions on one
        # study queue instead of deadlocking.
        dbapi = cursor.connection
        counters: list[tuple[str, int, Any]] = []
        with self._pipeline(dbapi):
            self._run(cursor, "find_instance", {"uid": rec.instance["sop_instance_uid"]})
            row = cursor.fetchone()
            if row is None:
                for name, values in (
                    (
                        "count_study",
                        {"pk_": study_pk, "uid": rec.study["study_uid"], "now": now, "size": rec.instance["file_size"]},
                    ),
                    ("count_series", {"pk_": series_pk, "uid": rec.series["series_uid"]}),
                    ("count_patient", {"pk_": patient_pk}),
                ):
                    counter = dbapi.cursor()
                    self._run(counter, name, values)
                    counters.append((name, values["pk_"], counter))
                row_values = {**rec.instance, "series_pk": series_pk, "received_at": now}
                self._run(cursor, ("instance", *row_values), row_values)
                # Its pk is the one the insert just took (lastval(), last_insert_rowid()).
                self._run(cursor, "metadata_of_last_instance", {"series_pk": series_pk, "data": rec.metadata})
        if row is None:
            for name, pk, counter in counters:
                stale = counter.rowcount != 1
                counter.close()
                if stale:
                    raise _StaleParents(f"{name}: remembered row {pk} is gone")
            return True
        return self._replace(conn, rec, now, replace, row[0], study_pk, series_pk)

    def _replace(
        self, conn: Any, rec: InstanceRecord, now: float, replace: bool, existing: int, study_pk: int, series_pk: int
    ) -> bool:
        """The instance's row exists: rewritten to describe ``rec`` when ``replace``, else left alone."""
        st, i = schema.study, schema.instance
        if replace:
            old_series, old_size = conn.execute(select(i.c.series_pk, i.c.file_size).where(i.c.pk == existing)).one()
            conn.execute(
                update(i).where(i.c.pk == existing).values(**rec.instance, series_pk=series_pk, received_at=now)
            )
            conn.execute(
                update(schema.instance_metadata)
                .where(schema.instance_metadata.c.instance_pk == existing)
                .values(data=rec.metadata, series_pk=series_pk)
            )
            old_study = select(schema.series.c.study_pk).where(schema.series.c.pk == old_series).scalar_subquery()
            conn.execute(update(st).where(st.c.pk == old_study).values(stored_bytes=st.c.stored_bytes - old_size))
            conn.execute(
                update(st)
                .where(st.c.pk == study_pk)
                .values(updated_at=now, stored_bytes=st.c.stored_bytes + rec.instance["file_size"])
            )
        return False

    def _pipeline(self, dbapi: Any) -> AbstractContextManager[Any]:
        """psycopg's pipeline mode on PostgreSQL (statements sent without waiting for each
        answer; the block's end waits for them all and raises the first error); SQLite runs each
        statement in process, with no round trip to save."""
        return dbapi.pipeline() if self._pipelines else contextlib.nullcontext()

    def _insert(self, cursor: Any, table: str, values: Mapping[str, Any]) -> int:
        """Insert one row with a pre-compiled statement; returns its ``pk`` (0 for tables without)."""
        self._run(cursor, (table, *values), values)
        if "pk" not in schema.metadata.tables[table].c:
            return 0
        return cursor.fetchall()[0][0] if self._returning else cursor.lastrowid

    def _run(self, cursor: Any, name: str | tuple[str, ...], values: Mapping[str, Any]) -> None:
        """Execute a write-path statement, compiled once for this database's dialect."""
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = self._compile(name)
        sql, order, defaults = compiled
        if defaults:
            values = {**defaults, **values}
        cursor.execute(sql, values if order is None else tuple(values[key] for key in order))

    def _compile(self, name: str | tuple[str, ...]) -> _Compiled:
        """SQL text, parameter order (None: named parameters) and column defaults of a statement.

        A tuple ``(table, column...)`` stands for an insert of those columns into ``table``;
        the table's other columns with a default get it (SQLAlchemy adds them to the statement).
        """
        if not isinstance(name, tuple):
            compiled = _STATEMENTS[name].compile(dialect=self.engine.dialect)
            return compiled.string, tuple(compiled.positiontup) if compiled.positional else None, {}
        table = schema.metadata.tables[name[0]]
        stmt: Any = insert(table)
        if self._returning and "pk" in table.c:
            stmt = stmt.returning(table.c.pk)
        compiled = stmt.compile(dialect=self.engine.dialect, column_keys=list(name[1:]))
        defaults = {
            column.key: column.default.arg
            for column in table.c
            if column.key not in name[1:] and column.default is not None and column.default.is_scalar
        }
        return compiled.string, tuple(compiled.positiontup) if compiled.positional else None, defaults

    def clear(self) -> None:
        """Empty every table (reindex starts from here)."""
        with self._write_lock, self.engine.begin() as conn:
            for table in reversed(schema.metadata.sorted_tables):
                if table.name in ("instance_metadata", "instance", "series", "study", "patient"):
                    conn.execute(delete(table))
            self._parents.clear()

    def remove_instances(self, instance_pks: Sequence[int]) -> dict[str, int]:
        """Delete instances, then the series, studies and patients they leave empty, in one transaction.

        Counters and ModalitiesInStudy of what remains are recomputed. Files are the caller's job
        (``pacs_server.delete``), after this commits. Returns how many rows of each level went.
        """
        p, st, se, i, m = schema.patient, schema.study, schema.series, schema.instance, schema.instance_metadata
        removed = dict.fromkeys(("instances", "series", "studies", "patients"), 0)
        pks = list(dict.fromkeys(instance_pks))
        with self._write_lock, self.engine.begin() as conn:
            series_pks: set[int] = set()
            for chunk in in_chunks(pks):
                series_pks.update(conn.execute(select(i.c.series_pk).where(i.c.pk.in_(chunk))).scalars())
                conn.execute(delete(m).where(m.c.instance_pk.in_(chunk)))
                removed["instances"] += conn.execute(delete(i).where(i.c.pk.in_(chunk))).rowcount
            study_pks: set[int] = set()
            for chunk in in_chunks(sorted(series_pks)):
                study_pks.update(conn.execute(select(se.c.study_pk).where(se.c.pk.in_(chunk))).scalars())
                count = select(func.count()).where(i.c.series_pk == se.c.pk).scalar_subquery()
                conn.execute(update(se).where(se.c.pk.in_(chunk)).values(num_instances=count))
                removed["series"] += conn.execute(
                    delete(se).where(se.c.pk.in_(chunk), se.c.num_instances == 0)
                ).rowcount
            patient_pks: set[int] = set()
            for chunk in in_chunks(sorted(study_pks)):
                patient_pks.update(conn.execute(select(st.c.patient_pk).where(st.c.pk.in_(chunk))).scalars())
                in_study = se.c.study_pk == st.c.pk
                conn.execute(
                    update(st)
                    .where(st.c.pk.in_(chunk))
                    .values(
                        num_series=select(func.count()).where(in_study).scalar_subquery(),
                        num_instances=select(func.coalesce(func.sum(se.c.num_instances), 0))
                        .where(in_study)
                        .scalar_subquery(),
                        stored_bytes=select(func.coalesce(func.sum(i.c.file_size), 0))
                        .select_from(se.join(i, i.c.series_pk == se.c.pk))
                        .where(in_study)
                        .scalar_subquery(),
                    )
                )
                removed["studies"] += conn.execute(delete(st).where(st.c.pk.in_(chunk), st.c.num_series == 0)).rowcount
                modalities: dict[int, set[str]] = {}
                for study_pk, modality in conn.execute(
                    select(se.c.study_pk, se.c.modality).where(se.c.study_pk.in_(chunk))
                ):
                    modalities.setdefault(study_pk, set()).add(modality)
                for study_pk, values in modalities.items():
                    merged = "\\".join(sorted(filter(None, values)))
                    conn.execute(update(st).where(st.c.pk == study_pk).values(modalities_in_study=merged))
            for chunk in in_chunks(sorted(patient_pks)):
                of_patient = st.c.patient_pk == p.c.pk
                conn.execute(
                    update(p)
                    .where(p.c.pk.in_(chunk))
                    .values(
                        num_studies=select(func.count()).where(of_patient).scalar_subquery(),
                        num_series=select(func.coalesce(func.sum(st.c.num_series), 0))
                        .where(of_patient)
                        .scalar_subquery(),
                        num_instances=select(func.coalesce(func.sum(st.c.num_instances), 0))
                        .where(of_patient)
                        .scalar_subquery(),
                    )
                )
                removed["patients"] += conn.execute(delete(p).where(p.c.pk.in_(chunk), p.c.num_studies == 0)).rowcount
            self._parents.clear()  # cached parent keys may name rows that are gone
        return removed

    # -- reads ------------------------------------------------------------------------------
    def find(self, query: Query) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
        """Run a query through the one matcher; returns the keywords and an iterator of rows."""
        stmt, keywords = build(query)

        def rows() -> Iterator[Mapping[str, Any]]:
            with self.engine.connect() as conn:
                result = conn.execution_options(yield_per=500).execute(stmt)
                for row in result:
                    yield row._mapping

        return keywords, rows()

    def find_all(self, query: Query) -> list[dict[str, Any]]:
        _keywords, rows = self.find(query)
        return [dict(row) for row in rows]

    def page(self, query: Query) -> tuple[list[dict[str, Any]], int]:
        """One page of what ``query`` matches (its order, limit and offset) and the total count.

        For lists that show "n of total" (the web study list). Two statements on one connection:
        the page, and a count over the same matching without ordering or paging.
        """
        stmt, _keywords = build(query)
        with self.engine.connect() as conn:
            total = conn.execute(count_statement(query)).scalar_one()
            rows = [dict(row) for row in conn.execute(stmt).mappings()]
        return rows, total

    def instances(self, query: Query) -> list[StoredInstance]:
        """The stored instances under whatever the query matches, at any level, in index order.

        Retrieval (C-MOVE, C-GET, WADO) asks this, so it matches exactly what C-FIND found.
        """
        stmt, _keywords = build(replace(query, level="IMAGE"))
        i = schema.instance.c
        stmt = stmt.with_only_columns(i.pk, i.sop_instance_uid, i.storage_key, i.transfer_syntax_uid, i.sop_class_uid)
        with self.engine.connect() as conn:
            return [StoredInstance(*row) for row in conn.execute(stmt)]

    def series_metadata(self, series_uid: str) -> list[bytes]:
        """The cached metadata blobs of a series' instances, in instance order."""
        se, i, m = schema.series, schema.instance, schema.instance_metadata
        stmt = (
            select(m.c.data)
            .select_from(m.join(i, i.c.pk == m.c.instance_pk).join(se, se.c.pk == m.c.series_pk))
            .where(se.c.series_uid == series_uid)
            .order_by(i.c.instance_number, i.c.pk)
        )
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(stmt)]

    def instance_metadata(self, series_uid: str, sop_instance_uid: str) -> bytes | None:
        """The cached metadata blob of one instance of a series, or None when it is not there."""
        se, i, m = schema.series, schema.instance, schema.instance_metadata
        stmt = (
            select(m.c.data)
            .select_from(m.join(i, i.c.pk == m.c.instance_pk).join(se, se.c.pk == m.c.series_pk))
            .where(i.c.sop_instance_uid == sop_instance_uid, se.c.series_uid == series_uid)
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def stored_bytes(self) -> int:
        """The sum of the stored files' sizes, as recorded at ingest (the status document's).

        A sum of the studies' ``stored_bytes`` (kept by every write): milliseconds at 25 million
        instances, where a sum over the instance rows read the whole table.
        """
        with self.engine.connect() as conn:
            return conn.execute(select(func.coalesce(func.sum(schema.study.c.stored_bytes), 0))).scalar_one()

    def database_files(self) -> dict[str, int]:
        """Bytes of the SQLite database and its WAL (empty for a database server), for the status page."""
        database = self.engine.url.database if self.is_sqlite else None
        if not database or database == ":memory:":
            return {}
        sizes = {}
        for name, suffix in (("database", ""), ("wal", "-wal")):
            try:
                sizes[name] = Path(database + suffix).stat().st_size
            except FileNotFoundError:
                sizes[name] = 0
        return sizes

    def counts(self) -> dict[str, int]:
        """Patients, studies, series and instances held: the patients' counters added up (kept by
        every write), one pass over the smallest table instead of counting 25 million instance rows."""
        p = schema.patient.c
        total = func.coalesce  # an empty archive sums to NULL
        with self.engine.connect() as conn:
            patients, studies, series, instances = conn.execute(
                select(
                    func.count(),
                    total(func.sum(p.num_studies), 0),
                    total(func.sum(p.num_series), 0),
                    total(func.sum(p.num_instances), 0),
                )
            ).one()
        return {"patients": patients, "studies": studies, "series": series, "instances": instances}

    def ping(self) -> None:
        """A real round trip through the pool (start-up and the status page); IndexUnreadable if corrupt."""
        try:
            with self.engine.connect() as conn:
                patient = schema.patient
                conn.execute(select(func.count()).select_from(patient).where(patient.c.pk == -1)).scalar_one()
        except DatabaseError as exc:
            raise IndexUnreadable(str(exc.orig or exc)) from exc

    def check_writable(self, lock_timeout: float, busy_timeout_ms: int) -> None:
        """Go through the write path as a C-STORE would, changing nothing (for /testdbalive).

        Takes the writer lock (WriterLockTimeout, naming the holder, after ``lock_timeout`` s: a
        writer is hung, here or in another process) and then the database's write lock with a
        no-op UPDATE, waiting at most ``busy_timeout_ms`` (SQLite's busy timeout, PostgreSQL's
        statement timeout: the driver's error, another process holds the database). With SQLite
        in WAL mode a plain read is not blocked by another process's exclusive lock, so ``ping``
        alone would call a stuck database alive.
        """
        self._write_lock.acquire(timeout=lock_timeout)
        try:
            with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                    conn.commit()
                else:  # a row lock held elsewhere fails the check as soon, for this transaction only
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(busy_timeout_ms)}")
                try:
                    conn.execute(update(schema.web_user).where(schema.web_user.c.pk == -1).values(failed_logins=0))
                finally:
                    conn.rollback()
                    if self.is_sqlite:
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                        conn.commit()
        finally:
            self._write_lock.release()

    # -- bulk (benchmarks, reindex) -----------------------------------------------------------
    def bulk_load(self, table_rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Insert pre-built rows, parents first, in one transaction (primary keys given by the caller).

        Used to fill an index with millions of synthetic instances for benchmarks.
        """
        with self._write_lock, self.engine.begin() as conn:
            for name in ("patient", "study", "series", "instance", "instance_metadata"):
                if table_rows.get(name):
                    conn.execute(insert(schema.metadata.tables[name]), list(table_rows[name]))
            if not self.is_sqlite:  # SQLite takes max(pk) + 1 next; PostgreSQL's sequences must be moved on
                for name in ("patient", "study", "series", "instance"):
                    table = schema.metadata.tables[name]
                    after = select(func.coalesce(func.max(table.c.pk), 0) + 1).scalar_subquery()
                    conn.execute(select(func.setval(func.pg_get_serial_sequence(name, "pk"), after, False)))


_ONE = literal_column("1")  # a literal, not one more parameter to pass


class _LastInsertedPk(FunctionElement[int]):
    """The pk that the connection's last insert gave its row: PostgreSQL's ``lastval()`` (the
    last value a sequence gave this session), SQLite's ``last_insert_rowid()``."""

    type = Integer()
    inherit_cache = True


@compiles(_LastInsertedPk, "postgresql")
def _lastval(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "lastval()"


@compiles(_LastInsertedPk, "sqlite")
def _last_insert_rowid(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "last_insert_rowid()"


_STATEMENTS: dict[str, Any] = {
    "find_patient": select(schema.patient.c.pk).where(
        schema.patient.c.patient_id == bindparam("pid"), schema.patient.c.issuer_of_patient_id == bindparam("issuer")
    ),
    "find_merge": patient_records.SURVIVING,
    # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already keeps other writers out): the
    # study's ModalitiesInStudy is read here and merged below, and no other node may merge between.
    "find_study": select(schema.study.c.pk, schema.study.c.modalities_in_study)
    .where(schema.study.c.study_uid == bindparam("uid"))
    .with_for_update(),
    "find_series": select(schema.series.c.pk).where(schema.series.c.series_uid == bindparam("uid")),
    "find_instance": select(schema.instance.c.pk).where(schema.instance.c.sop_instance_uid == bindparam("uid")),
    "patient_studies": update(schema.patient)
    .where(schema.patient.c.pk == bindparam("pk_"))
    .values(num_studies=schema.patient.c.num_studies + _ONE),
    "patient_series": update(schema.patient)
    .where(schema.patient.c.pk == bindparam("pk_"))
    .values(num_series=schema.patient.c.num_series + _ONE),
    "study_series": update(schema.study)
    .where(schema.study.c.pk == bindparam("pk_"))
    .values(num_series=schema.study.c.num_series + _ONE),
    "study_modalities": update(schema.study)
    .where(schema.study.c.pk == bindparam("pk_"))
    .values(modalities_in_study=bindparam("merged")),
    "count_series": update(schema.series)
    .where(schema.series.c.pk == bindparam("pk_"), schema.series.c.series_uid == bindparam("uid"))
    .values(num_instances=schema.series.c.num_instances + _ONE),
    "count_study": update(schema.study)
    .where(schema.study.c.pk == bindparam("pk_"), schema.study.c.study_uid == bindparam("uid"))
    .values(
        num_instances=schema.study.c.num_instances + _ONE,
        updated_at=bindparam("now"),
        stored_bytes=schema.study.c.stored_bytes + bindparam("size"),
    ),
    "metadata_of_last_instance": insert(schema.instance_metadata).values(
        instance_pk=_LastInsertedPk(), series_pk=bindparam("series_pk"), data=bindparam("data")
    ),
    "count_patient": update(schema.patient)
    .where(schema.patient.c.pk == bindparam("pk_"))
    .values(num_instances=schema.patient.c.num_instances + _ONE),
}


# SQL text, parameter order (None: named parameters), values of columns left to their default.
_Compiled = tuple[str, tuple[str, ...] | None, dict[str, Any]]


class _StaleParents(Exception):
    """A remembered series, study or patient row is no longer there (deleted by another process)."""


def in_chunks(values: Sequence[int], size: int = 500) -> Iterator[list[int]]:
    """Slices short enough for an ``IN (...)`` list on every database (the index's modules' one way)."""
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


class _NoLock:
    """Servers other than SQLite handle concurrent writers themselves."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def acquire(self, timeout: float | None = None) -> None:
        return None

    def release(self) -> None:
        return None
