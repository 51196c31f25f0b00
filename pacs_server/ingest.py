"""The one ingest path: bytes in → validated → durable blob → index row → hooks → acknowledgement.

C-STORE, STOW-RS (and the browser's upload, which posts STOW-RS), ``macpacs import`` and C-GET
into us all hand a staged file of the blob store to ``Ingestor.ingest``. The file is stored
exactly as received (file meta plus the encoded dataset, never decoded and re-encoded), made
durable under its key, and only then indexed, with its size and the SHA-256 of its dataset.
Plugins may refuse an instance before anything is written (``accept_instance``) and hear of it
once it is durable and indexed (``instance_stored``). The caller acknowledges after ``ingest``
returns, so an acknowledged instance is on disk and in the index.

From the check of what is stored under the instance's key to the index commit, an ingest holds
the key's lock (``BlobStore.lock``, across processes): two stores of one UID are serialised,
so the index always describes the file on disk, and a failing store deletes only a file that
no other ingest can own. A stored file that no index row describes (a crash between its rename
and the commit, or an index being rebuilt) is indexed again before a re-send is acknowledged.

A deflated dataset (PS3.5 A.5) is inflated as a stream, into a scratch file past
``INFLATE_IN_MEMORY``, and refused beyond ``storage.max_inflated_mb``: pydicom would inflate it
whole in memory, and a few hundred KB can inflate to gigabytes.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import io
import json
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from . import dicom_status
from .config import StorageSettings
from .index import Index, IndexUnavailable, InstanceRecord, Query, Transaction, WriterLockTimeout
from .index.attributes import ATTRIBUTES, normalize_pn
from .jobs import JobError, Jobs
from .plugins import Instance, Plugins
from .storage import (
    ROOM_EVERY,
    BlobStore,
    KeyLockTimeout,
    StorageError,
    blob_key,
    is_disk_full,
    local_copy,
    stage_copy,
)
from .uids import RULE as UID_RULE
from .uids import is_uid

log = logging.getLogger(__name__)

BULK_THRESHOLD = 1024  # bytes: larger binary values are left out of the metadata cache
# A deflated dataset is inflated in memory up to this size (an SR, a small image), in a scratch
# file of the blob store beyond it.
INFLATE_IN_MEMORY = 8 * 1024 * 1024
# How long an ingest waits for the lock of its key (BlobStore.lock). The holder may itself wait
# up to the index writer lock's 10 s (index/writer_lock.py) before it gives up: a little more.
KEY_LOCK_TIMEOUT_S = 15.0


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same instance, same content: accepted, nothing changed
    KEPT_EXISTING = "kept-existing"  # same UID, different content, on_conflict = keep
    OVERWRITTEN = "overwritten"  # same UID, different content, on_conflict = overwrite
    INVALID = "invalid"  # not a usable DICOM instance
    UNREADABLE = "unreadable"  # not DICOM at all, or truncated
    REFUSED = "refused"  # a plugin's accept_instance said no
    OUT_OF_RESOURCES = "out-of-resources"  # disk full, index unavailable


# C-STORE status for each outcome (PS3.4 Annex B.2.3; a plugin's refusal: PS3.7 C.5).
DICOM_STATUS = {
    Outcome.STORED: dicom_status.SUCCESS,
    Outcome.DUPLICATE: dicom_status.SUCCESS,
    Outcome.KEPT_EXISTING: dicom_status.SUCCESS,
    Outcome.OVERWRITTEN: dicom_status.SUCCESS,
    Outcome.INVALID: dicom_status.DOES_NOT_MATCH_SOP_CLASS,
    Outcome.UNREADABLE: dicom_status.UNABLE_TO_PROCESS,
    Outcome.REFUSED: dicom_status.NOT_AUTHORIZED,
    Outcome.OUT_OF_RESOURCES: dicom_status.OUT_OF_RESOURCES,
}


class RejectedInstance(Exception):
    """The file cannot be stored; ``outcome`` says why, in terms of DICOM status."""

    def __init__(self, outcome: Outcome, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.disk_full = disk_full


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    message: str
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    # OUT_OF_RESOURCES because the data volume is full (STOW-RS answers 507 when nothing was stored).
    disk_full: bool = False

    @property
    def ok(self) -> bool:
        return DICOM_STATUS[self.outcome] == 0x0000

    @property
    def dicom_status(self) -> int:
        return DICOM_STATUS[self.outcome]


@dataclass(frozen=True)
class ParsedInstance:
    """A file read and checked, with the index record built from it."""

    record: InstanceRecord
    sop_instance_uid: str
    sop_class_uid: str
    dataset: Dataset = field(repr=False, compare=False)
    pixel_vr: bytes | None = None

    def add_metadata(self) -> None:
        """Fill ``record.metadata`` (left empty by ``read_instance(..., metadata=False)``)."""
        if not self.record.metadata:
            self.record.metadata = _metadata(self.dataset, self.sop_instance_uid, self.pixel_vr)


def dataset_hash(path: str | Path) -> str:
    """SHA-256 (hex) of the encoded dataset after the file meta group: what a sender put on the wire.

    Two files of the same instance received from different senders differ in their meta
    (source AE, implementation UID), so re-sends are compared on this part only. A staged
    file was just written, so this reads it from the page cache: ~0.4 ms for a 525 KB CT slice.
    """
    with open(path, "rb") as fh:
        return stream_hash(fh)


def stream_hash(fh: BinaryIO) -> str:
    """``dataset_hash`` of a Part-10 file being read from ``fh``."""
    first = fh.read(_CHUNK)
    offset = _dataset_offset(first)
    if offset > len(first):  # a file meta larger than a chunk, which only a hostile file has: all of it
        offset = 0
    digest = hashlib.sha256(memoryview(first)[offset:])
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


_CHUNK = 1 << 20


def _dataset_offset(head: bytes) -> int:
    """Where the dataset begins in a Part-10 file: after the preamble, ``DICM`` and the group 0002
    elements (always Explicit VR Little Endian, PS3.10 7.1), whether or not a group length is given."""
    if head[128:132] != b"DICM":
        return 0
    pos = 132
    while pos + 8 <= len(head) and head[pos : pos + 2] == b"\x02\x00":
        if head[pos + 4 : pos + 6] in _LONG_VRS:
            pos += 12 + int.from_bytes(head[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(head[pos + 6 : pos + 8], "little")
    return pos


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_HEAD = 4096  # bytes read to find the transfer syntax; a file meta is a few hundred


def _transfer_syntax(head: bytes) -> str | None:
    """The file meta's TransferSyntaxUID from the first bytes of a Part-10 file ("" when it has
    none or no meta at all), or None when the meta goes on past ``head``."""
    if head[128:132] != b"DICM":
        return ""
    pos = 132
    while pos + 8 <= len(head) and head[pos : pos + 2] == b"\x02\x00":
        if head[pos + 4 : pos + 6] in _LONG_VRS:
            start, length = pos + 12, int.from_bytes(head[pos + 8 : pos + 12], "little")
        else:
            start, length = pos + 8, int.from_bytes(head[pos + 6 : pos + 8], "little")
        if head[pos + 2 : pos + 4] == b"\x10\x00":
            if start + length > len(head):
                return None
            return head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    ran_out = pos + 8 > len(head) and len(head) == _HEAD
    return None if ran_out else ""


@dataclass(frozen=True)
class Inflation:
    """How ``read_instance`` may inflate a deflated dataset: at most ``limit`` bytes (None: no
    limit), in memory up to INFLATE_IN_MEMORY, then in a ``scratch`` file, asking ``room``
    every ROOM_EVERY bytes spilled whether the volume still has space (StorageError if not)."""

    limit: int | None = None
    scratch: Callable[[], IO[bytes]] = tempfile.TemporaryFile
    room: Callable[[], None] = lambda: None


def _inflate(fp: BinaryIO, inflation: Inflation) -> tuple[BinaryIO, int]:
    """The rest of ``fp`` inflated (raw deflate, PS3.5 A.5) as a stream: a file positioned at
    its start, and its size. RejectedInstance beyond the limit, or for a broken or truncated stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    memory = io.BytesIO()
    out: IO[bytes] = memory
    in_memory = True
    size, next_check, data = 0, 0, b""
    try:
        while not inflater.eof:
            if not data:
                data = fp.read(_CHUNK)
            if not data:  # all input given: what zlib still holds back, if anything
                piece = inflater.decompress(b"", _CHUNK)
                if not piece:
                    raise RejectedInstance(Outcome.UNREADABLE, "truncated file: the deflated dataset ends early")
            else:
                piece = inflater.decompress(data, _CHUNK)
                data = inflater.unconsumed_tail
            size += len(piece)
            if inflation.limit is not None and size > inflation.limit:
                raise RejectedInstance(
                    Outcome.OUT_OF_RESOURCES,
                    f"refused: the deflated dataset inflates to more than storage.max_inflated_mb = "
                    f"{inflation.limit >> 20} MB (from {os.fstat(fp.fileno()).st_size} bytes sent). "
                    "If it is a genuine instance, raise storage.max_inflated_mb; the sender may then send it again",
                )
            if in_memory and size > INFLATE_IN_MEMORY:
                spill = inflation.scratch()
                spill.write(memory.getbuffer())
                out, in_memory = spill, False
                memory.close()
            if not in_memory and size >= next_check:
                inflation.room()
                next_check = size + ROOM_EVERY
            out.write(piece)
        out.seek(0)
    except zlib.error as exc:
        out.close()
        raise RejectedInstance(Outcome.UNREADABLE, f"the deflated dataset cannot be inflated: {exc}") from None
    except OSError as exc:
        out.close()
        msg = f"cannot inflate the deflated dataset into a scratch file: {exc.strerror or exc}"
        raise RejectedInstance(Outcome.OUT_OF_RESOURCES, msg, disk_full=is_disk_full(exc)) from None
    except BaseException:
        out.close()
        raise
    return out, size


