"""Plugins' DICOM services (the ``dicom_services`` hook) on the listener: contexts and handlers.

``scp.DicomListener`` builds one ``PluginServices`` from its archive: it adds a presentation
context per plugin SOP class to the AE, and binds pynetdicom's N-CREATE, N-SET and N-ACTION
events, and the C-FIND event of the plugins' classes, to the plugins' handlers. Each request
first passes the listener's own access check (the admitted node's right, ``right`` of the
service), then goes to the handler as a ``DicomRequest``; pynetdicom's service classes
(Basic Worklist, Procedure Step, Storage Commitment...) encode and send what it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .. import dicom_status
from ..plugins.dicom_services import DicomRequest, DicomService, FindResponse, Response
from .find import status_with_comment

log = logging.getLogger(__name__)

# The Query/Retrieve models the archive serves itself (scp.DicomListener adds their contexts).
QUERY_RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
# Classes the archive serves itself: a plugin cannot take them over.
CORE_CLASSES = frozenset(
    {
        str(Verification),
        *(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts),
        *map(str, QUERY_RETRIEVE_MODELS),
    }
)

Refusal = Callable[[Any, str], "str | None"]  # (association, right) → why not, or None
Count = Callable[[Any, str], None]


class PluginServices:
    """The plugin services of one listener, by SOP class UID."""

    def __init__(self, offered: list[Any], refusal: Refusal, count: Count) -> None:
        self._refusal = refusal
        self._count = count
        self.by_class: dict[str, DicomService] = {}
        for service in offered:
            if not isinstance(service, DicomService):
                log.error("a plugin's dicom_services hook returned %r, not a DicomService: ignored", service)
                continue
            uid = str(service.sop_class_uid)
            if uid in CORE_CLASSES:
                log.error("plugin service %s: SOP class %s is served by the archive itself: ignored", service.name, uid)
            elif uid in self.by_class:
                log.error(
                    "plugin service %s: SOP class %s is already served by %s: ignored",
                    service.name,
                    uid,
                    self.by_class[uid].name,
                )
            else:
                self.by_class[uid] = service
                log.info("DICOM service from a plugin: %s (%s)", service.name, uid)

    def add_contexts(self, ae: AE) -> None:
        for uid, service in self.by_class.items():
            ae.add_supported_context(uid, list(service.transfer_syntaxes))

    def bind(self, handlers: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """The listener's event handlers with C-FIND dispatched by class and the N-services added."""
        if not self.by_class:
            return handlers
        bound = []
        for event, handler in handlers:
            bound.append((event, self._find_dispatcher(handler) if event is evt.EVT_C_FIND else handler))
        return [
            *bound,
            (evt.EVT_N_CREATE, self._n_create),
            (evt.EVT_N_SET, self._n_set),
            (evt.EVT_N_ACTION, self._n_action),
        ]

    # -- C-FIND --------------------------------------------------------------------------------
    def _find_dispatcher(self, core: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def on_find(event: Any) -> Any:
            service = self.by_class.get(str(event.request.AffectedSOPClassUID))
            if service is None:
                return core(event)
            return self._find(service, event)

        return on_find

    def _find(self, service: DicomService, event: Any) -> Iterator[FindResponse]:
        assoc = event.assoc
        self._count(assoc, "find")
        refused = self._refusal(assoc, service.right)
        if refused:
            yield status_with_comment(dicom_status.NOT_AUTHORIZED, refused), None
            return
        if service.find is None:
            yield status_with_comment(dicom_status.SOP_CLASS_NOT_SUPPORTED, f"{service.name}: no C-FIND"), None
            return
        request = self._request(event, "C-FIND", event.identifier, "", lambda: event.is_cancelled)
        try:
            yield from service.find(request)
        except Exception as exc:
            log.exception("plugin service %s failed in its C-FIND handler (from %s)", service.name, request.calling_ae)
            yield status_with_comment(dicom_status.FIND_HANDLER_FAILED, f"{service.name} failed: {exc}"), None

    # -- N-CREATE, N-SET, N-ACTION ---------------------------------------------------------------
    def _n_create(self, event: Any) -> Response:
        return self._n_service(event, "N-CREATE", lambda: event.attribute_list, "AffectedSOP", "n_create")

    def _n_set(self, event: Any) -> Response:
        return self._n_service(event, "N-SET", lambda: event.modification_list, "RequestedSOP", "n_set")

    def _n_action(self, event: Any) -> Response:
        return self._n_service(event, "N-ACTION", lambda: event.action_information, "RequestedSOP", "n_action")

    def _n_service(
        self, event: Any, operation: str, decode: Callable[[], Any], uid_prefix: str, handler_name: str
    ) -> Response:
        req = event.request
        service = self.by_class.get(str(getattr(req, f"{uid_prefix}ClassUID", "") or ""))
        handler = getattr(service, handler_name, None) if service is not None else None
        if service is None or handler is None:
            return dicom_status.SOP_CLASS_NOT_SUPPORTED, None
        assoc = event.assoc
        self._count(assoc, operation.lower())
        refused = self._refusal(assoc, service.right)
        if refused:
            return status_with_comment(dicom_status.NOT_AUTHORIZED, refused), None
        uid = str(getattr(req, f"{uid_prefix}InstanceUID", "") or "")
        try:
            dataset = decode()
        except Exception as exc:
            log.warning("%s %s from %s: the dataset cannot be decoded: %s", service.name, operation, _ae(assoc), exc)
            return status_with_comment(dicom_status.PROCESSING_FAILURE, f"dataset cannot be decoded: {exc}"), None
        request = self._request(event, operation, dataset, uid, lambda: False)
        try:
            return handler(request)
        except Exception as exc:
            log.exception("plugin service %s failed in its %s handler (from %s)", service.name, operation, _ae(assoc))
            return status_with_comment(dicom_status.PROCESSING_FAILURE, f"{service.name} failed: {exc}"), None

    @staticmethod
    def _request(event: Any, operation: str, dataset: Any, uid: str, cancelled: Callable[[], bool]) -> DicomRequest:
        assoc = event.assoc
        req = event.request
        action = getattr(req, "ActionTypeID", None)
        admission = getattr(assoc, "macpacs_admission", None)
        return DicomRequest(
            operation=operation,
            sop_class_uid=str(getattr(req, "AffectedSOPClassUID", None) or getattr(req, "RequestedSOPClassUID", "")),
            sop_instance_uid=uid,
            dataset=dataset,
            calling_ae=_ae(assoc),
            address=str(assoc.requestor.address),
            node=getattr(admission, "node", None),
            message_id=int(req.MessageID),
            action_type_id=int(action) if action is not None else None,
            is_cancelled=cancelled,
            assoc=assoc,
            transfer_syntax=str(event.context.transfer_syntax),
        )


def _ae(assoc: Any) -> str:
    return str(assoc.requestor.ae_title).strip()
