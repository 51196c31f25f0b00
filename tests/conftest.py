"""Shared fixtures: free ports, DCMTK tools, and a real ``macpacs serve`` process.

Tests talk to the server only over the network, with DCMTK's tools as the outside client.
pynetdicom installs console scripts with the same names as DCMTK's into the venv, so tools
are always called by their absolute Debian path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from click.testing import Result

    from macpacs.pacs_server.archive import Archive
    from tests.postgres import Cluster
    from tests.s3gateway import Gateway

DCMTK_BIN = Path("/usr/bin")
ROOT = Path(__file__).resolve().parent.parent
# The console script installed next to the interpreter running the tests (the venv's).
MACPACS = str(Path(sys.executable).with_name("macpacs"))


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this test run was given before: the kernel may hand
    the same free port to two calls in a row (a server's DICOM and web ports, say)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK tool; fails loudly when DCMTK is not installed."""
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {path} is missing: install it with `apt-get install -y dcmtk` (.ci/run does this)")
    return str(path)


def run_tool(tool: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1 (see shared/reference/performance.md)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run([dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_macpacs(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real ``macpacs`` console script in its own process, as an admin (or a scheduled job)
    runs it beside the server; ``env`` is added to this process's environment."""
    return subprocess.run(
        [MACPACS, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def in_process_macpacs(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """The same command run in this process by click's runner (a second process costs a second of
    imports); ``input`` is its standard input, ``env`` added to the environment while it runs. An
    exception the command let through is appended to its standard error as the traceback a
    terminal would show. The umask is restored, since the commands make this process's files private."""
    import traceback

    from click.testing import CliRunner

    from macpacs.installer.entry import main

    umask = os.umask(0o022)
    os.umask(umask)
    try:
        result = CliRunner().invoke(main, list(args), input=input, env=env)
    finally:
        os.umask(umask)
    if result.exception is not None and not isinstance(result.exception, SystemExit) and result.exc_info:
        result.stderr_bytes += "".join(traceback.format_exception(*result.exc_info)).encode()
    return result


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group: what travelled over the network."""
    import pydicom

    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.read_bytes()[144 + int(meta.FileMetaInformationGroupLength) :]


def acknowledged(storescu_output: str, uid_of: dict[str, str]) -> set[str]:
    """SOP Instance UIDs whose C-STORE-RSP ``storescu -v`` reported as Success or Warning (both
    mean stored), from its output and ``uid_of`` (file path as storescu names it -> UID)."""
    acked: set[str] = set()
    current = None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response" in line and current is not None:
            if "(Success" in line or "(Warning" in line:
                acked.add(uid_of[current])
            current = None
    return acked


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class ServerProcess:
    """A running ``macpacs serve`` on free loopback ports, with its own data folder."""

    data_dir: Path
    dicom_port: int
    web_port: int
    xmlrpc_port: int
    ae_title: str = "MACPACS"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    index_url: str = ""  # empty: SQLite in data_dir
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def argv(self) -> list[str]:
        return [
            MACPACS,
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--ae-title",
            self.ae_title,
            "--dicom-port",
            str(self.dicom_port),
            "--web-port",
            str(self.web_port),
            "--xmlrpc-port",
            str(self.xmlrpc_port),
            *self.extra_args,
        ]

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"serve-{self.dicom_port}.out"
        env = {
            **os.environ,
            "MACPACS_DICOM_BIND": "127.0.0.1",
            "MACPACS_WEB_BIND": "127.0.0.1",
            "MACPACS_XMLRPC_BIND": "127.0.0.1",
            **({"MACPACS_INDEX_URL": self.index_url} if self.index_url else {}),
            **self.env,
        }
        started_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_for_port(self.dicom_port, proc=self.proc)
            self.wait_ready(started_at)
        except AssertionError:
            self.stop(signal.SIGKILL)
            raise AssertionError(f"macpacs serve did not start; its output:\n{self.log()[-3000:]}") from None
        return self

    def wait_ready(self, log_offset: int, timeout: float = 60.0) -> None:
        """Until the server logs, after ``log_offset``, that every listener accepts (its ports are
        bound, and take connections into their backlog, a little earlier)."""
        assert self.proc is not None and self.log_path is not None
        deadline = time.monotonic() + timeout
        while b"macpacs ready:" not in self.log_path.read_bytes()[log_offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("macpacs serve never logged that it is ready")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def logged(self, text: str, timeout: float = 10.0) -> bool:
        """Whether ``text`` appears in the log within ``timeout`` s: a DICOM worker's lines reach
        the main process's log a moment after the client already has its answer."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def dicom_args(self) -> list[str]:
        return ["-aec", self.ae_title, "127.0.0.1", str(self.dicom_port)]

    def kill_client_mid_transfer(self, client: subprocess.Popen[bytes]) -> None:
        """SIGKILL a sending client; check the server logs the abort and keeps no partial file."""
        client.send_signal(signal.SIGKILL)
        client.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "association aborted" not in self.log():
            time.sleep(0.05)
        assert "association aborted" in self.log()
        time.sleep(0.2)
        assert list((self.data_dir / "tmp").iterdir()) == []

    def pid_file_path(self) -> Path:
        return self.data_dir / "macpacs.pid"

    def index_query(self, sql: str) -> list[tuple]:
        """Rows of ``sql`` (a test's own constant text) read straight from the server's index
        database, SQLite file or PostgreSQL, as an administrator would look."""
        from sqlalchemy import create_engine, text

        url = (
            self.index_url.replace("postgresql://", "postgresql+psycopg://", 1)
            or f"sqlite:///{self.data_dir / 'index.sqlite'}"
        )
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(sql))]
        finally:
            engine.dispose()


def findscu(server: ServerProcess, out_dir: Path, *keys: str, model: str = "-S", extra: tuple[str, ...] = ()) -> list:
    """Run DCMTK findscu and return its responses, read back with pydicom (``-X`` files)."""
    import pydicom

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = [model, *extra, "-X", "-od", str(out_dir), *server.dicom_args()]
    for key in keys:
        args += ["-k", key]
    run_tool("findscu", *args)
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


# A sample study: patient name, patient ID, study date, modality, accession, description, slices.
Study = tuple[str, str, str, str, str, str, int]


def store_studies(server: ServerProcess, folder: Path, studies: Sequence[Study]) -> dict[str, str]:
    """Store the query tests' sample studies with DCMTK storescu, one series each, plus an MR
    series ("MR T1") in PID003's study so that it has two modalities; study UIDs by patient ID."""
    from pydicom.uid import generate_uid

    from tests.synthetic import write_series

    uids: dict[str, str] = {}
    for name, pid, date, modality, accession, description, slices in studies:
        uids[pid] = str(generate_uid())
        write_series(
            folder / pid,
            slices,
            study_uid=uids[pid],
            patient_name=name,
            patient_id=pid,
            study_date=date,
            modality=modality,
            accession=accession,
            study_description=description,
            size=32,
        )
    anna = next(study for study in studies if study[1] == "PID003")
    write_series(
        folder / "PID003b",
        2,
        study_uid=uids["PID003"],
        patient_name=anna[0],
        patient_id="PID003",
        study_date=anna[2],
        modality="MR",
        accession=anna[4],
        study_description=anna[5],
        series_description="MR T1",
        size=32,
    )
    run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(folder))
    return uids


# The index databases a test parametrized with ``index_backend`` runs on.
BACKENDS = ("sqlite", "postgresql")
# A test (or, as ``pytestmark``, a module) that runs once on each: its ``archive`` and
# ``make_server``/``server`` fixtures use that database.
both_indexes = pytest.mark.parametrize("index_backend", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throw-away PostgreSQL server for the session (tests/postgres.py); skipped only off CI
    when Debian's server is not installed (.ci/run installs it)."""
    from tests.postgres import Cluster, missing_binaries

    reason = missing_binaries()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = Cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One SeaweedFS S3 gateway for the session (tests/s3gateway.py): the storage and the
    scale-out tests each take a bucket prefix of their own in it."""
    from tests.s3gateway import Gateway

    started = Gateway(tmp_path_factory.mktemp("weed")).start()
    yield started
    started.stop()


def index_url_for(request: pytest.FixtureRequest, backend: str) -> str:
    """The index URL of a test on ``backend``: empty for SQLite in the data folder, or a fresh
    PostgreSQL database of the session's cluster."""
    if backend == "sqlite":
        return ""
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def index_backend(request: pytest.FixtureRequest) -> str:
    """``"sqlite"``, unless a module runs its tests on both:
    ``pytestmark = pytest.mark.parametrize("index_backend", BACKENDS, indirect=True)``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def make_server(tmp_path: Path, request: pytest.FixtureRequest, index_backend: str) -> Iterator[object]:
    """A factory: ``make_server(**overrides)`` starts a server (on the ``index_backend``
    database); all are stopped at the end."""
    started: list[ServerProcess] = []

    def factory(**kwargs: object) -> ServerProcess:
        kwargs.setdefault("data_dir", tmp_path / f"data{len(started)}")
        if "index_url" not in kwargs:
            kwargs["index_url"] = index_url_for(request, index_backend)
        server = ServerProcess(
            dicom_port=free_port(),
            web_port=free_port(),
            xmlrpc_port=free_port(),
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: object) -> ServerProcess:
    return make_server()  # type: ignore[operator]


@pytest.fixture
def archive(tmp_path: Path, request: pytest.FixtureRequest, index_backend: str) -> Iterator[Archive]:
    """An in-process Archive over a fresh data folder (and the ``index_backend`` database): the
    core without any listener.

    For tests of matching, ingest and plugin rules that need no network: what a protocol does
    goes through the same ``archive.ingestor``, ``archive.index`` and ``archive.blobs``.
    """
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load

    overrides = {
        "storage": {"data_dir": str(tmp_path / "data")},
        "index": {"url": index_url_for(request, index_backend)},
    }
    opened = open_archive(load(overrides=overrides, environ={}))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def other_archive(archive: Archive, tmp_path: Path) -> Iterator[Archive]:
    """A second Archive on ``archive``'s index database, with its own data folder, process state
    and caches: another node, or another process of the same host."""
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load

    overrides = {"storage": {"data_dir": str(tmp_path / "other")}, "index": {"url": archive.index.url}}
    opened = open_archive(load(overrides=overrides, environ={}))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="session")
def pydicom_test_files() -> list[Path]:
    """pydicom's ~80 real DICOM files (JPEG, JPEG 2000, RLE, big endian, SR, RT, broken ones)."""
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    return sorted(p for p in folder.iterdir() if p.is_file())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill any process a test left running in this session's temporary folders.

    Fixtures stop what they start, but a test killed by its timeout skips teardown; a stray
    `macpacs serve` or Orthanc would keep its ports and slow every later run.
    """
    import psutil

    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != me and base in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()
