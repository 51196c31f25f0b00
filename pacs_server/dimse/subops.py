"""C-STORE sub-operations, shared by C-MOVE, C-GET and ``macpacs send``.

Stored instances go out exactly as they were received: the file is streamed from disk after
its file meta (as pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` does, never decoded) under a presentation context whose
transfer syntax is the stored one. When the peer accepted only uncompressed transfer syntaxes
for that SOP class, pydicom decompresses the instance first; when that is impossible, the
sub-operation fails and is counted as failed (PS3.4 C.4.2.3).

pynetdicom's own C-MOVE/C-GET SCP needs decoded datasets, proposes every context of the AE on
a single association and cannot go past 128 contexts, so ``pynetdicom_ext.apply`` replaces its
service class for the Query/Retrieve models with ``RetrieveServiceClass``: a thin adapter that sends the
responses our handlers (``move.py``, ``get.py``) yield.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import BasicWorklistManagementServiceClass, QueryRetrieveServiceClass
from pynetdicom.status import code_to_category

from .. import dicom_status
from ..index import StoredInstance
from ..index.attributes import UNIQUE_KEYS
from ..nodes import Node
from ..retrieve import locate, open_instance
from ..storage import BlobStore
from . import codec, pynetdicom_ext
from .find import IdentifierError, identifier_to_query, serve_find

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts in one association (odd IDs 1..255)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

PENDING_EVERY = 0.05  # seconds between two pending responses (they are optional; each costs a message)


@dataclass
class Progress:
    """Sub-operation counts of one retrieve or send."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def fail(self, uid: str) -> None:
        self.failed += 1
        self.failed_uids.append(uid)

    def fail_rest(self, uids: Iterable[str]) -> None:
        for uid in uids:
            self.fail(uid)

    def final_status(self) -> int:
        """Success, warning (some failed or warned) or failure (all failed), PS3.4 C.4.2.1.5."""
        if not self.failed and not self.warning:
            return dicom_status.SUCCESS
        if self.failed == self.total:
            return dicom_status.SUBOPERATIONS_IMPOSSIBLE
        return dicom_status.WARNING_SUBOPERATIONS

    def summary(self) -> str:
        return f"{self.completed} completed, {self.warning} warning, {self.failed} failed, {self.remaining} remaining"


@dataclass
class Response:
    """One C-MOVE/C-GET response for ``RetrieveServiceClass`` to send."""

    status: int
    progress: Progress | None = None
    comment: str = ""
    final: bool = True

    @classmethod
    def pending(cls, progress: Progress) -> Response:
        return cls(dicom_status.PENDING, progress, final=False)


# -- presentation contexts --------------------------------------------------------------------
def plan_contexts(instances: Sequence[StoredInstance]) -> list[list[PresentationContext]]:
    """Contexts for exactly the SOP classes being sent, packed into associations of ≤128.

    Each (SOP class, stored transfer syntax) pair gets its own single-syntax context, so the
    peer cannot pick a different syntax than the file's; each SOP class also gets a context
    with the uncompressed syntaxes not already proposed, used when the peer refuses the stored one.
    """
    by_class: dict[str, list[str]] = {}
    for inst in instances:
        syntaxes = by_class.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax_uid not in syntaxes:
            syntaxes.append(inst.transfer_syntax_uid)
    groups: list[list[PresentationContext]] = [[]]
    for sop_class, syntaxes in by_class.items():
        contexts = [build_context(sop_class, [ts]) for ts in syntaxes]
        fallback = [ts for ts in UNCOMPRESSED if ts not in syntaxes]
        if fallback:
            contexts.append(build_context(sop_class, fallback))
        if len(groups[-1]) + len(contexts) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(contexts)
    return [g for g in groups if g]


def classes_of(contexts: Iterable[PresentationContext]) -> set[str]:
    return {str(cx.abstract_syntax) for cx in contexts}


# -- sending one instance ---------------------------------------------------------------------
class SubOperationError(Exception):
    """One instance could not be sent (no usable context, unreadable file, conversion impossible)."""


