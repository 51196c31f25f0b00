"""The ``hl7_message`` table: every HL7 message received, kept before it is acknowledged.

``plugins/hl7.py`` keeps the rules; the SQL is here. A message row and the changes the message
makes (worklist steps, patient rows) are committed in one transaction, before the ACK is sent:
a server that stops after the commit has applied the message, one that stops before it has not
acknowledged it (the sender sends it again). The row's unique key is the sender's (sending
application, sending facility, message control ID, MSH-3, MSH-4, MSH-10), so a message sent
twice is recognised and answered with the first answer, without being applied again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    select,
)

from . import db
from .column_types import byte_string
from .schema import metadata

hl7_message = Table(
    "hl7_message",
    metadata,
    Column("pk", Integer, primary_key=True),
    Column("sending_application", byte_string(227), nullable=False, default=""),
    Column("sending_facility", byte_string(227), nullable=False, default=""),
    Column("control_id", byte_string(199), nullable=True),  # NULL when the message had none we could read
    Column("message_type", byte_string(16), nullable=False, default=""),  # e.g. ORM^O01
    Column("message_time", byte_string(26), nullable=False, default=""),  # MSH-7
    Column("peer", byte_string(64), nullable=False, default=""),
    Column("received_at", Float, nullable=False),
    Column("ack_code", byte_string(2), nullable=False),  # AA, AE or AR: what we answered
    Column("ack_text", byte_string(1024), nullable=False, default=""),
    Column("raw", Text, nullable=False),
    UniqueConstraint("sending_application", "sending_facility", "control_id", name="uq_hl7_message_control_id"),
    Index("ix_hl7_message_received", "received_at"),
)


class DuplicateMessage(Exception):
    """This (sending application, facility, control ID) was received before: ``first`` is its row."""

    def __init__(self, first: Mapping[str, Any]) -> None:
        super().__init__(f"message control ID {first['control_id']!r} was received before")
        self.first = dict(first)


class Hl7Log:
    """The HL7 messages of one index."""

    def __init__(self, index: db.Index) -> None:
        self.index = index
        self.engine = index.engine

    def record(self, conn: Connection, entry: Mapping[str, Any]) -> None:
        """Add a message row inside the caller's transaction (``writing``); DuplicateMessage when seen before."""
        if entry.get("control_id") is not None:
            first = self._first(conn, entry)  # ``writing`` holds the write lock: no one inserts it meanwhile
            if first is not None:
                raise DuplicateMessage(first)
        conn.execute(_INSERT, {**entry, "received_at": time.time()})

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        t = hl7_message
        columns = [c for c in t.c if c.name != "raw"]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).order_by(t.c.pk.desc()).limit(limit)).mappings()
            return [dict(row) for row in rows]

    @staticmethod
    def _first(conn: Connection, entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
        keys = {"app": entry["sending_application"], "facility": entry["sending_facility"], "cid": entry["control_id"]}
        return conn.execute(_FIRST, keys).mappings().first()


# Built once: the intake runs these for every message.
_INSERT = hl7_message.insert()
_FIRST = select(hl7_message).where(
    hl7_message.c.sending_application == bindparam("app"),
    hl7_message.c.sending_facility == bindparam("facility"),
    hl7_message.c.control_id == bindparam("cid"),
)
