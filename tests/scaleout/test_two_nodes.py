"""Two ``macpacs serve`` nodes on one PostgreSQL index and one S3 bucket (SeaweedFS), as behind a
load balancer (docs/scale-out.md): what either stores, the other finds and retrieves byte for
byte, over DICOM (DCMTK's storescu, findscu, getscu) and DICOMweb (STOW-RS, QIDO-RS, WADO-RS);
``/health`` says which node answered; and a node killed with SIGKILL in the middle of 4
associations has lost nothing it acknowledged, as the other node shows."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.conftest import ServerProcess, acknowledged, dataset_bytes, dcmtk, findscu, run_tool
from tests.synthetic import write_series
from tests.web.test_fast_paths import parts

from .conftest import Shared

SERIES_ACCEPT = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
PARALLEL = 4
PER_SENDER = 60


def stored_objects(shared: Shared) -> dict[str, bytes]:
    """Every object under the test's prefix, by SOP Instance UID: the files as the nodes stored them."""
    bucket, _, prefix = shared.storage_url[len("s3://") :].partition("/")
    client = shared.gateway.client()
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)] = body
    return found


def get_study(server: ServerProcess, out: Path, study_uid: str) -> dict[str, Path]:
    """C-GET of a study with DCMTK's getscu: the received files by SOP Instance UID."""
    out.mkdir(parents=True)
    run_tool("getscu", "-S", "-od", str(out), *server.dicom_args(),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")  # fmt: skip
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}


def object_dataset(part10: bytes, folder: Path) -> bytes:
    """``dataset_bytes`` of an object as the store holds it."""
    path = folder / "object.dcm"
    path.write_bytes(part10)
    return dataset_bytes(path)


def health(server: ServerProcess) -> dict:
    answer = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_what_one_node_stores_the_other_finds_and_retrieves(
    nodes: list[ServerProcess], module_shared: Shared, tmp_path: Path
):
    shared = module_shared
    a, b = nodes
    assert health(a)["node"] == "node-a"
    assert health(b)["node"] == f"{socket.gethostname()}:{b.dicom_port}", "the default name: host and DICOM port"

    # C-STORE to A; C-FIND, C-GET and WADO-RS from B.
    series = write_series(tmp_path / "in", 5, patient_id="NODES", size=64)
    run_tool("storescu", *a.dicom_args(), *map(str, series))
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    studies = findscu(b, tmp_path / "find", "QueryRetrieveLevel=STUDY", "PatientID=NODES", "StudyInstanceUID")
    assert [str(ds.StudyInstanceUID) for ds in studies] == [str(first.StudyInstanceUID)]
    stored = stored_objects(shared)
    assert len(stored) == 5
    got = get_study(b, tmp_path / "get", str(first.StudyInstanceUID))
    assert set(got) == set(stored)
    for uid, path in got.items():
        assert dataset_bytes(path) == object_dataset(stored[uid], tmp_path), "byte for byte what A stored"
    url = f"http://127.0.0.1:{b.web_port}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    answer = requests.get(url, headers=SERIES_ACCEPT, timeout=30)
    assert answer.status_code == 200
    assert sorted(body for _head, body in parts(answer)) == sorted(stored.values())

    # STOW-RS to B; QIDO-RS and C-FIND on A.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    boundary = "scaleout"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    answer = requests.post(f"http://127.0.0.1:{b.web_port}/dicom-web/studies", data=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    qido = requests.get(
        f"http://127.0.0.1:{a.web_port}/dicom-web/studies/{ds.StudyInstanceUID}/instances", timeout=30
    ).json()
    assert [row["00080018"]["Value"] for row in qido] == [[ds.SOPInstanceUID]]
    found = findscu(a, tmp_path / "find2", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ds.StudyInstanceUID}",
                    "SOPInstanceUID")  # fmt: skip
    assert [str(f.SOPInstanceUID) for f in found] == [ds.SOPInstanceUID]
    got = get_study(a, tmp_path / "get2", str(ds.StudyInstanceUID))
    # getscu writes its sequences with lengths of its own (DCMTK): the same elements and pixels
    back = pydicom.dcmread(got[ds.SOPInstanceUID])
    assert back == pydicom.dcmread(io.BytesIO(stored_objects(shared)[ds.SOPInstanceUID]))
    assert back.PixelData == ds.PixelData


@pytest.mark.timeout(180)
def test_node_killed_mid_ingest_lost_nothing_itacknowledged(nodes: list[ServerProcess], tmp_path: Path):
    """Runs last in the module: node A does not come back."""
    a, b = nodes
    before = a.index_query("SELECT count(*) FROM instance")[0][0]
    uid_of: dict[str, str] = {}
    studies: set[str] = set()
    senders = []
    for n in range(PARALLEL):
        paths = write_series(tmp_path / f"s{n}", PER_SENDER, patient_id="KILLED", size=16)
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid_of[str(path)] = str(ds.SOPInstanceUID)
        studies.add(str(ds.StudyInstanceUID))
        senders.append(
            subprocess.Popen(
                [dcmtk("storescu"), "-v", *a.dicom_args(), *map(str, paths)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while a.index_query("SELECT count(*) FROM instance")[0][0] == before and time.monotonic() < deadline:
        time.sleep(0.05)  # kill once ingest is under way
    time.sleep(0.3)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    acked: set[str] = set()
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        acked |= acknowledged(out, uid_of)
    assert acked, "nothing was acknowledged before the kill: the test proved nothing"
    assert len(acked) < len(uid_of), "every transfer finished before the kill: the test proved nothing; kill earlier"
    found: dict[str, Path] = {}
    for n, study in enumerate(sorted(studies)):
        found |= get_study(b, tmp_path / f"get{n}", study)
    lost = acked - set(found)
    assert not lost, f"{len(lost)} acknowledged instances are not on node B"
