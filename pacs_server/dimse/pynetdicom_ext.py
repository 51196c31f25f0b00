"""Every change we make to pynetdicom's behaviour, applied once per process by ``apply``.

pynetdicom is right but slow where an archive is busiest, and has no options for what we change:

1. **Sockets** (``AssociationSocket``). Nagle's algorithm is turned off on every socket, accepted
   or opened: with it on, when we send a dataset and wait for the C-STORE response, the last
   partial segment waits for the peer's delayed ACK, ~40 ms per instance (a C-MOVE of 20 small
   instances took 1 s instead of 0.1 s; shared/reference/performance.md). A send lock lets
   ``write_message`` send whole messages beside pynetdicom's DUL thread, a receive lock (held by
   the DUL while it reads a PDU) lets ``store_scp`` and ``find`` take PDUs off the socket
   themselves, and ``ready`` is False while one of our readers owns the socket.

2. **Presentation contexts.** Every new association deep-copies the server's supported
   contexts. With every Storage SOP Class in every transfer syntax (~8,000 UIDs, each
   re-validated by pydicom) that took ~50 ms per association: an echoscu took 90 ms instead of
   35. The UIDs are immutable, so every association server's copies are made shallow.

3. **The reactors' clock.** The association reactor sleeps 1 ms between looks at its queue, and
   the DUL thread 1 ms after each idle loop. Every DIMSE round trip and every step of an
   association's set-up and release paid for those sleeps: an ``echoscu`` took ~11 ms against
   macpacs, ~10 ms against a bare pynetdicom server and ~3 ms against DCMTK's ``storescp``. The
   ``time`` module seen by pynetdicom's association and DUL modules is replaced by a proxy whose
   1 ms ``sleep`` ends as soon as there is work (now ~7 ms against macpacs): the DUL waits in
   ``poll`` on the peer's socket and a doorbell rung by ``send_pdu``, the association thread on
   an Event set after each event the DUL's state machine handles. Neither waits longer than
   before. While one of our readers owns the socket (``take_socket``), the DUL waits on its
   doorbell alone, every 5 ms, and is rung when the socket is given back. The interval is
   ``dicom.reactor_poll_ms`` × open associations, at most pynetdicom's 1 ms: with 0.1 ms polls a
   bare SCP went from 326 to 524 small inst/s, but several associations' polling threads then
   fought for the GIL (4 CT associations fell from 95 to 65 inst/s); since C-STOREs after an
   association's first are read off the socket directly (store_scp.py) and associations are
   served by worker processes (workers.py), the default is 1 ms.

4. **Service classes.** Storage SOP classes are served by ``store_scp.FastStorageServiceClass``,
   the Query/Retrieve models by ``subops.RetrieveServiceClass`` and the Modality Worklist model
   (a plugin's) by ``subops.WorklistServiceClass`` (``uid_to_service_class``),
   and the DUL never reads a PDU while ``store_scp`` does (``_is_transport_event``).

5. **Received datasets** are streamed to a file (``STORE_RECV_CHUNKED_DATASET``), the fastest
   pynetdicom path for large instances, and that file comes from the ``stage_file`` given to
   ``apply`` (on the data volume, so that ingest renames it into place), not from the
   process-wide temporary folder. pynetdicom writes it in its DUL thread, where an exception
   aborts the association and leaves the partial file behind; so it writes through a
   ``DrainingFile``, which keeps a failed write's error (disk full) for ``store_scp`` to answer
   0xA700 once the dataset has been read, and removes the partial file at once.

Besides these, the fast paths use pynetdicom's internals directly (``subops.Channel`` pauses the
association's reactor, ``store_scp`` reads its accepted contexts). ``check`` verifies at start-up
that every private attribute all of this relies on exists, so that a pynetdicom release that
renamed one stops ``macpacs serve`` with a message instead of failing mid-transfer;
pyproject.toml pins the minor release tests/core/test_pynetdicom_ext.py passed on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

import pynetdicom
import pynetdicom._config
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dimse_primitives
import pynetdicom.dul
import pynetdicom.fsm
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import (
    BasicWorklistManagementServiceClass,
    QueryRetrieveServiceClass,
    StorageServiceClass,
)
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from ..config import ConfigError
from ..storage import StagedFile
from . import codec

REQUIRED_VERSION = ">=3.0.4,<3.1"  # as pinned in pyproject.toml

# Private (or internal) attributes the patches and the fast paths rely on, by where they live.
_MODULE_ATTRIBUTES = {
    pynetdicom._config: ("STORE_RECV_CHUNKED_DATASET",),
    pynetdicom.association: ("uid_to_service_class", "time"),
    pynetdicom.dul: ("time",),
    pynetdicom.fsm: ("StateMachine",),
    pynetdicom.dimse_messages: ("NamedTemporaryFile",),
}
_CLASS_ATTRIBUTES = {
    pynetdicom.dul.DULServiceProvider: ("_is_transport_event", "run_reactor", "send_pdu", "assoc"),
    pynetdicom.fsm.StateMachine: ("do_action",),
    pynetdicom.dimse_primitives.C_STORE: ("_dataset_file",),
    AssociationSocket: ("ready", "send"),
    RequestHandler: ("_create_association",),
    QueryRetrieveServiceClass: ("_c_find_scp", "_move_scp", "_get_scp"),
    BasicWorklistManagementServiceClass: ("_c_find_scp",),
}
_ASSOCIATION_ATTRIBUTES = ("_accepted_cx", "_reactor_checkpoint", "_is_paused", "_abort_blocking", "dimse.message")
_DUL_ATTRIBUTES = ("_run_loop_delay", "_idle_timer", "to_provider_queue", "event_queue", "to_user_queue", "socket")


class PynetdicomMismatch(ConfigError):
    """The installed pynetdicom lacks internals macpacs relies on: the server must not start."""


def _missing_attributes() -> list[str]:
    """Names of the attributes above that the installed pynetdicom does not have."""
    missing = [
        f"{module.__name__}.{name}"
        for module, names in _MODULE_ATTRIBUTES.items()
        for name in names
        if not hasattr(module, name)
    ]
    missing += [
        f"{cls.__module__}.{cls.__name__}.{name}"
        for cls, names in _CLASS_ATTRIBUTES.items()
        for name in names
        if not hasattr(cls, name)
    ]
    # Instance attributes set in __init__: on real objects, built without connecting (~0.5 ms).
    assoc = pynetdicom.association.Association(pynetdicom.AE(), "requestor")
    for path in _ASSOCIATION_ATTRIBUTES:
        owner: Any = assoc
        for part in path.split("."):
            owner = getattr(owner, part, _MISSING)
        if owner is _MISSING:
            missing.append(f"pynetdicom.association.Association.{path}")
    missing += [f"pynetdicom.dul.DULServiceProvider.{name}" for name in _DUL_ATTRIBUTES if not hasattr(assoc.dul, name)]
    if getattr(getattr(assoc.dul, "state_machine", None), "dul", None) is not assoc.dul:
        missing.append("pynetdicom.fsm.StateMachine.dul")
    if not hasattr(pynetdicom.dimse_messages.C_STORE_RQ(), "_data_set_file"):
        missing.append("pynetdicom.dimse_messages.C_STORE_RQ._data_set_file")
    if not hasattr(build_context("1.2.840.10008.1.1"), "_transfer_syntax"):
        missing.append("pynetdicom.presentation.PresentationContext._transfer_syntax")
    with socket.socket() as raw:
        probe = AssociationSocket.__new__(AssociationSocket)
        _original_socket_init(probe, assoc, client_socket=raw)
        if not hasattr(probe, "socket"):
            missing.append("pynetdicom.transport.AssociationSocket.socket")
    # share_contexts replaces what RequestHandler deep-copies for each association.
    if "self.server.contexts" not in inspect.getsource(RequestHandler._create_association):
        missing.append("pynetdicom.transport.RequestHandler._create_association (copy of server.contexts)")
    return missing


_MISSING = object()


def check() -> None:
    """Raise PynetdicomMismatch, naming what is missing, unless pynetdicom has every internal we use."""
    try:
        missing = _missing_attributes()
    except Exception as exc:  # an internal constructor changed its signature
        missing = [f"building pynetdicom objects failed: {exc!r}"]
    if missing:
        installed = importlib.metadata.version("pynetdicom")
        raise PynetdicomMismatch(
            f"pynetdicom {installed} is installed, but macpacs needs pynetdicom{REQUIRED_VERSION}: "
            f"it lacks {', '.join(missing)}. Reinstall macpacs to get the version it was tested with."
        )


# -- 1. sockets -----------------------------------------------------------------------------------
_original_socket_init = AssociationSocket.__init__
_original_socket_send = AssociationSocket.send
_original_ready = AssociationSocket.ready


def _socket_init(self: AssociationSocket, *args: Any, **kwargs: Any) -> None:
    self.send_lock = threading.Lock()  # shared with write_message: whole PDUs, never interleaved
    self.recv_lock = threading.Lock()  # held by the DUL while it reads a PDU (store_scp, find)
    _original_socket_init(self, *args, **kwargs)
    if self.socket is not None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _socket_send(self: AssociationSocket, bytestream: bytes) -> None:
    with self.send_lock:
        _original_socket_send(self, bytestream)


def _ready(self: AssociationSocket) -> bool:
    """pynetdicom's DUL polls this; False while one of our readers owns the socket."""
    if getattr(self, "direct_reader", False):
        return False
    return _original_ready.fget(self)  # type: ignore[attr-defined]


