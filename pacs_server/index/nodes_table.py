"""The ``node`` table: reads and writes of the DICOM nodes registry (``pacs_server.nodes``).

The registry keeps the rules (validation, access control); this module keeps the SQL, so that
no statement is written outside the index. Rows go in and out as plain dictionaries of the
table's columns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from .db import Index
from .schema import node

# The columns that must be unique, in the order a clash is reported.
UNIQUE_COLUMNS = ("name", "ae_title")


class DuplicateNode(Exception):
    """A name or AE title is taken: ``column`` and ``value`` say which, ``other`` by which node.

    ``column`` is None when a concurrent writer won the race and the database's unique
    constraint, not the check before it, refused the row.
    """

    def __init__(self, column: str | None, value: str, other: str | None) -> None:
        super().__init__(f"{column or 'name or AE title'} {value!r} is already used by node {other!r}")
        self.column, self.value, self.other = column, value, other


class NodeTable:
    """The ``node`` rows of one index; every call is one short transaction."""

    def __init__(self, index: Index) -> None:
        self.engine = index.engine

    def all(self) -> list[dict[str, Any]]:
        """Every node row, by name."""
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(select(node).order_by(node.c.name)).mappings()]

    def by(self, column: str, value: str) -> dict[str, Any] | None:
        """The row whose ``column`` (``name`` or ``ae_title``) equals ``value``, or None."""
        if column not in UNIQUE_COLUMNS:
            raise ValueError(f"nodes are looked up by {' or '.join(UNIQUE_COLUMNS)}, not {column!r}")
        with self.engine.connect() as conn:
            row = conn.execute(select(node).where(node.c[column] == value)).mappings().first()
        return dict(row) if row else None

    def insert(self, values: Mapping[str, Any]) -> None:
        """Add a row; DuplicateNode when its name or AE title is taken."""
        try:
            with self.engine.begin() as conn:
                _check_unique(conn, values, exclude=None)
                conn.execute(insert(node).values(**values, created_at=time.time()))
        except IntegrityError as exc:  # a concurrent writer was first
            raise DuplicateNode(None, values["name"], None) from exc

    def update(self, name: str, values: Mapping[str, Any]) -> None:
        """Change the row called ``name``; DuplicateNode when the new name or AE title is taken."""
        try:
            with self.engine.begin() as conn:
                _check_unique(conn, values, exclude=name)
                conn.execute(update(node).where(node.c.name == name).values(**values))
        except IntegrityError as exc:
            raise DuplicateNode(None, values["name"], None) from exc

    def delete(self, name: str) -> bool:
        """Remove the row called ``name``; False when there was none."""
        with self.engine.begin() as conn:
            return conn.execute(delete(node).where(node.c.name == name)).rowcount > 0


def _check_unique(conn: Connection, values: Mapping[str, Any], exclude: str | None) -> None:
    """Name the node that already holds this name or AE title (a clearer refusal than the constraint's)."""
    for column in UNIQUE_COLUMNS:
        stmt = select(node.c.name).where(node.c[column] == values[column])
        if exclude is not None:
            stmt = stmt.where(node.c.name != exclude)
        other = conn.execute(stmt).scalar()
        if other is not None:
            raise DuplicateNode(column, values[column], other)
