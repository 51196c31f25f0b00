"""The audit trail: appends from several processes, rotation, RFC 5424 syslog, ``macpacs audit``,
and the records a real server writes for what its web clients do."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from macpacs.pacs_server import audit
from macpacs.pacs_server.audit import Actor, AuditTrail, format_rfc5424, parse_syslog_target
from tests.conftest import MACPACS, run_tool
from tests.synthetic import write_series
from tests.web.accounts import page_token

RFC5424 = re.compile(rb"^<(\d+)>1 (\S+) (\S+) macpacs (\d+) (\S+) - \xef\xbb\xbf(.*)$", re.S)


def _writer(log_dir: str, worker: int, count: int) -> None:
    trail = AuditTrail(Path(log_dir), file_mb=1)
    for seq in range(count):
        trail.record("query", Actor(f"w{worker}", "127.0.0.1", "dicom"), count=seq, detail="x" * 2000)


def test_processes_append_and_rotate_without_losing_or_mixing_a_line(tmp_path: Path) -> None:
    workers, count = 4, 300  # ~2.8 MB in all with a 1 MB file: rotations while others write
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(audit.files(tmp_path)) >= 3  # rotated at least twice
    entries = list(audit.read(tmp_path))
    assert None not in entries  # no cut or interleaved line
    seen = sorted((e["user"], e["count"]) for e in entries)
    assert seen == sorted((f"w{w}", n) for w in range(workers) for n in range(count))
    for path in audit.files(tmp_path):
        assert path.stat().st_mode & 0o777 == 0o640
        assert path.stat().st_size <= 1024 * 1024
    # oldest first within each writer: rotation kept the order
    for w in range(workers):
        mine = [e["count"] for e in entries if e["user"] == f"w{w}"]
        assert mine == sorted(mine)


def test_records_name_the_atna_message_and_latest_reads_the_tail(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    for n in range(120):
        trail.record("view", Actor("alice", "10.0.0.7", "web"), studies=[f"1.2.{n}"], patients=lambda: ["PID1"])
    trail.record("login", Actor("mallory", "10.0.0.9", "web"), outcome="failure", detail="wrong password")
    latest = trail.latest(3)
    assert [e["event"] for e in latest] == ["login", "view", "view"]
    assert latest[0]["atna"] == "DCM 110114 User Authentication" and latest[0]["outcome"] == "failure"
    assert latest[1] == {**latest[1], "studies": ["1.2.119"], "patients": ["PID1"], "user": "alice"}
    assert latest[1]["time"].endswith("Z")
    with pytest.raises(ValueError, match="unknown audit event"):
        trail.record("peek", Actor())


def test_coalesced_records_skip_repeats_within_the_window(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    looked_up = []

    def patients() -> list[str]:
        looked_up.append(1)
        return ["PID1"]

    for _ in range(50):  # a viewer fetching one study's metadata, then frames
        trail.record("view", Actor("alice", "10.0.0.7", "web"), studies=["1.2.3"], patients=patients, coalesce=60)
    trail.record("view", Actor("bob", "10.0.0.8", "web"), studies=["1.2.3"], coalesce=60)
    assert [e["user"] for e in audit.read(tmp_path)] == ["alice", "bob"]
    assert len(looked_up) == 1  # the patient lookup ran only for the record written


def test_syslog_messages_are_rfc5424_over_udp_and_octet_counted_tcp(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    tcp.settimeout(10)
    received: list[bytes] = []

    def accept() -> None:
        conn, _ = tcp.accept()
        data = b""
        conn.settimeout(10)
        while data.count(b" ") < 1 or len(data) < int(data.split(b" ", 1)[0]) + len(data.split(b" ", 1)[0]) + 1:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        received.append(data)
        conn.close()

    reader = threading.Thread(target=accept)
    reader.start()
    udp_trail = AuditTrail(tmp_path / "a", syslog=f"udp://127.0.0.1:{udp.getsockname()[1]}")
    tcp_trail = AuditTrail(tmp_path / "b", syslog=f"tcp://127.0.0.1:{tcp.getsockname()[1]}")
    udp_trail.record("login", Actor("mallory", "10.0.0.9", "web"), outcome="failure", detail="wrong password: é")
    tcp_trail.record("delete", Actor("alice", "10.0.0.7", "web"), studies=["1.2.3"], count=12)
    message = udp.recv(65536)
    reader.join(10)
    udp_trail.close()
    tcp_trail.close()

    m = RFC5424.match(message)
    assert m, message
    assert int(m[1]) == 10 * 8 + 4  # authpriv, warning (a failure)
    assert m[5] == b"login"
    body = json.loads(m[6].decode("utf-8"))
    assert body["user"] == "mallory" and body["detail"] == "wrong password: é"

    length, _, frame = received[0].partition(b" ")
    assert int(length) == len(frame)  # RFC 6587 octet counting
    m = RFC5424.match(frame)
    assert m and int(m[1]) == 10 * 8 + 5 and m[5] == b"delete"
    assert json.loads(m[6])["studies"] == ["1.2.3"]


def test_syslog_targets_are_checked_with_the_accepted_forms() -> None:
    assert parse_syslog_target("udp://logs.example.org") == ("udp", ("logs.example.org", 514))
    assert parse_syslog_target("tcp://10.0.0.5:6514") == ("tcp", ("10.0.0.5", 6514))
    assert parse_syslog_target("unix:/var/run/syslog") == ("unix", ("/var/run/syslog",))
    for bad in ("syslog.example.org", "http://x:514", "unix:relative", "udp://host:99999"):
        with pytest.raises(ValueError, match='use "udp://host:514"'):
            parse_syslog_target(bad)
    # a host name with odd characters cannot break the header: they are dropped
    frame = format_rfc5424({"time": "2026-12-02T10:00:00.000Z", "event": "view", "host": "a b", "pid": 1})
    assert frame.startswith(b"<85>1 2026-12-02T10:00:00.000Z ab macpacs 1 view - ")


def _audit_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACPACS, "audit", "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=60
    )


def test_the_cli_filters_and_its_own_reading_is_recorded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    missing = _audit_cli(data)
    assert missing.returncode != 0 and "no audit trail in" in missing.stderr
    trail = AuditTrail(data / "logs")
    trail.record("login", Actor("alice", "10.0.0.7", "web"))
    trail.record("login", Actor("mallory", "10.0.0.9", "web"), outcome="failure")
    trail.record("query", Actor("CT1", "10.0.0.20", "dicom"), patients=["PID7"], count=3)

    failures = _audit_cli(data, "--failures", "--json")
    assert failures.returncode == 0, failures.stderr
    assert [json.loads(line)["user"] for line in failures.stdout.splitlines()] == ["mallory"]
    by_patient = _audit_cli(data, "--patient", "PID7", "--since", "1h")
    assert by_patient.stdout.count("\n") == 1
    assert "CT1 @ 10.0.0.20 (dicom)  patient PID7; 3 matches" in by_patient.stdout
    assert _audit_cli(data, "--since", "yesterday-ish").returncode == 2
    assert _audit_cli(data, "--until", "2000-01-01").stdout == ""
    used = [e for e in audit.read(data / "logs") if e and e["event"] == "audit-read"]
    assert len(used) == 3 and used[0]["via"] == "cli" and "failures=True" in used[0]["detail"]


def test_a_server_records_who_searched_viewed_and_downloaded(make_server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = subprocess.run(
        [MACPACS, "users", "add", "alice", "--password-stdin", "--data-dir", str(data)],
        input="correct horse\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    node = [MACPACS, "nodes", "add", "DEST", "--ae-title", "DEST", "--host", "127.0.0.1", "--port", "9"]
    assert subprocess.run([*node, "--data-dir", str(data)], capture_output=True, timeout=60).returncode == 0
    server = make_server(data_dir=data)
    study = "1.2.826.0.1.3680043.8.498.77"
    write_series(tmp_path / "series", 3, study_uid=study, patient_id="PIDAUDIT", size=16)
    run_tool("storescu", *server.dicom_args(), "+sd", "+r", str(tmp_path / "series"))
    base = f"http://127.0.0.1:{server.web_port}"
    alice = ("alice", "correct horse")

    assert requests.get(f"{base}/dicom-web/studies?PatientID=PIDAUDIT", timeout=10).status_code == 200  # anonymous
    for _ in range(3):  # a viewer: the first metadata request is the one recorded
        assert requests.get(f"{base}/dicom-web/studies/{study}/metadata", auth=alice, timeout=10).status_code == 200
    assert requests.get(f"{base}/api/ui/studies/{study}/zip", auth=alice, timeout=30).status_code == 200

    upload = write_series(tmp_path / "upload", 1, patient_id="PIDUPLOAD", size=16)[0].read_bytes()
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + upload + b"\r\n--B--\r\n"
    stow = requests.post(
        f"{base}/dicom-web/studies",
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
        auth=alice,
        timeout=30,
    )
    assert stow.status_code == 200, stow.text

    browser = requests.Session()
    csrf = {"X-CSRF-Token": page_token(browser, f"{base}/login")}
    sent = browser.post(f"{base}/api/ui/studies/{study}/send", json={"node": "DEST"}, headers=csrf, auth=alice)
    assert sent.status_code == 200, sent.text
    gone = browser.delete(f"{base}/api/ui/studies/{study}", headers=csrf, auth=alice, timeout=30)
    assert gone.status_code == 200, gone.text

    entries = [e for e in audit.read(data / "logs") if e]
    send = next(e for e in entries if e["event"] == "send")
    assert send == {**send, "user": "alice", "studies": [study], "patients": ["PIDAUDIT"]}
    delete = next(e for e in entries if e["event"] == "delete")
    assert delete == {**delete, "user": "alice", "count": 3, "patients": ["PIDAUDIT"], "outcome": "success"}
    uploaded = next(e for e in entries if e["event"] == "upload")
    assert uploaded == {**uploaded, "user": "alice", "count": 1, "patients": ["PIDUPLOAD"], "atna": "DCM 110107 Import"}
    query = next(e for e in entries if e["event"] == "query")
    assert query == {**query, "user": "anonymous", "address": "127.0.0.1", "via": "web", "count": 1}
    assert query["patients"] == ["PIDAUDIT"] and query["studies"] == [study]
    assert "PatientID=PIDAUDIT" in query["detail"]
    views = [e for e in entries if e["event"] == "view"]
    assert len(views) == 1 and views[0]["user"] == "alice" and views[0]["patients"] == ["PIDAUDIT"]
    download = next(e for e in entries if e["event"] == "download")
    assert download["studies"] == [study] and download["atna"] == "DCM 110106 Export"
    assert [e["event"] for e in entries[:3]] == ["user-change", "node-change", "start"]
    assert entries[1]["detail"].startswith("added DEST (DEST@127.0.0.1:9") and entries[1]["via"] == "cli"
    assert entries[2]["via"] == "server"
    status = requests.get(f"{base}/status", auth=alice, timeout=10)
    newest = status.text.split('id="audit">', 1)[1].split("</pre>", 1)[0]
    assert "delete" in newest.splitlines()[0] and "alice @ 127.0.0.1 (web)" in newest


def test_a_changed_setting_is_reported_once_and_secrets_never_appear(tmp_path: Path) -> None:
    saved = tmp_path / "settings.last.json"
    first = audit.flatten_settings(
        {"dicom": {"port": 104}, "plugins": {"options": {"webhooks": {"secret": "hunter2"}}}}
    )
    assert first["plugins.options.webhooks.secret"].startswith("sha256:")
    assert audit.settings_changes(saved, first) == []  # the first start: nothing to compare with
    assert saved.stat().st_mode & 0o777 == 0o600
    second = audit.flatten_settings({"dicom": {"port": 11112}, "plugins": {"options": {"webhooks": {"secret": "new"}}}})
    changes = audit.settings_changes(saved, second)
    assert changes[0] == "dicom.port: 104 → 11112"
    assert changes[1].startswith("plugins.options.webhooks.secret: 'sha256:")
    assert "hunter2" not in saved.read_text() and "new" not in "".join(changes)
    assert audit.settings_changes(saved, second) == []  # reported once


def test_dicom_stores_queries_and_retrieves_are_recorded_with_the_calling_ae(make_server, tmp_path: Path) -> None:
    server = make_server()
    study = "1.2.826.0.1.3680043.8.498.78"
    write_series(tmp_path / "series", 3, study_uid=study, patient_id="PIDDICOM", size=16)
    run_tool("storescu", *server.dicom_args(), "-aet", "CT_SCANNER", "+sd", "+r", str(tmp_path / "series"))
    run_tool("findscu", "-S", *server.dicom_args(), "-aet", "WORKSTATION",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PIDDICOM", "-k", "StudyInstanceUID")  # fmt: skip
    (tmp_path / "got").mkdir()
    run_tool("getscu", "-S", *server.dicom_args(), "-aet", "WORKSTATION", "-od", str(tmp_path / "got"),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")  # fmt: skip

    def records() -> dict[str, dict]:
        return {e["event"]: e for e in audit.read(server.data_dir / "logs") if e and e["via"] == "dicom"}

    deadline = time.monotonic() + 10  # the store record is written when the association closes
    while {"store", "query", "retrieve"} - set(records()) and time.monotonic() < deadline:
        time.sleep(0.2)
    found = records()
    store = found["store"]
    assert store == {**store, "user": "CT_SCANNER", "address": "127.0.0.1", "count": 3, "outcome": "success"}
    assert "3 stored" in store["detail"]
    query = found["query"]
    assert query["user"] == "WORKSTATION" and query["count"] == 1
    assert query["detail"] == "C-FIND STUDY PatientID=PIDDICOM"
    retrieve = found["retrieve"]
    assert retrieve == {**retrieve, "user": "WORKSTATION", "count": 3, "studies": [study], "patients": ["PIDDICOM"]}
    assert retrieve["detail"].startswith("C-GET: STUDY StudyInstanceUID=")


def test_logins_logouts_and_user_changes_are_recorded(make_server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    commands = (
        (["add", "alice", "--password-stdin"], "correct horse\n"),
        (["rights", "alice", "--role", "user"], None),
    )
    for args, stdin in commands:
        done = subprocess.run([MACPACS, "users", *args, "--data-dir", str(data)], input=stdin,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
    server = make_server(data_dir=data)
    base = f"http://127.0.0.1:{server.web_port}"
    wrong = requests.get(f"{base}/dicom-web/studies", auth=("alice", "wrong password"), timeout=10)
    assert wrong.status_code == 401
    browser = requests.Session()
    page = browser.get(f"{base}/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    form = {"username": "alice", "password": "correct horse", "csrf_token": token}
    assert browser.post(f"{base}/login", data=form, timeout=10).status_code == 200
    page = browser.get(f"{base}/studies", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    assert browser.post(f"{base}/logout", data={"csrf_token": token}, timeout=10).status_code == 200
    entries = [e for e in audit.read(data / "logs") if e]
    changes = [e["detail"] for e in entries if e["event"] == "user-change"]
    assert changes[0].startswith("added alice") and changes[1].startswith("rights of alice: user")
    logins = [(e["user"], e["outcome"]) for e in entries if e["event"] == "login"]
    assert logins == [("alice", "failure"), ("alice", "success")]
    assert [e["user"] for e in entries if e["event"] == "logout"] == ["alice"]
