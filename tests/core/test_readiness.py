"""The server is ready only when every listener accepts; early clients wait, they are not refused."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import MACPACS, ROOT, free_port, run_tool


def test_ready_only_when_every_listener_accepts(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify))
    systemd.settimeout(60)
    dicom, web, xmlrpc = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify),
        "MACPACS_WEB_BIND": "127.0.0.1",
        "MACPACS_DICOM_BIND": "127.0.0.1",
    }
    argv = [MACPACS, "serve", "--data-dir", str(tmp_path / "data")]
    argv += ["--dicom-port", str(dicom), "--web-port", str(web), "--xmlrpc-port", str(xmlrpc)]
    with open(tmp_path / "serve.out", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        # The first moment the web port takes a connection, ask /testdbalive on it.
        deadline = time.monotonic() + 60
        while True:
            try:
                early = socket.create_connection(("127.0.0.1", web), timeout=60)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the web port was never bound"
                time.sleep(0.005)
        with early:
            early.sendall(b"GET /testdbalive HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = early.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # By the time the watchdog probe answered, DICOM accepted too.
        run_tool("echoscu", "-aec", "MACPACS", "127.0.0.1", str(dicom), timeout=10)
        assert systemd.recv(64) == b"READY=1"
        log = (tmp_path / "serve.out").read_text()
        assert log.index("DICOM listener on") < log.index("web listener on") < log.index("macpacs ready:")
    finally:
        proc.terminate()
        proc.wait(30)
        systemd.close()
