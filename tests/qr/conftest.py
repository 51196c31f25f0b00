"""Fixtures for Query/Retrieve: an archive loaded once per module, DCMTK storescp peers, nodes CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from tests.conftest import ServerProcess, dcmtk, free_port, in_process_macpacs, wait_for_port
from tests.orthanc import ORTHANC, orthanc_config
from tests.synthetic import write_series

CT_STUDY = "1.2.826.0.1.3680043.8.498.1001"
CT_SERIES = "1.2.826.0.1.3680043.8.498.1001.1"
MR_STUDY = "1.2.826.0.1.3680043.8.498.1002"


def macpacs(
    *args: str, data_dir: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a ``macpacs`` command on ``data_dir`` (``env``: extra environment), in this process
    with click's runner (the CLI's own code, without a second of imports per call)."""
    result = in_process_macpacs(*args, "--data-dir", str(data_dir), env=env)
    proc = subprocess.CompletedProcess([*args], result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"macpacs {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def c_store(port: int, paths: list[Path], ae_title: str = "MACPACS", calling: str = "LOADER") -> None:
    """Store files with their own transfer syntax (pynetdicom as an outside SCU, one association)."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    ae = AE(ae_title=calling)
    assoc = ae.associate("127.0.0.1", port, [build_context(c, [t]) for c, t in contexts], ae_title=ae_title)
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, not re-encoded
    try:
        for path in paths:
            assert assoc.send_c_store(path).Status == 0
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


@contextlib.contextmanager
def storescp(out_dir: Path, ae_title: str = "DEST", *extra: str) -> Iterator[int]:
    """DCMTK storescp on a free port writing into ``out_dir``; yields the port, stops it by PID."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", ae_title, "-od", str(out_dir), *extra, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def received(out_dir: Path) -> dict[str, Path]:
    """SOP Instance UID → file, for what a storescp or getscu wrote."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out_dir.iterdir()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, Path], Path]]:
    """One archive per module: a CT study (5 slices), an MR study (3 slices), a JPEG 2000 and an RLE file.

    Yields the server, SOP Instance UID → source file, and a scratch folder.
    """
    base = tmp_path_factory.mktemp("qr")
    server = ServerProcess(base / "data", free_port(), free_port(), free_port()).start()
    sources = write_series(base / "in" / "ct", 5, study_uid=CT_STUDY, series_uid=CT_SERIES, patient_id="QR1", size=64)
    sources += write_series(
        base / "in" / "mr", 3, study_uid=MR_STUDY, patient_id="QR2", patient_name="ROE^MARY", modality="MR", size=64
    )
    for name in ("JPEG2000.dcm", "SC_rgb_rle.dcm"):
        sources.append(Path(get_testdata_file(name)))
    c_store(server.dicom_port, sources)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sources}
    yield server, by_uid, base
    server.stop()


def corrupt_j2k(folder: Path) -> Path:
    """A JPEG 2000 instance whose pixel data cannot be decoded (new UIDs, garbage codestream)."""
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BROKEN"
    frame = b"\xff\x4f\xff\x51" + b"\x00" * 60
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([frame])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class OrthancPeer:
    """Orthanc (Debian package) on loopback as the remote PACS, with its REST API for driving it."""

    AET = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, list]) -> None:
        self.workdir = workdir
        self.dicom_port, self.http_port = free_port(), free_port()
        self.modalities = modalities
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancPeer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = orthanc_config(
            self.workdir,
            aet=self.AET,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            DicomCheckModalityHost=False,
            DicomAlwaysAllowEcho=True,
            DicomAlwaysAllowStore=True,
            DicomModalities=self.modalities,
        )
        (self.workdir / "orthanc.json").write_text(json.dumps(config))
        # Orthanc links DCMTK, which leaves Nagle on unless TCP_NODELAY=1 (shared/reference/performance.md).
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.workdir / "orthanc.log", "wb") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        wait_for_port(self.http_port, timeout=60, proc=self.proc)
        wait_for_port(self.dicom_port, timeout=60, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        response = requests.request(
            method, f"http://127.0.0.1:{self.http_port}{path}", json=body, data=raw, timeout=120
        )
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            self.rest("POST", "/instances", raw=path.read_bytes())

    def study_instances(self, study_uid: str) -> int:
        found = self.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        return len(found)
