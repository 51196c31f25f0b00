"""``macpacs verify``: the stored files checked against the index, and repaired where that loses nothing.

The files and the index are walked side by side, both in storage-key order (the blob store lists
its keys sorted; ``index/instance_scan.py`` pages the rows by key), so neither is held in memory
and a verify of millions of instances runs in constant memory, while the server runs. Each pair
is compared: the file's size with the row's, and the SHA-256 of the file's dataset (``ingest``'s
``stream_hash``, what ingest recorded) with ``instance.content_hash``. What can be wrong:

| kind | what | ``--repair`` |
|---|---|---|
| ``missing`` | a row whose file is gone: the image is lost | the row is dropped (logged as data loss) |
| ``not-indexed`` | a file no row describes: invisible to every query | indexed through ``Ingestor.ingest`` |
| ``size``, ``hash`` | the file is not what was stored and acknowledged | reported only, never deleted |
| ``no-hash`` | a row indexed before revision 0003 has no hash to compare | the file's hash is recorded |
| ``unreadable`` | a file that does not read as a DICOM instance | reported only |
| ``misplaced`` | a file that is not where its SOP Instance UID puts it | reported only |

The server may be storing, replacing and deleting meanwhile, so a difference is re-read before it
is reported: the row again by UID (a row deleted or replaced since its page was read is no
problem), and, for a file written less than ``SETTLE_S`` ago (ingest renames the file in place
before it commits the row), again until then.

The run's summary (when, counts, the first problems) is saved in the data folder
(``SUMMARY_FILE``); the status page and ``/health`` show it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .archive import Archive
from .index import instance_scan
from .index.db import SQLITE_BUSY_TIMEOUT_MS
from .index.instance_scan import IndexedFile
from .ingest import Outcome, RejectedInstance, read_instance, stream_hash
from .storage import blob_key, local_copy

log = logging.getLogger(__name__)

SUMMARY_FILE = "verify-summary.json"
SUMMARY_PROBLEMS = 50  # problems kept in the summary file (the command prints them all)
# Ingest renames a file into place, then commits its row after at most the writer lock's wait
# (10 s) and the commit's fsync; an overwrite replaces the file before its row. So a file renamed
# less than this long ago may still get (or change) its row: it is re-read until then.
SETTLE_S = SQLITE_BUSY_TIMEOUT_MS / 1000 + 20.0
SETTLE_POLL_S = 0.25
DROP_BATCH = 500

# Each kind of problem, as the command's count lines and the status page word it.
KINDS = {
    "missing": "files missing (images lost)",
    "not-indexed": "files not in the index",
    "size": "files whose size differs",
    "hash": "files whose content differs",
    "no-hash": "rows without a content hash",
    "unreadable": "files that are not DICOM",
    "misplaced": "files in the wrong place",
}
# What --repair does for each kind it repairs (the others are only reported).
REPAIRS = {"missing": "index row dropped", "not-indexed": "indexed", "no-hash": "hash recorded"}


@dataclass(frozen=True)
class Problem:
    """One difference between the files and the index; ``repaired`` says what --repair did ("": nothing)."""

    kind: str
    sop_instance_uid: str  # "" when the file does not say
    path: str
    detail: str
    repaired: str = ""

    def line(self) -> str:
        done = f" [{self.repaired}]" if self.repaired else ""
        return f"{self.kind:<11} {self.sop_instance_uid or '-'}  {self.path}\n            {self.detail}{done}"


@dataclass
class Report:
    """What one verify found and did."""

    repair: bool
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    instances: int = 0  # index rows checked
    files: int = 0  # files found in the store
    bytes_hashed: int = 0
    found: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    examples: list[Problem] = field(default_factory=list)  # the first SUMMARY_PROBLEMS still open

    @property
    def remaining(self) -> int:
        """Problems not repaired: the archive still differs from its index there."""
        return sum(self.found.values()) - sum(self.repaired.values())


def verify(
    archive: Archive,
    *,
    repair: bool = False,
    on_problem: Callable[[Problem], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Compare every stored file with the index (and repair with ``repair``); ``on_problem`` hears
    of each problem once it is settled (and repaired), ``progress`` of each row or file done."""
    return _Verifier(archive, repair, on_problem, progress).run()


