"""An example macpacs plugin (docs/plugins.md): every hook, in about sixty lines.

- ``accept_instance`` refuses instances of the patient IDs listed in ``refuse_patient_ids``;
- ``instance_stored`` appends one JSON line per stored instance to ``log`` (default
  ``<data_dir>/example-plugin.jsonl``), from whichever process stored it;
- ``register_routes`` serves the newest lines at ``GET /plugins/example/stored``.

Settings, in macpacs.toml::

    [plugins]
    enable = ["example"]

    [plugins.example]
    log = "/var/log/macpacs/received.jsonl"
    refuse_patient_ids = ["TEST", "PHANTOM"]
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Depends

from macpacs.pacs_server.plugins import hookimpl
from macpacs.pacs_server.web.auth import require_read

log = logging.getLogger(__name__)
_lock = threading.Lock()


def _log_path(archive) -> Path:
    options = archive.plugins.options("example")
    return Path(options.get("log") or archive.settings.data_dir / "example-plugin.jsonl")


@hookimpl
def startup(archive) -> None:
    log.info("example plugin ready in the %s process (PID %d)", archive.role, os.getpid())


@hookimpl
def accept_instance(archive, instance) -> str | None:
    if instance.patient_id in archive.plugins.options("example").get("refuse_patient_ids", []):
        return f"patient ID {instance.patient_id} is refused (plugins.example.refuse_patient_ids)"
    return None


@hookimpl
def instance_stored(archive, instance, outcome) -> None:
    line = {
        "time": time.time(),
        "pid": os.getpid(),
        "role": archive.role,
        "via": instance.via,
        "source": instance.source,
        "outcome": outcome,
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": instance.study_instance_uid,
        "sha256": instance.content_hash,
    }
    with _lock, open(_log_path(archive), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")  # one write per line: processes may append at once


@hookimpl
def register_routes(archive) -> APIRouter:
    router = APIRouter(prefix="/plugins/example", tags=["example plugin"])

    @router.get("/stored", dependencies=[Depends(require_read)])
    def stored(limit: int = 20) -> list[dict]:
        """The newest ``limit`` instances the plugin saw stored."""
        try:
            lines = _log_path(archive).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines[-max(1, min(limit, 1000)) :]]

    return router
