"""OsiriX's database vocabulary: entity attribute names ↔ DICOM keywords, predicates → matcher.

OsiriX clients name things after OsiriX's Core Data model (``Study.name``, ``Series.seriesDICOMUID``,
``Image.sopInstanceUID``), not DICOM keywords. This module translates both ways: a parsed predicate
becomes a ``pacs_server.index.matcher`` expression, and an index row becomes the dictionary of
strings OsiriX returns as one element of ``elements``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from ..index.attributes import BY_KEYWORD, LEVELS
from ..index.matcher import All, AnyOf, Expr, Match, Not
from ..predicate import And, Comparison, Constant, DateValue, Node, Or, PredicateError, number, parse_date
from ..predicate import Not as PNot

TABLES = {"study": "Study", "series": "Series", "image": "Image"}
LEVEL_OF = {"Study": "STUDY", "Series": "SERIES", "Image": "IMAGE"}

# OsiriX attribute → (DICOM keyword, time keyword completing a date). Order = order in elements.
ATTRIBUTES: dict[str, dict[str, tuple[str, str | None]]] = {
    "Study": {
        "name": ("PatientName", None),
        "patientID": ("PatientID", None),
        "dateOfBirth": ("PatientBirthDate", None),
        "patientSex": ("PatientSex", None),
        "studyInstanceUID": ("StudyInstanceUID", None),
        "accessionNumber": ("AccessionNumber", None),
        "id": ("StudyID", None),
        "studyName": ("StudyDescription", None),
        "date": ("StudyDate", "StudyTime"),
        "modality": ("ModalitiesInStudy", None),
        "referringPhysician": ("ReferringPhysicianName", None),
        "institutionName": ("InstitutionName", None),
        "numberOfImages": ("NumberOfStudyRelatedInstances", None),
    },
    "Series": {
        "name": ("SeriesDescription", None),
        "seriesDescription": ("SeriesDescription", None),
        "seriesDICOMUID": ("SeriesInstanceUID", None),
        "seriesInstanceUID": ("SeriesInstanceUID", None),
        "id": ("SeriesNumber", None),
        "modality": ("Modality", None),
        "date": ("SeriesDate", "SeriesTime"),
        "numberOfImages": ("NumberOfSeriesRelatedInstances", None),
    },
    "Image": {
        "sopInstanceUID": ("SOPInstanceUID", None),
        "instanceNumber": ("InstanceNumber", None),
        "numberOfFrames": ("NumberOfFrames", None),
        "width": ("Columns", None),
        "height": ("Rows", None),
        "modality": ("Modality", None),
        "date": ("ContentDate", "ContentTime"),
    },
}
# Key-path prefixes reaching a parent entity (``study.patientID`` from Series).
PARENTS = {"Study": {}, "Series": {"study": "Study"}, "Image": {"series": "Series", "series.study": "Study"}}

OPERATORS = {
    "==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge",
    "LIKE": "like", "CONTAINS": "contains", "BEGINSWITH": "beginswith", "ENDSWITH": "endswith",
}  # fmt: skip


def table_name(value: object) -> str:
    """``Study``/``Series``/``Image`` (any case); raises PredicateError naming the choices."""
    name = TABLES.get(str(value or "").strip().lower())
    if name is None:
        raise PredicateError(f"table {str(value)[:40]!r} is not one of Study, Series, Image")
    return name


def resolve(entity: str, key: str) -> tuple[str, str | None]:
    """The DICOM keyword (and time keyword) behind an OsiriX key path; DICOM keywords work too."""
    if key in ATTRIBUTES[entity]:
        return ATTRIBUTES[entity][key]
    for prefix, parent in sorted(PARENTS[entity].items(), key=lambda p: -len(p[0])):
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1 :]
            if rest in ATTRIBUTES[parent]:
                return ATTRIBUTES[parent][rest]
    attr = BY_KEYWORD.get(key)
    if attr is not None and LEVELS.index(attr.level) <= LEVELS.index(LEVEL_OF[entity]):
        return key, None
    known = ", ".join(ATTRIBUTES[entity]) + "".join(
        f", {prefix}.<{parent} attribute>" for prefix, parent in PARENTS[entity].items()
    )
    raise PredicateError(f"{key!r} is not an attribute of {entity} (known: {known}; or a DICOM keyword)")


def _date_text(value: DateValue, with_time: bool) -> str:
    fmt = "%Y%m%d%H%M%S" if with_time and value.has_time else "%Y%m%d"
    return value.when.strftime(fmt)


def _leaf(entity: str, node: Comparison) -> Expr:
    keyword, time_keyword = resolve(entity, node.key)
    attr = BY_KEYWORD[keyword]
    op = OPERATORS[node.op]
    value = node.value
    if attr.kind == "date":
        if isinstance(value, str):
            value = parse_date(value)
        if not isinstance(value, DateValue):
            raise PredicateError(
                f'{node.key} is a date: compare it with a date ("2024-01-15" or CAST(seconds, "NSDate"))'
            )
        return Match(keyword, op, _date_text(value, time_keyword is not None), time_keyword=time_keyword)
    if isinstance(value, DateValue):
        raise PredicateError(f"{node.key} is not a date; compare it with a string or a number")
    if isinstance(value, bool):
        raise PredicateError(f"{node.key} cannot be compared with YES/NO")
    if value is None:
        if attr.kind in ("int", "count") or op not in ("eq", "ne"):
            raise PredicateError(f"{node.key} cannot be compared with nil")
        value = ""  # the index keeps absent strings as empty ones
    if attr.kind in ("int", "count") and isinstance(value, str):
        try:  # "12" as 12; a quoted number out of range is refused as an unquoted one is
            value = number(value.strip().removeprefix("+"))
        except PredicateError as exc:
            raise PredicateError(f"{node.key} is a number: {exc}") from None
    return Match(keyword, op, value, case_insensitive=node.case_insensitive)


def to_expression(entity: str, node: Node) -> Expr:
    """Translate a parsed predicate into the matcher's boolean expression for ``entity``."""
    if isinstance(node, Comparison):
        return _leaf(entity, node)
    if isinstance(node, And):
        return All(tuple(to_expression(entity, n) for n in node.items))
    if isinstance(node, Or):
        return AnyOf(tuple(to_expression(entity, n) for n in node.items))
    if isinstance(node, PNot):
        return Not(to_expression(entity, node.item))
    if isinstance(node, Constant):
        return All(()) if node.value else AnyOf(())
    raise PredicateError(f"unsupported predicate element {node!r}")


