"""Issue 17 benchmark: C-STORE ingest with the index on PostgreSQL, next to SQLite and to Orthanc.

Run:  .venv/bin/python bench/bench_postgres.py [--runs 3] [--small 2000] [--ct 300] [--out bench/results/postgres.json]

Receivers, each started fresh (empty index, empty folder) for every run, on the same files:
- macpacs on SQLite (the default) and macpacs on PostgreSQL (``index.url``);
- Orthanc on its SQLite index, and Orthanc with its PostgreSQL index plugin (Debian
  ``orthanc-postgresql``; left out, and said so, when it is not installed).
Both PostgreSQL receivers use one durable cluster started here (fsync on, the server's defaults:
tests/postgres.py), each run on a new database. DCMTK storescu is the client (TCP_NODELAY=1),
on 1 and on 4 associations at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DATA,
    ORTHANC_PLUGINS,
    Macpacs,
    Orthanc,
    Receiver,
    ct_series,
    send_parallel,
    small_instances,
    split,
)
from tests.postgres import ROLE, Cluster

WORK = DATA / "work-pg"
ORTHANC_PG = ORTHANC_PLUGINS / "libOrthancPostgreSQLIndex.so"


class MacpacsPostgres(Macpacs):
    """``macpacs serve`` with ``index.url`` on the benchmark's cluster (a new database per start)."""

    name = "macpacs pg"

    def __init__(self, workdir: Path, cluster: Cluster) -> None:
        super().__init__(workdir)
        self.cluster = cluster

    def prepare(self) -> None:
        url = self.cluster.new_database(migrated=False)  # the server migrates it, as at a site
        (self.workdir / "macpacs.toml").write_text(f'[index]\nurl = "{url}"\n')

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.workdir / "macpacs.toml")]


class OrthancPostgres(Orthanc):
    """Orthanc with its PostgreSQL index plugin on the same cluster (files on disk, as macpacs's)."""

    name = "orthanc pg"

    def __init__(self, workdir: Path, cluster: Cluster) -> None:
        super().__init__(workdir)
        self.cluster = cluster

    def prepare(self) -> None:
        database = self.cluster.new_database(migrated=False).rsplit("/", 1)[1]
        self.settings = {
            "Plugins": [str(ORTHANC_PG)],
            "PostgreSQL": {
                "EnableIndex": True,
                "EnableStorage": False,
                "Host": "127.0.0.1",
                "Port": self.cluster.port,
                "Database": database,
                "Username": ROLE,
                "Password": "",
                "Lock": False,
            },
        }
        super().prepare()


def rates(runs: int, small: int, ct: int) -> dict[str, dict[str, list[float]]]:
    cluster = Cluster(durable=True)
    try:
        ct_files, small_files = ct_series(1000), small_instances(5000)
        workloads = {}
        for parts in (1, 4):
            workloads[f"{small:,} small, {parts} assoc"] = (_first(small_files, small, parts), small)
            workloads[f"{ct:,} CT, {parts} assoc"] = (_first(ct_files, ct, parts), ct)
        makers = {
            "macpacs sqlite": lambda d: Macpacs(d),
            "macpacs pg": lambda d: MacpacsPostgres(d, cluster),
            "orthanc sqlite": lambda d: Orthanc(d),
        }
        if ORTHANC_PG.exists():
            makers["orthanc pg"] = lambda d: OrthancPostgres(d, cluster)
        else:
            print(f"{ORTHANC_PG} missing (apt-get install orthanc-postgresql): Orthanc on PostgreSQL left out")
        out: dict[str, dict[str, list[float]]] = {name: {w: [] for w in workloads} for name in makers}
        for run in range(runs):
            for workload, (lists, count) in workloads.items():
                for name, make in makers.items():
                    # start() returns once the receiver serves (Macpacs.wait_ready: every worker)
                    receiver: Receiver = make(WORK / name.replace(" ", "_")).start()
                    try:
                        seconds = send_parallel(receiver.port, receiver.aet, lists)
                    finally:
                        receiver.stop()
                    out[name][workload].append(count / seconds)
                    print(f"run {run + 1}: {name:15s} {workload:20s} {count / seconds:7.1f} inst/s", flush=True)
        return out
    finally:
        cluster.destroy()


def _first(folder: Path, count: int, parts: int) -> list[list[str]]:
    """The first ``count`` files of ``folder`` in ``parts`` interleaved lists."""
    files = sorted(f for part in split(folder, 1) for f in part)[:count]
    return [files[i::parts] for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="small instances per workload (at most 5,000)")
    parser.add_argument("--ct", type=int, default=300, help="CT slices per workload (at most 1,000)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/postgres.json"))
    args = parser.parse_args()
    found = rates(args.runs, args.small, args.ct)
    medians = {name: {w: statistics.median(r) for w, r in by.items()} for name, by in found.items()}
    print("\nmedians (inst/s) and ratios measured in this run:")
    for workload in medians["macpacs pg"]:
        row = {name: medians[name][workload] for name in medians}
        ratios = f"pg/sqlite {row['macpacs pg'] / row['macpacs sqlite']:.2f}"
        for other in ("orthanc pg", "orthanc sqlite"):
            if other in row:
                ratios += f", macpacs pg / {other} {row['macpacs pg'] / row[other]:.2f}"
        values = ", ".join(f"{name} {rate:.1f}" for name, rate in row.items())
        print(f"{workload:20s} {values}; {ratios}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": args.runs, "rates": found, "medians": medians}, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
