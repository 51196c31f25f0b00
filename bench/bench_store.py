"""Issue 2 benchmark: C-STORE throughput, ingest with 1,000,000 instances indexed, C-FIND latency.

Run:  .venv/bin/python bench/bench_store.py [--runs 3] [--index-size 1000000] [--out bench/results/store.json]
Quick, C-STORE only:  .venv/bin/python bench/bench_store.py --runs 1 --store-only "small, 1 assoc" --out /tmp/s.json

Receivers, each started fresh for every run, on the same files in one run:
- macpacs (`macpacs serve`: fsync, index commit, metadata cache, then the response);
- Orthanc (Debian package, index + fsync);
- a bare pynetdicom SCP that only writes ``event.encoded_dataset()`` (the ceiling for pynetdicom).
DCMTK storescu is the client, with TCP_NODELAY=1 unless stated (see shared/reference/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DATA,
    BarePynetdicom,
    Macpacs,
    Orthanc,
    Receiver,
    ct_series,
    patient_name,
    send_parallel,
    small_instances,
    split,
    study_date,
)
from macpacs.pacs_server.index import Index
from macpacs.pacs_server.storage import blob_key

WORK = DATA / "work"


def store_rates(runs: int, only: str = "") -> dict[str, dict[str, list[float]]]:
    """inst/s for each receiver and workload (those whose label contains ``only``); receivers
    interleaved within each run."""
    ct, small = ct_series(1000), small_instances(5000)
    workloads = {
        "1,000 CT, 1 assoc": (split(ct, 1), 1000),
        "5,000 small, 1 assoc": (split(small, 1), 5000),
        "1,000 CT, 4 assoc": (split(ct, 4), 1000),
        "5,000 small, 4 assoc": (split(small, 4), 5000),
    }
    workloads = {label: work for label, work in workloads.items() if only in label}
    kinds: list[type[Receiver]] = [Macpacs, Orthanc, BarePynetdicom]
    rates: dict[str, dict[str, list[float]]] = {k.name: {w: [] for w in workloads} for k in kinds}
    for run in range(runs):
        for workload, (lists, count) in workloads.items():
            for kind in kinds:
                receiver = kind(WORK / kind.name.replace(" ", "_")).start()
                try:
                    seconds = send_parallel(receiver.port, receiver.aet, lists)
                finally:
                    receiver.stop()
                rates[kind.name][workload].append(count / seconds)
                print(f"run {run + 1}: {kind.name:16s} {workload:22s} {count / seconds:7.1f} inst/s", flush=True)
    return rates


def nagle_rates() -> dict[str, dict[str, float]]:
    """Out of the box: storescu without TCP_NODELAY (Nagle on), one run on smaller sets."""
    small = sorted(str(p) for p in small_instances(5000).rglob("*.dcm"))[:300]
    ct = sorted(str(p) for p in ct_series(1000).rglob("*.dcm"))[:200]
    out: dict[str, dict[str, float]] = {}
    for kind in (Macpacs, Orthanc, BarePynetdicom):
        out[kind.name] = {}
        for label, files in (("300 small", small), ("200 CT", ct)):
            receiver = kind(WORK / "nagle").start()
            try:
                out[kind.name][label] = len(files) / send_parallel(receiver.port, receiver.aet, [files], nodelay=False)
            finally:
                receiver.stop()
            print(f"Nagle on: {kind.name:16s} {label:10s} {out[kind.name][label]:7.1f} inst/s", flush=True)
    return out


def _uid(prefix: str, n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1234.{prefix}.{n}"


def fill_index(data_dir: Path, instances: int) -> Path:
    """A data folder whose index holds ``instances`` synthetic instances (20,000 studies of 2 series).

    Rows go in through Index.bulk_load, the same schema and indexes the server uses; UIDs are
    random-looking so the unique indexes behave as with real data.
    """
    marker = data_dir / f"filled-{instances}"
    if marker.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    index = Index(f"sqlite:///{data_dir / 'index.sqlite'}")
    index.migrate()
    studies, per_series = 20_000, instances // 40_000
    rng = random.Random(42)
    blob = zlib.compress(os.urandom(300) + b"{}" * 400, 1)
    now = time.time()
    series_pk = instance_pk = 0
    start = time.perf_counter()
    batch: dict[str, list[dict[str, object]]] = {
        k: [] for k in ("patient", "study", "series", "instance", "instance_metadata")
    }
    for n in range(studies):
        pk = n + 1
        name = patient_name(n)
        batch["patient"].append(
            {
                "pk": pk,
                "patient_id": f"IDX{n:06d}",
                "patient_name": name,
                "patient_name_norm": name,
                "created_at": now,
                "num_studies": 1,
                "num_series": 2,
                "num_instances": 2 * per_series,
            }
        )
        batch["study"].append(
            {
                "pk": pk,
                "patient_pk": pk,
                "study_uid": _uid("1", rng.getrandbits(60)),
                "study_date": study_date(n),
                "study_time": "101500",
                "accession_number": f"IA{n:06d}",
                "modalities_in_study": "CT",
                "num_series": 2,
                "num_instances": 2 * per_series,
                "created_at": now,
                "updated_at": now,
            }
        )
        for _s in range(2):
            series_pk += 1
            batch["series"].append(
                {
                    "pk": series_pk,
                    "study_pk": pk,
                    "series_uid": _uid("2", rng.getrandbits(60)),
                    "modality": "CT",
                    "num_instances": per_series,
                    "created_at": now,
                }
            )
            for i in range(per_series):
                instance_pk += 1
                sop = _uid("3", rng.getrandbits(60))
                batch["instance"].append(
                    {
                        "pk": instance_pk,
                        "series_pk": series_pk,
                        "sop_instance_uid": sop,
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "instance_number": i + 1,
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "storage_key": blob_key(sop),
                        "file_size": 0,
                        "received_at": now,
                    }
                )
                batch["instance_metadata"].append({"instance_pk": instance_pk, "series_pk": series_pk, "data": blob})
        if len(batch["instance"]) >= 50_000 or n == studies - 1:
            index.bulk_load(batch)
            batch = {k: [] for k in batch}
            print(
                f"  index: {instance_pk:,} instances ({instance_pk / (time.perf_counter() - start):,.0f}/s)", flush=True
            )
    index.close()
    marker.write_text("")
    return data_dir


def scaled_ingest(runs: int, index_size: int) -> dict[str, list[float]]:
    """5,000 small instances, 1 association, into an empty index and into one holding ``index_size``."""
    filled = fill_index(DATA / f"index{index_size}", index_size)
    files = split(small_instances(5000), 1)
    out: dict[str, list[float]] = {"empty": [], "full": []}
    for run in range(runs):
        for label in ("empty", "full"):
            receiver = Macpacs(WORK / f"scaled-{label}")
            shutil.rmtree(receiver.workdir, ignore_errors=True)
            receiver.data_dir.mkdir(parents=True)
            if label == "full":
                shutil.copy(filled / "index.sqlite", receiver.data_dir / "index.sqlite")
            receiver.start(fresh=False)
            try:
                seconds = send_parallel(receiver.port, receiver.aet, files)
            finally:
                receiver.stop()
            out[label].append(5000 / seconds)
            print(f"run {run + 1}: ingest into {label} index: {5000 / seconds:7.1f} inst/s", flush=True)
    return out


QUERIES = {
    "STUDY, PatientName=SMITH*": ["-k", "PatientName=SMITH*"],
    "STUDY, PatientID exact": ["-k", "PatientID={pid}"],
    "STUDY, StudyDate range (1 month)": ["-k", "StudyDate=20200101-20200131"],
}


def find_latency(port: int, aet: str, pid: str, repeats: int = 5) -> dict[str, dict[str, float]]:
    """findscu process wall time (ms), median of ``repeats``, with -v and with -q; the number of matches."""
    out: dict[str, dict[str, float]] = {}
    env = {**os.environ, "TCP_NODELAY": "1"}
    for label, keys in QUERIES.items():
        args = [
            "/usr/bin/findscu",
            "-v",  # prints one "Find Response: N (Pending)" line per match
            "-S",
            "-aec",
            aet,
            "127.0.0.1",
            str(port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "-k",
            "PatientName",
            "-k",
            "StudyDate",
            *[k.format(pid=pid) for k in keys],
        ]
        # The same query with -q as well: findscu then prints no dataset. With -v (and without -q)
        # it prints every response, ~0.1 ms a match of its own time on the benchmark machine.
        quiet_args = [a for a in args if a != "-v"] + ["-q"]
        times, quiet, matches = [], [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env)
            times.append((time.perf_counter() - start) * 1000)
            matches = (proc.stdout + proc.stderr).count("(Pending)")
            start = time.perf_counter()
            subprocess.run(quiet_args, capture_output=True, env=env)
            quiet.append((time.perf_counter() - start) * 1000)
        out[label] = {
            "median_ms": statistics.median(times),
            "quiet_median_ms": statistics.median(quiet),
            "matches": matches,
        }
        print(
            f"  {aet:8s} {label:34s} {out[label]['median_ms']:7.1f} ms ({matches} matches),"
            f" findscu -q {out[label]['quiet_median_ms']:7.1f} ms",
            flush=True,
        )
    return out


def find_bench(index_size: int) -> dict[str, dict[str, dict[str, float]]]:
    results = {}
    filled = fill_index(DATA / f"index{index_size}", index_size)
    big = Macpacs(WORK / "find-big", data_dir=filled).start(fresh=False)
    try:
        print(f"C-FIND, macpacs with {index_size:,} instances:")
        results[f"macpacs, {index_size:,} instances"] = find_latency(big.port, big.aet, "IDX000130")
    finally:
        big.stop()
    small = split(small_instances(5000), 1)
    for kind in (Macpacs, Orthanc):
        receiver = kind(WORK / f"find-{kind.name}").start()
        try:
            send_parallel(receiver.port, receiver.aet, small)
            print(f"C-FIND, {kind.name} with 5,000 instances:")
            results[f"{kind.name}, 5,000 instances"] = find_latency(receiver.port, receiver.aet, "SP000130")
        finally:
            receiver.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--index-size", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/store.json"))
    parser.add_argument("--skip-store", action="store_true", help="only the index-scale and C-FIND parts")
    parser.add_argument(
        "--store-only",
        metavar="LABEL",
        nargs="?",
        const="",
        help="only the C-STORE throughput part, and only workloads whose label contains LABEL "
        '(e.g. --store-only "small, 1 assoc"), for quick comparisons',
    )
    args = parser.parse_args()
    results: dict[str, object] = {"runs": args.runs, "index_size": args.index_size}
    if args.store_only is not None:
        results["store"] = rates = store_rates(args.runs, args.store_only)
        for workload in rates["macpacs"]:
            ours, bare = (statistics.median(rates[k][workload]) for k in ("macpacs", "bare pynetdicom"))
            print(f"{workload:22s} macpacs / bare pynetdicom = {ours / bare:.2f} (medians)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        return
    if not args.skip_store:
        results["store"] = store_rates(args.runs)
        results["nagle"] = nagle_rates()
    results["scaled_ingest"] = scaled_ingest(args.runs, args.index_size)
    results["find"] = find_bench(args.index_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
