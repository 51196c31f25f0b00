"""The index: patient/study/series/instance tables over the file store, and the one query matcher."""

from .db import Index, InstanceRecord, StoredInstance
from .matcher import Query, QueryError

__all__ = ["Index", "InstanceRecord", "Query", "QueryError", "StoredInstance"]
