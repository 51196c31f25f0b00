"""Modality Worklist C-FIND over 10,000 scheduled procedures: macpacs and DCMTK's wlmscpfs side by side.

The same items (20 stations, 50 days, ~10 steps per station and day) are scheduled in macpacs
(the worklist plugin, written through its own API before the server starts) and written as
files for ``wlmscpfs``. Each question is asked with DCMTK ``findscu -W`` (one process and one
association per question, as a modality does), alternating between the two servers, and the
wall time of ``findscu`` is what is measured.

    .venv/bin/python bench/bench_worklist.py [--items 10000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import ROOT, Macpacs, free_port, wait_port
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

STATIONS = 20
DAYS = 50
SPS = "ScheduledProcedureStepSequence[0]"
RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "StudyInstanceUID",
    f"{SPS}.ScheduledStationAETitle",
    f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime",
    f"{SPS}.Modality",
    f"{SPS}.ScheduledProcedureStepID",
]
QUERIES = [
    # label, matching keys
    (
        "station and day (~10 items)",
        {f"{SPS}.ScheduledStationAETitle": "ST07", f"{SPS}.ScheduledProcedureStepStartDate": "20250110"},
    ),
    ("modality and day (~50 items)", {f"{SPS}.Modality": "CT", f"{SPS}.ScheduledProcedureStepStartDate": "20250110"}),
    ("patient ID (1 item)", {"PatientID": "P004242"}),
    (
        "station, day and hours (~4 items)",
        {
            f"{SPS}.ScheduledStationAETitle": "ST07",
            f"{SPS}.ScheduledProcedureStepStartDate": "20250110",
            f"{SPS}.ScheduledProcedureStepStartTime": "0800-1200",
        },
    ),
]
MODALITIES = ["CT", "MR", "US", "CR"]


def make_item(n: int) -> Dataset:
    station = n % STATIONS
    day = (n // STATIONS) % DAYS
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = f"A{n:07d}"
    ds.PatientName = f"PATIENT^N{n:06d}"
    ds.PatientID = f"P{n:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.RequestedProcedureID = f"R{n:07d}"
    ds.RequestedProcedureDescription = "EXAM"
    ds.ReferringPhysicianName = "REFERRER^A"
    step = Dataset()
    step.ScheduledStationAETitle = f"ST{station:02d}"
    step.ScheduledProcedureStepStartDate = f"202501{1 + day % 28:02d}" if day < 28 else f"202502{1 + day - 28:02d}"
    step.ScheduledProcedureStepStartTime = f"{7 + (n // (STATIONS * DAYS)) % 12:02d}0000"
    step.Modality = MODALITIES[station % len(MODALITIES)]
    step.ScheduledPerformingPhysicianName = "TECH^A"
    step.ScheduledProcedureStepDescription = "EXAM"
    step.ScheduledStationName = "STATION"
    step.ScheduledProcedureStepLocation = "ROOM"
    step.ScheduledProcedureStepID = f"S{n:07d}"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def schedule_in_macpacs(data_dir: Path, items: list[Dataset]) -> float:
    """Write the items through the worklist plugin's own API (one transaction); seconds taken."""
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load
    from macpacs.pacs_server.index.worklist_table import writing
    from macpacs.pacs_server.plugins.worklist import Worklist

    started = time.perf_counter()
    archive = open_archive(load(overrides={"storage": {"data_dir": str(data_dir)}}, environ={}))
    try:
        worklist = Worklist(archive)
        with writing(archive.index) as conn:
            for n, ds in enumerate(items):
                worklist.put(conn, f"bench:{n}", ds, source="api")
    finally:
        archive.close()
    return time.perf_counter() - started


def write_wl_files(folder: Path, ae_title: str, items: list[Dataset]) -> None:
    """wlmscpfs's data folder: one file per item (a plain dataset, as DCMTK reads them)."""
    target = folder / ae_title
    target.mkdir(parents=True)
    (target / "lockfile").write_text("")
    for n, ds in enumerate(items):
        ds.save_as(target / f"{n:06d}.wl", implicit_vr=True, little_endian=True)


