"""C-FIND SCP: a DICOM identifier → the one matcher → pending responses filled from the index.

Return keys come from index columns only; no file is opened to answer a query. The responses
are encoded straight from the index rows (``IdentifierEncoder``, ``codec.response_command``) and
written to the socket in batches (``serve_find``), not through pynetdicom's per-message path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import struct
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from .. import dicom_status
from ..index import Index, IndexUnavailable, IndexUnreadable, Query, QueryError
from ..index.attributes import BY_KEYWORD
from . import codec, pynetdicom_ext

log = logging.getLogger(__name__)

LEVELS_BY_MODEL = {
    PatientRootQueryRetrieveInformationModelFind: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    StudyRootQueryRetrieveInformationModelFind: ("STUDY", "SERIES", "IMAGE"),
}
# IS attributes kept as integers in the index (US attributes such as Rows stay integers).
_IS_KEYWORDS = {"SeriesNumber", "InstanceNumber", "AcquisitionNumber", "NumberOfFrames"}


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
            dicom_status.DOES_NOT_MATCH_SOP_CLASS,
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


class IdentifierEncoder:
    """Encodes pending-response identifiers of one query straight from index rows.

    Building a pydicom Dataset per match (``build_response``) and encoding it cost ~0.25 ms a
    match. The layout (which elements, tags, VRs, order) is the same for every row of a query,
    so it is taken once from ``build_response`` itself, with empty values: elements that do not
    depend on the row are encoded then by pydicom, and per row only the index values are
    written into their slots. The bytes are the same as ``encode(build_response(...))``
    (tests/core/test_find_encoding.py checks it). Rows with non-ASCII text, a character set
    whose encoding is not ASCII for ASCII text, and transfer syntaxes other than Implicit and
    Explicit VR Little Endian go through ``build_response`` and pydicom as before.
    """

    def __init__(
        self, identifier: Dataset, query: Query, keywords: list[str], retrieve_ae: str, transfer_syntax: str
    ) -> None:
        self.identifier = identifier
        self.query = query
        self.retrieve_ae = retrieve_ae
        self.ts = UID(transfer_syntax)
        self.direct = self.ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
        self.implicit = self.ts == ImplicitVRLittleEndian
        # Only the tags and VRs of the row elements are used; 0 keeps pydicom quiet about US values.
        placeholders = {k: 0 if BY_KEYWORD[k].kind == "int" else None for k in keywords}
        template = build_response(identifier, query, placeholders | {"_charset": ""}, retrieve_ae)
        # In tag order: constant bytes, a row slot (keyword, header, VR, as_text), or None for the charset.
        slots: list[tuple[int, Any]] = [(_CHARSET_TAG, None)]
        wanted = set(keywords)
        for element in template:
            if element.keyword in wanted:
                as_text = BY_KEYWORD[element.keyword].kind == "count" or element.keyword in _IS_KEYWORDS
                self.direct = self.direct and element.VR in _SHORT_VRS
                slots.append(
                    (element.tag, (element.keyword, self._header(element.tag, element.VR), element.VR, as_text))
                )
            elif self.direct:
                slots.append((element.tag, self._encode_one(element)))
        self.slots = [slot for _tag, slot in sorted(slots, key=lambda s: s[0])]
        self.row_slots = [slot for slot in self.slots if isinstance(slot, tuple)]
        self.charset_header = self._header(_CHARSET_TAG, "CS")

    def _header(self, tag: int, vr: str) -> bytes:
        group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        return group_element if self.implicit else group_element + vr.encode("ascii")

    def _encode_one(self, element: DataElement) -> bytes:
        ds = Dataset()
        ds.add(element)
        return encode(ds, self.implicit, True, False)

    def encode(self, row: Mapping[str, Any]) -> bytes:
        """The encoded identifier of the pending response for ``row``."""
        if self.direct:
            encoded = self._encode_direct(row)
            if encoded is not None:
                return encoded
        ds = build_response(self.identifier, self.query, row, self.retrieve_ae)
        return encode(ds, self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated)

    def _encode_direct(self, row: Mapping[str, Any]) -> bytes | None:
        """The identifier written slot by slot; None when this row needs pydicom (see class doc)."""
        values: dict[str, bytes] = {}
        texts: list[str] = []
        for keyword, _header, vr, as_text in self.row_slots:
            value = row[keyword]
            if value is None:
                values[keyword] = b""
            elif vr == "US" and type(value) is int and 0 <= value <= 0xFFFF:
                values[keyword] = _US.pack(value)
            else:
                if as_text:
                    value = str(value)
                elif not isinstance(value, str):
                    return None
                if not value.isascii():
                    return None
                texts.append(value)
                raw = value.encode("ascii")
                values[keyword] = raw + (b"\0" if vr == "UI" else b" ") if len(raw) % 2 else raw
        charset = _charset_for(row, texts)
        if charset and not _ascii_compatible(charset):
            return None
        parts: list[bytes] = []
        length = _UL.pack if self.implicit else _US.pack
        for slot in self.slots:
            if slot is None:
                if charset:
                    raw = charset.encode("ascii")
                    raw = raw + b" " if len(raw) % 2 else raw
                    parts.append(self.charset_header + length(len(raw)) + raw)
            elif isinstance(slot, tuple):
                value = values[slot[0]]
                parts.append(slot[1] + length(len(value)) + value)
            else:
                parts.append(slot)
        return b"".join(parts)


_CHARSET_TAG = 0x00080005
_SHORT_VRS = {"AE", "AS", "CS", "DA", "DS", "IS", "LO", "PN", "SH", "TM", "UI", "US"}  # 2-byte explicit length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


@functools.cache
def _ascii_compatible(charset: str) -> bool:
    """Whether pydicom writes ASCII text under ``charset`` as plain ASCII bytes (not so for all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encodings = convert_encodings(charset.split("\\"))
            return bool(encode_string(_PRINTABLE, encodings) == _PRINTABLE.encode("ascii"))
    except Exception:
        return False


def find_responses(
    index: Index,
    identifier: Dataset,
    model: str,
    transfer_syntax: str,
    *,
    case_insensitive: bool,
    max_results: int,
    retrieve_ae: str,
) -> Iterator[tuple[int | Dataset, bytes | None]]:
    """(status, encoded identifier) pairs for ``serve_find``: one per match, then a final status.

    The identifiers come encoded in the presentation context's transfer syntax
    (``IdentifierEncoder``); C-CANCEL is ``serve_find``'s business, between its writes.
    """
    started = time.perf_counter()
    try:
        query = identifier_to_query(identifier, model, case_insensitive=case_insensitive)
        keywords, rows = index.find(query)
    except IdentifierError as exc:
        log.warning("C-FIND refused: %s", exc)
        yield _failure(exc.status, str(exc))
        return
    except QueryError as exc:
        log.warning("C-FIND refused: %s", exc)
        yield _failure(dicom_status.QUERY_UNABLE_TO_PROCESS, str(exc))
        return
    count = 0
    try:
        encoder = IdentifierEncoder(identifier, query, keywords, retrieve_ae, transfer_syntax)
        for row in rows:
            yield dicom_status.PENDING, encoder.encode(row)
            count += 1
            if max_results and count >= max_results:
                log.info("C-FIND stopped at dicom.max_find_results = %d", max_results)
                break
    # A corrupt index (the index layer logged it and the server repairs it), or a database server
    # that cannot answer now (restarting, index.statement_timeout): out of resources, try later.
    except (IndexUnreadable, IndexUnavailable) as exc:
        log.error("C-FIND failed after %d matches: %s", count, exc)
        yield _failure(dicom_status.OUT_OF_RESOURCES, f"C-FIND failed: {exc}")
        return
    except Exception as exc:
        log.exception("C-FIND failed after %d matches", count)
        yield _failure(dicom_status.QUERY_UNABLE_TO_PROCESS, f"C-FIND failed: {exc}")
        return
    log.info("C-FIND %s level: %d matches in %.1f ms", query.level, count, (time.perf_counter() - started) * 1000)
    yield dicom_status.SUCCESS, None


BATCH_MESSAGES = 32  # pending responses per socket write, between two looks for a C-CANCEL
BATCH_BYTES = 64 * 1024


def serve_find(service: Any, req: Any, context: Any) -> None:
    """The C-FIND SCP, in place of pynetdicom's (``subops.RetrieveServiceClass`` and
    ``WorklistServiceClass`` call it).

    The EVT_C_FIND handler (``scp.DicomListener._on_find``, ``find_responses``) yields encoded
    identifiers (a plugin's C-FIND yields datasets: they are encoded here, in the context's
    transfer syntax); each response is framed here (command set by ``codec.response_command``) and up to
    BATCH_MESSAGES of them are written to the socket at once by ``pynetdicom_ext.write_parts``, instead of
    going one PDU per reactor loop through pynetdicom's queues (~0.5 ms a match).

    C-CANCEL: after every batch the socket is looked at for a C-CANCEL-RQ (``_cancel_requested``),
    and the answer stops there with a Cancel status. So a cancel is seen within one batch of its
    arrival, and no more than one batch is built ahead of what the kernel has taken: a large
    answer is produced as fast as the peer reads it, never queued whole in memory.
    """
    assoc = service.assoc
    cx_id = context.context_id
    msg_id = int(req.MessageID)
    sop_class = str(req.AffectedSOPClassUID)
    max_pdu = assoc.dimse.maximum_pdu_size
    pending = codec.response_command(codec.C_FIND_RSP, sop_class, msg_id, dicom_status.PENDING, dataset=True)
    parts: list[bytes | memoryview] = []
    batched = size = count = 0

    def finish(status: int | Dataset) -> None:
        comment = None
        if isinstance(status, Dataset):
            comment = status.get("ErrorComment")
            status = int(status.Status)
        command = codec.response_command(codec.C_FIND_RSP, sop_class, msg_id, status, dataset=False, comment=comment)
        parts.extend(codec.small_message(cx_id, command, None, max_pdu))
        pynetdicom_ext.write_parts(assoc, [b"".join(parts)])  # one buffer: cheaper than ~130 small ones
        parts.clear()

    try:
        responses = evt.trigger(
            assoc,
            evt.EVT_C_FIND,
            {"request": req, "context": context.as_tuple, "_is_cancelled": service.is_cancelled},
        )
        syntax = UID(context.transfer_syntax[0])
        for status, identifier in responses or ():
            if not assoc.is_established:
                return
            if status != dicom_status.PENDING or identifier is None:
                finish(status)
                return
            if isinstance(identifier, Dataset):  # a plugin's C-FIND (the worklist) answers with datasets
                identifier = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
                if identifier is None:
                    raise ValueError("a response identifier could not be encoded")
            parts += codec.small_message(cx_id, pending, identifier, max_pdu)
            count += 1
            batched += 1
            size += len(identifier)
            if batched >= BATCH_MESSAGES or size >= BATCH_BYTES:
                pynetdicom_ext.write_parts(assoc, [b"".join(parts)])  # one buffer: cheaper than ~130 small ones
                parts.clear()
                batched = size = 0
                if _cancel_requested(service, msg_id):
                    if hasattr(responses, "close"):
                        responses.close()  # the generator's index cursor is released now
                    log.info("C-FIND cancelled by the peer after %d matches", count)
                    finish(dicom_status.CANCEL)
                    return
        if assoc.is_established:
            finish(dicom_status.SUCCESS)
    except OSError as exc:
        log.warning("C-FIND: the connection failed after %d matches: %s", count, exc)
    except Exception:
        log.exception("C-FIND handler failed after %d matches", count)
        parts.clear()
        if assoc.is_established:
            with contextlib.suppress(OSError):
                finish(dicom_status.FIND_HANDLER_FAILED)


def _cancel_requested(service: Any, msg_id: int) -> bool:
    """Whether the peer sent a C-CANCEL-RQ for ``msg_id``: seen by pynetdicom, or waiting on the socket.

    pynetdicom's DUL thread polls the socket and may not get the GIL for a while; so a whole
    C-CANCEL PDU waiting on the socket is taken here, under the socket's receive lock (the DUL
    is then not half-way through reading it). Anything else is left for pynetdicom.
    """
    if service.is_cancelled(msg_id):
        return True
    sock = service.assoc.dul.socket
    raw = getattr(sock, "socket", None)
    lock = getattr(sock, "recv_lock", None)
    if raw is None or lock is None or isinstance(raw, ssl.SSLSocket):
        return False
    with lock:
        peeked = codec.peek_command(raw, _MAX_CANCEL_PDU, 0.0, 0.0)  # only what has arrived
        if peeked is None:
            return False
        us = peeked.command.us
        if us.get(0x0100) != codec.C_CANCEL_RQ or us.get(0x0120) != msg_id:
            return False
        codec.read_exact(raw, peeked.size)
        return True


_MAX_CANCEL_PDU = 1024


def status_with_comment(status: int, comment: str) -> Dataset:
    """A status dataset carrying an Error Comment (0000,0902), cut to its 64-character limit."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    return status_with_comment(status, comment), None
