"""The DICOM listener's records in the audit trail (pacs_server/audit.py).

The actor is the calling AE title and the peer's address. A C-FIND is recorded with its keys
(what PS3.15's Query message keeps) and the number of matches; a C-MOVE or C-GET with its
destination and the number of instances sent; C-STOREs once per association, when it closes,
with how many instances it stored (one record per instance would drown the trail).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from .. import dicom_status
from ..audit import Actor, AuditTrail
from ..index import Index
from ..ingest import Outcome
from .subops import Response

_MAX_VALUE = 64  # characters of one key's value kept in the record


def actor(assoc: Any) -> Actor:
    return Actor(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address), "dicom")


def describe(identifier: Dataset) -> str:
    """``STUDY PatientID=PID* StudyDate=20260101-``: the level and every key that has a value."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip()
    keys = []
    for element in identifier:
        if element.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or element.VR == "SQ":
            continue
        value = "" if element.value is None else str(element.value).strip()
        if value:
            keys.append(f"{element.keyword or element.tag}={value[:_MAX_VALUE]}")
    return " ".join([level, *keys]).strip()


def _studies(identifier: Dataset) -> list[str]:
    value = identifier.get("StudyInstanceUID")
    if not value:
        return []
    values = list(value) if isinstance(value, MultiValue) else [value]
    return [str(v) for v in values if str(v)][:50]


def find(trail: AuditTrail, assoc: Any, identifier: Dataset, responses: Iterator[Any]) -> Iterator[Any]:
    """``responses`` of one C-FIND, passed through; recorded when they end (or are cancelled)."""
    matches = 0
    final: Any = None
    try:
        for status, encoded in responses:
            if status == dicom_status.PENDING:
                matches += 1
            else:
                final = status
            yield status, encoded
    finally:
        code = int(final.Status) if isinstance(final, Dataset) else final
        failed = code not in (None, dicom_status.SUCCESS, dicom_status.CANCEL)
        trail.record(
            "query",
            actor(assoc),
            outcome="failure" if failed else "success",
            count=matches,
            detail=f"C-FIND {describe(identifier)}"[:1000],
        )


def retrieve(
    trail: AuditTrail, index: Index, assoc: Any, identifier: Dataset, how: str, responses: Iterator[Response]
) -> Iterator[Response]:
    """``responses`` of one C-MOVE or C-GET (``how``: "C-MOVE to DEST" or "C-GET"), passed through."""
    last: Response | None = None
    try:
        for response in responses:
            last = response
            yield response
    finally:
        progress = last.progress if last else None
        sent = progress.completed + progress.warning if progress else 0
        ok = last is not None and last.status in (dicom_status.SUCCESS, dicom_status.WARNING_SUBOPERATIONS)
        studies = _studies(identifier)
        detail = f"{how}: {describe(identifier)}"
        if progress and progress.failed:
            detail += f"; {progress.failed} failed"
        if last is not None and last.comment:
            detail += f"; {last.comment}"
        trail.record(
            "retrieve",
            actor(assoc),
            outcome="success" if ok else "failure",
            studies=studies,
            patients=lambda: index.patient_ids(studies),
            count=sent,
            detail=detail[:1000],
        )


# The listener's per-association counts that are C-STORE answers (ingest's outcomes, and a
# refusal by the node's rights); the others count other services.
_STORE_COUNTS = {outcome.value for outcome in Outcome} | {"refused"}
_ACCEPTED = {Outcome.STORED.value, Outcome.DUPLICATE.value, Outcome.KEPT_EXISTING.value, Outcome.OVERWRITTEN.value}


def stored(trail: AuditTrail, assoc: Any, counts: Mapping[str, int], how: str) -> None:
    """An association that sent C-STOREs has closed (``how``: "released" or "aborted")."""
    stores = {k: n for k, n in counts.items() if k in _STORE_COUNTS and n}
    if not stores:
        return
    refused = sum(n for k, n in stores.items() if k not in _ACCEPTED)
    trail.record(
        "store",
        actor(assoc),
        outcome="failure" if refused else "success",
        count=stores.get(Outcome.STORED.value, 0) + stores.get(Outcome.OVERWRITTEN.value, 0),
        detail=f"C-STORE association {how}: " + ", ".join(f"{n} {k}" for k, n in sorted(stores.items())),
    )
