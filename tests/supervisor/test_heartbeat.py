"""The heartbeat (``--heartbeat-url``) against test peers: hung is stopped at once, busy is not, low space alerts once.

The peers serve ``/heartbeat`` as ``macpacs serve`` does; the real server is in test_heartbeat_serve.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .conftest import Peer, pid_alive, wait_until

# Heartbeat every 0.2 s, hung after 2.5 s; the other probes every 0.5 s with 0.5 s to answer.
BEAT = ["--heartbeat-interval", "0.2", "--hung-after", "2.5", "--interval", "0.5", "--timeout", "0.5"]
BASE = [*BEAT, "--failures", "2", "--startup-grace", "5", "--kill-grace", "1"]


def heartbeat_args(peer: Peer) -> list[str]:
    return [
        *peer.urls(),
        "--heartbeat-url",
        f"http://127.0.0.1:{peer.web}/heartbeat",
        "--pid-file",
        str(peer.pid_file),
        "--process-match",
        peer.match,
    ]


def alert_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_frozen_server_is_stopped_after_hung_after(peer: Peer, launchd, supervise):
    job = launchd(peer.argv("healthy"))
    wait_until(peer.answers, 10)
    sup = supervise(*heartbeat_args(peer), *BASE)
    sup.wait_state("healthy", 10)
    old = job.pid
    frozen_at = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    wait_until(lambda: job.pid != old and peer.answers(), 15)
    recovered = time.monotonic() - frozen_at
    assert not pid_alive(old)
    sup.wait_state("healthy", 5)
    assert "hung: no good heartbeat for" in sup.log, sup.log
    # hung-after 2.5 s (+ one 1.5 s heartbeat time-out at most), then SIGTERM + SIGCONT: a frozen peer dies at once.
    assert recovered < 6, recovered


def test_busy_server_is_not_restarted_until_busy_limit(peer: Peer, launchd, supervise):
    """Probes time out but the heartbeat answers: busy, never counted; past --busy-limit it counts."""
    job = launchd(peer.argv("healthy", "--fault", "slow"))
    wait_until(peer.answers, 10)
    sup = supervise(*heartbeat_args(peer), *BASE, "--busy-limit", "4")
    sup.wait_state("healthy", 10)
    old = job.pid
    slow_at = time.monotonic()
    os.kill(old, signal.SIGUSR1)
    status = sup.wait_state("busy", 5)
    assert status["consecutive_failures"] == 0 and status["results"][0]["probe"] == "heartbeat"
    assert all(r["timed_out"] for r in status["results"][1:] if not r["ok"])
    time.sleep(2.5)  # 2.5 s of rounds timing out: longer than --hung-after, not restarted
    assert job.pid == old and "-> restarting" not in sup.log, sup.log
    # Past --busy-limit (4 s), time-outs count: 2 failed rounds, then the stop.
    wait_until(lambda: job.pid != old, 10)
    assert time.monotonic() - slow_at > 4
    assert "--busy-limit" in sup.log and "failing -> restarting" in sup.log, sup.log


def test_server_reporting_a_stale_part_is_stopped(peer: Peer, launchd, supervise):
    job = launchd(peer.argv("healthy", "--fault", "stale"))
    wait_until(peer.answers, 10)
    sup = supervise(*heartbeat_args(peer), *BASE)
    sup.wait_state("healthy", 10)
    old = job.pid
    os.kill(old, signal.SIGUSR1)
    wait_until(lambda: job.pid != old, 10)
    assert "the server reports index read: no sign of life" in sup.log, sup.log


def test_low_space_alerts_once_per_crossing(peer: Peer, launchd, supervise, tmp_path: Path):
    alerts = tmp_path / "alerts.jsonl"
    job = launchd(peer.argv("healthy", "--free-mb", "300"))
    wait_until(peer.answers, 10)
    sup = supervise(
        *heartbeat_args(peer), *BASE, "--low-space-mb", "1000", "--alert-command", f"cat >> {alerts}; echo >> {alerts}"
    )
    wait_until(lambda: alerts.exists() and alerts.read_text().strip(), 10)
    time.sleep(2)  # ten more heartbeats under the threshold: still one alert
    lines = alert_lines(alerts)
    assert len(lines) == 1, lines
    alert = json.loads(lines[0])
    assert alert["event"] == "low-space" and "only 300 MB free" in alert["reason"]
    assert sup.status()["free_mb"] == 300
    os.kill(job.pid, signal.SIGUSR2)  # space freed
    sup.wait_log("the low-space alert is armed again", 5)
    assert len(alert_lines(alerts)) == 1
    assert job.pid == job.pids[0], "low space is no reason to restart"
