"""The background work of two server nodes on one PostgreSQL index: a stable study fires once,
on one node, whichever scans first; a firing interrupted by a stop is taken over by exactly one
node once it is old enough, and never while it is young (its node may still be running it)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from macpacs.pacs_server import stable
from macpacs.pacs_server.archive import Archive
from macpacs.pacs_server.index.stable_table import FIRED, FIRING
from macpacs.pacs_server.stable import StableWatcher
from macpacs.pacs_server.storage import stage_copy
from tests.synthetic import write_series

pytestmark = pytest.mark.parametrize("index_backend", ["postgresql"], indirect=True)


def store_study(archive: Archive, folder: Path) -> str:
    (path,) = write_series(folder, 1, size=16)
    archive.ingestor.ingest(stage_copy(archive.blobs, path), via="test")
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_stable_studies_fire_once_across_nodes(archive: Archive, other_archive: Archive, tmp_path: Path, monkeypatch):
    fired: list[tuple[str, str]] = []
    watchers = []
    for node, name in ((archive, "a"), (other_archive, "b")):
        watcher = StableWatcher(node)
        watcher.delay = 0.0
        monkeypatch.setattr(
            node.plugins, "stable", lambda study, name=name: fired.append((name, study.study_instance_uid))
        )
        watchers.append(watcher)
    first = store_study(archive, tmp_path / "first")
    time.sleep(0.01)
    assert sum(w.scan() for w in watchers) == 1 and [uid for _node, uid in fired] == [first]

    # Node A claims the next study's firing and stops before its hooks ran.
    second = store_study(other_archive, tmp_path / "second")
    time.sleep(0.01)
    ((uid, updated_at),) = watchers[0].table.due(time.time(), 0.0)
    assert uid == second and watchers[0].table.claim(uid, updated_at) == 1
    assert sum(w.scan() for w in watchers) == 0, "claimed: no node fires it again"
    # While young it is left alone: its node may be running the hooks right now ...
    assert sum(w.resume_interrupted() for w in watchers) == 0 and watchers[1].table.state(uid)["state"] == FIRING
    # ... and once older than the lease, one node takes it over.
    monkeypatch.setattr(stable, "FIRING_LEASE_S", 0.0)
    time.sleep(0.01)
    assert sum(w.resume_interrupted() for w in watchers) == 1
    assert [uid for _node, uid in fired] == [first, second]
    assert watchers[1].table.state(uid) | {"fired_at": 0} == {
        "study_uid": second, "seen_updated_at": updated_at, "generation": 1, "state": FIRED, "fired_at": 0
    }  # fmt: skip