_original_transport_event = pynetdicom.dul.DULServiceProvider._is_transport_event


def _transport_event(self: Any) -> bool:
    lock = getattr(self.socket, "recv_lock", None)
    if lock is None:
        return _original_transport_event(self)
    with lock:
        return _original_transport_event(self)


def write_message(assoc: Any, context_id: int, command: bytes, dataset: bytes | memoryview | None) -> None:
    """Write one DIMSE message straight to the association's socket, fragmented for the peer.

    pynetdicom hands every P-DATA PDU (16 KB with most peers: 33 per CT slice) to its DUL
    thread through a queue, one PDU per reactor loop; that alone capped a C-MOVE at ~280 CT
    slices/s. Here the whole message is framed in this thread and sent by ``sendmsg`` (no copy),
    under the socket's send lock, once pynetdicom's own outgoing queue is empty, so that no
    other message's fragments interleave with ours (PS3.8 9.3.1).
    """
    write_parts(assoc, codec.message(context_id, command, dataset, assoc.dimse.maximum_pdu_size))


def write_parts(assoc: Any, parts: list[bytes | memoryview]) -> None:
    """Write whole PDUs to the association's socket, in one go where the kernel takes them."""
    dul = assoc.dul
    deadline = time.monotonic() + (assoc.network_timeout or 60)
    while not dul.to_provider_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.0002)
    sock = dul.socket
    with sock.send_lock:
        if isinstance(sock.socket, ssl.SSLSocket):  # no scatter-gather over TLS
            sock.socket.sendall(b"".join(parts))
        else:
            codec.send_parts(sock.socket, parts)


