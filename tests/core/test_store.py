"""C-ECHO and C-STORE against a real server, with DCMTK as the client (issue 2)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from macpacs.pacs_server.storage import blob_key
from tests.conftest import both_indexes, dataset_bytes, dcmtk, findscu, free_port, run_tool, wait_for_port
from tests.synthetic import make_instance, write_series

# storescu's flag that proposes a file's own transfer syntax (DCMTK 3.6.7 proposes few by default).
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def index_rows(server, table: str = "instance") -> int:
    return server.index_query(f"SELECT count(*) FROM {table}")[0][0]  # table name is a test constant


def stored_path(server, sop_uid: str) -> Path:
    return server.data_dir / "files" / blob_key(sop_uid)


def test_echo(server):
    proc = run_tool("echoscu", "-v", *server.dicom_args())
    assert "Received Echo Response (Success)" in proc.stderr + proc.stdout
    assert server.logged("association accepted from ECHOSCU@127.0.0.1")


def test_wrong_called_ae_is_rejected(server):
    proc = run_tool("echoscu", "-aec", "NOTUS", "127.0.0.1", str(server.dicom_port), check=False)
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr


@pytest.fixture
def reference_scp(tmp_path):
    """DCMTK storescp in bit-preserving mode: records exactly what storescu put on the wire."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "+B", "+xa", "-uf", "-od", str(out), "-aet", "REFSCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    yield port, out
    proc.terminate()
    proc.wait()


def test_every_pydicom_file_stored_byte_for_byte(make_server, pydicom_test_files, reference_scp, tmp_path):
    """Every file DCMTK can send arrives unchanged: same transfer syntax, same dataset bytes.

    storescu re-encodes what it reads (group lengths, padding), so the reference for "what was
    sent" is DCMTK's own storescp in bit-preserving mode, fed by the same storescu command.
    Several pydicom files share a SOP Instance UID (one image in several encodings), so the
    server runs with on_conflict = overwrite and each file is checked right after it is sent.
    Files without Study/Series UIDs must be refused; a copy with UIDs added is then stored.
    """
    ref_port, ref_dir = reference_scp
    server = make_server(env={"MACPACS_STORAGE_ON_CONFLICT": "overwrite"})
    checked, syntaxes, refused_by_dcmtk, refused_by_us = 0, set(), [], []

    def send_and_compare(path: Path, ds: pydicom.Dataset) -> None:
        nonlocal checked
        ts = str(ds.file_meta.TransferSyntaxUID)
        uid = str(ds.SOPInstanceUID)
        proc = run_tool("storescu", "-v", "-R", PROPOSE[ts], *server.dicom_args(), str(path))
        assert "Received Store Response (Success)" in proc.stderr, f"{path.name}: {proc.stderr}"
        run_tool("storescu", "-R", PROPOSE[ts], "-aec", "REFSCP", "127.0.0.1", str(ref_port), str(path))
        [reference] = ref_dir.glob(f"*{uid}*")
        stored = stored_path(server, uid)
        assert stored.is_file(), f"{path.name} acknowledged but not stored"
        assert dataset_bytes(stored) == dataset_bytes(reference), f"{path.name} changed on the way"
        assert str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        reference.unlink()
        checked += 1
        syntaxes.add(ts)

    for path in pydicom_test_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue  # not a Part-10 file: DCMTK refuses it too (the import test covers these)
        if all(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")):
            if (
                run_tool(
                    "storescu", "-R", PROPOSE[ts], "-aec", "REFSCP", "127.0.0.1", str(ref_port), str(path), check=False
                ).returncode
                != 0
            ):
                refused_by_dcmtk.append(path.name)
                continue
            next(ref_dir.iterdir()).unlink()
            send_and_compare(path, ds)
            continue
        # An instance we could never find again is refused, not silently half-indexed.
        proc = run_tool("storescu", "-v", "-R", PROPOSE[ts], *server.dicom_args(), str(path), check=False)
        if "Error: DataSetDoesNotMatchSOPClass" not in proc.stderr:
            assert "Received Store Response" not in proc.stderr, f"{path.name} was not refused"
            refused_by_dcmtk.append(path.name)
            continue
        refused_by_us.append(path.name)
        full = pydicom.dcmread(path)
        full.StudyInstanceUID = full.get("StudyInstanceUID") or generate_uid()
        full.SeriesInstanceUID = full.get("SeriesInstanceUID") or generate_uid()
        repaired = tmp_path / f"repaired-{path.name}"
        full.save_as(repaired)
        send_and_compare(repaired, full)

    assert checked >= 60, f"only {checked} files checked; DCMTK refused {refused_by_dcmtk}, we refused {refused_by_us}"
    assert set(PROPOSE) - syntaxes <= {"1.2.840.10008.1.2.4.57"}, "a transfer syntax was never exercised"
    assert server.log().count("StudyInstanceUID is missing") == len(refused_by_us) > 0


@both_indexes
def test_ct_series_and_resend_is_not_duplicated(server, tmp_path):
    paths = write_series(tmp_path / "ct", 20, size=256)
    run_tool("storescu", *server.dicom_args(), str(tmp_path / "ct"), "+sd")
    assert index_rows(server) == 20
    run_tool("storescu", *server.dicom_args(), str(tmp_path / "ct"), "+sd")
    assert index_rows(server) == 20
    assert server.logged("20 duplicate")
    for p in paths[:3]:
        uid = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored_path(server, uid)) == dataset_bytes(p)
    assert server.index_query("SELECT num_instances, num_series, modalities_in_study FROM study") == [(20, 1, "CT")]


