"""Issue 17 benchmark: C-STORE ingest of two macpacs nodes sharing one PostgreSQL and one S3
store, against one node on the same database server and store, in one run.

Run:  .venv/bin/python bench/bench_nodes.py [--runs 3] [--small 2000] [--ct 300] [--associations 4]
                                            [--out bench/results/nodes.json]

One durable PostgreSQL cluster (fsync on, the server's defaults: tests/postgres.py) and one
SeaweedFS S3 gateway (``weed server -s3``: tests/s3gateway.py), both on loopback, started here
and shared by every run. For each run and each layout, a new database and a new bucket prefix:

- **one node**: one ``macpacs serve`` (its defaults: a DICOM worker process per core) takes all
  ``--associations`` DCMTK ``storescu`` associations (TCP_NODELAY=1);
- **two nodes**: two ``macpacs serve`` on that database and prefix (``index.url``,
  ``storage.url``), each taking half of the associations, as a TCP load balancer in front of
  them would hand them out (docs/scale-out.md). Each has half of this machine: one DICOM
  process (``dicom.workers = 1``, ``--two-node-workers``), where the one node has one per core.

The rate is the aggregate: instances over the wall time from the first association's start to
the last one's end. The CPU each instance cost is measured per part (user + system seconds of
each node with its worker processes, of PostgreSQL's server with its backends, and of the
gateway), which a reader can use to size a site whose nodes have machines of their own.
Afterwards every instance sent must be in the index once (a count on the shared database).

This machine has 2 cores for everything: the clients, the nodes, PostgreSQL and the gateway.
Two nodes here cannot have more CPU than one; what the run shows is whether a second node costs
throughput, and whether the shared parts (the database, the object store) serialise the nodes.
Each layout starts with a warm-up on files outside the timed set, not timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, Macpacs, ct_series, send_to, small_instances, split, tree_cpu_seconds
from tests.postgres import Cluster
from tests.s3gateway import Gateway

WORK = DATA / "work-nodes"
WARM_UP = 20  # instances per node, sent before the timed part (files outside it)


class Node(Macpacs):
    """``macpacs serve`` on the shared index database and bucket prefix."""

    def __init__(
        self, workdir: Path, name: str, index_url: str, storage_url: str, gateway: Gateway, workers: int = 0
    ) -> None:
        super().__init__(workdir)
        self.index_url = index_url
        self.env = {"MACPACS_STORAGE_URL": storage_url, "MACPACS_SERVER_NODE_NAME": name, **gateway.env()}
        if workers:
            self.env["MACPACS_DICOM_WORKERS"] = str(workers)

    def prepare(self) -> None:
        (self.workdir / "macpacs.toml").write_text(f'[index]\nurl = "{self.index_url}"\n')

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.workdir / "macpacs.toml")]


def postgres_pid(cluster: Cluster) -> int:
    """The postmaster's PID (its backends are its children)."""
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def indexed(index_url: str) -> int:
    import psycopg

    with psycopg.connect(index_url) as conn:
        row = conn.execute("SELECT count(*) FROM instance").fetchone()
    return int(row[0]) if row else 0


