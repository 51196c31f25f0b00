"""Soak: mixed load on a real ``macpacs serve`` under ``macpacs supervise`` as installed, then SIGSTOP.

    .venv/bin/python bench/soak.py [--minutes 30] [--stops 3] [--out bench/soak.json]

For ``--minutes``: 4 DCMTK ``storescu`` ingesting in parallel (bench/data/small5000 split in four:
new instances the first time through, identical re-sends after), QIDO-RS searches, WADO-RS study
retrievals and C-MOVEs of a study to a DCMTK ``storescp --ignore``, all at once, without pause.
The server runs in kill mode under a launchd stand-in (KeepAlive true, ThrottleInterval 10 s
counted from the last start, as launchd does), watched by the supervisor with the installed
arguments (installer/service.py: ``SUPERVISOR_ARGS``, the heartbeat, ``--low-space-mb``). Every
10 s it samples RSS and open file descriptors (psutil) of the server and each DICOM worker. At the
end it counts the supervisor's restarts (they should be zero), then freezes the server with
SIGSTOP ``--stops`` times and times each recovery: from the SIGSTOP until the frozen process is
gone, the next is started, and it answers a C-ECHO (the 15 s target) and ``/testdbalive``.
``--minutes 0`` skips the load (the SIGSTOPs alone). A summary table goes to stdout, every figure and
sample to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import MACPACS, free_port, small_instances, split
from macpacs.installer.service import LOW_SPACE_MB, SUPERVISOR_ARGS

SAMPLE_EVERY_S = 10.0
THROTTLE_S = 10.0  # launchd's ThrottleInterval, as installed
MOVE_DEST = "SOAKSCP"
# As installed, pip has compiled the package to bytecode; a shell that forbids writing it would
# have every start (and every spawned DICOM worker) compile ~100 modules from source, about 1 s.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    "MACPACS_DICOM_BIND": "127.0.0.1",
    "MACPACS_WEB_BIND": "127.0.0.1",
    "MACPACS_XMLRPC_BIND": "127.0.0.1",
}
TOOLS_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Launchd:
    """KeepAlive true: start the job again whenever it exits, no sooner than THROTTLE_S after its last start."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.starts: list[tuple[float, int]] = []  # (monotonic, PID)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Launchd:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.starts:
                self._stop.wait(max(0.0, self.starts[-1][0] + THROTTLE_S - time.monotonic()))
                if self._stop.is_set():
                    return
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=ENV)
            self.starts.append((time.monotonic(), self.proc.pid))
            self.proc.wait()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)


