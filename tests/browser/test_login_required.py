"""With ``web.anonymous_read = off`` (a server reached from other machines): every page needs a login."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import MACPACS

from .conftest import ADMIN, PASSWORD


def test_pages_and_api_need_a_login_then_work(make_server, page) -> None:
    server = make_server(env={"MACPACS_WEB_ANONYMOUS_READ": "off"})
    subprocess.run(
        [MACPACS, "users", "add", ADMIN, "--password-stdin", "--data-dir", str(server.data_dir)],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    url = f"http://127.0.0.1:{server.web_port}"
    for path in ("/studies", "/status", "/upload", "/viewer/1.2.3"):
        page.goto(url + path)
        assert re.search(r"/login\?next=", page.url), path
    assert page.request.get(f"{url}/api/ui/studies").status == 401
    page.goto(f"{url}/register")  # a workstation's user registers without an account
    assert page.locator("form[action='/register']").count() == 1

    page.goto(f"{url}/login?next=%2Fstatus")
    page.fill("input[name=username]", ADMIN)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/status$"))
    assert "Instances" in page.inner_text("main")
    page.goto(f"{url}/studies")
    page.wait_for_function("document.getElementById('count').textContent === '0 studies'")
    assert page.request.get(f"{url}/api/ui/studies").status == 200  # the session cookie