def _read_deflated(path: Path, fp: BinaryIO, inflation: Inflation) -> tuple[FileDataset, bytes | None]:
    """``dcmread(stop_before_pixels=True)`` of a deflated file, without inflating it whole in memory
    (pydicom's own reader does), and the pixel data's VR (``_pixel_data_vr_and_check``)."""
    meta = read_file_meta_info(path)
    fp.seek(0)
    head = fp.read(_CHUNK)
    offset = _dataset_offset(head)
    if offset > len(head):
        raise RejectedInstance(Outcome.UNREADABLE, "file meta information larger than 1 MB")
    fp.seek(offset)
    inflated, size = _inflate(fp, inflation)
    with inflated:
        dataset = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data)
        ds = FileDataset(str(path), dataset, head[:128], meta, False, True)
        ds.set_original_encoding(False, True, dataset.original_character_set)
        return ds, _pixel_data_vr_and_check(inflated, ds, size)


def _at_pixel_data(tag: Any, _vr: str | None, _length: int) -> bool:
    """Where ``stop_before_pixels`` stops pydicom: Pixel Data and its float and double float forms."""
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _pixel_data_vr_and_check(fp: Any, ds: Dataset, size: int) -> bytes | None:
    """Check the pixel data element that ``stop_before_pixels`` left unread; returns its VR.

    Reading only the header keeps ingest cheap for large images, but a truncated transfer must
    still be caught: the declared length must fit in the file, and encapsulated (undefined
    length) pixel data must end with its sequence delimiter.
    """
    start = fp.tell()
    header = fp.read(12)
    if len(header) < 8:
        return None
    implicit, little = ds.original_encoding
    order = "<" if little else ">"
    vr: bytes | None
    if implicit:
        vr, (length,), header_len = None, struct.unpack_from(order + "L", header, 4), 8
    else:
        vr = header[4:6]
        if vr in _LONG_VRS:
            (length,), header_len = struct.unpack_from(order + "L", header, 8), 12
        else:
            (length,), header_len = struct.unpack_from(order + "H", header, 6), 8
    if length == 0xFFFFFFFF:
        fp.seek(size - 8)
        if fp.read(8) != _SEQUENCE_DELIMITER:
            raise RejectedInstance(Outcome.UNREADABLE, "truncated file: encapsulated pixel data has no end delimiter")
    elif start + header_len + length > size:
        raise RejectedInstance(
            Outcome.UNREADABLE,
            f"truncated file: pixel data declares {length} bytes, only {size - start - header_len} arrived",
        )
    return vr or b"OW"


