"""Index writer lock across processes: SQLite's busy handler alone vs ``WriterLock`` (flock).

Run:  .venv/bin/python bench/bench_writer_lock.py [--processes 2] [--count 600]

Each process writes ``--count`` transactions like ingest's (``BEGIN IMMEDIATE``, one insert, a
1 ms wait inside the transaction as ingest waits for its folder fsync, commit with
``synchronous=FULL``), then 2 ms of work outside it. Without the cross-process lock a writer
that finds the database locked sleeps in SQLite's busy handler (1, 2, 5 ... ms); with it the
kernel wakes it when the lock is released. Prints transactions/s and the wait for the lock.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macpacs.pacs_server.index.writer_lock import WriterLock


def writer(db: str, count: int, cross_process: bool, out: multiprocessing.Queue) -> None:
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    lock = WriterLock(Path(db)) if cross_process else threading.Lock()
    waits = []
    began = time.perf_counter()
    for _ in range(count):
        start = time.perf_counter()
        with lock:
            conn.execute("BEGIN IMMEDIATE")
            waits.append(time.perf_counter() - start)
            conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(64),))
            time.sleep(0.001)
            conn.execute("COMMIT")
        time.sleep(0.002)
    out.put((time.perf_counter() - began, waits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "index.sqlite")
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        ctx = multiprocessing.get_context("spawn")
        for _ in range(args.rounds):
            for cross_process in (False, True):
                out = ctx.Queue()
                procs = [
                    ctx.Process(target=writer, args=(db, args.count, cross_process, out)) for _ in range(args.processes)
                ]
                for proc in procs:
                    proc.start()
                results = [out.get() for _ in procs]
                for proc in procs:
                    proc.join()
                waits = sorted(w for _seconds, ws in results for w in ws)
                rate = args.processes * args.count / max(seconds for seconds, _ws in results)
                label = "WriterLock (flock)" if cross_process else "busy handler only"
                p95 = waits[int(len(waits) * 0.95)]
                print(
                    f"{label:20s} {rate:6.0f} tx/s; wait for the write lock: median "
                    f"{1000 * statistics.median(waits):.2f} ms, p95 {1000 * p95:.2f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
