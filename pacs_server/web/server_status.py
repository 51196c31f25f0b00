"""What the status page shows: how to connect, counts, disk, index health, recent log events, watchdog.

Everything is read when the page is asked for, from the running archive's own parts (settings,
index, data folder, log file, the supervisor's status file), so the page shows what is true now
and keeps no state of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..archive import Archive
from ..config import Settings

LOG_TAIL_BYTES = 256 * 1024
RECENT_LINES = 20
# Warn when free space is under this multiple of storage.min_free_mb (where stores are refused).
WARN_FACTOR = 4
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


def _supervisor(path_text: str) -> str:
    if not path_text:
        return "not configured (set server.supervisor_status_file to the watchdog's --status-file)"
    path = Path(path_text).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no status file at {path} yet (is the watchdog running?)"
    except (OSError, ValueError) as exc:
        return f"status file {path} unreadable: {exc}"
    state = data.get("state", "?")
    last = data.get("last_check", "?")
    failed = [r for r in data.get("results", []) if not r.get("ok")]
    detail = "; ".join(f"{r.get('probe')}: {r.get('detail')}" for r in failed) or "all probes passed"
    restarts = data.get("restarts_24h", 0)
    return f"{state}, last check {last}: {detail}; {restarts} restart(s) in 24 h"


def collect(archive: Archive, host: str) -> dict[str, Any]:
    s = archive.settings
    data_dir = s.data_dir
    index_ok, index_detail = True, ""
    counts: dict[str, Any] = {"patients": "?", "studies": "?", "series": "?", "instances": "?"}
    used = 0
    try:
        start = time.perf_counter()
        archive.index.ping()
        ping_ms = (time.perf_counter() - start) * 1000
        counts = archive.index.counts()
        used = archive.index.stored_bytes()
        index_detail = f"round trip {ping_ms:.1f} ms"
        if archive.index.is_sqlite:
            db = data_dir / "index.sqlite"
            wal = Path(str(db) + "-wal")
            sizes = db.stat().st_size if db.exists() else 0
            index_detail += (
                f"; SQLite {human_bytes(sizes)}, WAL {human_bytes(wal.stat().st_size if wal.exists() else 0)}"
            )
    except Exception as exc:  # the page must render to say what is wrong
        index_ok, index_detail = False, f"{type(exc).__name__}: {exc}"
    try:
        disk = shutil.disk_usage(data_dir)
        free, total = disk.free, disk.total
    except OSError:
        free = total = 0
    min_free = s.storage.min_free_mb * 1024 * 1024
    lines = _log_tail(s.log_dir / "macpacs.log")
    started = datetime.fromtimestamp(archive.started_at, UTC).astimezone()
    return {
        "ae_title": s.dicom.ae_title,
        "dicom_port": s.dicom.port,
        "web_port": s.web.port,
        "https": bool(s.web.tls_cert),
        "xmlrpc_port": s.xmlrpc.port,
        "xmlrpc_enabled": s.xmlrpc.enabled,
        "host": host,
        "locations_line": locations_line(s, host),
        "started": started.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "uptime": human_duration(time.time() - archive.started_at),
        "counts": counts,
        "used": human_bytes(used),
        "data_dir": str(data_dir),
        "free": human_bytes(free),
        "total": human_bytes(total),
        "low_disk": free < WARN_FACTOR * min_free,
        "warn_free": human_bytes(WARN_FACTOR * min_free),
        "min_free": human_bytes(min_free),
        "index_ok": index_ok,
        "index_detail": index_detail,
        "supervisor": _supervisor(s.server.supervisor_status_file),
        "associations": _recent(lines, _ASSOCIATION),
        "errors": _recent(lines, _PROBLEM),
        "log_file": str(s.log_dir / "macpacs.log"),
    }
