"""The job kinds that move instances over DICOM: ``send`` (C-STORE to a node) and ``retrieve``.

``send`` is the study page's "Send to node" and every routing rule's: its payload names the
node, the matching keys of what to send (a study, or one instance) and optionally a transfer
syntax to send as. Send jobs with one batch key (routing: the instances of one node and syntax)
are run together, on one association, and each job succeeds or fails with its own instances.
``retrieve`` is XML-RPC ``Retrieve`` and ``CMove``: C-MOVE or C-GET from a node into this
archive, of given studies or of what a query (an accession number) finds there when it runs.

Both go through the one send path (``subops.send_to_node``) and the SCU (``scu``); a node that
cannot be reached fails the attempt, with the reason in the job's message, and the queue retries.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pydicom
from pydicom.uid import UID

from ..index import StoredInstance
from ..nodes import Node, NodeError
from ..retrieve import FileMissing, locate, open_instance
from . import scu, subops
from .subops import Cancel, PeerError, Progress

if TYPE_CHECKING:
    from ..archive import Archive
    from ..jobs import Jobs, RunningJob

log = logging.getLogger(__name__)

SEND_BATCH = 500  # routed instances of one node sent on one association


def register(jobs: Jobs) -> None:
    jobs.handle("send", send, batch=SEND_BATCH)
    jobs.handle("retrieve", retrieve)


def send_batch_key(node: str, transfer_syntax: str | None) -> str:
    """The batch key of single-instance sends to ``node`` (as ``transfer_syntax``): one association."""
    return f"send:{node}:{transfer_syntax or ''}"


def _node(archive: Archive, batch: list[RunningJob]) -> Node | None:
    """The destination of a batch, or None after giving the jobs up (the node is gone)."""
    name = batch[0].payload["node"]
    try:
        node = archive.nodes.get(name)
    except NodeError as exc:
        for job in batch:
            job.give_up(f"{exc}, then retry the job (`macpacs jobs retry {job.id}`), or cancel it")
        return None
    if node.status != "active":
        for job in batch:
            job.fail(f"node {node.name} awaits approval: an admin must activate it on the DICOM nodes page")
        return None
    return node


def send(archive: Archive, batch: list[RunningJob]) -> None:
    """C-STORE what each job's keys match to its node, the whole batch on one set of associations."""
    node = _node(archive, batch)
    if node is None:
        return
    settings = archive.settings
    syntax = batch[0].payload.get("transfer_syntax") or None
    wanted = _located(archive, batch)
    for job in batch:
        if job.id not in wanted:
            job.give_up("Nothing of this is left in the archive (deleted meanwhile?).")
    instances = list({inst.sop_instance_uid: inst for found in wanted.values() for inst in found}.values())
    if not instances:
        return
    jobs = [job for job in batch if job.id in wanted]
    progress = Progress(len(instances))
    cancel = Cancel(lambda: all(job.cancelled() for job in jobs))
    with tempfile.TemporaryDirectory(prefix="macpacs-send-") as folder:
        store, outgoing, unconvertible = archive.blobs, instances, {}
        if syntax:
            store, outgoing, unconvertible = _transcoded(archive, instances, UID(syntax), Path(folder))
            progress.fail_rest(unconvertible)
        for _pending in subops.send_to_node(scu.client_ae(settings), node, store, outgoing, progress, cancel):
            if len(jobs) == 1:
                jobs[0].progress(progress.total, progress.completed + progress.warning, progress.failed)
    failed = set(progress.failed_uids)
    reason = _reason(node, archive) if failed and len(failed) == progress.total else ""
    for job in jobs:
        uids = [inst.sop_instance_uid for inst in wanted[job.id]]
        bad = [uid for uid in uids if uid in failed]
        job.progress(len(uids), len(uids) - len(bad), len(bad))
        converted = [unconvertible[uid] for uid in bad if uid in unconvertible]
        if converted:
            job.give_up(f"{len(converted)} of {len(uids)} images cannot be sent as {UID(syntax).name}: {converted[0]}")
        elif bad:
            why = reason or "refused by the node or the association failed (see the server log)"
            job.fail(f"{len(bad)} of {len(uids)} images were not accepted by {node.name}: {why}")
        elif cancel():
            job.give_up(f"Cancelled after {progress.completed} of {progress.total} images.")
        else:
            job.succeed(f"Sent {len(uids)} images to {node.name}.")
    log.info("send to %s: %s (%d job(s))", node.name, progress.summary(), len(jobs))


