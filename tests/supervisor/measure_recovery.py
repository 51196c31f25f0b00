"""Measure fault → recovery times in kill mode, with the launchd stand-in restarting the server.

``python tests/supervisor/measure_recovery.py [N]``: a test peer, probes only, the target settings
(``--interval 2 --timeout 2 --failures 2``), SIGSTOP and a hang.
``python tests/supervisor/measure_recovery.py [N] --installed``: the real ``macpacs serve``, the
supervisor with the installed arguments (installer/service.py, with the heartbeat), SIGSTOP.
Prints one line per fault kind: every sample, then min / median / max. Used for docs/supervisor.md.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent.parent))
from conftest import MACPACS, Launchd, Peer, Supervisor, alive_answer, wait_until

from macpacs.installer.service import SUPERVISOR_ARGS

FAULTS = {"SIGSTOP (frozen)": signal.SIGSTOP, "hang (accepts, never answers)": signal.SIGUSR1}


def recovery(sup: Supervisor, job: Launchd, peer: Peer, sig: int) -> float:
    """Seconds from the fault until a new process answers /testdbalive."""
    sup.wait_state("healthy", 30)
    time.sleep(random.uniform(0, 2))  # a fault strikes at any point of the 2 s probe cycle
    old = job.pid
    started = time.monotonic()
    os.kill(old, sig)
    wait_until(lambda: job.pid != old and peer.answers(), 30, step=0.02)
    return time.monotonic() - started


def installed(cycles: int) -> None:
    """The real server, the installed supervisor arguments, SIGSTOP at a random point of the heartbeat cycle."""
    from tests.supervisor.test_e2e_serve import ENV, Serve

    with tempfile.TemporaryDirectory() as tmp:
        serve = Serve(Path(tmp))
        job = Launchd(serve.argv, throttle=0.0, env=ENV).start()
        wait_until(lambda: alive_answer(serve.web, 1.0), 90, step=0.2)
        log, status = Path(tmp) / "supervisor.log", Path(tmp) / "status.json"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    MACPACS, "supervise", *serve.probes,
                    "--heartbeat-url", f"http://127.0.0.1:{serve.web}/heartbeat",
                    "--pid-file", str(serve.data_dir / "macpacs.pid"), "--status-file", str(status),
                    *SUPERVISOR_ARGS, "--max-restarts", str(cycles + 1),
                ],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
            )  # fmt: skip
        sup = Supervisor(proc, log, status)
        samples = []
        try:
            for _ in range(cycles):
                sup.wait_state("healthy", 60)
                time.sleep(random.uniform(0, 1))
                old = job.pid
                started = time.monotonic()
                os.kill(old, signal.SIGSTOP)
                wait_until(lambda old=old: job.pid != old and alive_answer(serve.web, 0.5), 60, step=0.02)
                samples.append(time.monotonic() - started)
                time.sleep(10)  # launchd's ThrottleInterval counts from the last start
        finally:
            sup.terminate()
            job.stop()
        print(
            f"installed, real serve, SIGSTOP: {' '.join(f'{s:.1f}' for s in samples)} | min {min(samples):.1f} s, "
            f"median {statistics.median(samples):.1f} s, max {max(samples):.1f} s (n={len(samples)})",
            flush=True,
        )


def main(cycles: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for label, sig in FAULTS.items():
            peer = Peer(Path(tmp))
            job = Launchd(peer.argv("healthy", "--fault", "hang"), throttle=0.0).start()
            wait_until(peer.answers, 10)
            log, status = Path(tmp) / f"{peer.tag}.log", Path(tmp) / f"{peer.tag}.json"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [
                        MACPACS,
                        "supervise",
                        *peer.urls(),
                        "--interval",
                        "2",
                        "--timeout",
                        "2",
                        "--failures",
                        "2",
                        "--startup-grace",
                        "30",
                        "--pid-file",
                        str(peer.pid_file),
                        "--process-match",
                        peer.match,
                        "--status-file",
                        str(status),
                        "--max-restarts",
                        str(cycles + 1),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            sup = Supervisor(proc, log, status)
            try:
                samples = [recovery(sup, job, peer, sig) for _ in range(cycles)]
            finally:
                sup.terminate()
                job.stop()
            print(
                f"{label}: {' '.join(f'{s:.1f}' for s in samples)} | min {min(samples):.1f} s, "
                f"median {statistics.median(samples):.1f} s, max {max(samples):.1f} s (n={len(samples)})",
                flush=True,
            )


if __name__ == "__main__":
    count = int(next((a for a in sys.argv[1:] if a.isdigit()), "10"))
    if "--installed" in sys.argv:
        installed(count)
    else:
        main(count)
