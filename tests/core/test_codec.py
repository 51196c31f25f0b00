"""Every hand-written encoder and parser of dimse/codec.py against pynetdicom's own, byte for byte (issue 13).

The command-set responses are compared in test_find_encoding.py; here: the C-STORE-RQ, the file
meta group, P-DATA-TF framing (whole messages, fragmented or not, and the two-PDV C-FIND
message), the command-set parser on what pynetdicom encodes and on malformed commands, and the
PDU readers over a socket pair.
"""

from __future__ import annotations

import socket
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_ECHO_RQ, C_FIND_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_MOVE, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode, split_dataset, write_file_meta_info
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ABORT, P_DATA

from macpacs.pacs_server.dimse import codec
from tests.synthetic import make_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _store_rq(sop_instance: str, msg_id: int, originator: tuple[str, int] | None, dataset: bytes = b"") -> C_STORE_RQ:
    """pynetdicom's C-STORE-RQ message, as its ``send_c_store`` builds it at medium priority."""
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 0x0000
    req.DataSet = BytesIO(dataset or b"\x08\x00\x18\x00\x00\x00\x00\x00")
    if originator:
        req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID = originator
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return message


@pytest.mark.parametrize(
    ("sop_instance", "originator"),
    [
        ("1.2.3.4", None),  # even-length UID
        ("1.2.3.45", None),  # odd-length UID: NUL-padded
        ("1.2.826.0.1.3680043.8.498.12345678901234567890", ("FINDSCU", 7)),  # odd-length AE title
        ("1.2.3.45", ("SIXTEEN_CHARS_AE", 65535)),
        ("1.2.3.4", ("AB", 1)),
    ],
)
def test_store_command_matches_pynetdicom(sop_instance, originator):
    aet, originator_id = originator or (None, None)
    expected = encode(_store_rq(sop_instance, 321, originator).command_set, True, True)
    assert codec.store_command(CT, sop_instance, 321, aet, originator_id) == expected


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "ts"),
    [
        (CT, "1.2.3.4", ExplicitVRLittleEndian),
        (MR, "1.2.3.45", ImplicitVRLittleEndian),  # odd-length UIDs
        (CT, "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_meta_matches_pynetdicom(sop_class, sop_instance, ts):
    expected = BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts)
    write_file_meta_info(expected, meta)
    assert codec.file_meta(sop_class, sop_instance, ts) == expected.getvalue()


def _pynetdicom_pdus(message, context_id: int, max_pdu: int) -> bytes:
    """The message as pynetdicom's DUL writes it: its P-DATA primitives through the P-DATA-TF encoder."""
    out = b""
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("max_pdu", [16384, 131072, 0, 100, 51])
@pytest.mark.parametrize("dataset_size", [8, 16378, 16379, 40000])
def test_message_framing_matches_pynetdicom(max_pdu, dataset_size):
    """Fragments at the peer's maximum PDU size exactly where pynetdicom does (the last exactly full, too)."""
    dataset = bytes(range(256)) * (dataset_size // 256) + b"x" * (dataset_size % 256)
    message = _store_rq("1.2.3.45", 1, None, dataset)
    command = codec.store_command(CT, "1.2.3.45", 1, None, None)
    got = b"".join(codec.message(5, command, dataset, max_pdu))
    assert got == _pynetdicom_pdus(message, 5, max_pdu)


def test_command_only_framing_matches_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 5
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3.45"
    rsp.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    command = codec.response_command(codec.C_STORE_RSP, CT, 5, 0x0000, dataset=False, sop_instance="1.2.3.45")
    for max_pdu in (16384, 40, 0):
        assert b"".join(codec.message(3, command, None, max_pdu)) == _pynetdicom_pdus(message, 3, max_pdu)


def test_small_message_is_pynetdicoms_pdu_of_two_pdvs():
    """A C-FIND pending response in one PDU: what pynetdicom's P-DATA-TF encoder makes of two PDVs."""
    command = codec.response_command(codec.C_FIND_RSP, "1.2.840.10008.5.1.4.1.2.2.1", 7, 0xFF00, dataset=True)
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[3, b"\x03" + command], [3, b"\x02" + identifier]]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    assert b"".join(codec.small_message(3, command, identifier, 16384)) == pdu.encode()
    # Too big for the peer's PDU size: command and dataset are fragmented as any message.
    assert b"".join(codec.small_message(3, command, identifier, 40)) == b"".join(
        codec.message(3, command, identifier, 40)
    )


# -- the command-set parser -------------------------------------------------------------------------
def _commands() -> list[tuple[str, bytes]]:
    """Command sets as pynetdicom encodes them, of every kind our fast paths read."""
    out = [(f"store-rq {o}", encode(_store_rq("1.2.3.45", 9, o).command_set, True, True)) for o in (None, ("MOVER", 4))]
    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 17
    echo = C_ECHO()
    echo.MessageID = 3
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    find = C_FIND()
    find.MessageIDBeingRespondedTo, find.AffectedSOPClassUID, find.Status = 7, "1.2.840.10008.5.1.4.1.2.2.1", 0xC001
    find.ErrorComment = "odd comment"
    move = C_MOVE()
    move.MessageIDBeingRespondedTo, move.AffectedSOPClassUID, move.Status = 9, "1.2.840.10008.5.1.4.1.2.2.2", 0xFF00
    move.NumberOfRemainingSuboperations, move.NumberOfCompletedSuboperations = 10, 2
    move.NumberOfFailedSuboperations, move.NumberOfWarningSuboperations = 1, 0
    store = C_STORE()
    store.MessageIDBeingRespondedTo, store.AffectedSOPClassUID, store.Status = 5, CT, 0xB000
    store.AffectedSOPInstanceUID = "1.2.3.4"
    for name, primitive, message in [
        ("cancel", cancel, C_CANCEL_RQ()),
        ("echo", echo, C_ECHO_RQ()),
        ("find-rsp", find, C_FIND_RSP()),
        ("move-rsp", move, C_MOVE_RSP()),
        ("store-rsp", store, C_STORE_RSP()),
    ]:
        message.primitive_to_message(primitive)
        out.append((name, encode(message.command_set, True, True)))
    return out


COMMANDS = _commands()


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_parse_command_reads_what_pynetdicom_decodes(name, command):
    decoded = decode(BytesIO(command), True, True)
    expected_us = {e.tag.element: e.value for e in decoded if e.VR == "US"}
    expected_ui = {e.tag.element: str(e.value) for e in decoded if e.VR == "UI"}
    parsed = codec.parse_command(command)
    assert parsed is not None
    assert parsed.us == expected_us
    assert parsed.ui == expected_ui


def _element(group: int, element: int, value: bytes) -> bytes:
    return group.to_bytes(2, "little") + element.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value


@pytest.mark.parametrize(
    "command",
    [
        COMMANDS[0][1][:-1],  # truncated inside the last value
        COMMANDS[0][1][:-11],  # truncated inside the last element's header
        COMMANDS[0][1][:5],
        COMMANDS[0][1] + b"\x00\x00",  # bytes left over
        COMMANDS[0][1] + _element(0x0008, 0x0018, b"1.2\0"),  # an element outside group 0000
        _element(0x0000, 0x0100, b"\x01\x00\x00\x00"),  # a US value of 4 bytes
        _element(0x0000, 0x1000, b"1.2.3.4") + b"\x00\x00\x10\x00\xff\xff\xff\x7f",  # a length past the end
    ],
    ids=["cut-value", "cut-header", "stub", "trailing", "other-group", "long-us", "huge-length"],
)
def test_parse_command_rejects_malformed_commands(command):
    assert codec.parse_command(command) is None


# -- reading PDUs off a socket ------------------------------------------------------------------------
@pytest.fixture
def pair():
    """A connected TCP pair (the readers set TCP options), ours blocking with a timeout."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_peek_command_takes_nothing_and_reads_a_whole_command(pair):
    ours, theirs = pair
    dataset = b"\x08\x00\x18\x00\x08\x00\x00\x001.2.3.4\0"
    theirs.sendall(_pynetdicom_pdus(_store_rq("1.2.3.4", 9, ("MOVER", 4), dataset), 7, 16384))
    peeked = codec.peek_command(ours, 64 * 1024, 1.0, 1.0)
    assert peeked is not None and peeked.context_id == 7
    assert peeked.command.us[0x0100] == codec.C_STORE_RQ and peeked.command.ui[0x1000] == "1.2.3.4"
    # Nothing consumed: the same PDU is read again, then the dataset after it.
    assert codec.read_exact(ours, peeked.size)[12:] == encode(
        _store_rq("1.2.3.4", 9, ("MOVER", 4)).command_set, True, True
    )
    received = BytesIO()
    codec.receive_dataset(ours, 7, received)
    assert received.getvalue() == dataset


def test_peek_command_leaves_fragmented_commands_and_other_pdus(pair):
    ours, theirs = pair
    theirs.sendall(_pynetdicom_pdus(_store_rq("1.2.3.4", 9, None), 1, 40))  # command in fragments
    assert codec.peek_command(ours, 64 * 1024, 0.2, 0.2) is None
    assert codec.peek(ours, 6, 0.0) is not None  # still there
    assert codec.peek_command(ours, 10, 0.2, 0.2) is None  # over the size limit
    ours.recv(1 << 16)
    assert codec.peek_command(ours, 64 * 1024, 0.0, 0.0) is None  # nothing waiting


def test_read_command_reassembles_fragments_and_skips_the_dataset(pair):
    ours, theirs = pair
    message = _store_rq("1.2.3.45", 2, None, b"\x08\x00\x18\x00\x00\x00\x00\x00" * 20)
    theirs.sendall(_pynetdicom_pdus(message, 1, 40))
    theirs.sendall(_pynetdicom_pdus(_store_rq("1.2.3.4", 3, None), 1, 16384))
    assert codec.read_command(ours) == encode(message.command_set, True, True)
    assert codec.parse_command(codec.read_command(ours)).us[0x0110] == 3


def test_readers_raise_on_an_abort(pair):
    ours, theirs = pair
    primitive = A_ABORT()
    primitive.abort_source = 0x00
    abort = A_ABORT_RQ()
    abort.from_primitive(primitive)
    theirs.sendall(abort.encode() * 2)
    with pytest.raises(codec.ProtocolError, match="aborted"):
        codec.read_command(ours)
    with pytest.raises(codec.ProtocolError, match="aborted"):
        codec.receive_dataset(ours, 1, BytesIO())
    theirs.close()
    with pytest.raises(OSError):
        codec.read_pdu(ours)


def test_receive_dataset_refuses_a_fragment_of_another_context(pair):
    ours, theirs = pair
    theirs.sendall(_pynetdicom_pdus(_store_rq("1.2.3.4", 9, None), 3, 16384))
    codec.read_pdu(ours)  # the command
    with pytest.raises(codec.ProtocolError, match="presentation context"):
        codec.receive_dataset(ours, 5, BytesIO())


# -- dataset offset --------------------------------------------------------------------------------
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_read_dataset_is_what_follows_the_file_meta(tmp_path, ts):
    ds: Dataset = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1)
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    _meta, offset = split_dataset(path)
    with open(path, "rb") as fh:
        assert bytes(codec.read_dataset(fh)) == path.read_bytes()[offset:]
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    # A file meta without its group length (written elsewhere) is parsed element by element.
    data = path.read_bytes()
    assert data[132:136] == b"\x02\x00\x00\x00"
    without = data[:132] + data[144:]
    assert bytes(codec.read_dataset(BytesIO(without))) == data[offset:]  # type: ignore[arg-type]
