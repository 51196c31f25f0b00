"""The ``hl7`` plugin: HL7 v2 messages over MLLP from a RIS or HIS (orders, patient updates, merges).

It listens in the server process only (``[plugins.hl7] port``, 2575 by default), for the
addresses of ``allowed_hosts`` (this machine alone when the list is empty), optionally with
TLS. The MLLP framing and the parsing are the ``hl7`` library's (``hl7.mllp``, ``hl7.parse``).

Each message is answered with an ACK once it is durable:
- **AA**: applied. The message row (``hl7_message``, index/hl7_table.py) and its changes are
  committed in one transaction before the ACK leaves: a server that stops before the commit has
  not acknowledged the message, so the sender sends it again.
- **AR**: rejected: not HL7, no MSH, no message control ID, or a type this plugin does not handle.
- **AE**: the message could not be applied (a required field is missing or malformed); the
  ACK's MSA-3 says why. A message that failed on our side (the index) is answered AE too, and is
  not remembered as seen, so that sending it again applies it.

A message whose sending application, facility and control ID (MSH-3, MSH-4, MSH-10) were seen
before is answered with the first answer and not applied again. Orders carry their message
time (MSH-7): a message older than the last one applied to a step (out of order) is
acknowledged and kept, but changes nothing.

Handled: ORM^O01 and OMI^O23 (new, changed, cancelled and discontinued orders, status changes),
ADT^A08 (patient demographics: the index and the worklist; the stored files only with
``rewrite_files``, patient_files.py) and
ADT^A40 (merge: the prior patient's studies move to the surviving one). docs/integration.md
has the field mapping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import ipaddress
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import hl7
import hl7.mllp
from hl7.util import escape, generate_message_control_id
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ..index import patient_records
from ..index.hl7_table import DuplicateMessage, Hl7Log
from ..index.worklist_table import ProcedureTable, writing
from ..uids import is_uid
from . import hookimpl, patient_files
from .types import Instance
from .worklist import ItemError, Staged, Worklist

if TYPE_CHECKING:
    from ..archive import Archive

log = logging.getLogger(__name__)

NAME = "hl7"
DEFAULT_PORT = 2575
APPLICATION = "MACPACS"  # MSH-3 of our ACKs
HANDLED = ("ORM^O01", "OMI^O23", "ADT^A08", "ADT^A40")
# ORC-1 order control codes → what happens to the order's steps (HL7 table 0119).
CREATE_OR_UPDATE = {"NW", "XO", "SN", "SC"}
CANCELLED = {"CA", "OC", "CR"}
DISCONTINUED = {"DC", "OD", "DR"}
# ORC-5 order status (HL7 table 0038) of an SC message → step status.
ORDER_STATUS = {"CM": "COMPLETED", "CA": "CANCELED", "DC": "DISCONTINUED", "IP": "STARTED", "SC": "SCHEDULED"}


def _status_change(control: str, order_status: str) -> str | None:
    """The step status an order message sets without rescheduling (cancel, discontinue, SC), or None."""
    if control in CANCELLED:
        return "CANCELED"
    if control in DISCONTINUED:
        return "DISCONTINUED"
    if control == "SC" and order_status in ("CM", "CA", "DC", "IP"):
        return ORDER_STATUS[order_status]
    return None


class Rejected(Exception):
    """AR: the message is not one this plugin takes (not HL7, no control ID, another type)."""


class NotApplied(Exception):
    """AE: the message is HL7 and of a handled type, but cannot be applied; the text says why."""


@dataclass
class Hl7Settings:
    """``[plugins.hl7]``: the listener's port, address, allow-list and TLS."""

    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    allowed_hosts: list[str] = field(default_factory=list)  # addresses or networks; empty: this machine only
    tls_cert: str = ""
    tls_key: str = ""
    max_message_kb: int = 1024
    facility: str = ""  # MSH-4 of our ACKs
    rewrite_files: bool = False  # A08/A40 rewrite the stored files too (patient_files.py), not only the index

    @classmethod
    def of(cls, archive: Archive) -> Hl7Settings:
        options = archive.plugins.options(NAME)
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"[plugins.hl7] has unknown settings {', '.join(unknown)} "
                f"(known: {', '.join(cls.__dataclass_fields__)})"
            )
        settings = cls(**options)
        if isinstance(settings.allowed_hosts, str):  # one address written without brackets
            settings.allowed_hosts = [settings.allowed_hosts]
        if not 1 <= int(settings.port) <= 65535:
            raise ValueError(f"[plugins.hl7] port = {settings.port} is not a TCP port (1-65535)")
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ValueError("[plugins.hl7] tls_cert and tls_key must be set together")
        settings.networks()  # malformed entries are refused now, not at the first connection
        return settings

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        try:
            return [ipaddress.ip_network(entry, strict=False) for entry in self.allowed_hosts]
        except ValueError as exc:
            raise ValueError(
                f"[plugins.hl7] allowed_hosts: {exc} (use addresses or networks like 10.1.0.0/16)"
            ) from None


