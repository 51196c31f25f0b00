"""A full disk, for real: a small tmpfs as the data folder of a real ``macpacs serve`` (issue 15, finding 3).

Every refusal is a DICOM failure status (0xA700, seen in storescu's output, the association
never aborted) or HTTP 507, on both C-STORE paths (the first C-STORE of an association goes
through pynetdicom, the next ones through store_scp's direct path); no partial file remains in
``tmp/`` or ``files/``; the server keeps answering C-ECHO and /health, takes images again as soon
as space is freed, and restarts on a full disk (staging cleaned first, the PID file written once
there is room), even with not a byte free (its space reserve released so that the index can open;
without one it stops with a clear message and moves nothing aside). The health probes write
nothing lasting, take a full volume for no reason to restart, and fail on a store that cannot be
written. The tests mount the tmpfs themselves (root) and skip, saying why, where they may not.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from macpacs.pacs_server.space_reserve import NAME as RESERVE_NAME
from macpacs.pacs_server.space_reserve import RESERVE_BYTES
from tests.conftest import ServerProcess, findscu, free_port, run_tool
from tests.synthetic import make_instance, write_series

TMPFS_MB = 40  # room for the 8 MB space reserve, and above the floor for less than the 40 slices
FLOOR_MB = "12"  # storage.min_free_mb in the floor test
SLICE = 512  # 512 x 512 x 2 bytes: 525 KB instances
A700 = re.compile(r"0xa700|Refused: OutOfResources", re.IGNORECASE)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mount: Path, leave: int, name: str = "filler") -> Path:
    """A filler file that leaves about ``leave`` bytes free on the mount (tmpfs counts pages)."""
    filler = mount / name
    filler.unlink(missing_ok=True)
    size = max(0, free_bytes(mount) - leave)
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)
    return filler


def staged(server: ServerProcess) -> list[str]:
    """What is in the staging folder: nothing, whenever no transfer runs."""
    return sorted(p.name for p in (server.data_dir / "tmp").iterdir())


def stored_files(server: ServerProcess) -> list[Path]:
    return sorted((server.data_dir / "files").glob("??/??/*"))


def storescu(server: ServerProcess, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Send every file of ``folder`` on one association (the first via pynetdicom, the rest direct)."""
    return run_tool("storescu", "-v", "-nh", *extra, *server.dicom_args(), "+sd", "+r", str(folder), check=False)


def stow(server: ServerProcess, path: Path) -> requests.Response:
    boundary = "fullDiskBoundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return requests.post(
        f"http://127.0.0.1:{server.web_port}/dicom-web/studies", data=body, headers=headers, timeout=60
    )


def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {predicate}"
        time.sleep(0.05)


def alive(server: ServerProcess) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{server.web_port}/testdbalive", timeout=10)


def health(server: ServerProcess) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10)


def study_keys(folder: Path) -> tuple[str, str]:
    """C-FIND keys for every instance of the study in ``folder``."""
    study = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID
    return "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}"


