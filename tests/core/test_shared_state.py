"""Users, API tokens, sessions, login throttling and DICOM nodes live in the index, on SQLite and on
PostgreSQL alike (issue 17): what one archive process writes, another one opened on the same
database sees at once, as a second server node would.
"""

from __future__ import annotations

import pytest

from macpacs.pacs_server.archive import Archive
from macpacs.pacs_server.nodes import Node
from macpacs.pacs_server.users import AuthFailed, Throttled
from tests.conftest import both_indexes

pytestmark = both_indexes


def test_users_tokens_and_sessions_are_shared(archive: Archive, other_archive: Archive) -> None:
    archive.users.add("alice", "alice password 1")
    assert other_archive.users.verify_password("alice", "alice password 1").username == "alice"
    token = archive.users.create_token("alice", "script")
    assert other_archive.users.verify_token(token).username == "alice"
    session = other_archive.users.sessions.start(archive.users.get("alice").pk, "10.0.0.1", 3600)
    assert archive.users.sessions.find(session, 600) is not None
    archive.users.set_password("alice", "alice password 2")  # ends her sessions everywhere
    assert other_archive.users.sessions.find(session, 600) is None
    archive.users.revoke_token("alice", other_archive.users.tokens("alice")[0][0])
    with pytest.raises(AuthFailed):
        other_archive.users.verify_token(token)


def test_login_throttling_counts_across_processes(archive: Archive, other_archive: Archive) -> None:
    for n in range(3):
        (archive if n % 2 else other_archive).users.rate_limit("register", "10.0.0.9", 3, 60, "registrations")
    with pytest.raises(Throttled):
        archive.users.rate_limit("register", "10.0.0.9", 3, 60, "registrations")


def test_nodes_are_shared(archive: Archive, other_archive: Archive) -> None:
    archive.nodes.add(Node(name="ws1", ae_title="WS1", host="10.0.0.5", port=104))
    assert other_archive.nodes.get("WS1").host == "10.0.0.5"
    other_archive.nodes.edit("ws1", port=11112)
    assert archive.nodes.get("ws1").port == 11112
