"""Patient demographics changed from outside (HL7 ADT^A08) and patients merged (ADT^A40).

Only the index changes: C-FIND, QIDO-RS, the study list and the worklist answer with the new
identity at once; stored files keep what the modality wrote (the instance metadata cache too).
Both run inside the caller's transaction (``worklist_table.writing``), so that an HL7 message
and what it changed are committed together.

A merge moves the prior patient's studies to the surviving patient (created from the prior
row when the archive does not know it yet), adds up the counters and removes the prior row, so
every query answers with the surviving identity. It is remembered (``patient_merge``): an
instance that arrives later still carrying the prior patient ID is indexed under the surviving
patient (``Index.add_instance`` asks ``SURVIVING`` when it finds no patient row for an
instance), so a modality that worked from an old worklist does not bring the prior patient back.
A later merge of the surviving patient carries the older redirections along (A into B, then B
into C: A's late instances go to C).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    or_,
    select,
    update,
)

from .attributes import normalize_pn
from .column_types import byte_string
from .schema import metadata, patient, study

# Patients merged away (ADT^A40): the prior identity, and the patient row its instances go to.
patient_merge = Table(
    "patient_merge",
    metadata,
    Column("prior_id", byte_string(64), primary_key=True),
    Column("prior_issuer", byte_string(64), primary_key=True),  # "" when MRG-1 named no issuer
    Column("surviving_id", byte_string(64), nullable=False),
    Column("surviving_issuer", byte_string(64), nullable=False),
    Column("merged_at", Float, nullable=False),
)

# The surviving identity of an instance's patient (``pid``, ``issuer``) that was merged away: a
# redirection of that issuer's, else one without an issuer; an instance without an issuer
# follows a merge that named one (as ``_where`` matches patient rows). Only named parameters:
# ingest runs it pre-compiled with ``pid`` and ``issuer`` alone (db._run).
_EMPTY = literal_column("''")
SURVIVING = (
    select(patient_merge.c.surviving_id, patient_merge.c.surviving_issuer)
    .where(
        patient_merge.c.prior_id == bindparam("pid"),
        or_(
            patient_merge.c.prior_issuer == bindparam("issuer"),
            patient_merge.c.prior_issuer == _EMPTY,
            bindparam("issuer") == _EMPTY,
        ),
    )
    .order_by((patient_merge.c.prior_issuer == bindparam("issuer")).desc())
)

# What an update may change, as patient columns.
DEMOGRAPHICS = ("patient_name", "patient_birth_date", "patient_birth_time", "patient_sex")


@dataclass(frozen=True)
class PatientKey:
    patient_id: str
    issuer: str = ""  # empty: any issuer


def update_demographics(conn: Connection, key: PatientKey, values: Mapping[str, str]) -> int:
    """Change the demographics of the patient(s) ``key`` names; returns how many rows changed."""
    columns = _columns(values)
    if not columns:
        return 0
    return conn.execute(update(patient).where(*_where(key)).values(**columns)).rowcount


def merge(conn: Connection, prior: PatientKey, surviving: PatientKey, values: Mapping[str, str]) -> int:
    """Merge ``prior`` into ``surviving`` (with ``values`` as its demographics); returns studies moved."""
    prior_rows = list(conn.execute(select(patient).where(*_where(prior))).mappings())
    target = conn.execute(select(patient).where(*_where(surviving))).mappings().first()
    columns = _columns(values)
    moved = 0
    for row in prior_rows:
        if target is not None and row["pk"] == target["pk"]:
            continue
        if target is None:
            # The archive does not know the surviving patient: the prior row becomes it.
            conn.execute(
                update(patient)
                .where(patient.c.pk == row["pk"])
                .values(
                    patient_id=surviving.patient_id,
                    issuer_of_patient_id=surviving.issuer or row["issuer_of_patient_id"],
                    **columns,
                )
            )
            moved += row["num_studies"]
            target = conn.execute(select(patient).where(patient.c.pk == row["pk"])).mappings().first()
            continue
        moved += conn.execute(
            update(study).where(study.c.patient_pk == row["pk"]).values(patient_pk=target["pk"])
        ).rowcount
        conn.execute(delete(patient).where(patient.c.pk == row["pk"]))
    if target is None:  # neither is in the archive yet: its instances, when they come, go to the surviving one
        _remember(conn, prior, surviving.patient_id, surviving.issuer)
    else:
        _remember(conn, prior, target["patient_id"], target["issuer_of_patient_id"])
        of_patient = study.c.patient_pk == patient.c.pk
        conn.execute(
            update(patient)
            .where(patient.c.pk == target["pk"])
            .values(
                num_studies=select(func.count()).where(of_patient).scalar_subquery(),
                num_series=select(func.coalesce(func.sum(study.c.num_series), 0)).where(of_patient).scalar_subquery(),
                num_instances=select(func.coalesce(func.sum(study.c.num_instances), 0))
                .where(of_patient)
                .scalar_subquery(),
                **columns,
            )
        )
    return moved


def surviving(conn: Connection, patient_id: str, issuer: str) -> PatientKey | None:
    """The patient that ``patient_id`` (of ``issuer``) was merged into, or None (never merged away)."""
    row = conn.execute(SURVIVING, {"pid": patient_id, "issuer": issuer}).first()
    return PatientKey(row[0], row[1]) if row else None


def studies_of(conn: Connection, key: PatientKey) -> list[tuple[dict[str, str], list[str]]]:
    """The patient rows ``key`` names, each with its identity and demographics (PatientID,
    IssuerOfPatientID and ``DEMOGRAPHICS`` columns) and the UIDs of its studies."""
    found = []
    for row in conn.execute(select(patient).where(*_where(key))).mappings():
        uids = list(conn.execute(select(study.c.study_uid).where(study.c.patient_pk == row["pk"])).scalars())
        values = {name: row[name] for name in ("patient_id", "issuer_of_patient_id", *DEMOGRAPHICS)}
        found.append((values, uids))
    return found


def _remember(conn: Connection, prior: PatientKey, surviving_id: str, surviving_issuer: str) -> None:
    """Record that ``prior`` now files under the surviving row's identity, and point the patients
    merged into ``prior`` before at it too."""
    m = patient_merge.c
    if (prior.patient_id, prior.issuer) == (surviving_id, surviving_issuer):
        return
    conn.execute(
        update(patient_merge)
        .where(
            m.surviving_id == prior.patient_id, *([m.surviving_issuer.in_([prior.issuer, ""])] if prior.issuer else [])
        )
        .values(surviving_id=surviving_id, surviving_issuer=surviving_issuer)
    )
    # A redirection away from the surviving identity (it was merged once, and is now the survivor) ends.
    conn.execute(delete(patient_merge).where(m.prior_id == surviving_id, m.prior_issuer.in_([surviving_issuer, ""])))
    values = {"surviving_id": surviving_id, "surviving_issuer": surviving_issuer, "merged_at": time.time()}
    done = conn.execute(
        update(patient_merge).where(m.prior_id == prior.patient_id, m.prior_issuer == prior.issuer).values(**values)
    )
    if done.rowcount == 0:
        conn.execute(patient_merge.insert().values(prior_id=prior.patient_id, prior_issuer=prior.issuer, **values))


def _where(key: PatientKey) -> list[Any]:
    """The patient rows ``key`` names: its issuer's, and those without an issuer (most modalities
    send none, so the archive's rows often have none while the RIS names its assigning authority)."""
    conditions = [patient.c.patient_id == key.patient_id]
    if key.issuer:
        conditions.append(or_(patient.c.issuer_of_patient_id == key.issuer, patient.c.issuer_of_patient_id == ""))
    return conditions


def _columns(values: Mapping[str, str]) -> dict[str, str]:
    columns = {name: str(values[name]) for name in DEMOGRAPHICS if values.get(name)}
    if "patient_name" in columns:
        columns["patient_name_norm"] = normalize_pn(columns["patient_name"])
    return columns