def dead_pid() -> int:
    """A PID no process has now (for a staged file left by a crashed process)."""
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("tmpfs") / "data"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk tests need root and mount(8)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def server(mount: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")  # off the tmpfs: the test reads them
    server = ServerProcess(
        data_dir=mount,
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        env={"MACPACS_STORAGE_MIN_FREE_MB": "0", "MACPACS_SERVER_LOG_DIR": str(logs)},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 525 KB slices and two 2 MB ones, of one new study."""
    folder = tmp_path_factory.mktemp("images")
    write_series(folder / "small", 6, size=SLICE)
    write_series(folder / "large", 2, size=1024)
    return folder


def test_full_disk_every_store_gets_a700_and_nothing_partial_remains(
    server: ServerProcess, mount: Path, images: Path
) -> None:
    before = stored_files(server)
    filler = fill(mount, 128 * 1024)  # less than any instance: each fails while it streams in
    try:
        sent = storescu(server, images)
        refusals = A700.findall(sent.stdout + sent.stderr)
        assert len(refusals) >= 8, f"every one of the 8 stores answered 0xA700:\n{sent.stdout}\n{sent.stderr}"
        assert "Abort" not in sent.stdout + sent.stderr, "the association was never aborted"
        assert "Releasing Association" in sent.stdout + sent.stderr
        assert staged(server) == [] and stored_files(server) == before, "no partial file, anywhere"
        assert server.logged("The data volume is full")

        # The server keeps answering while the disk is full.
        run_tool("echoscu", *server.dicom_args())
        health = requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10)
        assert health.status_code in (200, 503) and health.json()
        assert staged(server) == [], "the health probe leaves nothing behind"

        # STOW-RS: 507 with a message, nothing kept.
        answer = stow(server, next((images / "large").iterdir()))
        assert answer.status_code == 507, answer.text
        assert "stored" in answer.text and "space" in answer.text
        assert staged(server) == [] and stored_files(server) == before
    finally:
        filler.unlink()

    # Space again: the same server takes everything, no restart.
    sent = storescu(server, images)
    assert not A700.search(sent.stdout + sent.stderr), sent.stdout + sent.stderr
    assert len(stored_files(server)) == len(before) + 8
    assert staged(server) == []


def test_restart_on_a_full_disk_cleans_staging_first_and_writes_the_pid_file_once_it_can(
    server: ServerProcess, mount: Path
) -> None:
    """Not a byte free, and a transfer cut by a crash in ``tmp/``: the start waits with the PID
    file's text, removes the leftover before writing anything else, then writes it. (It restarts
    with the free-space floor the next test uses.)"""
    server.stop()
    server.env["MACPACS_STORAGE_MIN_FREE_MB"] = FLOOR_MB
    leftover = mount / "tmp" / f"in-{dead_pid()}-crashed.part"
    leftover.write_bytes(b"\0" * (2 * 1024 * 1024))
    filler = fill(mount, 0)
    mark = len(server.log())
    try:
        server.start()
        run_tool("echoscu", *server.dicom_args())
    finally:
        filler.unlink()
    assert not leftover.exists()
    started = server.log()[mark:]
    steps = ("cannot write the PID file", "removed 1 temporary files", "written: there is space again")
    order = [started.find(step) for step in steps]
    assert -1 not in order and order == sorted(order), started
    assert server.pid_file_path().read_text().startswith(f"{server.proc.pid}\n")


def test_start_with_not_a_byte_free_answers_queries_and_takes_stores_once_space_is_freed(
    server: ServerProcess, mount: Path, tmp_path: Path
) -> None:
    """0 bytes free and nothing of ours in ``tmp/``: without its space reserve the start stops with
    a clear message and leaves the (healthy) index alone; with it, the reserve is released, the
    index opens, C-ECHO and C-FIND are answered, C-STOREs refused with 0xA700 (the floor keeps them
    off the released space), and the same process takes them once space is freed."""
    if server.env["MACPACS_STORAGE_MIN_FREE_MB"] != FLOOR_MB:  # run on its own
        server.stop()
        server.env["MACPACS_STORAGE_MIN_FREE_MB"] = FLOOR_MB
        server.start()
    reserve = mount / RESERVE_NAME
    wait_until(lambda: reserve.is_file() and reserve.stat().st_size == RESERVE_BYTES)  # set aside by the server
    kept, new = tmp_path / "kept", tmp_path / "new"
    write_series(kept, 1, size=SLICE)
    write_series(new, 3, size=SLICE)
    assert not A700.search(storescu(server, kept).stdout)
    server.stop()
    index = mount / "index.sqlite"
    healthy = index.read_bytes()
    hidden = mount / "reserve-hidden"
    reserve.rename(hidden)  # on the same volume: its space stays taken
    filler = fill(mount, 0)
    try:
        assert free_bytes(mount) == 0
        mark = len(server.log())
        with pytest.raises(AssertionError, match="did not start"):
            server.start()
        said = server.log()[mark:]
        assert "cannot open the index" in said and "It is not corrupt" in said, said
        assert "Traceback" not in said and "moving it aside" not in said, said
        assert not list(mount.glob("index.sqlite.corrupt-*")) and index.read_bytes() == healthy

        hidden.rename(reserve)
        mark = len(server.log())
        server.start()
        pid = server.proc.pid
        assert "released the 8 MB" in server.log()[mark:]
        run_tool("echoscu", *server.dicom_args())
        assert len(findscu(server, tmp_path / "find", *study_keys(kept), "SOPInstanceUID")) == 1
        sent = storescu(server, new)
        output = sent.stdout + sent.stderr
        assert len(A700.findall(output)) >= 3 and "Abort" not in output, output
        assert staged(server) == []

        # Not a byte free while it runs: alive for the watchdog (a restart would free nothing), and
        # /health says why stores are refused; the probes leave nothing behind.
        rest = fill(mount, 0, "filler2")
        try:
            answer = alive(server)
            assert answer.status_code == 200 and answer.text == "Test DB Alive succeeded", answer.text
            assert "full" in answer.headers["warning"]
            doc = health(server)
            assert doc.status_code == 503 and "full" in doc.json()["storage"], doc.text
            run_tool("echoscu", *server.dicom_args())
            assert staged(server) == []
        finally:
            rest.unlink()
    finally:
        filler.unlink()
        if hidden.exists():
            hidden.rename(reserve)
    sent = storescu(server, new)
    assert not A700.search(sent.stdout + sent.stderr), sent.stdout + sent.stderr
    assert server.proc.pid == pid and server.proc.poll() is None, "the same process, no restart"
    assert len(findscu(server, tmp_path / "find", *study_keys(new), "SOPInstanceUID")) == 3
    wait_until(lambda: reserve.is_file() and reserve.stat().st_size == RESERVE_BYTES)  # set aside again


def test_health_probes_write_nothing_lasting_and_fail_on_a_store_that_cannot_be_written(
    server: ServerProcess, mount: Path
) -> None:
    """``/testdbalive``, ``/health`` and ``/heartbeat``, asked again and again, change no file of
    the data folder; with the staging folder read-only (a read-only tmpfs mounted over it), the
    storage check fails, and passes again once it is writable."""

    def files() -> dict[str, int]:
        return {str(p.relative_to(mount)): p.stat().st_size for p in mount.rglob("*") if p.is_file()}

    reserve = mount / RESERVE_NAME
    wait_until(lambda: reserve.is_file() and reserve.stat().st_size == RESERVE_BYTES)  # the server's own write
    before = files()
    for _ in range(30):
        assert alive(server).status_code == 200
        assert health(server).status_code == 200
        assert requests.get(f"http://127.0.0.1:{server.web_port}/heartbeat", timeout=10).json()["ok"]
    assert files() == before

    staging = mount / "tmp"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(staging)], capture_output=True)
    assert done.returncode == 0, done.stderr
    try:
        answer = alive(server)
        assert answer.status_code == 500 and "storage" in answer.text and "Read-only" in answer.text, answer.text
        assert "Read-only" in health(server).json()["storage"]
    finally:
        subprocess.run(["umount", str(staging)], check=True)
    assert alive(server).status_code == 200


def test_free_space_floor_refuses_before_the_disk_fills(server: ServerProcess, mount: Path, tmp_path: Path) -> None:
    """With ``storage.min_free_mb``, stores stop at the floor (while streaming, and before the
    rename): 0xA700 naming the setting, and the disk never fills up."""
    if server.env["MACPACS_STORAGE_MIN_FREE_MB"] != FLOOR_MB:  # run on its own
        server.stop()
        server.env["MACPACS_STORAGE_MIN_FREE_MB"] = FLOOR_MB
        server.start()
    folder = tmp_path / "many"
    folder.mkdir()
    study, series = str(generate_uid()), str(generate_uid())
    for number in range(1, 41):  # 21 MB: more than the room above the floor
        instance = make_instance(study_uid=study, series_uid=series, number=number, size=SLICE)
        instance.save_as(folder / f"{number:03}.dcm", enforce_file_format=True)
    sent = storescu(server, folder)
    output = sent.stdout + sent.stderr
    assert A700.search(output) and "Abort" not in output, output
    assert server.logged("storage.min_free_mb")
    assert free_bytes(mount) > 8 * 1024 * 1024, "the floor kept the disk from filling"
    assert staged(server) == []
    answer = stow(server, folder / "040.dcm")  # refused over DICOM: not stored
    assert answer.status_code == 507 and "min_free_mb" in answer.headers["warning"], answer.text
    assert staged(server) == []

    # Room for the start of an upload, not for all of it: refused while its parts stream in.
    for path in stored_files(server):
        if free_bytes(mount) > 20 * 1024 * 1024:
            break
        path.unlink()
    big = tmp_path / "big.part"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    answer = stow(server, big)
    assert answer.status_code == 507 and "min_free_mb" in answer.text, answer.text
    assert staged(server) == []
