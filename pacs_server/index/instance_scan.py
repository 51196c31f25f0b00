"""Reads of the ``instance`` table for ``macpacs verify``: every row in file-key order, in pages.

Verify walks the stored files and the index side by side, both sorted by storage key, so that
neither has to be held in memory. The index side comes in pages of ``page_size`` rows, each read
in its own short transaction: a verify of a large archive reads files for hours, and one long
read transaction would keep SQLite from checkpointing its WAL for as long while the server
ingests. ``storage_key`` has no index of its own, so each page is one scan of the instance
table with a bounded sort (a top-N of ``PAGE_SIZE`` rows), which is little next to reading the
files it lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from . import schema
from .db import Index

PAGE_SIZE = 5000


@dataclass(frozen=True)
class IndexedFile:
    """What the index says about one instance's file."""

    pk: int
    sop_instance_uid: str
    storage_key: str
    file_size: int
    content_hash: str | None  # None: indexed before revision 0003


_i = schema.instance.c
_COLUMNS = (_i.pk, _i.sop_instance_uid, _i.storage_key, _i.file_size, _i.content_hash)


def by_storage_key(index: Index, page_size: int | None = None) -> Iterator[IndexedFile]:
    """Every instance row, ascending by storage key (keys are unique: keyset paging is exact), read
    ``page_size`` (default ``PAGE_SIZE``) at a time."""
    page_size = page_size or PAGE_SIZE
    key = _i.storage_key  # compared byte by byte on both databases, as Python compares the file side's keys
    last = ""
    while True:
        stmt = select(*_COLUMNS).where(key > last).order_by(key).limit(page_size)
        with index.engine.connect() as conn:
            rows = [IndexedFile(*row) for row in conn.execute(stmt)]
        yield from rows
        if len(rows) < page_size:
            return
        last = rows[-1].storage_key


def by_uid(index: Index, sop_instance_uid: str) -> IndexedFile | None:
    """The row of one instance now (verify re-reads a row before it reports a problem with it)."""
    with index.engine.connect() as conn:
        row = conn.execute(select(*_COLUMNS).where(_i.sop_instance_uid == sop_instance_uid)).first()
    return IndexedFile(*row) if row else None


def where_is(index: Index, sop_instance_uid: str) -> dict[str, Any]:
    """Patient, study and series of an instance, for telling an admin which image is concerned."""
    p, st, se, i = schema.patient, schema.study, schema.series, schema.instance
    stmt = (
        select(p.c.patient_id, p.c.patient_name, st.c.study_uid, st.c.study_date, se.c.series_uid, se.c.modality)
        .select_from(
            i.join(se, se.c.pk == i.c.series_pk).join(st, st.c.pk == se.c.study_pk).join(p, p.c.pk == st.c.patient_pk)
        )
        .where(i.c.sop_instance_uid == sop_instance_uid)
    )
    with index.engine.connect() as conn:
        row = conn.execute(stmt).mappings().first()
    return dict(row) if row else {}


def fill_content_hash(index: Index, pk: int, content_hash: str) -> bool:
    """Record the hash of a row that has none (indexed before revision 0003); False when the row is
    gone or meanwhile has one (a re-send replaced it)."""
    stmt = update(schema.instance).where(_i.pk == pk, _i.content_hash.is_(None)).values(content_hash=content_hash)
    with index.engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1
