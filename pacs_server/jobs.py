"""Background jobs: work that outlives the request that started it, queued in the index.

The study page's "Send to node", XML-RPC ``Retrieve``/``CMove``, routing rules and webhooks all
queue jobs here and answer at once. A job is a row of the index's ``job`` table
(``index/jobs_table.py``), so it survives a restart and is seen the same way by
``macpacs jobs``, the status page and the browser polling its send. Any process may queue one
(a DICOM worker routing what it stored, a CLI command); the main server process runs them, at
most ``jobs.workers`` at once, each taken by one runner at a time (a conditional UPDATE, so
several servers on one PostgreSQL index share the queue safely).

A failed attempt is retried after ``jobs.retry_base_s``, doubling up to ``jobs.retry_max_s``.
After ``jobs.alert_after`` failed attempts an ``ALERT`` line is logged at ERROR (once per job,
one line per batch) and the job counts as alerting on the status page and in ``/health``;
after ``jobs.max_attempts`` it stops as ``failed`` until someone retries it. The watchdog
(``macpacs supervise``) takes no alerts from the server, so the log line and the status are the
alert; a monitoring script reads ``/health``'s ``jobs``.

What a kind of job does is its handler's (``Jobs.handle``): ``send`` and ``retrieve`` are
``dimse/transfer_jobs.py``'s, ``webhook`` the webhooks plugin's. A handler receives a batch of
``RunningJob`` (jobs of one ``batch_key``, e.g. instances routed to one node, go out on one
association) and reports each one's outcome; an exception fails the whole batch for a retry.
A job interrupted by a stop or a crash runs again (its lease runs out, or the next server on
this host puts it back at start): work is done at least once, so a send cut short may repeat
the instances of that association.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from .config import JobsSettings
from .index import Index
from .index.jobs_table import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STATES, JobTable
from .thread_priority import lower_current_thread

if TYPE_CHECKING:
    from .archive import Archive

log = logging.getLogger(__name__)

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "RUNNING", "STATES", "Job", "JobError", "Jobs", "RunningJob"]

POLL_S = 1.0  # how often an idle runner looks for jobs queued by other processes
LEASE_S = 300.0  # a running job whose runner stopped reporting for this long is queued again
PROGRESS_EVERY_S = 2.0  # progress (and the lease) is written at most this often
HOUSEKEEPING_EVERY_S = 30.0
MAX_BATCH = 500
# A job with a batch key waits this long, so that what arrives with it (the next instances of a
# series routed to one node) goes out on the same association instead of one association each.
BATCH_WAIT_S = 1.0


class JobError(ValueError):
    """A job cannot be queued, retried or cancelled as asked; the message says why."""


@dataclasses.dataclass
class Job:
    """One job as the index keeps it (``as_json`` for the pages and ``macpacs jobs``)."""

    id: int
    kind: str
    description: str
    payload: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    next_run_at: float
    total: int
    done: int
    failed: int
    message: str
    alerted: bool
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            id=row["pk"],
            kind=row["kind"],
            description=row["description"],
            payload=json.loads(row["payload"] or "{}"),
            state=row["state"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            next_run_at=row["next_run_at"],
            total=row["total"],
            done=row["done"],
            failed=row["failed"],
            message=row["message"],
            alerted=bool(row["alerted"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @property
    def retrying(self) -> bool:
        """Queued again after a failed attempt, waiting for ``next_run_at``."""
        return self.state == QUEUED and self.attempts > 0

    def as_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body.pop("payload")
        return {**body, "node": self.payload.get("node", ""), "retrying": self.retrying}


class RunningJob:
    """One job of a batch, as its handler sees it: payload in, progress and outcome out."""

    def __init__(self, jobs: Jobs, job: Job) -> None:
        self.job = job
        self.payload = job.payload
        self._jobs = jobs
        self.outcome: tuple[str, str] | None = None  # ("done" | "retry" | "failed", message)
        self.is_cancelled = False
        self.dirty = False  # counts changed since the last write

    @property
    def id(self) -> int:
        return self.job.id

    def progress(self, total: int, done: int, failed: int) -> None:
        """Counts so far (instances, for a send); written to the index every few seconds."""
        self.job.total, self.job.done, self.job.failed = total, done, failed
        self.dirty = True
        self._jobs.report_progress()

    def succeed(self, message: str) -> None:
        self.outcome = (DONE, message)

    def fail(self, message: str) -> None:
        """This attempt failed: the job is retried later (until ``jobs.max_attempts``)."""
        self.outcome = ("retry", message)

    def give_up(self, message: str) -> None:
        """The job cannot succeed as it stands (its node was removed...): no retry."""
        self.outcome = (FAILED, message)

    def cancelled(self) -> bool:
        """Whether an administrator cancelled the job while it runs (checked at progress writes)."""
        return self.is_cancelled


Handler = Callable[["Archive", list[RunningJob]], None]


def _check_job(kind: Any, description: Any, batch_key: Any, dedupe_key: Any) -> None:
    """JobError unless the job's texts fit the ``job`` table's columns (index/schema.py)."""
    if not isinstance(kind, str) or not 0 < len(kind.encode()) <= 32:
        raise JobError(f"job kind {kind!r}: must be a text of 1 to 32 bytes")
    if not isinstance(description, str):
        raise JobError(f"{kind} job: its description {description!r} is not a text")
    for name, key in (("batch_key", batch_key), ("dedupe_key", dedupe_key)):
        if key is not None and (not isinstance(key, str) or len(key.encode()) > 255):
            raise JobError(f"{kind} job {description!r}: {name} must be a text of at most 255 bytes, or None")


class Jobs:
    """The archive's job queue: queue, read, retry and cancel jobs in any process; run them in the server."""

    def __init__(self, index: Index, settings: JobsSettings) -> None:
        self.table = JobTable(index)
        self.settings = settings
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._host = socket.gethostname()
        self._owner_prefix = f"{self._host}:{os.getpid()}:"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._live: dict[int, RunningJob] = {}  # running in this process: their live counts
        self._claims: dict[str, list[RunningJob]] = {}  # owner token → its batch
        self._last_progress = 0.0

    # -- what each kind does ------------------------------------------------------------------------
    def handle(self, kind: str, handler: Handler, *, batch: int = 1) -> None:
        """Run jobs of ``kind`` with ``handler``, up to ``batch`` of one batch key at a time.

        Register in every process that runs jobs (the server's; a plugin does it in its
        ``startup``). Jobs of a kind nobody handles stay queued, and say so on the status page.
        """
        self._handlers[kind] = (handler, max(1, min(batch, MAX_BATCH)))
        self._wake.set()

    # -- queueing (any process) ----------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        description: str,
        payload: Mapping[str, Any],
        *,
        batch_key: str | None = None,
        dedupe_key: str | None = None,
    ) -> Job:
        """Queue one job and return it (the existing one when ``dedupe_key`` is already queued)."""
        (pk,) = self.submit_many([(kind, description, payload, batch_key, dedupe_key)])
        job = self.get(pk)
        assert job is not None
        return job

    def submit_many(
        self, jobs: Sequence[tuple[str, str, Mapping[str, Any], str | None, str | None]], *, conn: Any = None
    ) -> list[int]:
        """Queue several jobs in one transaction: (kind, description, payload, batch_key, dedupe_key) each.

        ``conn``: a write transaction of the caller's on this index (``worklist_table.writing``)
        to queue them in, so that they commit with what made them needed, or not at all.
        """
        return self.insert(self.prepare(jobs), conn)

    def prepare(
        self, jobs: Sequence[tuple[str, str, Mapping[str, Any], str | None, str | None]]
    ) -> list[dict[str, Any]]:
        """The rows of ``jobs`` (as ``submit_many`` takes them), ready for ``insert``. JobError
        names a job the index cannot hold (a payload that is not JSON, a kind or key too long),
        so that no insert fails inside a caller's transaction (an instance's, in ingest)."""
        rows = []
        for kind, description, payload, batch_key, dedupe_key in jobs:
            _check_job(kind, description, batch_key, dedupe_key)
            try:
                text = json.dumps(dict(payload))
            except (TypeError, ValueError) as exc:
                raise JobError(f"{kind} job {description!r}: its payload cannot be stored as JSON: {exc}") from None
            rows.append(
                {
                    "kind": kind,
                    "description": description[:512],
                    "payload": text,
                    "batch_key": batch_key,
                    "dedupe_key": dedupe_key,
                    "max_attempts": self.settings.max_attempts,
                }
            )
        return rows

    def insert(self, rows: Sequence[Mapping[str, Any]], conn: Any = None) -> list[int]:
        """Queue rows from ``prepare``, in the caller's write transaction ``conn`` (ingest commits
        an instance's jobs with its index row) or in one of their own."""
        pks = self.table.insert(rows, conn=conn) if rows else []
        self._wake.set()
        return pks

    # -- reading and an administrator's actions (any process) --------------------------------------------
    def get(self, job_id: int) -> Job | None:
        if not 0 < job_id < 2**63:  # not an id the index can hold (a typo, a fuzzer)
            return None
        row = self.table.get(job_id)
        if row is None:
            return None
        job = Job.from_row(row)
        live = self._live.get(job_id)
        if live is not None and job.state == RUNNING:  # counts newer than the last write
            job.total, job.done, job.failed = live.job.total, live.job.done, live.job.failed
        return job

    def list(self, states: Sequence[str] = (), kinds: Sequence[str] = (), limit: int = 100) -> list[Job]:
        unknown = set(states) - set(STATES)
        if unknown:
            raise JobError(f"unknown job state {', '.join(sorted(unknown))} (states: {', '.join(STATES)})")
        return [Job.from_row(row) for row in self.table.list(states, kinds, limit)]

    def counts(self) -> dict[str, int]:
        return self.table.counts()

    def retry(self, job_id: int) -> Job:
        """Run a failed, cancelled or waiting job again now, its attempts counted from zero."""
        job = self._existing(job_id)
        if not self.table.retry(job_id):
            raise JobError(f"job {job_id} is {job.state}: only a queued, failed or cancelled job can be retried")
        log.info("job %d (%s) queued again by request", job_id, job.description)
        self._wake.set()
        return self._existing(job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued, running or failed job (a running send stops within a few seconds)."""
        job = self._existing(job_id)
        if not self.table.cancel(job_id):
            raise JobError(f"job {job_id} is {job.state}: it can no longer be cancelled")
        log.info("job %d (%s) cancelled by request", job_id, job.description)
        return self._existing(job_id)

    def _existing(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id} (finished jobs are forgotten after jobs.keep_days)")
        return job

    # -- running (the server process) --------------------------------------------------------------------
    def start(self, archive: Archive) -> None:
        """Run queued jobs in ``jobs.workers`` threads until ``close``.

        Jobs a previous server process on this host left running (it stopped or was killed)
        are queued again first: that process is gone, since this one holds the PID file.
        """
        from .dimse import transfer_jobs  # the DICOM adapters import the archive, which holds the jobs

        transfer_jobs.register(self)
        self._requeue_orphans()
        for n in range(self.settings.workers):
            thread = threading.Thread(target=self._work, args=(archive,), name=f"job-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        housekeeping = threading.Thread(target=self._housekeeping, name="job-housekeeping", daemon=True)
        housekeeping.start()
        self._threads.append(housekeeping)

    def close(self) -> None:
        """Stop taking jobs; a running one is left to its lease (it runs again after a restart)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def _requeue_orphans(self) -> None:
        owners = {row["owner"] for row in self.table.list((RUNNING,), limit=10_000)}
        for owner in owners:
            host, _, rest = owner.partition(":")
            pid_text = rest.partition(":")[0]
            if host != self._host or not pid_text.isdigit():
                continue  # another host's: its lease decides
            pid = int(pid_text)
            if pid == os.getpid() or not psutil.pid_exists(pid):
                count = self.table.requeue(owner_prefix=f"{host}:{pid}:")
                log.warning("%d job(s) interrupted when process %d stopped are queued again", count, pid)

    def _work(self, archive: Archive) -> None:
        lower_current_thread(self.settings.nice)  # runners take the CPU the DICOM workers leave
        while not self._stop.is_set():
            try:
                batch = self._claim()
            except Exception:  # the index is unavailable for a moment: try again later
                log.exception("cannot take the next job from the queue; trying again in %.0f s", POLL_S * 5)
                self._stop.wait(POLL_S * 5)
                continue
            if not batch:
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            self._run(archive, *batch)

    def _claim(self) -> tuple[str, list[RunningJob]] | None:
        kinds = list(self._handlers)
        if not kinds:
            return None
        due = self.table.next_due(kinds, BATCH_WAIT_S)
        if due is None or due > time.time():
            return None
        owner = self._owner_prefix + secrets.token_hex(4)
        batch = max(size for _h, size in self._handlers.values())
        rows = self.table.claim(kinds, owner, LEASE_S, batch, BATCH_WAIT_S)
        if not rows:
            return None
        running = [RunningJob(self, Job.from_row(row)) for row in rows]
        with self._lock:
            self._claims[owner] = running
            for job in running:
                self._live[job.id] = job
        return owner, running

    def _run(self, archive: Archive, owner: str, batch: list[RunningJob]) -> None:
        kind = batch[0].job.kind
        handler, _size = self._handlers[kind]
        try:
            handler(archive, batch)
        except Exception as exc:
            log.exception("%s job(s) %s failed", kind, ", ".join(str(job.id) for job in batch))
            for job in batch:
                if job.outcome is None:
                    job.fail(f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._claims.pop(owner, None)
                for job in batch:
                    self._live.pop(job.id, None)
        self._finish(owner, batch)

    def _finish(self, owner: str, batch: list[RunningJob]) -> None:
        s = self.settings
        now = time.time()
        outcomes: dict[int, dict[str, Any]] = {}
        alerts: list[RunningJob] = []
        gave_up: list[RunningJob] = []
        retries: list[tuple[RunningJob, float]] = []
        for running in batch:
            job = running.job
            if running.is_cancelled:  # the row says cancelled already
                continue
            state, message = running.outcome or (DONE, "done")
            values: dict[str, Any] = {"total": job.total, "done": job.done, "failed": job.failed, "message": message}
            job.max_attempts = values["max_attempts"] = s.max_attempts  # the server's setting decides
            if state == "retry":
                if job.attempts >= job.max_attempts:
                    state = FAILED
                    values["message"] = f"gave up after {job.attempts} attempts: {message}"
                    gave_up.append(running)
                else:
                    delay = min(s.retry_max_s, s.retry_base_s * 2 ** (job.attempts - 1)) * random.uniform(0.9, 1.1)
                    state, values["next_run_at"] = QUEUED, now + delay
                    retries.append((running, delay))
                if job.attempts >= s.alert_after and not job.alerted:
                    values["alerted"] = True
                    alerts.append(running)
            elif state == FAILED:
                log.error("job %d (%s) failed and is not retried: %s", job.id, job.description, message)
            values["state"] = state
            job.state, job.message = state, values["message"]
            outcomes[job.id] = values
        self.table.finish(outcomes, owner)
        if retries:
            running, delay = retries[0]
            log.warning(
                "%d %s job(s) failed (job %d, attempt %d of %d: %s); retrying in %.0f s",
                len(retries),
                running.job.kind,
                running.id,
                running.job.attempts,
                running.job.max_attempts,
                running.job.message,
                delay,
            )
        if alerts:
            first = alerts[0].job
            log.error(
                "ALERT jobs: %d job(s) failed %d times or more, e.g. job %d (%s): %s. They are retried up to "
                "jobs.max_attempts = %d times; `macpacs jobs list --state queued` shows them, the status page too",
                len(alerts),
                s.alert_after,
                first.id,
                first.description,
                first.message,
                first.max_attempts,
            )
        if gave_up:
            first = gave_up[0]
            many = f"{len(gave_up)} jobs stopped, e.g. " if len(gave_up) > 1 else ""
            log.error(
                "ALERT jobs: %sjob %d (%s) stopped: %s. Fix the cause, then `macpacs jobs retry %s` (or Retry on "
                "the status page)",
                many,
                first.id,
                first.job.description,
                first.job.message,
                "--failed" if many else first.id,
            )

    def report_progress(self, force: bool = False) -> None:
        """Write the live counts and extend the leases of this process's running jobs (rate-limited)."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_progress = now
            claims = {owner: list(batch) for owner, batch in self._claims.items()}
        for owner, batch in claims.items():
            values = {
                j.id: {"total": j.job.total, "done": j.job.done, "failed": j.job.failed} for j in batch if j.dirty
            }
            for job in batch:
                job.dirty = False
            try:
                lost = self.table.progress([j.id for j in batch], owner, LEASE_S, values)
            except Exception as exc:  # progress is advisory: the job goes on
                log.warning("cannot record job progress: %s", exc)
                continue
            for job in batch:
                job.is_cancelled = job.id in lost

    def _housekeeping(self) -> None:
        while not self._stop.wait(HOUSEKEEPING_EVERY_S):
            try:
                self.report_progress(force=True)  # leases of long sends stay fresh even between reports
                requeued = self.table.requeue()
                if requeued:
                    log.warning(
                        "%d running job(s) stopped reporting for %.0f s and are queued again", requeued, LEASE_S
                    )
                self.table.purge(time.time() - self.settings.keep_days * 86400)
            except Exception:
                log.exception("job queue housekeeping failed (retried in %.0f s)", HOUSEKEEPING_EVERY_S)
