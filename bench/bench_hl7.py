"""HL7 intake: ORM^O01 messages a second, each acknowledged only once it is durable.

A real ``macpacs serve`` with the hl7 and worklist plugins; each client sends new orders over
one MLLP connection and waits for every ACK before the next message (as a RIS interface
engine does), with one connection and with four at once. The ACK leaves after the commit
(SQLite ``synchronous=FULL``), so the rate is that of durable, applied messages. The worklist
is checked afterwards: every acknowledged order is there.

    .venv/bin/python bench/bench_hl7.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

from common import ROOT, Macpacs, free_port, wait_port


def orm(n: int) -> bytes:
    fields = {1: "1", 2: f"ORD{n}", 3: f"F{n}", 4: "CTHEAD^CT HEAD^L", 18: f"A{n:07d}", 19: f"R{n}", 20: f"S{n}"}
    fields |= {21: f"ST{n % 20:02d}", 24: "CT", 27: "^^^202501101000"}
    obr = "|".join(["OBR", *(fields.get(i, "") for i in range(1, 28))])
    text = "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSP|MACPACS|RAD|20250101120000||ORM^O01^ORM_O01|B{n}|P|2.5",
            f"PID|1||P{n:06d}^^^HOSP^MR||PATIENT^N{n:06d}||19700101|O",
            f"ORC|NW|ORD{n}|F{n}||SC",
            obr,
        ]
    )
    return b"\x0b" + text.encode() + b"\r\x1c\r"


def client(port: int, numbers: range, failures: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for n in numbers:
            sock.sendall(orm(n))
            reply = b""
            while not reply.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                if not chunk:
                    failures.append(f"connection closed at message {n}")
                    return
                reply += chunk
            if b"MSA|AA|" not in reply:
                failures.append(reply.decode(errors="replace"))


def run(workdir: Path, messages: int, connections: int) -> dict:
    hl7_port = free_port()
    config = workdir / f"macpacs-{connections}.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[plugins]\nenable = ["hl7", "worklist"]\n\n[plugins.hl7]\nport = {hl7_port}\n')
    server = Macpacs(workdir / f"server-{connections}", config=config).start()
    try:
        wait_port(hl7_port)
        failures: list[str] = []
        per = messages // connections
        threads = [
            threading.Thread(target=client, args=(hl7_port, range(i * per, (i + 1) * per), failures))
            for i in range(connections)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    with sqlite3.connect(server.data_dir / "index.sqlite") as db:
        stored = db.execute("SELECT count(*) FROM scheduled_procedure").fetchone()[0]
    return {
        "connections": connections,
        "messages": per * connections,
        "seconds": round(seconds, 2),
        "messages_per_s": round(per * connections / seconds, 1),
        "not_acknowledged_AA": len(failures),
        "worklist_items_after": stored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "data" / "hl7")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    for connections in (1, 4):
        print(json.dumps(run(args.workdir, args.messages, connections)), flush=True)


if __name__ == "__main__":
    main()
