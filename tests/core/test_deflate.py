"""Deflated datasets are inflated as a stream, with a limit (issue 15, finding 2).

A 308 KB C-STORE in Deflated Explicit VR Little Endian that inflates to 314 MB used to take the
server from 185 to 750 MB (pydicom inflates the whole dataset in memory) and was stored. Now
ingest inflates it chunk by chunk, spilling past 8 MB into a scratch file on the data volume,
and refuses it (0xA700) beyond ``storage.max_inflated_mb``. The server's memory is sampled with
psutil while DCMTK's storescu and a STOW-RS client send the bomb to a real ``macpacs serve``.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from macpacs.pacs_server.ingest import Inflation, Outcome, RejectedInstance, read_instance
from macpacs.pacs_server.storage import blob_key
from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import make_instance

MB = 1024 * 1024
FRAMES = 600  # 600 frames of 512 x 512 x 2 bytes: the 314 MB, all zero (bench/deflate_memory.py)
TEST_FRAMES = 300  # 157 MB: over the tests' 64 MB limit, and quicker for storescu to re-deflate


def write_deflated(path: Path, frames: int) -> str:
    """A multi-frame instance in deflated transfer syntax, written as a stream (the test never holds
    its pixel data in memory either); returns its SOP Instance UID."""
    ds = make_instance(study_uid=str(generate_uid()), series_uid=str(generate_uid()), number=1, size=16)
    del ds.PixelData
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = pydicom.filebase.DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    meta = pydicom.filebase.DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixels = frames * 512 * 512 * 2
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        out.write(deflate.compress(header.getvalue()))
        out.write(deflate.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixels)))
        zeros = bytes(MB)
        for _ in range(pixels // MB):
            out.write(deflate.compress(zeros))
        out.write(deflate.compress(bytes(pixels % MB)))
        out.write(deflate.flush())
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    write_deflated(path, TEST_FRAMES)
    assert path.stat().st_size < 200 * 1024  # ~155 KB
    return path


class PeakRss:
    """The highest RSS of a process, sampled every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.2)
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / MB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One process (no DICOM workers), so that its RSS is the server's; a 64 MB inflation limit."""
    server = ServerProcess(
        data_dir=tmp_path_factory.mktemp("deflate") / "data",
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        env={"MACPACS_DICOM_WORKERS": "1", "MACPACS_STORAGE_MAX_INFLATED_MB": "64"},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def staged(server: ServerProcess) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "tmp").iterdir())


def test_a_deflate_bomb_over_the_limit_is_refused_with_a700_and_bounded_memory(
    server: ServerProcess, bomb: Path
) -> None:
    with PeakRss(server.proc.pid) as rss:
        sent = run_tool("storescu", "-v", "-xd", "+cl", "1", *server.dicom_args(), str(bomb), check=False)
    output = sent.stdout + sent.stderr
    assert "0xa700" in output.lower() or "OutOfResources" in output, output
    assert "Abort" not in output
    assert server.logged("storage.max_inflated_mb = 64 MB")
    assert rss.growth_mb < 32, f"the server grew by {rss.growth_mb:.0f} MB inflating a 157 MB dataset"
    assert list((server.data_dir / "files").glob("??/??/*")) == []
    assert staged(server) == []


def test_a_deflate_bomb_over_stow_is_refused_with_bounded_memory(server: ServerProcess, bomb: Path) -> None:
    boundary = "deflateBomb"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + bomb.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with PeakRss(server.proc.pid) as rss:
        answer = requests.post(
            f"http://127.0.0.1:{server.web_port}/dicom-web/studies", data=body, headers=headers, timeout=60
        )
    assert answer.status_code == 409, answer.text
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert "max_inflated_mb" in answer.headers["warning"]
    assert rss.growth_mb < 32, f"the server grew by {rss.growth_mb:.0f} MB"
    assert staged(server) == []


def test_a_large_deflated_instance_under_the_limit_is_stored_without_inflating_it_in_memory(
    server: ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "large.dcm"
    uid = write_deflated(path, 100)  # 52 MB inflated: spilled to a scratch file, not held
    with PeakRss(server.proc.pid) as rss:
        run_tool("storescu", "-xd", "+cl", "1", *server.dicom_args(), str(path))
    assert rss.growth_mb < 32, f"the server grew by {rss.growth_mb:.0f} MB"
    stored = server.data_dir / "files" / blob_key(uid)
    assert stored.stat().st_size < MB, "stored deflated, as it came"
    meta = pydicom.filereader.read_file_meta_info(stored)
    assert meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert staged(server) == []


def test_read_instance_of_a_deflated_file_matches_pydicom() -> None:
    path = Path(get_testdata_file("image_dfl.dcm"))
    parsed = read_instance(path)
    full = pydicom.dcmread(path)
    assert parsed.sop_instance_uid == full.SOPInstanceUID
    assert parsed.record.instance["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian
    assert parsed.record.series["modality"] == full.Modality
    assert parsed.pixel_vr == b"OB" or parsed.pixel_vr == b"OW"
    assert parsed.dataset.Rows == full.Rows and "PixelData" not in parsed.dataset


def test_a_truncated_or_oversized_deflated_dataset_is_refused(tmp_path: Path) -> None:
    data = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 2000])
    with pytest.raises(RejectedInstance) as excinfo:
        read_instance(cut)
    assert excinfo.value.outcome is Outcome.UNREADABLE and "truncated" in str(excinfo.value)
    with pytest.raises(RejectedInstance) as excinfo:
        read_instance(Path(get_testdata_file("image_dfl.dcm")), inflation=Inflation(limit=100_000))
    assert excinfo.value.outcome is Outcome.OUT_OF_RESOURCES
    assert "storage.max_inflated_mb" in str(excinfo.value)
    spilled: list[io.BytesIO] = []

    def scratch() -> io.BytesIO:
        spilled.append(io.BytesIO())
        return spilled[-1]

    big = tmp_path / "big.dcm"
    write_deflated(big, 40)  # 21 MB inflated: past the 8 MB kept in memory
    assert read_instance(big, inflation=Inflation(scratch=scratch)).pixel_vr == b"OW"
    assert len(spilled) == 1
