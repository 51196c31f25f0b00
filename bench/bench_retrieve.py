"""Issue 3 benchmark: C-MOVE and C-GET of a 500-slice CT series, this server against Orthanc.

Run:  .venv/bin/python bench/bench_retrieve.py [--runs 3] [--out bench/results/retrieve.json]

Both servers hold the same 500 CT slices (512×512 int16, ~525 KB each, explicit VR little
endian) and are measured in the same run, alternating, with a warm page cache:
- C-MOVE: DCMTK ``movescu`` asks the server to send the series to DCMTK ``storescp --ignore``
  (receives and discards, so the destination's disk is not what is measured);
- C-GET: DCMTK ``getscu --ignore``;
- 4 at once: four movescu (or getscu) processes retrieving the same series concurrently
  (storescp ``--fork``), 2,000 instances in all.
Every DCMTK tool and Orthanc run with TCP_NODELAY=1 (see shared/reference/performance.md).
Rates are instances per second of wall time, including association set-up; medians of ``--runs``.
Then one out-of-the-box run (Nagle left on in DCMTK and Orthanc; macpacs turns it off on its
own sockets whatever the environment).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, MACPACS, Macpacs, Orthanc, ct_series, free_port, send_parallel, split, wait_port

WORK = DATA / "work-retrieve"
ENV = {**os.environ, "TCP_NODELAY": "1"}
DEST_AET = "BENCHDEST"


def orthanc_qr(workdir: Path, dest_port: int) -> Orthanc:
    """Orthanc allowing C-GET/C-MOVE from anyone, knowing the storescp destination."""
    return Orthanc(
        workdir,
        DicomAlwaysAllowEcho=True,
        DicomCheckModalityHost=False,
        DicomModalities={"dest": [DEST_AET, "127.0.0.1", dest_port]},
    )


def study_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def run_parallel(argvs: list[list[str]], env: dict[str, str] = ENV) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for a in argvs]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args[0]} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start


def retrieve_argv(kind: str, port: int, aet: str, study: str, scratch: Path) -> list[str]:
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    if kind == "move":
        return ["/usr/bin/movescu", "-S", "-aec", aet, "-aem", DEST_AET, "127.0.0.1", str(port), *keys]
    return ["/usr/bin/getscu", "-S", "--ignore", "-aec", aet, "127.0.0.1", str(port), *keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieve.json"))
    args = parser.parse_args()

    series = ct_series(args.count)
    study = study_uid(series)
    shutil.rmtree(WORK, ignore_errors=True)
    scratch = WORK / "scratch"
    scratch.mkdir(parents=True)
    dest_port = free_port()
    dest = subprocess.Popen(
        ["/usr/bin/storescp", "--fork", "--ignore", "-aet", DEST_AET, str(dest_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    wait_port(dest_port)
    servers = [Macpacs(WORK / "macpacs"), orthanc_qr(WORK / "orthanc", dest_port)]
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for server in servers:
            server.start()
            send_parallel(server.port, server.aet, split(series, 4))
        macpacs = servers[0]
        subprocess.run(
            [MACPACS, "nodes", "add", "dest", "--ae-title", DEST_AET, "--host",
             "127.0.0.1", "--port", str(dest_port), "--data-dir", str(macpacs.data_dir)],
            check=True, capture_output=True,
        )  # fmt: skip
        workloads = {
            "C-MOVE, 1 assoc": ("move", 1),
            "C-GET, 1 assoc": ("get", 1),
            "C-MOVE, 4 at once": ("move", 4),
            "C-GET, 4 at once": ("get", 4),
        }
        for run in range(args.runs):
            for label, (kind, parallel) in workloads.items():
                for server in servers:
                    argv = retrieve_argv(kind, server.port, server.aet, study, scratch)
                    seconds = run_parallel([argv] * parallel)
                    rate = args.count * parallel / seconds
                    results.setdefault(server.name, {}).setdefault(label, []).append(rate)
                    print(f"run {run + 1}: {server.name:8s} {label:18s} {rate:7.1f} inst/s", flush=True)
        nagle = out_of_the_box(servers, study, scratch, args.count)
    finally:
        for server in servers:
            server.stop()
        dest.terminate()
        dest.wait()

    print(f"\n{args.count}-slice CT series, warm cache, TCP_NODELAY=1, medians of {args.runs} runs (inst/s):")
    print(f"{'workload':20s} {'macpacs':>9s} {'orthanc':>9s} {'ratio':>7s}")
    summary = {}
    for label in results["macpacs"]:
        ours = statistics.median(results["macpacs"][label])
        theirs = statistics.median(results["orthanc"][label])
        summary[label] = {"macpacs": ours, "orthanc": theirs, "ratio": ours / theirs}
        print(f"{label:20s} {ours:9.1f} {theirs:9.1f} {ours / theirs:7.2f}")
    print("\nout of the box (Nagle on in DCMTK and Orthanc), one run (inst/s):")
    for label, rates in nagle.items():
        print(f"{label:20s} {rates['macpacs']:9.1f} {rates['orthanc']:9.1f} {rates['macpacs'] / rates['orthanc']:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "medians": summary, "out_of_the_box": nagle}, indent=2))


def out_of_the_box(servers: list, study: str, scratch: Path, count: int) -> dict[str, dict[str, float]]:
    """One C-MOVE and one C-GET per server with TCP_NODELAY unset for DCMTK and Orthanc."""
    plain = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    orthanc = servers[1]
    orthanc.stop()  # restart it on the same data without TCP_NODELAY
    with open(orthanc.workdir / "out-nagle.log", "wb") as log:
        orthanc.proc = subprocess.Popen(
            orthanc.command(), stdout=log, stderr=subprocess.STDOUT, cwd=orthanc.workdir, env=plain
        )
    wait_port(orthanc.port, timeout=120)
    out: dict[str, dict[str, float]] = {}
    for label, kind in (("C-MOVE, 1 assoc", "move"), ("C-GET, 1 assoc", "get")):
        for server in servers:
            seconds = run_parallel([retrieve_argv(kind, server.port, server.aet, study, scratch)], env=plain)
            out.setdefault(label, {})[server.name] = count / seconds
            print(f"out of the box: {server.name:8s} {label:18s} {count / seconds:7.1f} inst/s", flush=True)
    return out


if __name__ == "__main__":
    main()