class Soak:
    def __init__(self, work: Path, minutes: float) -> None:
        self.work, self.minutes = work, minutes
        self.data_dir = work / "data"
        self.dicom, self.web, self.xmlrpc, self.scp_port = free_port(), free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.web}"
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.latencies: dict[str, list[float]] = {"qido": [], "wado-rs": [], "c-move": []}
        self.samples: list[dict[str, Any]] = []
        self.study_uids: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.server = Launchd(
            [
                MACPACS, "serve", "--data-dir", str(self.data_dir), "--dicom-port", str(self.dicom),
                "--web-port", str(self.web), "--xmlrpc-port", str(self.xmlrpc),
            ],
            work / "serve.log",
        )  # fmt: skip
        self.status_file = work / "supervisor.json"
        self.supervisor_log = work / "supervisor.log"
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.scp: subprocess.Popen[bytes] | None = None

    # -- processes -----------------------------------------------------------------------------
    def alive(self, timeout: float = 1.0) -> bool:
        try:
            r = requests.get(f"{self.base}/testdbalive", timeout=timeout)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.text.strip() == "Test DB Alive succeeded"

    def wait(self, predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not within {timeout} s; see {self.work}")
            time.sleep(step)

    def server_pid(self) -> int | None:
        try:
            return int((self.data_dir / "macpacs.pid").read_text().split("\n")[0])
        except (OSError, ValueError):
            return None

    def supervisor_state(self) -> str:
        try:
            return json.loads(self.status_file.read_text()).get("state", "")
        except (OSError, ValueError):
            return ""

    def start(self) -> None:
        self.server.start()
        self.wait(self.alive, 120, "macpacs serve answering /testdbalive")
        subprocess.run(
            [MACPACS, "nodes", "add", MOVE_DEST, "--ae-title", MOVE_DEST, "--host", "127.0.0.1",
             "--port", str(self.scp_port), "--data-dir", str(self.data_dir)],
            check=True, capture_output=True, env=ENV,
        )  # fmt: skip
        self.scp = subprocess.Popen(
            ["/usr/bin/storescp", "--ignore", "-aet", MOVE_DEST, str(self.scp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=TOOLS_ENV,
        )
        with open(self.supervisor_log, "wb") as out:
            self.supervisor = subprocess.Popen(
                [
                    MACPACS, "supervise",
                    "--web-url", f"{self.base}/testdbalive",
                    "--heartbeat-url", f"{self.base}/heartbeat",
                    "--xmlrpc-url", f"http://127.0.0.1:{self.xmlrpc}/",
                    "--dicom", f"127.0.0.1:{self.dicom}:MACPACS",
                    "--pid-file", str(self.data_dir / "macpacs.pid"),
                    "--status-file", str(self.status_file),
                    "--mode", "kill",
                    *SUPERVISOR_ARGS,
                    "--low-space-mb", str(LOW_SPACE_MB),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait(lambda: self.supervisor_state() == "healthy", 60, "the supervisor reporting healthy")

    def close(self) -> None:
        self.stop.set()
        for proc in (self.supervisor, self.scp):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
                if proc.poll() is None:
                    proc.kill()
        self.server.stop()

    # -- load ------------------------------------------------------------------------------------
    def _error(self, kind: str, detail: str) -> None:
        with self._lock:
            self.errors[kind] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail[:300]}")

    def ingest(self, files: list[str]) -> None:
        while not self.stop.is_set():
            proc = subprocess.run(
                ["/usr/bin/storescu", "-aec", "MACPACS", "127.0.0.1", str(self.dicom), *files],
                capture_output=True,
                text=True,
                env=TOOLS_ENV,
            )
            if proc.returncode == 0:
                with self._lock:
                    self.counts["c-store instances"] += len(files)
            else:
                self._error("c-store", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?")

    def qido(self) -> None:
        session = requests.Session()
        queries = [
            "PatientName=SMITH*",
            "limit=100",
            "StudyDate=20150101-20161231&limit=50",
            "ModalitiesInStudy=CT&limit=20",
        ]
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                r = session.get(f"{self.base}/dicom-web/studies?{random.choice(queries)}", timeout=60)
                if r.status_code not in (200, 204):
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                found = [s["0020000D"]["Value"][0] for s in (r.json() if r.status_code == 200 else [])]
            except Exception as exc:
                self._error("qido", repr(exc))
                time.sleep(1)
                continue
            with self._lock:
                self.counts["qido"] += 1
                self.latencies["qido"].append(time.monotonic() - started)
                if found and len(self.study_uids) < 2000:
                    self.study_uids.extend(found[:10])

    def _a_study(self) -> str | None:
        with self._lock:
            return random.choice(self.study_uids) if self.study_uids else None

    def wado(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            uid = self._a_study()
            if uid is None:
                time.sleep(0.5)
                continue
            started = time.monotonic()
            try:
                r = session.get(
                    f"{self.base}/dicom-web/studies/{uid}",
                    headers={"Accept": 'multipart/related; type="application/dicom"'},
                    timeout=120,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            except Exception as exc:
                self._error("wado-rs", repr(exc))
                time.sleep(1)
                continue
            with self._lock:
                self.counts["wado-rs studies"] += 1
                self.counts["wado-rs bytes"] += len(r.content)
                self.latencies["wado-rs"].append(time.monotonic() - started)

    def move(self) -> None:
        while not self.stop.is_set():
            uid = self._a_study()
            if uid is None:
                time.sleep(0.5)
                continue
            started = time.monotonic()
            proc = subprocess.run(
                ["/usr/bin/movescu", "-S", "-aec", "MACPACS", "-aem", MOVE_DEST,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(self.dicom)],
                capture_output=True, text=True, env=TOOLS_ENV,
            )  # fmt: skip
            if proc.returncode != 0 or "Failed" in proc.stderr:
                self._error("c-move", (proc.stderr.strip().splitlines() or ["?"])[-1])
                time.sleep(1)
                continue
            with self._lock:
                self.counts["c-move studies"] += 1
                self.latencies["c-move"].append(time.monotonic() - started)

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, started: float) -> None:
        pid = self.server_pid()
        entry: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1), "supervisor": self.supervisor_state()}
        with contextlib.suppress(OSError):
            entry["index_mb"] = round((self.data_dir / "index.sqlite").stat().st_size / 2**20, 1)
        try:
            main = psutil.Process(pid) if pid else None
            if main is not None:
                entry["server"] = _usage(main)
                entry["workers"] = [
                    _usage(child) for child in main.children() if "spawn_main" in " ".join(child.cmdline())
                ]
        except psutil.Error as exc:
            entry["error"] = repr(exc)
        self.samples.append(entry)

    def run_load(self) -> None:
        lists = split(small_instances(5000), 4)
        threads = [threading.Thread(target=self.ingest, args=(files,), daemon=True) for files in lists]
        threads += [threading.Thread(target=work, daemon=True) for work in (self.qido, self.wado, self.move)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        end = started + self.minutes * 60
        while time.monotonic() < end:
            self.sample(started)
            time.sleep(max(0.0, min(SAMPLE_EVERY_S, end - time.monotonic())))
        self.stop.set()
        for thread in threads:
            thread.join(180)
        self.sample(started)

    # -- recovery --------------------------------------------------------------------------------
    def echo(self) -> bool:
        """One DCMTK C-ECHO with 1 s time-outs (a frozen server's backlog takes the connection)."""
        proc = subprocess.run(
            ["/usr/bin/echoscu", "-to", "1", "-ta", "1", "-td", "1", "-aec", "MACPACS", "127.0.0.1", str(self.dicom)],
            capture_output=True,
            env=TOOLS_ENV,
        )
        return proc.returncode == 0

    def freeze_and_time(self) -> dict[str, float]:
        """SIGSTOP the server; seconds from then until: the frozen process is gone (``stopped``),
        launchd started the next one (``started``), it answers a C-ECHO (``echo``: the target,
        15 s) and ``/testdbalive`` (``alive``)."""
        self.wait(lambda: self.supervisor_state() == "healthy", 120, "the supervisor reporting healthy")
        time.sleep(random.uniform(0, 1))  # a fault strikes at any point of the heartbeat cycle
        old = self.server_pid()
        assert old is not None
        frozen = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        times: dict[str, float] = {}
        deadline = frozen + 120
        while "alive" not in times:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new server answering 120 s after the SIGSTOP; see {self.work}")
            if "stopped" not in times and not psutil.pid_exists(old):
                times["stopped"] = time.monotonic() - frozen
            if "started" not in times and self.server.starts[-1][1] != old:
                times["started"] = self.server.starts[-1][0] - frozen
            if "started" in times and "echo" not in times and self.echo():
                times["echo"] = time.monotonic() - frozen
            if "echo" in times and self.alive(0.5):
                times["alive"] = time.monotonic() - frozen
            time.sleep(0.05)
        return {k: round(v, 1) for k, v in times.items()}


def _usage(proc: psutil.Process) -> dict[str, Any]:
    """RSS, open descriptors, and the SQLite connections open on the index (one descriptor of
    ``index.sqlite`` each): every connection keeps its own page cache, up to ``cache_size``."""
    with proc.oneshot():
        return {
            "pid": proc.pid,
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "fds": proc.num_fds(),
            "index_connections": sum(f.path.endswith("/index.sqlite") for f in proc.open_files()),
        }


def _restarts(log: str) -> int:
    return len(re.findall(r"-> restarting", log))


def summarize(
    soak: Soak, recoveries: list[dict[str, float]], restarts_during_load: int, machine: dict[str, Any]
) -> dict[str, Any]:
    series: dict[str, list[dict[str, Any]]] = {"server": [s["server"] for s in soak.samples if "server" in s]}
    for s in soak.samples:
        for worker in s.get("workers", []):
            series.setdefault(f"DICOM worker PID {worker['pid']}", []).append(worker)
    rows = {}
    for name, values in series.items():
        if not values:
            continue
        warm = values[min(len(values) - 1, max(1, len(values) // 10))]  # after the first tenth (warm-up)
        rows[name] = {
            "rss_mb": {
                "first": values[0]["rss_mb"],
                "warm": warm["rss_mb"],
                "last": values[-1]["rss_mb"],
                "max": max(v["rss_mb"] for v in values),
            },
            "fds": {
                "first": values[0]["fds"],
                "warm": warm["fds"],
                "last": values[-1]["fds"],
                "max": max(v["fds"] for v in values),
            },
            "index_connections": {"first": values[0]["index_connections"], "last": values[-1]["index_connections"]},
            "pids": sorted({v["pid"] for v in values}),
        }
    return {
        "minutes": soak.minutes,
        "machine": machine,
        "supervisor_args": [*SUPERVISOR_ARGS, "--low-space-mb", str(LOW_SPACE_MB)],
        "counts": dict(soak.counts),
        "errors": dict(soak.errors),
        "error_samples": soak.error_samples,
        "latency_s": {
            k: {"n": len(v), "median": round(statistics.median(v), 3), "max": round(max(v), 3)}
            for k, v in soak.latencies.items()
            if v
        },
        "restarts_during_load": restarts_during_load,
        "states_seen": sorted({s["supervisor"] for s in soak.samples}),
        "processes": rows,
        "sigstop_recovery_s": recoveries,
        "samples": soak.samples,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nsoak: {result['minutes']:g} min of mixed load, supervisor {' '.join(result['supervisor_args'])}")
    print(f"machine: {result['machine']}")
    print(
        "\n| process | RSS MB first / after warm-up / last / max | open fds first / after warm-up / last / max "
        "| index connections first / last |"
    )
    print("|---|---|---|---|")
    for name, row in result["processes"].items():
        r, f, c = row["rss_mb"], row["fds"], row["index_connections"]
        print(
            f"| {name} | {r['first']} / {r['warm']} / {r['last']} / {r['max']} | "
            f"{f['first']} / {f['warm']} / {f['last']} / {f['max']} | {c['first']} / {c['last']} |"
        )
    sizes = [s["index_mb"] for s in result["samples"] if "index_mb" in s]
    if sizes:
        print(f"index.sqlite: {sizes[0]} MB at the first sample, {sizes[-1]} MB at the last")
    print("\n| work | done | errors | median s | max s |")
    print("|---|---|---|---|---|")
    lat = result["latency_s"]
    for name, count_key in (
        ("c-store", "c-store instances"),
        ("qido", "qido"),
        ("wado-rs", "wado-rs studies"),
        ("c-move", "c-move studies"),
    ):
        lt = lat.get(name, {})
        print(
            f"| {name} | {result['counts'].get(count_key, 0)} | {result['errors'].get(name, 0)} | "
            f"{lt.get('median', '')} | {lt.get('max', '')} |"
        )
    print(
        f"\nsupervisor restarts during the load: {result['restarts_during_load']}; states seen: {result['states_seen']}"
    )
    rec = result["sigstop_recovery_s"]
    if rec:
        print("\n| SIGSTOP, then seconds until | " + " | ".join(f"#{n + 1}" for n in range(len(rec))) + " | max |")
        print("|---|" + "---|" * (len(rec) + 1))
        for key, what in (
            ("stopped", "the frozen server is gone"),
            ("started", "launchd started the next"),
            ("echo", "it answers C-ECHO"),
            ("alive", "it answers /testdbalive"),
        ):
            values = [r.get(key, float("nan")) for r in rec]
            print(f"| {what} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {max(values):.1f} |")
    for line in result["error_samples"]:
        print(f"  error: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--stops", type=int, default=3, help="SIGSTOPs timed after the load")
    parser.add_argument("--out", type=Path, default=Path("bench/soak.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="macpacs-soak-"))
    soak = Soak(work, args.minutes)
    machine = {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    recoveries: list[dict[str, float]] = []
    try:
        soak.start()
        if args.minutes > 0:
            soak.run_load()
        restarts = _restarts(soak.supervisor_log.read_text(errors="replace"))
        machine["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        soak.stop.clear()
        for _ in range(args.stops):
            recoveries.append(soak.freeze_and_time())
            print(f"SIGSTOP recovery: {recoveries[-1]}", flush=True)
    finally:
        soak.close()
    result = summarize(soak, recoveries, restarts, machine)
    result["logs"] = str(work) if args.keep else None
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nJSON: {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