class _Verifier:
    def __init__(
        self,
        archive: Archive,
        repair: bool,
        on_problem: Callable[[Problem], None] | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.archive = archive
        self.index, self.blobs = archive.index, archive.blobs
        self.report = Report(repair=repair)
        self.on_problem = on_problem
        self.progress = progress or (lambda _n: None)
        self.drops: list[tuple[IndexedFile, Problem]] = []

    def run(self) -> Report:
        files = self.blobs.iter_keys()
        rows = instance_scan.by_storage_key(self.index)
        key, row = next(files, None), next(rows, None)
        while key is not None or row is not None:
            if row is None or (key is not None and key < row.storage_key):
                self.report.files += 1
                self._file_only(key)  # type: ignore[arg-type]
                key = next(files, None)
            elif key is None or row.storage_key < key:
                self.report.instances += 1
                self._row(row)
                row = next(rows, None)
            else:
                self.report.files += 1
                self.report.instances += 1
                self._row(row)
                key, row = next(files, None), next(rows, None)
            self.progress(1)
        self._drop_rows()
        self.report.finished = time.time()
        return self.report

    # -- an index row (with its file, or without) ----------------------------------------------
    def _row(self, row: IndexedFile) -> None:
        problem, digest = self._examine(row)
        if problem is None:
            return
        if problem.kind != "no-hash":
            settled = self._settle(row, problem, digest)
            if settled is None:
                return
            row, problem, digest = settled
        if self.report.repair and problem.kind == "missing":
            self.drops.append((row, problem))
            if len(self.drops) >= DROP_BATCH:
                self._drop_rows()
            return
        if self.report.repair and problem.kind == "no-hash" and digest is not None:
            problem = self._record_hash(row, problem, digest)
        self._emit(problem)

    def _examine(self, row: IndexedFile) -> tuple[Problem | None, str | None]:
        """The row against its file now: a problem or None, and the file's hash when it was read."""
        uid, key = row.sop_instance_uid, row.storage_key
        path = self._where(key)
        size = self.blobs.size(key)
        if size is None:
            return Problem("missing", uid, path, self._lost(uid, "its file is missing")), None
        if size != row.file_size:
            detail = (
                f"the file has {size} bytes, {row.file_size} were stored: it changed on disk after it was "
                "acknowledged (a disk fault, or a change by hand); restore it from a backup or have it sent again"
            )
            return Problem("size", uid, path, detail), None
        try:
            with self.blobs.open(key) as fh:
                digest = stream_hash(fh)
        except FileNotFoundError:
            return Problem("missing", uid, path, self._lost(uid, "its file is missing")), None
        except OSError as exc:
            detail = f"the file cannot be read ({exc.strerror or exc}): check the disk (Disk Utility, dmesg)"
            return Problem("unreadable", uid, path, detail), None
        self.report.bytes_hashed += size
        if row.content_hash is None:
            detail = "indexed before content hashes were recorded: its content cannot be checked until it has one"
            return Problem("no-hash", uid, path, detail), digest
        if digest != row.content_hash:
            detail = (
                "the file's content differs from what was stored and acknowledged (SHA-256 of its dataset): a disk "
                "fault, or a change by hand; restore it from a backup or have it sent again"
            )
            return Problem("hash", uid, path, detail), digest
        return None, digest

    def _settle(self, row: IndexedFile, problem: Problem, digest: str | None) -> _Examined | None:
        """Re-read a suspect row until what it says holds still; None when it is no problem after all
        (deleted or replaced since its page was read, or the file and the changed row now agree).
        Only the row is polled: the file is examined again when the row changed."""
        deadline = self._settled_by(row.storage_key)
        while True:
            fresh = instance_scan.by_uid(self.index, row.sop_instance_uid)
            if fresh is None or fresh.storage_key != row.storage_key:
                return None
            if fresh != row:
                row = fresh
                found, digest = self._examine(row)
                if found is None:
                    return None
                problem = found
            if time.monotonic() >= deadline:
                return row, problem, digest
            time.sleep(SETTLE_POLL_S)

    def _record_hash(self, row: IndexedFile, problem: Problem, digest: str) -> Problem:
        """Fill a missing hash, once the file reads as this row's instance (else it is reported as unreadable)."""
        try:
            with local_copy(self.blobs, row.storage_key) as path:
                uid = read_instance(path, metadata=False).sop_instance_uid
        except RejectedInstance as exc:
            return Problem("unreadable", row.sop_instance_uid, problem.path, f"not hashed: {exc}")
        except FileNotFoundError:
            return problem  # deleted meanwhile: the next verify has nothing to check
        if uid != row.sop_instance_uid:
            detail = f"not hashed: the file holds instance {uid}, not the row's: it was replaced by hand"
            return Problem("hash", row.sop_instance_uid, problem.path, detail)
        if not instance_scan.fill_content_hash(self.index, row.pk, digest):
            return problem  # replaced meanwhile, with a hash of its own: the next verify checks it
        return _repaired(problem)

    def _drop_rows(self) -> None:
        """Remove the rows of files that are gone (after checking once more that they are), loudly."""
        drops, self.drops = self.drops, []
        still = [(row, problem) for row, problem in drops if self.blobs.size(row.storage_key) is None]
        if not still:
            return
        self.index.remove_instances([row.pk for row, _problem in still])
        for row, problem in still:
            log.error(
                "DATA LOSS: instance %s had no file at %s; its index row was dropped (%s)",
                row.sop_instance_uid,
                problem.path,
                problem.detail,
            )
            self._emit(_repaired(problem))

    # -- a file without a row --------------------------------------------------------------------
    def _file_only(self, key: str) -> None:
        try:
            with local_copy(self.blobs, key) as path:  # an object store's blob: a staged copy
                self._stray(key, self._where(key), path)
        except FileNotFoundError:
            return  # removed meanwhile (a failed ingest cleans up after itself)

    def _stray(self, key: str, path_text: str, path: Path) -> None:
        """A blob no row described when its turn came (``path``: a local file of it)."""
        try:
            uid = read_instance(path, metadata=False).sop_instance_uid
        except RejectedInstance as exc:
            if self.blobs.size(key) is None:
                return  # removed meanwhile (a failed ingest cleans up after itself)
            detail = (
                f"not a readable DICOM instance ({exc}); not indexed, left in place: move it out of the "
                "files folder, or delete it"
            )
            self._emit(Problem("unreadable", "", path_text, detail))
            return
        if blob_key(uid) != key:
            detail = (
                f"holds instance {uid}, whose file belongs at {self._where(blob_key(uid))}: copied here by hand? "
                "Import it with `macpacs import`, then delete this copy"
            )
            self._emit(Problem("misplaced", uid, path_text, detail))
            return
        # With --repair, ingest itself settles a race with an ingest in flight (one row either way).
        if instance_scan.by_uid(self.index, uid) is not None or (
            not self.report.repair and self._indexed_meanwhile(uid, key)
        ):
            return
        problem = Problem(
            "not-indexed",
            uid,
            path_text,
            "stored, but no index row describes it: no query finds it (a restored older index, or a crash)",
        )
        if self.report.repair:
            problem = self._index_file(path, problem)
        self._emit(problem)

    def _indexed_meanwhile(self, uid: str, key: str) -> bool:
        """Whether a row appears for a file that ingest may have renamed before committing its row."""
        deadline = self._settled_by(key)
        while True:
            if instance_scan.by_uid(self.index, uid) is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL_S)

    def _index_file(self, path: Path, problem: Problem) -> Problem:
        """Index a stray file through the one ingest path: it finds the identical blob already in place
        and commits its row (the "identical instance" outcome)."""
        result = self.archive.ingestor.ingest_file(path)
        if result.outcome in (Outcome.DUPLICATE, Outcome.STORED):
            return _repaired(problem)
        return Problem(
            problem.kind, problem.sop_instance_uid, problem.path, f"{problem.detail}; not indexed: {result.message}"
        )

    # -- helpers -------------------------------------------------------------------------------
    def _emit(self, problem: Problem) -> None:
        self.report.found[problem.kind] += 1
        if problem.repaired:
            self.report.repaired[problem.kind] += 1
        elif len(self.report.examples) < SUMMARY_PROBLEMS:
            self.report.examples.append(problem)
        if self.on_problem is not None:
            self.on_problem(problem)

    def _where(self, key: str) -> str:
        return self.blobs.local_path(key) or key

    def _settled_by(self, key: str) -> float:
        """The monotonic time after which a file's row can no longer change because of its ingest:
        ``SETTLE_S`` after the file was written (now, for a file written long ago or gone)."""
        path = self.blobs.local_path(key)
        try:
            written = os.stat(path).st_mtime if path is not None else 0.0
        except OSError:
            written = 0.0
        return time.monotonic() + max(0.0, written + SETTLE_S - time.time())

    def _lost(self, uid: str, what: str) -> str:
        where = instance_scan.where_is(self.index, uid)
        study = (
            f" (patient {where['patient_id']!r} {where['patient_name']!r}, study {where['study_uid']} of "
            f"{where['study_date'] or 'no date'}, series {where['series_uid']} {where['modality']})"
            if where
            else ""
        )
        return (
            f"{what}: the image{study} is lost unless a backup or its sender still has it; "
            "`macpacs verify --repair` drops its row, then send it again"
        )


