"""C-GET SCP: send what an identifier matches back over the requestor's own association.

The requestor proposes the storage contexts it can receive, with SCP/SCU role selection (it
acts as the Storage SCP); the listener accepts both roles for every storage class. An instance
whose SOP class the requestor did not propose is a failed sub-operation. Files are read through
the one retrieve path and sent by ``subops``, like C-MOVE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset

from .. import dicom_status
from ..index import Index, QueryError
from ..storage import BlobStore
from . import subops
from .find import IdentifierError
from .subops import AssociationLost, Pacer, Progress, Response

log = logging.getLogger(__name__)


def get_responses(
    assoc: Any,
    identifier: Dataset,
    model: str,
    message_id: int,
    is_cancelled: subops.Cancel,
    *,
    index: Index,
    store: BlobStore,
    case_insensitive: bool,
) -> Iterator[Response]:
    """The responses of one C-GET, pending ones included, ending with the final one."""
    peer = f"{assoc.requestor.ae_title}@{assoc.requestor.address}"
    try:
        instances = subops.match_instances(index, identifier, model, case_insensitive=case_insensitive)
    except (IdentifierError, QueryError) as exc:
        status = exc.status if isinstance(exc, IdentifierError) else dicom_status.DOES_NOT_MATCH_SOP_CLASS
        log.warning("C-GET from %s refused: %s", peer, exc)
        yield Response(status, comment=str(exc))
        return
    progress = Progress(len(instances))
    if not instances:
        log.info("C-GET from %s: the identifier matches nothing", peer)
        yield Response(dicom_status.SUCCESS, progress)
        return
    log.info("C-GET from %s: %d instances", peer, len(instances))
    pacer = Pacer()
    sent = 0
    try:
        for _inst in subops.send_all(
            assoc, store, instances, progress, first_msg_id=message_id % 65535 + 1, is_cancelled=is_cancelled
        ):
            sent += 1
            if pacer.due():
                yield Response.pending(progress)
    except AssociationLost as exc:
        log.error("C-GET from %s: the association ended after %d of %d instances: %s", peer, sent, len(instances), exc)
        return
    if is_cancelled():
        log.info("C-GET cancelled by %s: %s", peer, progress.summary())
        yield Response(dicom_status.CANCEL, progress)
        return
    level = logging.INFO if not progress.failed else logging.WARNING
    log.log(level, "C-GET by %s done: %s", peer, progress.summary())
    yield Response(progress.final_status(), progress)