# -- 2. presentation contexts -----------------------------------------------------------------------
class _SharedContext(PresentationContext):
    """A supported context whose per-association copy shares its immutable UIDs."""

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        return self.clone()

    def clone(self) -> PresentationContext:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


class _SharedContexts(list):  # type: ignore[type-arg]
    """A server's supported contexts, copied for each association without ``deepcopy``'s memo walk.

    ``copy.deepcopy`` of the list (pynetdicom's ``_create_association``) walks its memo for each of
    our ~130 contexts: 0.10 ms an association against 0.06 with a dict copy per context.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [context.clone() for context in self]


_original_server_init = AssociationServer.__init__


def _server_init(self: AssociationServer, *args: Any, **kwargs: Any) -> None:
    _original_server_init(self, *args, **kwargs)
    for context in self.contexts:
        context.__class__ = _SharedContext
    self.contexts = _SharedContexts(self.contexts)


# -- 3. the reactors' clock -------------------------------------------------------------------------
DEFAULT_POLL = 0.001  # pynetdicom's own interval


class _Doorbell:
    """Wakes one DUL thread out of its poll sleep: a non-blocking pipe, closed when the DUL ends.

    A pipe, not an Event, because the DUL must wake for the peer's socket too, and only one
    ``poll`` waits on both. ``ring`` and ``close`` share a lock, so a ring after the close never
    writes into a descriptor number the process has given to another file since.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(self._read, select.POLLIN)
        self._sock_fd = -1

    def ring(self) -> None:
        with self._lock:
            if self._write >= 0:
                with contextlib.suppress(BlockingIOError):  # full: it is ringing already
                    os.write(self._write, b"\0")

    def wait(self, sock_fd: int, seconds: float) -> None:
        """Until the socket (none if -1) is readable, ``ring`` is called, or ``seconds`` have passed."""
        if sock_fd != self._sock_fd:
            if self._sock_fd >= 0:
                self._poller.unregister(self._sock_fd)
            if sock_fd >= 0:
                self._poller.register(sock_fd, select.POLLIN)
            self._sock_fd = sock_fd
        if self._poller.poll(seconds * 1000):
            with contextlib.suppress(BlockingIOError):
                os.read(self._read, 4096)

    def close(self) -> None:
        with self._lock:
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = -1


