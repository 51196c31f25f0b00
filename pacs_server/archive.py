"""The composition root: one ``Archive`` per process, built from the settings, handed to every adapter.

The main server process, each DICOM worker process and each CLI command open exactly one
Archive with ``open_archive``. It holds every part an adapter needs (index, blob store,
ingestor, nodes, users, background jobs, plugins, the audit trail) so that the DIMSE, DICOMweb, WADO-URI, page,
XML-RPC and CLI adapters receive one object instead of wiring the parts themselves: the wiring
exists here only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import AuditTrail
from .config import ConfigError, Settings
from .index import Index, IndexUnreadable
from .ingest import Ingestor
from .jobs import Jobs
from .nodes import NodeRegistry
from .plugins import Plugins
from .recovery import IndexRecovery
from .stable import StableWatcher
from .storage import BlobStore, open_blob_store
from .users import Users

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Archive:
    """Everything of one archive that a protocol adapter may use.

    ``role`` says which process this is: ``"server"`` (the main process of ``macpacs serve``),
    ``"dicom-worker"`` or ``"command"`` (a CLI command); plugins read it in their ``startup``.
    ``request_stop``, ``stop_web_listener`` and ``dicom_status`` are set by the server process
    (``server.py``): XML-RPC ``KillOsiriX`` and the admin pages stop the process through the
    first, the debug fault switch uses the second, ``/health`` reads the third. Elsewhere they
    do nothing.
    """

    settings: Settings
    role: str
    index: Index
    blobs: BlobStore
    ingestor: Ingestor
    nodes: NodeRegistry
    users: Users
    jobs: Jobs
    plugins: Plugins
    audit: AuditTrail
    started_at: float = field(default_factory=time.time)
    request_stop: Callable[[], None] = _nothing
    stop_web_listener: Callable[[], None] = _nothing
    dicom_status: Callable[[], dict[str, Any]] | None = None
    # Where a corrupt index was moved when the archive was opened with ``repair`` (else None).
    replaced_index: Path | None = None
    # The server's repair of a corrupt SQLite index (main process of ``macpacs serve`` only).
    recovery: IndexRecovery | None = None
    # The server process's watch for stable studies (stable.py); None in other processes.
    stable: StableWatcher | None = None

    def close(self) -> None:
        """Release what the archive holds (plugins, the job pool, the index's connections)."""
        if self.recovery is not None:
            self.recovery.stop()
        if self.stable is not None:
            self.stable.close()
        self.plugins.shutdown()
        self.jobs.close()
        self.index.close()
        self.audit.close()


def open_archive(settings: Settings, role: str = "command", *, migrate: bool = True, repair: bool = False) -> Archive:
    """Build the archive of this process from ``settings``.

    ``migrate`` brings the index schema up to date (the main process and CLI commands do; DICOM
    workers open an index the main process already migrated). With ``repair``, a corrupt SQLite
    index (unreadable, a table missing, or found corrupt by a running process: the recovery file)
    is moved aside (``Archive.replaced_index`` says where) and a fresh one created: the server then
    rebuilds it from the stored files in the background (server mode; with
    ``server.server_mode = false`` its start stops and says what to do instead), and
    ``macpacs reindex`` rebuilds it in the foreground. The server's main process also watches for
    corruption found while it runs and repairs it the same way (``recovery.py``).
    """
    plugins = Plugins(settings.plugins.enable, settings.plugins.options)  # a typo'd name stops here
    blobs = open_blob_store(settings.storage.url, settings.data_dir, settings.s3)
    index, replaced = _open_index(settings, role, migrate=migrate, repair=repair)
    jobs = Jobs(index, settings.jobs)
    archive = Archive(
        settings=settings,
        role=role,
        index=index,
        blobs=blobs,
        ingestor=Ingestor(blobs, index, settings.storage, plugins, jobs),
        nodes=NodeRegistry(index),
        users=Users(index),
        jobs=jobs,
        plugins=plugins,
        audit=AuditTrail(
            settings.log_dir, file_mb=settings.audit.file_mb, files=settings.audit.files, syslog=settings.audit.syslog
        ),
        replaced_index=replaced,
    )
    if role == "server" and index.path is not None:
        archive.recovery = IndexRecovery(index, blobs, server_mode=settings.server.server_mode)
        archive.recovery.start()  # resumes a rebuild a restart interrupted, too
    plugins.startup(archive)
    if role == "server":  # jobs and stable studies are the main server process's alone
        archive.jobs.start(archive)
        archive.stable = StableWatcher(archive)
        archive.stable.start()
    return archive


def _open_index(settings: Settings, role: str, *, migrate: bool, repair: bool) -> tuple[Index, Path | None]:
    """The index, and where a corrupt one was moved (None when it could be opened)."""
    ix = settings.index
    index = Index(
        settings.index_url,
        pool_size=ix.pool_size,
        statement_timeout=ix.statement_timeout,
        connect_timeout=ix.connect_timeout,
        sqlite_cache_mb=ix.sqlite_cache_mb,
    )
    if not migrate:
        return index, None
    try:
        state = index.recovery_state()  # first: a connection would wait for the replacement
        if state is not None and state.get("state") == "corrupt":
            raise IndexUnreadable(f"found corrupt while in use: {state.get('error', '?')}")
        index.migrate()
        index.ping()
        index.check_tables()
        return index, None
    except IndexUnreadable as exc:
        if not (repair and index.path is not None):
            index.close()
            raise
        if role == "server" and not settings.server.server_mode:
            index.close()
            raise ConfigError(
                f"the index is unreadable ({exc}) and server.server_mode is false, so it is not rebuilt "
                "automatically: stop the server, then run `macpacs reindex` (it moves the file aside and "
                "rebuilds it from the stored files), or set server.server_mode = true"
            ) from None
        log.error("index is unreadable (%s): moving it aside and rebuilding it from the files", exc)
        moved, _copied = index.replace_corrupt(str(exc))
    return index, moved