# -- one message --------------------------------------------------------------------------------------
BATCH = 64  # messages committed together at most (they arrived while the previous commit ran)


@dataclass
class _Outcome:
    code: str  # AA, AE or AR
    text: str  # MSA-3
    level: int
    line: str  # logged once the message is committed (or its batch has failed)


@dataclass
class _Received:
    """One message as its connection's thread prepared it (parsed, its worklist items built and
    encoded), so that the one writer only runs SQL; ``done`` gets its outcome after the commit."""

    text: str
    peer: str
    entry: dict[str, Any]
    message: hl7.Message | None = None
    rejected: str = ""  # AR, with this reason
    groups: list[_Group] = field(default_factory=list)  # ORM / OMI: the orders, planned
    done: concurrent.futures.Future[_Outcome] = field(default_factory=concurrent.futures.Future)


class Intake:
    """Parses, persists and applies messages; ``handle`` returns each one's ACK once it is durable.

    Each connection's thread parses its message and builds its worklist items (``_receive``);
    one writer thread applies and commits: messages that arrive while a commit runs (from
    several connections) are applied in one transaction, each in a savepoint of its own, and
    share its fsync, while the next ones are being parsed. Every ACK waits for the commit that
    holds its message, and is built by its connection's thread.
    """

    def __init__(self, archive: Archive, settings: Hl7Settings) -> None:
        self.archive = archive
        self.settings = settings
        self.log = Hl7Log(archive.index)
        self.worklist = Worklist(archive)
        self.procedures = ProcedureTable(archive.index)
        self._queue: queue.Queue[_Received | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def handle(self, text: str, peer: str) -> str:
        """The ACK (segments ended by CR) for one message, once the message is committed; never raises."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="hl7-writer", daemon=True)
                self._writer.start()
        received = self._receive(text, peer)
        self._queue.put(received)
        outcome = received.done.result()
        if outcome.line:
            log.log(outcome.level, "%s", outcome.line)
        return self._ack(received.entry, outcome.code, outcome.text, received.message)

    def close(self) -> None:
        """Let the writer finish what is queued, then end it."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(10.0)

    def _receive(self, text: str, peer: str) -> _Received:
        """Parse and plan one message in the caller's thread (nothing of the index is read)."""
        received = _Received(text, peer, {"raw": text, "peer": peer[:64], "control_id": None})
        try:
            received.message = self._parse(text)
            received.entry.update(_header(received.message))
            kind = received.entry["message_type"]
            if kind not in HANDLED:
                raise Rejected(f"message type {kind or '(none)'} is not handled here (handled: {', '.join(HANDLED)})")
        except Rejected as exc:
            received.rejected = str(exc)
            return received
        if kind in ("ORM^O01", "OMI^O23"):
            received.groups = _planned(received.message)
        return received

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[_Received]) -> None:
        outcomes: list[_Outcome] = []
        try:
            with writing(self.archive.index) as conn:
                for received in batch:
                    outcomes.append(self._one(conn, received))
        except Exception as exc:  # the transaction itself failed: nothing of the batch is kept
            log.exception("HL7: %d message(s) could not be committed to the index", len(batch))
            text_ = f"internal error, nothing applied: {type(exc).__name__}: {exc}; send the message again"
            outcomes = [_Outcome("AE", text_, logging.ERROR, "") for _ in batch]
        for received, outcome in zip(batch, outcomes, strict=True):
            received.done.set_result(outcome)

    def _one(self, conn: Any, received: _Received) -> _Outcome:
        """Apply one message inside the batch's transaction; its outcome."""
        entry, peer, message = received.entry, received.peer, received.message
        if received.rejected:
            self._keep(conn, entry | {"control_id": None}, "AR", received.rejected)
            line = f"HL7 message from {peer} rejected (AR): {received.rejected}"
            return _Outcome("AR", received.rejected, logging.WARNING, line)
        assert message is not None
        try:
            with conn.begin_nested():
                self.log.record(conn, entry | {"ack_code": "AA", "ack_text": ""})
                summary = self._apply(conn, received)
        except DuplicateMessage as dup:
            first = dup.first
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first["received_at"]))
            line = (
                f"HL7 {entry['message_type']} {entry['control_id']} from {peer} is a duplicate of the message "
                f"received at {when}: answered {first['ack_code']} again, not applied again"
            )
            return _Outcome(first["ack_code"], first["ack_text"], logging.INFO, line)
        except (NotApplied, ItemError) as exc:
            text_ = f"{entry['message_type']} not applied: {exc}"
            self._keep(conn, entry, "AE", text_)
            return _Outcome("AE", text_, logging.WARNING, f"HL7 {entry['control_id']} from {peer} answered AE: {text_}")
        except Exception as exc:
            log.exception("HL7 %s %s from %s could not be applied", entry["message_type"], entry["control_id"], peer)
            text_ = f"internal error, nothing applied: {type(exc).__name__}: {exc}; send the message again"
            self._keep(conn, entry | {"control_id": None}, "AE", text_)  # not remembered as seen: a re-send applies it
            return _Outcome("AE", text_, logging.ERROR, "")
        line = f"HL7 {entry['message_type']} {entry['control_id']} from {peer} applied: {summary}"
        return _Outcome("AA", "", logging.INFO, line)

    @staticmethod
    def _parse(text: str) -> hl7.Message:
        if not text.startswith("MSH"):
            raise Rejected(f"not an HL7 v2 message: it begins with {text[:12]!r}, not with an MSH segment")
        try:
            message = hl7.parse(text)
            control_id = str(message.extract_field("MSH", 1, 10)).strip()
        except Exception as exc:
            raise Rejected(f"not a readable HL7 v2 message ({type(exc).__name__}: {exc})") from None
        if not control_id:
            raise Rejected("MSH-10 (message control ID) is empty")
        return message

    def _keep(self, conn: Any, entry: dict[str, Any], code: str, text: str) -> None:
        """Record a message that changed nothing (rejected, or not applied), in the batch's transaction."""
        values = {"sending_application": "", "sending_facility": "", "message_type": "", "message_time": ""}
        values |= {k: v for k, v in entry.items() if k in ("raw", "peer", "control_id", *values)}
        with contextlib.suppress(DuplicateMessage):
            self.log.record(conn, values | {"ack_code": code, "ack_text": text[:1024]})

    def _ack(self, entry: dict[str, Any], code: str, text: str, message: hl7.Message | None) -> str:
        """The ACK, built by the hl7 library from the message (MSA-3 escaped with its separators);
        for input that is no readable message, a minimal ACK with plain text."""
        text = text[:512]
        if message is not None:
            try:
                ack = message.create_ack(code, application=APPLICATION, facility=self.settings.facility)
                if text:
                    ack.segment("MSA").assign_field(escape(message, " ".join(text.splitlines())), 3)
                return str(ack)
            except Exception:
                log.exception("could not build the ACK with the hl7 library; sending a minimal one")
        text = _plain(text)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        control = _plain(str(entry.get("control_id") or ""))
        return (
            f"MSH|^~\\&|{APPLICATION}|{_plain(self.settings.facility)}|||{stamp}||ACK|{generate_message_control_id()}|P|2.5\r"
            f"MSA|{code}|{control}|{text}\r"
        )

    # -- applying ------------------------------------------------------------------------------------
    def _apply(self, conn: Any, received: _Received) -> str:
        message, entry = received.message, received.entry
        kind = entry["message_type"]
        if kind in ("ORM^O01", "OMI^O23"):
            return self._order(conn, received.groups, entry["message_time"])
        if kind == "ADT^A08":
            key, values = _patient(message)
            changed = patient_records.update_demographics(conn, key, values)
            steps = self.procedures.set_patient(conn, key.patient_id, key.issuer, _step_patient(values))
            files = self._rewrite_files(conn, key, entry) if changed else ""
            return f"patient {key.patient_id}: {changed} patient rows, {steps} worklist items updated{files}"
        if kind == "ADT^A40":
            surviving, values = _patient(message)
            mrg = _segment(message, "MRG")
            prior = patient_records.PatientKey(_value(mrg, 1), _value(mrg, 1, 4))
            if not prior.patient_id:
                raise NotApplied("MRG-1 (prior patient ID) is empty")
            moved = patient_records.merge(conn, prior, surviving, values)
            identity = {"patient_id": surviving.patient_id, "issuer_of_patient_id": surviving.issuer}
            steps = self.procedures.set_patient(conn, prior.patient_id, prior.issuer, identity | _step_patient(values))
            files = self._rewrite_files(conn, surviving, entry) if moved else ""
            return (
                f"{prior.patient_id} merged into {surviving.patient_id}: {moved} studies, {steps} worklist items{files}"
            )
        raise AssertionError(kind)

    def _rewrite_files(self, conn: Any, key: patient_records.PatientKey, entry: dict[str, Any]) -> str:
        """With ``rewrite_files``, queue the rewrite of the patient's stored files in the message's transaction."""
        if not self.settings.rewrite_files:
            return ""
        source = f"{entry['message_type']} {entry['control_id']}"
        dedupe = (
            f"{patient_files.KIND}:{entry['sending_application']}:{entry['sending_facility']}:{entry['control_id']}"
        )
        patient_files.queue(self.archive, conn, key, source, dedupe)
        return "; its stored files are rewritten by a job"

    def _order(self, conn: Any, groups: list[_Group], message_time: str) -> str:
        """Apply the planned orders (``_planned``); a planning error is raised where the order needs what failed."""
        done = []
        for group in groups:
            if group.error is not None:
                raise group.error
            order, control, status, prefix = group.order, group.control, group.status, f"hl7:{group.order}|"
            if status is not None:
                keys = self.procedures.keys_of_order(conn, prefix)
                if not keys and control not in CANCELLED | DISCONTINUED:
                    raise NotApplied(f"order {order} is not known here, so its status cannot change")
                if not keys:
                    # A cancel before its order (out of order): remembered, so the late order stays cancelled.
                    (staged,) = group.staged()
                    step = staged.item[SPS_KEY][0]
                    self.worklist.put(
                        conn, prefix + step.ScheduledProcedureStepID, staged, source="hl7", message_time=message_time
                    )
                    done.append(f"order {order} {status.lower()} before it was scheduled")
                    continue
                changed = self.worklist.end(conn, keys, status, message_time=message_time)
                done.append(f"order {order}: {changed} steps {status.lower()}")
                continue
            if control not in CREATE_OR_UPDATE:
                raise NotApplied(f"ORC-1 order control {control or '(empty)'} is not handled (NW, XO, SC, CA, DC...)")
            for staged in group.staged():
                step = staged.item[SPS_KEY][0]
                outcome = self.worklist.put(
                    conn, prefix + step.ScheduledProcedureStepID, staged, source="hl7", message_time=message_time
                )
                if outcome == "stale":
                    outcome = "not applied (older than the message last applied to it)"
                done.append(f"order {order} step {step.ScheduledProcedureStepID} {outcome}")
        if not done:
            raise NotApplied("the message has no ORC/OBR order")
        return "; ".join(done)


