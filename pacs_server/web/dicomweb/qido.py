"""QIDO-RS (PS3.18 10.6): search studies, series and instances through the one matcher.

Query parameters are DICOM keywords or tags (``PatientName=DOE*``, ``00100020=123``) with the
same matching as C-FIND, plus ``includefield`` (repeatable or comma-separated, ``all``),
``limit``/``offset`` and ``fuzzymatching`` (case-insensitive person names). Attributes the
index does not keep cannot be matched: they are ignored with a ``Warning`` header, as PS3.18
allows. Results come from index columns only, never from files.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom.datadict import keyword_for_tag, tag_for_keyword

from ...archive import Archive
from ...index import Query
from ...index.attributes import ATTRIBUTES, BY_KEYWORD, LEVELS, UNIQUE_KEYS, level_index
from .. import audited
from ..auth import Principal, require_read
from ..lookup import check_uid
from .common import DICOM_JSON, base_url, json_element, tag_hex, warning_header

router = APIRouter(tags=["QIDO-RS"])

MAX_RESULTS = 10_000  # without a limit, at most this many results (with a Warning saying so)
CONTROL_PARAMS = {"includefield", "limit", "offset", "fuzzymatching"}
MAX_INTEGER = 2**63 - 1  # the largest number the index's integer columns hold (SQLite, PostgreSQL)


def _keyword(name: str) -> str:
    """A query parameter name as a DICOM keyword (accepts ``00100010`` and ``PatientName``)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
        raise HTTPException(400, f"query parameter {name}: unknown tag")
    if "." in name:
        raise HTTPException(400, f"query parameter {name}: matching inside sequences is not supported")
    if tag_for_keyword(name) is None:
        raise HTTPException(400, f"query parameter {name!r} is neither a DICOM keyword nor a tag")
    return name


def _default_fields(level: str) -> list[str]:
    """What each level returns without includefield: everything the index keeps at that level,
    the unique keys above it, and patient attributes with studies."""
    depth = level_index(level)
    fields = [a.keyword for a in ATTRIBUTES if a.level == level]
    fields += [UNIQUE_KEYS[lvl] for lvl in LEVELS[1:depth]]
    if level == "STUDY":
        fields += [a.keyword for a in ATTRIBUTES if a.level == "PATIENT"]
    return fields


