"""Patient demographics changed from outside (HL7 ADT^A08) and patients merged (ADT^A40).

Only the index changes: C-FIND, QIDO-RS, the study list and the worklist answer with the new
identity at once; stored files keep what the modality wrote (the instance metadata cache too).
Both run inside the caller's transaction (``worklist_table.writing``), so that an HL7 message
and what it changed are committed together.

A merge moves the prior patient's studies to the surviving patient (created from the prior
row when the archive does not know it yet), adds up the counters and removes the prior row, so
every query answers with the surviving identity. An instance that arrives later still carrying
the prior patient ID creates that patient again: merges are not remembered as redirections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, or_, select, update

from .attributes import normalize_pn
from .schema import patient, study

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
    if target is not None:
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
