"""``macpacs supervise`` as a process, against real misbehaving peers.

Short intervals keep each case to a few seconds: ``FAST`` probes every 0.3 s and acts after two
failed rounds.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import Peer, pid_alive, wait_until

FAST = ["--interval", "0.3", "--timeout", "0.3", "--failures", "2", "--startup-grace", "5", "--kill-grace", "1"]


@pytest.mark.parametrize("fault", ["hang", "trickle", "wrongbody", "xmlrpc-fault", "refuse", "SIGSTOP"])
def test_kill_mode_recovers_under_launchd(peer: Peer, launchd, supervise, fault: str):
    """The supervisor stops the faulty server; the launchd stand-in starts a new one, which answers."""
    job = launchd(peer.argv("healthy", "--fault", fault if fault != "SIGSTOP" else "hang"))
    wait_until(peer.answers, 10)
    sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
    sup.wait_state("healthy", 10)
    old = job.pid
    fault_at = time.monotonic()
    os.kill(old, signal.SIGSTOP if fault == "SIGSTOP" else signal.SIGUSR1)
    wait_until(lambda: job.pid != old and peer.answers(), 15)
    recovered = time.monotonic() - fault_at
    assert not pid_alive(old)
    status = sup.wait_state("healthy", 5)
    assert status["restarts_24h"] == 1
    log = sup.log
    for line in ("starting -> healthy", "healthy -> failing", "failing -> restarting", "restarting -> healthy"):
        assert line in log, log
    assert f"PID {old} exited" in log
    assert recovered < 5, recovered


def test_sigterm_ignored_escalates_to_sigkill(peer: Peer, launchd, supervise):
    job = launchd(peer.argv("healthy", "--ignore-term"))
    wait_until(peer.answers, 10)
    sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
    sup.wait_state("healthy", 10)
    old = job.pid
    os.kill(old, signal.SIGUSR1)
    wait_until(lambda: job.pid != old and peer.answers(), 15)
    assert f"PID {old} ignored SIGTERM for 1 s and was killed (SIGKILL)" in sup.log


def _never_stopped(sup, job, peer: Peer, detail: str) -> None:
    """The supervisor sees the fault, cannot prove the peer is the server, and leaves it running."""
    old = job.pid
    os.kill(old, signal.SIGUSR1)
    # Two attempts to act (FAST acts after every two failed rounds): each one refused.
    wait_until(lambda: sup.log.count("supervisor.core: server is unhealthy") >= 2, 15)
    assert pid_alive(old) and job.pids == [old]
    assert "cannot prove the server's identity: " + detail in sup.log
    status = sup.status()
    assert status["state"] == "failing" and status["restarts_24h"] == 0
    assert status["server_identity"].startswith("cannot prove the server's identity: " + detail)
    assert status["server_pid"] is None
    assert sup.log.count("ALERT cannot-stop") == 1, "one alert per episode"


def test_no_pid_file_stops_nothing(peer: Peer, launchd, supervise, procs):
    """No PID file (a clean stop removes it): a matching command line alone proves nothing, even
    when it is the only match."""
    job = launchd(peer.argv("healthy", pid_file=False))
    wait_until(peer.answers, 10)
    sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
    sup.wait_state("healthy", 10)
    _never_stopped(sup, job, peer, f"no PID file at {peer.pid_file}")


def _pid_file_text(pid: int, create_time: float, data_dir: Path) -> str:
    return f"{pid}\nformat=macpacs-pid-1\ncreate_time={create_time!r}\ndata_dir={data_dir.resolve()}\n"


def _locked(path: Path) -> Any:
    """Hold the file's flock from this test process, as a live server holds its own."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_pid_file_of_another_program_is_not_touched(peer: Peer, launchd, supervise, procs):
    """The file is locked and names a live PID with its true start time, but that process is not
    the server (its command line does not match): neither it nor the server is stopped."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.append(bystander)
    job = launchd(peer.argv("healthy", pid_file=False))
    wait_until(peer.answers, 10)
    peer.pid_file.write_text(_pid_file_text(bystander.pid, psutil.Process(bystander.pid).create_time(), peer.tmp))
    fd = _locked(peer.pid_file)
    try:
        sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
        sup.wait_state("healthy", 10)
        _never_stopped(sup, job, peer, f"PID {bystander.pid} from {peer.pid_file} runs")
        assert bystander.poll() is None
        assert "which does not match --process-match" in sup.log
    finally:
        os.close(fd)


def test_recycled_pid_is_not_killed(peer: Peer, launchd, supervise, procs):
    """A decoy with a matching command line whose start time is not the one the file records."""
    job = launchd(peer.argv("healthy", pid_file=False))
    wait_until(peer.answers, 10)
    decoy = subprocess.Popen(peer.argv("sleep", pid_file=False))
    procs.append(decoy)
    # Written by a server that started 30 s before the decoy and died; its PID went to the decoy.
    created = psutil.Process(decoy.pid).create_time()
    peer.pid_file.write_text(_pid_file_text(decoy.pid, created - 30, peer.tmp))
    fd = _locked(peer.pid_file)
    try:
        sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
        sup.wait_state("healthy", 10)
        _never_stopped(sup, job, peer, f"PID {decoy.pid} started at")
        assert decoy.poll() is None, "the decoy was killed"
        assert "a recycled PID, another program" in sup.log
    finally:
        os.close(fd)


def test_matching_process_that_does_not_hold_the_pid_file_is_not_killed(peer: Peer, launchd, supervise, procs):
    """PID, start time and command line all match, and the file is locked, but by someone else."""
    job = launchd(peer.argv("healthy", pid_file=False))
    wait_until(peer.answers, 10)
    decoy = subprocess.Popen(peer.argv("sleep", pid_file=False))
    procs.append(decoy)
    peer.pid_file.write_text(_pid_file_text(decoy.pid, psutil.Process(decoy.pid).create_time(), peer.tmp))
    fd = _locked(peer.pid_file)
    try:
        sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
        sup.wait_state("healthy", 10)
        _never_stopped(sup, job, peer, f"PID {decoy.pid} does not have {peer.pid_file} open")
        assert decoy.poll() is None, "the decoy was killed"
    finally:
        os.close(fd)


def test_pid_file_of_another_data_folder_is_not_trusted(peer: Peer, launchd, supervise, tmp_path: Path):
    """The server's own, locked PID file, but for another data folder than the supervisor's."""
    other = tmp_path / "other-installation"
    job = launchd(peer.argv("healthy", "--data-dir", str(other)))
    wait_until(peer.answers, 10)
    sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
    sup.wait_state("healthy", 10)
    _never_stopped(sup, job, peer, f"the PID file {peer.pid_file} is for the data folder {other.resolve()}")


class Webhook(ThreadingHTTPServer):
    """Records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_POST(self) -> None:
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alert"