def _changed_copy(original: Path, folder: Path) -> Path:
    ds = pydicom.dcmread(original)
    ds.StudyDescription = "CHANGED"
    out = folder / "changed.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("policy", ["keep", "overwrite"])
def test_conflicting_resend_follows_setting(make_server, tmp_path, policy):
    server = make_server(env={"MACPACS_STORAGE_ON_CONFLICT": policy})
    [original] = write_series(tmp_path / "one", 1, size=64)
    run_tool("storescu", *server.dicom_args(), str(original))
    changed = _changed_copy(original, tmp_path)
    run_tool("storescu", *server.dicom_args(), str(changed))
    uid = pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
    stored = pydicom.dcmread(stored_path(server, uid))
    expected = "CHANGED" if policy == "overwrite" else "CT CHEST"
    assert stored.StudyDescription == expected
    assert index_rows(server) == 1


def _send_raw(server, path: Path) -> int:
    """Send a file's bytes exactly as they are (pynetdicom streams it undecoded)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status)


def test_truncated_file_is_refused(server, tmp_path):
    from pydicom.data import get_testdata_file

    truncated = Path(get_testdata_file("MR_truncated.dcm"))
    assert _send_raw(server, truncated) == 0xC000
    assert index_rows(server) == 0
    assert not any((server.data_dir / "files").rglob("*.dcm"))
    assert server.logged("truncated file")


@pytest.mark.parametrize("bad_uid", ["../../etc/passwd", "1.2.3/4", "1.2\x00.3", "", "1.2." + "3" * 70])
def test_hostile_or_missing_uid_is_refused(server, tmp_path, bad_uid):
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size=16)
    path = tmp_path / "bad.dcm"
    if bad_uid:
        ds.SOPInstanceUID = bad_uid
        if len(bad_uid) <= 64:  # pynetdicom itself refuses to put a longer UID in a command
            ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    else:
        del ds.SOPInstanceUID
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)
    status = _send_raw(server, path)
    assert status == 0xA900
    assert index_rows(server) == 0
    assert not any((server.data_dir / "files").rglob("*.dcm"))
    assert not list(server.data_dir.rglob("passwd"))
    assert server.logged("C-STORE refused")


def test_abort_mid_transfer_leaves_nothing(server, tmp_path):
    """storescu killed while sending a 130 MB instance: nothing stored, no partial file left."""
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size=512)
    ds.Rows = ds.Columns = 8192
    ds.PixelData = np.zeros((8192, 8192), dtype=np.int16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    proc = subprocess.Popen(
        [dcmtk("storescu"), *server.dicom_args(), str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tmp_dir = server.data_dir / "tmp"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(tmp_dir.iterdir()):
        time.sleep(0.005)  # wait until the transfer has started
    server.kill_client_mid_transfer(proc)
    assert index_rows(server) == 0
    assert not any((server.data_dir / "files").rglob("*.dcm"))
    run_tool("echoscu", *server.dicom_args())  # still serving


def test_concurrent_associations(server, tmp_path):
    folders = []
    for n in range(4):
        write_series(tmp_path / f"s{n}", 15, size=64, patient_id=f"P{n}")
        folders.append(tmp_path / f"s{n}")
    errors: list[BaseException] = []

    def send(folder: Path) -> None:
        try:
            run_tool("storescu", *server.dicom_args(), str(folder), "+sd")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert index_rows(server) == 60
    assert index_rows(server, "patient") == 4


@both_indexes
def test_one_study_from_four_associations_at_once(server, tmp_path):
    """Slices of one series and a second series of the same study, dealt out to four associations:
    on PostgreSQL the writers run side by side on the same study, series and patient rows (they
    lock them in one order, so none deadlocks), and every instance is stored and counted."""
    study = generate_uid()
    paths = write_series(tmp_path / "a", 24, study_uid=study, size=16, patient_id="P1")
    paths += write_series(tmp_path / "b", 8, study_uid=study, size=16, patient_id="P1", modality="MR")
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = [
        subprocess.Popen(
            [dcmtk("storescu"), *server.dicom_args(), *map(str, paths[n::4])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert not any("OutOfResources" in out or "Failed" in out for out in outputs), outputs
    assert index_rows(server) == 32
    assert server.index_query("SELECT num_instances, num_series, modalities_in_study FROM study") == [(32, 2, "CT\\MR")]
    assert server.index_query("SELECT num_studies, num_series, num_instances FROM patient") == [(1, 2, 32)]


def test_restart_loses_nothing(make_server, tmp_path):
    server = make_server()
    write_series(tmp_path / "ct", 10, size=64)
    run_tool("storescu", *server.dicom_args(), str(tmp_path / "ct"), "+sd")
    assert server.stop() == 0
    assert server.logged("macpacs stopped")
    assert not server.pid_file_path().exists()
    server.start()
    found = findscu(server, tmp_path / "rsp", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "StudyInstanceUID")
    assert len(found) == 10