class ReactorClock:
    """``time`` as pynetdicom's reactors see it: their 1 ms polling sleep ends when there is work.

    pynetdicom's DUL thread sleeps 1 ms whenever a loop found nothing to do, and the association
    thread 1 ms before each look at its DIMSE queue. A message from the peer waited for the DUL's
    next look at the socket, then for the association's next look at its queue; an answer
    waited for the DUL's next look at its outgoing queue. An ``echoscu`` crossed six such sleeps
    (connect to exit: macpacs ~11 ms, bare pynetdicom ~10 ms, DCMTK's ``storescp`` ~3 ms). Here the DUL sleeps
    in ``poll`` on the peer's socket and a doorbell that ``send_pdu`` rings, and the association
    thread on an Event that the DUL's state machine sets after each event it handles: each
    waits at most as long as before, and wakes as soon as there is something to do. Timers
    (ARTIM, idle) and stop flags are still looked at on the interval.

    The interval itself is ``dicom.reactor_poll_ms`` × open associations, at most pynetdicom's
    1 ms, as before: with fewer wake-ups for nothing, several associations fight less for the GIL.
    """

    def __init__(self, poll_ms: float) -> None:
        self.poll = poll_ms / 1000.0
        self.open_associations = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, pynetdicom.dul.DULServiceProvider) and seconds == thread._run_loop_delay:
            _dul_sleep(thread, self._interval() if seconds == DEFAULT_POLL else seconds)
        elif seconds != DEFAULT_POLL:
            time.sleep(seconds)
        elif isinstance(thread, pynetdicom.association.Association):
            wake = _association_wake(thread)
            wake.wait(self._interval())
            wake.clear()
        else:
            time.sleep(self._interval())

    def _interval(self) -> float:
        return min(DEFAULT_POLL, self.poll * max(1, self.open_associations))

    def opened(self, _event: Any = None) -> None:
        """EVT_CONN_OPEN handler: one more association polls."""
        with self._lock:
            self.open_associations += 1

    def closed(self, _event: Any = None) -> None:
        """EVT_CONN_CLOSE handler."""
        with self._lock:
            self.open_associations = max(0, self.open_associations - 1)


