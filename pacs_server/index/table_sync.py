"""Rows of one index made equal to another's, table by table and key by key (``macpacs migrate``).

Both sides are read in primary-key order, in chunks: a chunk of the source's keys, and the
target's rows in the same key range, so that a row missing or different in the target is written
(an upsert by primary key, keys kept as they are, so that every reference between tables stays
true), a row the source no longer has is deleted, and an equal row costs a read and nothing
else. Running it again after an interruption, or after the source changed, therefore writes only
the difference: that is what makes a migration resumable.

Instances are handed to the caller chunk by chunk (``instance_chunks``): their files must be in
the target store before their rows are written (``write_instances``), so that a target row
always names a file that was copied and checked.

Every table of the schema moves, except ``rate_limit`` (counters of the last minutes). On
PostgreSQL the key sequences are moved past the copied keys (``reset_sequences``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import ColumnElement, Table, delete, func, select, tuple_
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError

from . import hl7_table, upsert, worklist_table  # noqa: F401  (hl7 and worklist tables join schema.metadata)
from .db import MIGRATIONS, Index
from .schema import instance, instance_metadata, metadata, patient, series, study

CHUNK = 500  # rows read from each side per round trip
NOT_COPIED = frozenset({"rate_limit"})
# Written by instance_chunks/write_instances, not by sync_table.
INSTANCE_TABLES = frozenset({"instance", "instance_metadata"})
# What an instance row needs in the target first: table, its foreign key, the parent table.
PARENTS = ((series, "study_pk", study), (study, "patient_pk", patient))


def copied_tables() -> list[Table]:
    """Every table that moves, parents before children."""
    return [t for t in metadata.sorted_tables if t.name not in NOT_COPIED]


def other_tables() -> list[Table]:
    """The copied tables ``sync_table`` writes (all but the instances and their metadata)."""
    return [t for t in copied_tables() if t.name not in INSTANCE_TABLES]


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and the migration's state file;
    ValueError for text that is no database URL."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise ValueError(f"{url!r} is not a database URL (postgresql://user:password@host:5432/database)") from None


def schema_heads() -> set[str]:
    """The revisions this code's migrations end at."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return set(ScriptDirectory.from_config(config).get_heads())


def revisions(index: Index) -> set[str]:
    """The revisions the database is at (empty: never migrated)."""
    with index.engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def counts(index: Index) -> dict[str, int]:
    """Rows of every copied table."""
    with index.engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in copied_tables()}


@dataclass
class Changes:
    """What one pass wrote to (or, checking, found different in) one table."""

    written: int = 0
    deleted: int = 0

    @property
    def any(self) -> bool:
        return bool(self.written or self.deleted)


@dataclass
class InstanceChunk:
    """One key range of the instance table: what the target lacks, and what it has in excess."""

    changed: list[dict[str, Any]] = field(default_factory=list)  # source rows missing or different in the target
    metadata: dict[int, bytes] = field(default_factory=dict)  # the source's metadata of those rows
    gone: list[dict[str, Any]] = field(default_factory=list)  # target rows the source no longer has
    seen: int = 0  # source rows in the range


