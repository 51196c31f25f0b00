"""``macpacs audit``: read and filter the audit trail (pacs_server/audit.py).

Reading the trail is itself an audited event (PS3.15 "Audit Log Used"), recorded with the
operating-system account that ran the command.
"""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from . import audit
from .cli import config_options, load_settings

_RELATIVE = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``90m``, ``24h``, ``7d`` (that long ago) or an ISO date/time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a time: use e.g. 90m, 24h, 7d (that long ago), 2026-12-01 or 2026-12-01T08:30"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _when(entry: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
    except ValueError:
        return None


def matches(
    entry: dict[str, Any],
    *,
    since: datetime | None,
    until: datetime | None,
    events: tuple[str, ...],
    user: str | None,
    address: str | None,
    patient: str | None,
    study: str | None,
    failures: bool,
) -> bool:
    """Whether one record passes every filter given (user and address compare case-insensitively)."""
    when = _when(entry)
    if (since or until) and when is None:
        return False
    if since and when and when < since:
        return False
    if until and when and when > until:
        return False
    if events and entry.get("event") not in events:
        return False
    if user is not None and str(entry.get("user", "")).lower() != user.lower():
        return False
    if address is not None and str(entry.get("address", "")).lower() != address.lower():
        return False
    if patient is not None and patient not in entry.get("patients", []):
        return False
    if study is not None and study not in entry.get("studies", []):
        return False
    return not failures or entry.get("outcome") == "failure"


@click.command("audit")
@config_options
@click.option("--since", help="Only records from then on: 90m, 24h, 7d, or an ISO date/time (UTC).")
@click.option("--until", help="Only records up to then (same forms as --since).")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice(sorted(audit.ATNA)),
    help="Only this kind of event (repeatable).",
)
@click.option("--user", help="Only this web user, DICOM AE title or account.")
@click.option("--address", help="Only this client address.")
@click.option("--patient", help="Only records naming this Patient ID.")
@click.option("--study", help="Only records naming this Study Instance UID.")
@click.option("--failures", is_flag=True, help="Only failures (wrong passwords, refused requests...).")
@click.option("--last", type=click.IntRange(min=1), help="Only the newest N matching records.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines, as stored.")
def audit_command(
    config_path: str | None,
    data_dir: str | None,
    since: str | None,
    until: str | None,
    events: tuple[str, ...],
    user: str | None,
    address: str | None,
    patient: str | None,
    study: str | None,
    failures: bool,
    last: int | None,
    as_json: bool,
) -> None:
    """Show the audit trail (audit.jsonl in the logs folder), oldest first, filtered."""
    settings = load_settings(config_path, storage={"data_dir": data_dir})
    log_dir = settings.log_dir
    filters = {
        "since": parse_when(since) if since else None,
        "until": parse_when(until) if until else None,
        "events": events,
        "user": user,
        "address": address,
        "patient": patient,
        "study": study,
        "failures": failures,
    }
    if not audit.files(log_dir):
        raise click.ClickException(
            f"no audit trail in {log_dir} (no {audit.FILE_NAME} there): is this the data folder of the "
            "archive (--data-dir or --config)? The server writes it from its first start."
        )
    found: deque[dict[str, Any]] = deque(maxlen=last)
    damaged = 0
    for entry in audit.read(log_dir):
        if entry is None:
            damaged += 1
        elif matches(entry, **filters):
            found.append(entry)
    for entry in found:
        click.echo(json.dumps(entry, ensure_ascii=False) if as_json else audit.describe(entry))
    if damaged:
        click.echo(f"{damaged} lines of the trail are not records (cut or damaged) and were skipped", err=True)
    trail = audit.AuditTrail(log_dir, file_mb=settings.audit.file_mb, files=settings.audit.files)
    shown = " ".join(f"{k}={v}" for k, v in filters.items() if v not in (None, (), False))
    trail.record(
        "audit-read",
        audit.local_actor("cli"),
        count=len(found),
        detail=f"macpacs audit {shown}".strip(),
    )
