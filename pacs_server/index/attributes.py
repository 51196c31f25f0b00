"""The DICOM attributes the index keeps, and at which level: the single source for ingest,
the query matcher and return keys.

Each attribute names its column and how it matches (DICOM PS3.4 C.2.2.2): ``pn`` person
names (optionally case-insensitive, via a normalised column), ``str`` strings with wildcards,
``uid`` single or list-of-UID matching, ``date``/``time`` ranges, ``int`` numbers,
``multi`` a multi-valued attribute matched value by value (ModalitiesInStudy), and ``count``
for counters the index maintains (NumberOfStudyRelatedInstances...).
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class Attr:
    keyword: str
    level: str
    column: str
    kind: str  # pn | str | uid | date | time | int | multi | count
    length: int = 64


ATTRIBUTES: tuple[Attr, ...] = (
    # PATIENT
    Attr("PatientName", "PATIENT", "patient_name", "pn", 324),
    Attr("PatientID", "PATIENT", "patient_id", "str"),
    Attr("IssuerOfPatientID", "PATIENT", "issuer_of_patient_id", "str"),
    Attr("PatientBirthDate", "PATIENT", "patient_birth_date", "date", 8),
    Attr("PatientBirthTime", "PATIENT", "patient_birth_time", "time", 16),
    Attr("PatientSex", "PATIENT", "patient_sex", "str", 16),
    Attr("NumberOfPatientRelatedStudies", "PATIENT", "num_studies", "count"),
    Attr("NumberOfPatientRelatedSeries", "PATIENT", "num_series", "count"),
    Attr("NumberOfPatientRelatedInstances", "PATIENT", "num_instances", "count"),
    # STUDY
    Attr("StudyInstanceUID", "STUDY", "study_uid", "uid"),
    Attr("StudyDate", "STUDY", "study_date", "date", 8),
    Attr("StudyTime", "STUDY", "study_time", "time", 16),
    Attr("AccessionNumber", "STUDY", "accession_number", "str"),
    Attr("StudyID", "STUDY", "study_id", "str", 16),
    Attr("StudyDescription", "STUDY", "study_description", "str"),
    Attr("ReferringPhysicianName", "STUDY", "referring_physician_name", "pn", 324),
    Attr("InstitutionName", "STUDY", "institution_name", "str"),
    Attr("PatientAge", "STUDY", "patient_age", "str", 16),
    Attr("PatientSize", "STUDY", "patient_size", "str", 16),
    Attr("PatientWeight", "STUDY", "patient_weight", "str", 16),
    Attr("ModalitiesInStudy", "STUDY", "modalities_in_study", "multi", 256),
    Attr("NumberOfStudyRelatedSeries", "STUDY", "num_series", "count"),
    Attr("NumberOfStudyRelatedInstances", "STUDY", "num_instances", "count"),
    # SERIES
    Attr("SeriesInstanceUID", "SERIES", "series_uid", "uid"),
    Attr("Modality", "SERIES", "modality", "str", 16),
    Attr("SeriesNumber", "SERIES", "series_number", "int"),
    Attr("SeriesDescription", "SERIES", "series_description", "str"),
    Attr("SeriesDate", "SERIES", "series_date", "date", 8),
    Attr("SeriesTime", "SERIES", "series_time", "time", 16),
    Attr("BodyPartExamined", "SERIES", "body_part_examined", "str", 16),
    Attr("ProtocolName", "SERIES", "protocol_name", "str"),
    Attr("StationName", "SERIES", "station_name", "str", 16),
    Attr("Manufacturer", "SERIES", "manufacturer", "str"),
    Attr("PerformedProcedureStepStartDate", "SERIES", "pps_start_date", "date", 8),
    Attr("NumberOfSeriesRelatedInstances", "SERIES", "num_instances", "count"),
    # IMAGE
    Attr("SOPInstanceUID", "IMAGE", "sop_instance_uid", "uid"),
    Attr("SOPClassUID", "IMAGE", "sop_class_uid", "uid"),
    Attr("InstanceNumber", "IMAGE", "instance_number", "int"),
    Attr("ContentDate", "IMAGE", "content_date", "date", 8),
    Attr("ContentTime", "IMAGE", "content_time", "time", 16),
    Attr("AcquisitionNumber", "IMAGE", "acquisition_number", "int"),
    Attr("Rows", "IMAGE", "rows", "int"),
    Attr("Columns", "IMAGE", "columns", "int"),
    Attr("NumberOfFrames", "IMAGE", "number_of_frames", "int"),
)

BY_KEYWORD: dict[str, Attr] = {a.keyword: a for a in ATTRIBUTES}

# The unique key of each level (PS3.4 C.2.2.1.1).
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def level_index(level: str) -> int:
    return LEVELS.index(level)


def normalize_pn(value: str) -> str:
    """Case-folded person name for case-insensitive matching; trailing empty components dropped."""
    groups = [g.rstrip("^") for g in value.split("=")]
    return "=".join(groups).rstrip("=").upper()
