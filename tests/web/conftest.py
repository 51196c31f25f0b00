"""A real ``macpacs serve`` loaded once per module through DCMTK storescu, for the web tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.conftest import ServerProcess, free_port, run_tool, wait_for_port
from tests.synthetic import write_series

# pydicom test files covering each way pixels are stored, with the storescu flag proposing it.
TEST_FILES = {
    "CT_small.dcm": "-xs",  # native, little endian
    "MR_small_RLE.dcm": "-xs",  # RLE lossless
    "JPEG2000.dcm": "-xs",  # JPEG 2000
    "SC_rgb_jpeg_dcmtk.dcm": "-xs",  # JPEG baseline, YBR_FULL
    "SC_rgb_rle.dcm": "-xs",  # RGB, RLE
    "examples_palette.dcm": "-xs",  # PALETTE COLOR
    "SC_ybr_full_422_uncompressed.dcm": "-xs",  # native YBR_FULL_422
    "examples_ybr_color.dcm": "-xs",  # JPEG baseline, YBR_FULL_422, 30 frames
}


@dataclass
class Loaded:
    server: ServerProcess
    base: str  # http://127.0.0.1:PORT
    files: dict[str, Path]  # name -> original file
    series_dir: Path

    @property
    def dicomweb(self) -> str:
        return self.base + "/dicom-web"

    def stored_path(self, sop_uid: str) -> Path:
        from macpacs.pacs_server.storage import blob_key

        return self.server.data_dir / "files" / blob_key(sop_uid)


def start_server(data_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(
        data_dir=data_dir,
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        env=env or {},
    )
    server.start()
    wait_for_port(server.web_port, proc=server.proc)
    return server


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made with openssl, for the HTTPS tests."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def monochrome1(folder: Path) -> Path:
    """CT_small turned into MONOCHROME1 (new UIDs): renders as the inverse of the original."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, pydicom.uid.generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / "mono1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def compressed_flag(path: Path) -> list[str]:
    """storescu's proposal flag for the file's transfer syntax (native files need none)."""
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return {
        "1.2.840.10008.1.2.5": ["-xr"],
        "1.2.840.10008.1.2.4.91": ["-xw"],
        "1.2.840.10008.1.2.4.90": ["-xv"],
        "1.2.840.10008.1.2.4.50": ["-xy"],
    }.get(ts, [])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    root = tmp_path_factory.mktemp("web")
    server = start_server(root / "data")
    files: dict[str, Path] = {}
    for name in TEST_FILES:
        src = Path(get_testdata_file(name))
        files[name] = src
    files["mono1.dcm"] = monochrome1(root)
    series_dir = root / "series"
    write_series(series_dir, 5, size=64, patient_name="WEB^TEST", patient_id="WEB001", accession="WACC1")
    try:
        for path in files.values():
            run_tool("storescu", *compressed_flag(path), *server.dicom_args(), str(path))
        run_tool("storescu", *server.dicom_args(), *sorted(str(p) for p in series_dir.glob("*.dcm")))
        yield Loaded(server, f"http://127.0.0.1:{server.web_port}", files, series_dir)
    finally:
        server.stop()
        shutil.rmtree(root / "data", ignore_errors=True)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def get(url: str, **kwargs: object) -> requests.Response:
    return requests.get(url, timeout=30, **kwargs)  # type: ignore[arg-type]
