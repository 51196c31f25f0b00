"""A plugin's list of tables in the config file (``[[plugins.routing.rules]]``, ``[[plugins.webhooks.targets]]``):
one way to read it, check each table's keys, and log the tables that cannot be understood.

A table that cannot be understood is skipped with a line that names it (its number and name)
and what to change; the others still work, so one typo does not stop a site's routing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TableError(ValueError):
    """One table is malformed; the message names it and what to change."""


def opening(number: int, raw: Any, *, noun: str, section: str, known: Collection[str]) -> tuple[str, str]:
    """The name of table ``number`` (``name``, else "<noun> <number>") and how to name it in a message,
    once it is known to be a table with only ``known`` keys; TableError otherwise."""
    if not isinstance(raw, Mapping):
        raise TableError(f"{noun} {number} must be a table ([[{section}]])")
    name = str(raw.get("name") or f"{noun.split()[-1]} {number}")
    where = f"{noun} {number} ({name!r})"
    unknown = set(raw) - set(known)
    if unknown:
        raise TableError(f"{where}: unknown setting {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return name, where


def load(
    options: Mapping[str, Any], key: str, *, section: str, parse: Callable[[int, Any], T], report: bool, skipped: str
) -> list[T]:
    """The tables of ``options[key]`` that ``parse`` understands, in order. The others, and a value
    that is not a list of tables, are logged as errors when ``report`` (the server process says it
    once, not each DICOM worker again); ``skipped`` says what becomes of a skipped table."""
    say = log.error if report else log.debug
    raw_tables = options.get(key, [])
    if not isinstance(raw_tables, list):
        say("%s must be a list of tables ([[%s]]); none is used", section, section)
        return []
    found = []
    for number, raw in enumerate(raw_tables, 1):
        try:
            found.append(parse(number, raw))
        except TableError as exc:
            say("%s; %s until the configuration is fixed and the server restarted", exc, skipped)
    return found
