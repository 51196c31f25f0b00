"""Users made with the real CLI, and browser-like logins with ``requests``, for the web security tests."""

from __future__ import annotations

import re
from pathlib import Path

import requests
from click.testing import Result

from tests.conftest import in_process_macpacs

META_TOKEN = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def run_users(data_dir: Path, *args: str, password: str | None = None) -> Result:
    """``macpacs users ARGS`` on the data folder, in this process (the CLI's own code, without a
    second of imports per call); ``password`` is typed on its standard input."""
    return in_process_macpacs(
        "users", *args, "--data-dir", str(data_dir), input=None if password is None else password + "\n"
    )


def users(data_dir: Path, *args: str, password: str | None = None, check: bool = True) -> str:
    """``run_users``'s standard output and error; with ``check``, an AssertionError if it failed."""
    done = run_users(data_dir, *args, password=password)
    if check and done.exit_code != 0:
        raise AssertionError(f"macpacs users {' '.join(args)} failed: {done.stderr}")
    return done.stdout + done.stderr


def add_user(data_dir: Path, name: str, password: str, role: str = "admin") -> None:
    users(data_dir, "add", name, "--role", role, "--password-stdin", password=password)


def token(data_dir: Path, name: str) -> dict[str, str]:
    """A new API token of the user, as request headers."""
    return {"Authorization": "Bearer " + users(data_dir, "token", name).strip()}


def page_token(session: requests.Session, url: str, **kwargs: object) -> str:
    """The CSRF token a page gives this browser (its ``<meta name="csrf-token">``)."""
    found = META_TOKEN.search(session.get(url, timeout=30, **kwargs).text)  # type: ignore[arg-type]
    assert found, f"no CSRF token on {url}"
    return found.group(1)


def login(base: str, name: str, password: str) -> requests.Session:
    """A browser-like session logged in through the login form (cookies kept)."""
    session = requests.Session()
    token = page_token(session, f"{base}/login")
    r = session.post(
        f"{base}/login",
        data={"username": name, "password": password, "csrf_token": token, "next": "/studies"},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 303, (r.status_code, r.text[:300])
    return session
