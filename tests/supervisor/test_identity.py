"""Who is the server, proven (issue 15, finding 5), with real ``macpacs serve`` processes.

The server locks its PID file for its whole life and writes its PID, start time and data folder
into it; "already running" is that lock, not a command line. The supervisor stops only a
process whose PID, start time, command line and data folder match a locked PID file of its own
installation. Before, a supervisor without a PID file stopped whatever process matched
``macpacs serve``, which once was another installation's server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from macpacs.pacs_server.pidfile import PidFile, parse
from macpacs.supervisor.process import CLOCK_SLACK, prove_server
from tests.conftest import MACPACS, ServerProcess

from .conftest import Supervisor, alive_answer, free_port, pid_alive, wait_until

SERVE = re.compile(r"macpacs serve\b")  # the supervisor's default --process-match
FAST = ["--interval", "0.3", "--timeout", "0.3", "--failures", "2", "--startup-grace", "0", "--kill-grace", "1"]


def _serve_again(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    """A second ``macpacs serve`` on ``server``'s data folder, on ports of its own."""
    argv = [MACPACS, "serve", "--data-dir", str(server.data_dir)]
    for option in ("--dicom-port", "--web-port", "--xmlrpc-port"):
        argv += [option, str(free_port())]
    loopback = {f"MACPACS_{part}_BIND": "127.0.0.1" for part in ("DICOM", "WEB", "XMLRPC")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, **loopback})


def test_the_supervisor_reads_what_the_server_writes(tmp_path: Path):
    """The format is written by the server's module and read by the supervisor's, which share no code."""
    data = tmp_path / "data"
    pid_file = PidFile(data / "macpacs.pid", data)
    pid_file.acquire()
    try:
        identity = prove_server(data / "macpacs.pid", None, re.compile("."))
        assert identity.proven and identity.process is not None and identity.process.pid == os.getpid(), identity
        elsewhere = prove_server(data / "macpacs.pid", tmp_path / "elsewhere", re.compile("."))
        assert not elsewhere.proven and "belongs to another installation" in elsewhere.detail
    finally:
        pid_file.release()
    gone = prove_server(data / "macpacs.pid", None, re.compile("."))
    assert not gone.proven and gone.detail.startswith("no PID file at")


def test_a_second_server_on_the_same_data_folder_refuses_to_start(server: ServerProcess):
    assert server.proc is not None
    identity = prove_server(server.pid_file_path(), None, SERVE)
    assert identity.proven and identity.process is not None and identity.process.pid == server.proc.pid, identity

    second = _serve_again(server)
    assert second.returncode != 0
    assert f"another macpacs server is running on the data folder {server.data_dir.resolve()}" in second.stderr
    assert f"PID {server.proc.pid}, started" in second.stderr, second.stderr
    # The first one is untouched: still the PID file's, still serving.
    assert parse(server.pid_file_path().read_text())["pid"] == str(server.proc.pid)
    assert alive_answer(server.web_port, timeout=30)


def test_a_stale_pid_file_naming_a_live_lookalike_is_taken_over(make_server: Callable[..., ServerProcess], tmp_path):
    """A crash left the file; its PID now belongs to a process whose command line even says
    ``macpacs serve`` on this data folder, and whose start time the file records. Nothing holds
    the lock, so the new server starts, and the lookalike lives on."""
    data = tmp_path / "data"
    data.mkdir()
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "macpacs", "serve", "--data-dir", str(data)]
    )
    try:
        created = psutil.Process(lookalike.pid).create_time()
        (data / "macpacs.pid").write_text(
            f"{lookalike.pid}\nformat=macpacs-pid-1\ncreate_time={created!r}\ndata_dir={data.resolve()}\n"
        )
        server = make_server(data_dir=data)
        assert server.proc is not None
        fields = parse((data / "macpacs.pid").read_text())
        assert fields["pid"] == str(server.proc.pid)
        assert abs(float(fields["create_time"]) - psutil.Process(server.proc.pid).create_time()) <= CLOCK_SLACK
        assert fields["data_dir"] == str(data.resolve())
        assert server.logged(f"taking over the PID file {data / 'macpacs.pid'}: PID {lookalike.pid}")
        assert lookalike.poll() is None
    finally:
        lookalike.kill()
        lookalike.wait()


def _refused_twice(sup: Supervisor, seen: int) -> int:
    """Wait for two more refusals to act than ``seen``; returns the new count."""
    wait_until(lambda: sup.log.count("supervisor.core: server is unhealthy") >= seen + 2, 20)
    return sup.log.count("supervisor.core: server is unhealthy")


def test_another_installations_server_is_never_stopped(make_server, supervise, tmp_path: Path):
    """Our installation is down (stopped cleanly: no PID file), so every probe fails; another
    installation's real server runs on the same host with a matching command line."""
    other = make_server(data_dir=tmp_path / "other")
    ours = tmp_path / "ours"
    ours.mkdir()
    pid_file = ours / "macpacs.pid"
    sup = supervise("--web-url", f"http://127.0.0.1:{free_port()}/testdbalive", *FAST, "--pid-file", str(pid_file))
    refusals = _refused_twice(sup, 0)
    assert pid_alive(other.proc.pid)
    status = sup.status()
    assert status["server_identity"] == f"cannot prove the server's identity: no PID file at {pid_file} " + (
        "(the server is not running, or stopped cleanly)"
    )

    # Then a stale PID file of ours names the other server's PID, with its true start time:
    # a recycled PID. Our file is not locked, so it proves nothing.
    created = psutil.Process(other.proc.pid).create_time()
    pid_file.write_text(f"{other.proc.pid}\nformat=macpacs-pid-1\ncreate_time={created!r}\ndata_dir={ours.resolve()}\n")
    _refused_twice(sup, refusals)
    assert f"the PID file {pid_file} is not locked, so the server that wrote it (PID {other.proc.pid})" in sup.log
    assert pid_alive(other.proc.pid) and alive_answer(other.web_port, timeout=30)
    assert "stopped the server" not in sup.log