def _association_wake(assoc: Any) -> threading.Event:
    """The Event an association's reactor sleeps on (made on first use; setdefault is atomic)."""
    wake = assoc.__dict__.get("_macpacs_wake")
    return wake if wake is not None else assoc.__dict__.setdefault("_macpacs_wake", threading.Event())


def _dul_sleep(dul: Any, seconds: float) -> None:
    """The DUL's idle sleep: until the peer sends, a primitive is queued to send, or ``seconds``."""
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    bell = dul.__dict__.get("_macpacs_bell")
    fd = raw.fileno() if raw is not None else -1
    if bell is None or fd < 0:
        time.sleep(seconds)  # not connected yet, or closed
    elif getattr(sock, "direct_reader", False):
        bell.wait(-1, seconds)  # one of our readers owns the socket: only a primitive to send wakes it
    elif isinstance(raw, ssl.SSLSocket) and raw.pending():
        return  # decrypted bytes wait in the TLS buffer, which poll does not see
    else:
        bell.wait(fd, seconds)


DIRECT_READ_POLL = 0.005  # seconds between DUL loops while one of our readers owns the socket


def take_socket(dul: Any) -> None:
    """Our reader owns the association's socket from now on (``store_scp``, ``subops.Channel``).

    The DUL is told the socket is not ready (``_ready``) and, having nothing to read, wakes every
    ``DIRECT_READ_POLL`` instead of every millisecond (and at once when a primitive is queued),
    so that it takes the GIL from our reader less often. The caller makes sure the DUL is not
    half-way through a PDU (``recv_lock``, or a pause).
    """
    dul.socket.direct_reader = True
    dul.__dict__.setdefault("_macpacs_delay", dul._run_loop_delay)
    dul._run_loop_delay = DIRECT_READ_POLL


def give_back_socket(dul: Any) -> None:
    """The DUL reads the socket again, from its next loop: it is woken for it."""
    dul.socket.direct_reader = False
    dul._run_loop_delay = dul.__dict__.pop("_macpacs_delay", dul._run_loop_delay)
    bell = dul.__dict__.get("_macpacs_bell")
    if bell is not None:
        bell.ring()


_original_run_reactor = pynetdicom.dul.DULServiceProvider.run_reactor
_original_send_pdu = pynetdicom.dul.DULServiceProvider.send_pdu
_original_do_action = pynetdicom.fsm.StateMachine.do_action


def _run_reactor(self: Any) -> None:
    bell = _Doorbell()
    self.__dict__["_macpacs_bell"] = bell
    try:
        _original_run_reactor(self)
    finally:
        bell.close()


def _send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    bell = self.__dict__.get("_macpacs_bell")
    if bell is not None:
        bell.ring()


def _do_action(self: Any, event: str) -> None:
    try:
        _original_do_action(self, event)
    finally:
        _association_wake(self.dul.assoc).set()


# -- 4. service classes -------------------------------------------------------------------------------
_original_lookup = pynetdicom.association.uid_to_service_class
_SERVICE_CLASSES: dict[type, type] = {}  # pynetdicom's class → ours, filled by apply


def _service_class(uid: str) -> type:
    service_class = _original_lookup(uid)
    return _SERVICE_CLASSES.get(service_class, service_class)


# -- 5. received datasets -----------------------------------------------------------------------------
def _pynetdicom_stage() -> StagedFile:
    fd, name = tempfile.mkstemp(suffix=".dcm")
    return StagedFile(os.fdopen(fd, "wb"), name, lambda: None)


_stage: Callable[[], StagedFile] = _pynetdicom_stage  # until apply is given a stage_file


