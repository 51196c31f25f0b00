"""The DICOM listener: one pynetdicom AE serving C-ECHO, C-STORE and C-FIND.

Every Storage SOP Class pynetdicom knows (all 170) is accepted in every transfer syntax it knows
(uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000, RLE, HTJ2K...), because files are stored as
received. Incoming datasets are streamed to a temporary file in the store's ``tmp`` folder
(pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), which ingest then renames into place: the
fastest pynetdicom path for large instances (shared/reference/performance.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from ..config import Settings
from ..index import Index
from ..ingest import Ingestor
from . import tuning
from .find import find_responses, status_with_comment

log = logging.getLogger("macpacs.dicom")


@dataclass
class AssociationStats:
    """What one association did, for its closing log line."""

    peer: str
    counts: Counter[str] = field(default_factory=Counter)


def _peer(event: Any) -> str:
    assoc = event.assoc
    return f"{assoc.requestor.ae_title}@{assoc.requestor.address}:{assoc.requestor.port}"


class DicomListener:
    """Owns the AE and the association server; ``start`` returns once the port is listening."""

    def __init__(self, settings: Settings, index: Index, ingestor: Ingestor) -> None:
        self.settings = settings
        self.index = index
        self.ingestor = ingestor
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        d = self.settings.dicom
        ae = AE(ae_title=d.ae_title)
        ae.maximum_associations = d.max_associations
        ae.network_timeout = d.network_timeout
        ae.acse_timeout = d.client_timeout
        ae.dimse_timeout = d.client_timeout
        ae.require_called_aet = not d.accept_any_called_ae
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for model in (
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
        ):
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self, tmp_dir: Path) -> None:
        # Incoming datasets go straight to a file on the data volume, so ingest can rename it.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(tmp_dir)
        d = self.settings.dicom
        clock = tuning.install_clock(d.reactor_poll_ms)
        handlers = [
            (evt.EVT_CONN_OPEN, clock.opened),
            (evt.EVT_CONN_CLOSE, clock.closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self.server = self.ae.start_server((d.bind, d.port), block=False, evt_handlers=handlers)
        tuning.share_contexts(self.server)
        log.info("DICOM listener on %s:%d, AE title %s", d.bind, d.port, d.ae_title)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- association bookkeeping ---------------------------------------------------------------
    def _count(self, event: Any, what: str) -> None:
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                stats.counts[what] += 1

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self._stats[id(event.assoc)] = AssociationStats(_peer(event))
        log.info("association accepted from %s", _peer(event))

    def _on_rejected(self, event: Any) -> None:
        log.warning("association rejected from %s (called AE %r)", _peer(event), event.assoc.acceptor.ae_title)

    def _on_closed(self, event: Any) -> None:
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if how == "aborted":
            self._discard_partial(event)
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(stats.counts.items())) if stats and stats.counts else "idle"
        level = logging.INFO if how == "released" else logging.WARNING
        log.log(level, "association %s by %s: %s", how, _peer(event), summary)

    @staticmethod
    def _discard_partial(event: Any) -> None:
        """An abort mid-transfer leaves pynetdicom's half-written temporary file behind: remove it."""
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is None:
            return
        with contextlib.suppress(OSError):
            partial.close()
            os.unlink(partial.name)
        log.warning("discarded a partially received dataset after the abort")

    # -- services ---------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        self._count(event, "echo")
        return 0x0000

    def _on_store(self, event: Any) -> Any:
        result = self.ingestor.ingest(Path(event.dataset_path), source_ae=event.assoc.requestor.ae_title)
        self._count(event, result.outcome.value)
        if result.ok:
            if result.outcome.value != "stored":
                log.info("C-STORE %s from %s: %s", result.sop_instance_uid, _peer(event), result.message)
            return result.dicom_status
        log.error(
            "C-STORE refused from %s, SOP Instance UID %s: %s (status 0x%04X)",
            _peer(event),
            event.request.AffectedSOPInstanceUID,
            result.message,
            result.dicom_status,
        )
        return status_with_comment(result.dicom_status, result.message)

    def _on_find(self, event: Any) -> Any:
        self._count(event, "find")
        d = self.settings.dicom
        yield from find_responses(
            self.index,
            event.identifier,
            event.request.AffectedSOPClassUID,
            case_insensitive=d.case_insensitive_names,
            max_results=d.max_find_results,
            retrieve_ae=d.ae_title,
            is_cancelled=lambda: event.is_cancelled,
            pace=lambda: _wait_until_sent(event.assoc, d.network_timeout),
        )


def _wait_until_sent(assoc: Any, timeout: float) -> None:
    """Block until pynetdicom's outgoing queue is nearly empty (or the association ends)."""
    deadline = time.monotonic() + timeout
    while assoc.dul.to_provider_queue.qsize() > 4 and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)