def _check_complete(ds: Dataset) -> None:
    """A truncated file parses, but its last element is shorter than its declared length."""
    last = next(reversed(ds.keys()), None) if len(ds) else None
    if last is None:
        raise RejectedInstance(Outcome.UNREADABLE, "the file holds no dataset")
    raw = ds.get_item(last)
    defined = isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value is not None
    if defined and len(raw.value) < raw.length:
        raise RejectedInstance(
            Outcome.UNREADABLE,
            f"truncated file: element {raw.tag} declares {raw.length} bytes, only {len(raw.value)} arrived",
        )


def _plain(ds: Dataset, keyword: str) -> tuple[str, list[Any]] | None:
    """The values of a still-encoded plain element (``_plain_items``), or None: ask pydicom."""
    tag = _TAGS.get(keyword)
    if tag is None:
        return None
    try:
        return _plain_items(ds.get_item(tag))
    except ValueError:
        return None


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    plain = _plain(ds, keyword)
    if plain is not None and plain[0] not in ("IS", "DS"):  # pydicom keeps a number's own spelling
        return "\\".join(plain[1])[:limit]
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:limit]


def _number(ds: Dataset, keyword: str) -> int | None:
    plain = _plain(ds, keyword)
    if plain is not None and plain[0] in ("IS", "US", "UL", "SS", "SL"):
        return plain[1][0] if plain[1] else None
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, list | tuple | pydicom.multival.MultiValue):
            value = value[0]
        return int(value)
    except (TypeError, ValueError, IndexError):
        return None


