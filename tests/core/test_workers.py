"""DICOM associations served by worker processes (``dicom.workers``, pacs_server/dimse/workers.py).

A real ``macpacs serve`` with 2 workers; pynetdicom associations held open from the test and
DCMTK tools as clients; which worker serves a connection is read from the operating system
(psutil: the worker process holding the accepted socket).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import ServerProcess, free_port, run_tool
from tests.qr.conftest import macpacs
from tests.synthetic import write_series

WORKERS = {"MACPACS_DICOM_WORKERS": "2"}


def _workers(server: ServerProcess) -> list[psutil.Process]:
    assert server.proc is not None
    return [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]


def _serving_pid(server: ServerProcess, client_port: int) -> int | None:
    """The worker process whose socket is the server side of the client's connection."""
    for proc in _workers(server):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == client_port and conn.laddr.port == server.dicom_port:
                    return proc.pid
    return None


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@contextlib.contextmanager
def _associations(server: ServerProcess, count: int, ae_title: str = "HOLDER") -> Iterator[list]:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title) for _ in range(count)]
    try:
        yield held
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), env=WORKERS).start()
    yield server
    server.stop()


def _all_ready(server: ServerProcess) -> bool:
    """Every worker is ready: DICOM accepts once the first is, the others join when they are."""
    workers = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()["dicom"]["workers"]
    return len(workers) == 2 and all(w["ready"] for w in workers)


def test_associations_are_served_by_more_than_one_worker(pool: ServerProcess, tmp_path: Path):
    assert _wait(lambda: len(_workers(pool)) == 2 and _all_ready(pool))
    with _associations(pool, 4) as held:
        assert all(a.is_established for a in held)
        ports = [a.dul.socket.socket.getsockname()[1] for a in held]
        assert _wait(lambda: all(_serving_pid(pool, p) for p in ports))
        pids = {_serving_pid(pool, p) for p in ports}
    assert len(pids) == 2, "4 held associations should be spread over both workers"
    # Stores from several DCMTK clients at once all land in the one index, and the log says so.
    write_series(tmp_path / "in", 12, size=16)
    run_tool("storescu", *pool.dicom_args(), "+sd", str(tmp_path / "in"))
    run_tool("storescu", *pool.dicom_args(), "+sd", str(tmp_path / "in"))
    assert _wait(lambda: pool.log().count("association released by STORESCU") == 2)
    assert "12 stored" in pool.log() and "12 duplicate" in pool.log()


def test_a_killed_worker_is_replaced(pool: ServerProcess):
    assert _wait(lambda: len(_workers(pool)) == 2 and _all_ready(pool))
    victim = _workers(pool)[0]
    victim.send_signal(signal.SIGKILL)
    assert _wait(lambda: "ended unexpectedly (killed by SIGKILL)" in pool.log())
    assert _wait(lambda: len(_workers(pool)) == 2 and victim.pid not in {p.pid for p in _workers(pool)})
    assert _wait(lambda: pool.log().count("ready (PID") == 3)  # 2 at start, then the replacement
    for _ in range(4):  # whichever worker each lands on, it answers
        assert run_tool("echoscu", *pool.dicom_args()).returncode == 0
    # /health lists the workers the main process runs now, with the connections each serves.
    with _associations(pool, 1):
        dicom = requests.get(f"http://127.0.0.1:{pool.web_port}/health", timeout=10).json()["dicom"]
    assert sorted(w["pid"] for w in dicom["workers"]) == sorted(p.pid for p in _workers(pool))
    assert all(w["ready"] for w in dicom["workers"])
    assert dicom["associations"] == 1 == sum(w["associations"] for w in dicom["workers"])


def test_workers_die_with_the_main_process(pool: ServerProcess, tmp_path: Path):
    assert _wait(lambda: len(_workers(pool)) == 2)
    workers = _workers(pool)
    with _associations(pool, 2):
        pool.stop(signal.SIGKILL)  # as the supervisor does with a hung server
        _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the killed main process: {[p.pid for p in alive]}"
    # Nothing holds the port: a new server on it starts at once.
    again = ServerProcess(pool.data_dir, pool.dicom_port, free_port(), free_port(), env=WORKERS).start()
    try:
        assert run_tool("echoscu", *again.dicom_args()).returncode == 0
        workers = _workers(again)
    finally:
        again.stop()
    assert workers and not psutil.wait_procs(workers, timeout=10)[1], "a clean stop ends the workers too"


def test_max_associations_holds_across_workers(tmp_path: Path):
    env = {**WORKERS, "MACPACS_DICOM_MAX_ASSOCIATIONS": "3"}
    server = ServerProcess(tmp_path / "data", free_port(), free_port(), free_port(), env=env).start()
    try:
        with _associations(server, 3) as held:
            assert all(a.is_established for a in held)
            with _associations(server, 1) as extra:
                assert extra[0].is_rejected
            assert _wait(lambda: "dicom.max_associations (3) associations are open" in server.log())
        # Released: there is room again.
        assert _wait(lambda: run_tool("echoscu", *server.dicom_args(), check=False).returncode == 0)
    finally:
        server.stop()


def test_node_registered_while_running_is_seen_by_every_worker(tmp_path: Path):
    data = tmp_path / "data"
    env = {**WORKERS, "MACPACS_DICOM_ACCEPT_UNKNOWN_NODES": "false"}
    server = ServerProcess(data, free_port(), free_port(), free_port(), env=env).start()
    try:
        with _associations(server, 2, "LATE") as tried:
            assert all(a.is_rejected for a in tried)
        macpacs("nodes", "add", "LATE", "--ae-title", "LATE", "--host", "127.0.0.1", "--port", "104", data_dir=data)
        with _associations(server, 4, "LATE") as held:  # 4 at once: both workers answer
            assert all(a.is_established for a in held)
    finally:
        server.stop()


def test_one_worker_serves_in_the_main_process(tmp_path: Path):
    server = ServerProcess(
        tmp_path / "data", free_port(), free_port(), free_port(), env={"MACPACS_DICOM_WORKERS": "1"}
    ).start()
    try:
        assert _workers(server) == []
        assert run_tool("echoscu", *server.dicom_args()).returncode == 0
        assert "AE title MACPACS" in server.log() and "worker processes" not in server.log()
    finally:
        server.stop()