SPS_KEY = "ScheduledProcedureStepSequence"


@dataclass
class _Group:
    """One order of a message (ORC with its TQ1, OBR, IPC and ZDS), planned by ``_planned``."""

    orc: Any
    obr: Any = None
    tq1: Any = None
    ipcs: list[Any] = field(default_factory=list)
    zds: Any = None
    control: str = ""  # ORC-1
    order: str = ""
    status: str | None = None  # the status a cancel or status change sets
    items: list[Staged] = field(default_factory=list)
    error: Exception | None = None  # the order cannot be applied at all
    items_error: Exception | None = None  # its items could not be built (raised only if they are needed)

    def staged(self) -> list[Staged]:
        if self.items_error is not None:
            raise self.items_error
        return self.items


def _planned(message: hl7.Message) -> list[_Group]:
    """The orders of an ORM^O01 / OMI^O23, their worklist items built and encoded (no index read);
    an error is kept on the order, for the writer to raise in the message's turn."""
    try:
        _patient(message)  # a message without a usable PID is refused before anything changes
    except NotApplied as exc:
        return [_Group(None, error=exc)]
    groups = list(_order_groups(message))
    for group in groups:
        group.control = _value(group.orc, 1).upper()
        group.order = _value(group.orc, 2) or _value(group.obr, 2) or _value(group.orc, 3) or _value(group.obr, 3)
        if not group.order:
            group.error = NotApplied("the order has no number (ORC-2 / OBR-2 placer, ORC-3 / OBR-3 filler)")
            break
        group.status = _status_change(group.control, _value(group.orc, 5).upper())
        try:
            if group.status is None:
                if group.control in CREATE_OR_UPDATE:
                    group.items = [Staged.of(item) for item in _step_items(message, group, group.order)]
            elif group.control in CANCELLED | DISCONTINUED:
                item = _step_item(message, group, group.order)
                item[SPS_KEY][0].ScheduledProcedureStepStatus = group.status
                group.items = [Staged.of(item)]
        except (NotApplied, ItemError) as exc:
            group.items_error = exc
    return groups


