"""XML-RPC DBWindowFind latency on a loaded archive (the watchdog probe and typical RIS queries).

There is no OsiriX on Linux to compare with, so the comparison point is the same question asked
by C-FIND on the same server in the same run (pynetdicom as the client, one association per
query, as a RIS would do): both go through the one matcher, so the difference is the protocol.

    .venv/bin/python bench/bench_xmlrpc.py [--instances 2000] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import xmlrpc.client
from pathlib import Path

from common import ROOT, Macpacs, send_parallel, small_instances, split
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

QUERIES = [
    # label, DBWindowFind request on Study, equivalent C-FIND keys
    ("probe (matches nothing)", 'studyInstanceUID == "macpacs-supervisor-probe"', {"StudyInstanceUID": "1.2.3.4"}),
    ('name LIKE "SMITH*"', 'name LIKE "SMITH*"', {"PatientName": "SMITH*"}),
    ("accession number", 'accessionNumber == "SA000042"', {"AccessionNumber": "SA000042"}),
    ("one month of dates", 'date BETWEEN {"2020-02-01", "2020-02-29"}', {"StudyDate": "20200201-20200229"}),
]


def c_find(port: int, aet: str, keys: dict[str, str]) -> int:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        setattr(ds, keyword, keys.get(keyword, ""))
    found = sum(1 for status, rsp in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind) if rsp)
    assoc.release()
    return found


def median_ms(func, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    data = small_instances(args.instances)
    work = ROOT / "bench" / "results" / "xmlrpc-work"
    server = Macpacs(work).start()
    try:
        send_parallel(server.port, server.aet, split(data, 2))
        proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{server.xmlrpc_port}/")
        for _ in range(50):  # the XML-RPC listener starts right after the DICOM one
            try:
                proxy.system.listMethods()
                break
            except OSError:
                time.sleep(0.2)
        rows = []
        for label, request, keys in QUERIES:
            xr_ms, reply = median_ms(
                lambda r=request: proxy.DBWindowFind({"request": r, "table": "Study"}), args.repeat
            )
            cf_ms, found = median_ms(lambda k=keys: c_find(server.port, server.aet, k), args.repeat)
            rows.append(
                {
                    "query": label,
                    "matches": len(reply["elements"]),
                    "c_find_matches": found,
                    "xmlrpc_ms": round(xr_ms, 2),
                    "c_find_ms": round(cf_ms, 2),
                }
            )
    finally:
        server.stop()
    print(f"| query | studies | DBWindowFind median ms | C-FIND median ms | ratio |  ({args.instances} instances)")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["c_find_ms"] / r["xmlrpc_ms"]
        print(f"| {r['query']} | {r['matches']} | {r['xmlrpc_ms']:.1f} | {r['c_find_ms']:.1f} | {ratio:.1f}× |")
    out = Path(ROOT / "bench" / "results" / "xmlrpc.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
