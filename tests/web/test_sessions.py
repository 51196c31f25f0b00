"""Server-side sessions and the CSRF token bound to them (issue 14, finding 3).

Before, the cookie was a signed user name: logout, a new password and removing the user left it
valid for 12 hours, and a CSRF token was good in any browser that also carried it as a cookie.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import ServerProcess

from .accounts import add_user, login, page_token, users
from .conftest import self_signed_cert, start_server

OFF = {"MACPACS_WEB_ANONYMOUS_READ": "off"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests with default lifetimes; each test has its own users."""
    data = tmp_path_factory.mktemp("sessions") / "data"
    for name in ("alice", "bea", "cid"):
        add_user(data, name, f"{name} password")
    add_user(data, "bob", "bob password", role="user")
    started = start_server(data, env=OFF)
    yield started
    started.stop()


def whoami(base: str, cookie: str, **kwargs: object) -> int:
    return requests.get(f"{base}/api/whoami", cookies={"macpacs_session": cookie}, timeout=10, **kwargs).status_code  # type: ignore[arg-type]


def test_the_cookie_is_a_random_token_that_logout_ends(server: ServerProcess) -> None:
    base = f"http://127.0.0.1:{server.web_port}"
    browser = requests.Session()
    form = {"username": "alice", "password": "alice password", "csrf_token": page_token(browser, f"{base}/login")}
    r = browser.post(f"{base}/login", data=form, allow_redirects=False, timeout=10)
    assert r.status_code == 303
    header = r.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=lax" in header and "Secure" not in header
    cookie = browser.cookies["macpacs_session"]
    assert b"alice" not in base64.urlsafe_b64decode(cookie.split(".")[0] + "===")
    assert whoami(base, cookie) == 200

    r = browser.post(f"{base}/logout", data={"csrf_token": page_token(browser, f"{base}/studies")}, timeout=10)
    assert r.url.endswith("/login?logged_out=1")
    assert whoami(base, cookie) == 401  # a copy of the cookie is worthless after logout


def test_a_new_password_and_removing_the_user_end_every_session(server: ServerProcess) -> None:
    data = server.data_dir
    base = f"http://127.0.0.1:{server.web_port}"
    first, second = (login(base, "bea", "bea password").cookies["macpacs_session"] for _ in range(2))
    bob = login(base, "bob", "bob password").cookies["macpacs_session"]
    assert [whoami(base, c) for c in (first, second, bob)] == [200, 200, 200]
    assert "2 session(s)" in next(row for row in users(data, "list").splitlines() if row.startswith("bea"))

    users(data, "passwd", "bea", "--password-stdin", password="bea new password")
    assert [whoami(base, c) for c in (first, second, bob)] == [401, 401, 200]

    assert "1 session(s) of bob ended" in users(data, "logout", "bob")
    assert whoami(base, bob) == 401

    bob = login(base, "bob", "bob password").cookies["macpacs_session"]
    users(data, "remove", "bob")
    add_user(data, "bob", "bob password", role="user")  # a new account with the old name
    assert whoami(base, bob) == 401


@pytest.mark.slow  # ~20 s of waiting for the expiries; logout and password changes end sessions in the default run
def test_sessions_end_when_idle_and_after_their_lifetime(tmp_path) -> None:
    """Idle 4.8 s and absolute 10.8 s here (the defaults are 60 min and 12 h), over HTTPS."""
    data = tmp_path / "data"
    add_user(data, "alice", "alice password")
    cert, key = self_signed_cert(tmp_path)
    env = {
        **OFF,
        "MACPACS_WEB_SESSION_IDLE_MINUTES": "0.08",
        "MACPACS_WEB_SESSION_HOURS": "0.003",
        "MACPACS_WEB_TLS_CERT": str(cert),
        "MACPACS_WEB_TLS_KEY": str(key),
    }
    server = start_server(data, env=env)
    base = f"https://127.0.0.1:{server.web_port}"
    try:
        tls = {"verify": str(cert)}  # per request: REQUESTS_CA_BUNDLE would win over Session.verify
        browser = requests.Session()
        form = {
            "username": "alice",
            "password": "alice password",
            "csrf_token": page_token(browser, f"{base}/login", **tls),
        }
        r = browser.post(f"{base}/login", data=form, allow_redirects=False, timeout=10, **tls)
        assert "Secure" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
        active = browser.cookies["macpacs_session"]
        started = time.monotonic()
        idle = login_tls(base, tls)
        while time.monotonic() - started < 7:  # requests every half second keep a session alive...
            assert whoami(base, active, **tls) == 200
            time.sleep(0.5)
        assert whoami(base, idle, **tls) == 401  # ...and one left alone ends after 4.8 s
        page = requests.get(
            f"{base}/studies", cookies={"macpacs_session": idle}, allow_redirects=False, timeout=10, **tls
        )
        assert page.status_code == 303 and page.headers["location"].endswith("&expired=1")
        time.sleep(max(0.0, 11.5 - (time.monotonic() - started)))
        assert whoami(base, active, **tls) == 401  # and every one ends at its lifetime
    finally:
        server.stop()


def login_tls(base: str, tls: dict[str, str]) -> str:
    browser = requests.Session()
    token = page_token(browser, f"{base}/login", **tls)
    form = {"username": "alice", "password": "alice password", "csrf_token": token}
    assert browser.post(f"{base}/login", data=form, allow_redirects=False, timeout=10, **tls).status_code == 303
    return browser.cookies["macpacs_session"]


def test_the_csrf_token_is_bound_to_the_session(server: ServerProcess) -> None:
    base = f"http://127.0.0.1:{server.web_port}"
    victim = requests.Session()
    before_login = page_token(victim, f"{base}/login")
    form = {"username": "cid", "password": "cid password", "csrf_token": before_login}
    assert victim.post(f"{base}/login", data=form, allow_redirects=False, timeout=10).status_code == 303
    session = victim.cookies["macpacs_session"]

    # An attacker's own valid pair (its cookie and the token that goes with it), planted in the
    # victim's browser, as a page on another port of this host can do with Set-Cookie.
    attacker = requests.Session()
    attacker_token = page_token(attacker, f"{base}/login")
    planted = {"macpacs_session": session, "macpacs_csrf": attacker.cookies["macpacs_csrf"]}
    for token in (attacker_token, before_login):
        forged = requests.post(
            f"{base}/logout", data={"csrf_token": token}, cookies=planted, allow_redirects=False, timeout=10
        )
        assert forged.status_code == 403 and "CSRF check" in forged.text
        api = requests.delete(
            f"{base}/api/ui/studies/1.2.3", headers={"X-CSRF-Token": token}, cookies=planted, timeout=10
        )
        assert api.status_code == 403
    assert whoami(base, session) == 200  # still logged in

    own = page_token(victim, f"{base}/studies")
    assert victim.delete(f"{base}/api/ui/studies/1.2.3", headers={"X-CSRF-Token": own}, timeout=10).status_code == 404
    assert victim.post(f"{base}/logout", data={"csrf_token": own}, timeout=10).status_code == 200
    # The ended session's token is refused too.
    again = requests.post(
        f"{base}/logout", data={"csrf_token": own}, cookies=planted, allow_redirects=False, timeout=10
    )
    assert again.status_code == 403
