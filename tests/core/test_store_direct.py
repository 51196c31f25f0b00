"""C-STOREs after the first of an association are read off the socket by store_scp (issue 2).

These check what that fast path must keep from pynetdicom's: the same files, the same
statuses and comments, other services and the release still served on the same association,
and nothing left behind by an abort in the middle of a dataset.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from macpacs.pacs_server.storage import blob_key
from tests.conftest import dcmtk, run_tool
from tests.synthetic import make_instance, write_series


def _rows(server) -> int:
    con = sqlite3.connect(server.data_dir / "index.sqlite")
    try:
        return con.execute("SELECT count(*) FROM instance").fetchone()[0]
    finally:
        con.close()


def test_mixed_services_on_one_association(server, tmp_path):
    """store, store, echo, store (invalid), find, store, release: each answered as pynetdicom would."""
    paths = write_series(tmp_path / "ct", 3, size=32)
    datasets = [pydicom.dcmread(p) for p in paths]
    bad = pydicom.dcmread(paths[0])
    bad.SOPInstanceUID = "1.2.abc"  # not a UID: refused with 0xA900 and a comment
    ae = AE(ae_title="MIXED")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(datasets[0]).Status == 0x0000
        assert assoc.send_c_store(datasets[1]).Status == 0x0000  # read directly
        assert assoc.send_c_echo().Status == 0x0000  # handed back to pynetdicom
        refused = assoc.send_c_store(bad)
        assert refused.Status == 0xA900
        assert "SOPInstanceUID" in refused.ErrorComment
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = datasets[0].StudyInstanceUID
        found = [ident for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assert found[0] is not None and found[0].StudyInstanceUID == datasets[0].StudyInstanceUID
        assert assoc.send_c_store(datasets[2]).Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    assert _rows(server) == 3
    for path, ds in zip(paths, datasets, strict=True):
        stored = server.data_dir / "files" / blob_key(ds.SOPInstanceUID)
        assert stored.read_bytes().endswith(path.read_bytes()[-1000:])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "association released by MIXED" not in server.log():
        time.sleep(0.05)
    assert server.logged("3 stored") and server.logged("1 invalid")


def test_abort_in_a_directly_read_dataset_leaves_nothing(server, tmp_path):
    """storescu killed while sending its second instance (read by store_scp): only the first is kept."""
    first = write_series(tmp_path / "small", 1, size=32)[0]
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=2, size=512)
    ds.Rows = ds.Columns = 8192
    ds.PixelData = np.zeros((8192, 8192), dtype=np.int16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    proc = subprocess.Popen(
        [dcmtk("storescu"), *server.dicom_args(), str(first), str(big)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp_dir = server.data_dir / "tmp"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (_rows(server) == 1 and any(tmp_dir.iterdir())):
        time.sleep(0.005)  # the first is stored and the second is arriving
    server.kill_client_mid_transfer(proc)
    assert _rows(server) == 1
    assert len(list((server.data_dir / "files").rglob("*.dcm"))) == 1
    run_tool("echoscu", *server.dicom_args())  # still serving
