"""What HTTPS costs on the XML-RPC port (``xmlrpc.tls``): the same call over http and https.

Two ``macpacs serve`` on empty archives, one plain, one with ``xmlrpc.tls`` and a 2048-bit RSA
self-signed certificate (as ``macpacs install --https`` makes). Every XML-RPC call is one
connection (HTTP/1.0, as OsiriX), so each https call pays a full TLS handshake. Measured, in
alternating rounds: the latency of the watchdog's probe (``DBWindowFind`` matching nothing), one
client after the other, and the calls per second that ``--clients`` clients in parallel get.

    .venv/bin/python bench/bench_xmlrpc_tls.py [--repeat 200] [--seconds 3] [--clients 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import statistics
import subprocess
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path

from common import ROOT, Macpacs

PROBE = {"request": 'studyInstanceUID == "macpacs-supervisor-probe"', "table": "Study"}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment the next server starts with (common.Receiver copies it)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def certificate(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def caller(url: str, context: ssl.SSLContext | None) -> Callable[[], None]:
    proxy = xmlrpc.client.ServerProxy(url, context=context) if context else xmlrpc.client.ServerProxy(url)

    def call() -> None:
        assert proxy.DBWindowFind(PROBE)["error"] == "0"

    return call


def wait_answering(call: Callable[[], None]) -> None:
    for _ in range(100):  # the XML-RPC port is served right after the DICOM one
        try:
            call()
            return
        except OSError:
            time.sleep(0.2)
    call()


def latency_ms(call: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def throughput(make: Callable[[], Callable[[], None]], clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        call = make()
        while time.monotonic() < stop:
            call()
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = ROOT / "bench" / "results" / "xmlrpc-tls-work"
    cert, key = certificate(work / "tls")
    trust = ssl.create_default_context(cafile=str(cert))
    plain = Macpacs(work / "plain").start()
    with environment(
        {"MACPACS_WEB_TLS_CERT": str(cert), "MACPACS_WEB_TLS_KEY": str(key), "MACPACS_XMLRPC_TLS": "true"}
    ):
        secure = Macpacs(work / "https").start()
    urls = {"http": (f"http://127.0.0.1:{plain.xmlrpc_port}/", None),
            "https": (f"https://127.0.0.1:{secure.xmlrpc_port}/", trust)}  # fmt: skip
    rows: dict[str, dict[str, list[float]]] = {scheme: {"latency_ms": [], "calls_s": []} for scheme in urls}
    try:
        for url, context in urls.values():
            wait_answering(caller(url, context))
        for _ in range(args.rounds):
            for scheme, (url, context) in urls.items():
                rows[scheme]["latency_ms"].append(latency_ms(caller(url, context), args.repeat))
                rows[scheme]["calls_s"].append(
                    throughput(lambda u=url, c=context: caller(u, c), args.clients, args.seconds)
                )
    finally:
        plain.stop()
        secure.stop()
    summary = {scheme: {k: statistics.median(v) for k, v in row.items()} for scheme, row in rows.items()}
    print(f"| port | probe latency, median ms | calls/s, {args.clients} clients |  ({args.rounds} rounds)")
    print("|---|---|---|")
    for scheme, row in summary.items():
        print(f"| {scheme} | {row['latency_ms']:.2f} | {row['calls_s']:.0f} |")
    h, s = summary["http"], summary["https"]
    print(f"https / http: latency {s['latency_ms'] / h['latency_ms']:.2f}×, calls/s {s['calls_s'] / h['calls_s']:.2f}×")
    out = ROOT / "bench" / "results" / "xmlrpc-tls.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rows, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
