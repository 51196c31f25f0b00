"""Users, tokens and throttling, with the real CLI and a server that refuses anonymous reads."""

from __future__ import annotations

import requests

from .accounts import run_users
from .conftest import start_server


def test_users_cli_and_http_authentication(tmp_path):
    data = tmp_path / "data"
    assert run_users(data, "add", "alice", "--password-stdin", password="correct horse").exit_code == 0
    dup = run_users(data, "add", "alice", "--password-stdin", password="correct horse")
    assert dup.exit_code != 0 and "exists already" in dup.stderr
    short = run_users(data, "add", "bob", "--password-stdin", password="short")
    assert short.exit_code != 0 and "too short" in short.stderr
    assert run_users(data, "add", "reader", "--role", "read", "--password-stdin", password="reader pass").exit_code == 0
    listing = run_users(data, "list").stdout
    assert "alice\tadmin" in listing and "reader\tread" in listing
    token = run_users(data, "token", "alice", "--name", "script").stdout.strip()
    assert token.startswith("mpt_")

    server = start_server(data, env={"MACPACS_WEB_ANONYMOUS_READ": "off"})
    base = f"http://127.0.0.1:{server.web_port}"
    try:
        r = requests.get(f"{base}/dicom-web/studies", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert requests.get(f"{base}/testdbalive", timeout=10).status_code == 200  # always open
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
        assert requests.get(f"{base}/dicom-web/studies", auth=("alice", "correct horse"), timeout=10).status_code == 200
        bearer = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{base}/api/whoami", headers=bearer, timeout=10).json()["user"] == "alice"
        bad = {"Authorization": "Bearer mpt_nope"}
        assert requests.get(f"{base}/api/whoami", headers=bad, timeout=10).status_code == 401
        garbled = {"Authorization": "Basic !!!"}
        assert requests.get(f"{base}/api/whoami", headers=garbled, timeout=10).status_code == 401

        # wrong passwords: 401, then the account is locked (429) even for the right password
        codes = [
            requests.get(f"{base}/api/whoami", auth=("reader", f"wrong{i}"), timeout=10).status_code for i in range(6)
        ]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        locked = requests.get(f"{base}/api/whoami", auth=("reader", "reader pass"), timeout=10)
        assert locked.status_code == 429 and "too many wrong passwords" in locked.json()["detail"]
        assert int(locked.headers["retry-after"]) >= 1
        assert "locked for" in run_users(data, "list").stdout
        # an admin resets the password: the lock is lifted
        assert run_users(data, "passwd", "reader", "--password-stdin", password="new reader pass").exit_code == 0
        ok = requests.get(f"{base}/api/whoami", auth=("reader", "new reader pass"), timeout=10)
        assert ok.status_code == 200 and ok.json()["role"] == "read"

        # revoking the token and removing a user take effect at once
        token_id = run_users(data, "token", "alice", "--list").stdout.split("\t")[0]
        assert run_users(data, "token", "alice", "--revoke", token_id).exit_code == 0
        assert requests.get(f"{base}/api/whoami", headers=bearer, timeout=10).status_code == 401
        assert run_users(data, "remove", "reader").exit_code == 0
        assert run_users(data, "remove", "reader").exit_code != 0
    finally:
        server.stop()


def test_throttling_per_client_address(tmp_path):
    """Many unknown user names from one address: refused with 429 before the index is asked."""
    server = start_server(tmp_path / "data", env={"MACPACS_WEB_ANONYMOUS_READ": "off"})
    base = f"http://127.0.0.1:{server.web_port}"
    try:
        codes = [
            requests.get(f"{base}/api/whoami", auth=(f"user{i}", "password1"), timeout=10).status_code
            for i in range(21)
        ]
        assert codes[:20] == [401] * 20 and codes[20] == 429
    finally:
        server.stop()


def test_anonymous_read_from_localhost_by_default(loaded):
    r = requests.get(f"{loaded.base}/api/whoami", timeout=10)
    assert r.status_code == 200 and r.json()["user"] == "anonymous"
    assert requests.get(f"{loaded.base}/api/ui/studies", timeout=10).json()["total"] >= 1