def _located(archive: Archive, batch: list[RunningJob]) -> dict[int, list[StoredInstance]]:
    """What each job's keys match now, by job id (jobs that match nothing are left out).

    Routed instances come as one job each, keyed by SOP Instance UID: those are looked up a
    list of UIDs at a time (PS3.4 C.2.2.2.2), one query per ``SEND_BATCH`` instead of one each;
    any other keys (a study, a series) are one query of their own.
    """
    case_insensitive = archive.settings.dicom.case_insensitive_names
    wanted: dict[int, list[StoredInstance]] = {}
    by_uid: dict[str, list[int]] = {}
    for job in batch:
        keys = job.payload["keys"]
        if set(keys) == {"SOPInstanceUID"} and "\\" not in keys["SOPInstanceUID"]:
            by_uid.setdefault(keys["SOPInstanceUID"], []).append(job.id)
        else:
            found = locate(archive.index, keys, case_insensitive=case_insensitive)
            if found:
                wanted[job.id] = found
    uids = list(by_uid)
    for start in range(0, len(uids), SEND_BATCH):
        listed = "\\".join(uids[start : start + SEND_BATCH])
        for instance in locate(archive.index, {"SOPInstanceUID": listed}, case_insensitive=case_insensitive):
            for job_id in by_uid.get(instance.sop_instance_uid, ()):
                wanted.setdefault(job_id, []).append(instance)
    return wanted


def _reason(node: Node, archive: Archive) -> str:
    """Why nothing reached ``node``, in words (a C-ECHO says whether and how it is unreachable)."""
    try:
        scu.echo(node, archive.settings)
    except (PeerError, OSError, RuntimeError) as exc:
        return str(exc)
    return "the node answers C-ECHO but refused the images (see the server log)"


class _Folder:
    """Converted copies of instances, read by the send path as a blob store would be."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self.root / key).st_size
        except FileNotFoundError:
            return None

    def open(self, key: str) -> BinaryIO:
        return open(self.root / key, "rb")

    def local_path(self, key: str) -> str:
        return str(self.root / key)

    def describe(self) -> str:
        return f"converted copies in {self.root}"


def _transcoded(
    archive: Archive, instances: Iterable[StoredInstance], syntax: UID, folder: Path
) -> tuple[_Folder, list[StoredInstance], dict[str, str]]:
    """Copies of ``instances`` in ``syntax`` (decompressed or compressed with pydicom's codecs).

    Returns the folder as a store, the copies to send, and the instances that could not be
    converted with the reason (they are not sent: the rule asked for this syntax).
    """
    out: list[StoredInstance] = []
    failed: dict[str, str] = {}
    for n, inst in enumerate(instances):
        key = f"{n}.dcm"
        try:
            with open_instance(archive.blobs, inst) as fh:
                ds = pydicom.dcmread(fh)
            current = ds.file_meta.TransferSyntaxUID
            if current != syntax:
                if current.is_compressed:
                    ds.decompress(generate_instance_uid=False)
                if syntax.is_compressed:
                    ds.compress(syntax, generate_instance_uid=False)
                else:
                    ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(folder / key, enforce_file_format=True)
        except (FileMissing, Exception) as exc:
            failed[inst.sop_instance_uid] = f"{type(exc).__name__}: {exc}"
            log.error("cannot convert %s to %s for sending: %s", inst.sop_instance_uid, syntax.name, exc)
            continue
        out.append(dataclasses.replace(inst, storage_key=key, transfer_syntax_uid=str(syntax)))
    return _Folder(folder), out, failed


def retrieve(archive: Archive, batch: list[RunningJob]) -> None:
    """C-MOVE (or C-GET) studies from a node into this archive: given ones, or what a query finds."""
    (job,) = batch
    node = _node(archive, batch)
    if node is None:
        return
    method = job.payload.get("method", "move")
    try:
        uids = job.payload.get("study_uids") or [
            str(ds.StudyInstanceUID)
            for ds in scu.query(node, archive.settings, "STUDY", job.payload["query"])
            if ds.get("StudyInstanceUID")
        ]
    except (PeerError, OSError, RuntimeError) as exc:
        job.fail(f"query on {node.name} failed: {exc}")
        return
    if not uids:
        job.give_up(f"nothing on {node.name} matches {job.payload.get('query')}")
        return
    failures, total = [], Progress(0)
    for uid in uids:
        try:
            result = scu.retrieve(node, archive, "STUDY", {"StudyInstanceUID": uid}, method=method)
        except (PeerError, OSError, RuntimeError) as exc:
            failures.append(f"study {uid}: {exc}")
            continue
        total.total += result.progress.total
        total.completed += result.progress.completed + result.progress.warning
        total.failed += result.progress.failed
        job.progress(total.total, total.completed, total.failed)
        if not result.ok:
            failures.append(f"study {uid}: status 0x{result.status:04X} {result.comment}".strip())
    if failures:
        job.fail(f"{len(failures)} of {len(uids)} studies not retrieved from {node.name}: {failures[0]}")
    else:
        job.succeed(f"Retrieved {len(uids)} studies ({total.completed} images) from {node.name}.")
