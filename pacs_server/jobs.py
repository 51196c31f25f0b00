"""Background jobs: work that outlives the request that started it (a send, a retrieve).

The study page's "Send to node" and XML-RPC ``Retrieve``/``CMove`` answer at once and do their
work here, as OsiriX does. A job records its progress so that a page can poll it; the newest
``KEEP`` jobs are remembered. At most ``WORKERS`` run at once: a burst of requests queues
instead of opening hundreds of associations.

Jobs live in this process only and end with it; a restart forgets queued and running ones
(the sender sees "no such job" and can start it again). Persisted, multi-node job queues are
the integration and scale-out issues' work (ARCHITECTURE.md, "jobs").
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

WORKERS = 4
KEEP = 200


@dataclasses.dataclass
class Job:
    """One unit of background work and how far it got (JSON-ready through ``dataclasses.asdict``)."""

    id: str
    kind: str  # "send", "retrieve", "cmove"
    description: str
    state: str = "queued"  # queued, running, done, failed
    total: int = 0
    done: int = 0
    failed: int = 0
    message: str = ""
    started: float = dataclasses.field(default_factory=time.time)


class Jobs:
    """The process's job runner: a small thread pool and the newest jobs by id."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, kind: str, description: str, work: Callable[[Job], None]) -> Job:
        """Queue ``work(job)``; it sets ``job.state``/``message`` as it goes (an exception fails it)."""
        job = Job(id=secrets.token_urlsafe(12), kind=kind, description=description)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP:
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def recent(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    @staticmethod
    def _run(job: Job, work: Callable[[Job], None]) -> None:
        job.state = "running"
        try:
            work(job)
        except Exception as exc:
            log.exception("job %s (%s: %s) failed", job.id, job.kind, job.description)
            job.state, job.message = "failed", f"{job.description} failed: {exc}"
            return
        if job.state == "running":
            job.state = "done"

    def close(self) -> None:
        """Stop taking jobs; running ones finish in their threads (they are not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