class AssociationLost(Exception):
    """The peer released or aborted the association in the middle of the sub-operations."""


def accepted_contexts(assoc: Any) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) → ID of a context we may send C-STOREs on over this association."""
    out: dict[tuple[str, str], int] = {}
    for cx in assoc.accepted_contexts:
        if assoc.is_acceptor and not cx.as_scu:  # C-GET: only contexts where the peer took the SCP role
            continue
        out.setdefault((str(cx.abstract_syntax), str(cx.transfer_syntax[0])), cx.context_id)
    return out


class Channel:
    """C-STOREs on one association, one after the other, without pynetdicom's reactor in the way.

    ``Association.send_c_store`` pauses and resumes the association's reactor around every
    message; when the peer answers fast, the resumed reactor can take the next C-STORE response
    off the queue before ``send_c_store`` looks for it ("Received unexpected C-STORE service
    message", then a DIMSE timeout): it happened about once per 200 CT slices on loopback. A
    channel pauses the reactor once for the whole batch (``open``) and resumes it at the end
    (``close``). On a C-GET the handler already runs in the reactor's thread, so nothing to pause.
    """

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.contexts = accepted_contexts(assoc)
        self.syntaxes: dict[str, set[str]] = {}
        for sop_class, ts in self.contexts:
            self.syntaxes.setdefault(sop_class, set()).add(ts)
        self._paused = False
        self._direct = False
        self._socket_timeout: float | None = None
        self.cancel = Cancel()

    def open(self, cancel: Cancel | None = None) -> Channel:
        assoc = self.assoc
        self.cancel = cancel or self.cancel
        # Responses are read here, not by pynetdicom's DUL thread, which is told the socket is
        # not ready (see ``pynetdicom_ext._ready``): its PDU, state-machine and pydicom decoding path cost
        # ~0.4 ms per instance. The DUL still sends whatever is queued (C-GET pending responses).
        pynetdicom_ext.take_socket(assoc.dul)
        self._direct = True
        # Waiting for a response is bounded by the DIMSE timeout (the socket had the network one).
        self._socket_timeout = assoc.dul.socket.socket.gettimeout()
        assoc.dul.socket.socket.settimeout(assoc.dimse_timeout or self._socket_timeout)
        if assoc.is_requestor:
            assoc._reactor_checkpoint.clear()
            # Seen paused for 2 ms in a row: the reactor is blocked on the checkpoint, not just
            # leaving it (it sets _is_paused back to False right after waking).
            steady_since = None
            while assoc.is_established:
                if not assoc._is_paused:
                    steady_since = None
                elif steady_since is None:
                    steady_since = time.monotonic()
                elif time.monotonic() - steady_since > 0.002:
                    break
                time.sleep(0.0002)
            self._paused = True
        else:
            time.sleep(0.002)  # a PDU the DUL thread was already reading goes its usual way
        return self

    def close(self) -> None:
        if self._direct:
            if self.assoc.dul.socket.socket is not None:
                self.assoc.dul.socket.socket.settimeout(self._socket_timeout)
            pynetdicom_ext.give_back_socket(self.assoc.dul)
            self.assoc.dul._idle_timer.restart()
            self._direct = False
        if self._paused:
            self.assoc._reactor_checkpoint.set()
            self._paused = False

    def prepare(self, store: BlobStore, inst: StoredInstance) -> tuple[int, bytes | memoryview]:
        """The context ID and encoded dataset to send ``inst`` with; SubOperationError when impossible.

        Reads the file through the one retrieve path. ``send_all`` calls it for the next instance
        between sending one and reading its response, so the read overlaps the peer's work.
        """
        syntaxes = self.syntaxes.get(inst.sop_class_uid, set())
        try:
            fh = open_instance(store, inst)
        except OSError as exc:  # FileMissing, or an object store that did not answer (StorageError)
            raise SubOperationError(str(exc)) from None
        with fh:
            if inst.transfer_syntax_uid in syntaxes:
                # The file as stored, after its file meta, never decoded.
                try:
                    return self.contexts[(inst.sop_class_uid, inst.transfer_syntax_uid)], codec.read_dataset(fh)
                except Exception as exc:
                    raise SubOperationError(f"stored file of {inst.sop_instance_uid} is unreadable: {exc}") from None
            if syntaxes & set(UNCOMPRESSED):
                ds, target = _converted(fh, inst, syntaxes)
                return self.contexts[(inst.sop_class_uid, str(target))], encode(ds, target.is_implicit_VR, True, False)
        raise SubOperationError(
            f"the peer accepted no presentation context for SOP class {inst.sop_class_uid} "
            f"in {UID(inst.transfer_syntax_uid).name} or an uncompressed transfer syntax"
        )

    def send(
        self,
        inst: StoredInstance,
        prepared: tuple[int, bytes | memoryview],
        *,
        msg_id: int,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> float:
        """Write the C-STORE request of a prepared instance; returns when it went out, for
        ``response``. Raises AssociationLost when the association went away."""
        context_id, dataset = prepared
        assoc = self.assoc
        if not assoc.is_established or not assoc.dul.is_alive():
            raise AssociationLost("the association ended before this sub-operation")
        command = codec.store_command(inst.sop_class_uid, inst.sop_instance_uid, msg_id, originator_aet, originator_id)
        started = time.monotonic()
        try:
            pynetdicom_ext.write_message(assoc, context_id, command, dataset)
        except OSError as exc:
            raise AssociationLost(f"the connection failed while sending: {exc}") from None
        return started

    def response(self, started: float) -> int:
        """Wait for the peer's C-STORE response; returns its status. AssociationLost when the
        association went away or the DIMSE timeout passed since ``started``."""
        if self._direct:
            return self._read_response(started)
        assoc = self.assoc
        _cx, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:
            # No response: the DIMSE timeout expired, or the peer aborted / closed the connection.
            timeout = assoc.dimse_timeout
            if timeout and time.monotonic() - started >= timeout:
                raise AssociationLost(f"no C-STORE response within {timeout} s (dicom.client_timeout)")
            raise AssociationLost("the peer aborted the association")
        status = getattr(rsp, "Status", None)
        if status is None:
            raise SubOperationError("the peer's C-STORE response has no status")
        return int(status)

    def _read_response(self, started: float) -> int:
        """Read messages from the socket until the C-STORE-RSP; a C-CANCEL-RQ on the way is noted."""
        assoc = self.assoc
        sock = assoc.dul.socket.socket
        timeout = assoc.dimse_timeout
        while True:
            try:
                command = codec.parse_command(codec.read_command(sock))
            except codec.ProtocolError as exc:  # an A-ABORT, or a release request that has no place here
                raise AssociationLost(str(exc)) from None
            except TimeoutError:
                raise AssociationLost(f"no C-STORE response within {timeout} s (dicom.client_timeout)") from None
            except OSError as exc:
                raise AssociationLost(f"the connection failed: {exc}") from None
            assoc.dul._idle_timer.restart()
            field = command.us.get(0x0100) if command else None
            if field == codec.C_CANCEL_RQ:  # from a C-GET requestor
                self.cancel.set()
                continue
            status = command.us.get(0x0900) if command else None
            if field != codec.C_STORE_RSP or status is None:
                raise SubOperationError(f"the peer answered with command {field!r}, not a C-STORE response")
            return status


def _converted(fh: BinaryIO, inst: StoredInstance, syntaxes: set[str]) -> tuple[Dataset, UID]:
    """The instance decoded and, if compressed, decompressed, for an uncompressed context."""
    try:
        fh.seek(0)
        ds = pydicom.dcmread(fh)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)  # the same instance, only re-encoded
    except Exception as exc:
        raise SubOperationError(
            f"instance {inst.sop_instance_uid} is stored as {UID(inst.transfer_syntax_uid).name}, which the peer "
            f"refused, and cannot be converted: {exc}"
        ) from None
    target = ExplicitVRLittleEndian if ExplicitVRLittleEndian in syntaxes else ImplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = target
    return ds, target


def status_kind(status: int) -> str:
    """'completed', 'warning' or 'failed' for a C-STORE response status."""
    category = code_to_category(status)
    if category == "Success":
        return "completed"
    if category == "Warning":
        return "warning"
    return "failed"


def record(progress: Progress, inst: StoredInstance, status: int) -> None:
    kind = status_kind(status)
    if kind == "completed":
        progress.completed += 1
    elif kind == "warning":
        progress.warning += 1
    else:
        progress.fail(inst.sop_instance_uid)
        log.warning("C-STORE of %s refused by the peer with status 0x%04X", inst.sop_instance_uid, status)


class Cancel:
    """Whether the requestor sent a C-CANCEL; stays true once true.

    pynetdicom forgets a C-CANCEL after reporting it once, and on a C-GET whose responses a
    Channel reads itself the C-CANCEL is seen by the channel, which calls ``set``.
    """

    def __init__(self, check: Callable[[], bool] = lambda: False) -> None:
        self.check = check
        self.seen = False

    def set(self) -> None:
        self.seen = True

    def __call__(self) -> bool:
        self.seen = self.seen or self.check()
        return self.seen


class Pacer:
    """Yields a pending response at most every PENDING_EVERY seconds (and for the first sub-operation)."""

    def __init__(self) -> None:
        self.last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= PENDING_EVERY:
            self.last = now
            return True
        return False


# -- the service class adapter ---------------------------------------------------------------
class WorklistServiceClass(BasicWorklistManagementServiceClass):
    """Modality Worklist C-FIND (a plugin's ``DicomService.find``), its responses framed and written
    by ``serve_find`` as the archive's own C-FIND is, not one PDU per reactor loop (~0.5 ms a match)."""

    def _c_find_scp(self, req: Any, context: Any) -> None:
        serve_find(self, req, context)


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """Query/Retrieve service class whose C-FIND, C-MOVE and C-GET are served by our handlers.

    The handler bound to EVT_C_MOVE / EVT_C_GET returns an iterator of ``Response``; this
    class only turns each into a DIMSE response on the requestor's association.
    """

    def _c_find_scp(self, req: Any, context: Any) -> None:
        serve_find(self, req, context)  # responses framed and written directly (find.py)

    def _move_scp(self, req: C_MOVE, context: Any) -> None:
        self._serve(req, context, evt.EVT_C_MOVE, codec.C_MOVE_RSP)

    def _get_scp(self, req: C_GET, context: Any) -> None:
        self._serve(req, context, evt.EVT_C_GET, codec.C_GET_RSP)

    def _serve(self, req: Any, context: Any, event: Any, command_field: int) -> None:
        def send(response: Response) -> None:
            self._send(response, command_field, str(req.AffectedSOPClassUID), req.MessageID, context)

        # While the handler runs (in this association's reactor thread) the requestor's side of
        # the association only carries a possible C-CANCEL in, and our responses, written
        # directly: its DUL thread need not loop every millisecond meanwhile (it still wakes at
        # once when the peer sends or a primitive is queued: pynetdicom_ext.ReactorClock).
        dul = self.assoc.dul
        delay, dul._run_loop_delay = dul._run_loop_delay, pynetdicom_ext.DIRECT_READ_POLL
        try:
            responses = evt.trigger(
                self.assoc, event, {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled}
            )
            for response in responses:
                if not self.assoc.is_established:
                    return
                send(response)
                if response.final:
                    return
        except Exception:
            log.exception("retrieve handler failed")
            if self.assoc.is_established:
                send(Response(dicom_status.UNABLE_TO_PROCESS, comment="internal error, see the server log"))
        finally:
            dul._run_loop_delay = delay

    def _send(self, response: Response, command_field: int, sop_class: str, msg_id: int, context: Any) -> None:
        p = response.progress
        counts: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
        if p is not None:
            in_progress = response.status in (dicom_status.PENDING, dicom_status.CANCEL)
            # US values (at most 65,535): a larger retrieve is still done whole, its counts saturate.
            remaining = min(p.remaining, 0xFFFF) if in_progress else None
            counts = (remaining, min(p.completed, 0xFFFF), min(p.failed, 0xFFFF), min(p.warning, 0xFFFF))
        dataset = None
        if p is not None and response.final and p.failed_uids:
            ts = context.transfer_syntax[0]
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = p.failed_uids
            dataset = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        status = response.status
        comment = response.comment if status not in (dicom_status.SUCCESS, dicom_status.PENDING) else None
        command = codec.response_command(
            command_field, sop_class, msg_id, status, dataset=dataset is not None, comment=comment, counts=counts
        )
        # Written directly, like the C-STOREs (see pynetdicom_ext.write_message), so that pynetdicom's outgoing
        # queue stays empty and a C-STORE never waits behind a pending response.
        pynetdicom_ext.write_message(self.assoc, context.context_id, command, dataset)


def send_all(
    assoc: Any,
    store: BlobStore,
    instances: Sequence[StoredInstance],
    progress: Progress,
    *,
    first_msg_id: int = 1,
    originator_aet: str | None = None,
    originator_id: int | None = None,
    is_cancelled: Cancel | None = None,
) -> Iterator[StoredInstance]:
    """Send ``instances`` over ``assoc``, updating ``progress``; yields each instance once sent.

    Stops early (leaving the rest as remaining) when ``is_cancelled`` turns true, and raises
    AssociationLost when the peer goes away.
    """
    is_cancelled = is_cancelled or Cancel()
    channel = Channel(assoc).open(is_cancelled)
    msg_id = first_msg_id

    def prepare(inst: StoredInstance) -> tuple[int, bytes | memoryview] | SubOperationError:
        try:
            return channel.prepare(store, inst)
        except SubOperationError as exc:
            return exc

    try:
        if not instances:
            return
        upcoming = prepare(instances[0])
        for n, inst in enumerate(instances):
            if is_cancelled():
                return
            current = upcoming
            following = instances[n + 1] if n + 1 < len(instances) else None
            read_ahead = False
            try:
                if isinstance(current, SubOperationError):
                    raise current
                started = channel.send(
                    inst, current, msg_id=msg_id, originator_aet=originator_aet, originator_id=originator_id
                )
                # The next file is read while the peer takes this one in: the overlap a reader
                # thread gave, without its hand-off per instance (~0.1 ms of CPU).
                if following is not None:
                    upcoming, read_ahead = prepare(following), True
                record(progress, inst, channel.response(started))
            except SubOperationError as exc:
                log.warning("sub-operation for %s failed: %s", inst.sop_instance_uid, exc)
                progress.fail(inst.sop_instance_uid)
            if following is not None and not read_ahead:
                upcoming = prepare(following)
            msg_id = msg_id % 65535 + 1
            yield inst
    finally:
        channel.close()


# -- what to retrieve ---------------------------------------------------------------------------
# C-MOVE/C-GET model → the C-FIND model of the same root (same levels).
FIND_MODEL = {
    "1.2.840.10008.5.1.4.1.2.1.2": "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root GET
    "1.2.840.10008.5.1.4.1.2.2.2": "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root MOVE
    "1.2.840.10008.5.1.4.1.2.2.3": "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root GET
}


def match_instances(index: Any, identifier: Dataset, model: str, *, case_insensitive: bool) -> list[StoredInstance]:
    """The stored instances a C-MOVE/C-GET identifier asks for, through the one retrieve path.

    The unique key of the retrieve level must be given, without wildcards (PS3.4 C.4.2.2.1);
    otherwise IdentifierError with status 0xA900.
    """
    query = identifier_to_query(identifier, FIND_MODEL.get(str(model), str(model)), case_insensitive=case_insensitive)
    unique = UNIQUE_KEYS[query.level]
    value = (query.keys.get(unique) or "").strip()
    if not value or "*" in value or "?" in value:
        raise IdentifierError(
            dicom_status.DOES_NOT_MATCH_SOP_CLASS,
            f"a retrieve at {query.level} level needs {unique} (no wildcards)",
        )
    return locate(index, query.keys, case_insensitive=case_insensitive)


# -- associations we open ------------------------------------------------------------------------
class PeerError(RuntimeError):
    """A node could not be reached, refused the association or did not answer; the message says which."""


REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "our calling AE title is not recognised: register us on that node",
    (1, 7): "its called AE title is not the one registered here",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded (too many associations)",
}


def associate(ae: Any, node: Node, contexts: list[PresentationContext], **kwargs: Any) -> Any:
    """An established association with ``node`` proposing ``contexts``, or PeerError saying why not."""
    where = f"node {node.name} ({node.ae_title}@{node.host}:{node.port})"
    if node.tls:
        tls = ssl.create_default_context()
        kwargs["tls_args"] = (tls, node.host)
    try:
        assoc = ae.associate(node.host, node.port, contexts=contexts, ae_title=node.ae_title, **kwargs)
    except (OSError, ValueError) as exc:
        raise PeerError(f"{where}: cannot connect: {exc}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = REJECT_REASONS.get((rsp.result_source, rsp.diagnostic), f"diagnostic {rsp.diagnostic}")
        raise PeerError(f"{where} rejected the association: {reason}")
    raise PeerError(f"{where}: {_unreachable(node, ae.connection_timeout or ae.acse_timeout)}")


def _unreachable(node: Node, timeout: float | None) -> str:
    """Why a TCP connection to the node fails (refused, timed out, unknown host), in words."""
    try:
        with socket.create_connection((node.host, node.port), timeout=timeout or 10) as sock:
            if node.tls:
                # pynetdicom logs a failed TLS handshake and reports no reason: redo it to name it.
                ssl.create_default_context().wrap_socket(sock, server_hostname=node.host).close()
            return f"the association was aborted or not answered within {timeout} s (dicom.client_timeout)"
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS: the node's certificate is not trusted ({exc.verify_message}): add the CA that signed it "
            "to this host's trust store (or set SSL_CERT_FILE for the server)"
        )
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc}): does the node speak TLS on that port?"
    except TimeoutError:
        return f"no answer within {timeout} s (dicom.client_timeout): host down or port filtered"
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except socket.gaierror as exc:
        return f"unknown host name ({exc.strerror})"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"