def _order_groups(message: hl7.Message) -> Iterator[_Group]:
    """ORC segments with the TQ1, OBR, IPC and ZDS segments that follow each."""
    group: _Group | None = None
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            if group is not None:
                yield group
            group = _Group(segment)
        elif group is not None and name in ("OBR", "TQ1", "ZDS"):
            setattr(group, name.lower(), segment)
        elif group is not None and name == "IPC":
            group.ipcs.append(segment)
    if group is not None:
        yield group


def _header(message: hl7.Message) -> dict[str, str]:
    msh = message.segment("MSH")
    kind = f"{_value(msh, 9)}^{_value(msh, 9, 2)}".upper().strip("^")
    return {
        "sending_application": _value(msh, 3)[:227],
        "sending_facility": _value(msh, 4)[:227],
        "message_time": _value(msh, 7)[:26],
        "message_type": kind[:16],
        "control_id": _value(msh, 10)[:199],
    }


def _patient(message: hl7.Message) -> tuple[patient_records.PatientKey, dict[str, str]]:
    pid = _segment(message, "PID")
    if pid is None:
        raise NotApplied("the message has no PID segment")
    patient_id = _value(pid, 3)
    if not patient_id:
        raise NotApplied("PID-3 (patient identifier) is empty")
    values = {
        "patient_name": _person_name(pid, 5),
        "patient_birth_date": _date(_value(pid, 7)),
        "patient_birth_time": _value(pid, 7)[8:14],
        "patient_sex": _sex(_value(pid, 8)),
    }
    return patient_records.PatientKey(patient_id, _value(pid, 3, 4)), values


