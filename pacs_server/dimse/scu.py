"""The archive as a client of other DICOM nodes: echo, send, query, retrieve.

Used by the command line (``macpacs nodes echo``, ``send``, ``query``, ``retrieve``) and later by
XML-RPC and the web pages, so every function takes a ``Node`` and the settings, reports
progress through an optional callback and raises ``PeerError`` (``ScuError``) with a message
an administrator can act on. Timeouts come from ``dicom.client_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import code_to_category

from ..archive import Archive
from ..config import Settings
from ..nodes import Node
from ..retrieve import locate
from . import pynetdicom_ext, subops
from .subops import PeerError, Progress

log = logging.getLogger(__name__)

ScuError = PeerError
ProgressCallback = Callable[[Progress], None]

# The keys of OsiriX's Query & Retrieve window, returned for every study found.
STUDY_RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ModalitiesInStudy",
    "StudyInstanceUID",
    "NumberOfStudyRelatedInstances",
)
MODELS = {
    "find": (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind),
    "move": (StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove),
    "get": (StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet),
}


def client_ae(settings: Settings) -> AE:
    """An AE calling with our AE title and the client timeouts of the settings."""
    pynetdicom_ext.apply(settings.dicom.reactor_poll_ms)
    d = settings.dicom
    ae = AE(ae_title=d.ae_title)
    ae.acse_timeout = d.client_timeout
    ae.dimse_timeout = d.client_timeout
    ae.network_timeout = d.network_timeout
    ae.connection_timeout = d.client_timeout
    return ae


def _model(kind: str, level: str) -> str:
    study_root, patient_root = MODELS[kind]
    return patient_root if level == "PATIENT" else study_root


def echo(node: Node, settings: Settings) -> float:
    """C-ECHO ``node``; returns the round trip (association, echo, release) in milliseconds."""
    ae = client_ae(settings)
    start = time.perf_counter()
    assoc = subops.associate(ae, node, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed = (time.perf_counter() - start) * 1000
    if "Status" not in status:
        raise PeerError(f"node {node.name} did not answer the C-ECHO within {settings.dicom.client_timeout} s")
    if status.Status != 0:
        raise PeerError(f"node {node.name} answered the C-ECHO with status 0x{status.Status:04X}")
    log.info("C-ECHO %s: %.1f ms", node.name, elapsed)
    return elapsed


def send(
    node: Node,
    archive: Archive,
    keys: Mapping[str, str],
    on_progress: ProgressCallback | None = None,
) -> Progress:
    """C-STORE what ``keys`` match in our archive (a patient, study, series or instance) to ``node``."""
    settings = archive.settings
    instances = locate(archive.index, keys, case_insensitive=settings.dicom.case_insensitive_names)
    progress = Progress(len(instances))
    if not instances:
        return progress
    ae = client_ae(settings)
    for _pending in subops.send_to_node(ae, node, archive.blobs, instances, progress):
        if on_progress:
            on_progress(progress)
    if on_progress:
        on_progress(progress)
    log.info("send to %s: %s", node.name, progress.summary())
    return progress


def query(node: Node, settings: Settings, level: str, keys: Mapping[str, str]) -> list[Dataset]:
    """C-FIND on ``node`` at ``level``; ``keys`` are matching values (empty: return the key)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    if level == "STUDY":
        for keyword in STUDY_RETURN_KEYS:
            setattr(identifier, keyword, "")
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    model = _model("find", level)
    ae = client_ae(settings)
    assoc = subops.associate(ae, node, [build_context(model)])
    results: list[Dataset] = []
    try:
        for status, found in assoc.send_c_find(identifier, model):
            if "Status" not in status:
                raise PeerError(f"node {node.name} stopped answering the C-FIND (aborted or timed out)")
            category = code_to_category(status.Status)
            if category == "Pending" and found is not None:
                results.append(found)
            elif category not in ("Pending", "Success"):
                comment = status.get("ErrorComment", "")
                raise PeerError(f"node {node.name} refused the C-FIND: status 0x{status.Status:04X} {comment}".strip())
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("C-FIND on %s at %s level: %d matches", node.name, level, len(results))
    return results


