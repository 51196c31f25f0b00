"""Measure fault → recovery times with the target settings (``--interval 2 --timeout 2 --failures 2``).

Kill mode, with the launchd stand-in restarting a test peer: ``python tests/supervisor/measure_recovery.py [N]``.
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
from conftest import MACPACS, Launchd, Peer, Supervisor, wait_until

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
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
