"""Issue 14, finding 9: the data folder is 0700, stored files and the index 0600, logs 0640, set by
the server and by every command that writes the archive, whatever the umask it is started with
(the tests' own, 0022 here), and an archive left more open is closed up at start with a log line.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

from macpacs.pacs_server.logs import LogFile
from tests.conftest import MACPACS, ServerProcess, free_port, run_tool
from tests.synthetic import write_series


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(data_dir: Path) -> dict[str, int]:
    """Every file and folder under ``data_dir``, relative, with its mode."""
    out = {".": mode(data_dir)}
    for path in data_dir.rglob("*"):
        out[path.relative_to(data_dir).as_posix()] = mode(path)
    return out


def expected(name: str, path: Path) -> int:
    if name.startswith(("logs/macpacs.log", "logs/audit.jsonl")):  # the logs and the audit trail
        return 0o640
    if name == "logs":
        return 0o750
    return 0o700 if path.is_dir() else 0o600


def test_a_served_archive_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A folder made under a umask of 0022, as before the fix.
    old = os.umask(0o022)
    try:
        data.mkdir()
    finally:
        os.umask(old)
    done = subprocess.run(
        [MACPACS, "users", "add", "admin", "--data-dir", str(data), "--password-stdin"],
        input="admin password\n", check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The command closed the folder up, said so, and created the index private.
    assert mode(data) == 0o700 and f"{data} was mode 0755, readable by other accounts: now 0700" in done.stderr
    assert mode(data / "index.sqlite") == 0o600
    # Then as an archive of an older version: the server closes it up at start.
    os.chmod(data, 0o755)
    os.chmod(data / "index.sqlite", 0o644)

    server = ServerProcess(data, free_port(), free_port(), free_port()).start()
    try:
        series = write_series(tmp_path / "in", 2, size=16)
        run_tool("storescu", *server.dicom_args(), *(str(p) for p in series))
        assert server.logged("association released")
        found = modes(data)
    finally:
        server.stop()
    assert server.logged(f"{data} was mode 0755, readable by other accounts: now 0700")
    assert server.logged(f"{data / 'index.sqlite'} was mode 0644, readable by other accounts: now 0600")
    assert {"index.sqlite", "index.sqlite-wal", "logs/macpacs.log", "web-secret"} <= set(found)
    assert sum(1 for name in found if name.endswith(".dcm")) == 2
    wrong = {name: oct(m) for name, m in found.items() if m != expected(name, data / name)}
    assert wrong == {}


def test_commands_create_private_archives(tmp_path: Path) -> None:
    data = tmp_path / "new"
    series = write_series(tmp_path / "in", 1, size=16)
    done = subprocess.run(
        [MACPACS, "import", "--data-dir", str(data), str(series[0])], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = modes(data)
    assert sum(1 for name in found if name.endswith(".dcm")) == 1
    assert {name: oct(m) for name, m in found.items() if m != expected(name, data / name)} == {}


def test_log_files_stay_0640_through_rotation(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        handler = LogFile(tmp_path / "macpacs.log")
        handler.maxBytes = 200
        for n in range(10):
            handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, "line %d " + "x" * 50, (n,), None))
        handler.close()
    finally:
        os.umask(old)
    files = sorted(tmp_path.glob("macpacs.log*"))
    assert len(files) > 1
    assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o640" for f in files}
