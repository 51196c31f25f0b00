"""The ``webhooks`` plugin: an HTTP POST of JSON to a RIS, a script or a chat bridge when studies arrive.

Each ``[[plugins.webhooks.targets]]`` names a URL, the events it wants and the secret its
requests are signed with::

    [[plugins.webhooks.targets]]
    name = "ris"
    url = "https://ris.example.org/macpacs/events"
    events = ["study_stable"]            # and/or "instance_stored"
    secret_file = "/etc/macpacs/ris-webhook.secret"   # or: secret = "..."

The body is JSON: the event, the patient, the study with its series and their instance counts,
and the URLs to reach it (``web.public_url`` when set, else this host's name and web port).
Each request carries ``X-Macpacs-Signature: sha256=<hex>``, the HMAC-SHA256 of the body with
the target's secret, ``X-Macpacs-Event`` and ``X-Macpacs-Delivery`` (a unique id: the same on
every retry of one delivery, so a receiver can drop a repeat). A receiver checks the signature
over the raw body with a constant-time comparison (``hmac.compare_digest``).

Deliveries are ``webhook`` jobs of the archive's queue: an answer other than 2xx, a timeout or a
refused connection is retried with back-off, and alerts after ``jobs.alert_after`` failures.
The body is fixed when the event happens; the signature is computed when it is sent, so the
secret never enters the index.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests

from . import hookimpl, settings_tables
from .settings_tables import TableError
from .types import Instance, JobSpec, Study

if TYPE_CHECKING:
    from ..archive import Archive
    from ..jobs import RunningJob

log = logging.getLogger(__name__)

NAME = "webhooks"
EVENTS = ("study_stable", "instance_stored")
SECTION = "plugins.webhooks.targets"
KEYS = {"name", "url", "events", "secret", "secret_file"}
SIGNATURE_HEADER = "X-Macpacs-Signature"
_targets: dict[int, dict[str, Target]] = {}  # by id(archive): the targets of this process


class TargetError(TableError):
    """A webhook target is malformed; the message names it and what to change."""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    events: frozenset[str]
    secret: bytes


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Macpacs-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def parse_target(number: int, raw: Any) -> Target:
    """Check one ``[[plugins.webhooks.targets]]`` table; TargetError says what is wrong."""
    name, where = settings_tables.opening(number, raw, noun="webhook target", section=SECTION, known=KEYS)
    url = str(raw.get("url") or "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"{where}: url {url!r} must be an http:// or https:// address")
    events = raw.get("events", ["study_stable"])
    if isinstance(events, str):
        events = [events]
    wrong = [e for e in events if e not in EVENTS] if isinstance(events, list) else [events]
    if wrong or not events:
        raise TargetError(f"{where}: events {wrong or events!r}: choose among {', '.join(EVENTS)}")
    if raw.get("secret_file"):
        try:
            secret = Path(str(raw["secret_file"])).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TargetError(f"{where}: cannot read secret_file {raw['secret_file']}: {exc.strerror or exc}") from None
    else:
        secret = str(raw.get("secret") or "")
    if len(secret) < 16:
        raise TargetError(
            f"{where}: give it a secret of at least 16 characters (secret_file = PATH, or secret = ...): "
            "its requests are signed with it, so that the receiver can tell them from forgeries"
        )
    return Target(name, url, frozenset(events), secret.encode())


def load_targets(options: Mapping[str, Any], report: bool = True) -> dict[str, Target]:
    """The targets that can be understood (the others are logged when ``report``: once, by the server)."""
    parsed = settings_tables.load(
        options, "targets", section=SECTION, parse=parse_target, report=report, skipped="this target gets nothing"
    )
    targets: dict[str, Target] = {}
    for target in parsed:
        if target.name in targets:
            (log.error if report else log.debug)(
                "webhook target %r: the name is used twice; the second is skipped", target.name
            )
            continue
        targets[target.name] = target
    return targets


def base_url(archive: Archive) -> str:
    web = archive.settings.web
    if web.public_url:
        return web.public_url.rstrip("/")
    scheme = "https" if web.tls_cert else "http"
    return f"{scheme}://{_host_name()}:{web.port}"


@functools.cache
def _host_name() -> str:
    """This host's name, looked up once (a slow DNS must not slow every stored instance)."""
    return socket.getfqdn()


def _study_urls(archive: Archive, study_uid: str) -> dict[str, str]:
    base, uid = base_url(archive), quote(study_uid, safe="")
    return {
        "dicomweb": f"{base}/dicom-web/studies/{uid}",
        "page": f"{base}/studies/{uid}",
        "viewer": f"{base}/viewer/{uid}",
    }


def _listening(archive: Archive, event: str) -> list[Target]:
    return [t for t in _targets.get(id(archive), {}).values() if event in t.events]


