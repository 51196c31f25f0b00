"""Column types that compare alike on SQLite and PostgreSQL.

SQLite compares text byte by byte (its BINARY collation). PostgreSQL compares with the
database's collation, often a language's (``en_US.UTF-8``), where punctuation and case weigh
differently: the matcher's ranges (a time ``< "1015~"``, a wildcard's prefix range) and every
sort would then give other answers than on SQLite, and a b-tree index could not serve
``LIKE 'DOE%'``. Every string column of the index is therefore declared with the "C" collation on
PostgreSQL, whatever the database's own: both engines sort and match the same way.
"""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.types import TypeEngine


def byte_string(length: int) -> TypeEngine[str]:
    """``VARCHAR(length)``, compared byte by byte on both databases (``COLLATE "C"`` on PostgreSQL)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")
