"""Ingest's header decoder and the DIMSE codec against pydicom, on generated and mutated input.

- Generated files: every element ingest decodes itself (``ingest._plain_items``), with values of
  any bytes, in the three uncompressed transfer syntaxes. ``read_instance`` either refuses the file
  (``RejectedInstance``) or gives exactly the index columns and metadata pydicom's own decoding
  gives, and the content hash covers exactly the bytes after pydicom's file meta group.
- Mutated files: pydicom's test files with bytes flipped, cut short or inserted. Whatever arrives,
  ``read_instance`` refuses it or reads it; nothing else is raised, nothing hangs.
- Command sets: ``codec.parse_command`` reads what pydicom reads from a generated Implicit VR
  command set, and returns None (never raises) on mutated ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from macpacs.pacs_server.dimse import codec
from macpacs.pacs_server.index import instance_scan
from macpacs.pacs_server.index.attributes import ATTRIBUTES
from macpacs.pacs_server.ingest import RejectedInstance, dataset_hash, read_instance
from macpacs.pacs_server.storage import blob_key
from tests.conftest import dataset_bytes
from tests.core.test_write_path import _ingest_columns, _pydicom_columns, _pydicom_json
from tests.synthetic import make_instance

from .profiles import fuzz

NUMBER_VRS = {
    "US": ("H", 0, 0xFFFF),
    "UL": ("I", 0, 0xFFFFFFFF),
    "SS": ("h", -0x8000, 0x7FFF),
    "SL": ("i", -(2**31), 2**31 - 1),
}
# The elements ingest decodes itself for the index (UIDs apart: a bad one is refused on purpose),
# by tag, with their VR, and a few more plain ones that only the metadata cache decodes.
PLAIN = {
    tag_for_keyword(attr.keyword): dictionary_VR(tag_for_keyword(attr.keyword))
    for attr in ATTRIBUTES
    if attr.kind not in ("uid", "count", "multi")
} | {0x00080008: "CS", 0x00280030: "DS", 0x00180050: "DS", 0x00189306: "FD", 0x00189307: "FL", 0x00080054: "AE"}
SYNTAXES = [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian]

# Text values: mostly what modalities send (printable ASCII, padding, backslashes), sometimes any byte.
_printable = st.binary(max_size=24).map(lambda b: bytes(32 + x % 95 for x in b))
_padding = st.sampled_from([b"", b" ", b"\x00", b"  "])
text_bytes = st.one_of(
    st.tuples(_printable, _padding).map(lambda t: t[0] + t[1]),
    st.lists(_printable, max_size=4).map(b"\\".join),
    st.binary(max_size=24),
).map(lambda b: b + b" " if len(b) % 2 else b)


def numbers(vr: str) -> st.SearchStrategy[list[int] | list[float]]:
    if vr in ("FL", "FD"):
        return st.lists(st.floats(width=32 if vr == "FL" else 64), max_size=3)
    _fmt, low, high = NUMBER_VRS[vr]
    return st.lists(st.integers(low, high), max_size=3)


@st.composite
def generated_file(draw: st.DrawFn, folder: Path) -> Path:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size=4)
    syntax = draw(st.sampled_from(SYNTAXES))
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = syntax
    ds.set_original_encoding(implicit, little)
    for tag in draw(st.lists(st.sampled_from(sorted(PLAIN)), unique=True, max_size=12)):
        vr = PLAIN[tag]
        if vr in NUMBER_VRS or vr in ("FL", "FD"):  # numbers as numbers: pydicom encodes them in the file's order
            ds.add_new(tag, vr, draw(numbers(vr)))
        else:  # text as any bytes, put in still encoded: pydicom would refuse most of them as values
            value = draw(text_bytes)
            ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)
    path = folder / "generated.dcm"
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception:  # a value pydicom itself refuses to write: no file to compare on
        assume(False)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-ingest")


def reference_columns(path: Path) -> dict[str, object]:
    """``_pydicom_columns``, with a multi-valued binary number read as its first value: pydicom gives
    those as a plain list, which that helper (written for text numbers) does not take apart."""
    columns = _pydicom_columns(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for attr in ATTRIBUTES:
        value = ds.get(attr.keyword)
        if attr.kind == "int" and isinstance(value, list) and value:
            columns[attr.column] = int(value[0])
    return columns


@fuzz(40)
@given(data=st.data())
def test_generated_files_decode_as_pydicom_decodes_them(folder: Path, data: st.DataObject) -> None:
    path = data.draw(generated_file(folder))
    try:
        parsed = read_instance(path)
    except RejectedInstance:
        return
    uid = parsed.sop_instance_uid
    try:
        reference = reference_columns(path)
        reference_json = json.loads(json.dumps(_pydicom_json(read_instance(path, metadata=False).dataset, uid)))
    except Exception:  # pydicom cannot decode a value at all: nothing to compare with
        assume(False)
    assert _ingest_columns(path) == reference
    ours = json.loads(zlib.decompress(parsed.record.metadata))
    ours.pop("7FE00010", None)
    reference_json.pop("7FE00010", None)
    assert ours == reference_json
    assert dataset_hash(path) == hashlib.sha256(dataset_bytes(path)).hexdigest()


@pytest.fixture(scope="module")
def samples(pydicom_test_files: list[Path]) -> list[bytes]:
    """pydicom's test files under 256 KB (the mutations cost nothing to read back)."""
    return [p.read_bytes() for p in pydicom_test_files if p.stat().st_size < 256 * 1024]