def _jobs(targets: list[Target], event: str, body: dict[str, Any], delivery: str) -> list[JobSpec]:
    """One ``webhook`` job per target, its body signed at delivery; the dedupe key names the
    target and the delivery, so that a hook called twice posts once."""
    jobs = []
    for target in targets:
        key = f"webhook:{target.name}:{delivery}"
        text = json.dumps({**body, "delivery": key}, separators=(",", ":"))
        payload = {"target": target.name, "url": target.url, "event": event, "body": text}
        jobs.append(JobSpec("webhook", f"{event} to webhook {target.name}", payload, None, key[:255]))
    return jobs


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@hookimpl
def startup(archive: Archive) -> None:
    _targets[id(archive)] = load_targets(archive.plugins.options(NAME), report=archive.role != "dicom-worker")
    if archive.role == "server":
        archive.jobs.handle("webhook", lambda archive, batch: deliver(archive, batch))
        names = ", ".join(f"{t.name} ({', '.join(sorted(t.events))})" for t in _targets[id(archive)].values())
        log.info("webhooks: %s", names or "no valid target")


@hookimpl
def shutdown(archive: Archive) -> None:
    _targets.pop(id(archive), None)


@hookimpl
def study_stable(archive: Archive, study: Study) -> None:
    targets = _listening(archive, "study_stable")
    if not targets:
        return
    body = {
        "event": "study_stable",
        "time": _now(),
        "archive": {"ae_title": archive.settings.dicom.ae_title, "url": base_url(archive)},
        "patient": {"id": study.patient_id, "name": study.patient_name},
        "study": {
            "uid": study.study_instance_uid,
            "accession_number": study.accession_number,
            "date": study.study_date,
            "description": study.study_description,
            "modalities": list(study.modalities),
            "series_count": len(study.series),
            "instance_count": study.instances,
            "generation": study.generation,
            "last_instance_at": datetime.fromtimestamp(study.last_instance_at, UTC).isoformat(timespec="seconds"),
            "urls": _study_urls(archive, study.study_instance_uid),
        },
        "series": [
            {
                "uid": s.series_instance_uid,
                "modality": s.modality,
                "number": s.series_number,
                "description": s.series_description,
                "instance_count": s.instances,
            }
            for s in study.series
        ],
    }
    archive.jobs.submit_many(_jobs(targets, "study_stable", body, f"{study.study_instance_uid}:g{study.generation}"))


@hookimpl
def instance_jobs(archive: Archive, instance: Instance, outcome: str) -> list[JobSpec]:
    """The ``instance_stored`` event: queued with the instance's index row (see ``instance_jobs``)."""
    targets = _listening(archive, "instance_stored")
    if not targets:
        return []
    body = {
        "event": "instance_stored",
        "time": _now(),
        "archive": {"ae_title": archive.settings.dicom.ae_title, "url": base_url(archive)},
        "outcome": outcome,
        "patient": {"id": instance.patient_id},
        "study": {"uid": instance.study_instance_uid, "urls": _study_urls(archive, instance.study_instance_uid)},
        "instance": {
            "sop_instance_uid": instance.sop_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "series_uid": instance.series_instance_uid,
            "transfer_syntax_uid": instance.transfer_syntax_uid,
            "file_size": instance.file_size,
            "sha256": instance.content_hash,
            "via": instance.via,
            "source": instance.source,
        },
    }
    return _jobs(targets, "instance_stored", body, f"{instance.sop_instance_uid}:{instance.content_hash[:16]}")


def deliver(archive: Archive, batch: list[RunningJob]) -> None:
    """POST each job's body to its target, signed; a non-2xx answer or no answer fails the attempt."""
    targets = _targets.get(id(archive), {})
    timeout = archive.settings.dicom.client_timeout
    for job in batch:
        target = targets.get(job.payload["target"])
        if target is None:
            job.give_up(f"webhook target {job.payload['target']!r} is no longer in [plugins.webhooks]")
            continue
        body = job.payload["body"].encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "macpacs-webhooks",
            SIGNATURE_HEADER: signature(target.secret, body),
            "X-Macpacs-Event": job.payload["event"],
            "X-Macpacs-Delivery": json.loads(body)["delivery"],
        }
        started = time.monotonic()
        try:
            response = requests.post(target.url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
        except requests.RequestException as exc:
            job.fail(f"POST {target.url} failed: {exc}")
            continue
        ms = (time.monotonic() - started) * 1000
        if 200 <= response.status_code < 300:
            job.succeed(f"delivered to {target.name}: HTTP {response.status_code} in {ms:.0f} ms")
        else:
            job.fail(f"POST {target.url} answered HTTP {response.status_code}: {response.text[:200].strip()}")
