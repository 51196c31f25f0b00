"""Workstation self-registration, which needs no login (issue 14, finding 6).

Before, ``/register`` C-ECHOed any host and port it was given and its answers told refused, open
and DICOM ports apart (a port scanner), and with the default settings it saved an active node.
Now it echoes only the address the request comes from, is rate-limited, answers every failure
alike, and saves the node pending an admin's approval.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import MACPACS, ServerProcess, dcmtk, free_port, wait_for_port

from .accounts import page_token
from .conftest import start_server

LIMIT = 10  # pages.REGISTER_LIMIT: registrations per address per 10 minutes


@pytest.fixture
def storescp() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "WS1", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, proc=proc)  # type: ignore[arg-type]
    yield port
    proc.terminate()
    proc.wait(10)


def closing_listener() -> int:
    """A port where something accepts connections and closes them at once (not DICOM)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def silent_listener() -> tuple[socket.socket, int]:
    """A port that takes connections into its backlog and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    return server, server.getsockname()[1]


def nodes(server: ServerProcess) -> str:
    return subprocess.run(
        [MACPACS, "nodes", "list", "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=60
    ).stdout


def test_registration_echoes_only_the_caller_says_nothing_of_other_ports_and_waits_for_approval(
    tmp_path, storescp: int
) -> None:
    # Default settings (dicom.accept_unknown_nodes = true), a short client timeout for the silent port.
    server = start_server(tmp_path / "data", env={"MACPACS_DICOM_CLIENT_TIMEOUT": "2"})
    base = f"http://127.0.0.1:{server.web_port}"
    browser = requests.Session()

    def register(port: object, ae: str = "WS1", **headers: str) -> requests.Response:
        form = {
            "ae_title": ae,
            "port": str(port),
            "host": "192.0.2.1",
            "csrf_token": page_token(browser, f"{base}/register"),
        }
        return browser.post(f"{base}/register", data=form, headers=headers, timeout=60)

    def result(response: requests.Response) -> str:
        found = re.search(r'id="register-result"[^>]*>([^<]*)<', response.text)
        assert found, response.text[:500]
        return found.group(1)

    try:
        # The form's host (192.0.2.1, a documentation address) is ignored: the caller is echoed.
        saved = register(storescp)
        assert saved.status_code == 200, result(saved)
        assert "waits for an administrator&#39;s approval" in result(saved)
        line = next(row for row in nodes(server).splitlines() if row.startswith("WS1"))
        assert "127.0.0.1" in line and "pending" in line and "192.0.2.1" not in line

        silent, silent_port = silent_listener()
        try:
            failures = {what: register(port, ae="WS9") for what, port in (
                ("refused", free_port()), ("not DICOM", closing_listener()), ("silent", silent_port),
            )}  # fmt: skip
        finally:
            silent.close()
        texts = {what: re.sub(r":\d+ failed", ":PORT failed", result(r)) for what, r in failures.items()}
        assert {r.status_code for r in failures.values()} == {502}
        assert len(set(texts.values())) == 1, texts  # one wording, whatever listens there
        assert texts["refused"] == (
            "C-ECHO to WS9 at 127.0.0.1:PORT failed: no DICOM answer. Start the workstation&#39;s DICOM listener, "
            "check the AE title, port and firewall, then try again. Nothing was saved."
        )
        assert "WS9" not in nodes(server)

        # A page that reached the server through another name (DNS rebinding) may not register.
        # (requests matches cookies to a forged Host, so the browser's cookie goes in by hand.)
        cookie = f"macpacs_csrf={browser.cookies['macpacs_csrf']}"
        rebound = register(storescp, ae="WS8", Host=f"evil.test:{server.web_port}", Cookie=cookie)
        assert rebound.status_code == 403 and "not this server" in result(rebound)

        # Rate-limited per address: 4 counted so far (the rebound one was refused before).
        codes = [register("x", ae="WS7").status_code for _ in range(LIMIT - 4)]
        assert codes == [400] * (LIMIT - 4)
        limited = register(storescp, ae="WS6")
        assert limited.status_code == 429 and "too many registrations from 127.0.0.1" in result(limited)
    finally:
        server.stop()