class DrainingFile:
    """What pynetdicom writes a received dataset into: a staged file whose failures do not raise.

    A write that fails (disk full, or the store's free-space floor reached) is kept as
    ``error``; the partial file is removed at once and later writes are dropped, so that
    pynetdicom reads the dataset to its end and ``store_scp`` answers 0xA700 (``write_failure``).
    A file that cannot even be created is an ``error`` from the start (``name`` is then "").
    """

    def __init__(self, staged: IO[bytes] | StagedFile | None, error: OSError | None = None) -> None:
        self._staged = staged
        self.name = staged.name if staged is not None else ""
        self.error = error

    @property
    def file(self) -> DrainingFile:
        return self  # pynetdicom calls ``.file.flush()`` after each fragment

    def write(self, data: bytes | memoryview) -> int:
        if self.error is None and self._staged is not None:
            try:
                return self._staged.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None and self._staged is not None:
            try:
                self._staged.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._staged is not None:
            with contextlib.suppress(OSError):  # flushed after each fragment: nothing is lost here
                self._staged.close()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)

    def __enter__(self) -> DrainingFile:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


def _named_temporary_file(*_args: Any, **_kwargs: Any) -> DrainingFile:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, from ``stage_file``."""
    try:
        return DrainingFile(_stage())
    except OSError as exc:  # no file at all (no descriptor left, a full inode table...)
        return DrainingFile(None, exc)


def write_failure(request: Any) -> OSError | None:
    """Why the dataset of a C-STORE request received by pynetdicom could not be written, or None."""
    received = getattr(request, "_dataset_file", None)
    return received.error if isinstance(received, DrainingFile) else None


def staged_file() -> StagedFile:
    """A new file for a received dataset, from the ``stage_file`` given to ``apply`` (``store_scp``'s too)."""
    return _stage()


# -- applying -------------------------------------------------------------------------------------------
_clock: ReactorClock | None = None
_apply_lock = threading.Lock()


def apply(poll_ms: float, stage_file: Callable[[], StagedFile] | None = None) -> ReactorClock:
    """Check pynetdicom (``check``), then change its behaviour as the module docstring says.

    Idempotent: the patches go in on the first call; a later call only sets the reactor poll and,
    when given, ``stage_file`` (``BlobStore.stage``: a ``StagedFile``; without one, a file in
    the process's temporary folder). Returns the
    reactor clock, whose ``opened``/``closed`` the listener binds to EVT_CONN_OPEN/CLOSE.
    Raises PynetdicomMismatch (a ConfigError) when pynetdicom lacks an internal we need.
    """
    global _clock, _stage
    with _apply_lock:
        if _clock is None:
            check()
            from .store_scp import FastStorageServiceClass
            from .subops import RetrieveServiceClass, WorklistServiceClass

            AssociationSocket.__init__ = _socket_init  # type: ignore[method-assign]
            AssociationSocket.send = _socket_send  # type: ignore[method-assign]
            AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
            pynetdicom.dul.DULServiceProvider._is_transport_event = _transport_event  # type: ignore[method-assign]
            pynetdicom.dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
            pynetdicom.dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
            pynetdicom.fsm.StateMachine.do_action = _do_action  # type: ignore[method-assign]
            AssociationServer.__init__ = _server_init  # type: ignore[method-assign]
            clock = ReactorClock(poll_ms)
            pynetdicom.association.time = clock  # type: ignore[assignment]
            pynetdicom.dul.time = clock  # type: ignore[assignment]
            _SERVICE_CLASSES.update(
                {
                    StorageServiceClass: FastStorageServiceClass,
                    QueryRetrieveServiceClass: RetrieveServiceClass,
                    BasicWorklistManagementServiceClass: WorklistServiceClass,
                }
            )
            pynetdicom.association.uid_to_service_class = _service_class  # type: ignore[assignment]
            pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
            pynetdicom.dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment]
            _clock = clock
        _clock.poll = poll_ms / 1000.0
        if stage_file is not None:
            _stage = stage_file
        return _clock
