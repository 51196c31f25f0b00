"""C-FIND SCP: a DICOM identifier → the one matcher → pending responses filled from the index.

Return keys come from index columns only; no file is opened to answer a query.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from ..index import Index, Query, QueryError
from ..index.attributes import BY_KEYWORD

log = logging.getLogger(__name__)

LEVELS_BY_MODEL = {
    PatientRootQueryRetrieveInformationModelFind: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    StudyRootQueryRetrieveInformationModelFind: ("STUDY", "SERIES", "IMAGE"),
}
# IS attributes kept as integers in the index (US attributes such as Rows stay integers).
_IS_KEYWORDS = {"SeriesNumber", "InstanceNumber", "AcquisitionNumber", "NumberOfFrames"}

PACE_EVERY = 16
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_BAD_IDENTIFIER = 0xA900  # Identifier does not match SOP Class
STATUS_UNABLE = 0xC001  # Unable to process


class IdentifierError(ValueError):
    """The C-FIND identifier cannot be answered; carries the DICOM status to return."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def identifier_to_query(identifier: Dataset, model: str, *, case_insensitive: bool) -> Query:
    """Read the level and matching keys out of a C-FIND (or C-MOVE/C-GET) identifier."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    allowed = LEVELS_BY_MODEL.get(UID(model), ("PATIENT", "STUDY", "SERIES", "IMAGE"))
    if level not in allowed:
        raise IdentifierError(
            STATUS_BAD_IDENTIFIER,
            f"QueryRetrieveLevel {level!r} is not one of {', '.join(allowed)} for this model",
        )
    keys: dict[str, str | None] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or element.VR == "SQ":
            continue
        keys[keyword] = _as_text(element.value)
    return Query(level=level, keys=keys, case_insensitive_names=case_insensitive)


def _as_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _charset_for(row: Mapping[str, Any], values: list[str]) -> str:
    """Keep the stored character set when it can encode the answer, else use UTF-8."""
    stored = str(row.get("_charset") or "")
    if all(v.isascii() for v in values):
        return stored
    if stored:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                encodings = convert_encodings(stored.split("\\"))
                for v in values:
                    encode_string(v, encodings)
            return stored
        except Exception:
            pass
    return "ISO_IR 192"


def build_response(identifier: Dataset, query: Query, row: Mapping[str, Any], retrieve_ae: str) -> Dataset:
    """A pending-response identifier holding exactly the requested keys (plus unique keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    texts: list[str] = []
    for keyword, value in row.items():
        if keyword.startswith("_"):
            continue
        attr = BY_KEYWORD[keyword]
        if value is None:
            value = ""
        elif attr.kind == "count" or keyword in _IS_KEYWORDS:
            value = str(value)
        elif isinstance(value, str) and "\\" in value and attr.kind in ("multi", "str"):
            value = value.split("\\")
        if isinstance(value, str):
            texts.append(value)
        setattr(ds, keyword, value)
    # Keys the index does not keep are returned empty (PS3.4 C.2.2.1.3).
    for element in identifier:
        if element.tag not in ds and element.keyword not in ("SpecificCharacterSet",) and element.tag.group != 0x0002:
            ds.add(DataElement(element.tag, element.VR, [] if element.VR == "SQ" else None))
    charset = _charset_for(row, texts)
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.RetrieveAETitle = retrieve_ae
    return ds


def find_responses(
    index: Index,
    identifier: Dataset,
    model: str,
    *,
    case_insensitive: bool,
    max_results: int,
    retrieve_ae: str,
    is_cancelled: Callable[[], bool],
    pace: Callable[[], None],
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """The generator pynetdicom's C-FIND handler yields: (status, identifier) pairs.

    ``pace`` is called every PACE_EVERY responses and waits until the network has caught up:
    without it the whole answer is queued in memory at once and a C-CANCEL is only seen after
    everything was already sent.
    """
    try:
        query = identifier_to_query(identifier, model, case_insensitive=case_insensitive)
        _keywords, rows = index.find(query)
    except IdentifierError as exc:
        log.warning("C-FIND refused: %s", exc)
        yield _failure(exc.status, str(exc))
        return
    except QueryError as exc:
        log.warning("C-FIND refused: %s", exc)
        yield _failure(STATUS_UNABLE, str(exc))
        return
    count = 0
    try:
        for row in rows:
            if is_cancelled():
                log.info("C-FIND cancelled by the peer after %d matches", count)
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, build_response(identifier, query, row, retrieve_ae)
            count += 1
            if count % PACE_EVERY == 0:
                pace()
            if max_results and count >= max_results:
                log.info("C-FIND stopped at dicom.max_find_results = %d", max_results)
                break
    except Exception as exc:
        log.exception("C-FIND failed after %d matches", count)
        yield _failure(STATUS_UNABLE, f"index error: {exc}")
        return
    log.info("C-FIND %s level: %d matches", query.level, count)
    yield 0x0000, None


def status_with_comment(status: int, comment: str) -> Dataset:
    """A status dataset carrying an Error Comment (0000,0902), cut to its 64-character limit."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    return status_with_comment(status, comment), None
