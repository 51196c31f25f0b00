"""Scheduled procedures (the modality worklist) and MPPS instances: tables, matching and writes.

``plugins/worklist.py`` (the Modality Worklist SCP and its REST API), ``plugins/hl7.py`` (orders)
and ``plugins/mpps.py`` (performed steps) keep the rules; the SQL is here. One row of
``scheduled_procedure`` is one Scheduled Procedure Step: the columns a worklist query matches
on, its status, and the whole item as DICOM JSON (``item``) for the return keys.

Matching goes through the one matcher's condition builder (``matcher.condition_for``) with
attributes of this table, so a worklist query follows the same PS3.4 C.2.2.2 rules as every
other query: single value, universal, wildcards, date and time ranges, UID lists. Patient
attributes are answered from the columns, which HL7 ADT updates and merges change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    func,
    or_,
    select,
    update,
)

from . import db
from .attributes import Attr, normalize_pn
from .column_types import byte_string
from .matcher import QueryError, condition_for
from .schema import metadata

# Statuses of a step (Scheduled Procedure Step Status, PS3.3 C.4.10, spelled as DICOM does).
ACTIVE = ("SCHEDULED", "ARRIVED", "READY", "STARTED")
ENDED = ("COMPLETED", "DISCONTINUED", "CANCELED")
STATUSES = ACTIVE + ENDED

scheduled_procedure = Table(
    "scheduled_procedure",
    metadata,
    Column("pk", Integer, primary_key=True),
    # Unique per step: "hl7:<placer order>:<step id>" for HL7 orders, "api:<random>" for the REST API.
    Column("item_key", byte_string(200), nullable=False),
    Column("source", byte_string(16), nullable=False),
    Column("patient_id", byte_string(64), nullable=False, default=""),
    Column("issuer_of_patient_id", byte_string(64), nullable=False, default=""),
    Column("patient_name", byte_string(324), nullable=False, default=""),
    Column("patient_name_norm", byte_string(324), nullable=False, default=""),
    Column("patient_birth_date", byte_string(8), nullable=False, default=""),
    Column("patient_sex", byte_string(16), nullable=False, default=""),
    Column("accession_number", byte_string(64), nullable=False, default=""),
    Column("requested_procedure_id", byte_string(64), nullable=False, default=""),
    Column("study_uid", byte_string(64), nullable=False, default=""),
    Column("sps_id", byte_string(64), nullable=False, default=""),
    Column("modality", byte_string(16), nullable=False, default=""),
    Column("station_ae", byte_string(16), nullable=False, default=""),
    Column("station_name", byte_string(16), nullable=False, default=""),
    Column("start_date", byte_string(8), nullable=False, default=""),
    Column("start_time", byte_string(16), nullable=False, default=""),
    Column("performing_physician", byte_string(324), nullable=False, default=""),
    Column("performing_physician_norm", byte_string(324), nullable=False, default=""),
    Column("status", byte_string(16), nullable=False, default="SCHEDULED"),
    Column("item", Text, nullable=False),  # DICOM JSON of the whole worklist item
    # MSH-7 of the newest HL7 message applied to this step: an older one arriving late is not applied.
    Column("message_time", byte_string(26), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("item_key", name="uq_scheduled_procedure_key"),
    Index("ix_sps_status_date", "status", "start_date"),
    Index("ix_sps_station", "station_ae"),
    Index("ix_sps_patient", "patient_id"),
    Index("ix_sps_accession", "accession_number"),
)

# Modality Performed Procedure Steps received by N-CREATE, changed by N-SET.
performed_procedure = Table(
    "performed_procedure",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("sop_instance_uid", byte_string(64), nullable=False),
    Column("status", byte_string(16), nullable=False),  # IN PROGRESS, COMPLETED, DISCONTINUED
    Column("calling_ae", byte_string(16), nullable=False, default=""),
    Column("dataset", Text, nullable=False),  # DICOM JSON, as created and then set
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("sop_instance_uid", name="uq_performed_procedure_uid"),
)

_T = "WORKLIST"
# The matching keys of a worklist query, as the matcher's attributes over this table's columns.
MATCHING: dict[str, Attr] = {
    a.keyword: a
    for a in (
        Attr("PatientName", _T, "patient_name", "pn", 324),
        Attr("PatientID", _T, "patient_id", "str"),
        Attr("IssuerOfPatientID", _T, "issuer_of_patient_id", "str"),
        Attr("PatientBirthDate", _T, "patient_birth_date", "date", 8),
        Attr("PatientSex", _T, "patient_sex", "str", 16),
        Attr("AccessionNumber", _T, "accession_number", "str"),
        Attr("RequestedProcedureID", _T, "requested_procedure_id", "str"),
        Attr("StudyInstanceUID", _T, "study_uid", "uid"),
        # Scheduled Procedure Step Sequence
        Attr("ScheduledProcedureStepID", _T, "sps_id", "str"),
        Attr("Modality", _T, "modality", "str", 16),
        Attr("ScheduledStationAETitle", _T, "station_ae", "str", 16),
        Attr("ScheduledStationName", _T, "station_name", "str", 16),
        Attr("ScheduledProcedureStepStartDate", _T, "start_date", "date", 8),
        Attr("ScheduledProcedureStepStartTime", _T, "start_time", "time", 16),
        Attr("ScheduledPerformingPhysicianName", _T, "performing_physician", "pn", 324),
        Attr("ScheduledProcedureStepStatus", _T, "status", "str", 16),
    )
}
# Columns that come from the patient, answered from the row (updates and merges change them).
PATIENT_COLUMNS = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
}


# PostgreSQL advisory lock key of the worklist writers (any 64-bit number no other writer uses).
WORKLIST_LOCK_KEY = 0x6D61_6370_776C  # "macpwl"


@contextmanager
def writing(index: db.Index) -> Iterator[Connection]:
    """One write transaction, queued with the index's other writers (ingest's writer lock).

    On SQLite it begins IMMEDIATE, as ingest's, so that what it reads cannot change before it
    writes. On PostgreSQL it takes a transaction-level advisory lock instead, so that these
    writers follow one another across server nodes too (ingest does not take it: it changes no
    worklist row). The plugins' writes to these tables (and to the patient rows) go through here.
    """
    with index._write_lock, index.engine.connect() as conn, conn.begin():  # the index's own writer lock
        if index.is_sqlite:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.execute(select(func.pg_advisory_xact_lock(WORKLIST_LOCK_KEY)))
        yield conn


class ProcedureTable:
    """Scheduled procedure steps of one index."""

    def __init__(self, index: db.Index) -> None:
        self.index = index
        self.engine = index.engine

    # -- reads -----------------------------------------------------------------------------------
    def find(
        self, keys: Mapping[str, str], *, case_insensitive: bool, include_ended: bool = False, limit: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Rows matching DICOM matching ``keys`` (keywords of ``MATCHING``; others are ignored).

        Ended steps (completed, discontinued, cancelled) are left out unless ``include_ended``.
        QueryError for a malformed value, as for any query.
        """
        t = scheduled_procedure
        conditions = []
        for keyword, value in keys.items():
            attr = MATCHING.get(keyword)
            if attr is None or not value:
                continue
            cond = condition_for(attr, value, t, case_insensitive=case_insensitive)
            if cond is not None:
                conditions.append(cond)
        if not include_ended:
            conditions.append(t.c.status.in_(ACTIVE))
        stmt = select(t).where(*conditions).order_by(t.c.start_date, t.c.start_time, t.c.pk)
        if limit:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            for row in conn.execute(stmt).mappings():
                yield dict(row)

    def get(self, pk: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(scheduled_procedure).where(scheduled_procedure.c.pk == pk)).mappings().first()
        return dict(row) if row else None

    def by_key(self, conn: Connection, item_key: str) -> dict[str, Any] | None:
        row = conn.execute(_BY_KEY, {"key": item_key}).mappings().first()
        return dict(row) if row else None

    def keys_of_order(self, conn: Connection, prefix: str) -> list[str]:
        """Keys of the steps whose key starts with ``prefix`` (every step of one HL7 order)."""
        t = scheduled_procedure
        literal = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        return list(conn.execute(select(t.c.item_key).where(t.c.item_key.like(literal + "%", escape="!"))).scalars())

    # -- writes ------------------------------------------------------------------------------------
    def insert(self, conn: Connection, item_key: str, source: str, columns: Mapping[str, Any], item: str) -> int:
        """A new step (the caller knows ``item_key`` is new: ``by_key`` in the same transaction)."""
        now = time.time()
        values = _DEFAULTS | _with_norms(columns) | {"item_key": item_key, "source": source, "item": item}
        result = conn.execute(_INSERT, values | {"created_at": now, "updated_at": now})
        return int(result.inserted_primary_key[0])

    def change(self, conn: Connection, pk: int, columns: Mapping[str, Any], item: str | None = None) -> None:
        values = dict(_with_norms(columns))
        if item is not None:
            values["item"] = item
        conn.execute(
            update(scheduled_procedure).where(scheduled_procedure.c.pk == pk).values(**values, updated_at=time.time())
        )

    def set_status(self, conn: Connection, pks: list[int], status: str) -> int:
        if status not in STATUSES:
            raise QueryError(f"unknown step status {status!r} (use {', '.join(STATUSES)})")
        t = scheduled_procedure
        return conn.execute(update(t).where(t.c.pk.in_(pks)).values(status=status, updated_at=time.time())).rowcount

    def matching_performed(self, conn: Connection, references: list[Mapping[str, str]]) -> list[int]:
        """Steps an MPPS refers to: by step ID with accession number or study UID, else by accession alone."""
        t = scheduled_procedure
        pks: set[int] = set()
        for ref in references:
            conditions = []
            for key, column in (("sps_id", t.c.sps_id), ("accession_number", t.c.accession_number)):
                if ref.get(key):
                    conditions.append(column == ref[key])
            if ref.get("study_uid") and not ref.get("accession_number"):
                conditions.append(t.c.study_uid == ref["study_uid"])
            if conditions:
                pks.update(conn.execute(select(t.c.pk).where(*conditions)).scalars())
        return sorted(pks)

    def set_patient(self, conn: Connection, patient_id: str, issuer: str | None, columns: Mapping[str, Any]) -> int:
        """Patient columns of every step of one patient (ADT update or merge); how many steps changed."""
        t = scheduled_procedure
        stmt = update(t).where(t.c.patient_id == patient_id)
        if issuer:  # that issuer's steps, and those without one (as patient_records does)
            stmt = stmt.where(or_(t.c.issuer_of_patient_id == issuer, t.c.issuer_of_patient_id == ""))
        return conn.execute(stmt.values(**_with_norms(columns), updated_at=time.time())).rowcount

    def delete(self, pk: int) -> bool:
        with writing(self.index) as conn:
            return conn.execute(scheduled_procedure.delete().where(scheduled_procedure.c.pk == pk)).rowcount > 0

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(scheduled_procedure)).scalar_one()


