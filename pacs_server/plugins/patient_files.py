"""Stored files rewritten to the patient the index knows, after an HL7 update or merge (opt-in).

An ADT^A08 or ADT^A40 changes the index at once (every query answers with the new identity);
the stored files keep what the modality wrote, unless ``[plugins.hl7] rewrite_files = true``.
Then the message's transaction also queues a ``patient-files`` job (so the job exists exactly
when the message was applied), and the job rewrites each stored instance of the patient whose
patient attributes (``ATTRIBUTES``) differ from the index's patient row.

A rewritten file goes through the one ingest path (``Ingestor.ingest(..., overwrite=True)``):
it is staged, made durable under the same key, and the index row's size, content hash
(storage commitment checks it) and metadata cache (WADO-RS ``/metadata``) follow; the
``instance_stored`` hooks hear of it as ``overwritten``, so a routing rule on stored sends the
corrected file again. Pixel data and every other attribute are written back as read (pydicom,
the same transfer syntax). A job interrupted by a stop runs again and skips the files already
rewritten: it compares before it writes.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

import pydicom

from ..index import Query, Transaction
from ..index.patient_records import PatientKey, studies_of

if TYPE_CHECKING:
    from ..archive import Archive
    from ..jobs import RunningJob

log = logging.getLogger(__name__)

KIND = "patient-files"
VIA = "hl7-rewrite"  # the ingest ``via`` of a rewritten file
# File attribute → patient column of the index.
ATTRIBUTES = {
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientBirthTime": "patient_birth_time",
    "PatientSex": "patient_sex",
}


def queue(
    archive: Archive,
    conn: Transaction | None,
    key: PatientKey,
    why: str,
    dedupe_key: str,
    *,
    sop_instance_uid: str = "",
) -> None:
    """Queue the rewrite of ``key``'s files (or of one instance of it), in the caller's transaction ``conn``."""
    payload = {"patient_id": key.patient_id, "issuer": key.issuer, "sop_instance_uid": sop_instance_uid}
    what = f"instance {sop_instance_uid}" if sop_instance_uid else "files"
    description = f"rewrite the {what} of patient {key.patient_id} ({why})"
    archive.jobs.submit_many([(KIND, description, payload, None, dedupe_key[:255])], conn=conn)


def run(archive: Archive, batch: list[RunningJob]) -> None:
    """The ``patient-files`` job handler (registered by the hl7 plugin in the server process)."""
    for job in batch:
        key = PatientKey(str(job.payload["patient_id"]), str(job.payload.get("issuer", "")))
        with archive.index.engine.connect() as conn:
            patients = studies_of(conn, key)
        work = [
            (values, stored)
            for values, study_uids in patients
            for uid in study_uids
            for stored in archive.index.instances(Query(level="IMAGE", keys=_keys(uid, job.payload)))
        ]
        rewritten = failed = 0
        problems: list[str] = []
        for n, (values, stored) in enumerate(work, 1):
            if job.cancelled():
                return
            try:
                rewritten += rewrite(archive, stored.sop_instance_uid, stored.storage_key, values)
            except Exception as exc:  # one unreadable file must not stop the others; the job retries
                failed += 1
                problems.append(f"{stored.sop_instance_uid}: {exc}")
                log.warning(
                    "patient %s: the file of %s was not rewritten: %s", key.patient_id, stored.sop_instance_uid, exc
                )
            job.progress(len(work), n - failed, failed)
        summary = f"{rewritten} of {len(work)} files rewritten to patient {key.patient_id}"
        if problems:
            job.fail(f"{summary}; {failed} failed, e.g. {problems[0]} (retried later)")
        else:
            job.succeed(summary + (" (the others already agreed)" if rewritten < len(work) else ""))


def rewrite(archive: Archive, sop_instance_uid: str, storage_key: str, values: dict[str, str]) -> bool:
    """Rewrite one stored instance with the patient ``values`` (index columns); False when it
    already agrees. Raises with the reason when it cannot be read or stored."""
    with archive.blobs.open(storage_key) as fh:
        ds = pydicom.dcmread(fh)
    changes = {
        keyword: values[column]
        for keyword, column in ATTRIBUTES.items()
        if values.get(column) and _text(ds.get(keyword)) != values[column]
    }
    if not changes:
        return False
    if not all(value.isascii() for value in changes.values()) and _charset(ds) != "ISO_IR 192":
        ds.decode()  # every text value decoded with the file's own character set, then written as UTF-8
        ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    staged = archive.blobs.stage()
    try:
        staged.write(buffer.getbuffer())
        staged.close()
    except BaseException:
        staged.discard()
        raise
    result = archive.ingestor.ingest(staged.name, via=VIA, source="HL7", announced_uid=sop_instance_uid, overwrite=True)
    if not result.ok:
        raise RuntimeError(result.message)
    return True


def _keys(study_uid: str, payload: dict[str, Any]) -> dict[str, str]:
    keys = {"StudyInstanceUID": study_uid}
    if payload.get("sop_instance_uid"):
        keys["SOPInstanceUID"] = str(payload["sop_instance_uid"])
    return keys


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _charset(ds: pydicom.Dataset) -> str:
    charset = ds.get("SpecificCharacterSet", "")
    return charset if isinstance(charset, str) else "\\".join(charset)
