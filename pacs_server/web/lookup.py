"""Finding what a web request names: UIDs checked, then the one retrieve path (``retrieve``).

A UID that is not digits and dots (``../``, quotes, NUL) is refused with 400 before anything
touches the index or the disk; a well-formed UID that is not stored is a 404.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import HTTPException

from ..archive import Archive
from ..index import StoredInstance
from ..retrieve import instance_path, locate

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: str, name: str) -> str:
    value = value.strip()
    if not value or len(value) > 64 or not UID_RE.match(value):
        raise HTTPException(400, f"{name} {value[:80]!r} is not a valid UID (digits and dots, at most 64)")
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


def one_instance(archive: Archive, study: str | None, series: str | None, instance: str) -> tuple[StoredInstance, Path]:
    found = instances(archive, study, series, instance)
    return found[0], instance_path(archive.blobs, found[0])
