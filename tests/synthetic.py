"""Synthetic CT and MR series written as real Part-10 files, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def make_instance(
    *,
    patient_name: str = "DOE^JOHN",
    patient_id: str = "PID001",
    study_uid: str,
    series_uid: str,
    number: int,
    modality: str = "CT",
    size: int = 512,
    study_date: str = "20240115",
    accession: str = "ACC001",
    study_description: str = "CT CHEST",
    series_description: str = "AXIAL 5mm",
    charset: str | None = None,
) -> Dataset:
    """One slice with a gradient image (HU-like values for CT), fully valid Part-10 dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024 if modality == "CT" else 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    row = np.linspace(0, 2000, size, dtype=np.int16)
    ds.PixelData = (np.tile(row, (size, 1)) + np.int16(number % 100)).tobytes()
    return ds


def write_series(
    folder: Path, count: int, *, study_uid: str | None = None, series_uid: str | None = None, **kwargs: object
) -> list[Path]:
    """Write ``count`` slices of one series into ``folder``; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for n in range(1, count + 1):
        ds = make_instance(study_uid=study_uid, series_uid=series_uid, number=n, **kwargs)  # type: ignore[arg-type]
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
