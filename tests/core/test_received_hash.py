"""The content hash computed while a C-STORE's fragments arrive (``codec.receive_dataset``) is
``ingest.dataset_hash`` of the staged file, byte for byte, so ingest need not read the file again;
and a write that fails while they arrive (disk full) stops the writing, not the reading."""

from __future__ import annotations

import errno
import hashlib
import socket
import sqlite3
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from macpacs.pacs_server.dimse import codec
from macpacs.pacs_server.ingest import dataset_hash
from macpacs.pacs_server.storage import blob_key
from tests.conftest import ServerProcess, run_tool
from tests.synthetic import write_series


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def staged_file(tmp_path: Path, dataset: bytes) -> Path:
    path = tmp_path / "staged.dcm"
    path.write_bytes(codec.file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1") + dataset)
    return path


@pytest.mark.parametrize(
    "dataset",
    [
        b"\x08\x00\x18\x00UI\x08\x001.2.3.4\0" + bytes(range(256)) * 300,  # many fragments
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",
        b"\x02\x00\x10\x00UI\x04\x001.2\0",  # begins like the file meta: dataset_hash would skip it
    ],
)
def test_the_streamed_hash_is_dataset_hash_of_the_staged_file(pair, tmp_path: Path, dataset: bytes) -> None:
    ours, theirs = pair
    theirs.sendall(b"".join(bytes(p) for p in codec.pdus(7, dataset, 0x00, 4096)))
    received = BytesIO()
    result = codec.receive_dataset(ours, 7, received)
    assert received.getvalue() == dataset and result.write_error is None
    if dataset.startswith(b"\x02\x00"):
        assert result.content_hash == "", "no hash rather than one that differs from dataset_hash"
    else:
        expected = dataset_hash(staged_file(tmp_path, dataset))
        assert result.content_hash == hashlib.sha256(dataset).hexdigest() == expected


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room, self.data = room, b""

    def write(self, data: memoryview) -> int:
        if len(self.data) + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += bytes(data)
        return len(data)


def test_a_failed_write_stops_the_writing_and_the_whole_dataset_is_read(pair) -> None:
    ours, theirs = pair
    dataset = bytes(100_000)
    theirs.sendall(b"".join(bytes(p) for p in codec.pdus(1, dataset, 0x00, 16384)))
    theirs.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # what comes next: an A-RELEASE-RQ
    sink = FullDisk(40_000)
    result = codec.receive_dataset(ours, 1, sink)
    assert result.write_error is not None and result.write_error.errno == errno.ENOSPC
    assert len(sink.data) < 40_000
    assert result.content_hash == hashlib.sha256(dataset).hexdigest()
    assert codec.read_pdu(ours)[0] == 0x05, "the dataset was read to its end, the next PDU is intact"


def test_room_is_asked_before_the_first_write_and_stops_it(pair) -> None:
    ours, theirs = pair
    theirs.sendall(b"".join(bytes(p) for p in codec.pdus(1, bytes(5000), 0x00, 1024)))
    asked: list[int] = []

    def room() -> None:
        asked.append(1)
        raise OSError(errno.ENOSPC, "only 3 MB free, below the floor")

    sink = BytesIO()
    result = codec.receive_dataset(ours, 1, sink, room)
    assert asked == [1] and sink.getvalue() == b"" and result.write_error is not None


def test_the_index_holds_dataset_hash_of_every_file_stored_by_c_store(server: ServerProcess, tmp_path: Path) -> None:
    """Through both paths (the first C-STORE through pynetdicom, the next four read directly)."""
    files = write_series(tmp_path / "series", 5, size=128)
    run_tool("storescu", *server.dicom_args(), *map(str, files))
    con = sqlite3.connect(server.data_dir / "index.sqlite")
    try:
        rows = dict(con.execute("SELECT sop_instance_uid, content_hash FROM instance").fetchall())
    finally:
        con.close()
    assert len(rows) == 5
    for uid, digest in rows.items():
        assert digest == dataset_hash(server.data_dir / "files" / blob_key(uid))