def _step_patient(values: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v and k in ("patient_name", "patient_birth_date", "patient_sex")}


def _patient_item(message: hl7.Message) -> Dataset:
    key, values = _patient(message)
    ds = Dataset()
    ds.PatientID = key.patient_id
    if key.issuer:
        ds.IssuerOfPatientID = key.issuer
    ds.PatientName = values["patient_name"]
    ds.PatientBirthDate = values["patient_birth_date"]
    ds.PatientSex = values["patient_sex"]
    pv1 = _segment(message, "PV1")
    if pv1 is not None and _value(pv1, 8, 2):
        ds.ReferringPhysicianName = _xcn_name(pv1, 8)
    return ds


def _step_item(message: hl7.Message, group: _Group, order: str) -> Dataset:
    """One worklist item from an ORC/OBR group (ORM^O01; IHE field use: OBR-18 accession, OBR-19
    requested procedure ID, OBR-20 step ID, OBR-21 station AE title, OBR-24 modality, ZDS-1
    Study Instance UID, TQ1-7, OBR-27.4 or ORC-7.4 start)."""
    orc, obr, tq1 = group.orc, group.obr, group.tq1
    if obr is None:
        raise NotApplied(f"order {order} has no OBR segment")
    item = _patient_item(message)
    accession = _value(obr, 18) or _value(orc, 3) or _value(obr, 3)
    item.AccessionNumber = accession[:16]
    item.RequestedProcedureID = (_value(obr, 19) or accession or order)[:16]
    code, meaning, scheme = _value(obr, 4), _value(obr, 4, 2), _value(obr, 4, 3)
    item.RequestedProcedureDescription = (meaning or code)[:64]
    if code:
        item.RequestedProcedureCodeSequence = Sequence([_code(code, meaning, scheme)])
    study_uid = _value(group.zds, 1) if group.zds is not None else ""
    if study_uid:
        if not is_uid(study_uid):
            raise NotApplied(f"ZDS-1 {study_uid[:80]!r} is not a valid Study Instance UID")
        item.StudyInstanceUID = study_uid
    requesting = _xcn_name(orc, 12)
    if requesting:
        item.RequestingPhysician = requesting
    start = _value(tq1, 7) if tq1 is not None else ""
    start = start or _value(obr, 27, 4) or _value(orc, 7, 4) or _value(obr, 36)
    step = Dataset()
    step.ScheduledStationAETitle = _value(obr, 21)[:16]
    step.Modality = _value(obr, 24)[:16]
    step.ScheduledProcedureStepStartDate = _date(start)
    step.ScheduledProcedureStepStartTime = _time(start)
    step.ScheduledProcedureStepID = (_value(obr, 20) or item.RequestedProcedureID)[:16]
    step.ScheduledProcedureStepDescription = (meaning or code)[:64]
    step.ScheduledPerformingPhysicianName = _xcn_name(obr, 34)
    step.ScheduledProcedureStepStatus = ORDER_STATUS.get(_value(orc, 5).upper(), "SCHEDULED")
    if code:
        step.ScheduledProtocolCodeSequence = Sequence([_code(code, meaning, scheme)])
    item.ScheduledProcedureStepSequence = Sequence([step])
    return item


