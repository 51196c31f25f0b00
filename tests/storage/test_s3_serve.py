"""``macpacs serve`` with ``storage.url = "s3://..."`` on SeaweedFS's real S3 gateway: DCMTK's
storescu stores, getscu and WADO-RS retrieve the very bytes, through the read cache and past
it; with the gateway stopped a C-STORE answers 0xA700 with a clear log line, nothing that was
acknowledged is lost, and once the gateway is back the same server stores again."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.conftest import ServerProcess, dataset_bytes, run_tool
from tests.s3gateway import SECRET_KEY, Gateway
from tests.synthetic import write_series
from tests.web.test_fast_paths import parts

SERIES_ACCEPT = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def start(make_server: object, gateway: Gateway, url: str) -> ServerProcess:
    """A server storing into ``url``, its endpoint and credentials from the AWS variables."""
    env = {"MACPACS_STORAGE_URL": url, "MACPACS_S3_ATTEMPTS": "2", "MACPACS_S3_TIMEOUT_S": "5", **gateway.env()}
    return make_server(env=env)  # type: ignore[operator]


def objects(gateway: Gateway, url: str) -> dict[str, bytes]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    client = gateway.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def by_uid(files: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def forget_cache(server: ServerProcess) -> None:
    """Empty the read cache, so that what follows is read from the object store itself."""
    for folder in (server.data_dir / "cache").glob("??"):
        shutil.rmtree(folder)


def test_stored_in_s3_and_retrieved_byte_for_byte(make_server, gateway: Gateway, s3_url: str, tmp_path: Path):
    server = start(make_server, gateway, s3_url)
    series = write_series(tmp_path / "in", 4, patient_id="S3", size=64)
    sources = by_uid([*series, Path(get_testdata_file("JPEG2000.dcm"))])
    run_tool("storescu", *server.dicom_args(), *map(str, series))
    run_tool("storescu", "-xw", *server.dicom_args(), get_testdata_file("JPEG2000.dcm"))  # as stored: JPEG 2000
    stored = objects(gateway, s3_url)
    assert len(stored) == 5 and not (server.data_dir / "files").exists()
    as_stored = {}  # each object is a Part-10 file, as received (storescu chose the transfer syntax)
    for n, body in enumerate(stored.values()):
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.PixelData == pydicom.dcmread(sources[str(ds.SOPInstanceUID)]).PixelData
        as_stored[str(ds.SOPInstanceUID)] = tmp_path / f"object-{n}.dcm"
        as_stored[str(ds.SOPInstanceUID)].write_bytes(body)

    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    for cached in (True, False):
        if not cached:
            forget_cache(server)
        out = tmp_path / f"get-{cached}"
        out.mkdir()
        run_tool("getscu", "-S", "-od", str(out), *server.dicom_args(),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={first.StudyInstanceUID}")  # fmt: skip
        got = by_uid(sorted(out.iterdir()))
        assert set(got) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in series}
        for uid, path in got.items():
            assert dataset_bytes(path) == dataset_bytes(as_stored[uid])

    forget_cache(server)
    base = f"http://127.0.0.1:{server.web_port}/dicom-web"
    url = f"{base}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    answer = requests.get(url, headers=SERIES_ACCEPT, timeout=30)
    assert answer.status_code == 200
    of_series = [
        b for b in stored.values() if pydicom.dcmread(io.BytesIO(b)).SeriesInstanceUID == first.SeriesInstanceUID
    ]
    assert sorted(body for _head, body in parts(answer)) == sorted(of_series) and len(of_series) == 4
    j2k = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    frame = requests.get(
        f"{base}/studies/{j2k.StudyInstanceUID}/series/{j2k.SeriesInstanceUID}/instances/{j2k.SOPInstanceUID}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
        timeout=30,
    )
    assert parts(frame)[0][1] == j2k.pixel_array.astype("<i2").tobytes()  # decoded from the S3 copy
    assert SECRET_KEY not in server.log()


@pytest.mark.timeout(180)
def test_gateway_stopped_refuses_then_recovers(make_server, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    gateway = Gateway(tmp_path_factory.mktemp("weed-fault")).start()  # its own: this test stops it
    try:
        url = f"s3://{gateway.bucket('fault')}/archive"
        server = start(make_server, gateway, url)
        files = write_series(tmp_path / "in", 3, patient_id="FAULT", size=32)
        run_tool("storescu", *server.dicom_args(), *map(str, files[:2]))
        assert len(objects(gateway, url)) == 2

        gateway.stop()
        refused = run_tool("storescu", "-v", *server.dicom_args(), str(files[2]), check=False)
        # DCMTK's name for 0xA700
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        assert server.logged(f"the object store at {gateway.endpoint} did not answer")
        assert list((server.data_dir / "tmp").iterdir()) == [], "the refused instance is not kept half-way"

        gateway.start()  # same ports, same data
        assert len(objects(gateway, url)) == 2, "what was acknowledged is there"
        run_tool("storescu", *server.dicom_args(), str(files[2]))
        stored = objects(gateway, url)
        assert len(stored) == 3
        forget_cache(server)
        out = tmp_path / "get"
        out.mkdir()
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        run_tool("getscu", "-S", "-od", str(out), *server.dicom_args(),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip
        assert sorted(dataset_bytes(p) for p in out.iterdir()) == sorted(dataset_bytes(p) for p in files)
    finally:
        gateway.stop()
