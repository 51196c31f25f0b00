"""``INSERT … ON CONFLICT`` for the index's database: the one way its tables upsert.

SQLite and PostgreSQL spell it alike (``ON CONFLICT (…) DO NOTHING`` / ``DO UPDATE``), but
SQLAlchemy builds it from each dialect's own ``insert``; this picks the one for a connection.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite


def insert(table: Table, dialect_name: str) -> Any:
    """An INSERT into ``table`` that takes ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    return (postgresql.insert if dialect_name == "postgresql" else sqlite.insert)(table)
