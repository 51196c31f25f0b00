"""C-MOVE SCP: send what an identifier matches to a registered node, on associations we open.

The destination must be a registered, active node (its AE title in the Move Destination);
anything else answers 0xA801. The instances are read through the one retrieve path
(``retrieve.locate`` / ``retrieve.open_instance``) and sent by ``subops``: presentation
contexts are proposed for exactly the SOP classes and transfer syntaxes being moved, on as
many associations as the 128-context limit requires, opened one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from .. import dicom_status
from ..index import Index, QueryError
from ..nodes import NodeRegistry
from ..storage import BlobStore
from . import subops
from .find import IdentifierError
from .subops import Progress, Response

log = logging.getLogger(__name__)


@dataclass
class MoveRequest:
    """What a C-MOVE handler needs from the pynetdicom event, so tests and callers need no event."""

    requestor: str  # for log lines: AE@address:port
    requestor_ae: str
    destination: str
    identifier: Dataset
    model: str
    message_id: int
    is_cancelled: subops.Cancel


def move_responses(
    request: MoveRequest,
    *,
    ae: Any,
    index: Index,
    store: BlobStore,
    registry: NodeRegistry,
    case_insensitive: bool,
) -> Iterator[Response]:
    """The responses of one C-MOVE, pending ones included, ending with the final one."""
    node = registry.by_ae_title(request.destination)
    if node is None or node.status != "active":
        why = "is not a registered node" if node is None else "is a node awaiting approval"
        log.warning(
            "C-MOVE from %s refused: destination %r %s (add it with `macpacs nodes add`)",
            request.requestor,
            request.destination,
            why,
        )
        yield Response(dicom_status.UNKNOWN_MOVE_DESTINATION, comment=f"unknown move destination {request.destination}")
        return
    try:
        instances = subops.match_instances(index, request.identifier, request.model, case_insensitive=case_insensitive)
    except (IdentifierError, QueryError) as exc:
        status = exc.status if isinstance(exc, IdentifierError) else dicom_status.DOES_NOT_MATCH_SOP_CLASS
        log.warning("C-MOVE from %s to %s refused: %s", request.requestor, node.name, exc)
        yield Response(status, comment=str(exc))
        return
    progress = Progress(len(instances))
    if not instances:
        log.info("C-MOVE from %s to %s: the identifier matches nothing", request.requestor, node.name)
        yield Response(dicom_status.SUCCESS, progress)
        return
    log.info(
        "C-MOVE from %s: %d instances to %s (%s:%d)", request.requestor, len(instances), node.name, node.host, node.port
    )
    originator = (request.requestor_ae, request.message_id)
    yield from subops.send_to_node(ae, node, store, instances, progress, request.is_cancelled, originator)
    if request.is_cancelled():
        log.info("C-MOVE to %s cancelled by %s: %s", node.name, request.requestor, progress.summary())
        yield Response(dicom_status.CANCEL, progress)
        return
    level = logging.INFO if not progress.failed else logging.WARNING
    log.log(level, "C-MOVE to %s done: %s", node.name, progress.summary())
    yield Response(progress.final_status(), progress)
