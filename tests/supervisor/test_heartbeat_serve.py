"""The real ``macpacs serve`` under ``macpacs supervise`` with the installed arguments (installer/service.py).

Kill mode under the launchd stand-in, as installed: heavy ingest is not a reason to restart (the
server is busy, not hung), and a frozen server (SIGSTOP) is restarted within 10 s, which leaves
its start-up 5 s of the 15 s target; the new server then answers a C-ECHO.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from macpacs.installer.service import SUPERVISOR_ARGS
from tests.synthetic import write_series

from .conftest import Supervisor, alive_answer, pid_alive, wait_until
from .test_e2e_serve import ENV, Serve

TARGET_S = 15.0


def installed_args(serve: Serve) -> list[str]:
    """The supervisor's arguments as the installer writes them (probes on this test's ports)."""
    return [
        *serve.probes,
        "--heartbeat-url",
        f"http://127.0.0.1:{serve.web}/heartbeat",
        "--pid-file",
        str(serve.data_dir / "macpacs.pid"),
        *SUPERVISOR_ARGS,
    ]


def echo(serve: Serve) -> bool:
    """A DCMTK C-ECHO with 1 s time-outs (a frozen server's backlog still takes the connection)."""
    args = ["-to", "1", "-ta", "1", "-td", "1", "-aec", "MACPACS", "127.0.0.1", str(serve.dicom)]
    return subprocess.run(["/usr/bin/echoscu", *args], capture_output=True).returncode == 0


def ingest_load(serve: Serve, folders: list[Path], seconds: float) -> int:
    """4 parallel DCMTK storescu sending their folder again and again for ``seconds``; returns the runs."""
    deadline = time.monotonic() + seconds
    runs = 0
    env = {**os.environ, "TCP_NODELAY": "1"}
    while time.monotonic() < deadline:
        procs = [
            subprocess.Popen(
                ["/usr/bin/storescu", "-aec", "MACPACS", "127.0.0.1", str(serve.dicom), "+sd", str(folder)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            for folder in folders
        ]
        for proc in procs:
            assert proc.wait(120) == 0
        runs += 1
    return runs


def test_installed_supervisor_leaves_a_busy_serve_alone_and_restarts_a_frozen_one(
    tmp_path: Path, launchd, supervise
) -> None:
    serve = Serve(tmp_path)
    folders = [tmp_path / f"series{n}" for n in range(4)]
    for folder in folders:
        write_series(folder, 40, size=256, patient_id=f"BUSY{folder.name[-1]}")
    job = launchd(serve.argv, env=ENV)
    wait_until(lambda: alive_answer(serve.web, 1.0), 90, step=0.2)
    sup: Supervisor = supervise(*installed_args(serve), env=ENV)
    sup.wait_state("healthy", 60)

    runs = ingest_load(serve, folders, 10)
    assert runs >= 1
    assert job.pids == [job.pid] and "-> restarting" not in sup.log, sup.log[-3000:]
    assert sup.status()["state"] in ("healthy", "busy"), sup.status()

    old = job.pid
    frozen_at = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        wait_until(lambda: not pid_alive(old) and job.pid != old, 30, step=0.05)
    except AssertionError:
        os.kill(old, signal.SIGKILL)
        raise AssertionError(f"the supervisor did not stop the frozen PID {old}:\n{sup.log[-3000:]}") from None
    restarted = time.monotonic() - frozen_at
    wait_until(lambda: serve.pid() not in (None, old) and echo(serve), 60, step=0.05)
    echoed = time.monotonic() - frozen_at
    assert alive_answer(serve.web, 5.0)
    print(f"\ninstalled arguments, SIGSTOP -> restarted {restarted:.1f} s, -> C-ECHO answered {echoed:.1f} s")
    # What the supervisor owns: hung after 5 s (+ one 1.5 s heartbeat), SIGKILL 3 s after SIGTERM at
    # the latest. The new server's start-up comes on top: 3-5 s on this 2-core machine, so the whole
    # is within 15 s (bench/soak.py measures it, docs/reliability.md); on a machine loaded by other
    # suites the start-up alone was seen at 20 s, so it is not asserted here.
    assert restarted < TARGET_S - 5, (restarted, sup.log[-3000:])
    assert "hung: no good heartbeat" in sup.log
    assert len(job.pids) == 2


@pytest.mark.slow
def test_a_frozen_dicom_worker_makes_the_heartbeat_fail(tmp_path: Path, launchd, supervise) -> None:
    """One DICOM worker frozen: its beats stop, the server's heartbeat names it, the server is restarted."""
    import psutil

    serve = Serve(tmp_path)
    job = launchd([*serve.argv], env={**ENV, "MACPACS_DICOM_WORKERS": "2"})
    wait_until(lambda: alive_answer(serve.web, 1.0), 90, step=0.2)
    sup: Supervisor = supervise(*installed_args(serve), env=ENV)
    sup.wait_state("healthy", 60)
    old = job.pid
    workers = [p for p in psutil.Process(old).children() if "spawn_main" in " ".join(p.cmdline())]
    assert workers, "expected DICOM worker processes"
    workers[0].suspend()
    try:
        wait_until(lambda: not pid_alive(old), 30, step=0.1)
    finally:
        if workers[0].is_running():
            workers[0].kill()
    assert "dicom worker PID" in sup.log, sup.log[-3000:]