class TableSync:
    """Makes ``target``'s rows equal to ``source``'s; the source is only read."""

    def __init__(self, source: Index, target: Index, chunk: int = CHUNK) -> None:
        self.source = source
        self.target = target
        self.chunk = chunk
        self._postgres = target.engine.dialect.name == "postgresql"

    # -- any table -------------------------------------------------------------------------------
    def sync_table(self, table: Table, *, upserts: bool = True, deletes: bool = True, write: bool = True) -> Changes:
        """Write (``upserts``) the source's rows of ``table`` that the target lacks or holds
        otherwise, and delete (``deletes``) those the source no longer has; ``write=False`` only
        counts them."""
        changes = Changes()
        for rows, theirs in self._ranges(table):
            missing = [row for row in rows if theirs.pop(_row_key(table, row), None) != row] if upserts else []
            if not upserts:
                for row in rows:
                    theirs.pop(_row_key(table, row), None)
            extra = list(theirs) if deletes else []
            changes.written += len(missing)
            changes.deleted += len(extra)
            if write and (missing or extra):
                with self.target.engine.begin() as conn:
                    self._upsert(conn, table, missing)
                    self._delete(conn, table, extra)
        return changes

    def _ranges(self, table: Table) -> Iterator[tuple[list[dict[str, Any]], dict[Any, dict[str, Any]]]]:
        """(source rows, target rows by key) of consecutive key ranges covering both tables."""
        columns, column = _key_columns(table), _key_expr(table)
        last: Any = None
        while True:
            stmt = select(table).order_by(*columns).limit(self.chunk)
            if last is not None:
                stmt = stmt.where(column > _key_value(last))
            with self.source.engine.connect() as conn:
                rows = [dict(row) for row in conn.execute(stmt).mappings()]
            theirs_stmt = select(table)
            if last is not None:
                theirs_stmt = theirs_stmt.where(column > _key_value(last))
            end = len(rows) < self.chunk
            if not end:
                theirs_stmt = theirs_stmt.where(column <= _key_value(_row_key(table, rows[-1])))
            with self.target.engine.connect() as conn:
                theirs = {_row_key(table, row): dict(row) for row in conn.execute(theirs_stmt).mappings()}
            yield rows, theirs
            if end:
                return
            last = _row_key(table, rows[-1])

    # -- instances -------------------------------------------------------------------------------
    def instance_chunks(self) -> Iterator[InstanceChunk]:
        """The instance table, range by range, with each range's differences."""
        for rows, theirs in self._ranges(instance):
            chunk = InstanceChunk(seen=len(rows))
            pks = [row["pk"] for row in rows]
            ours_meta = self._metadata(self.source, pks)
            theirs_meta = self._metadata(self.target, [pk for pk in pks if pk in theirs])
            for row in rows:
                pk = row["pk"]
                if theirs.pop(pk, None) != row or ours_meta.get(pk) != theirs_meta.get(pk):
                    chunk.changed.append(row)
                    if pk in ours_meta:
                        chunk.metadata[pk] = ours_meta[pk]
            chunk.gone = list(theirs.values())
            yield chunk

    @staticmethod
    def _metadata(index: Index, pks: Sequence[int]) -> dict[int, bytes]:
        if not pks:
            return {}
        c = instance_metadata.c
        with index.engine.connect() as conn:
            return {
                row[0]: bytes(row[1])
                for row in conn.execute(select(c.instance_pk, c.data).where(c.instance_pk.in_(pks)))
            }

    def write_instances(
        self, rows: Sequence[Mapping[str, Any]], metadata_of: Mapping[int, bytes], gone: Sequence[Mapping[str, Any]]
    ) -> None:
        """In one target transaction: the rows (their series, study and patient first, when the
        target lacks them: the source grew since they were copied) with their metadata, and the
        removal of ``gone``."""
        series_pks = {row["series_pk"] for row in rows}
        with self.target.engine.begin() as conn:
            self._delete(conn, instance_metadata, [row["pk"] for row in gone])
            self._delete(conn, instance, [row["pk"] for row in gone])
            if rows:
                self._ensure_parents(conn, series_pks)
                self._upsert(conn, instance, rows)
                meta = [
                    {"instance_pk": r["pk"], "series_pk": r["series_pk"], "data": metadata_of[r["pk"]]}
                    for r in rows
                    if r["pk"] in metadata_of
                ]
                self._upsert(conn, instance_metadata, meta)

    def _ensure_parents(self, conn: Connection, series_pks: set[int]) -> None:
        """Copy the series (and their studies and patients) of ``series_pks`` the target lacks."""
        wanted: list[tuple[Table, list[dict[str, Any]]]] = []
        pks = series_pks
        for table, parent_key, _parent in (*PARENTS, (patient, "", None)):
            have = set(conn.execute(select(table.c.pk).where(table.c.pk.in_(pks))).scalars())
            need = sorted(pks - have)
            if not need:
                break
            with self.source.engine.connect() as source:
                rows = [dict(row) for row in source.execute(select(table).where(table.c.pk.in_(need))).mappings()]
            wanted.append((table, rows))
            if not parent_key:
                break
            pks = {row[parent_key] for row in rows}
        for table, rows in reversed(wanted):  # patients first
            self._upsert(conn, table, rows)

    def key_in_source(self, storage_key: str) -> bool:
        """Whether a source instance still uses the blob ``storage_key`` (one deleted and stored
        again has a new row and the same key)."""
        with self.source.engine.connect() as conn:
            stmt = select(instance.c.pk).where(instance.c.storage_key == storage_key).limit(1)
            return conn.execute(stmt).first() is not None

    # -- writing ---------------------------------------------------------------------------------
    def _upsert(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        stmt = upsert.insert(table, self.target.engine.dialect.name)
        keys = [c.name for c in _key_columns(table)]
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
        )
        conn.execute(stmt, list(rows))

    @staticmethod
    def _delete(conn: Connection, table: Table, keys: Sequence[Any]) -> None:
        column = _key_expr(table)
        for start in range(0, len(keys), CHUNK):
            conn.execute(delete(table).where(column.in_(keys[start : start + CHUNK])))

    def reset_sequences(self) -> None:
        """PostgreSQL: each ``pk`` sequence continues after the largest copied key, so that the
        first row a node adds on the new index does not collide with a copied one."""
        if not self._postgres:
            return
        with self.target.engine.begin() as conn:
            for table in copied_tables():
                if "pk" not in table.c or not table.c.pk.primary_key:
                    continue
                top = select(func.coalesce(func.max(table.c.pk), 0)).scalar_subquery()
                conn.execute(select(func.setval(func.pg_get_serial_sequence(table.name, "pk"), top + 1, False)))


# A row's key: the value of a one-column primary key, a tuple of a composite one (patient_merge).
def _key_columns(table: Table) -> list[Any]:
    return list(table.primary_key.columns)


def _key_expr(table: Table) -> ColumnElement[Any]:
    columns = _key_columns(table)
    return columns[0] if len(columns) == 1 else tuple_(*columns)


def _row_key(table: Table, row: Mapping[str, Any]) -> Any:
    columns = _key_columns(table)
    return row[columns[0].name] if len(columns) == 1 else tuple(row[c.name] for c in columns)


def _key_value(key: Any) -> Any:
    """A key as the right-hand side of a comparison with ``_key_expr``."""
    return tuple_(*key) if isinstance(key, tuple) else key