def search(request: Request, level: str, fixed: dict[str, str], who: Principal) -> JSONResponse:
    archive: Archive = request.app.state.archive
    depth = level_index(level)
    keys: dict[str, str | None] = {k: None for k in _default_fields(level)}
    warnings: list[str] = []
    limit: int | None = None
    offset = 0
    fuzzy = archive.settings.dicom.case_insensitive_names
    include_all = False
    for name, value in request.query_params.multi_items():
        lname = name.lower()
        if lname == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item.lower() == "all":
                    include_all = True
                    continue
                keyword = _keyword(item)
                if keyword in BY_KEYWORD and level_index(BY_KEYWORD[keyword].level) <= depth:
                    keys.setdefault(keyword, None)
                else:
                    warnings.append(f"{keyword} is not kept in the index and is not returned")
        elif lname == "limit":
            limit = _int_param(name, value, 0, MAX_RESULTS)
        elif lname == "offset":
            offset = _int_param(name, value, 0, 10**9)
        elif lname == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise HTTPException(400, "fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
        else:
            keyword = _keyword(name)
            attr = BY_KEYWORD.get(keyword)
            if attr is None or level_index(attr.level) > depth:
                warnings.append(f"{keyword} cannot be matched at {level} level and was ignored")
                continue
            if attr.kind == "uid":
                value = value.replace(",", "\\")
            elif attr.kind == "int":
                _check_whole_number(keyword, value)
            keys[keyword] = value
    if include_all:
        for attr in ATTRIBUTES:
            if level_index(attr.level) <= depth:
                keys.setdefault(attr.keyword, None)
    keys.update(fixed)
    capped = limit is None
    query = Query(
        level=level, keys=keys, case_insensitive_names=fuzzy, limit=MAX_RESULTS if capped else limit, offset=offset
    )
    rows = archive.index.find_all(query)
    audited.record_rows(request, who, "query", rows, detail=f"QIDO-RS {level} {request.url.query}"[:500].strip())
    if capped and len(rows) >= MAX_RESULTS:
        warnings.append(f"more than {MAX_RESULTS} results: use limit and offset to page through them")
    base = base_url(request)
    body = [_to_json(row, level, base) for row in rows]
    headers = {"Warning": warning_header(warnings)} if warnings else None
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


def _check_whole_number(keyword: str, value: str) -> None:
    """400 unless ``value`` is universal matching or a whole number the index can compare with
    (a 64-bit integer): a longer one would fail in the database instead, as a server error."""
    text = value.strip(" ")
    if text in ("", "*"):
        return
    try:
        number = int(text)
    except ValueError:
        raise HTTPException(400, f"{keyword} {value[:40]!r} is not a whole number") from None
    if abs(number) > MAX_INTEGER:
        raise HTTPException(400, f"{keyword} {value[:40]!r} is out of range (at most {MAX_INTEGER})")


def _int_param(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, not {value[:40]!r}") from None
    if not low <= number <= high:
        raise HTTPException(400, f"{name} must be between {low} and {high}")
    return number


def _to_json(row: dict[str, Any], level: str, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword, value in row.items():
        if keyword.startswith("_"):
            continue
        out[tag_hex(keyword)] = json_element(keyword, value)
    url = f"{base}/studies/{row['StudyInstanceUID']}" if level != "PATIENT" else ""
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{row['SOPInstanceUID']}"
    if url:
        out["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


async def _search(request: Request, level: str, who: Principal, **fixed: str | None) -> JSONResponse:
    keys = {}
    for keyword, value in fixed.items():
        if value is not None:
            keys[keyword] = check_uid(value, keyword)
    return await run_in_threadpool(search, request, level, keys, who)


_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {DICOM_JSON: {}}}, 400: {}}


@router.get("/studies", responses=_RESPONSES)
async def search_studies(request: Request, who: Principal = Depends(require_read)) -> JSONResponse:  # noqa: B008
    """Search for studies."""
    return await _search(request, "STUDY", who)


@router.get("/series", responses=_RESPONSES)
async def search_all_series(request: Request, who: Principal = Depends(require_read)) -> JSONResponse:  # noqa: B008
    """Search for series in all studies."""
    return await _search(request, "SERIES", who)


@router.get("/instances", responses=_RESPONSES)
async def search_all_instances(request: Request, who: Principal = Depends(require_read)) -> JSONResponse:  # noqa: B008
    """Search for instances in all studies."""
    return await _search(request, "IMAGE", who)


@router.get("/studies/{study}/series", responses=_RESPONSES)
async def search_series(request: Request, study: str, who: Principal = Depends(require_read)) -> JSONResponse:  # noqa: B008
    """Search for series of one study."""
    return await _search(request, "SERIES", who, StudyInstanceUID=study)


@router.get("/studies/{study}/instances", responses=_RESPONSES)
async def search_study_instances(
    request: Request,
    study: str,
    who: Principal = Depends(require_read),  # noqa: B008
) -> JSONResponse:
    """Search for instances of one study."""
    return await _search(request, "IMAGE", who, StudyInstanceUID=study)


@router.get("/studies/{study}/series/{series}/instances", responses=_RESPONSES)
async def search_series_instances(
    request: Request,
    study: str,
    series: str,
    who: Principal = Depends(require_read),  # noqa: B008
) -> JSONResponse:
    """Search for instances of one series."""
    return await _search(request, "IMAGE", who, StudyInstanceUID=study, SeriesInstanceUID=series)
