"""Pages of other origins, in a real Chromium, trying what issue 14 found they could (findings 2 and 3).

- A page on another port of the same host (the same *site*, so SameSite cookies go with its
  requests) plants a CSRF cookie of its own and submits a form to the archive as the logged-in
  admin: refused, because the token is bound to the session. Its scripts can neither read the
  archive's answers nor send what needs a preflight.
- A page that reached the archive through DNS rebinding (Chromium maps ``rebind.test`` to
  127.0.0.1; Playwright serves the attacker's page at that origin) is same-origin with the
  archive, but its requests name ``rebind.test`` in ``Host``: no anonymous reading, no registration.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from pydicom.data import get_testdata_file

from tests.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import MACPACS, ServerProcess, free_port, run_tool

from .conftest import ADMIN, PASSWORD

PATIENT = "CompressedSamples^CT1"  # CT_small.dcm's patient name


@dataclass
class Archive:
    server: ServerProcess
    url: str
    study: str


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    data = tmp_path_factory.mktemp("cross-origin") / "data"
    subprocess.run(
        [MACPACS, "users", "add", ADMIN, "--password-stdin", "--data-dir", str(data)],
        input=PASSWORD + "\n", text=True, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = ServerProcess(data_dir=data, dicom_port=free_port(), web_port=free_port(), xmlrpc_port=free_port())
    server.start()
    run_tool("storescu", *server.dicom_args(), get_testdata_file("CT_small.dcm"))
    import pydicom

    study = str(pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID)
    yield Archive(server, f"http://127.0.0.1:{server.web_port}", study)
    server.stop()


class AttackerPages(BaseHTTPRequestHandler):
    """Another site on this host: plants a cookie, serves a self-submitting form, or a blank page."""

    archive_url = ""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        if url.path == "/plant":  # cookies ignore ports: this reaches the archive's requests too
            self.send_header("Set-Cookie", f"macpacs_csrf={query['c']}; Path=/")
            body = "<p>planted</p>"
        elif url.path == "/form":
            body = (
                f'<form id="f" method="post" action="{self.archive_url}/register">'
                f'<input name="csrf_token" value="{query["t"]}"><input name="ae_title" value="EVIL">'
                f'<input name="host" value="127.0.0.1"><input name="port" value="{query["port"]}"></form>'
                '<script>addEventListener("load", () => setTimeout(() => document.getElementById("f").submit(), 50))'
                "</script>"
            )
        else:
            body = "<p>nothing to see</p>"
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def attacker(archive: Archive) -> Iterator[str]:
    handler = type("Pages", (AttackerPages,), {"archive_url": archive.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def nodes(archive: Archive) -> str:
    return subprocess.run(
        [MACPACS, "nodes", "list", "--data-dir", str(archive.server.data_dir)],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip


PROBE = """async ([archive, study, token]) => {
    const out = {};
    const attempt = async (name, url, init) => {
        try {
            const r = await fetch(url, { credentials: "include", ...init });
            out[name] = r.type === "opaque" ? "opaque" : `${r.status} ${await r.text()}`;
        } catch (e) { out[name] = "blocked"; }
    };
    await attempt("study list", `${archive}/api/ui/studies`);
    await attempt("qido", `${archive}/dicom-web/studies`);
    await attempt("page", `${archive}/studies`);
    const csrf = { "X-CSRF-Token": token };
    await attempt("delete", `${archive}/api/ui/studies/${study}`, { method: "DELETE", headers: csrf });
    await attempt("add node", `${archive}/api/ui/nodes`, {
        method: "POST", mode: "no-cors", headers: { "Content-Type": "text/plain" },
        body: JSON.stringify({ name: "evil2", ae_title: "EVIL2", host: "127.0.0.1", port: 104 }),
    });
    return out;
}"""


def test_a_page_on_another_port_can_neither_act_as_the_admin_nor_read(page, archive: Archive, attacker: str) -> None:
    page.goto(f"{archive.url}/login?next=/studies")
    page.fill("input[name=username]", ADMIN)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/studies")

    # The attacker's own valid pair, from its own visit, planted in the admin's browser.
    own = requests.Session()
    token = own.get(f"{archive.url}/login", timeout=10).text.split('name="csrf-token" content="')[1].split('"')[0]
    page.goto(f"{attacker}/plant?c={own.cookies['macpacs_csrf']}")
    planted = {c["name"]: c["value"] for c in page.context.cookies(archive.url)}
    assert planted["macpacs_csrf"] == own.cookies["macpacs_csrf"]

    with page.expect_response(lambda r: r.url.endswith("/register") and r.request.method == "POST") as answer:
        page.goto(f"{attacker}/form?t={token}&port={archive.server.dicom_port}")
    assert answer.value.status == 403
    assert "CSRF check" in answer.value.text()
    assert "EVIL" not in nodes(archive)

    page.goto(f"{attacker}/probe")
    out = page.evaluate(PROBE, [archive.url, archive.study, token])
    assert out["study list"] == out["qido"] == out["page"] == "blocked", out  # no CORS: nothing read
    assert out["delete"] == "blocked", out  # a preflight the archive does not grant
    assert out["add node"] == "opaque", out  # sent blind, and refused (no CSRF token)
    assert "EVIL" not in nodes(archive)
    study_list = requests.get(f"{archive.url}/api/ui/studies", timeout=10).json()
    assert study_list["total"] == 1  # not deleted

    page.goto(f"{archive.url}/studies")
    assert ADMIN in page.inner_text(".who")  # the admin is still logged in


REBOUND = """async () => {
    const out = {};
    for (const path of ["/api/ui/studies", "/dicom-web/studies", "/api/whoami"]) {
        // Anonymous, as the attacker is (with credentials, Chromium would wait on a login prompt).
        const r = await fetch(path, { credentials: "omit" });
        out[path] = `${r.status} ${await r.text()}`;
    }
    const form = await (await fetch("/register")).text();
    const token = form.match(/name="csrf-token" content="([^"]*)"/)[1];
    const body = new URLSearchParams({ csrf_token: token, ae_title: "REBOUND", port: "104" });
    const r = await fetch("/register", { method: "POST", body });
    out["/register"] = `${r.status} ${await r.text()}`;
    return out;
}"""


def test_a_rebound_page_reads_nothing_anonymously(browser, archive: Archive) -> None:
    # Chromium refuses a public page's requests to loopback (Local Network Access); Safari, the
    # Mac's browser, does not, so that defense is turned off here to test the server's own.
    no_lna = "--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessSendPreflights,"
    no_lna += "PrivateNetworkAccessRespectPreflightResults,BlockInsecurePrivateNetworkRequests"
    rebinding = browser.browser_type.launch(
        executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.test 127.0.0.1", no_lna]
    )
    try:
        page = rebinding.new_page()
        origin = f"http://rebind.test:{archive.server.web_port}"
        # The attacker's page, served at the archive's origin (before the name was rebound).
        page.route(f"{origin}/attack", lambda route: route.fulfill(body="<p>hello</p>", content_type="text/html"))
        page.goto(f"{origin}/attack")
        out = page.evaluate(REBOUND)
        for path in ("/api/ui/studies", "/dicom-web/studies", "/api/whoami"):
            assert out[path].startswith("401 "), (path, out[path][:200])
            assert PATIENT not in out[path]
        assert out["/register"].startswith("403 ") and "not this server" in out["/register"]
        assert "REBOUND" not in nodes(archive)
        # The same page at the archive's own name reads, as a browser on the Mac may.
        local = requests.get(f"{archive.url}/api/ui/studies", timeout=10).json()
        assert local["studies"][0]["PatientName"] == PATIENT
    finally:
        rebinding.close()
