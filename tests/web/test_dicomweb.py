"""DICOMweb with the dicomweb-client library against a real server loaded by DCMTK storescu.

Everything is checked against the stored files (and the originals) byte for byte.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file

from tests.conftest import dataset_bytes

from .conftest import Loaded, get, start_server, uids


@pytest.fixture(scope="module")
def client(loaded: Loaded) -> DICOMwebClient:
    return DICOMwebClient(url=loaded.dicomweb)


def test_qido_levels_nested_and_includefield(loaded: Loaded, client: DICOMwebClient):
    study, series, _sop = uids(loaded.series_dir / "00001.dcm")
    found = client.search_for_studies(search_filters={"PatientName": "web^t*"})  # fuzzy by default setting
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "WEB^TEST"
    assert found[0]["00201208"]["Value"] == [5]
    assert found[0]["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study}")
    assert client.search_for_studies(search_filters={"PatientName": "web^t*"}, fuzzymatching=False) == []
    assert len(client.search_for_series(study)) == 1
    assert {i["00080018"]["Value"][0] for i in client.search_for_instances(study, series)} == {
        uids(p)[2] for p in loaded.series_dir.glob("*.dcm")
    }
    assert len(client.search_for_instances(study)) == 5
    everywhere = client.search_for_series(search_filters={"SeriesInstanceUID": series})
    assert everywhere[0]["0020000D"]["Value"] == [study]
    page = client.search_for_instances(study, series, limit=2, offset=1)
    assert len(page) == 2
    all_fields = client.search_for_instances(study, series, fields=["all"], limit=1)
    assert all_fields[0]["00100020"]["Value"] == ["WEB001"]  # patient attribute included by 'all'
    by_tag = get(f"{loaded.dicomweb}/studies", params={"00080050": "WACC1", "includefield": "00081030"}).json()
    assert len(by_tag) == 1 and by_tag[0]["00081030"]["Value"] == ["CT CHEST"]
    assert len(client.search_for_studies(search_filters={"StudyDate": "20240101-20241231"})) >= 1


def test_qido_bad_input(loaded: Loaded):
    assert get(f"{loaded.dicomweb}/studies", params={"StudyDate": "2024-01-01-02"}).status_code == 400
    assert get(f"{loaded.dicomweb}/studies", params={"NoSuchKeyword": "x"}).status_code == 400
    assert get(f"{loaded.dicomweb}/studies", params={"limit": "-1"}).status_code == 400
    assert get(f"{loaded.dicomweb}/studies/..%2F..%2Fetc/series").status_code in (400, 404)
    r = get(f"{loaded.dicomweb}/studies", params={"ImageComments": "x"})  # not in the index: ignored, said so
    assert r.status_code == 200 and "ImageComments" in r.headers["warning"]


def test_wado_rs_instances_are_the_stored_files(loaded: Loaded, client: DICOMwebClient):
    study, series, _ = uids(loaded.series_dir / "00001.dcm")
    for name, original in loaded.files.items():
        st, se, sop = uids(original)
        ds = client.retrieve_instance(st, se, sop)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert str(ds.SOPInstanceUID) == sop, name
        # The raw part is the stored file byte for byte (checked below over plain HTTP).
    retrieved = client.retrieve_series(study, series)
    assert len(retrieved) == 5
    # Raw multipart: each part is exactly the stored file.
    r = get(
        f"{loaded.dicomweb}/studies/{study}/series/{series}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200
    boundary = r.headers["content-type"].split("boundary=")[1]
    parts = [p for p in r.content.split(f"--{boundary}".encode()) if p not in (b"", b"--\r\n")]
    assert len(parts) == 5
    for part in parts:
        head, _, body = part.partition(b"\r\n\r\n")
        body = body[:-2]  # the CRLF before the next boundary
        sop = str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
        assert body == loaded.stored_path(sop).read_bytes()
        assert b"Content-Location:" in head
    assert get(f"{loaded.dicomweb}/studies/{study}").status_code == 200


def test_wado_rs_decompresses_on_request(loaded: Loaded, client: DICOMwebClient):
    st, se, sop = uids(loaded.files["MR_small_RLE.dcm"])
    ds = client.retrieve_instance(st, se, sop, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    original = pydicom.dcmread(loaded.files["MR_small_RLE.dcm"])
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    r = get(
        f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'},
    )
    assert r.status_code == 406


def test_metadata_from_cache_matches_files(loaded: Loaded, client: DICOMwebClient):
    study, series, _ = uids(loaded.series_dir / "00001.dcm")
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 5
    numbers = [m["00200013"]["Value"][0] for m in metadata]
    assert numbers == [1, 2, 3, 4, 5]
    first = metadata[0]
    original = pydicom.dcmread(loaded.series_dir / "00001.dcm")
    assert first["00100010"]["Value"][0]["Alphabetic"] == str(original.PatientName)
    uri = first["7FE00010"]["BulkDataURI"]
    assert uri.startswith(loaded.dicomweb)
    bulk = client.retrieve_bulkdata(uri)
    assert bulk[0] == original.PixelData
    one = client.retrieve_instance_metadata(study, series, str(original.SOPInstanceUID))
    assert one["00080018"]["Value"] == [str(original.SOPInstanceUID)]
    assert len(client.retrieve_study_metadata(study)) == 5


def test_frames_stored_and_uncompressed(loaded: Loaded, client: DICOMwebClient):
    # native: the frame is the pixel data itself
    st, se, sop = uids(loaded.series_dir / "00003.dcm")
    frame = client.retrieve_instance_frames(st, se, sop, frame_numbers=[1])[0]
    assert frame == pydicom.dcmread(loaded.series_dir / "00003.dcm").PixelData
    # JPEG 2000: transfer-syntax=* returns the codestream as stored, otherwise decoded pixels
    original = pydicom.dcmread(loaded.files["JPEG2000.dcm"])
    st, se, sop = uids(loaded.files["JPEG2000.dcm"])
    stored = client.retrieve_instance_frames(
        st, se, sop, frame_numbers=[1], media_types=(("application/octet-stream", "*"),)
    )[0]
    assert stored == pydicom.encaps.get_frame(original.PixelData, 0, number_of_frames=1)
    decoded = client.retrieve_instance_frames(st, se, sop, frame_numbers=[1])[0]
    assert decoded == original.pixel_array.astype("<i2" if original.PixelRepresentation else "<u2").tobytes()
    # multi-frame JPEG: frames 2 and 30
    multi = pydicom.dcmread(loaded.files["examples_ybr_color.dcm"])
    st, se, sop = uids(loaded.files["examples_ybr_color.dcm"])
    got = client.retrieve_instance_frames(
        st, se, sop, frame_numbers=[2, 30], media_types=(("application/octet-stream", "*"),)
    )
    assert got == [pydicom.encaps.get_frame(multi.PixelData, i, number_of_frames=30) for i in (1, 29)]
    r = get(f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/31")
    assert r.status_code == 404
    assert get(f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/x,1").status_code == 400


def test_rendered_and_thumbnails(loaded: Loaded):
    for name in loaded.files:
        st, se, sop = uids(loaded.files[name])
        r = get(f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/rendered")
        assert r.status_code == 200, (name, r.text)
        assert r.headers["content-type"] == "image/jpeg"
        Image.open(io.BytesIO(r.content)).verify()
        png = get(
            f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/rendered",
            headers={"Accept": "image/png"},
            params={"viewport": "32,32"},
        )
        assert png.headers["content-type"] == "image/png"
        assert max(Image.open(io.BytesIO(png.content)).size) == 32
        thumb = get(f"{loaded.dicomweb}/studies/{st}/series/{se}/thumbnail")
        assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    st, se, sop = uids(loaded.files["examples_ybr_color.dcm"])
    assert get(f"{loaded.dicomweb}/studies/{st}/series/{se}/instances/{sop}/frames/5/rendered").status_code == 200
    assert get(f"{loaded.dicomweb}/studies/{st}/thumbnail").status_code == 200


def test_unknown_uids_are_404(loaded: Loaded):
    study, series, _sop = uids(loaded.series_dir / "00001.dcm")
    for path in (
        "/studies/1.2.3.4",
        "/studies/1.2.3.4/metadata",
        f"/studies/{study}/series/1.2.3/metadata",
        f"/studies/{study}/series/{series}/instances/1.2.3",
        f"/studies/{study}/series/{series}/instances/1.2.3/frames/1",
        f"/studies/{study}/series/{series}/instances/1.2.3/rendered",
        "/studies/1.2.3/thumbnail",
    ):
        assert get(loaded.dicomweb + path).status_code == 404, path
    for bad in ("..", "1.2.3;DROP", "1..2", "x" * 70):
        assert get(f"{loaded.dicomweb}/studies/{bad}/metadata").status_code in (400, 404), bad


def test_stow_through_the_ingest_path(loaded: Loaded, client: DICOMwebClient, tmp_path):
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    src.StudyInstanceUID = pydicom.uid.generate_uid()
    src.SeriesInstanceUID = pydicom.uid.generate_uid()
    result = client.store_instances([src])
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "FailedSOPSequence" not in result
    back = client.retrieve_instance(str(src.StudyInstanceUID), str(src.SeriesInstanceUID), str(src.SOPInstanceUID))
    assert back.PixelData == src.PixelData
    path = tmp_path / "sent.dcm"
    src.save_as(path, enforce_file_format=True)
    assert dataset_bytes(loaded.stored_path(str(src.SOPInstanceUID))) == dataset_bytes(path)
    # same instance again: accepted as a duplicate
    assert "ReferencedSOPSequence" in client.store_instances([src])


def test_stow_partial_failure_and_study_mismatch(loaded: Loaded, client: DICOMwebClient):
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    boundary = "XXbound"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + _bytes(good)
        + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + b"this is not DICOM at all"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    r = requests.post(f"{loaded.dicomweb}/studies", data=body, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]
    assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert "not a DICOM" in r.headers["warning"] or "DICOM" in r.headers["warning"]
    # an instance posted to another study's URL is refused and not stored
    other = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + _bytes(other)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = requests.post(f"{loaded.dicomweb}/studies/1.2.3.4", data=body, headers=headers, timeout=30)
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert not loaded.stored_path(str(other.SOPInstanceUID)).exists()


def test_stow_bad_bodies(loaded: Loaded):
    url = f"{loaded.dicomweb}/studies"
    mp = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=abc'}
    assert requests.post(url, data=b"--abc\r\nContent-Type: application/dicom\r\n\r\nxx", headers=mp).status_code == 400
    assert requests.post(url, data=b"garbage", headers=mp).status_code == 400
    assert requests.post(url, data=b"x", headers={"Content-Type": "application/dicom"}).status_code == 415
    no_boundary = {"Content-Type": 'multipart/related; type="application/dicom"'}
    assert requests.post(url, data=b"x", headers=no_boundary).status_code == 400
    json_parts = {"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=abc'}
    assert requests.post(url, data=b"x", headers=json_parts).status_code == 415
    assert not list((loaded.server.data_dir / "tmp").glob("*.part"))  # nothing left behind


def test_wado_uri(loaded: Loaded):
    st, se, sop = uids(loaded.files["CT_small.dcm"])
    params = {"requestType": "WADO", "studyUID": st, "seriesUID": se, "objectUID": sop}
    dicom = get(f"{loaded.base}/wado", params={**params, "contentType": "application/dicom"})
    assert dicom.status_code == 200 and dicom.content == loaded.stored_path(sop).read_bytes()
    jpeg = get(f"{loaded.base}/wado", params=params)
    assert jpeg.headers["content-type"] == "image/jpeg"
    small = get(f"{loaded.base}/wado", params={**params, "contentType": "image/png", "rows": 32, "columns": 32})
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)
    narrow = get(
        f"{loaded.base}/wado", params={**params, "contentType": "image/png", "windowCenter": 0, "windowWidth": 10}
    )
    wide = get(f"{loaded.base}/wado", params={**params, "contentType": "image/png"})
    assert narrow.content != wide.content
    st2, se2, sop2 = uids(loaded.files["JPEG2000.dcm"])
    p2 = {
        "requestType": "WADO",
        "studyUID": st2,
        "seriesUID": se2,
        "objectUID": sop2,
        "contentType": "application/dicom",
    }
    raw = get(f"{loaded.base}/wado", params={**p2, "transferSyntax": "1.2.840.10008.1.2.1"})
    assert pydicom.dcmread(io.BytesIO(raw.content)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert get(f"{loaded.base}/wado", params={**params, "requestType": "XYZ"}).status_code == 400
    assert get(f"{loaded.base}/wado", params={**params, "objectUID": "../../etc/passwd"}).status_code == 400
    assert get(f"{loaded.base}/wado", params={**params, "objectUID": "1.2.3"}).status_code == 404
    assert get(f"{loaded.base}/wado", params={**params, "contentType": "text/html"}).status_code == 406


def test_rendering_looks_right(loaded: Loaded):
    """MONOCHROME1 is the inverse of the same pixels as MONOCHROME2; colour stays colour."""

    def png(name: str) -> np.ndarray:
        st, se, sop = uids(loaded.files[name])
        r = get(
            f"{loaded.base}/wado",
            params={
                "requestType": "WADO",
                "studyUID": st,
                "seriesUID": se,
                "objectUID": sop,
                "contentType": "image/png",
            },
        )
        assert r.status_code == 200, (name, r.text)
        return np.asarray(Image.open(io.BytesIO(r.content)))

    mono2, mono1 = png("CT_small.dcm"), png("mono1.dcm")
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "examples_palette.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        image = png(name)
        assert image.ndim == 3 and image.shape[2] == 3, name
    # RGB RLE is lossless: the rendering is the pixel data itself
    original = pydicom.dcmread(loaded.files["SC_rgb_rle.dcm"]).pixel_array
    assert np.array_equal(png("SC_rgb_rle.dcm"), original)
    # YBR comes out as RGB (pydicom converts while decoding), not as raw YBR values
    rgb = pydicom.dcmread(loaded.files["SC_ybr_full_422_uncompressed.dcm"]).pixel_array
    assert np.abs(png("SC_ybr_full_422_uncompressed.dcm").astype(int) - rgb.astype(int)).max() <= 2


def _bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_upload_limit_and_cors(tmp_path):
    server = start_server(
        tmp_path / "data",
        env={"MACPACS_WEB_MAX_UPLOAD_MB": "1", "MACPACS_WEB_CORS_ORIGINS": "https://viewer.example.org"},
    )
    base = f"http://127.0.0.1:{server.web_port}/dicom-web"
    try:
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=abc'}
        big = b"--abc\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * (2 << 20) + b"\r\n--abc--\r\n"
        r = requests.post(f"{base}/studies", data=big, headers=headers, timeout=30)
        assert r.status_code == 413 and "max_upload_mb" in r.text

        def chunks():  # no Content-Length: the limit holds while streaming too
            yield big[: 1 << 20]
            yield big[1 << 20 :]

        r = requests.post(f"{base}/studies", data=chunks(), headers=headers, timeout=30)
        assert r.status_code == 413
        assert not list((server.data_dir / "tmp").glob("*.part"))
        preflight = requests.options(
            f"{base}/studies",
            headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET"},
            timeout=10,
        )
        assert preflight.headers["access-control-allow-origin"] == "https://viewer.example.org"
        other = requests.get(f"{base}/studies", headers={"Origin": "https://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()