def echoscu(aet: str, port: int) -> float:
    """One echoscu run (process start, association, C-ECHO, release): the floor under any findscu time.

    With ``TCP_NODELAY=1``, as ``findscu`` is run: without it, DCMTK's Nagle wait added ~40 ms
    to every run, and this "floor" (88-92 ms in earlier runs) was higher than the findscu times.
    """
    started = time.perf_counter()
    subprocess.run(
        ["/usr/bin/echoscu", "-aec", aet, "127.0.0.1", str(port)],
        check=True,
        capture_output=True,
        env={"TCP_NODELAY": "1"},
    )
    return time.perf_counter() - started


def handler_ms(data_dir: Path, keys: dict[str, str], repeat: int) -> float:
    """Median ms of the worklist plugin's C-FIND handler alone (in this process, no network)."""
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load
    from macpacs.pacs_server.plugins.dicom_services import DicomRequest
    from macpacs.pacs_server.plugins.worklist import Worklist

    identifier = Dataset()
    step = Dataset()
    for key in [*RETURN_KEYS, *keys]:
        target, keyword = (step, key.split(".", 1)[1]) if key.startswith(SPS) else (identifier, key)
        setattr(target, keyword, keys.get(key, ""))
    identifier.ScheduledProcedureStepSequence = Sequence([step])
    archive = open_archive(load(overrides={"storage": {"data_dir": str(data_dir)}}, environ={}), migrate=False)
    try:
        worklist = Worklist(archive)
        request = DicomRequest("C-FIND", "", "", identifier, "BENCH", "127.0.0.1", None, 1)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            list(worklist.find(request))
            times.append(time.perf_counter() - started)
    finally:
        archive.close()
    return round(statistics.median(times) * 1000, 2)


def findscu(aet: str, port: int, keys: dict[str, str], out: Path) -> tuple[float, int]:
    """One findscu -W run: (wall seconds, responses)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["/usr/bin/findscu", "-W", "-X", "-od", str(out), "-aec", aet, "127.0.0.1", str(port)]
    for key in RETURN_KEYS:
        args += ["-k", f"{key}={keys.get(key, '')}"]
    args += [arg for key, value in keys.items() if key not in RETURN_KEYS for arg in ("-k", f"{key}={value}")]
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env={"TCP_NODELAY": "1"})
    return time.perf_counter() - started, len(list(out.glob("rsp*.dcm")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "data" / "worklist")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    items = [make_item(n) for n in range(args.items)]

    config = args.workdir / "macpacs.toml"
    config.write_text('[plugins]\nenable = ["worklist"]\n')
    ours = Macpacs(args.workdir / "macpacs", config=config)
    shutil.rmtree(ours.workdir, ignore_errors=True)
    ours.data_dir.mkdir(parents=True)
    load_s = schedule_in_macpacs(ours.data_dir, items)
    ours.start(fresh=False)

    wl_dir = args.workdir / "wlmscpfs"
    write_wl_files(wl_dir, "WLMSCP", items)
    wl_port = free_port()
    theirs = subprocess.Popen(["/usr/bin/wlmscpfs", "-dfp", str(wl_dir), str(wl_port)], stdout=subprocess.DEVNULL)
    wait_port(wl_port)

    results = []
    try:
        echo = statistics.median(echoscu(ours.aet, ours.port) for _ in range(args.repeat))
        print(json.dumps({"echoscu_median_ms": round(echo * 1000, 1), "note": "process start + association + C-ECHO"}))
        for label, keys in QUERIES:
            times: dict[str, list[float]] = {"macpacs": [], "wlmscpfs": []}
            counts: dict[str, int] = {}
            findscu(ours.aet, ours.port, keys, args.workdir / "out")  # warm both up once
            findscu("WLMSCP", wl_port, keys, args.workdir / "out")
            for _ in range(args.repeat):
                for name, aet, port in (("macpacs", ours.aet, ours.port), ("wlmscpfs", "WLMSCP", wl_port)):
                    seconds, count = findscu(aet, port, keys, args.workdir / "out")
                    times[name].append(seconds)
                    counts[name] = count
            row = {
                "query": label,
                "matches": counts,
                "handler_median_ms": handler_ms(ours.data_dir, keys, args.repeat),
                "macpacs_median_ms": round(statistics.median(times["macpacs"]) * 1000, 1),
                "wlmscpfs_median_ms": round(statistics.median(times["wlmscpfs"]) * 1000, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ours.stop()
        theirs.kill()
        theirs.wait()
    print(json.dumps({"items": args.items, "schedule_seconds": round(load_s, 1), "repeat": args.repeat}))


if __name__ == "__main__":
    main()
