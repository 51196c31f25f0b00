"""The index: patient/study/series/instance tables over the file store, and the one query matcher."""

from .db import Index, IndexUnavailable, IndexUnreadable, InstanceRecord, StoredInstance, Transaction
from .matcher import Query, QueryError
from .writer_lock import WriterLockTimeout

__all__ = [
    "Index",
    "IndexUnavailable",
    "IndexUnreadable",
    "InstanceRecord",
    "Query",
    "QueryError",
    "StoredInstance",
    "Transaction",
    "WriterLockTimeout",
]