def test_crash_loop_alerts_and_backs_off(peer: Peer, supervise, tmp_path: Path):
    """A server that dies on start every time: a bounded number of restarts, one alert, a hold-off."""
    webhook = Webhook()
    alert_file = tmp_path / "alert.json"
    sup = supervise(
        *peer.urls(),
        "--interval",
        "0.2",
        "--timeout",
        "0.2",
        "--failures",
        "2",
        "--startup-grace",
        "5",
        "--max-restarts",
        "3",
        "--restart-window",
        "0.25",
        "--alert-command",
        f'cat > {alert_file}; echo "$MACPACS_ALERT_EVENT" > {alert_file}.env',
        "--alert-webhook",
        webhook.url,
        "--mode",
        "spawn",
        "--",
        *peer.argv("crash"),
    )
    status = sup.wait_state("crash-loop", 15)
    wait_until(alert_file.exists, 5)
    wait_until(lambda: webhook.received, 5)
    webhook.shutdown()
    payload = json.loads(alert_file.read_text())
    assert payload["event"] == "crash-loop"
    assert "3 restarts within 0.25 min" in payload["reason"]
    assert (tmp_path / "alert.json.env").read_text().strip() == "crash-loop"
    assert webhook.received[0]["reason"] == payload["reason"]
    assert status["restarts_24h"] == 3
    time.sleep(2)  # held off: nothing more is started during the window
    log = sup.log
    assert log.count("started the server: PID") == 4, log
    assert log.count("server exited with code 3") == 4, log
    # Exponential backoff between the restarts, not a tight loop.
    assert "starting the server again in 1 s" in log and "starting the server again in 2 s" in log
    assert log.count("ALERT crash-loop") == 1


