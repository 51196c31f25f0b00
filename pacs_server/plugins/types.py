"""What the core hands to plugin hooks (hookspecs.py), kept apart so that ingest can build it."""

from __future__ import annotations

from dataclasses import dataclass, field

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
