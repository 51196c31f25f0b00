"""The one UID check, for every protocol: ingest, query matching keys and web routes alike.

A UID is digits and dots, at most 64 characters (PS3.5 9.1). Anything else (``*``, a list, a
space, a backslash, ``../``) is refused where it enters, so that no such text ever reaches a
query or a storage key.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
RULE = f"digits and dots, at most {MAX_LENGTH} characters"


def is_uid(value: str) -> bool:
    """Whether ``value`` (already stripped of padding) is a UID by PS3.5's syntax."""
    return len(value) <= MAX_LENGTH and _UID.fullmatch(value) is not None
