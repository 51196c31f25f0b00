"""The webhooks plugin (issue 16): a real HTTP receiver that fails twice, then succeeds.

A study stored with DCMTK storescu becomes stable; its webhook is POSTed to an ``http.server`` in
the test, which answers 500 twice and then 200. The job queue retries the same body with the same
delivery id; the HMAC-SHA256 signature verifies with the secret; the body carries the patient, the
study with its series counts and URLs that work. A second target takes every stored instance.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import requests

from macpacs.pacs_server.plugins.webhooks import parse_target
from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import write_series

from .jobs_helpers import macpacs, wait_until

SECRET = "s3cret-for-the-ris-0123456789"


class Receiver:
    """An HTTP endpoint that records every request and fails the first ``failures`` at /hook."""

    def __init__(self, failures: int) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hooks = [r for r in receiver.requests if r[0] == "/hook"]
                status = 500 if self.path == "/hook" and len(hooks) < receiver.failures else 200
                receiver.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[tuple[str, dict[str, str], bytes, int]]:
        return [r for r in self.requests if r[0] == path]


def test_a_webhook_that_fails_twice_is_delivered_signed_on_the_third_attempt(tmp_path: Path) -> None:
    receiver = Receiver(failures=2)
    secret_file = tmp_path / "ris.secret"
    secret_file.write_text(SECRET + "\n")
    config = tmp_path / "macpacs.toml"
    web_port = free_port()
    config.write_text(
        f"""
[storage]
stable_after = 1.0

[web]
public_url = "http://127.0.0.1:{web_port}"

[jobs]
retry_base_s = 0.3
retry_max_s = 1.0

[plugins]
enable = ["webhooks"]

[[plugins.webhooks.targets]]
name = "ris"
url = "http://127.0.0.1:{receiver.port}/hook"
secret_file = "{secret_file}"

[[plugins.webhooks.targets]]
name = "every-instance"
url = "http://127.0.0.1:{receiver.port}/stored"
events = ["instance_stored"]
secret = "{SECRET}"
"""
    )
    files = write_series(tmp_path / "ct", 3, size=16, patient_id="PID77", patient_name="DOE^JANE")
    server = ServerProcess(tmp_path / "data", free_port(), web_port, free_port(), extra_args=["--config", str(config)])
    server.start()
    try:
        _deliveries(server, receiver, files, web_port)
    finally:
        server.stop()
        receiver.server.shutdown()


def _deliveries(server: ServerProcess, receiver: Receiver, files: list[Path], web_port: int) -> None:
    run_tool("storescu", *server.dicom_args(), *map(str, files))

    hooks = wait_until(
        "the third POST of the stable study", lambda: len(receiver.at("/hook")) >= 3 and receiver.at("/hook")
    )
    assert [status for *_rest, status in hooks] == [500, 500, 200]
    bodies = {body for _path, _headers, body, _status in hooks}
    assert len(bodies) == 1, "every retry sends the same body"
    deliveries = {headers["X-Macpacs-Delivery"] for _path, headers, _body, _status in hooks}
    assert len(deliveries) == 1, "and the same delivery id, so that a receiver can drop a repeat"
    (body,) = bodies
    for _path, headers, _body, _status in hooks:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Macpacs-Signature"], expected)
        assert headers["X-Macpacs-Event"] == "study_stable"
    event = json.loads(body)
    study_uid = event["study"]["uid"]
    assert event["event"] == "study_stable" and event["patient"] == {"id": "PID77", "name": "DOE^JANE"}
    assert event["study"]["series_count"] == 1 and event["study"]["instance_count"] == 3
    assert event["study"]["modalities"] == ["CT"] and event["study"]["generation"] == 1
    assert [s["instance_count"] for s in event["series"]] == [3]
    dicomweb = event["study"]["urls"]["dicomweb"]
    assert dicomweb == f"http://127.0.0.1:{web_port}/dicom-web/studies/{study_uid}"
    assert requests.get(dicomweb + "/series", timeout=10).json()[0]["00201209"]["Value"] == [3]

    stored = wait_until("one instance_stored POST per instance", lambda: len(receiver.at("/stored")) >= 3)
    events = [json.loads(body) for _path, _headers, body, _status in receiver.at("/stored")]
    assert sorted(e["instance"]["sop_instance_uid"] for e in events) == sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files
    )
    assert {e["instance"]["via"] for e in events} == {"c-store"} and all(
        len(e["instance"]["sha256"]) == 64 for e in events
    )
    assert stored
    listed = macpacs(server, "jobs", "list", "--kind", "webhook", "--json")
    jobs = json.loads(listed.stdout)
    ris = [job for job in jobs if job["description"] == "study_stable to webhook ris"]
    assert len(ris) == 1 and ris[0]["state"] == "done" and ris[0]["attempts"] == 3
    assert ris[0]["message"].startswith("delivered to ris: HTTP 200")
    assert server.logged("webhook job(s) failed (job ")


def test_a_target_without_a_secret_is_refused() -> None:
    try:
        parse_target(1, {"name": "open", "url": "http://127.0.0.1:9/x"})
    except ValueError as exc:
        assert "give it a secret of at least 16 characters" in str(exc)
    else:
        raise AssertionError("a target without a secret was accepted")
    try:
        parse_target(2, {"url": "file:///etc/passwd", "secret": SECRET})
    except ValueError as exc:
        assert "must be an http:// or https:// address" in str(exc)
    else:
        raise AssertionError("a file: URL was accepted")
