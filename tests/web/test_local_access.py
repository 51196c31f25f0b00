"""Who counts as "the Mac itself", and which proxy is believed (issue 14, findings 2 and 7).

A page that reached 127.0.0.1 through DNS rebinding arrives from loopback with the attacker's
name in ``Host``; a local process can send any ``X-Forwarded-For``. Both are forged here with
``requests`` against real servers.
"""

from __future__ import annotations

import os
import subprocess

import requests

from tests.conftest import MACPACS, free_port

from .accounts import add_user, token
from .conftest import Loaded, start_server

RETRIEVE_URL = "00081190"


def test_rebinding_host_gets_no_anonymous_access(loaded: Loaded) -> None:
    port = loaded.server.web_port
    for path in ("/dicom-web/studies", "/api/ui/studies", "/api/whoami"):
        forged = requests.get(loaded.base + path, headers={"Host": f"evil.test:{port}"}, timeout=10)
        assert forged.status_code == 401, (path, forged.status_code)
        assert "WEB^TEST" not in forged.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert requests.get(loaded.base + "/api/ui/studies", headers={"Host": host}, timeout=10).status_code == 200
    page = requests.get(loaded.base + "/studies", headers={"Host": "evil.test"}, allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")


def test_links_are_never_built_from_an_unchecked_host(loaded: Loaded) -> None:
    add_user(loaded.server.data_dir, "linker", "linker password")
    bearer = token(loaded.server.data_dir, "linker")
    port = loaded.server.web_port
    forged = requests.get(
        f"{loaded.dicomweb}/studies", headers={**bearer, "Host": f"evil.test:{port}"}, timeout=10
    ).json()
    urls = [study[RETRIEVE_URL]["Value"][0] for study in forged]
    assert urls and all(url.startswith(f"http://127.0.0.1:{port}/dicom-web/studies/") for url in urls), urls
    named = requests.get(f"{loaded.dicomweb}/studies", headers={**bearer, "Host": "localhost"}, timeout=10).json()
    assert named[0][RETRIEVE_URL]["Value"][0].startswith(f"http://localhost:{port}/dicom-web/")


def test_forwarded_for_is_ignored_without_a_configured_proxy(tmp_path) -> None:
    data = tmp_path / "data"
    add_user(data, "viewer", "viewer password", role="read")
    server = start_server(data)
    base = f"http://127.0.0.1:{server.web_port}"
    try:
        bearer = token(data, "viewer")
        who = requests.get(f"{base}/api/whoami", headers={**bearer, "X-Forwarded-For": "10.1.2.3"}, timeout=10)
        assert who.json()["address"] == "127.0.0.1"
        # A proxy nobody configured: its clients are not "this machine".
        proxied = requests.get(f"{base}/api/ui/studies", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=10)
        assert proxied.status_code == 401
        assert requests.get(f"{base}/api/ui/studies", timeout=10).status_code == 200
        # Rotating X-Forwarded-For does not escape the per-address throttle.
        codes = [
            requests.get(
                f"{base}/api/whoami", auth=(f"nobody{i}", "password1"), headers={"X-Forwarded-For": f"10.0.0.{i}"},
                timeout=10,
            ).status_code
            for i in range(21)
        ]  # fmt: skip
        assert codes == [401] * 20 + [429]
        assert server.logged("a reverse proxy seems to be in front")
    finally:
        server.stop()


def test_a_configured_proxy_is_believed_and_ends_anonymous_access(tmp_path) -> None:
    data = tmp_path / "data"
    add_user(data, "alice", "alice password")
    server = start_server(data, env={"MACPACS_WEB_FORWARDED_ALLOW_IPS": "127.0.0.1"})
    base = f"http://127.0.0.1:{server.web_port}"
    try:
        bearer = token(data, "alice")
        who = requests.get(f"{base}/api/whoami", headers={**bearer, "X-Forwarded-For": "10.9.8.7"}, timeout=10)
        assert who.json()["address"] == "10.9.8.7"
        assert requests.get(f"{base}/api/ui/studies", timeout=10).status_code == 401  # no anonymous via a proxy
        login = requests.Session()
        page = login.get(f"{base}/login", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        assert "Secure" in page.headers["set-cookie"]  # the proxy said the browser uses HTTPS
    finally:
        server.stop()


def test_a_malformed_proxy_list_stops_the_start(tmp_path) -> None:
    env = {**os.environ, "MACPACS_WEB_FORWARDED_ALLOW_IPS": "proxy.example.org"}
    done = subprocess.run(
        [MACPACS, "serve", "--data-dir", str(tmp_path / "data"), "--web-port", str(free_port()),
         "--dicom-port", str(free_port()), "--xmlrpc-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "web.forwarded_allow_ips: 'proxy.example.org' is not an address or network" in done.stdout + done.stderr