def one_run(
    run: int, layout: str, label: str, files: list[str], warm: list[str], associations: int,
    two_node_workers: int, cluster: Cluster, gateway: Gateway,
) -> dict[str, float]:  # fmt: skip
    """Start the layout's nodes on a new database and prefix, send, and measure."""
    index_url = cluster.new_database(migrated=False)  # the first node migrates it, as at a site
    storage_url = f"s3://{gateway.bucket('bench')}/nodes-{layout.replace(' ', '-')}-{label}-{run}"
    count = 1 if layout == "one node" else 2
    nodes = [Node(WORK / f"node-{n}", f"node-{n}", index_url, storage_url, gateway) for n in range(1, count + 1)]
    started: list[Node] = []
    try:
        for node in nodes:  # one after the other: the first creates the schema
            started.append(node.start())
        send_to([(node.port, node.aet, warm[n::count]) for n, node in enumerate(nodes)])
        parts = [files[i::associations] for i in range(associations)]
        targets = [(nodes[i % count].port, nodes[i % count].aet, part) for i, part in enumerate(parts)]
        pids = {f"node {n + 1}": node.proc.pid for n, node in enumerate(nodes) if node.proc is not None}
        pids |= {"PostgreSQL": postgres_pid(cluster)}
        if gateway.proc is not None:
            pids["SeaweedFS"] = gateway.proc.pid
        before = {part: tree_cpu_seconds(pid) for part, pid in pids.items()}
        seconds = send_to(targets)
        spent = {part: tree_cpu_seconds(pid) - before[part] for part, pid in pids.items()}
    finally:
        for node in started:
            node.stop()
    stored = indexed(index_url)
    if stored != len(files) + len(warm):
        raise AssertionError(f"{layout}: {stored} instances indexed, {len(files) + len(warm)} sent")
    out = {"inst/s": len(files) / seconds}
    out |= {f"{part} CPU ms/inst": value * 1e3 / len(files) for part, value in spent.items()}
    out["all parts CPU ms/inst"] = sum(spent.values()) * 1e3 / len(files)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in out.items() if k != "inst/s")
    print(f"run {run + 1}: {layout:9s} {label:6s} {out['inst/s']:7.1f} inst/s; {shown}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="small instances per run (at most 4,900)")
    parser.add_argument("--ct", type=int, default=300, help="CT slices per run (at most 950)")
    parser.add_argument("--associations", type=int, default=4, help="storescu at once, in all (even)")
    parser.add_argument(
        "--two-node-workers", type=int, default=1, help="dicom.workers of each of the two nodes (0: one per core)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/nodes.json"))
    args = parser.parse_args()
    if args.associations < 2 or args.associations % 2:
        parser.error("--associations must be even: the two nodes take half each")
    shutil.rmtree(WORK, ignore_errors=True)
    workloads = {}
    for label, folder, count in (("small", small_instances(5000), args.small), ("CT", ct_series(1000), args.ct)):
        files = sorted(split(folder, 1)[0])
        workloads[label] = (files[:count], files[-2 * WARM_UP :])
    cluster = Cluster(durable=True, folder=WORK / "postgresql")
    gateway = Gateway(WORK / "weed").start()
    layouts = ("one node", "two nodes")
    results: dict[str, dict[str, list[dict[str, float]]]] = {w: {lay: [] for lay in layouts} for w in workloads}
    try:
        for run in range(args.runs):
            for label, (files, warm) in workloads.items():
                for layout in layouts if run % 2 == 0 else layouts[::-1]:
                    found = one_run(
                        run, layout, label, files, warm, args.associations, args.two_node_workers, cluster, gateway
                    )
                    results[label][layout].append(found)
    finally:
        gateway.stop()
        cluster.destroy()
    print(f"\nmedians over {args.runs} runs, {args.associations} associations in all:")
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for label, by_layout in results.items():
        medians[label] = {
            layout: {key: statistics.median(r.get(key, 0.0) for r in runs) for key in runs[-1]}
            for layout, runs in by_layout.items()
        }
        one, two = medians[label]["one node"], medians[label]["two nodes"]
        ratio = statistics.median(
            b["inst/s"] / a["inst/s"] for a, b in zip(by_layout["one node"], by_layout["two nodes"], strict=True)
        )
        medians[label]["two / one"] = {"inst/s": ratio}
        for layout, row in (("one node", one), ("two nodes", two)):
            cpu = ", ".join(f"{k.replace(' CPU ms/inst', '')} {v:.2f}" for k, v in row.items() if k != "inst/s")
            print(f"{label:6s} {layout:9s} {row['inst/s']:7.1f} inst/s; CPU ms/inst: {cpu}")
        print(f"{label:6s} two nodes / one node (median of the runs' ratios): {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = {"args": vars(args) | {"out": str(args.out)}, "runs": results, "medians": medians}
    args.out.write_text(json.dumps(body, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