def _step_items(message: hl7.Message, group: _Group, order: str) -> list[Dataset]:
    """The worklist items of a group: one, or one per IPC segment (OMI^O23, IHE RAD-4: IPC-1
    accession, IPC-2 requested procedure ID, IPC-3 Study Instance UID, IPC-4 step ID, IPC-5
    modality, IPC-7 station name, IPC-9 station AE title)."""
    base = _step_item(message, group, order)
    if not group.ipcs:
        return [base]
    items = []
    for ipc in group.ipcs:
        item = copy.deepcopy(base)
        step = item[SPS_KEY].value[0]
        for keyword, value, target in (
            ("AccessionNumber", _value(ipc, 1), item),
            ("RequestedProcedureID", _value(ipc, 2), item),
            ("StudyInstanceUID", _value(ipc, 3), item),
            ("ScheduledProcedureStepID", _value(ipc, 4), step),
            ("Modality", _value(ipc, 5), step),
            ("ScheduledStationName", _value(ipc, 7), step),
            ("ScheduledProcedureStepLocation", _value(ipc, 8), step),
            ("ScheduledStationAETitle", _value(ipc, 9), step),
        ):
            if value:
                if keyword == "StudyInstanceUID" and not is_uid(value):
                    raise NotApplied(f"IPC-3 {value[:80]!r} is not a valid Study Instance UID")
                setattr(target, keyword, value)
        if not _value(ipc, 4):
            raise NotApplied("IPC-4 (scheduled procedure step ID) is empty")
        items.append(item)
    return items


