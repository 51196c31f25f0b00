"""The audit trail: one JSON line per event that touches patients' data or the archive's security.

In the spirit of IHE ATNA (DICOM PS3.15 Annex A.5): who (a web user, a DICOM node's AE title, an
operating-system account), from where (an address), did what (login, query, view, download,
retrieve, send, store, upload, delete, a node, user or configuration change), to which data
(patient IDs, study UIDs, a count), when (UTC, milliseconds), and whether it succeeded. Each
record names the PS3.15 audit message it corresponds to (``atna``), so that a site's audit
repository can map it.

Records go to ``audit.jsonl`` in the logs folder, kept apart from ``macpacs.log`` so that it can
be kept longer and read by a different person. Every process of the archive appends to it (the
server, its DICOM worker processes, CLI commands), so each append and each rotation happens under
an ``flock`` on ``audit.lock``: no line is interleaved or lost in a rotation. Optionally every
record is also sent to syslog as an RFC 5424 message (``audit.syslog``).

Writing the trail never stops clinical work: a full disk or an unreachable syslog server is
logged (at most once a minute) and the request goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .logs import LOG_FILE_MODE, make_log_dir

log = logging.getLogger(__name__)

FILE_NAME = "audit.jsonl"
LOCK_NAME = "audit.lock"

# Our event names → the DICOM PS3.15 A.5.3 audit message (event ID code) each one is.
ATNA: dict[str, str] = {
    "start": "DCM 110100 Application Activity",
    "stop": "DCM 110100 Application Activity",
    "audit-read": "DCM 110101 Audit Log Used",
    "view": "DCM 110103 DICOM Instances Accessed",
    "store": "DCM 110104 DICOM Instances Transferred",
    "retrieve": "DCM 110104 DICOM Instances Transferred",
    "send": "DCM 110104 DICOM Instances Transferred",
    "delete": "DCM 110105 DICOM Study Deleted",
    "download": "DCM 110106 Export",
    "upload": "DCM 110107 Import",
    "query": "DCM 110112 Query",
    "node-change": "DCM 110113 Security Alert",
    "user-change": "DCM 110113 Security Alert",
    "config-change": "DCM 110113 Security Alert",
    "login": "DCM 110114 User Authentication",
    "logout": "DCM 110114 User Authentication",
}

# RFC 5424 facility 10 (authpriv, "security/authorization messages"); severities 5 (notice) and
# 4 (warning, for failures).
_FACILITY = 10
_APP_NAME = "macpacs"
_MSG_ID_MAX = 32  # RFC 5424 MSGID is at most 32 printable ASCII characters


@dataclass(frozen=True)
class Actor:
    """Who acts, and from where: a web user, a DICOM node (``user`` is its AE title), an OS account."""

    user: str = ""
    address: str = ""
    via: str = ""  # "web", "dicom", "xmlrpc", "cli", "hl7"...


def local_actor(via: str) -> Actor:
    """The operating-system account running this process on the server itself (a CLI command)."""
    return Actor(getpass.getuser(), "local", via)


class AuditTrail:
    """Appends records to ``<log_dir>/audit.jsonl``; one per process, in the Archive.

    ``file_mb`` and ``files`` bound its size: when the file passes ``file_mb`` it becomes
    ``audit.jsonl.1`` (the older ones shift up, the oldest beyond ``files`` is removed).
    """

    def __init__(self, log_dir: Path, *, file_mb: int = 20, files: int = 50, syslog: str = "") -> None:
        self.path = log_dir / FILE_NAME
        self._lock_path = log_dir / LOCK_NAME
        self._max_bytes = file_mb * 1024 * 1024
        self._files = files
        self._host = socket.gethostname()
        self._guard = threading.Lock()  # one writer per process at a time; flock serialises processes
        self._last_error = 0.0
        self._recent: dict[tuple[Any, ...], float] = {}
        self._syslog = SyslogSender(syslog) if syslog else None

    def record(
        self,
        event: str,
        actor: Actor,
        *,
        outcome: str = "success",
        patients: Iterable[str] | Callable[[], Iterable[str]] = (),
        studies: Iterable[str] = (),
        count: int | None = None,
        detail: str = "",
        coalesce: float = 0.0,
    ) -> None:
        """Append one record. ``event`` is a key of ``ATNA``; ``outcome`` "success" or "failure".

        ``patients`` may be a function, called only when the record is written (looking the
        patients of a study up costs an index query that a coalesced record does not need).

        ``coalesce``: skip the record when this process recorded the same event, actor and
        studies less than that many seconds ago. A viewer asks for a series' metadata, then for
        every frame: the first request is the access worth recording, not the 500 after it.
        """
        if event not in ATNA:
            raise ValueError(f"unknown audit event {event!r}")
        study_list = sorted({s for s in studies if s})
        if coalesce and self._seen_recently((event, actor, tuple(study_list)), coalesce):
            return
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "outcome": outcome,
            "user": actor.user,
            "address": actor.address,
            "via": actor.via,
        }
        patient_list = sorted({p for p in (patients() if callable(patients) else patients) if p})
        if patient_list:
            entry["patients"] = patient_list
        if study_list:
            entry["studies"] = study_list
        if count is not None:
            entry["count"] = count
        if detail:
            entry["detail"] = detail
        entry["atna"] = ATNA[event]
        entry["host"] = self._host
        entry["pid"] = os.getpid()
        line = json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n"
        try:
            self._append(line.encode("ascii"))
        except OSError as exc:
            self._complain(f"cannot write the audit trail {self.path}: {exc.strerror or exc}; the event was: {line}")
        if self._syslog is not None:
            self._syslog.send(entry)

    def _seen_recently(self, key: tuple[Any, ...], window: float) -> bool:
        now = time.monotonic()
        with self._guard:
            if now - self._recent.get(key, -window) < window:
                return True
            if len(self._recent) >= 10_000:  # bounded: forgetting early only means a repeated record
                self._recent.clear()
            self._recent[key] = now
            return False

    def _append(self, data: bytes) -> None:
        with self._guard:
            make_log_dir(self.path.parent)
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, LOG_FILE_MODE)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
                try:
                    if os.fstat(fd).st_size + len(data) > self._max_bytes > 0:
                        os.close(fd)
                        fd = -1
                        self._rotate()
                        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
                    with contextlib.suppress(OSError):  # a file of another account keeps its mode
                        os.fchmod(fd, LOG_FILE_MODE)
                    os.write(fd, data)
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                os.close(lock_fd)  # drops the flock

    def _rotate(self) -> None:
        """audit.jsonl → .1 → .2 ...; called with the flock held."""
        oldest = self.path.with_name(f"{FILE_NAME}.{self._files}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for n in range(self._files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path.with_name(f"{FILE_NAME}.{n}"), self.path.with_name(f"{FILE_NAME}.{n + 1}"))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.path.with_name(f"{FILE_NAME}.1"))

    def _complain(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error >= 60:
            self._last_error = now
            log.error(message)

    def latest(self, count: int) -> list[dict[str, Any]]:
        """The newest ``count`` records, newest first (the status page's list)."""
        return list(reversed(list(_tail(self.path, count))))

    def close(self) -> None:
        if self._syslog is not None:
            self._syslog.close()


_SECRET = re.compile(r"secret|password|token|passphrase", re.I)


def flatten_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"dicom": {"port": 104}}`` → ``{"dicom.port": 104}``, with secrets (a webhook's signing
    secret in a plugin's options...) replaced by a short digest: a change still shows, the value never."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_settings(value, name + "."))
        elif _SECRET.search(str(key)) and value:
            flat[name] = "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:12]
        else:
            flat[name] = value
    return flat


def settings_changes(saved: Path, current: dict[str, Any]) -> list[str]:
    """What differs in ``current`` (the effective settings, flattened ``section.key`` → value) from
    the copy saved at the last start, as ``key: old → new`` lines; the copy is then updated (0600).

    The first start, with nothing saved, reports no change: the start record itself says when
    the archive began.
    """
    try:
        previous = json.loads(saved.read_text())
    except (OSError, ValueError):
        previous = None
    changes = []
    if isinstance(previous, dict):
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                changes.append(f"{key}: {previous.get(key, '(unset)')!r} → {current.get(key, '(unset)')!r}")
    if previous != current:
        tmp = saved.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(current, fh, indent=1, sort_keys=True)
            os.replace(tmp, saved)
    return changes


def describe(entry: dict[str, Any]) -> str:
    """One record as a line for people: ``macpacs audit`` and the status page."""
    what = []
    if entry.get("patients"):
        what.append("patient " + ",".join(entry["patients"]))
    if entry.get("studies"):
        studies = entry["studies"]
        what.append(f"study {studies[0]}" + (f" (+{len(studies) - 1})" if len(studies) > 1 else ""))
    if "count" in entry:
        what.append(f"{entry['count']} {'matches' if entry['event'] == 'query' else 'instances'}")
    if entry.get("detail"):
        what.append(entry["detail"])
    who = entry.get("user") or "-"
    where = entry.get("address") or "-"
    return (
        f"{entry['time']}  {entry['event']:<13} {entry.get('outcome', ''):<7}  {who} @ {where} "
        f"({entry.get('via') or '-'})  {'; '.join(what)}"
    )


def files(log_dir: Path) -> list[Path]:
    """The trail's files, oldest first: audit.jsonl.N … audit.jsonl.1, audit.jsonl."""
    rotated = []
    for path in log_dir.glob(f"{FILE_NAME}.*"):
        suffix = path.name[len(FILE_NAME) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), path))
    ordered = [p for _, p in sorted(rotated, reverse=True)]
    current = log_dir / FILE_NAME
    return ordered + ([current] if current.exists() else [])


