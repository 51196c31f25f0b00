"""C-FIND responses encoded by hand are the bytes pynetdicom and pydicom produced before (issue 2).

``IdentifierEncoder`` writes index rows straight into a per-query layout; ``codec.response_command``
encodes the C-FIND-RSP command set (and C-STORE, C-MOVE and C-GET responses). Both are compared
here with the pydicom path they replace, over every transfer syntax a peer can pick and rows
with empty, numeric, multi-valued, odd-length and non-ASCII values. The end-to-end answers are
in test_find.py (DCMTK findscu).
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from macpacs.pacs_server.dimse import codec
from macpacs.pacs_server.dimse.find import IdentifierEncoder, build_response, identifier_to_query
from macpacs.pacs_server.index.matcher import build

MODEL = StudyRootQueryRetrieveInformationModelFind
# build_response (the pydicom path compared with) sets an empty US value as "", as it always did.
pytestmark = pytest.mark.filterwarnings("ignore:A value of type .str. cannot be assigned")
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def _identifier(level: str, *keys: str, explicit: bool = False) -> Dataset:
    """An identifier as pynetdicom decodes it from the wire (VRs as a peer sent them)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        keyword, _, value = key.partition("=")
        setattr(ds, keyword, value)
    ds.PatientComments = ""  # not in the index: returned empty
    ds.ReferencedStudySequence = []  # a sequence: returned empty
    return decode(BytesIO(encode(ds, not explicit, True)), not explicit, True)


