"""Orthanc as the remote PACS: our query/retrieve against it, and Orthanc querying and moving from us (issue 3).

Orthanc is started once for the module on loopback; it is driven through its REST API.
"""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import dataset_bytes
from tests.qr.conftest import CT_STUDY, MR_STUDY, OrthancPeer, macpacs
from tests.synthetic import write_series

REMOTE_STUDY = "1.2.826.0.1.3680043.8.498.2001"
REMOTE_STUDY_2 = "1.2.826.0.1.3680043.8.498.2002"


@pytest.fixture(scope="module")
def orthanc(loaded, tmp_path_factory) -> Iterator[tuple[OrthancPeer, dict]]:
    """Orthanc knowing us as modality "macpacs", holding two studies of its own; registered with us."""
    server, _sources, _base = loaded
    base = tmp_path_factory.mktemp("orthanc")
    peer = OrthancPeer(base / "orthanc", {"macpacs": [server.ae_title, "127.0.0.1", server.dicom_port]}).start()
    remote = write_series(base / "r1", 4, study_uid=REMOTE_STUDY, patient_id="REM1", patient_name="FAR^AWAY",
                          study_date="20230305", accession="RACC1", study_description="REMOTE CT", size=64)  # fmt: skip
    remote += write_series(base / "r2", 2, study_uid=REMOTE_STUDY_2, patient_id="REM2", patient_name="FAR^OTHER",
                           study_date="20190101", modality="MR", size=64)  # fmt: skip
    peer.upload(remote)
    macpacs("nodes", "add", "orthanc", "--ae-title", OrthancPeer.AET, "--host", "127.0.0.1",
            "--port", str(peer.dicom_port), data_dir=server.data_dir)  # fmt: skip
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in remote}
    yield peer, sources
    peer.stop()


def test_query_orthanc(loaded, orthanc):
    server, _sources, _base = loaded
    out = macpacs("query", "orthanc", "--patient-name", "FAR*", "--date", "20230101-", data_dir=server.data_dir).stdout
    assert REMOTE_STUDY in out and REMOTE_STUDY_2 not in out
    assert "FAR^AWAY" in out and "RACC1" in out and "REMOTE CT" in out
    assert "1 studies found on orthanc" in out
    out = macpacs("query", "orthanc", "--modality", "MR", data_dir=server.data_dir).stdout
    assert REMOTE_STUDY_2 in out and REMOTE_STUDY not in out
    out = macpacs("query", "orthanc", "--accession", "NOPE", data_dir=server.data_dir).stdout
    assert "0 studies found" in out


def test_retrieve_from_orthanc_by_c_get(loaded, orthanc):
    server, _sources, _base = loaded
    _peer, sources = orthanc
    out = macpacs("retrieve", "orthanc", "--study", REMOTE_STUDY_2, "--method", "get", data_dir=server.data_dir)
    assert "C-GET from orthanc: status 0x0000, 2 completed, 0 warning, 0 failed, 0 remaining" in out.stdout
    assert_stored(server, sources, REMOTE_STUDY_2)


def test_retrieve_from_orthanc_by_c_move_to_us(loaded, orthanc):
    server, _sources, _base = loaded
    _peer, sources = orthanc
    out = macpacs("retrieve", "orthanc", "--study", REMOTE_STUDY, data_dir=server.data_dir)
    assert "C-MOVE from orthanc: status 0x0000, 4 completed, 0 warning, 0 failed, 0 remaining" in out.stdout
    assert_stored(server, sources, REMOTE_STUDY)


def test_retrieve_to_an_unknown_destination_explains(loaded, orthanc):
    server, _sources, _base = loaded
    proc = macpacs("retrieve", "orthanc", "--study", REMOTE_STUDY, "--destination", "NOBODY",
                   data_dir=server.data_dir, check=False)  # fmt: skip
    assert proc.returncode == 1
    # Orthanc answers 0xC000 (unable to process) rather than 0xA801 for a destination it does not know.
    assert "check that orthanc knows the destination NOBODY as a DICOM node" in proc.stderr


def assert_stored(server, sources: dict, study_uid: str) -> None:
    """Every instance of the study is in our store, with the dataset Orthanc had."""
    from macpacs.pacs_server.storage import blob_key

    expected = {
        u for u, p in sources.items() if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study_uid
    }
    for uid in expected:
        stored = server.data_dir / "files" / blob_key(uid)
        assert stored.is_file(), f"{uid} was not stored"
        assert dataset_bytes(stored) == dataset_bytes(sources[uid])


def test_orthanc_queries_us(loaded, orthanc):
    peer, _sources = orthanc
    answer = peer.rest("POST", "/modalities/macpacs/query", {"Level": "Study", "Query": {"PatientID": "QR*"}})
    found = peer.rest("GET", f"/queries/{answer['ID']}/answers?expand&simplify")
    uids = {a["StudyInstanceUID"] for a in found}
    assert uids == {CT_STUDY, MR_STUDY}


def test_orthanc_moves_from_us_to_itself(loaded, orthanc):
    peer, _sources = orthanc
    assert peer.study_instances(CT_STUDY) == 0
    peer.rest(
        "POST",
        "/modalities/macpacs/move",
        {"Level": "Study", "Resources": [{"StudyInstanceUID": CT_STUDY}], "TargetAet": OrthancPeer.AET},
    )
    assert peer.study_instances(CT_STUDY) == 5
    server = loaded[0]
    assert server.logged("C-MOVE to orthanc done: 5 completed, 0 warning, 0 failed")


def test_orthanc_move_to_unknown_destination_fails(loaded, orthanc):
    peer, _sources = orthanc
    import requests

    with pytest.raises(requests.HTTPError):
        peer.rest(
            "POST",
            "/modalities/macpacs/move",
            {"Level": "Study", "Resources": [{"StudyInstanceUID": MR_STUDY}], "TargetAet": "UNKNOWNAE"},
        )
    assert peer.study_instances(MR_STUDY) == 0
    assert "destination 'UNKNOWNAE' is not a registered node" in loaded[0].log()


def test_send_to_orthanc(loaded, orthanc):
    server, _sources, base = loaded
    peer, _ = orthanc
    study = generate_uid()
    from tests.qr.conftest import c_store

    c_store(server.dicom_port, write_series(base / "tosend", 3, study_uid=study, size=32))
    out = macpacs("send", "orthanc", "--study", study, data_dir=server.data_dir).stdout
    assert "sent to orthanc: 3 completed" in out
    assert peer.study_instances(study) == 3
