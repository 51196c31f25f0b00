"""The web port's records in the audit trail (pacs_server/audit.py): who is the logged-in user
(or "anonymous") and the client address the authentication used."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import Request

from ..audit import Actor
from .auth import Principal

# Patients named in one record at most: a QIDO answer of 10,000 studies names its count instead.
MAX_NAMED = 50


def record(
    request: Request,
    who: Principal,
    event: str,
    *,
    studies: Iterable[str] = (),
    patients: Iterable[str] | None = None,
    **details: Any,
) -> None:
    """Record ``event`` by ``who``; unless ``patients`` are given, those of ``studies`` are named
    (looked up only if the record is written)."""
    archive = request.app.state.archive
    study_list = [s for s in studies if s][:MAX_NAMED]
    archive.audit.record(
        event,
        Actor(who.name, who.address, "web"),
        studies=study_list,
        patients=(lambda: archive.index.patient_ids(study_list)) if patients is None else patients,
        **details,
    )


def record_rows(request: Request, who: Principal, event: str, rows: list[dict[str, Any]], **details: Any) -> None:
    """Record a query's answer: the studies and patients of its first rows, and how many rows."""
    named = rows[:MAX_NAMED]
    request.app.state.archive.audit.record(
        event,
        Actor(who.name, who.address, "web"),
        studies=[str(row["StudyInstanceUID"]) for row in named if row.get("StudyInstanceUID")],
        patients=[str(row["PatientID"]) for row in named if row.get("PatientID")],
        count=len(rows),
        **details,
    )
