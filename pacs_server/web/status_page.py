"""The status page's view of the status document: human units, the Locations line, recent log lines.

The figures are the status document's (``status.document``, the same one ``/health`` serves);
this module only words them for a person and adds what only the page shows: how to connect a
workstation, and the recent association and problem lines of the current log file (which stay
off the open ``/health`` route: they name peers and patients' studies).
"""

from __future__ import annotations

import re
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import audit, verify
from ..archive import Archive
from ..config import Settings
from . import status

LOG_TAIL_BYTES = 256 * 1024
RECENT_LINES = 20
JOBS_SHOWN = 20
AUDIT_SHOWN = 15  # newest audit records on the status page (the rest: `macpacs audit`)
_ASSOCIATION = re.compile(r"association|C-ECHO|C-STORE .* from|C-FIND|C-MOVE|C-GET", re.IGNORECASE)
_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds % 60} s"


def locations_line(settings: Settings, host: str) -> str:
    """The four values OsiriX/Horos ask for in Preferences → Locations, tab-separated for pasting."""
    return f"{settings.dicom.ae_title}\t{host}\t{settings.dicom.port}\tmacpacs archive"


def _log_tail(path: Path) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > LOG_TAIL_BYTES else lines  # the first line may be cut


def _recent(lines: list[str], pattern: re.Pattern[str]) -> list[str]:
    found: deque[str] = deque(maxlen=RECENT_LINES)
    for line in lines:
        if pattern.search(line):
            found.append(line[:400])
    return list(reversed(found))


def _supervisor_text(state: dict[str, Any]) -> str:
    if state["state"] == "not configured":
        return "not configured (set server.supervisor_status_file to the watchdog's --status-file)"
    if "detail" in state:
        return state["detail"]
    failed = "; ".join(f"{r['probe']}: {r['detail']}" for r in state["failed"]) or "all probes passed"
    return f"{state['state']}, last check {state['last_check']}: {failed}; {state['restarts_24h']} restart(s) in 24 h"


def _index_text(doc: dict[str, Any]) -> str:
    if doc["index"] != "ok":
        return doc["index"]
    text = f"write check {doc['index_ms']:.1f} ms"
    files = doc["index_files"]
    if files:
        text += f"; SQLite {human_bytes(files['database'])}, WAL {human_bytes(files['wal'])}"
    return text


def _dicom_text(dicom: dict[str, Any] | None) -> str:
    if dicom is None:
        return "not served by this process"
    text = f"{dicom['associations']} open"
    workers = dicom["workers"]
    if workers:
        ready = sum(1 for w in workers if w["ready"])
        text += f", {len(workers)} worker processes ({ready} ready)"
    return text


def _jobs(archive: Archive) -> list[dict[str, Any]]:
    """The jobs worth a look: waiting, running or failed, newest first (the rest: ``macpacs jobs list``)."""
    try:
        found = archive.jobs.list(["queued", "running", "failed"], limit=JOBS_SHOWN)
    except Exception:  # the index line of the page says what is wrong
        return []
    return [
        {**job.as_json(), "changed": datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")}
        for job in found
    ]


def view(archive: Archive, host: str) -> dict[str, Any]:
    """What ``status.html`` shows: the status document in words, plus connection help and log lines."""
    s = archive.settings
    doc = status.document(archive)
    min_free = s.storage.min_free_mb * 1024 * 1024
    free = doc["free_mb"]
    log_file = s.log_dir / "macpacs.log"
    lines = _log_tail(log_file)
    unknown = "?"
    return {
        "ae_title": s.dicom.ae_title,
        "dicom_port": s.dicom.port,
        "web_port": s.web.port,
        "https": doc["https"],
        "xmlrpc_port": doc["xmlrpc_port"],
        "host": host,
        "locations_line": locations_line(s, host),
        "node": doc["node"],
        "started": datetime.fromtimestamp(archive.started_at).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "uptime": human_duration(doc["uptime_s"]),
        "counts": doc["counts"] or dict.fromkeys(("patients", "studies", "series", "instances"), unknown),
        "used": unknown if doc["stored_bytes"] is None else human_bytes(doc["stored_bytes"]),
        "store": archive.blobs.describe(),
        "free": unknown if free is None else human_bytes(free * 1024 * 1024),
        "low_disk": bool(doc["low_disk"]),
        "warn_free": human_bytes(status.WARN_FACTOR * min_free),
        "min_free": human_bytes(min_free),
        "index_ok": doc["index"] == "ok",
        "index_detail": _index_text(doc),
        "storage_ok": doc["storage"] == "ok",
        "storage_detail": doc["storage"],
        "dicom": _dicom_text(doc.get("dicom")),
        "supervisor": _supervisor_text(doc["supervisor"]),
        "job_counts": doc["jobs"],
        "jobs": _jobs(archive),
        "verify": verify.describe(verify.load_summary(s.data_dir)),
        "verify_ok": not any((doc["verify"] or {}).get(key) for key in ("remaining", "lost")),
        "associations": _recent(lines, _ASSOCIATION),
        "errors": _recent(lines, _PROBLEM),
        "audit": [audit.describe(entry) for entry in archive.audit.latest(AUDIT_SHOWN)],
        "log_file": str(log_file),
    }