def keywords(entity: str) -> set[str]:
    """DICOM keywords an element of ``entity`` is built from (the query returns these)."""
    out = set()
    for keyword, time_keyword in ATTRIBUTES[entity].values():
        out.add(keyword)
        if time_keyword:
            out.add(time_keyword)
    return out


def nsdate_text(date: str, time: str | None) -> str:
    """DICOM date/time → NSDate's description (``2024-01-15 10:15:00 +0000``), as OsiriX prints it.

    The DICOM value is local time (OsiriX reads it so); NSDate prints UTC.
    """
    clock = (time or "").split(".")[0].ljust(6, "0")[:6]
    try:
        when = datetime.strptime(date + clock, "%Y%m%d%H%M%S")
    except ValueError:
        return date
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000")


# Characters XML 1.0 cannot carry at all (a stray control byte in a PatientName would otherwise
# make the whole reply unreadable for the client).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def element(entity: str, row: Any) -> dict[str, str]:
    """One result element: OsiriX attribute name → value as a string; empty values left out."""
    out: dict[str, str] = {}
    for name, (keyword, time_keyword) in ATTRIBUTES[entity].items():
        value = row.get(keyword)
        if value is None or value == "":
            continue
        if BY_KEYWORD[keyword].kind == "date":
            out[name] = nsdate_text(str(value), row.get(time_keyword) if time_keyword else None)
        else:
            out[name] = _NOT_XML.sub("\ufffd", str(value))
    return out
