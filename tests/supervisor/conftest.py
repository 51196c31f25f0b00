"""Fixtures for the supervisor's tests: test-peer servers, a launchd stand-in, a supervisor process.

Everything here is a real process talking over real sockets on 127.0.0.1. The peers
(``peer.py``) are small servers that misbehave on purpose; they are test peers, not mocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

PEER = Path(__file__).with_name("peer.py")
MACPACS = str(Path(sys.executable).with_name("macpacs"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll until ``predicate`` is truthy; returns its value, or fails the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(step)


def alive_answer(web_port: int, timeout: float = 0.5) -> bool:
    """What a watchdog counts as alive: /testdbalive answers 200 with OsiriX's body."""
    try:
        r = requests.get(f"http://127.0.0.1:{web_port}/testdbalive", timeout=timeout)
    except requests.RequestException:
        return False
    return r.status_code == 200 and r.text.strip() == "Test DB Alive succeeded"


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Peer:
    """Ports and a unique tag for one test peer; the tag lets --process-match find only it."""

    tmp: Path
    web: int = field(default_factory=free_port)
    xmlrpc: int = field(default_factory=free_port)
    tag: str = field(default_factory=lambda: f"peer-{uuid.uuid4().hex[:10]}")

    @property
    def pid_file(self) -> Path:
        return self.tmp / f"{self.tag}.pid"

    @property
    def match(self) -> str:
        return f"peer\\.py .*--tag {self.tag}"

    def argv(self, mode: str = "healthy", *extra: str, pid_file: bool = True) -> list[str]:
        argv = [
            sys.executable,
            str(PEER),
            "--web-port",
            str(self.web),
            "--xmlrpc-port",
            str(self.xmlrpc),
            "--mode",
            mode,
            "--tag",
            self.tag,
            *extra,
        ]
        return [*argv, "--pid-file", str(self.pid_file)] if pid_file else argv

    def urls(self) -> list[str]:
        return [
            "--web-url",
            f"http://127.0.0.1:{self.web}/testdbalive",
            "--xmlrpc-url",
            f"http://127.0.0.1:{self.xmlrpc}/RPC2",
        ]

    def answers(self) -> bool:
        return alive_answer(self.web)


class Launchd:
    """Plays launchd with ``KeepAlive = true``: starts a job and starts it again whenever it exits."""

    def __init__(self, argv: list[str], throttle: float = 0.1, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.throttle = throttle
        self.pids: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Launchd:
        self._thread.start()
        wait_until(lambda: self.pids, 5)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self.proc = subprocess.Popen(
                    self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env
                )
                self.pids.append(self.proc.pid)
            self.proc.wait()
            self._stop.wait(self.throttle)

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)


@dataclass
class Supervisor:
    """A ``macpacs supervise`` process, its log and its status file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    status_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_state(self, state: str, timeout: float) -> dict[str, Any]:
        return wait_until(lambda: (s := self.status()).get("state") == state and s, timeout)

    def wait_log(self, text: str, timeout: float) -> None:
        wait_until(lambda: text in self.log, timeout)

    def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def peer(tmp_path: Path) -> Peer:
    return Peer(tmp_path)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts itself; all are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def launchd() -> Iterator[Callable[..., Launchd]]:
    harnesses: list[Launchd] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> Launchd:
        harnesses.append(Launchd(argv, env=env).start())
        return harnesses[-1]

    yield start
    for harness in harnesses:
        harness.stop()


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """Start ``macpacs supervise ARGS``; at the end stop it and kill any peer left behind."""
    started: list[Supervisor] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Supervisor:
        n = len(started)
        log_path, status_path = tmp_path / f"supervisor{n}.log", tmp_path / f"status{n}.json"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [MACPACS, "supervise", "--status-file", str(status_path), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        started.append(Supervisor(proc, log_path, status_path))
        return started[-1]

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()
    # Peers started by a spawn-mode supervisor that was killed above.
    for proc in psutil.process_iter(["cmdline"]):
        if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()
