"""Browser tests: one real ``macpacs serve`` with a CT phantom and an MR study, Debian's Chromium
driven by Playwright, and a DCMTK ``storescp`` as the workstation the pages talk to.

The server runs with ``dicom.accept_unknown_nodes = false`` so that a workstation registering
itself without logging in waits for an admin's approval (the path the issue asks for).
Screenshots go to ``tests/browser/artifacts/`` (ignored by git; copied to docs/img/ by hand).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import MACPACS, ServerProcess, dcmtk, free_port, wait_for_port
from tests.synthetic import write_series

from .phantom import write_phantom

ARTIFACTS = Path(__file__).parent / "artifacts"
ADMIN, PASSWORD = "admin", "correct horse 42"


@dataclass
class Site:
    server: ServerProcess
    data: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.web_port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("browser")
    data_dir = root / "data"
    write_phantom(root / "ct", 30, patient_name="DOE^JOHN", patient_id="PID001", study_description="CT CHEST")
    write_series(
        root / "mr",
        4,
        size=64,
        modality="MR",
        patient_name="ROE^JANE",
        patient_id="PID002",
        accession="ACC002",
        study_description="MR HEAD",
        study_date="20240301",
    )
    for what in ("ct", "mr"):
        subprocess.run(
            [MACPACS, "import", "--data-dir", str(data_dir), str(root / what)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    subprocess.run(
        [MACPACS, "users", "add", ADMIN, "--password-stdin", "--data-dir", str(data_dir)],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    supervisor = root / "supervisor-status.json"
    supervisor.write_text(
        '{"state": "healthy", "last_check": "2026-11-26T00:00:00+00:00", "restarts_24h": 1,'
        ' "results": [{"probe": "web", "ok": true, "detail": "HTTP 200"}]}'
    )
    server = ServerProcess(
        data_dir=data_dir,
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        env={
            "MACPACS_DICOM_ACCEPT_UNKNOWN_NODES": "false",
            "MACPACS_SERVER_SUPERVISOR_STATUS_FILE": str(supervisor),
            # A third of the free space: stores still succeed, the status page must warn (under 4×).
            "MACPACS_STORAGE_MIN_FREE_MB": str(shutil.disk_usage(root).free // (3 * 1024 * 1024)),
        },
    ).start()
    wait_for_port(server.web_port, proc=server.proc)
    yield Site(server, root)
    server.stop()


@dataclass
class Storescp:
    port: int
    folder: Path
    ae_title: str = "STORESCP"


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storescp]:
    """A DCMTK storescp: the workstation that is tested, registered and sent to."""
    folder = tmp_path_factory.mktemp("storescp")
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "+xa", "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)  # type: ignore[arg-type]
    yield Storescp(port, folder)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does this)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    """A fresh browser context (no cookies) and page; console errors are collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)  # type: ignore[attr-defined]
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    context.close()


def login(
    page: object, site: Site, username: str = ADMIN, password: str = PASSWORD, next_path: str = "/studies"
) -> None:
    page.goto(f"{site.url}/login?next={next_path}")  # type: ignore[attr-defined]
    page.fill("input[name=username]", username)  # type: ignore[attr-defined]
    page.fill("input[name=password]", password)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]


def shot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    return path
