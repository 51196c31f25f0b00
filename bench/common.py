"""Shared pieces of the benchmarks: data sets, receivers (macpacs, Orthanc, bare pynetdicom), timing.

Every benchmark runs this server and its comparison points on the same data in one run,
because the machine is small and noisy: ratios measured together are what we quote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.orthanc import ORTHANC, orthanc_config  # noqa: E402
from tests.synthetic import write_series  # noqa: E402

DATA = ROOT / "bench" / "data"
MACPACS = str(Path(sys.executable).with_name("macpacs"))
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
# 130 surnames, one of them SMITH: "SMITH*" matches 1 patient in 130 (~150 of 20,000).
SURNAMES = ["SMITH"] + [f"N{chr(65 + i // 26)}{chr(65 + i % 26)}SON" for i in range(129)]


def patient_name(n: int) -> str:
    return f"{SURNAMES[n % len(SURNAMES)]}^P{n:06d}"


def study_date(n: int) -> str:
    """Dates spread evenly over 2010-2024 (day 1-28 of each month)."""
    return f"{2010 + (n // 336) % 15}{1 + (n // 28) % 12:02d}{1 + n % 28:02d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def ct_series(count: int = 1000) -> Path:
    """``count`` CT slices of 512×512 int16 (~525 KB each), generated once and cached."""
    folder = DATA / f"ct{count}"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_series(folder, count, size=512, patient_name="BENCH^CT", patient_id="BENCHCT")
        (folder / "done").write_text("")
    return folder


def small_instances(count: int = 5000, per_study: int = 10) -> Path:
    """``count`` 64×64 instances (~10 KB) spread over studies of ``per_study`` with varied names."""
    folder = DATA / f"small{count}"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        for n in range(count // per_study):
            write_series(
                folder / f"{n:05d}",
                per_study,
                size=64,
                patient_name=patient_name(n),
                patient_id=f"SP{n:06d}",
                study_date=study_date(n * 40),
                accession=f"SA{n:06d}",
            )
        (folder / "done").write_text("")
    return folder


def split(folder: Path, parts: int) -> list[list[str]]:
    """The DICOM files under ``folder`` in ``parts`` interleaved lists (one per association)."""
    files = sorted(str(p) for p in folder.rglob("*.dcm"))
    return [files[i::parts] for i in range(parts)]


def storescu(port: int, aet: str, files: list[str], nodelay: bool = True) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"} if nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    proc = subprocess.run(
        ["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port), *files], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stderr[-2000:]}")


def send_parallel(port: int, aet: str, lists: list[list[str]], nodelay: bool = True) -> float:
    """Send each list on its own association at once; returns the wall time in seconds."""
    return send_to([(port, aet, files) for files in lists], nodelay)


def send_to(targets: list[tuple[int, str, list[str]]], nodelay: bool = True) -> float:
    """Send each (port, called AE title, files) on its own association, all at once (to one
    receiver or several); returns the wall time in seconds until the last one is done."""
    env = {**os.environ, "TCP_NODELAY": "1"} if nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port), *files],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for port, aet, files in targets
    ]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start


class Receiver:
    """A C-STORE receiver process started fresh for a run and stopped after it."""

    name = ""
    aet = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # added to the environment it starts with

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, fresh: bool = True) -> Receiver:
        """Start the receiver; ``fresh`` empties its folder first (otherwise its data is kept)."""
        if fresh:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        # Orthanc links DCMTK, which leaves Nagle on unless TCP_NODELAY=1 (shared/reference/performance.md).
        env = {**os.environ, "TCP_NODELAY": "1", **self.env}
        with open(self.workdir / "out.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
            )
        self.wait_ready(timeout=120)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Return once the receiver serves (subclasses wait for more than an open port)."""
        wait_port(self.port, timeout)

    def prepare(self) -> None:
        """Write config files before start (subclasses)."""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Macpacs(Receiver):
    name, aet = "macpacs", "MACPACS"

    def __init__(self, workdir: Path, data_dir: Path | None = None, config: Path | None = None) -> None:
        super().__init__(workdir)
        self.data_dir = data_dir or workdir / "data"
        self.config = config  # a macpacs.toml (plugins and their settings), or none
        self.web_port, self.xmlrpc_port = free_port(), free_port()

    def command(self) -> list[str]:
        return [
            MACPACS,
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--dicom-port",
            str(self.port),
            "--web-port",
            str(self.web_port),
            "--xmlrpc-port",
            str(self.xmlrpc_port),
            *(["--config", str(self.config)] if self.config else []),
        ]

    def wait_ready(self, timeout: float) -> None:
        """Wait for "macpacs ready" and for every DICOM worker process.

        macpacs binds its ports before it serves (early clients wait in the backlog), and is
        ready once one worker is; an open port, or a worker still importing on the other core,
        would put start-up inside the timed run.
        """
        deadline = time.monotonic() + timeout
        log = self.workdir / "out.log"
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            pool = re.search(r"(\d+) worker processes \(dicom.workers\)", text)
            workers = len(re.findall(r"DICOM worker \d+ ready", text))
            if "macpacs ready" in text and (pool is None or workers >= int(pool[1])):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"macpacs exited with {self.proc.returncode} before it was ready: see {log}")
            time.sleep(0.05)
        raise RuntimeError(f"macpacs was not ready within {timeout:.0f} s: see {log}")


class Orthanc(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def __init__(self, workdir: Path, dicomweb: bool = False, **settings: Any) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        self.settings = settings
        if dicomweb:
            self.settings |= {
                "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            }

    def prepare(self) -> None:
        cfg = orthanc_config(
            self.workdir, aet=self.aet, dicom_port=self.port, http_port=self.http_port, Name="bench", **self.settings
        )
        (self.workdir / "orthanc.json").write_text(json.dumps(cfg))

    def command(self) -> list[str]:
        return [ORTHANC, str(self.workdir / "orthanc.json")]


class BarePynetdicom(Receiver):
    name, aet = "bare pynetdicom", "BARE"

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "bare_scp.py"), str(self.port), str(self.workdir / "out")]


def median_rate(runs: list[float], count: int) -> float:
    return count / statistics.median(runs)


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def server_processes(main_pid: int) -> list[Any]:
    """``macpacs serve`` and its DICOM workers, as psutil processes (spawned workers: their command
    line names multiprocessing's spawn, unlike its resource tracker's)."""
    import psutil

    main = psutil.Process(main_pid)
    return [main, *(c for c in main.children() if "multiprocessing.spawn" in " ".join(c.cmdline()))]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and all its descendants (a server's worker
    processes, PostgreSQL's backends); one that ends between two readings takes its share with it."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += sum(process.cpu_times()[:2])
    return total


def cpu_seconds(processes: list[Any]) -> list[float]:
    """User + system CPU seconds of each process so far."""
    return [sum(process.cpu_times()[:2]) for process in processes]
