"""schemathesis against /openapi.json of a loaded server: no generated request may cause a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

from .conftest import Loaded

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def test_openapi_document_lists_the_interfaces(loaded: Loaded):
    doc = requests.get(f"{loaded.base}/openapi.json", timeout=10).json()
    paths = set(doc["paths"])
    for path in ("/testdbalive", "/wado", "/dicom-web/studies", "/dicom-web/studies/{study}/series/{series}/metadata"):
        assert path in paths


def test_schemathesis_finds_no_server_errors(loaded: Loaded, tmp_path: Path):
    proc = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{loaded.base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "5",
            "--phases",
            "fuzzing",
            "--generation-deterministic",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # schemathesis writes a .schemathesis/ folder where it runs
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
