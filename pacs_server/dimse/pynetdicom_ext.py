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
   the DUL thread 1 ms after each idle loop. Every DIMSE round trip pays for those sleeps, which
   caps small-instance C-STORE at ~300/s on one association. With 0.1 ms polls,
   shared/reference/performance.md measured ~440 inst/s for small instances and ~300 for CT; a
   bare SCP here went from 326 to 524 small inst/s. But with several associations their polling
   threads fight for the GIL: 4 CT associations fell from 95 to 65 inst/s at 0.1 ms. So the
   interval grows with the number of open associations (``dicom.reactor_poll_ms`` × open
   associations, at most pynetdicom's own 1 ms); 0.25 ms measured best for both cases then.
   Since C-STOREs after an association's first are read off the socket directly (store_scp.py)
   and associations are served by worker processes (workers.py), the default is back at 1 ms:
   with 2 workers, 4 associations of small instances stored 286 and 322 inst/s at 1 ms against
   253 and 259 at 0.25 ms, with less CPU, and 4 simultaneous C-MOVEs ran 2,110 vs 1,785 inst/s;
   a C-FIND or C-ECHO costs 1 to 3 ms more (35 → 38 ms findscu wall time). Lower values remain
   available for a site that queries more than it stores. The ``time`` module seen by
   pynetdicom's association and DUL modules is replaced by a proxy whose ``sleep`` changes
   exactly that 1 ms poll.

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
import copy
import importlib.metadata
import inspect
import os
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
    pynetdicom.dimse_messages: ("NamedTemporaryFile",),
}
_CLASS_ATTRIBUTES = {
    pynetdicom.dul.DULServiceProvider: ("_is_transport_event",),
    pynetdicom.dimse_primitives.C_STORE: ("_dataset_file",),
    AssociationSocket: ("ready", "send"),
    RequestHandler: ("_create_association",),
    QueryRetrieveServiceClass: ("_c_find_scp", "_move_scp", "_get_scp"),
    BasicWorklistManagementServiceClass: ("_c_find_scp",),
}
_ASSOCIATION_ATTRIBUTES = ("_accepted_cx", "_reactor_checkpoint", "_is_paused", "_abort_blocking", "dimse.message")
_DUL_ATTRIBUTES = ("_run_loop_delay", "_idle_timer", "to_provider_queue", "event_queue", "to_user_queue")


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
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


_original_server_init = AssociationServer.__init__


def _server_init(self: AssociationServer, *args: Any, **kwargs: Any) -> None:
    _original_server_init(self, *args, **kwargs)
    for context in self.contexts:
        context.__class__ = _SharedContext


# -- 3. the reactors' clock -------------------------------------------------------------------------
DEFAULT_POLL = 0.001  # pynetdicom's own interval


class ReactorClock:
    """``time`` as pynetdicom's reactors see it, with their 1 ms polling sleep adapted to load."""

    def __init__(self, poll_ms: float) -> None:
        self.poll = poll_ms / 1000.0
        self.open_associations = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == DEFAULT_POLL:
            seconds = min(DEFAULT_POLL, self.poll * max(1, self.open_associations))
        time.sleep(seconds)

    def opened(self, _event: Any = None) -> None:
        """EVT_CONN_OPEN handler: one more association polls."""
        with self._lock:
            self.open_associations += 1

    def closed(self, _event: Any = None) -> None:
        """EVT_CONN_CLOSE handler."""
        with self._lock:
            self.open_associations = max(0, self.open_associations - 1)


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