STUDY_KEYS = (
    "StudyInstanceUID",
    "PatientName=SMITH*",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "PatientSize",
    "ReferringPhysicianName",
    "SeriesInstanceUID",  # below the query level: returned empty
    "RetrieveAETitle",
)
STUDY_ROWS = [
    {
        "StudyInstanceUID": "1.2.3.4",
        "PatientName": "SMITH^ANNA",
        "PatientID": "PID003",
        "StudyDate": "20231201",
        "StudyTime": "101500.123",
        "AccessionNumber": "ACC3",
        "ModalitiesInStudy": "CT\\MR",
        "NumberOfStudyRelatedInstances": 6,
        "NumberOfStudyRelatedSeries": 2,
        "PatientSize": "1.75",
        "ReferringPhysicianName": None,
        "_charset": "",
    },
    {  # odd lengths, empty values, a stored character set
        "StudyInstanceUID": "1.2.33.4",
        "PatientName": "SMITH^BO",
        "PatientID": "P1",
        "StudyDate": None,
        "StudyTime": None,
        "AccessionNumber": "",
        "ModalitiesInStudy": "US",
        "NumberOfStudyRelatedInstances": 1,
        "NumberOfStudyRelatedSeries": 1,
        "PatientSize": None,
        "ReferringPhysicianName": "WELBY^MARCUS",
        "_charset": "ISO_IR 100",
    },
    {  # non-ASCII under its own character set
        "StudyInstanceUID": "1.2.3.5",
        "PatientName": "Äneas^Rüdiger",
        "PatientID": "SCSGERM",
        "StudyDate": "20240101",
        "StudyTime": "1200",
        "AccessionNumber": "Ä1",
        "ModalitiesInStudy": "MR",
        "NumberOfStudyRelatedInstances": 3,
        "NumberOfStudyRelatedSeries": 1,
        "PatientSize": None,
        "ReferringPhysicianName": None,
        "_charset": "ISO_IR 100",
    },
    {  # ISO 2022 with ASCII text, and Japanese text needing escape sequences
        "StudyInstanceUID": "1.2.3.6",
        "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "PatientID": "SCSX1",
        "StudyDate": "20240102",
        "StudyTime": "1300",
        "AccessionNumber": "A",
        "ModalitiesInStudy": "CT",
        "NumberOfStudyRelatedInstances": 1,
        "NumberOfStudyRelatedSeries": 1,
        "PatientSize": None,
        "ReferringPhysicianName": "Doe^John",
        "_charset": "\\ISO 2022 IR 87",
    },
    {  # non-ASCII with no stored character set: answered in UTF-8
        "StudyInstanceUID": "1.2.3.7",
        "PatientName": "Ωmega^Ελένη",
        "PatientID": "X",
        "StudyDate": "20240103",
        "StudyTime": "1400",
        "AccessionNumber": "B",
        "ModalitiesInStudy": "CT",
        "NumberOfStudyRelatedInstances": 1,
        "NumberOfStudyRelatedSeries": 1,
        "PatientSize": None,
        "ReferringPhysicianName": None,
        "_charset": "",
    },
]
IMAGE_KEYS = ("SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "SOPClassUID", "NumberOfFrames", "ContentDate")
IMAGE_ROWS = [
    {
        "PatientID": "PID1",
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.1",
        "SOPInstanceUID": "1.2.3.1.1",
        "InstanceNumber": 12,
        "Rows": 512,
        "Columns": 511,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "NumberOfFrames": None,
        "ContentDate": "20240101",
        "_charset": "ISO_IR 192",
    },
    {
        "PatientID": "PID1",
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.1",
        "SOPInstanceUID": "1.2.3.1.22",
        "InstanceNumber": None,
        "Rows": None,
        "Columns": 0,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "NumberOfFrames": 3,
        "ContentDate": None,
        "_charset": "",
    },
]
CASES = [("STUDY", STUDY_KEYS, STUDY_ROWS), ("IMAGE", IMAGE_KEYS, IMAGE_ROWS)]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda ts: ts.name)
@pytest.mark.parametrize("explicit_request", [False, True], ids=["implicit-request", "explicit-request"])
@pytest.mark.parametrize(("level", "keys", "rows"), CASES, ids=[c[0] for c in CASES])
def test_identifiers_match_the_pydicom_encoding(syntax, explicit_request, level, keys, rows):
    identifier = _identifier(level, *keys, explicit=explicit_request)
    query = identifier_to_query(identifier, MODEL, case_insensitive=True)
    _stmt, keywords = build(query)
    encoder = IdentifierEncoder(identifier, query, keywords, "MACPACS", syntax)
    for row in rows:
        row = {k: row[k] for k in [*keywords, "_charset"]}  # the columns the matcher selects
        expected = encode(
            build_response(identifier, query, row, "MACPACS"),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        assert encoder.encode(row) == expected, row


def test_ascii_rows_take_the_direct_path():
    identifier = _identifier("STUDY", *STUDY_KEYS)
    query = identifier_to_query(identifier, MODEL, case_insensitive=True)
    _stmt, keywords = build(query)
    encoder = IdentifierEncoder(identifier, query, keywords, "MACPACS", ImplicitVRLittleEndian)
    assert encoder._encode_direct(STUDY_ROWS[0]) is not None
    assert encoder._encode_direct(STUDY_ROWS[2]) is None  # non-ASCII: pydicom encodes it


@pytest.mark.parametrize(
    ("status", "dataset", "comment"),
    [(0xFF00, True, None), (0x0000, False, None), (0xFE00, False, None), (0xC001, False, "odd comment")],
)
def test_find_command_set_matches_pynetdicom(status, dataset, comment):
    rsp = C_FIND()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = MODEL
    rsp.Status = status
    rsp.Identifier = BytesIO(b"\x08\x00\x52\x00\x00\x00\x00\x00") if dataset else None
    if comment:
        rsp.ErrorComment = comment
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    expected = encode(message.command_set, True, True)
    assert codec.response_command(codec.C_FIND_RSP, MODEL, 7, status, dataset=dataset, comment=comment) == expected


MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"


@pytest.mark.parametrize("kind", ["move", "get"])
@pytest.mark.parametrize(
    ("status", "dataset", "comment", "counts"),
    [
        (0xFF00, False, None, (497, 3, 0, 0)),  # pending
        (0x0000, False, None, (None, 500, 0, 0)),  # success: no remaining count
        (0xB000, True, "1 failed", (None, 499, 1, 0)),  # warning, failed UIDs in an identifier
        (0xFE00, False, "odd", (65535, 12, 3, 1)),  # cancelled (odd comment padded)
        (0xA801, False, "unknown move destination X", (None, None, None, None)),
    ],
)
def test_retrieve_command_set_matches_pynetdicom(kind, status, dataset, comment, counts):
    """C-MOVE/C-GET responses are hand-encoded for the retrieve's pending stream: byte-identical
    to what pynetdicom builds from its primitives."""
    rsp, message, field = (
        (C_MOVE(), C_MOVE_RSP(), codec.C_MOVE_RSP) if kind == "move" else (C_GET(), C_GET_RSP(), codec.C_GET_RSP)
    )
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = MOVE_MODEL
    rsp.Status = status
    rsp.Identifier = BytesIO(b"\x08\x00\x58\x00\x00\x00\x00\x00") if dataset else None
    if comment:
        rsp.ErrorComment = comment
    (
        rsp.NumberOfRemainingSuboperations,
        rsp.NumberOfCompletedSuboperations,
        rsp.NumberOfFailedSuboperations,
        rsp.NumberOfWarningSuboperations,
    ) = counts
    message.primitive_to_message(rsp)
    expected = encode(message.command_set, True, True)
    got = codec.response_command(field, MOVE_MODEL, 9, status, dataset=dataset, comment=comment, counts=counts)
    assert got == expected


@pytest.mark.parametrize(("status", "comment"), [(0x0000, None), (0xB000, "coerced"), (0xA700, "odd")])
def test_store_response_command_set_matches_pynetdicom(status, comment):
    """The C-STORE-RSP that store_scp answers each instance with comes from the same encoder."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 5
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3.45"
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    got = codec.response_command(
        codec.C_STORE_RSP, rsp.AffectedSOPClassUID, 5, status, dataset=False, comment=comment, sop_instance="1.2.3.45"
    )
    assert got == encode(message.command_set, True, True)


def test_small_message_is_one_pdu_of_two_pdvs_or_fragments():
    command, dataset = b"c" * 10, b"d" * 20
    one = b"".join(codec.small_message(3, command, dataset, 16384))
    assert one[0] == 0x04 and int.from_bytes(one[2:6], "big") == len(one) - 6
    assert one[6:12] == (12).to_bytes(4, "big") + bytes([3, 0x03]) and one[12:22] == command
    assert one[22:28] == (22).to_bytes(4, "big") + bytes([3, 0x02]) and one[28:] == dataset
    # Too big for the peer's PDU size: command and dataset are fragmented as any message.
    parts = b"".join(codec.small_message(3, command, dataset, 16))
    assert parts == b"".join(codec.pdus(3, command, 0x01, 16) + codec.pdus(3, dataset, 0x00, 16))