@st.composite
def mutation(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and at + 4 <= len(data):  # a plausible element length, often huge
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF])))
    return bytes(data)


@fuzz(100)
@given(data=st.data())
def test_mutated_files_are_read_or_refused(folder: Path, samples: list[bytes], data: st.DataObject) -> None:
    path = folder / "mutated.dcm"
    path.write_bytes(data.draw(mutation(samples)))
    try:
        parsed = read_instance(path)
    except RejectedInstance as exc:
        assert str(exc)
        return
    assert parsed.sop_instance_uid and parsed.record.instance["file_size"] == path.stat().st_size
    assert len(dataset_hash(path)) == 64


@pytest.fixture(scope="module")
def ingest_archive(tmp_path_factory: pytest.TempPathFactory):
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load

    root = tmp_path_factory.mktemp("fuzz-ingest-archive")
    opened = open_archive(load(overrides={"storage": {"data_dir": str(root / "data")}}, environ={}))
    yield opened
    opened.close()


@fuzz(40)
@given(data=st.data())
def test_mutated_files_through_ingest_never_raise_nor_leave_a_stray(
    ingest_archive, folder: Path, samples: list[bytes], data: st.DataObject
) -> None:
    """The whole ingest path (copy, parse, hash, store, index): a result every time, and a file in
    the store only with its row (what ``macpacs verify`` would call not indexed)."""
    path = folder / "mutated-ingest.dcm"
    path.write_bytes(data.draw(mutation(samples)))
    result = ingest_archive.ingestor.ingest_file(path)
    assert result.message
    if result.sop_instance_uid and ingest_archive.blobs.size(blob_key(result.sop_instance_uid)) is not None:
        assert instance_scan.by_uid(ingest_archive.index, result.sop_instance_uid) is not None, result


# -- the DIMSE command codec ---------------------------------------------------------------------
US_ELEMENTS = sorted(codec._US_ELEMENTS)
UI_ELEMENTS = sorted(codec._UI_ELEMENTS)
uid_text = st.lists(st.integers(0, 99999), min_size=1, max_size=8).map(lambda parts: ".".join(map(str, parts)))


@st.composite
def command_set(draw: st.DrawFn) -> bytes:
    elements: dict[int, bytes] = {}
    for element in draw(st.lists(st.sampled_from(US_ELEMENTS), unique=True, max_size=6)):
        elements[element] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
    for element in draw(st.lists(st.sampled_from(UI_ELEMENTS), unique=True, max_size=4)):
        elements[element] = codec.uid_value(draw(uid_text))
    others = st.integers(0x1024, 0x5FFF).filter(lambda e: e not in codec._US_ELEMENTS)  # not read: skipped
    for element in draw(st.lists(others, unique=True, max_size=3)):
        elements[element] = draw(st.binary(max_size=12).map(lambda b: b + b"\0" if len(b) % 2 else b))
    return b"".join(codec.command_element(e, elements[e]) for e in sorted(elements))


@fuzz(60)
@given(command=command_set())
def test_parse_command_reads_what_pydicom_reads(command: bytes) -> None:
    parsed = codec.parse_command(command)
    assert parsed is not None
    ds = read_dataset(io.BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    for element in US_ELEMENTS:
        tag = 0x00000000 | element
        assert parsed.us.get(element) == (ds[tag].value if tag in ds else None)
    for element in UI_ELEMENTS:
        tag = 0x00000000 | element
        assert parsed.ui.get(element) == (str(ds[tag].value) if tag in ds else None)


@fuzz(100)
@given(command=command_set(), cut=st.integers(0, 200), noise=st.binary(max_size=16))
def test_parse_command_never_raises_on_mutated_commands(command: bytes, cut: int, noise: bytes) -> None:
    for mutated in (command[:cut], command + noise, noise + command, noise):
        result = codec.parse_command(mutated)
        assert result is None or isinstance(result, codec.Command)


def test_an_element_of_an_unknown_vr_is_left_out_not_a_crash(archive, tmp_path: Path) -> None:
    """Found by this fuzzing: an element whose VR is not one pydicom knows made building the
    metadata cache raise NotImplementedError, after the file was already stored. Now the element
    is left out (with a warning) and the instance is stored and indexed."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    accession = b"\x08\x00\x50\x00SH"  # (0008,0050) AccessionNumber, explicit VR little endian
    assert data.count(accession) == 1
    path = tmp_path / "unknown-vr.dcm"
    path.write_bytes(data.replace(accession, b"\x08\x00\x50\x00RH"))
    parsed = read_instance(path)
    assert "00080050" not in json.loads(zlib.decompress(parsed.record.metadata))
    result = archive.ingestor.ingest_file(path)
    assert result.ok, result.message
    assert archive.index.content_hash(parsed.sop_instance_uid) == dataset_hash(path)