def read(log_dir: Path) -> Iterator[dict[str, Any] | None]:
    """Every record, oldest first; None for a line that is not a record (a damaged or cut line)."""
    for path in files(log_dir):
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
            for raw in fh:
                yield _parse(raw)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and "event" in entry and "time" in entry else None


def _tail(path: Path, count: int, block: int = 64 * 1024) -> list[dict[str, Any]]:
    """The last ``count`` records of one file, oldest first, reading it backwards by blocks."""
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= count:
            pos = max(0, pos - block)
            fh.seek(pos)
            data = fh.read(end - pos)
    lines = data.splitlines()
    if pos > 0:
        lines = lines[1:]  # the first one may be cut
    entries = [e for e in (_parse(line) for line in lines) if e is not None]
    return entries[-count:]


class SyslogSender:
    """Sends records to a syslog server as RFC 5424 messages, from a background thread.

    ``target``: ``udp://host:514``, ``tcp://host:601`` (RFC 6587 octet-counted frames) or
    ``unix:/path/to/socket`` (a datagram socket such as ``/var/run/syslog`` on macOS). A request
    never waits for the network: records queue (up to 10,000; beyond that they are counted,
    dropped from syslog only, and the count is logged) and one thread sends them.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._scheme, self._address = parse_syslog_target(target)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)
        self._dropped = 0
        self._sock: socket.socket | None = None
        self._last_error = 0.0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, entry: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._dropped += 1

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            message = format_rfc5424(entry)
            for attempt in (1, 2):  # a TCP server that closed the connection: reconnect once
                try:
                    self._deliver(message)
                    break
                except OSError as exc:
                    self._disconnect()
                    if attempt == 2:
                        self._complain(
                            f"audit: cannot send to syslog {self.target}: {exc}; the record is in audit.jsonl"
                        )
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                self._complain(f"audit: {dropped} records were not sent to syslog {self.target} (queue full)")
        self._disconnect()

    def _deliver(self, message: bytes) -> None:
        if self._sock is None:
            if self._scheme == "unix":
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.connect(self._address[0])
            else:
                kind = socket.SOCK_STREAM if self._scheme == "tcp" else socket.SOCK_DGRAM
                host, port = self._address
                info = socket.getaddrinfo(host, port, type=kind)[0]
                self._sock = socket.socket(info[0], kind)
                self._sock.settimeout(5)
                self._sock.connect(info[4])
        if self._scheme == "tcp":
            self._sock.sendall(str(len(message)).encode() + b" " + message)
        else:
            self._sock.send(message)

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _complain(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error >= 60:
            self._last_error = now
            log.warning(message)


def parse_syslog_target(target: str) -> tuple[str, tuple[Any, ...]]:
    """``("udp"|"tcp", (host, port))`` or ``("unix", (path,))``; ValueError with the accepted forms."""
    forms = 'use "udp://host:514", "tcp://host:601" or "unix:/var/run/syslog"'
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"audit.syslog = {target!r}: the socket path must be absolute; {forms}")
        return "unix", (path,)
    parts = urlsplit(target)
    if parts.scheme not in ("udp", "tcp") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"audit.syslog = {target!r} is not a syslog address; {forms}")
    try:
        port = parts.port or (514 if parts.scheme == "udp" else 601)
    except ValueError:
        raise ValueError(f"audit.syslog = {target!r}: the port is not a number 1-65535; {forms}") from None
    return parts.scheme, (parts.hostname, port)


def format_rfc5424(entry: dict[str, Any]) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` with the JSON record as MSG (UTF-8)."""
    severity = 4 if entry.get("outcome") == "failure" else 5
    msg_id = "".join(c for c in str(entry.get("event", "-")) if 33 <= ord(c) <= 126)[:_MSG_ID_MAX] or "-"
    host = "".join(c for c in str(entry.get("host", "-")) if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{_FACILITY * 8 + severity}>1 {entry['time']} {host} {_APP_NAME} {entry.get('pid', '-')} {msg_id} -"
    body = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    return header.encode("ascii") + b" \xef\xbb\xbf" + body.encode("utf-8")  # BOM: MSG is UTF-8 (RFC 5424 6.4)
