"""Linux: systemd units verified by systemd-analyze, and the whole install/uninstall into --root.

The end-to-end test installs with the real `macpacs install` (real venv, real pip) into a temporary
root, then starts the installed `macpacs serve` from that venv and waits for /testdbalive.
pip runs with --no-deps: installing numpy, Pillow, ... from scratch takes minutes on CI, so the
test gives the new venv the dependencies of the repo's venv through a .pth file (test-only).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from macpacs.installer.host import Host
from macpacs.installer.layout import Layout, Options
from macpacs.installer.linux import unit_files
from macpacs.installer.steps import HEALTH_BODY, Context, Effective
from macpacs.installer.system import System
from macpacs.pacs_server import config as pacs_config

from ..conftest import MACPACS, free_port


def test_units_pass_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd (.ci/run does this)")
    prefix = tmp_path / "usr/local/macpacs"
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "macpacs"  # verify checks that ExecStart exists and is executable
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    layout = Layout("linux", tmp_path / "data dir %x", prefix=prefix)  # a space and a % to quote
    options = Options(user="root", target="linux")
    ctx = Context(options, layout, Host(System()), Effective("CT 1", 11112, 3333, 8080))
    for name, _path, text in unit_files(ctx):
        unit = tmp_path / name
        unit.write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr.strip() == "", f"{name}:\n{proc.stderr}"
        if name.startswith("macpacs-verify"):  # the weekly verify's oneshot and timer: tests/installer/test_schedule.py
            continue
        assert "Restart=always" in text and "StartLimitBurst=" in text.split("[Service]")[0]
    supervisor = (tmp_path / "macpacs-supervisor.service").read_text()
    assert "Type=notify" in supervisor and "WatchdogSec=180" in supervisor and "NotifyAccess=all" in supervisor
    assert '"127.0.0.1:11112:CT 1"' in supervisor and '"--dicom"' not in supervisor
    assert f"WorkingDirectory={tmp_path}/data dir %%x" in supervisor


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MACPACS, *args], capture_output=True, text=True, input=input, timeout=240)


def test_install_into_root_then_serve_from_the_venv_then_uninstall(tmp_path):
    root = tmp_path / "root"
    ports = [free_port(), free_port(), free_port()]
    args = [
        "install",
        "--target",
        "linux",
        "--user",
        "root",
        "--root",
        str(root),
        "--yes",
        "--ae-title",
        "LINUXPACS",
        "--dicom-port",
        str(ports[0]),
        "--web-port",
        str(ports[1]),
        "--xmlrpc-port",
        str(ports[2]),
        "--pip-option=--no-deps",
    ]
    first = run(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    for path in (
        "usr/local/macpacs/bin/macpacs",
        "etc/macpacs/macpacs.toml",
        "etc/macpacs/install-state.json",
        "etc/systemd/system/macpacs.service",
        "etc/systemd/system/macpacs-supervisor.service",
        "etc/systemd/system/multi-user.target.wants/macpacs.service",
        "etc/systemd/system/multi-user.target.wants/macpacs-supervisor.service",
    ):
        assert (root / path).exists() or (root / path).is_symlink(), path
    assert (root / "var/lib/macpacs").is_dir() and (root / "var/log/macpacs").is_dir()
    config = root / "etc/macpacs/macpacs.toml"
    settings = pacs_config.load(config, environ={})
    assert settings.dicom.ae_title == "LINUXPACS" and settings.server.server_mode is True
    assert settings.storage.data_dir == "/var/lib/macpacs" and settings.web.port == ports[1]
    assert tomllib.loads(config.read_text())["server"]["log_dir"] == "/var/log/macpacs"
    assert "skipped: Linux: power-on after a power cut" in first.stdout
    assert "skipped: Linux: system units start at boot" in first.stdout

    again = run(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "    $ " not in again.stdout and "> wrote" not in again.stdout, again.stdout
    assert again.stdout.count("already done") == 4  # application, folders, config, systemd

    serve_from_venv(root, tmp_path, ports)

    gone = run("uninstall", "--root", str(root), "--yes", "--target", "linux")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())
    assert left == [], left
    assert (root / "var/lib/macpacs").is_dir()  # data kept without --purge-data


def serve_from_venv(root: Path, tmp_path: Path, ports: list[int]) -> None:
    if not Path(__file__).resolve().parents[2].joinpath("pacs_server", "web").is_dir():
        pytest.skip("pacs_server/web (the web server with /testdbalive) does not exist yet")
    venv_python = root / "usr/local/macpacs/bin/python"
    purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    Path(purelib, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(venv_python), "-c", "import macpacs.pacs_server as p; print(p.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(root)), f"pacs_server imported from {where}, not from the installed venv"
    env = {
        **os.environ,
        "MACPACS_SERVER_LOG_DIR": str(tmp_path / "logs"),
        "MACPACS_WEB_BIND": "127.0.0.1",
        "MACPACS_DICOM_BIND": "127.0.0.1",
        "MACPACS_XMLRPC_BIND": "127.0.0.1",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(root / "usr/local/macpacs/bin/macpacs"),
            "serve",
            "--config",
            str(root / "etc/macpacs/macpacs.toml"),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{ports[1]}/testdbalive"
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.3)
        assert body is not None and body.strip() == HEALTH_BODY, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_doctor_exits_non_zero_on_fail(tmp_path):
    res = run("doctor", "--root", str(tmp_path), "--user", "root")
    assert res.returncode == 1
    assert "FAIL no config at /etc/macpacs/macpacs.toml" in res.stdout and "fix: " in res.stdout


def test_macos_dry_run_preview_on_linux_masks_password():
    res = run(
        "install", "--user", "pacs", "--target", "macos", "--dry-run", "--password-stdin", input="hunter2-secret\n"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hunter2-secret" not in res.stdout + res.stderr
    assert "sysadminctl -autologin set -userName pacs -password - < (password on stdin, not shown)" in res.stdout
    assert "WARN macOS version not checked (preview)" in res.stdout


def test_wrong_target_without_dry_run_is_refused():
    res = run("install", "--user", "pacs", "--target", "macos", "--yes")
    assert res.returncode == 2 and "only with --dry-run" in res.stderr
