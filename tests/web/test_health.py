"""/testdbalive and /health against a real server, including a database held locked by another process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time

import requests

from tests.conftest import MACPACS, free_port, run_tool

from .conftest import self_signed_cert, start_server


def test_testdbalive_answers_exactly_what_osirix_watchdogs_expect(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        r = requests.get(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=10)
        assert r.status_code == 200
        assert r.text == "Test DB Alive succeeded"
        assert r.headers["content-type"].startswith("text/html")
        health = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["index"] == "ok" and health["storage"] == "ok"
        # The one status document: what the status page shows, for scripts.
        assert health["counts"] == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
        assert health["stored_bytes"] == 0 and health["free_mb"] > 0 and health["low_disk"] is False
        assert health["version"] and health["dicom"]["associations"] == 0
        assert health["supervisor"] == {"state": "not configured"}
    finally:
        server.stop()


def test_locked_index_is_never_reported_alive(tmp_path):
    """Another process holds BEGIN EXCLUSIVE on index.sqlite: reads still work in WAL mode, the probe must not."""
    server = start_server(tmp_path / "data")
    url = f"http://127.0.0.1:{server.web_port}/testdbalive"
    try:
        assert requests.get(url, timeout=10).status_code == 200
        holder = sqlite3.connect(server.data_dir / "index.sqlite", isolation_level=None, timeout=5)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(2):
                try:
                    r = requests.get(url, timeout=8)
                except requests.Timeout:
                    continue  # a timeout is an acceptable "not alive"
                assert r.status_code == 500, r.text
                assert "locked" in r.text
            health = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10)
            assert health.status_code == 503 and "locked" in health.json()["index"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        deadline = time.monotonic() + 10
        while requests.get(url, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never recovered after the lock was released"
            time.sleep(0.2)
    finally:
        server.stop()


def test_unwritable_storage_fails_the_probe(tmp_path):
    server = start_server(tmp_path / "data")
    tmp_dir = server.data_dir / "tmp"
    try:
        tmp_dir.chmod(0o500)
        probe = tmp_dir / "x"
        try:
            probe.write_text("x")  # running as root ignores permissions: nothing to test then
            probe.unlink()
            return
        except PermissionError:
            pass
        r = requests.get(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=10)
        assert r.status_code == 500 and "storage" in r.text
    finally:
        tmp_dir.chmod(0o700)
        server.stop()


def test_debug_fault_switch_stops_only_the_web_listener(tmp_path):
    server = start_server(tmp_path / "data", env={"MACPACS_DEBUG_FAULTS": "1"})
    base = f"http://127.0.0.1:{server.web_port}"
    try:
        r = requests.post(f"{base}/debug/kill-web-listener", timeout=10)
        assert r.status_code == 202
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"{base}/testdbalive", timeout=2)
            except requests.ConnectionError:
                break
            assert time.monotonic() < deadline, "web listener still answering"
            time.sleep(0.1)
        assert server.proc.poll() is None
        run_tool("echoscu", *server.dicom_args())  # DICOM still served by the same process
    finally:
        server.stop()


def test_debug_fault_switch_absent_by_default(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        r = requests.post(f"http://127.0.0.1:{server.web_port}/debug/kill-web-listener", timeout=10)
        assert r.status_code in (404, 405)
        assert "/debug" not in requests.get(f"http://127.0.0.1:{server.web_port}/openapi.json", timeout=10).text
    finally:
        server.stop()


def test_https_with_configured_certificate_and_clear_error_for_a_bad_one(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    # Given as ~/ paths: checked and served by the same expanded paths.
    env = {"HOME": str(tmp_path), "MACPACS_WEB_TLS_CERT": f"~/{cert.name}", "MACPACS_WEB_TLS_KEY": f"~/{key.name}"}
    server = start_server(tmp_path / "data", env=env)
    try:
        r = requests.get(f"https://127.0.0.1:{server.web_port}/testdbalive", verify=str(cert), timeout=10)
        assert r.text == "Test DB Alive succeeded"
    finally:
        server.stop()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    proc = subprocess.run(
        [MACPACS, "serve", "--data-dir", str(tmp_path / "data2"), "--dicom-port", str(free_port()),
         "--web-port", str(free_port()), "--xmlrpc-port", str(free_port())],
        env={**os.environ, "MACPACS_WEB_TLS_CERT": str(bad), "MACPACS_WEB_TLS_KEY": str(key)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "web.tls_cert" in proc.stderr and "Traceback" not in proc.stderr