def _code(value: str, meaning: str, scheme: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value[:16]
    code.CodingSchemeDesignator = (scheme or "L")[:16]
    code.CodeMeaning = (meaning or value)[:64]
    return code


def _segment(message: hl7.Message, name: str) -> Any:
    try:
        return message.segment(name)
    except KeyError:
        return None


def _value(segment: Any, field_num: int, component: int = 1, repeat: int = 1) -> str:
    """One component of a field ("" when absent), unescaped by the library."""
    if segment is None:
        return ""
    try:
        return str(segment.extract_field(1, field_num, repeat, component, 1)).strip()
    except (IndexError, KeyError, AttributeError):
        return ""


def _person_name(segment: Any, field_num: int) -> str:
    """An XPN (family^given^middle^suffix^prefix) as a DICOM PN (family^given^middle^prefix^suffix)."""
    family, given, middle, suffix, prefix = (_value(segment, field_num, c) for c in range(1, 6))
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")[:324]


def _xcn_name(segment: Any, field_num: int) -> str:
    """An XCN (id^family^given^middle^suffix^prefix) as a DICOM PN."""
    family, given, middle, suffix, prefix = (_value(segment, field_num, c) for c in range(2, 7))
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")[:324]


def _date(value: str) -> str:
    return value[:8] if len(value) >= 8 and value[:8].isdigit() else ""


def _time(value: str) -> str:
    clock = value[8:14]
    return clock if clock.isdigit() and len(clock) in (2, 4, 6) else ""


def _sex(value: str) -> str:
    return {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O"}.get(value.upper()[:1], "")


def _plain(text: str) -> str:
    """Text safe inside one HL7 field: separators and line breaks become spaces."""
    for ch in "|^~\\&\r\n":
        text = text.replace(ch, " ")
    return text[:512]


# -- the listener ----------------------------------------------------------------------------------------
class Hl7Listener:
    """An asyncio MLLP server (``hl7.mllp``) in a thread of its own; applying runs in a small pool."""

    def __init__(self, archive: Archive, settings: Hl7Settings) -> None:
        self.settings = settings
        self.intake = Intake(archive, settings)
        self.networks = settings.networks()
        self._loop = asyncio.new_event_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="hl7")
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; raises OSError when the port cannot be bound."""
        s = self.settings
        context = None
        if s.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(s.tls_cert, s.tls_key)
        self._server = self._loop.run_until_complete(
            hl7.mllp.start_hl7_server(
                self._client, s.bind, int(s.port), limit=int(s.max_message_kb) * 1024, ssl=context
            )
        )
        self._thread = threading.Thread(target=self._loop.run_forever, name="hl7-listener", daemon=True)
        self._thread.start()
        allowed = ", ".join(s.allowed_hosts) or "this machine only (plugins.hl7.allowed_hosts is empty)"
        log.info(
            "HL7 MLLP listener on %s:%d%s, accepting %s", s.bind, int(s.port), " (TLS)" if context else "", allowed
        )

    def stop(self) -> None:
        """Close the port and every connection, then the loop. A message being applied meanwhile is
        committed without its ACK: the sender sends it again and is answered as for a duplicate."""
        if self._thread is not None and self._thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
            with contextlib.suppress(Exception):
                closing.result(5.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        elif self._server is not None:
            self._server.close()
        if not self._loop.is_running():
            self._loop.close()
        self._pool.shutdown(wait=True)
        self.intake.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        clients = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await self._server.wait_closed()

    def allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return True
        return any(ip in network for network in self.networks)

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if not self.allowed(str(peername[0])):
            log.warning(
                "HL7 connection from %s refused: the address is not in plugins.hl7.allowed_hosts "
                "(add it there if this is your RIS, then restart)",
                peer,
            )
            writer.close()
            return
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await reader.readblock()
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning(
                            "HL7 connection from %s closed in the middle of a message (%d bytes)",
                            peer,
                            len(exc.partial),
                        )
                    return
                except hl7.mllp.InvalidBlockError:
                    log.warning("HL7 from %s: data outside an MLLP block (no <VT> start byte): answered AR", peer)
                    ack = self.intake._ack({}, "AR", "not an MLLP block: it must start with <VT> (0x0B)", None)
                    writer.writeblock(ack.encode("ascii", "replace"))
                    await writer.drain()
                    continue
                except ValueError:
                    log.warning("HL7 from %s: a message larger than plugins.hl7.max_message_kb: answered AR", peer)
                    text = f"message larger than {self.settings.max_message_kb} KB (plugins.hl7.max_message_kb)"
                    writer.writeblock(self.intake._ack({}, "AR", text, None).encode("ascii", "replace"))
                    await writer.drain()
                    continue
                text, encoding = _decode(block)
                ack = await loop.run_in_executor(self._pool, self.intake.handle, text, peer)
                writer.writeblock(ack.encode(encoding, "replace"))
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("HL7 connection from %s ended: %s", peer, exc)
        finally:
            writer.close()


def _decode(block: bytes) -> tuple[str, str]:
    """The message text and the encoding to answer in: UTF-8, else ISO 8859-1 (HL7's usual two)."""
    try:
        return block.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return block.decode("latin-1"), "latin-1"


# -- the hooks ----------------------------------------------------------------------------------------
_listener: Hl7Listener | None = None


@hookimpl
def startup(archive: Archive) -> None:
    global _listener
    if archive.role != "server":
        return
    archive.jobs.handle(patient_files.KIND, patient_files.run)
    try:
        settings = Hl7Settings.of(archive)
    except (TypeError, ValueError) as exc:
        log.error("HL7 listener NOT started: %s; fix [plugins.hl7] in the config file and restart", exc)
        return
    listener = Hl7Listener(archive, settings)
    try:
        listener.start()
    except (OSError, ssl.SSLError) as exc:
        log.error(
            "HL7 listener NOT started: cannot listen on %s:%s (%s); no HL7 message is received until this is "
            "fixed: free the port or set [plugins.hl7] port, check tls_cert/tls_key, then restart",
            settings.bind,
            settings.port,
            exc,
        )
        listener.stop()
        return
    _listener = listener


@hookimpl
def instance_stored(archive: Archive, instance: Instance) -> None:
    """With ``rewrite_files``: an instance that arrived with the ID of a patient merged away is
    indexed under the surviving one (index/patient_records.py); its file is rewritten to match."""
    if instance.via == patient_files.VIA or not archive.plugins.options(NAME).get("rewrite_files"):
        return
    issuer = str(instance.dataset.get("IssuerOfPatientID", "") or "")
    with archive.index.engine.connect() as conn:
        surviving = patient_records.surviving(conn, instance.patient_id, issuer)
    if surviving is not None:
        why = f"it arrived with patient ID {instance.patient_id}, merged into {surviving.patient_id}"
        dedupe = f"{patient_files.KIND}:{instance.sop_instance_uid}:{instance.content_hash}"
        patient_files.queue(archive, None, surviving, why, dedupe, sop_instance_uid=instance.sop_instance_uid)


@hookimpl
def shutdown(archive: Archive) -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


__all__ = ["HANDLED", "Hl7Listener", "Hl7Settings", "Intake"]
