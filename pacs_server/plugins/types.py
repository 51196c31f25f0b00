"""What the core hands to plugin hooks (hookspecs.py), kept apart so that ingest can build it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Instance:
    """One instance as ingest sees it: identifiers, where it came from, its header and content hash.

    ``via`` is the protocol that brought it: ``"c-store"``, ``"stow"``, ``"upload"``, ``"import"``
    or ``"c-get"``; ``source`` is the sender as that protocol knows it (the calling AE title,
    the web user, or the imported file's path).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str
    file_size: int
    content_hash: str
    via: str
    source: str
    dataset: Dataset = field(repr=False, compare=False)


@dataclass(frozen=True)
class Series:
    """One series of a stable study, as the index counts it."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instances: int


@dataclass(frozen=True)
class Study:
    """A study that became stable (the ``study_stable`` hook), with what the index knows of it.

    ``generation`` is 1 the first time the study is stable and one more each time instances
    arrived after that; ``last_instance_at`` is when its last instance was stored (epoch
    seconds). ``source_aes`` are the calling AE titles (or ``STOW-RS``...) its instances came
    from. ``dataset`` is the header of one of its instances, without bulk data, for tag values
    the index does not keep: read it, do not change it.
    """

    study_instance_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: tuple[str, ...]
    series: tuple[Series, ...]
    instances: int
    generation: int
    last_instance_at: float
    source_aes: tuple[str, ...] = ()
    dataset: Dataset = field(default_factory=Dataset, repr=False, compare=False)


class JobSpec(NamedTuple):
    """A job for the archive's queue (``archive.jobs``), as the ``instance_jobs`` hook returns it.

    ``kind`` names the handler (``"send"``, ``"webhook"``, a plugin's own); ``payload`` must be
    JSON-serialisable. Jobs of one ``batch_key`` run together (one association for instances
    routed to one node); a ``dedupe_key`` already queued queues nothing again.
    """

    kind: str
    description: str
    payload: Mapping[str, Any]
    batch_key: str | None = None
    dedupe_key: str | None = None