class PerformedTable:
    """MPPS instances of one index."""

    def __init__(self, index: db.Index) -> None:
        self.engine = index.engine

    def get(self, conn: Connection, sop_instance_uid: str) -> dict[str, Any] | None:
        t = performed_procedure
        row = conn.execute(select(t).where(t.c.sop_instance_uid == sop_instance_uid)).mappings().first()
        return dict(row) if row else None

    def insert(self, conn: Connection, sop_instance_uid: str, status: str, calling_ae: str, dataset: str) -> None:
        now = time.time()
        conn.execute(
            performed_procedure.insert().values(
                sop_instance_uid=sop_instance_uid,
                status=status,
                calling_ae=calling_ae,
                dataset=dataset,
                created_at=now,
                updated_at=now,
            )
        )

    def change(self, conn: Connection, sop_instance_uid: str, status: str, dataset: str) -> None:
        t = performed_procedure
        conn.execute(
            update(t)
            .where(t.c.sop_instance_uid == sop_instance_uid)
            .values(status=status, dataset=dataset, updated_at=time.time())
        )


# Built once (the intake writes a step per message): every column, so one compiled insert serves all.
_INSERT = scheduled_procedure.insert()
_BY_KEY = select(scheduled_procedure).where(scheduled_procedure.c.item_key == bindparam("key"))
_DEFAULTS = {c.name: c.default.arg for c in scheduled_procedure.c if c.default is not None and c.default.is_scalar}


def _with_norms(columns: Mapping[str, Any]) -> dict[str, Any]:
    """The columns, with the case-folded person-name columns the matcher uses kept in step."""
    values = dict(columns)
    for name in ("patient_name", "performing_physician"):
        if name in values:
            values[name + "_norm"] = normalize_pn(str(values[name] or ""))
    return values
