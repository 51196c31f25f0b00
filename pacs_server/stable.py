"""Stable studies: no new instance for ``storage.stable_after`` seconds fires the ``study_stable`` hook.

Routing a whole study or telling a RIS that it arrived waits until the modality has finished
sending it. A study's last instance time is ``study.updated_at``, which ingest's own transaction
sets in whichever process stored the instance (DICOM workers included); the watch runs in the
main server process only and asks the index every few seconds which studies went quiet
(``index/stable_table.py``). Each firing is recorded before the hooks run (``firing``) and after
(``fired``), so that a restart neither repeats a stable study nor loses one. A firing still
``firing`` after ``FIRING_LEASE_S`` (its server stopped while the hooks ran) is taken over by
whichever server watches next, for the same generation (the hook's documentation says how
plugins make that harmless): only an old firing, since with several servers on one database
(docs/scale-out.md) a young one may be running its hooks on another node right now.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from .index import Query
from .index.stable_table import StableTable
from .plugins import Series, Study

if TYPE_CHECKING:
    from .archive import Archive

log = logging.getLogger(__name__)

# A study whose last instance was committed up to this long after its own timestamp (a very
# slow ingest transaction) is still seen: each scan looks this far behind the previous one.
MARGIN_S = 600.0
SCAN_LIMIT = 1000
# A firing begun this long ago and not finished is taken to be interrupted (hooks are quick:
# slow work goes to the job queue); checked every RESUME_EVERY_S.
FIRING_LEASE_S = 300.0
RESUME_EVERY_S = 60.0

STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")


class StableWatcher:
    """The server process's thread that finds quiet studies and fires ``study_stable`` for each."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.table = StableTable(archive.index)
        self.delay = archive.settings.storage.stable_after
        self.every = max(0.2, min(5.0, self.delay / 4))
        self._since = 0.0  # the first scan looks at every study
        self._failed: set[tuple[str, int]] = set()  # firings to try again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stable-studies", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        resumed_at = 0.0
        while not self._stop.is_set():
            if time.monotonic() - resumed_at >= RESUME_EVERY_S:
                resumed_at = time.monotonic()
                self.resume_interrupted()
            try:
                for study_uid, generation in list(self._failed):
                    self._failed.discard((study_uid, generation))
                    self._call(study_uid, generation)
                self.scan()
            except Exception:
                log.exception("stable-study scan failed; retrying in %.0f s", self.every)
            self._stop.wait(self.every)

    def resume_interrupted(self) -> int:
        """Call again the hooks of firings interrupted more than ``FIRING_LEASE_S`` ago; how many."""
        resumed = 0
        try:
            for study_uid, generation, began in self.table.interrupted(time.time() - FIRING_LEASE_S):
                if self.table.take_over(study_uid, generation, began):  # else another server took it
                    log.info("study %s: its stable hooks were interrupted by a stop; calling them again", study_uid)
                    self._call(study_uid, generation)
                    resumed += 1
        except Exception:
            log.exception("cannot resume interrupted stable-study hooks (tried again in %.0f s)", RESUME_EVERY_S)
        return resumed

    def scan(self) -> int:
        """Fire every study that went quiet since the last scan; how many fired."""
        cutoff = time.time() - self.delay
        fired = 0
        while not self._stop.is_set():
            due = self.table.due(cutoff, self._since, SCAN_LIMIT)
            for study_uid, updated_at in due:
                generation = self.table.claim(study_uid, updated_at)
                if generation is not None:  # else another server on this index took it
                    self._call(study_uid, generation)
                    fired += 1
            if len(due) < SCAN_LIMIT:
                break
        self._since = max(self._since, cutoff - MARGIN_S)
        return fired

    def _call(self, study_uid: str, generation: int) -> None:
        """Run the hooks of one firing and record it; when the index cannot be read, try again
        at the next scan (the firing stays recorded as begun, so a restart tries too)."""
        try:
            study = self.study(study_uid, generation)
        except Exception:
            log.exception("cannot read study %s for its stable hooks; trying again in %.0f s", study_uid, self.every)
            self._failed.add((study_uid, generation))
            return
        if study is None:
            log.info("study %s was deleted before it became stable", study_uid)
        else:
            log.info(
                "study %s is stable (generation %d: %d series, %d instances)",
                study_uid,
                generation,
                len(study.series),
                study.instances,
            )
            self.archive.plugins.stable(study)
        self.table.fired(study_uid, generation)

    def study(self, study_uid: str, generation: int) -> Study | None:
        """What the hook receives of a study, from the index (None when it is gone)."""
        index = self.archive.index
        rows = index.find_all(Query("STUDY", {"StudyInstanceUID": study_uid, **dict.fromkeys(STUDY_KEYS)}))
        if not rows:
            return None
        row = rows[0]
        series_rows = index.find_all(Query("SERIES", {"StudyInstanceUID": study_uid, **dict.fromkeys(SERIES_KEYS)}))
        series = tuple(
            Series(
                series_instance_uid=s["SeriesInstanceUID"],
                modality=s["Modality"] or "",
                series_number=s["SeriesNumber"],
                series_description=s["SeriesDescription"] or "",
                instances=s["NumberOfSeriesRelatedInstances"] or 0,
            )
            for s in series_rows
        )
        state = self.table.state(study_uid)
        return Study(
            study_instance_uid=study_uid,
            patient_id=str(row["PatientID"] or ""),
            patient_name=str(row["PatientName"] or ""),
            accession_number=str(row["AccessionNumber"] or ""),
            study_date=str(row["StudyDate"] or ""),
            study_description=str(row["StudyDescription"] or ""),
            modalities=tuple(m for m in str(row["ModalitiesInStudy"] or "").split("\\") if m),
            series=series,
            instances=int(row["NumberOfStudyRelatedInstances"] or 0),
            generation=generation,
            last_instance_at=state["seen_updated_at"] if state else 0.0,
            source_aes=tuple(self.table.source_aes(study_uid)),
            dataset=self._header(series),
        )

    def _header(self, series: tuple[Series, ...]) -> Dataset:
        """The header of one instance of the study, from the index's metadata cache (no file read)."""
        for one in series:
            blobs = self.archive.index.series_metadata(one.series_instance_uid)
            if blobs:
                doc = json.loads(zlib.decompress(blobs[0]))
                return Dataset.from_json(doc, bulk_data_uri_handler=lambda *_args: b"")
        return Dataset()
