"""Plugins installed for real (pip), found through entry points, run in every process (issue 13).

The example plugin of docs/plugins.md is installed with pip into a folder on PYTHONPATH, with a
plugin whose every hook raises and one that cannot even be imported. A real server then takes
instances by C-STORE (served by a DICOM worker process), STOW-RS and ``macpacs import``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.conftest import MACPACS, ROOT, findscu, run_tool
from tests.synthetic import write_series

EXAMPLE = ROOT / "docs" / "examples" / "example-plugin"
BROKEN = ROOT / "tests" / "plugins" / "broken-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both plugin packages installed with pip into a folder of their own."""
    site = tmp_path_factory.mktemp("plugin-site")
    # Built from copies: setuptools leaves build/ and *.egg-info/ in the folder it builds.
    sources = [shutil.copytree(src, tmp_path_factory.mktemp("src") / src.name) for src in (EXAMPLE, BROKEN)]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *map(str, sources)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return site


def _env(site: Path, enable: str) -> dict[str, str]:
    return {"PYTHONPATH": str(site), "MACPACS_PLUGINS_ENABLE": enable}


def _macpacs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACPACS, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300, cwd=ROOT
    )


def _seen(server, count: int) -> list[dict]:
    """The example plugin's lines once ``count`` are there (hooks of other processes write them)."""
    path = server.data_dir / "example-plugin.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"the example plugin saw {len(lines)} stored instances, expected {count}")


def _stow(server, path: Path) -> None:
    DICOMwebClient(url=f"http://127.0.0.1:{server.web_port}/dicom-web").store_instances([pydicom.dcmread(path)])


def test_instance_stored_is_heard_from_every_protocol_and_process(make_server, plugin_site, tmp_path) -> None:
    env = _env(plugin_site, "example")
    server = make_server(env=env)
    main_pid = server.proc.pid
    c_store, stow, imported, refused = (
        write_series(tmp_path / name, 1, size=16, patient_id=pid)[0]
        for name, pid in (("dimse", "P1"), ("stow", "P2"), ("import", "P3"), ("refused", "TEST"))
    )
    # The example refuses patient ID TEST only when told to: its own table of the config.
    config = tmp_path / "macpacs.toml"
    config.write_text('[plugins.example]\nrefuse_patient_ids = ["TEST"]\n')

    run_tool("storescu", *server.dicom_args(), str(c_store))
    _stow(server, stow)
    done = _macpacs(env, "import", "--data-dir", str(server.data_dir), str(imported))
    assert done.returncode == 0, done.stderr

    lines = _seen(server, 3)
    by_via = {line["via"]: line for line in lines}
    assert set(by_via) == {"c-store", "stow", "import"}
    assert by_via["c-store"]["role"] == "dicom-worker" and by_via["c-store"]["pid"] != main_pid
    assert by_via["stow"]["role"] == "server" and by_via["stow"]["pid"] == main_pid
    assert by_via["import"]["role"] == "command"
    assert all(line["outcome"] == "stored" and len(line["sha256"]) == 64 for line in lines)
    # An identical re-send changes nothing, so the plugin is not told again.
    run_tool("storescu", *server.dicom_args(), str(c_store))
    time.sleep(0.5)
    assert len(_seen(server, 3)) == 3

    # The plugin's own route, mounted on the web port.
    page = requests.get(f"http://127.0.0.1:{server.web_port}/plugins/example/stored?limit=2", timeout=10)
    assert page.status_code == 200 and len(page.json()) == 2

    # accept_instance: a refusal is the DICOM failure status, and nothing is stored.
    server.stop()
    server.extra_args = ["--config", str(config)]
    server.start()
    proc = run_tool("storescu", "-v", *server.dicom_args(), str(refused), check=False)
    assert proc.returncode != 0
    assert "Status: 0x124" in proc.stderr, proc.stderr  # refused: not authorized (DCMTK has no name for it)
    assert server.logged("refused by a plugin: patient ID TEST is refused")
    assert findscu(server, tmp_path / "find", "QueryRetrieveLevel=STUDY", "PatientID=TEST") == []


def test_a_plugin_that_raises_loses_nothing(make_server, plugin_site, tmp_path) -> None:
    env = _env(plugin_site, "example,broken,unloadable")
    server = make_server(env=env)
    files = write_series(tmp_path / "in", 3, size=16)
    run_tool("storescu", *server.dicom_args(), *map(str, files[:2]))
    _stow(server, files[2])
    (study,) = findscu(server, tmp_path / "find", "QueryRetrieveLevel=STUDY", "NumberOfStudyRelatedInstances")
    assert study.NumberOfStudyRelatedInstances == 3, "every instance is stored although a plugin raised"
    assert len(_seen(server, 3)) == 3, "the other plugins still ran"
    log = server.log()
    for hook in ("startup", "accept_instance", "instance_jobs", "instance_stored", "register_routes"):
        assert f"plugin broken failed in its {hook} hook (ignored)" in log, hook
    assert "plugin unloadable (macpacs-broken-plugin 1.0) could not be loaded and is disabled" in log

    listed = _macpacs(env, "plugins", "--data-dir", str(server.data_dir))
    assert listed.returncode == 1, "a plugin that failed to load makes `macpacs plugins` fail"
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert (
        "enabled" in rows["example"] and "accept_instance, instance_stored, register_routes, startup" in rows["example"]
    )
    assert "FAILED to load" in rows["unloadable"] and "dependency is missing" in rows["unloadable"]


def test_an_unknown_plugin_name_stops_the_server_with_a_clear_message(plugin_site, tmp_path) -> None:
    done = _macpacs(_env(plugin_site, "exampel"), "serve", "--data-dir", str(tmp_path / "data"))
    assert done.returncode != 0
    assert "plugins.enable names 'exampel', which no installed package provides" in done.stderr
    installed = done.stderr.split("installed plugins: ", 1)[1].split(")", 1)[0].split(", ")
    assert installed == sorted(installed) and {"broken", "example", "unloadable"} <= set(installed)
