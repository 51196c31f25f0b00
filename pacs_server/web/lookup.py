"""Finding what a web request names: UIDs checked, then the one retrieve path (``retrieve``).

A UID that is not digits and dots (``*``, a list, a space, a backslash, ``../``, quotes, NUL) is
refused with 400 before anything touches the index or the disk, in every route that takes one
(DICOMweb, WADO-URI, the pages and their JSON API); a well-formed UID that is not stored is a
404.
"""

from __future__ import annotations

from typing import BinaryIO

from fastapi import HTTPException

from ..archive import Archive
from ..index import StoredInstance
from ..retrieve import locate, open_instance
from ..uids import RULE as UID_RULE
from ..uids import is_uid


def check_uid(value: str, name: str) -> str:
    """``value`` stripped, or HTTP 400 when it is not a UID (the one rule: ``pacs_server.uids``)."""
    value = value.strip()
    if not is_uid(value):
        raise HTTPException(400, f"{name} {value[:80]!r} is not a valid UID ({UID_RULE})")
    return value


def instances(
    archive: Archive, study: str | None = None, series: str | None = None, instance: str | None = None
) -> list[StoredInstance]:
    """The stored instances under the given UIDs (study, series, instance); 404 when none."""
    keys: dict[str, str | None] = {}
    what = []
    for keyword, value, label in (
        ("StudyInstanceUID", study, "study"),
        ("SeriesInstanceUID", series, "series"),
        ("SOPInstanceUID", instance, "instance"),
    ):
        if value is not None:
            keys[keyword] = check_uid(value, f"{label} UID")
            what.append(f"{label} {value}")
    found = locate(archive.index, keys)
    if not found:
        raise HTTPException(404, f"not found: {', '.join(what) or 'anything'}")
    return found


def one_instance(
    archive: Archive, study: str | None, series: str | None, instance: str
) -> tuple[StoredInstance, BinaryIO]:
    """The instance and its file, opened (``retrieve.open_instance``): the caller closes it."""
    found = instances(archive, study, series, instance)
    return found[0], open_instance(archive.blobs, found[0])
