"""A small misbehaving server for the supervisor's tests: a real process, not a mock.

It serves ``/testdbalive`` and an OsiriX-style XML-RPC ``DBWindowFind`` on two ports and
behaves according to ``--mode``; SIGUSR1 switches it to ``--fault`` at run time, so a test can
break a healthy server at a known instant. Modes:

- ``healthy``: the answers OsiriX gives;
- ``hang``: accepts connections and never answers;
- ``wrongbody``: ``/testdbalive`` answers 200 with another body;
- ``xmlrpc-fault``: XML-RPC answers with a fault;
- ``refuse``: closes its listening sockets (connections are refused) but stays alive;
- ``crash``: exits with status 3 right after start;
- ``trickle``: answers one byte every 0.1 s, forever: socket timeouts never fire, only the
  supervisor's hard deadline stops the probe;
- ``sleep``: listens on nothing; a decoy for the PID-file tests;
- ``slow``: ``/testdbalive`` and XML-RPC never answer, but ``/heartbeat`` does (a busy server);
- ``stale``: ``/heartbeat`` answers 503, naming a stale part (a server that knows it is stuck).

``GET /heartbeat`` answers as ``macpacs serve`` does (pacs_server/heartbeat.py), from its own
thread, except in ``hang``, ``trickle`` and ``stale``; its ``free_mb`` is ``--free-mb``, and
SIGUSR2 sets it to 1,000,000 (space freed).

With ``--pid-file`` it writes and locks a PID file as ``macpacs serve`` does, through the server's
own ``PidFile`` (so the supervisor's reader is tested against the server's writer), for the
data folder ``--data-dir`` (default: the PID file's folder).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from macpacs.pacs_server.pidfile import PidFile

MODE = "healthy"
FREE_MB = 1_000_000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _hang_if_asked(self) -> None:
        if MODE in ("hang", "slow"):
            time.sleep(3600)
        if MODE == "trickle":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while True:
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.1)

    def do_GET(self) -> None:
        if self.path == "/heartbeat" and MODE not in ("hang", "trickle"):
            ok = MODE != "stale"
            stale = [] if ok else ["index read: no sign of life for 12.0 s"]
            answer = {"ok": ok, "pid": os.getpid(), "parts": {}, "stale": stale, "free_mb": FREE_MB}
            self._reply(200 if ok else 503, json.dumps(answer).encode(), "application/json")
            return
        self._hang_if_asked()
        if self.path != "/testdbalive":
            self._reply(404, b"not found", "text/plain")
        elif MODE == "wrongbody":
            self._reply(200, b"Test DB Alive failed", "text/html")
        else:
            self._reply(200, b"Test DB Alive succeeded", "text/html")

    def do_POST(self) -> None:
        self._hang_if_asked()
        params, method = xmlrpc.client.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if MODE == "xmlrpc-fault":
            body = xmlrpc.client.dumps(xmlrpc.client.Fault(7, "database is locked"), methodresponse=True)
        elif method.lower() == "dbwindowfind" and params and params[0].get("table") == "Study":
            body = xmlrpc.client.dumps(({"error": "0", "elements": []},), methodresponse=True)
        else:
            body = xmlrpc.client.dumps(xmlrpc.client.Fault(1, f"unknown method {method}"), methodresponse=True)
        self._reply(200, body.encode(), "text/xml")


def main() -> None:
    global MODE, FREE_MB
    parser = argparse.ArgumentParser()
    parser.add_argument("--web-port", type=int, required=True)
    parser.add_argument("--xmlrpc-port", type=int, required=True)
    parser.add_argument("--mode", default="healthy")
    parser.add_argument("--fault", default="hang", help="mode to switch to on SIGUSR1")
    parser.add_argument("--pid-file")
    parser.add_argument("--data-dir", help="the data folder the PID file names (default: its folder)")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (forces SIGKILL)")
    parser.add_argument("--tag", default="", help="free text, so tests can match the command line")
    parser.add_argument("--free-mb", type=int, default=FREE_MB, help="free space the heartbeat reports")
    args = parser.parse_args()
    MODE = args.mode
    FREE_MB = args.free_mb

    if args.pid_file:
        pid_file = Path(args.pid_file)
        PidFile(pid_file, Path(args.data_dir) if args.data_dir else pid_file.parent).acquire()  # held until exit
    if MODE == "crash":
        raise SystemExit(3)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    servers: list[ThreadingHTTPServer] = []
    if MODE not in ("sleep", "refuse"):
        for port in (args.web_port, args.xmlrpc_port):
            server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
            server.daemon_threads = True
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close_listeners() -> None:
        for server in servers:
            server.shutdown()
            server.server_close()

    def on_usr1(_signum: int, _frame: object) -> None:
        global MODE
        MODE = args.fault
        if MODE == "refuse":
            threading.Thread(target=close_listeners).start()

    def on_usr2(_signum: int, _frame: object) -> None:
        global FREE_MB
        FREE_MB = 1_000_000

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