def _required_uid(ds: Dataset, keyword: str) -> str:
    plain = _plain(ds, keyword)
    if plain is not None:
        uid = "\\".join(plain[1]).strip()
    else:
        value = ds.get(keyword)
        uid = str(value).strip().rstrip("\x00") if value is not None else ""
    if not uid:
        raise RejectedInstance(Outcome.INVALID, f"{keyword} is missing")
    if not is_uid(uid):
        raise RejectedInstance(Outcome.INVALID, f"{keyword} {uid[:80]!r} is not a valid UID ({UID_RULE})")
    return uid


# Plain elements that ingest decodes itself, straight from the encoded bytes, for the index row
# and the metadata cache's DICOM JSON (_plain_items): pydicom's conversion and to_json_dict cost
# ~40 µs an element, most of a small instance's ingest. The values are exactly what pydicom gives
# (tests/core/test_write_path.py compares the two on pydicom's test files); anything else goes
# through pydicom.
_NUMBER_FORMATS = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d"}
_RSTRIP_THEN_SPLIT = {"AS", "CS", "DA", "DT", "TM", "IS", "DS"}  # pydicom's multi_string
_SPLIT_THEN_RSTRIP = {"LO", "SH"}  # pydicom's convert_text (ASCII bytes decode alike in every character set)
_TAGS = {attr.keyword: tag_for_keyword(attr.keyword) for attr in ATTRIBUTES}
_PRINTABLE = re.compile(rb"[\x20-\x7e]*\x00?")  # no escape sequences, no controls; UI's NUL padding


def _plain_items(raw: Any) -> tuple[str, list[Any]] | None:
    """VR and values (empty: no value) of a still-encoded element of a plain VR, decoded as
    pydicom decodes it; None when pydicom must do it. ValueError: a number pydicom may read."""
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return None
    vr, value = raw.VR, raw.value
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if len(value) % size:
            return None
        count = len(value) // size
        return vr, list(struct.unpack(("<" if raw.is_little_endian else ">") + fmt * count, value))
    if not _PRINTABLE.fullmatch(value):
        return None
    text = value.decode("ascii")
    if vr in _RSTRIP_THEN_SPLIT:
        items = text.rstrip(" \x00").split("\\")
    elif vr in _SPLIT_THEN_RSTRIP:
        items = [item.rstrip("\x00 ") for item in text.split("\\")]
    elif vr in ("UI", "PN"):
        items = text.rstrip("\x00 ").split("\\")
    elif vr == "AE":
        items = [item.strip() for item in text.split("\\")]
    else:
        return None
    if len(items) == 1 and not items[0]:
        return vr, []
    if vr == "IS":
        return vr, [int(item) for item in items]
    if vr == "DS":
        return vr, [float(item) for item in items]
    return vr, items


def _plain_json(raw: Any) -> dict[str, Any] | None:
    """DICOM JSON of a still-encoded element of a plain VR, or None when pydicom must do it."""
    plain = _plain_items(raw)
    if plain is None or plain[0] == "PN":  # a PN's JSON is an object of name groups
        return None
    vr, items = plain
    return {"vr": vr, "Value": items} if items else {"vr": vr}


