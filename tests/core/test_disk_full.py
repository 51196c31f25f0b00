"""A full disk, for real: a small tmpfs as the data folder of a real ``macpacs serve`` (issue 15, finding 3).

Every refusal is a DICOM failure status (0xA700, seen in storescu's output, the association
never aborted) or HTTP 507, on both C-STORE paths (the first C-STORE of an association goes
through pynetdicom, the next ones through store_scp's direct path); no partial file remains in
``tmp/`` or ``files/``; the server keeps answering C-ECHO and /health, takes images again as soon
as space is freed, and restarts on a full disk (staging cleaned first, the PID file written once
there is room). The tests mount the tmpfs themselves (root) and skip, saying why, where they may not.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import make_instance, write_series

TMPFS_MB = 32
FLOOR_MB = "12"  # storage.min_free_mb in the floor test
SLICE = 512  # 512 x 512 x 2 bytes: 525 KB instances
A700 = re.compile(r"0xa700|Refused: OutOfResources", re.IGNORECASE)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(mount: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on the mount (tmpfs counts pages)."""
    filler = mount / "filler"
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
