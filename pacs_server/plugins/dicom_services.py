"""What a plugin hands the DICOM listener through the ``dicom_services`` hook (hookspecs.py).

A ``DicomService`` names one SOP class the plugin serves as SCP and the handlers of its DIMSE
operations; the listener (``dimse/plugin_services.py``) adds its presentation contexts to the AE
and calls the handlers with a ``DicomRequest``, after the association's access check, in every
process that serves associations. The plugin never touches pynetdicom's event machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

if TYPE_CHECKING:
    from ..nodes import Node

# What a handler returns: a DIMSE status and the response's dataset (or None). A C-FIND handler
# yields such pairs, one per match with status 0xFF00 (pending), then a final one.
Response = tuple[int, Dataset | None]
# A C-FIND handler of the Modality Worklist model may yield its identifiers already encoded.
FindResponse = tuple[int, Dataset | bytes | None]
# The plugin C-FIND classes whose answers the listener frames and writes itself (dimse/find.py
# ``serve_find``), where an identifier may come encoded; other classes go through pynetdicom.
ENCODED_FIND_CLASSES = frozenset({"1.2.840.10008.5.1.4.31"})  # Modality Worklist Information Model - FIND

RIGHTS = ("query", "store", "retrieve")  # as nodes.OPERATIONS


@dataclass(frozen=True)
class DicomRequest:
    """One request to a plugin's service, as its handler receives it.

    ``dataset`` is the request's dataset, decoded: the identifier of a C-FIND, the attribute
    list of an N-CREATE or N-SET, the action information of an N-ACTION (None when the request
    has none). ``sop_instance_uid`` is the affected (N-CREATE: possibly empty, then the handler
    creates one) or requested (N-SET, N-ACTION) SOP instance. ``node`` is the registered node
    the association was admitted as (None for an unknown peer admitted by
    ``dicom.accept_unknown_nodes``). ``assoc`` is pynetdicom's ``Association``, for a service
    that must send on it afterwards (an N-EVENT-REPORT): pynetdicom sends the response first.
    ``transfer_syntax`` is the UID of the presentation context's transfer syntax.
    """

    operation: str  # "C-FIND", "N-CREATE", "N-SET", "N-ACTION"
    sop_class_uid: str
    sop_instance_uid: str
    dataset: Dataset | None
    calling_ae: str
    address: str
    node: Node | None
    message_id: int
    action_type_id: int | None = None
    is_cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)
    assoc: Any = field(default=None, repr=False, compare=False)
    transfer_syntax: str = ImplicitVRLittleEndian


@dataclass(frozen=True)
class DicomService:
    """One SOP class a plugin serves as SCP, and its handlers (each optional).

    - ``find(request)``: C-FIND; yields ``(status, identifier)`` pairs, ``(0xFF00, ds)`` per match,
      then ``(0x0000, None)`` (or a failure status). It should look at ``request.is_cancelled()``
      between matches. For a class of ``ENCODED_FIND_CLASSES`` an identifier may be given as
      bytes, already encoded in ``request.transfer_syntax`` (an answer cached encoded).
    - ``n_create(request)``, ``n_set(request)``, ``n_action(request)``: return ``(status, dataset)``.

    ``right`` is the node right the peer needs (``query``, ``store`` or ``retrieve``, as in
    ``macpacs nodes``): without it the request is answered 0x0124 (refused: not authorized)
    before any handler runs. ``transfer_syntaxes`` are the ones accepted for the class's
    presentation contexts.
    """

    sop_class_uid: str
    name: str  # for log lines, e.g. "Modality Worklist"
    right: str = "query"
    find: Callable[[DicomRequest], Iterable[FindResponse]] | None = None
    n_create: Callable[[DicomRequest], Response] | None = None
    n_set: Callable[[DicomRequest], Response] | None = None
    n_action: Callable[[DicomRequest], Response] | None = None
    transfer_syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

    def __post_init__(self) -> None:
        if self.right not in RIGHTS:
            raise ValueError(f"DicomService {self.name}: right {self.right!r} is not one of {', '.join(RIGHTS)}")
        if not any((self.find, self.n_create, self.n_set, self.n_action)):
            raise ValueError(f"DicomService {self.name}: no handler (find, n_create, n_set or n_action)")