def _dataset_json(ds: Dataset, bulk_uri: Callable[[Any], str]) -> dict[str, Any]:
    """``ds.to_json_dict`` (bulk data as URIs, undecodable elements left out with a warning),
    with plain elements encoded by ``_plain_json``."""
    doc: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 -- iterating the dataset would decode every element
        key = f"{tag:08X}"
        try:
            element = _plain_json(ds.get_item(tag))
        except Exception:  # a number pydicom may read, or an element it cannot even hold (an unknown VR)
            element = None
        if element is None:
            try:
                element = ds[tag].to_json_dict(bulk_uri, BULK_THRESHOLD)
            except Exception as exc:  # pydicom raises many types on odd values; the file itself is kept
                log.warning("metadata cache: %s left out (%s)", key, exc)
                continue
        doc[key] = element
    return doc


def _metadata(ds: Dataset, sop_uid: str, pixel_vr: bytes | None) -> bytes:
    """DICOM JSON of the instance without bulk data, zlib-compressed, for the metadata cache.

    Bulk values become relative BulkDataURIs (``instances/{uid}/bulk/{tag}``); the web layer
    makes them absolute. Pixel data, which ingest does not read, is listed the same way.
    """

    def bulk_uri(element: Any) -> str:
        return f"instances/{sop_uid}/bulk/{element.tag:08X}"

    doc = _dataset_json(ds, bulk_uri)
    if pixel_vr is not None:
        doc["7FE00010"] = {
            "vr": pixel_vr.decode("ascii", "replace"),
            "BulkDataURI": f"instances/{sop_uid}/bulk/7FE00010",
        }
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)