def send_to_node(
    ae: Any,
    node: Node,
    store: BlobStore,
    instances: list[StoredInstance],
    progress: Progress,
    is_cancelled: Cancel | None = None,
    originator: tuple[str, int] | None = None,
) -> Iterator[Response]:
    """C-STORE ``instances`` to ``node`` on one association per group of ≤128 contexts.

    Yields pending responses as it goes. A destination that cannot be reached or refuses the
    association fails the instances of that association; one that aborts half-way fails the
    rest. The archive itself is only read.
    """
    pacer = Pacer()
    is_cancelled = is_cancelled or Cancel()
    originator_aet, originator_id = originator if originator else (None, None)
    for contexts in plan_contexts(instances):
        classes = classes_of(contexts)
        batch = [inst for inst in instances if inst.sop_class_uid in classes]
        if is_cancelled():
            return
        try:
            assoc = associate(ae, node, contexts)
        except PeerError as exc:
            log.error("cannot send %d instances: %s", len(batch), exc)
            progress.fail_rest(inst.sop_instance_uid for inst in batch)
            continue
        sent = 0
        try:
            for _inst in send_all(
                assoc,
                store,
                batch,
                progress,
                originator_aet=originator_aet,
                originator_id=originator_id,
                is_cancelled=is_cancelled,
            ):
                sent += 1
                if pacer.due():
                    yield Response.pending(progress)
        except AssociationLost as exc:
            log.error("%s ended the association after %d of %d instances: %s", node.name, sent, len(batch), exc)
            progress.fail_rest(inst.sop_instance_uid for inst in batch[sent:])
            assoc.abort()  # already gone or timed out: a release would wait for an answer that never comes
        finally:
            if assoc.is_established:
                assoc.release()