def test_spawn_mode_restarts_a_hung_server_and_stops_it_on_sigterm(peer: Peer, supervise):
    sup = supervise(*peer.urls(), *FAST, "--mode", "spawn", "--", *peer.argv("healthy"))
    first = sup.wait_state("healthy", 10)["server_pid"]
    os.kill(first, signal.SIGUSR1)
    second = wait_until(lambda: (pid := sup.status().get("server_pid")) not in (None, first) and pid, 10)
    wait_until(peer.answers, 10)
    assert not pid_alive(first)
    assert sup.terminate() == 0
    assert not pid_alive(second), "spawn mode stops the server it started"
    assert sup.status()["state"] == "stopped"
    assert "stopped the server it started" in sup.log


def test_sigterm_in_kill_mode_leaves_the_server_running(peer: Peer, launchd, supervise):
    job = launchd(peer.argv("healthy"))
    wait_until(peer.answers, 10)
    sup = supervise(*peer.urls(), *FAST, "--pid-file", str(peer.pid_file), "--process-match", peer.match)
    sup.wait_state("healthy", 10)
    started = time.monotonic()
    assert sup.terminate() == 0
    assert time.monotonic() - started < 2
    assert pid_alive(job.pid) and job.pids == [job.pid]
    status = sup.status()
    assert status["state"] == "stopped"
    assert {r["probe"] for r in status["results"]} == {"web", "xmlrpc"}
    assert "the server is left running" in sup.log


def _receive(sock: socket.socket, seconds: float) -> list[str]:
    messages, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(256).decode())
        except TimeoutError:
            break
    return messages


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_watchdog_is_fed_only_while_probes_pass(peer: Peer, procs, supervise, tmp_path: Path, abstract: bool):
    if abstract and not sys.platform.startswith("linux"):
        pytest.skip("abstract AF_UNIX sockets exist on Linux only")
    name = f"macpacs-test-{uuid.uuid4().hex}"
    address = "\0" + name if abstract else str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    try:
        procs.append(subprocess.Popen(peer.argv("healthy")))
        wait_until(peer.answers, 10)
        env = {"NOTIFY_SOCKET": "@" + name if abstract else address, "WATCHDOG_USEC": "2000000"}
        # --failures high: this test is about the pings, not about killing.
        sup = supervise(
            *peer.urls(),
            "--interval",
            "0.2",
            "--timeout",
            "0.2",
            "--failures",
            "1000",
            "--process-match",
            peer.match,
            env=env,
        )
        healthy = _receive(sock, 1.5)
        assert healthy[0] == "READY=1"
        assert healthy.count("WATCHDOG=1") >= 3
        os.kill(procs[-1].pid, signal.SIGUSR1)
        sup.wait_state("failing", 5)
        _receive(sock, 0.3)  # a ping from the round in flight at the fault may still arrive
        assert _receive(sock, 1.5) == []
        assert sup.terminate() == 0
        assert _receive(sock, 1) == ["STOPPING=1"]
    finally:
        sock.close()


def test_bad_command_lines_are_refused():
    macpacs = str(Path(sys.executable).with_name("macpacs"))
    cases = {
        ("--mode", "spawn"): "needs the server's command after --",
        ("--web-url", "http://x/testdbalive", "--", "true"): "only for --mode spawn",
        ("--interval", "1"): "give at least one of",
        ("--dicom", "nohost"): "HOST:PORT:AET",
        ("--web-url", "http://x/", "--process-match", "("): "not a regular expression",
    }
    for args, message in cases.items():
        result = subprocess.run([macpacs, "supervise", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
