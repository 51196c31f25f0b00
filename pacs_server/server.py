"""Starts and stops everything of one archive process: index, store, DICOM listener; PID file.

The PID file (``pidfile.py``) is locked first and held until the process ends: a second server
on the same data folder stops there, before it opens anything.

Server mode: nothing here ever waits for a person. A corrupt SQLite index is moved aside and
rebuilt from the stored files in the background while the listener already accepts stores
(``archive.open_archive``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from types import FrameType

from . import audit
from .archive import Archive, open_archive
from .audit import local_actor
from .config import Settings
from .dimse.scp import DicomListener
from .dimse.workers import WorkerPool
from .heartbeat import Heartbeat
from .pidfile import AlreadyRunning, PidFile
from .readiness import notify_ready
from .space_reserve import SpaceReserve
from .storage import LocalStaging
from .web.listener import WebListener
from .xmlrpc import XmlRpcServer

log = logging.getLogger(__name__)

# The settings of the last start, to tell a configuration change in the audit trail.
SETTINGS_SEEN = "settings.last.json"
ANALYZE_EVERY_S = 3600.0  # the index's planner statistics refreshed this often (Index.analyze)

# AlreadyRunning is what ``macpacs serve`` (cli.py) reports when the PID file is held.
__all__ = ["AlreadyRunning", "ArchiveServer", "run"]


class ArchiveServer:
    """One archive process. ``start`` brings every service up; ``stop`` takes them down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.pid_file = PidFile(settings.pid_file, settings.data_dir)
        self.reserve = SpaceReserve(settings.data_dir, settings.storage.min_free_mb * 1024 * 1024)
        self._stop = threading.Event()
        self.archive: Archive | None = None
        self.listener: DicomListener | WorkerPool | None = None
        self.web: WebListener | None = None
        self.xmlrpc: XmlRpcServer | None = None
        self.heartbeat: Heartbeat | None = None

    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.acquire()
        # Before anything else is written: what a crash left in the staging folder may be what
        # fills the disk (the PID file's text waits for space if it must: pidfile.py).
        removed = LocalStaging(s.data_dir).clean_staging()
        if removed:
            log.info("removed %d temporary files left by interrupted transfers", removed)
        self.reserve.release_if_full()  # still full: the index needs room to open (space_reserve.py)
        self.pid_file.write_pending()
        archive = self.archive = open_archive(s, "server", repair=True)
        archive.started_at = self.started_at
        archive.request_stop = self.request_stop
        _audit_start(archive)
        # Every port is bound and listening before any is served, so that a client that comes
        # early waits in a backlog instead of being refused. Then each starts serving, DICOM
        # first, and only when all of them accept is the server ready (log line, systemd).
        self.heartbeat = Heartbeat(archive)  # GET /heartbeat, for the supervisor: heartbeat.py
        self.web = WebListener(archive, self.heartbeat)
        self.web.bind()
        if s.xmlrpc.enabled:
            self.xmlrpc = XmlRpcServer(archive)
            self.xmlrpc.bind()
            self.heartbeat.watch("xmlrpc", lambda: self.xmlrpc.last_loop if self.xmlrpc else None)
        workers = s.dicom.worker_count()
        if workers > 1:  # associations served by worker processes: dimse/workers.py says why
            self.listener = WorkerPool(s, workers)
            self.listener.start()
            self.listener.serve()  # once a worker is ready
        else:
            self.listener = DicomListener(archive)
            self.listener.start()
        archive.dicom_status = self.listener.snapshot
        self.web.start()
        if self.xmlrpc is not None:
            self.xmlrpc.start()
        self.heartbeat.start()
        xmlrpc = f", XML-RPC {s.xmlrpc.port}" if self.xmlrpc is not None else ""
        log.info(
            "macpacs ready: DICOM %d (AE %s), web %d%s; data in %s (PID %d)",
            s.dicom.port,
            s.dicom.ae_title,
            s.web.port,
            xmlrpc,
            s.data_dir,
            os.getpid(),
        )
        notify_ready()

    def request_stop(self, *_args: object) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT (or ``request_stop``), then stop everything."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        next_analyze = time.monotonic()  # soon after start, then every ANALYZE_EVERY_S
        while not self._stop.wait(1.0):
            self.pid_file.write_pending()  # a no-op once written (it waits for space on a full disk)
            self.reserve.refill()  # likewise
            if time.monotonic() >= next_analyze:
                next_analyze = time.monotonic() + ANALYZE_EVERY_S
                self._analyze()
        self.stop()

    def _analyze(self) -> None:
        """The index's planner statistics, kept in step with a growing archive (Index.analyze)."""
        if self.archive is None:
            return
        try:
            self.archive.index.analyze()
        except Exception as exc:  # the status document's index check reports a failing index
            log.warning("index: planner statistics not refreshed: %s", exc)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        # Front doors first, so that no request reaches an index that is closing.
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.xmlrpc is not None:
            self.xmlrpc.stop()
            self.xmlrpc = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.archive is not None:
            self.archive.audit.record("stop", local_actor("server"))
            self.archive.close()
            self.archive = None
        self.pid_file.release()
        log.info("macpacs stopped")


def _audit_start(archive: Archive) -> None:
    """Record the start, and every setting changed since the last start (a configuration change)."""
    actor = local_actor("server")
    flat = audit.flatten_settings(dataclasses.asdict(archive.settings))
    changes = audit.settings_changes(archive.settings.data_dir / SETTINGS_SEEN, flat)
    archive.audit.record("start", actor, detail=f"PID {os.getpid()}")
    if changes:
        archive.audit.record("config-change", actor, detail="; ".join(changes)[:4000])


def run(settings: Settings) -> None:
    """``macpacs serve``: start, wait for a signal, stop cleanly (its caller has set up logging)."""
    server = ArchiveServer(settings)
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    server.wait()