def read_instance(
    path: Path, *, source_ae: str = "", metadata: bool = True, inflation: Inflation = Inflation()
) -> ParsedInstance:
    """Read a Part-10 file's header, check it, and build its index record. Raises RejectedInstance.

    With ``metadata=False`` the metadata cache entry is left for ``ParsedInstance.add_metadata``,
    so that ingest builds it only for an instance it goes on to store. ``inflation`` bounds what
    a deflated dataset may cost (the default: no limit, spilling to the system's temporary folder).
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(_HEAD)
            syntax = _transfer_syntax(head)
            if syntax is None:  # a meta of more than _HEAD bytes: pydicom finds the syntax
                syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
            if syntax == DeflatedExplicitVRLittleEndian:
                ds, pixel_vr = _read_deflated(path, fp, inflation)
            else:
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
                pixel_vr = _pixel_data_vr_and_check(fp, ds, size)
    except RejectedInstance:
        raise
    except OSError as exc:
        raise RejectedInstance(Outcome.OUT_OF_RESOURCES, f"cannot read {path}: {exc.strerror}") from exc
    except InvalidDicomError as exc:
        raise RejectedInstance(Outcome.UNREADABLE, f"not a DICOM Part-10 file: {exc}") from None
    except Exception as exc:
        raise RejectedInstance(Outcome.UNREADABLE, f"cannot parse DICOM file: {type(exc).__name__}: {exc}") from None
    if pixel_vr is None:
        _check_complete(ds)
    meta = ds.file_meta
    if not meta.get("TransferSyntaxUID"):
        raise RejectedInstance(Outcome.INVALID, "file meta information has no TransferSyntaxUID")
    try:
        sop_uid = _required_uid(ds, "SOPInstanceUID")
        sop_class = _required_uid(ds, "SOPClassUID")
        study_uid = _required_uid(ds, "StudyInstanceUID")
        series_uid = _required_uid(ds, "SeriesInstanceUID")
    except RejectedInstance:
        raise
    except Exception as exc:  # a value that cannot be decoded at all (bad VR, bad encoding)
        raise RejectedInstance(Outcome.INVALID, f"unreadable identifying attribute: {exc}") from None
    meta_uid = str(meta.get("MediaStorageSOPInstanceUID", "")).rstrip("\x00")
    if meta_uid and meta_uid != sop_uid:
        # The dataset's UID identifies the instance, for every protocol alike (pydicom's rtdose.dcm
        # has such a meta; a C-STORE's meta is written from its request, which ingest checks).
        # The file is still stored exactly as it came.
        log.warning(
            "SOPInstanceUID %s differs from the file meta's MediaStorageSOPInstanceUID %s; indexed under the dataset's",
            sop_uid,
            meta_uid,
        )

    tables: dict[str, dict[str, Any]] = {"PATIENT": {}, "STUDY": {}, "SERIES": {}, "IMAGE": {}}
    for attr in ATTRIBUTES:
        if attr.kind in ("count", "multi"):
            continue
        try:
            if attr.kind == "int":
                value: Any = _number(ds, attr.keyword)
            else:
                value = _text(ds, attr.keyword, attr.length)
        except Exception as exc:  # one undecodable optional attribute must not lose the instance
            log.warning("%s: cannot decode %s (%s); indexed as empty", sop_uid, attr.keyword, exc)
            value = None if attr.kind == "int" else ""
        tables[attr.level][attr.column] = value
        if attr.kind == "pn":
            tables[attr.level][attr.column + "_norm"] = normalize_pn(value)
    tables["STUDY"]["study_uid"] = study_uid
    tables["SERIES"]["series_uid"] = series_uid
    tables["IMAGE"]["sop_instance_uid"] = sop_uid
    tables["IMAGE"]["sop_class_uid"] = sop_class

    tables["IMAGE"].update(
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        storage_key=blob_key(sop_uid),
        file_size=size,
        source_ae=source_ae[:16],
    )
    charset = ds.get("SpecificCharacterSet", "")
    if isinstance(charset, list | tuple | pydicom.multival.MultiValue):
        charset = "\\".join(charset)
    record = InstanceRecord(
        patient=tables["PATIENT"],
        study=tables["STUDY"],
        series=tables["SERIES"],
        instance=tables["IMAGE"],
        metadata=_metadata(ds, sop_uid, pixel_vr) if metadata else b"",
        charset=str(charset),
    )
    return ParsedInstance(record, sop_uid, sop_class, ds, pixel_vr)


class Ingestor:
    """Stores and indexes instances; one per process (in its Archive), shared by every protocol."""

    def __init__(self, blobs: BlobStore, index: Index, settings: StorageSettings, plugins: Plugins, jobs: Jobs) -> None:
        self.blobs = blobs
        self.index = index
        self.settings = settings
        self.plugins = plugins
        self.jobs = jobs
        # Every staged file stops growing below the floor, whichever protocol writes it.
        blobs.keep_free(settings.min_free_mb * 1024 * 1024)
        self.inflation = Inflation(settings.max_inflated_mb * 1024 * 1024, blobs.scratch, blobs.check_room)

    def ingest(
        self,
        staged: str | Path,
        *,
        via: str,
        source: str = "",
        announced_uid: str = "",
        study: str = "",
        content_hash: str = "",
        overwrite: bool = False,
    ) -> IngestResult:
        """Take ownership of ``staged`` (a file from ``blobs.stage()``) and store it.

        ``via`` names the protocol (``c-store``, ``stow``, ``import``, ``c-get``), ``source`` the
        sender (calling AE title...), ``announced_uid`` the SOP Instance UID the sender's request
        named (a C-STORE's Affected SOP Instance UID): a dataset that is another instance is
        refused, since the sender would be told one instance is stored while we keep another.
        ``study``: the Study Instance UID the request is for (STOW-RS to ``/studies/{study}``);
        an instance of another study is refused. ``content_hash``: ``dataset_hash(staged)``
        when the receiver computed it while the bytes arrived (store_scp), so that ingest need
        not read the file again. ``overwrite``: replace a stored instance of this UID whatever
        ``storage.on_conflict`` says (the archive changed it on purpose: a patient update
        rewriting its files). Never raises for bad input: the result says what happened and
        carries the DICOM status. ``staged`` is gone when this returns, stored or deleted.
        """
        try:
            return self._ingest(Path(staged), via, source, announced_uid, study, content_hash, overwrite)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)

    def ingest_file(self, source: Path) -> IngestResult:
        """Copy an outside file into the store's staging area and ingest it (``macpacs import``)."""
        try:
            staged = stage_copy(self.blobs, source)
        except OSError as exc:
            full = is_disk_full(exc) or exc.errno == errno.EROFS
            outcome = Outcome.OUT_OF_RESOURCES if full else Outcome.UNREADABLE
            return IngestResult(outcome, f"cannot copy {source}: {exc.strerror}", disk_full=is_disk_full(exc))
        return self.ingest(staged, via="import")

    def _ingest(
        self, staged: Path, via: str, source: str, announced_uid: str, study: str, content_hash: str, overwrite: bool
    ) -> IngestResult:
        # The durability order is staged fsync → rename → folder fsync → index commit (with the
        # instance's jobs) → hooks → answer (BlobStore.put does the first three).
        try:
            parsed = read_instance(staged, source_ae=source, metadata=False, inflation=self.inflation)
        except RejectedInstance as exc:
            return IngestResult(exc.outcome, str(exc), disk_full=exc.disk_full)
        uid, sop_class = parsed.sop_instance_uid, parsed.sop_class_uid
        if announced_uid and announced_uid != uid:
            msg = f"the request names SOP Instance UID {announced_uid}, but the dataset is instance {uid}"
            return IngestResult(Outcome.INVALID, msg, announced_uid, sop_class)
        found_study = parsed.record.study["study_uid"]
        if study and found_study != study:
            msg = f"instance belongs to study {found_study}, not to {study} named in the URL"
            return IngestResult(Outcome.INVALID, msg, uid, sop_class)
        record = parsed.record.instance
        try:
            record["content_hash"] = content_hash or dataset_hash(staged)
        except OSError as exc:
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"cannot read {staged}: {exc.strerror}", uid, sop_class)
        instance = _instance(parsed, via, source)
        refusal = self.plugins.refusal(instance)
        if refusal:
            log.warning("%s %s from %s refused by a plugin: %s", via, uid, source or "?", refusal)
            return IngestResult(Outcome.REFUSED, f"refused by a plugin: {refusal}", uid, sop_class)
        key = record["storage_key"]
        try:
            with self.blobs.lock(key, KEY_LOCK_TIMEOUT_S):
                return self._store(staged, parsed, instance, key, overwrite)
        except (WriterLockTimeout, IndexUnavailable) as exc:  # a writer hangs, the database is down: retry later
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"index unavailable: {exc}", uid, sop_class)
        except KeyLockTimeout as exc:
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"busy: {exc}", uid, sop_class)
        except OSError as exc:  # a lock file or the stored copy cannot be opened (no descriptor left, EIO...)
            log.error("storing %s failed: %s", uid, exc)
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"storage unavailable: {exc}", uid, sop_class)
        except Exception as exc:  # the index cannot be read
            log.exception("storing %s failed", uid)
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"index unavailable: {exc}", uid, sop_class)

    def _store(
        self, staged: Path, parsed: ParsedInstance, instance: Instance, key: str, overwrite: bool
    ) -> IngestResult:
        """Check what is stored under ``key``, then put and index; the caller holds the key's lock."""
        uid, sop_class = parsed.sop_instance_uid, parsed.sop_class_uid
        new_hash = parsed.record.instance["content_hash"]
        # The stored blob is the truth: its key comes from the UID, so one stat tells a re-send.
        had_blob = self.blobs.size(key) is not None
        if had_blob:
            stored_hash, indexed = self._stored(uid, key)
            if stored_hash == new_hash:
                if not indexed:  # renamed, then a crash before the commit (or an index rebuilt since)
                    parsed.add_metadata()
                    self.index.add_instance(parsed.record, within=self._jobs_of(instance, Outcome.STORED))
                    log.warning("%s: its stored file was in no index row; indexed it again", uid)
                return IngestResult(Outcome.DUPLICATE, "identical instance already stored", uid, sop_class)
            if not indexed and not self._index_stored(uid, key, stored_hash):
                log.warning(
                    "%s: the stored file %s is not a readable instance and no index row describes it: "
                    "replaced by the one received",
                    uid,
                    key,
                )
            elif self.settings.on_conflict == "keep" and not overwrite:
                msg = (
                    "an instance with this SOP Instance UID but different content is stored; "
                    "kept it (on_conflict = keep)"
                )
                return IngestResult(Outcome.KEPT_EXISTING, msg, uid, sop_class)

        try:
            self.blobs.check_room()
        except StorageError as exc:
            return IngestResult(Outcome.OUT_OF_RESOURCES, f"refused: {exc.strerror}", uid, sop_class, disk_full=True)
        try:
            self.blobs.put(staged, key)
        except StorageError as exc:
            log.error("storing %s failed: %s", uid, exc)
            if not had_blob:
                # Renamed but maybe not durable: not acknowledged, not kept. Only this ingest can
                # have put it: the key's lock kept every other one out since it was found absent.
                self.blobs.delete(key)
            return IngestResult(Outcome.OUT_OF_RESOURCES, str(exc), uid, sop_class, disk_full=is_disk_full(exc))
        parsed.add_metadata()
        outcome = Outcome.OVERWRITTEN if had_blob else Outcome.STORED
        try:
            # replace: a row left without its file (a lost file sent again) is made to describe this one.
            self.index.add_instance(parsed.record, replace=True, within=self._jobs_of(instance, outcome))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, StorageError) else f"index unavailable: {exc}"
            log.error("storing %s failed: %s", uid, reason)
            if not had_blob:
                self.blobs.delete(key)  # not acknowledged, so not kept: the sender will retry
            full = "database or disk is full" in str(exc) or is_disk_full(exc)
            return IngestResult(Outcome.OUT_OF_RESOURCES, reason, uid, sop_class, disk_full=full)
        self.plugins.stored(instance, outcome.value)
        if had_blob:
            why = "it was changed on purpose" if overwrite else "on_conflict = overwrite"
            if not overwrite and self.settings.on_conflict != "overwrite":
                why = "it was not readable"
            return IngestResult(Outcome.OVERWRITTEN, f"replaced the stored instance ({why})", uid, sop_class)
        return IngestResult(Outcome.STORED, "stored", uid, sop_class)

    def _jobs_of(self, instance: Instance, outcome: Outcome) -> Callable[[Transaction], object] | None:
        """What queues the plugins' jobs for ``instance`` (``instance_jobs``) in its index
        transaction, or None when there are none. Decided and encoded before the transaction
        opens, so that no plugin code runs while the index's writer lock is held."""
        rows = []
        for spec in self.plugins.instance_jobs(instance, outcome.value):
            try:
                rows += self.jobs.prepare([spec])
            except JobError as exc:
                log.error("%s: a plugin's job is dropped: %s", instance.sop_instance_uid, exc)
        if not rows:
            return None
        return lambda conn: self.jobs.insert(rows, conn)

    def _stored(self, uid: str, key: str) -> tuple[str, bool]:
        """The content hash of the stored copy, and whether an index row describes the instance:
        the hash from the index, else (not indexed, or indexed before hashes existed) computed
        from the blob itself."""
        known = self.index.content_hash(uid)
        if known:
            return known, True
        indexed = bool(self.index.instances(Query(level="IMAGE", keys={"SOPInstanceUID": uid})))
        with self.blobs.open(key) as fh:
            return stream_hash(fh), indexed

    def _index_stored(self, uid: str, key: str, stored_hash: str) -> bool:
        """Index the stored blob of ``uid``, which no row describes; False when it is not a
        readable instance of that UID (it was then never acknowledged as one)."""
        try:
            with local_copy(self.blobs, key) as local:
                stored = read_instance(local, inflation=Inflation(None, self.blobs.scratch, self.blobs.check_room))
        except RejectedInstance as exc:
            if exc.outcome is Outcome.OUT_OF_RESOURCES:
                raise StorageError(0, f"cannot read the stored file of {uid}: {exc}") from None
            return False
        if stored.sop_instance_uid != uid:
            return False
        stored.record.instance["content_hash"] = stored_hash
        self.index.add_instance(stored.record)
        log.warning(
            "%s: its stored file was in no index row (a crash between its rename and the index commit, "
            "or an index being rebuilt); indexed it again",
            uid,
        )
        return True


def _instance(parsed: ParsedInstance, via: str, source: str) -> Instance:
    """What the plugin hooks see of an instance being ingested."""
    rec = parsed.record
    return Instance(
        sop_instance_uid=parsed.sop_instance_uid,
        sop_class_uid=parsed.sop_class_uid,
        study_instance_uid=rec.study["study_uid"],
        series_instance_uid=rec.series["series_uid"],
        patient_id=rec.patient.get("patient_id", ""),
        transfer_syntax_uid=rec.instance["transfer_syntax_uid"],
        file_size=rec.instance["file_size"],
        content_hash=rec.instance["content_hash"],
        via=via,
        source=source,
        dataset=parsed.dataset,
    )
