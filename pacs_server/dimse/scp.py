"""The DICOM listener: one pynetdicom AE serving C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET.

Access control happens when an association is requested (``_on_requested``): a wrong called AE
title is rejected unless ``dicom.accept_any_called_ae`` (pynetdicom does that check), and with
``dicom.accept_unknown_nodes = false`` a peer whose calling AE title and address do not match an
active registered node is rejected with reason "calling AE title not recognised". The check
fails closed: any error while it runs (an unreadable index page, no file descriptor left...)
rejects the association (transient, "no reason given") with a log line saying so. An admitted
association carries the decision (``Admission``: the matched node, or an unknown peer admitted
by setting); each service then checks that node's allowed operations and answers 0x0124
(refused: not authorized) when it lacks the right, or when the association has no decision.

Every Storage SOP Class pynetdicom knows (all 170) is accepted in every transfer syntax it knows
(uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000, RLE, HTJ2K...), because files are stored as
received. Incoming datasets are streamed to a file staged by the blob store (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``, redirected by ``pynetdicom_ext``), which ingest then puts: the
fastest pynetdicom path for large instances (shared/reference/performance.md).

Connections reach the listener through ``connections.py`` (the DICOM port, and the TLS port with
``dicom.tls_cert``/``tls_key``: ``tls.py``): both ports serve every service under the same access
control. A connection from a peer over ``dicom.max_associations_per_peer`` is rejected here,
at its A-ASSOCIATE-RQ (transient, "local limit exceeded"), and so is an association beyond
``dicom.max_associations`` admitted ones (``AssociationSlots``, counted across worker processes);
connections that have not yet sent their request do not count (the gate bounds them).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .. import dicom_status
from ..archive import Archive
from ..index import IndexUnavailable
from ..nodes import Node
from . import audited, connections, pynetdicom_ext, subops, tls
from .connections import AssociationSlots, Connection
from .find import find_responses, status_with_comment
from .get import get_responses
from .move import MoveRequest, move_responses
from .plugin_services import QUERY_RETRIEVE_MODELS, PluginServices

log = logging.getLogger(__name__)

MAX_RECEIVE_PDU = 131072  # DCMTK's own maximum (ASC_MAXIMUMPDUSIZE)
# pynetdicom's own association limit counts every association thread, connections still waiting
# for their request and threads outliving their connection included: ours is AssociationSlots.
PYNETDICOM_LIMIT_FACTOR = 10


@dataclass
class AssociationStats:
    """What one association did, for its closing log line."""

    peer: str
    counts: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Admission:
    """``_on_requested``'s positive decision, kept on the association: the registered node that
    matched, or None for an unknown peer admitted by ``dicom.accept_unknown_nodes``."""

    node: Node | None


# A-ASSOCIATE-RJ result, source, reason (PS3.8 9.3.4).
# Permanent, by the service user, "calling AE title not recognised".
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)
# Transient, by the service provider (presentation), "local limit exceeded", as pynetdicom.
REJECT_OVER_LIMIT = (0x02, 0x03, 0x02)
# Transient, by the service user, "no reason given": our fault, the peer may retry.
REJECT_INTERNAL_ERROR = (0x02, 0x01, 0x01)


def _peer(event: Any) -> str:
    return _peer_of(event.assoc)


def _peer_of(assoc: Any) -> str:
    return f"{assoc.requestor.ae_title}@{assoc.requestor.address}:{assoc.requestor.port}"


def _peer_of_request(assoc: Any) -> str:
    """The peer of an association being requested (its AE title is only in the request yet).

    Never raises: it names the peer in the log line of a failed access check, which must not fail.
    """
    try:
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        return f"{calling}@{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:
        return "an unidentified peer"


class DicomListener:
    """Owns the AE and the association server; ``start`` returns once the port is listening."""

    def __init__(self, archive: Archive, slots: AssociationSlots | None = None) -> None:
        """``slots``: the count shared with the other worker processes; None, this process alone."""
        self.archive = archive
        self.settings = archive.settings
        self.index = archive.index
        self.ingestor = archive.ingestor
        self.store = archive.blobs
        self.registry = archive.nodes
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        d = self.settings.dicom
        self.slots = slots or AssociationSlots(
            multiprocessing.get_context("spawn").Array("i", 1), 0, d.max_associations
        )
        self.server: connections.HandoffServer | None = None
        self._listeners: connections.Listeners | None = None
        self._gate: connections.ConnectionGate | None = None
        # Plugins' SOP classes (the dicom_services hook): their contexts and handlers.
        self.plugin_services = PluginServices(archive.plugins.dicom_services(), self._refusal, self._count)
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        d = self.settings.dicom
        ae = AE(ae_title=d.ae_title)
        ae.maximum_associations = PYNETDICOM_LIMIT_FACTOR * d.max_associations
        # The largest P-DATA PDU we accept (pynetdicom's default is 16 KB). Peers fragment what they
        # send us to this size: DCMTK then sends a CT slice in 5 PDUs instead of 33 (~10 % faster).
        ae.maximum_pdu_size = MAX_RECEIVE_PDU
        ae.network_timeout = d.network_timeout
        ae.acse_timeout = d.client_timeout
        ae.dimse_timeout = d.client_timeout
        ae.connection_timeout = d.client_timeout  # C-MOVE destinations we connect to
        ae.require_called_aet = not d.accept_any_called_ae
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # pynetdicom accepts the first of *our* syntaxes that the peer proposed: prefer Explicit VR
        # Little Endian over pynetdicom's default Implicit, so that a peer offering both (storescu,
        # getscu) sends or receives explicit VRs, and a C-GET needs no conversion of explicit files.
        syntaxes = [ExplicitVRLittleEndian, *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]
        for context in AllStoragePresentationContexts:
            # Both roles: peers store to us, and a C-GET requestor asks to be the Storage SCP.
            ae.add_supported_context(context.abstract_syntax, syntaxes, scu_role=True, scp_role=True)
        for model in QUERY_RETRIEVE_MODELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        self.plugin_services.add_contexts(ae)
        return ae

    def start(self) -> None:
        """Listen on the DICOM port (and the TLS port) and serve in this process (``dicom.workers = 1``).

        Raises ConfigError for an unusable TLS certificate or key, OSError for a port in use.
        """
        d = self.settings.dicom
        context = tls.server_context(d)
        self.server = self.handoff_server()
        gate = connections.ConnectionGate(d)

        def dispatch(sock: socket.socket, connection: Connection) -> None:
            assert self.server is not None
            connections.serve(
                self.server,
                sock,
                connection,
                tls=context,
                timeout=d.pre_association_timeout,
                on_requested=gate.requested,
                on_ended=lambda cid, assoc: (self.connection_ended(assoc), gate.closed(cid)),
            )

        self._listeners = connections.Listeners(d, gate, dispatch)
        self._listeners.bind()
        self._listeners.start()
        self._gate = gate
        log.info("DICOM listener on %s:%d, AE title %s%s", d.bind, d.port, d.ae_title, tls.listening_line(d))

    def handoff_server(self) -> connections.HandoffServer:
        """pynetdicom's server for connections accepted by ``connections.Listeners`` (here or in the main process)."""
        d = self.settings.dicom
        server = connections.HandoffServer(
            self.ae, (d.bind, d.port), d.ae_title, self.ae.supported_contexts, evt_handlers=self.prepare()
        )
        server.listener = self  # keeps it alive for the handlers bound to its methods
        return server

    def connection_ended(self, assoc: Any) -> None:
        """A connection served here ended: its association's slot (if it had one) is free again."""
        if assoc is not None and getattr(assoc, "macpacs_slot", False):
            assoc.macpacs_slot = False
            self.slots.give()

    def prepare(self) -> list[tuple[Any, Any]]:
        """Apply our pynetdicom changes in this process; return the event handlers to serve with.

        ``start`` listens with them; a worker process (``workers.py``) serves connections that the
        main process accepted and handed over. Raises PynetdicomMismatch (a ConfigError) when the
        installed pynetdicom lacks an internal they rely on.
        """
        # Incoming datasets go straight to a staged file of the blob store, so ingest can put it.
        clock = pynetdicom_ext.apply(self.settings.dicom.reactor_poll_ms, self.store.stage)
        handlers = [
            (evt.EVT_CONN_OPEN, clock.opened),
            (evt.EVT_CONN_CLOSE, clock.closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        return self.plugin_services.bind(handlers)

    def stop(self) -> None:
        if self._listeners is not None:
            self._listeners.stop()
            self._listeners = None
        if self.server is not None:
            abort_all(self.server)
            self.server.server_close()
            self.server = None

    def snapshot(self) -> dict[str, Any]:
        """Admitted associations and open connections, in this process (``/health``; workers.py has the same)."""
        connected = self._gate.snapshot() if self._gate is not None else {}
        return {"associations": self.slots.total(), "workers": [], **connected}

    # -- association bookkeeping ---------------------------------------------------------------
    def _count(self, assoc: Any, what: str) -> None:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is not None:
                stats.counts[what] += 1

    def _on_requested(self, event: Any) -> None:
        """Access control at association time, failing closed (see the module docstring).

        pynetdicom calls this as a *notification* handler: an exception escaping it is logged
        and the association goes on to be accepted. So nothing escapes: any error while the
        association is checked (an unreadable index page, no file descriptor left...) rejects
        it, and only a positive decision (``_admit``) lets it through.
        """
        assoc = event.assoc
        try:
            rejection = self._admit(assoc)
        except IndexUnavailable as exc:  # the database server is down or restarting: the peer retries
            log.error("association from %s rejected (transient): %s", _peer_of_request(assoc), exc)
            rejection = REJECT_INTERNAL_ERROR
        except Exception as exc:
            log.error(
                "association from %s rejected: internal error in the DICOM access check (the calling AE "
                "title's lookup in the nodes table of the index, dimse/scp.py): %s: %s. The peer may retry; "
                "if this repeats, the index may be damaged or the server out of file descriptors: see the "
                "traceback below and /health",
                _peer_of_request(assoc),
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            rejection = REJECT_INTERNAL_ERROR
        if rejection is not None:
            self._reject(assoc, rejection)

    def _admit(self, assoc: Any) -> tuple[int, int, int] | None:
        """Decide on one association: None when admitted (the decision is kept on ``assoc``), else
        the A-ASSOCIATE-RJ's result, source and reason. Logs why a peer is rejected."""
        d = self.settings.dicom
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        if getattr(assoc, "macpacs_peer_over_limit", False):
            # The accepting process counts connections per address (connections.ConnectionGate).
            log.warning(
                "association from %s rejected: more than dicom.max_associations_per_peer (%d) connections "
                "from %s are open; raise the setting if this peer needs more at once",
                _peer_of_request(assoc),
                d.max_associations_per_peer,
                assoc.requestor.address,
            )
            return REJECT_OVER_LIMIT
        node = self.registry.access_for(calling, assoc.requestor.address)
        if node is None and not self.settings.dicom.accept_unknown_nodes:
            registered = self.registry.by_ae_title(calling)
            if registered is None:
                why = "is not a registered node"
            elif registered.status != "active":
                why = f"is node {registered.name!r}, awaiting approval (status {registered.status})"
            else:
                why = f"is node {registered.name!r}, registered at {registered.host}, not this address"
            log.warning(
                "association from %s rejected: calling AE title %r %s and dicom.accept_unknown_nodes is false",
                _peer_of_request(assoc),
                calling,
                why,
            )
            return REJECT_UNKNOWN_CALLING_AE
        if not self.slots.take():
            log.warning(
                "association from %s rejected: dicom.max_associations (%d) associations are open",
                _peer_of_request(assoc),
                d.max_associations,
            )
            return REJECT_OVER_LIMIT
        assoc.macpacs_slot = True  # given back when the connection ends (connection_ended)
        assoc.macpacs_admission = Admission(node)
        return None

    @staticmethod
    def _reject(assoc: Any, rejection: tuple[int, int, int]) -> None:
        """Send the A-ASSOCIATE-RJ and end the association; abort it if even the reject cannot be sent."""
        try:
            assoc.acse.send_reject(*rejection)
        except Exception:
            log.exception("could not send the A-ASSOCIATE-RJ to %s: aborting the association", _peer_of_request(assoc))
            assoc.abort()
        # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ is out and the
        # connection closed, else the socket closes first and the peer sees an abort.
        assoc.kill()

    def _refusal(self, assoc: Any, operation: str) -> str | None:
        """Why the peer of ``assoc`` may not perform ``operation``, or None when it may.

        Fails closed: an association without an admission decision (its check never completed)
        may do nothing.
        """
        admission: Admission | None = getattr(assoc, "macpacs_admission", None)
        if admission is None:
            message = "the association's access check did not complete (internal error: see the server log)"
            log.error("%s refused from %s: %s", operation, _peer_of(assoc), message)
            return message
        node = admission.node
        if node is None or node.allows(operation):
            return None
        message = f"node {node.name} ({node.ae_title}) is not allowed to {operation}"
        log.warning("%s refused from %s: %s (change it with `macpacs nodes edit`)", operation, _peer_of(assoc), message)
        return message

    def _on_accepted(self, event: Any) -> None:
        # After its first C-STORE, this association's next ones are read off the socket directly.
        event.assoc.macpacs_store = self._store
        with self._lock:
            self._stats[id(event.assoc)] = AssociationStats(_peer(event))
        log.info("association accepted from %s%s", _peer(event), tls.peer_description(event.assoc.dul.socket.socket))

    def _on_rejected(self, event: Any) -> None:
        log.warning("association rejected from %s (called AE %r)", _peer(event), event.assoc.acceptor.ae_title)

    def _on_closed(self, event: Any) -> None:
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if how == "aborted":
            self._discard_partial(event)
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:  # never associated (a connection the gate closed, aborted at stop): nothing to say
            return
        summary = ", ".join(f"{n} {k}" for k, n in sorted(stats.counts.items())) if stats.counts else "idle"
        level = logging.INFO if how == "released" else logging.WARNING
        log.log(level, "association %s by %s: %s", how, _peer(event), summary)
        audited.stored(self.archive.audit, event.assoc, stats.counts, how)

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
        self._count(event.assoc, "echo")
        return 0x0000

    def _on_store(self, event: Any) -> Any:
        return self._store(event.assoc, Path(event.dataset_path), event.request.AffectedSOPInstanceUID)

    def _store(self, assoc: Any, path: Path, sop_instance_uid: str, content_hash: str = "") -> Any:
        """One C-STORE, from pynetdicom's event or store_scp's direct path (which hashed the dataset as
        it arrived: ``content_hash``): a status or status dataset."""
        refused = self._refusal(assoc, "store")
        if refused:
            self._count(assoc, "refused")
            return status_with_comment(dicom_status.NOT_AUTHORIZED, refused)
        result = self.ingestor.ingest(
            path,
            via="c-store",
            source=assoc.requestor.ae_title,
            announced_uid=str(sop_instance_uid),
            content_hash=content_hash,
        )
        self._count(assoc, result.outcome.value)
        if result.ok:
            if result.outcome.value != "stored":
                log.info("C-STORE %s from %s: %s", result.sop_instance_uid, _peer_of(assoc), result.message)
            return result.dicom_status
        log.error(
            "C-STORE refused from %s, SOP Instance UID %s: %s (status 0x%04X)",
            _peer_of(assoc),
            sop_instance_uid,
            result.message,
            result.dicom_status,
        )
        return status_with_comment(result.dicom_status, result.message)

    def _on_find(self, event: Any) -> Any:
        self._count(event.assoc, "find")
        refused = self._refusal(event.assoc, "query")
        if refused:
            yield status_with_comment(dicom_status.NOT_AUTHORIZED, refused), None
            return
        d = self.settings.dicom
        responses = find_responses(
            self.index,
            event.identifier,
            event.request.AffectedSOPClassUID,
            event.context.transfer_syntax,
            case_insensitive=d.case_insensitive_names,
            max_results=d.max_find_results,
            retrieve_ae=d.ae_title,
        )
        yield from audited.find(self.archive.audit, event.assoc, event.identifier, responses)

    def _on_move(self, event: Any) -> Any:
        self._count(event.assoc, "move")
        refused = self._refusal(event.assoc, "retrieve")
        if refused:
            return iter([subops.Response(dicom_status.NOT_AUTHORIZED, comment=refused)])
        request = MoveRequest(
            requestor=_peer(event),
            requestor_ae=str(event.assoc.requestor.ae_title).strip(),
            destination=str(event.request.MoveDestination).strip(),
            identifier=event.identifier,
            model=str(event.request.AffectedSOPClassUID),
            message_id=int(event.request.MessageID),
            is_cancelled=subops.Cancel(lambda: event.is_cancelled),
        )
        responses = move_responses(
            request,
            ae=self.ae,
            index=self.index,
            store=self.store,
            registry=self.registry,
            case_insensitive=self.settings.dicom.case_insensitive_names,
        )
        how = f"C-MOVE to {request.destination}"
        return audited.retrieve(self.archive.audit, self.index, event.assoc, event.identifier, how, responses)

    def _on_get(self, event: Any) -> Any:
        self._count(event.assoc, "get")
        refused = self._refusal(event.assoc, "retrieve")
        if refused:
            return iter([subops.Response(dicom_status.NOT_AUTHORIZED, comment=refused)])
        responses = get_responses(
            event.assoc,
            event.identifier,
            str(event.request.AffectedSOPClassUID),
            int(event.request.MessageID),
            subops.Cancel(lambda: event.is_cancelled),
            index=self.index,
            store=self.store,
            case_insensitive=self.settings.dicom.case_insensitive_names,
        )
        return audited.retrieve(self.archive.audit, self.index, event.assoc, event.identifier, "C-GET", responses)


def abort_all(server: Any) -> None:
    """Abort the associations of ``server`` (at most a second), so that their peers know."""
    aborting = [
        threading.Thread(target=assoc.abort, daemon=True) for assoc in server.active_associations if assoc.is_alive()
    ]
    for thread in aborting:
        thread.start()
    deadline = time.monotonic() + 1.0
    for thread in aborting:
        thread.join(max(0.0, deadline - time.monotonic()))
