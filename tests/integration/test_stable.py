"""Stable studies (issue 16), heard by a third-party plugin written here and enabled by its name.

The plugin is a module plus the ``dist-info`` pip would write for it (an entry point in the
``macpacs.plugins`` group) in a folder on PYTHONPATH: the server finds it exactly as an
installed package. It records every ``study_stable`` call and serves them on a route of its own.
Instances arrive by C-STORE, served by DICOM worker processes; the hook fires once per study, in
the main process only, after ``storage.stable_after`` seconds of quiet; again when more instances
arrive; for a study imported while the server was down, once it is back; and never twice across
restarts (a clean stop and a SIGKILL).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import MACPACS, run_tool
from tests.plugin_site import install_plugin
from tests.synthetic import write_series

from .jobs_helpers import wait_until

STABLE_AFTER = 1.0

PLUGIN = '''
"""A site's own plugin: remembers the stable studies and shows them on its own route."""

import json
import os
import threading
import time

from fastapi import APIRouter

from macpacs.pacs_server.plugins import hookimpl

_lock = threading.Lock()


def _path(archive):
    return archive.settings.data_dir / "sitewatch.jsonl"


@hookimpl
def study_stable(archive, study):
    line = {
        "time": time.time(),
        "pid": os.getpid(),
        "role": archive.role,
        "study": study.study_instance_uid,
        "generation": study.generation,
        "instances": study.instances,
        "series": [s.instances for s in study.series],
        "modalities": list(study.modalities),
        "sources": list(study.source_aes),
        "last_instance_at": study.last_instance_at,
        "description": str(study.dataset.get("StudyDescription", "")),
    }
    with _lock, open(_path(archive), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\\n")


@hookimpl
def register_routes(archive):
    router = APIRouter(prefix="/plugins/sitewatch")

    @router.get("/stable")
    def stable():
        path = _path(archive)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return router
'''


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The plugin 'installed' into a folder: its module and the dist-info naming its entry point."""
    return install_plugin(tmp_path / "site", "macpacs_sitewatch", "sitewatch", PLUGIN)


def _seen(server) -> list[dict]:
    return requests.get(f"http://127.0.0.1:{server.web_port}/plugins/sitewatch/stable", timeout=10).json()


def test_study_stable_fires_once_per_quiet_study_in_the_main_process_across_restarts(
    make_server, site: Path, tmp_path: Path
) -> None:
    env = {
        "PYTHONPATH": str(site),
        "MACPACS_PLUGINS_ENABLE": "sitewatch",
        "MACPACS_STORAGE_STABLE_AFTER": str(STABLE_AFTER),
        "MACPACS_DICOM_WORKERS": "2",
    }
    server = make_server(env=env)
    study = generate_uid()
    first = write_series(tmp_path / "a1", 3, size=16, study_uid=study)
    run_tool("storescu", "-aet", "MODALITY1", *server.dicom_args(), *map(str, first))
    (line,) = wait_until("the study to be stable", lambda: _seen(server))
    assert line["study"] == study and line["generation"] == 1 and line["instances"] == 3
    assert line["role"] == "server" and line["pid"] == server.proc.pid, "fired by the main process"
    assert line["sources"] == ["MODALITY1"] and line["modalities"] == ["CT"] and line["description"] == "CT CHEST"
    assert line["time"] - line["last_instance_at"] >= STABLE_AFTER, "not before stable_after seconds of quiet"

    more = write_series(tmp_path / "a2", 2, size=16, study_uid=study, series_description="SAGITTAL")
    run_tool("storescu", "-aet", "MODALITY1", *server.dicom_args(), *map(str, more))
    seen = wait_until("the study to be stable again", lambda: len(_seen(server)) == 2 and _seen(server))
    assert seen[1]["generation"] == 2 and seen[1]["instances"] == 5 and sorted(seen[1]["series"]) == [2, 3]

    # A study stored while the server is down (`macpacs import`) is stable once it is back: not lost...
    server.stop(signal.SIGTERM)
    other = write_series(tmp_path / "b", 2, size=16)
    imported = subprocess.run(
        [MACPACS, "import", "--data-dir", str(server.data_dir), str(tmp_path / "b")], capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    server.start()
    seen = wait_until("the imported study to be stable", lambda: len(_seen(server)) >= 3 and _seen(server))
    assert seen[2]["generation"] == 1 and seen[2]["instances"] == len(other)
    # ... and nothing repeats, neither after that start nor after the next one.
    time.sleep(2 * STABLE_AFTER)
    server.stop(signal.SIGKILL)
    server.start()
    time.sleep(2 * STABLE_AFTER)
    seen = _seen(server)
    assert [(s["study"], s["generation"]) for s in seen] == [
        (study, 1),
        (study, 2),
        (seen[2]["study"], 1),
    ], "each stable study once"
