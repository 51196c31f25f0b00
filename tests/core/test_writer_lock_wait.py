"""The index writer lock waits a bounded time (issue 15, finding 7).

A process that holds the lock and stops (``kill -STOP`` of a ``macpacs import``, a debugger)
used to make every store of every process wait for ever. Now a writer gives up after SQLite's
busy timeout (10 s): a C-STORE is answered 0xA700 and STOW-RS fails that instance with 0xA700,
each naming the holder, and stores succeed again once the holder is gone.

The holder here is a real process that takes the lock through ``WriterLock`` and sleeps.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from macpacs.pacs_server.index.db import SQLITE_BUSY_TIMEOUT_MS
from macpacs.pacs_server.index.writer_lock import WriterLock, WriterLockTimeout
from tests.conftest import ServerProcess, dcmtk, run_tool
from tests.synthetic import make_instance, write_series

# Takes the lock on argv[1]'s database, says so by creating argv[2], then holds it until killed.
HOLD = """
import sys, time
from pathlib import Path
from macpacs.pacs_server.index.writer_lock import WriterLock
WriterLock(Path(sys.argv[1]), timeout=60).acquire()
Path(sys.argv[2]).touch()
time.sleep(3600)
"""

# Adds 1 to the number in argv[2], argv[3] times from each of two threads, under the lock on argv[1].
COUNT = """
import sys, threading
from pathlib import Path
from macpacs.pacs_server.index.writer_lock import WriterLock
lock, counter = WriterLock(Path(sys.argv[1]), timeout=60), Path(sys.argv[2])
def work():
    for _ in range(int(sys.argv[3])):
        with lock:
            counter.write_text(str(int(counter.read_text()) + 1))
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
"""


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {predicate}"
        time.sleep(0.05)


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[object]:
    """``hold(database)`` starts a process holding the writer lock; all are killed at the end."""
    holders: list[subprocess.Popen[bytes]] = []

    def start(database: Path) -> subprocess.Popen[bytes]:
        flag = tmp_path / f"locked-{len(holders)}"
        holders.append(subprocess.Popen([sys.executable, "-c", HOLD, str(database), str(flag)]))
        wait_until(lambda: flag.exists() or holders[-1].poll() is not None, 30)
        assert holders[-1].poll() is None, "the lock holder died"
        return holders[-1]

    yield start
    for proc in holders:
        proc.kill()
        proc.wait()


def test_wait_gives_up_naming_the_holder_and_succeeds_once_it_is_gone(tmp_path: Path, hold):
    database = tmp_path / "index.sqlite"
    holder = hold(database)
    lock = WriterLock(database, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(WriterLockTimeout) as raised, lock:
        pass
    assert time.monotonic() - started >= 0.5
    assert f"held by PID {holder.pid} (" in str(raised.value)
    assert "gave up after 0.5 s" in str(raised.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock.acquire(timeout=30)
    lock.release()


def test_an_abandoned_wait_does_not_keep_the_lock(tmp_path: Path, hold):
    """The flock still in flight after a waiter gave up is let go when it comes through, so
    another process can take the lock while nobody here wants it."""
    database = tmp_path / "index.sqlite"
    first = hold(database)
    lock = WriterLock(database, timeout=0.2)
    with pytest.raises(WriterLockTimeout):
        lock.acquire()
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = hold(database)  # fails unless our helper thread released the lock it then got
    with pytest.raises(WriterLockTimeout) as raised:
        lock.acquire()
    assert f"PID {second.pid}" in str(raised.value)


@pytest.mark.parametrize("on_disk", [True, False], ids=["file", "in-memory"])
def test_a_thread_waiting_for_another_thread_gives_up_too(tmp_path: Path, on_disk: bool):
    lock = WriterLock(tmp_path / "index.sqlite" if on_disk else None, timeout=0.2)
    failures: list[str] = []

    def other() -> None:
        try:
            lock.acquire()
        except WriterLockTimeout as exc:
            failures.append(str(exc))

    with lock:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(30)
    assert len(failures) == 1 and "another thread of this process" in failures[0], failures


def test_processes_and_threads_take_turns(tmp_path: Path):
    """Mutual exclusion through the helper thread's hand-overs: no increment is lost."""
    database, counter = tmp_path / "index.sqlite", tmp_path / "counter"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(database), str(counter), "150"]) for _ in range(2)]
    assert [proc.wait(120) for proc in procs] == [0, 0]
    assert counter.read_text() == "600"


def _instance() -> pydicom.Dataset:
    return make_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size=32)


def _stow(server: ServerProcess, ds: pydicom.Dataset) -> requests.Response:
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    boundary = "macpacs-test-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return requests.post(
        f"http://127.0.0.1:{server.web_port}/dicom-web/studies", data=body, headers=headers, timeout=120
    )


def test_stores_answer_out_of_resources_while_another_process_holds_the_lock(server: ServerProcess, tmp_path, hold):
    stored_before, new = write_series(tmp_path / "ct", 2, size=32)
    run_tool("storescu", *server.dicom_args(), str(stored_before))
    holder = hold(server.data_dir / "index.sqlite")

    # At once: a re-send of an instance already stored, a new instance, and a STOW-RS.
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            [dcmtk("storescu"), "-v", *server.dicom_args(), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in (stored_before, new)
    ]
    stow = _stow(server, _instance())
    outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    elapsed = time.monotonic() - started

    # Bounded by the busy timeout (10 s), not by the holder; the upper limit allows a loaded machine.
    assert SQLITE_BUSY_TIMEOUT_MS / 1000 <= elapsed < 60, elapsed
    # The re-send is acknowledged: its row is there, nothing needs writing (ingest reads it).
    assert "Received Store Response (Success)" in outputs[0], outputs[0]
    assert "Received Store Response (Refused: OutOfResources)" in outputs[1], outputs[1]
    assert stow.status_code == 409, stow.text
    assert stow.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert f"PID {holder.pid}" in stow.headers["warning"]
    assert server.logged(f"is held by PID {holder.pid} (")

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    proc = run_tool("storescu", "-v", *server.dicom_args(), str(new))
    assert "Received Store Response (Success)" in proc.stdout + proc.stderr
    assert _stow(server, _instance()).status_code == 200
