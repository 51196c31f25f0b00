"""Fixtures of the scale-out tests, on the session's PostgreSQL cluster (``postgres``) and
SeaweedFS S3 gateway (``gateway``): ``shared``, a fresh database and bucket prefix that several
nodes use at once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, free_port
from tests.postgres import Cluster
from tests.s3gateway import Gateway


@dataclass
class Shared:
    """What every node of one test shares: an index database and a place in the object store."""

    index_url: str
    storage_url: str
    gateway: Gateway
    folder: Path

    def env(self) -> dict[str, str]:
        return {"MACPACS_STORAGE_URL": self.storage_url, **self.gateway.env()}

    def node(self, name: str, **env: str) -> ServerProcess:
        """A ``macpacs serve`` of its own data folder (staging, logs) on the shared index and store."""
        return ServerProcess(
            data_dir=self.folder / name,
            dicom_port=free_port(),
            web_port=free_port(),
            xmlrpc_port=free_port(),
            index_url=self.index_url,
            env={**self.env(), **env},
        )


def new_shared(postgres: Cluster, gateway: Gateway, folder: Path) -> Shared:
    """A fresh database of the session's cluster and an empty prefix of the gateway's bucket."""
    return Shared(
        index_url=postgres.new_database(),
        storage_url=f"s3://{gateway.bucket('scaleout')}/t-{uuid.uuid4().hex[:12]}",
        gateway=gateway,
        folder=folder,
    )


@pytest.fixture(scope="module")
def module_shared(postgres: Cluster, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    return new_shared(postgres, gateway, tmp_path_factory.mktemp("nodes"))


@pytest.fixture(scope="module")
def nodes(module_shared: Shared) -> Iterator[list[ServerProcess]]:
    """Two nodes, ``node-a`` and one left to its default name, on one database and one bucket,
    for a module's tests (starting them is most of their time). One DICOM process each
    (``dicom.workers = 1``): this machine has 2 cores."""
    started = [
        module_shared.node("a", MACPACS_SERVER_NODE_NAME="node-a", MACPACS_DICOM_WORKERS="1").start(),
        module_shared.node("b", MACPACS_DICOM_WORKERS="1").start(),
    ]
    yield started
    for server in started:
        server.stop()