@dataclass
class RetrieveResult:
    """The outcome of a retrieve: the peer's final status and sub-operation counts."""

    status: int
    progress: Progress
    comment: str = ""
    stored: list[str] = field(default_factory=list)  # C-GET: SOP Instance UIDs ingested here

    @property
    def ok(self) -> bool:
        return self.status == 0


def retrieve(
    node: Node,
    archive: Archive,
    level: str,
    keys: Mapping[str, str],
    *,
    method: str = "move",
    destination: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> RetrieveResult:
    """Retrieve from ``node`` by C-MOVE (to ``destination``, default our own AE) or C-GET.

    C-MOVE needs our running listener registered on the node under our AE title; C-GET needs
    no registration: the instances come back on this association and go through the archive's
    ingestor (the one ingest path).
    """
    settings, ingestor = archive.settings, archive.ingestor
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = client_ae(settings)
    model = _model(method, level)
    stored: list[str] = []
    if method == "move":
        assoc = subops.associate(ae, node, [build_context(model)])
        responses = assoc.send_c_move(identifier, destination or settings.dicom.ae_title, model)
    elif method == "get":
        # What comes back is staged where the listener stages, for the one ingest path.
        pynetdicom_ext.apply(settings.dicom.reactor_poll_ms, archive.blobs.stage)
        # 127 contexts: the C-GET model and the 120 most common storage classes, any syntax.
        contexts = [build_context(model)]
        roles = []
        for cx in StoragePresentationContexts[:126]:
            contexts.append(build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES))
            roles.append(build_role(cx.abstract_syntax, scp_role=True))

        def on_store(event: Any) -> Any:
            announced = str(event.request.AffectedSOPInstanceUID)
            result = ingestor.ingest(event.dataset_path, via="c-get", source=node.ae_title, announced_uid=announced)
            if result.ok:
                stored.append(result.sop_instance_uid)
            else:
                log.error("C-GET from %s: instance refused: %s", node.name, result.message)
            return result.dicom_status

        assoc = subops.associate(ae, node, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        responses = assoc.send_c_get(identifier, model)
    else:
        raise ValueError(f"unknown retrieve method {method!r} (use move or get)")
    progress = Progress(0)
    final = RetrieveResult(0xC000, progress, "no final response")
    try:
        for status, _identifier in responses:
            if "Status" not in status:
                raise PeerError(f"node {node.name} stopped answering the C-{method.upper()} (aborted or timed out)")
            _counts(progress, status)
            if code_to_category(status.Status) == "Pending":
                if on_progress:
                    on_progress(progress)
                continue
            final = RetrieveResult(int(status.Status), progress, str(status.get("ErrorComment", "")), stored)
    finally:
        if assoc.is_established:
            assoc.release()
    if on_progress:
        on_progress(progress)
    log.info("C-%s from %s: status 0x%04X, %s", method.upper(), node.name, final.status, progress.summary())
    return final


def _counts(progress: Progress, status: Dataset) -> None:
    """Copy the sub-operation counts of a C-MOVE/C-GET response into ``progress``."""
    completed = int(status.get("NumberOfCompletedSuboperations", progress.completed) or 0)
    failed = int(status.get("NumberOfFailedSuboperations", progress.failed) or 0)
    warning = int(status.get("NumberOfWarningSuboperations", progress.warning) or 0)
    remaining = status.get("NumberOfRemainingSuboperations")
    progress.completed, progress.failed, progress.warning = completed, failed, warning
    if remaining is not None:
        progress.total = completed + failed + warning + int(remaining)
    else:
        progress.total = max(progress.total, completed + failed + warning)
