"""What the job-queue tests share: DCMTK storescp destinations that go down and come back, the
``macpacs`` CLI, ``/health``'s job counts, and waiting for a condition."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests

from macpacs.pacs_server.archive import Archive, open_archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.nodes import Node
from tests.conftest import MACPACS, ROOT, ServerProcess, dcmtk, free_port, wait_for_port


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """``check()``'s first truthy value, or AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(every)


def macpacs(server: ServerProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a ``macpacs`` command on the server's data folder (and config, if it has one)."""
    argv = [MACPACS, *args, "--data-dir", str(server.data_dir)]
    if "--config" in server.extra_args:
        argv += ["--config", server.extra_args[server.extra_args.index("--config") + 1]]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **server.env, **(env or {})}
    )


@contextmanager
def local_archive(server: ServerProcess) -> Iterator[Archive]:
    """The server's archive opened in this process too, as a CLI command opens it (no plugins):
    quicker than a ``macpacs`` command for the set-up and the polling of a test."""
    opened = open_archive(load(overrides={"storage": {"data_dir": str(server.data_dir)}}, environ={}))
    try:
        yield opened
    finally:
        opened.close()


def add_node(server: ServerProcess, name: str, port: int, ae_title: str | None = None) -> None:
    """Register a node (as `macpacs nodes add` does, through the same registry)."""
    with local_archive(server) as archive:
        archive.nodes.add(Node(name=name, ae_title=ae_title or name, host="127.0.0.1", port=port))


def jobs(server: ServerProcess, states: tuple[str, ...] = (), kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The server's jobs, newest first, as `macpacs jobs list --json` shows them."""
    with local_archive(server) as archive:
        return [job.as_json() for job in archive.jobs.list(states, kinds, limit=10_000)]


def health(server: ServerProcess) -> dict[str, Any]:
    return requests.get(f"http://127.0.0.1:{server.web_port}/health", timeout=10).json()


def job_counts(server: ServerProcess) -> dict[str, int]:
    return health(server)["jobs"]


@dataclass
class Storescp:
    """A DCMTK storescp that can be down (not started yet, or stopped) and come back on its port."""

    folder: Path
    ae_title: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        # +uf: a second copy of an instance gets a file of its own, so a repeat would show.
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "+xa", "+uf", "-od", str(self.folder), str(self.port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)  # type: ignore[arg-type]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file()) if self.folder.exists() else []

    def received(self) -> list[str]:
        """SOP Instance UIDs of every file received, repeats included."""
        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()]
