"""Issue 16 benchmark: what routing on stored adds to C-STORE ingest while the job queue is busy.

Run:  .venv/bin/python bench/bench_routing.py [--runs 3] [--count 1000] [--dest bare|storescp]
      [--associations 1 4] [--out bench/results/routing.json]

Each run starts macpacs fresh twice, alternating which goes first:
- plain: no plugin;
- routed: the routing plugin with one rule sending every instance, as it is stored, to a bare
  pynetdicom SCP (bench/bare_scp.py): each instance queues a ``send`` job from the DICOM worker
  that stored it, and the server's job runners send them while the ingest goes on.
  ``--dest storescp`` routes to DCMTK's ``storescp --ignore`` instead: a destination that takes
  little CPU of this machine, as a remote node takes none.
DCMTK storescu sends the same small instances (64×64) on 1 and on 4 associations; the figure is
the ingest rate (instances/s, until storescu has every answer). For the routed server the time
until the last routed instance left is reported too, and for both the CPU the server's processes
spent an instance (psutil): the DICOM workers' during the ingest, the main process's (where the
job runners send) until every routed instance left.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DATA,
    MACPACS,
    ROOT,
    Macpacs,
    cpu_seconds,
    free_port,
    send_parallel,
    server_processes,
    small_instances,
    wait_port,
)

WORK = DATA / "work-routing"
RULE = """
[plugins]
enable = ["routing"]

[[plugins.routing.rules]]
name = "everything"
on = "stored"
to = ["DEST"]
"""


class Routed(Macpacs):
    name = "macpacs+routing"

    def prepare(self) -> None:
        (self.workdir / "macpacs.toml").write_text(RULE)

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.workdir / "macpacs.toml")]


def _jobs(server: Macpacs) -> dict[str, int]:
    return requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=30).json()["jobs"]


def one_run(
    kind: type[Macpacs], lists: list[list[str]], dest_port: int, count: int
) -> tuple[float, float | None, dict[str, float]]:
    """(ingest inst/s, seconds until every routed instance left or None, CPU ms an instance of the
    workers during the ingest and of the main process until the end) for one fresh server."""
    server = kind(WORK / kind.name.replace("+", "-")).start()
    try:
        wait_port(server.web_port)
        if kind is Routed:
            subprocess.run(
                [MACPACS, "nodes", "add", "DEST", "--ae-title", "BARE", "--host", "127.0.0.1", "--port", str(dest_port),
                 "--data-dir", str(server.data_dir), "--config", str(server.workdir / "macpacs.toml")],
                check=True, capture_output=True,
            )  # fmt: skip
        assert server.proc is not None
        processes = server_processes(server.proc.pid)
        cpu_before = cpu_seconds(processes)
        start = time.perf_counter()
        elapsed = send_parallel(server.port, server.aet, lists)
        cpu_ingest = cpu_seconds(processes)
        routed = None
        if kind is Routed:
            while True:
                jobs = _jobs(server)
                if jobs["queued"] == jobs["running"] == 0 and jobs["done"] >= count:
                    break
                time.sleep(0.05)
            routed = time.perf_counter() - start
        cpu_end = cpu_seconds(processes)
        cpu = {
            "workers_ms": round((sum(cpu_ingest[1:]) - sum(cpu_before[1:])) * 1000 / count, 3),
            "main_ms": round((cpu_end[0] - cpu_before[0]) * 1000 / count, 3),
        }
        return count / elapsed, routed, cpu
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--dest", choices=("bare", "storescp"), default="bare", help="the routed-to SCP")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = parser.parse_args()
    files = sorted(str(p) for p in small_instances(5000).rglob("*.dcm"))[: args.count]
    dest_port = free_port()
    if args.dest == "bare":
        dest = [sys.executable, str(ROOT / "bench" / "bare_scp.py"), str(dest_port), str(WORK / "dest")]
    else:  # the AE title is the one the rule's node is registered with
        dest = ["/usr/bin/storescp", "--ignore", "-aet", "BARE", str(dest_port)]
    bare = subprocess.Popen(dest, env={**os.environ, "TCP_NODELAY": "1"})  # DCMTK: Nagle off, as in every bench
    wait_port(dest_port)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for associations in args.associations:
            lists = [files[i::associations] for i in range(associations)]
            label = f"{args.count} small, {associations} assoc"
            rates = results.setdefault(
                label,
                {"plain": [], "routed": [], "routed_done_s": [], "plain_cpu_ms": [], "routed_cpu_ms": []},
            )
            for run in range(args.runs):
                order = [Macpacs, Routed] if run % 2 == 0 else [Routed, Macpacs]
                for kind in order:
                    rate, routed, cpu = one_run(kind, lists, dest_port, args.count)
                    which = "routed" if kind is Routed else "plain"
                    rates[which].append(rate)
                    rates[f"{which}_cpu_ms"].append(cpu)
                    if routed is not None:
                        rates["routed_done_s"].append(routed)
                    print(f"{label} run {run + 1} {kind.name}: {rate:.0f} inst/s"
                          + (f", all routed after {routed:.1f} s" if routed else "")
                          + f"; CPU an instance: workers {cpu['workers_ms']:.2f} ms, main {cpu['main_ms']:.2f} ms",
                          flush=True)  # fmt: skip
    finally:
        bare.terminate()
        bare.wait(10)
    summary = {}
    for label, rates in results.items():
        plain, routed = statistics.median(rates["plain"]), statistics.median(rates["routed"])
        summary[label] = {
            **rates,
            "plain_median": plain,
            "routed_median": routed,
            "added_time_pct": round((plain / routed - 1) * 100, 1),
        }
        print(f"{label}: plain {plain:.0f} inst/s, routed {routed:.0f} inst/s: routing adds "
              f"{summary[label]['added_time_pct']:+.1f} % to the ingest time")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
