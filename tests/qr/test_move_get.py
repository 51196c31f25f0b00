"""C-MOVE and C-GET SCP against real peers: DCMTK movescu/getscu/storescp, pynetdicom test peers (issue 3)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import dataset_bytes, free_port, run_tool
from tests.qr.conftest import (
    CT_SERIES,
    CT_STUDY,
    MR_STUDY,
    c_store,
    corrupt_j2k,
    macpacs,
    received,
    storescp,
)

SERIES_KEY = f"SeriesInstanceUID={CT_SERIES}"


@pytest.fixture(scope="module")
def dest(loaded) -> Iterator[Path]:
    """DCMTK storescp accepting every transfer syntax, registered as node DEST."""
    server, _sources, base = loaded
    out = base / "dest"
    with storescp(out, "DEST", "+xa", "+B") as port:
        macpacs("nodes", "add", "DEST", "--ae-title", "DEST", "--host", "127.0.0.1", "--port", str(port),
                data_dir=server.data_dir)  # fmt: skip
        yield out


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def uids_of(sources: dict[str, Path], study: str) -> set[str]:
    return {uid for uid, p in sources.items() if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study}


def assert_identical(out: Path, sources: dict[str, Path], expected: set[str]) -> None:
    got = received(out)
    assert set(got) == expected
    for uid in expected:
        assert dataset_bytes(got[uid]) == dataset_bytes(sources[uid]), f"{uid} differs from what was stored"


def first_ct(sources: dict[str, Path]) -> str:
    return sorted(uids_of(sources, CT_STUDY))[0]


@pytest.mark.parametrize(
    ("model", "keys", "which"),
    [
        ("-S", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={CT_STUDY}"], "ct"),
        ("-S", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={CT_STUDY}", f"SeriesInstanceUID={CT_SERIES}"], "ct"),
        ("-S", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={CT_STUDY}", f"SeriesInstanceUID={CT_SERIES}"], "one"),
        ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID=QR2"], "mr"),
        ("-P", ["QueryRetrieveLevel=STUDY", "PatientID=QR1", f"StudyInstanceUID={CT_STUDY}"], "ct"),
        ("-P", ["QueryRetrieveLevel=SERIES", "PatientID=QR1", f"StudyInstanceUID={CT_STUDY}", SERIES_KEY], "ct"),
        ("-P", ["QueryRetrieveLevel=IMAGE", "PatientID=QR1", f"StudyInstanceUID={CT_STUDY}", SERIES_KEY], "one"),
    ],
)
def test_movescu_every_level_byte_for_byte(loaded, dest, model, keys, which):
    server, sources, _base = loaded
    fresh(dest)
    expected = {"ct": uids_of(sources, CT_STUDY), "mr": uids_of(sources, MR_STUDY)}.get(which)
    if which == "one":
        keys = [*keys, f"SOPInstanceUID={first_ct(sources)}"]
        expected = {first_ct(sources)}
    args = [model, "-v", "-aem", "DEST", *server.dicom_args()]
    for key in keys:
        args += ["-k", key]
    proc = run_tool("movescu", *args)
    assert "Final Move Response (Success)" in proc.stdout + proc.stderr
    assert_identical(dest, sources, expected)


def test_compressed_files_keep_their_transfer_syntax(loaded, dest):
    """J2K and RLE go out as stored when the destination accepts them (storescp +xa)."""
    server, sources, _base = loaded
    fresh(dest)
    compressed = {
        uid
        for uid, p in sources.items()
        if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    }
    assert len(compressed) == 2
    for uid in compressed:
        run_tool("movescu", "-S", "-aem", "DEST", *server.dicom_args(), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={pydicom.dcmread(sources[uid]).StudyInstanceUID}")  # fmt: skip
    assert_identical(dest, sources, compressed)


def test_getscu_byte_for_byte(loaded, tmp_path):
    server, sources, _base = loaded
    out = fresh(tmp_path / "get")
    proc = run_tool("getscu", "-S", "-v", "-od", str(out), *server.dicom_args(),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={CT_STUDY}")  # fmt: skip
    assert "Final Get Response (Success)" in proc.stdout + proc.stderr or len(list(out.iterdir())) == 5
    assert_identical(out, sources, uids_of(sources, CT_STUDY))
    out = fresh(tmp_path / "get2")
    run_tool("getscu", "-P", "-od", str(out), *server.dicom_args(), "-k", "QueryRetrieveLevel=PATIENT",
             "-k", "PatientID=QR2")  # fmt: skip
    assert_identical(out, sources, uids_of(sources, MR_STUDY))


# -- statuses for bad input --------------------------------------------------------------------
def test_getscu_of_a_long_list_of_uids(loaded, tmp_path):
    """A workstation retrieving the images it selected sends a list of SOP Instance UIDs (PS3.4
    C.2.2.2.2): 40 of them, longer than any other matching value may be, still match."""
    server, sources, _base = loaded
    wanted = sorted(uids_of(sources, CT_STUDY))[:4]
    listed = "\\".join([*wanted, *(generate_uid() for _ in range(36))])
    assert len(listed) > 2000
    out = fresh(tmp_path / "get-list")
    run_tool("getscu", "-S", "-od", str(out), *server.dicom_args(), "-k", "QueryRetrieveLevel=IMAGE",
             "-k", f"StudyInstanceUID={CT_STUDY}", "-k", SERIES_KEY, "-k", f"SOPInstanceUID={listed}")  # fmt: skip
    assert_identical(out, sources, set(wanted))


def move(port: int, destination: str, identifier: Dataset, model=StudyRootQueryRetrieveInformationModelMove,
         cancel_after: int | None = None) -> list[Dataset]:  # fmt: skip
    """C-MOVE with pynetdicom as an outside client; returns every response (status + identifier elements)."""
    ae = AE(ae_title="TESTSCU")
    assoc = ae.associate("127.0.0.1", port, [build_context(model)], ae_title="MACPACS")
    assert assoc.is_established
    statuses = []
    try:
        for n, (status, ds) in enumerate(assoc.send_c_move(identifier, destination, model, msg_id=7), 1):
            if ds is not None:
                status.update(ds)
            statuses.append(status)
            if cancel_after is not None and n == cancel_after:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    return statuses


def study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def counts(status: Dataset) -> tuple[int, int, int]:
    return (
        int(status.get("NumberOfCompletedSuboperations", 0)),
        int(status.get("NumberOfFailedSuboperations", 0)),
        int(status.get("NumberOfWarningSuboperations", 0)),
    )


def test_unknown_destination_is_a801(loaded):
    server, _sources, _base = loaded
    statuses = move(server.dicom_port, "NOBODY", study_identifier(CT_STUDY))
    assert statuses[-1].Status == 0xA801
    assert server.logged("destination 'NOBODY' is not a registered node")


def test_missing_unique_key_is_a900(loaded, dest):
    server, _sources, _base = loaded
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = CT_STUDY
    ds.SeriesInstanceUID = ""
    statuses = move(server.dicom_port, "DEST", ds)
    assert statuses[-1].Status == 0xA900
    ds.SeriesInstanceUID = "1.2.*"
    assert move(server.dicom_port, "DEST", ds)[-1].Status == 0xA900
    assert server.logged("needs SeriesInstanceUID")


def test_identifier_matching_nothing_succeeds_with_no_suboperations(loaded, dest):
    server, _sources, _base = loaded
    fresh(dest)
    statuses = move(server.dicom_port, "DEST", study_identifier("1.2.3.999"))
    assert statuses[-1].Status == 0x0000
    assert counts(statuses[-1]) == (0, 0, 0)
    assert not list(dest.iterdir())
    assert server.logged("the identifier matches nothing")


def test_pending_responses_carry_counts(loaded, dest):
    server, _sources, _base = loaded
    statuses = move(server.dicom_port, "DEST", study_identifier(CT_STUDY))
    pending = [s for s in statuses if s.Status == 0xFF00]
    assert pending, "at least the first sub-operation is reported as pending"
    first = pending[0]
    assert int(first.NumberOfRemainingSuboperations) + sum(counts(first)) == 5
    assert statuses[-1].Status == 0 and counts(statuses[-1]) == (5, 0, 0)


def test_conversion_when_destination_refuses_compression(loaded, tmp_path):
    """storescp without +xa accepts only uncompressed: J2K/RLE are decompressed, a broken one fails."""
    server, sources, _base = loaded
    broken = corrupt_j2k(tmp_path / "broken")
    c_store(server.dicom_port, [broken])
    broken_ds = pydicom.dcmread(broken, stop_before_pixels=True)
    out = tmp_path / "plain"
    with storescp(out, "PLAIN") as port:
        macpacs("nodes", "add", "PLAIN", "--ae-title", "PLAIN", "--host", "127.0.0.1", "--port", str(port),
                data_dir=server.data_dir)  # fmt: skip
        for name in ("JPEG2000.dcm", "SC_rgb_rle.dcm"):
            uid = next(u for u, p in sources.items() if p.name == name)
            study = pydicom.dcmread(sources[uid], stop_before_pixels=True).StudyInstanceUID
            final = move(server.dicom_port, "PLAIN", study_identifier(study))[-1]
            assert final.Status == 0, name
            got = pydicom.dcmread(received(out)[uid])
            assert not got.file_meta.TransferSyntaxUID.is_compressed
            assert np.array_equal(got.pixel_array, pydicom.dcmread(sources[uid]).pixel_array)
        final = move(server.dicom_port, "PLAIN", study_identifier(broken_ds.StudyInstanceUID))[-1]
    assert final.Status == 0xA702  # all sub-operations failed
    assert counts(final) == (0, 1, 0)
    assert final.FailedSOPInstanceUIDList == broken_ds.SOPInstanceUID
    assert server.logged("cannot be converted")


def test_unreachable_destination_fails_every_suboperation(loaded):
    server, _sources, _base = loaded
    macpacs("nodes", "add", "DOWN", "--ae-title", "DOWN", "--host", "127.0.0.1", "--port", str(free_port()),
            data_dir=server.data_dir)  # fmt: skip
    final = move(server.dicom_port, "DOWN", study_identifier(CT_STUDY))[-1]
    assert final.Status == 0xA702
    assert counts(final) == (0, 5, 0)
    assert server.logged("connection refused")


class PeerScp:
    """A pynetdicom Storage SCP test peer that can abort after some stores, or be slow."""

    def __init__(self, ae_title: str, abort_after: int | None = None, delay: float = 0.0) -> None:
        self.stored: list[str] = []
        self.associations = 0
        self.abort_after, self.delay = abort_after, delay
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_ACCEPTED, self.on_accepted)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def on_accepted(self, _event) -> None:
        self.associations += 1

    def on_store(self, event) -> int:
        if self.abort_after is not None and len(self.stored) >= self.abort_after:
            threading.Thread(target=event.assoc.abort).start()
            time.sleep(0.2)
            return 0xA700
        time.sleep(self.delay)
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer(loaded):
    made: list[PeerScp] = []

    def factory(name: str, **kwargs) -> PeerScp:
        server = loaded[0]
        p = PeerScp(name, **kwargs)
        made.append(p)
        macpacs("nodes", "add", name, "--ae-title", name, "--host", "127.0.0.1", "--port", str(p.port),
                data_dir=server.data_dir)  # fmt: skip
        return p

    yield factory
    for p in made:
        p.stop()
        macpacs("nodes", "remove", p.server.ae.ae_title, data_dir=loaded[0].data_dir, check=False)


def test_destination_aborting_halfway(loaded, peer):
    server, sources, _base = loaded
    peer("ABORTER", abort_after=2)
    final = move(server.dicom_port, "ABORTER", study_identifier(CT_STUDY))[-1]
    assert final.Status == 0xB000
    assert counts(final) == (2, 3, 0)
    assert server.logged("ended the association after 2 of 5")
    # The archive is untouched: the same study can still be moved whole.
    p2 = peer("AFTER")
    final = move(server.dicom_port, "AFTER", study_identifier(CT_STUDY))[-1]
    assert final.Status == 0 and sorted(p2.stored) == sorted(uids_of(sources, CT_STUDY))


def test_cancel_stops_the_move(loaded, peer):
    server, _sources, _base = loaded
    p = peer("SLOW", delay=0.3)
    statuses = move(server.dicom_port, "SLOW", study_identifier(CT_STUDY), cancel_after=1)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert int(final.NumberOfRemainingSuboperations) > 0
    assert len(p.stored) < 5
    assert server.logged("cancelled")


def test_cancel_stops_a_get(loaded):
    server, _sources, _base = loaded
    ae = AE(ae_title="GETTER")
    model = StudyRootQueryRetrieveInformationModelGet
    ct = "1.2.840.10008.5.1.4.1.1.2"
    got: list[str] = []

    def on_store(event) -> int:
        time.sleep(0.3)
        got.append(event.request.AffectedSOPInstanceUID)
        return 0

    assoc = ae.associate("127.0.0.1", server.dicom_port, [build_context(model), build_context(ct)],
                         ae_title="MACPACS", ext_neg=[build_role(ct, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    assert assoc.is_established
    statuses = []
    for status, _ds in assoc.send_c_get(study_identifier(CT_STUDY), model, msg_id=9):
        statuses.append(status)
        if len(statuses) == 1:
            assoc.send_c_cancel(9, assoc.accepted_contexts[0].context_id)
    assoc.release()
    assert statuses[-1].Status == 0xFE00
    assert len(got) < 5


def tiny(sop_class: str, study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "MANY"
    ds.PatientName = "MANY^CLASSES"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "OT"
    return ds


def test_more_sop_classes_than_one_association_holds(loaded, peer, tmp_path):
    """140 SOP classes in one study: 280 contexts (stored syntax + uncompressed fallback), 3 associations."""
    server, _sources, _base = loaded
    study, series = generate_uid(), generate_uid()
    paths = []
    for n, cx in enumerate(AllStoragePresentationContexts[:140]):
        path = tmp_path / f"{n}.dcm"
        tiny(cx.abstract_syntax, study, series).save_as(path, enforce_file_format=True)
        paths.append(path)
    c_store(server.dicom_port, paths[:100])
    c_store(server.dicom_port, paths[100:])
    p = peer("MANY")
    final = move(server.dicom_port, "MANY", study_identifier(study))[-1]
    assert final.Status == 0, counts(final)
    assert counts(final) == (140, 0, 0)
    assert len(p.stored) == 140
    assert p.associations == 3


def test_destination_refusing_the_association(loaded):
    """A destination that rejects us (here our own listener, called with a wrong AE title)."""
    server, _sources, _base = loaded
    macpacs("nodes", "add", "REFUSER", "--ae-title", "NOTMACPACS", "--host", "127.0.0.1",
            "--port", str(server.dicom_port), data_dir=server.data_dir)  # fmt: skip
    final = move(server.dicom_port, "NOTMACPACS", study_identifier(CT_STUDY))[-1]
    assert final.Status == 0xA702
    assert counts(final) == (0, 5, 0)
    assert server.logged("rejected the association: its called AE title is not the one registered here")