# A row, what is wrong with it, and its file's hash when the file was read.
_Examined = tuple[IndexedFile, Problem, str | None]


def _repaired(problem: Problem) -> Problem:
    return Problem(problem.kind, problem.sop_instance_uid, problem.path, problem.detail, REPAIRS[problem.kind])


# -- the summary ----------------------------------------------------------------------------------
def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def save_summary(data_dir: Path, report: Report) -> Path:
    """Write the run's summary into the data folder (replacing the last one atomically)."""
    summary = {
        "format": 1,
        "started": _iso(report.started),
        "finished": _iso(report.finished),
        "duration_s": round(report.finished - report.started, 1),
        "repair": report.repair,
        "instances": report.instances,
        "files": report.files,
        "bytes_hashed": report.bytes_hashed,
        "found": {kind: report.found[kind] for kind in KINDS},
        "repaired": {kind: report.repaired[kind] for kind in REPAIRS},
        "remaining": report.remaining,
        "problems": [asdict(p) for p in report.examples],
        "problems_not_listed": max(0, report.remaining - len(report.examples)),
    }
    path = data_dir / SUMMARY_FILE
    staged = path.with_name(f".{SUMMARY_FILE}.{os.getpid()}")
    staged.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(staged, path)
    return path


def load_summary(data_dir: Path) -> dict[str, Any] | None:
    """The last run's summary, or None when verify never ran here (or its file is unreadable)."""
    try:
        summary = json.loads((data_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("format") != 1:
        return None
    # Shown on the status page and in /health: a file edited by hand must not break either.
    fields = {"finished": str, "instances": int, "files": int, "remaining": int, "found": dict, "repaired": dict}
    if not all(isinstance(summary.get(key), kind) for key, kind in fields.items()):
        return None
    if not all(
        isinstance(summary[group].get(kind, 0), int)
        for group, kinds in (("found", KINDS), ("repaired", REPAIRS))
        for kind in kinds
    ):
        return None
    return summary


def health_field(data_dir: Path) -> dict[str, Any] | None:
    """``/health``'s ``verify``: when the last verify ended, what it checked, and what is left."""
    summary = load_summary(data_dir)
    if summary is None:
        return None
    return {
        "finished": summary["finished"],
        "instances": summary["instances"],
        "remaining": summary["remaining"],
        "lost": summary["repaired"].get("missing", 0),
    }


def describe(summary: dict[str, Any] | None) -> str:
    """The last verify in one sentence, for the status page."""
    if summary is None:
        return (
            "never run (or its summary is unreadable): `macpacs verify` checks every stored file against "
            "the index (the installer runs it weekly)"
        )
    text = f"{summary['finished']}: {summary['instances']} instances, {summary['files']} files"
    found = [f"{summary['found'][kind]} {words}" for kind, words in KINDS.items() if summary["found"].get(kind)]
    if not found:
        return text + ", no problems"
    text += "; " + ", ".join(found)
    repaired = [
        f"{summary['repaired'][kind]} {words}" for kind, words in REPAIRS.items() if summary["repaired"].get(kind)
    ]
    if repaired:
        text += " (repaired: " + ", ".join(repaired) + ")"
    if summary["remaining"]:
        text += f"; {summary['remaining']} remain: run `macpacs verify` for the list, `--repair` for what it can fix"
    return text
