"""The one query matcher: a set of DICOM matching keys at a level → an SQL query over the index.

C-FIND, QIDO-RS, the XML-RPC ``DBWindowFind`` and the web study list all come through here,
so matching follows DICOM PS3.4 C.2.2.2 everywhere: single value, universal (empty or ``*``),
wildcards ``*`` and ``?``, date and time ranges, lists of UIDs. Ordering and paging are part
of the query too (the study list sorts by a column and pages; the others page in index order),
so no caller adds SQL to what ``build`` returns. Values are always bound parameters; no SQL is
built from text.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, false, func, not_, or_, select, true

from ..uids import RULE as UID_RULE
from ..uids import is_uid
from . import schema
from .attributes import BY_KEYWORD, LEVELS, UNIQUE_KEYS, Attr, level_index, normalize_pn

MAX_VALUE_LENGTH = 1024  # longer than any legal matching value; refuse rather than scan with it
MAX_UIDS_IN_LIST = 5000
# A list of UIDs (PS3.4 C.2.2.2.2: a C-MOVE of the images a workstation selected) is as long as
# its UIDs: up to 64 characters each, and a backslash between them.
MAX_UID_LIST_LENGTH = MAX_UIDS_IN_LIST * 65
ESCAPE = "!"

DATE_RE = re.compile(r"^\d{8}$")
TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
# Sorts after every character a stored value can hold: closes a prefix range.
_PREFIX_END = "\U0010ffff"


class QueryError(ValueError):
    """A matching key cannot be used (malformed range, bad UID, oversized value...)."""


@dataclass
class Query:
    """What to look for: ``keys`` maps a DICOM keyword to its matching value.

    An empty value (or ``None``) asks for the attribute to be returned without matching on it.
    ``order_by`` lists ``(keyword, descending)`` pairs; without it rows come in index order
    (the level's primary key: the order things were stored in, which paging relies on).
    """

    level: str
    keys: Mapping[str, str | None] = field(default_factory=dict)
    case_insensitive_names: bool = True
    limit: int | None = None
    offset: int = 0
    order_by: Sequence[tuple[str, bool]] = ()
    # An extra condition ANDed with ``keys``: the boolean form used by XML-RPC predicates.
    where: Expr | None = None


# -- boolean expressions ------------------------------------------------------------------------
# DICOM matching keys can only be ANDed; an OsiriX predicate (XML-RPC ``DBWindowFind``) also
# has OR, NOT, inequalities and substring tests. It arrives here as a tree of these nodes, and
# each leaf compiles to one SQL condition on the same columns, with bound parameters only.

_ORDER = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}
COMPARISONS = (*_ORDER, "like", "contains", "beginswith", "endswith")


@dataclass(frozen=True)
class Match:
    """One attribute compared with a literal.

    ``like`` takes ``*``/``?`` wildcards; ``contains``/``beginswith``/``endswith`` take the value
    literally. For a date attribute the value is ``YYYYMMDD`` or ``YYYYMMDDHHMMSS``, and
    ``time_keyword`` names the time attribute that completes it (StudyDate + StudyTime).
    """

    keyword: str
    op: str
    value: str | int | float
    case_insensitive: bool = False
    time_keyword: str | None = None


@dataclass(frozen=True)
class All:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


Expr = Match | All | AnyOf | Not


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    out = []
    for ch in value:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in ("%", "_", ESCAPE):
            out.append(ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def _wildcard_match(column: Any, value: str, *, indexed: bool = True) -> ColumnElement[bool]:
    """LIKE for a ``*``/``?`` value; on a plain column (``indexed``) also a range on its literal prefix.

    The range lets SQLite use the column's index (it would not for LIKE alone); PostgreSQL can use
    it too, as the columns compare byte by byte there as well (``column_types``). LIKE keeps it exact.
    """
    condition = column.like(like_pattern(value), escape=ESCAPE)
    prefix = re.split(r"[*?]", value, maxsplit=1)[0]
    if indexed and prefix:
        condition = and_(column >= prefix, column < prefix + _PREFIX_END, condition)
    return condition


def _range(column: Any, value: str, pattern: re.Pattern[str], what: str) -> ColumnElement[bool]:
    if value.count("-") > 1:
        raise QueryError(f"{what} range {value!r} has more than one '-'")
    low, sep, high = value.partition("-")
    for part in (low, high):
        if part and not pattern.match(part):
            raise QueryError(f"{what} value {part!r} is not valid (expected {_FORMATS[what]})")
    if not sep:
        if what == "time":
            return and_(column >= low, column < low + "~")
        return column == low
    if not low and not high:
        raise QueryError(f"{what} range {value!r} has no bounds")
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        # An upper bound covers its whole precision: 1200 includes 12:00:30.
        conditions.append(column < high + "~" if what == "time" else column <= high)
    return and_(*conditions)


_FORMATS = {"date": "YYYYMMDD or YYYYMMDD-YYYYMMDD", "time": "HHMMSS.FFFFFF, optionally a range"}


def condition_for(attr: Attr, value: str, table: Any, *, case_insensitive: bool) -> ColumnElement[bool] | None:
    """The SQL condition for one matching key, or None for universal matching."""
    limit = MAX_UID_LIST_LENGTH if attr.kind == "uid" else MAX_VALUE_LENGTH
    if len(value) > limit:
        raise QueryError(f"matching value for {attr.keyword} is {len(value)} characters long (limit {limit})")
    value = value.strip(" ")
    if value in ("", "*") or attr.kind == "count":
        return None
    column = table.c[attr.column]
    if attr.kind == "pn":
        if case_insensitive:
            column = table.c[attr.column + "_norm"]
            value = normalize_pn(value)
        return _wildcard_match(column, value) if has_wildcard(value) else column == value
    if attr.kind == "str":
        return _wildcard_match(column, value) if has_wildcard(value) else column == value
    if attr.kind == "uid":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if len(uids) > MAX_UIDS_IN_LIST:
            raise QueryError(f"{attr.keyword} lists {len(uids)} UIDs (limit {MAX_UIDS_IN_LIST})")
        for uid in uids:
            if not is_uid(uid):
                raise QueryError(f"{attr.keyword} {uid[:80]!r} is not a valid UID ({UID_RULE})")
        return column == uids[0] if len(uids) == 1 else column.in_(uids)
    if attr.kind == "date":
        return _range(column, value, DATE_RE, "date")
    if attr.kind == "time":
        return _range(column, value, TIME_RE, "time")
    if attr.kind == "int":
        try:
            return column == int(value)
        except ValueError:
            raise QueryError(f"{attr.keyword} {value!r} is not a number") from None
    if attr.kind == "multi":
        options = []
        for item in (v.strip() for v in value.split("\\")):
            if not item:
                continue
            if has_wildcard(item):
                raise QueryError(f"{attr.keyword} does not take wildcards")
            lit = like_pattern(item)
            options += [
                column == item,
                column.like(lit + "\\%", escape=ESCAPE),
                column.like("%\\" + lit, escape=ESCAPE),
                column.like("%\\" + lit + "\\%", escape=ESCAPE),
            ]
        return or_(*options) if options else None
    raise AssertionError(f"unknown attribute kind {attr.kind}")


def _literal_like(value: str) -> str:
    """A LIKE pattern matching ``value`` literally (no wildcard of its own)."""
    return "".join(ESCAPE + ch if ch in ("%", "_", ESCAPE) else ch for ch in value)


def _column_for(keyword: str, depth: int) -> tuple[Attr, Any]:
    attr = BY_KEYWORD.get(keyword)
    if attr is None:
        raise QueryError(f"{keyword} is not an attribute the index keeps")
    if level_index(attr.level) > depth:
        raise QueryError(f"{keyword} is a {attr.level.lower()}-level attribute; it cannot be matched here")
    return attr, schema.LEVEL_TABLES[attr.level].c[attr.column]


def _date_condition(match: Match, column: Any, depth: int) -> ColumnElement[bool]:
    value = str(match.value)
    if not re.fullmatch(r"\d{8}(\d{6})?", value):
        raise QueryError(f"{match.keyword} needs a date (YYYYMMDD or YYYYMMDDHHMMSS), not {value[:40]!r}")
    day, clock = value[:8], value[8:]
    if match.time_keyword is None or (clock == "000000" and match.op in ("ge", "lt")):
        clock = ""  # from midnight on / before midnight: the day alone decides
    if match.op not in ("eq", "ne", "lt", "le", "gt", "ge"):
        raise QueryError(f"{match.keyword} is a date: compare it with ==, !=, <, <=, > or >=")
    if not clock:
        cond = _ORDER[match.op](column, day) if match.op != "ne" else column == day
    elif match.op in ("eq", "ne"):
        _attr, time_col = _column_for(match.time_keyword or "", depth)
        cond = and_(column == day, time_col.like(clock + "%"))
    else:
        # Stored times have any precision (1015, 101500.25): "~" sorts after all of them.
        _attr, time_col = _column_for(match.time_keyword or "", depth)
        bound = clock + "~" if match.op in ("le", "gt") else clock
        day_op = operator.lt if match.op in ("lt", "le") else operator.gt
        cond = or_(day_op(column, day), and_(column == day, _ORDER[match.op](time_col, bound)))
    if match.op == "ne":
        return not_(cond)
    return and_(column != "", cond) if match.op in ("lt", "le") else cond


def _match_condition(match: Match, depth: int) -> ColumnElement[bool]:
    attr, column = _column_for(match.keyword, depth)
    if match.op not in COMPARISONS:
        raise QueryError(f"unknown comparison {match.op!r}")
    if isinstance(match.value, str) and len(match.value) > MAX_VALUE_LENGTH:
        raise QueryError(f"value for {attr.keyword} is {len(match.value)} characters long (limit {MAX_VALUE_LENGTH})")
    if attr.kind == "date":
        return _date_condition(match, column, depth)
    if attr.kind in ("int", "count"):
        if match.op not in ("eq", "ne", "lt", "le", "gt", "ge"):
            raise QueryError(f"{attr.keyword} is a number: compare it with ==, !=, <, <=, > or >=")
        try:
            number: int | float = float(match.value) if "." in str(match.value) else int(match.value)
        except ValueError:
            raise QueryError(f"{attr.keyword} {str(match.value)[:40]!r} is not a number") from None
        value: Any = number
    else:
        value = str(match.value)
        if match.case_insensitive and attr.kind == "pn":
            column, value = schema.LEVEL_TABLES[attr.level].c[attr.column + "_norm"], value.upper()
        elif match.case_insensitive:
            column, value = func.upper(column), value.upper()
        if attr.kind == "multi" and match.op in ("eq", "ne"):
            cond = condition_for(attr, value, schema.LEVEL_TABLES[attr.level], case_insensitive=False)
            cond = cond if cond is not None else column == ""
            return not_(cond) if match.op == "ne" else cond
    op = match.op
    if op == "like":
        return _wildcard_match(column, value, indexed=not match.case_insensitive)
    if op in ("contains", "beginswith", "endswith"):
        literal = _literal_like(value)
        pattern = {"contains": f"%{literal}%", "beginswith": f"{literal}%", "endswith": f"%{literal}"}[op]
        return column.like(pattern, escape=ESCAPE)
    return _ORDER[op](column, value)


def expression_condition(expr: Expr, depth: int) -> ColumnElement[bool]:
    """Compile a boolean expression into one SQL condition over the joined level tables."""
    if isinstance(expr, Match):
        return _match_condition(expr, depth)
    if isinstance(expr, All):
        return and_(true(), *(expression_condition(e, depth) for e in expr.items))
    if isinstance(expr, AnyOf):
        return or_(false(), *(expression_condition(e, depth) for e in expr.items))
    if isinstance(expr, Not):
        return not_(expression_condition(expr.item, depth))
    raise QueryError(f"unknown expression {expr!r}")


def build(query: Query) -> tuple[Select[Any], list[str]]:
    """Translate a Query into a SELECT and the list of keywords its rows carry.

    Keys of levels below the query level cannot be matched and are returned empty by callers;
    attributes the index does not keep are returned empty too (PS3.4 C.2.2.1.3 allows it).
    """
    if query.level not in LEVELS:
        raise QueryError(f"unknown query level {query.level!r} (use {', '.join(LEVELS)})")
    depth = level_index(query.level)
    tables = [schema.LEVEL_TABLES[level] for level in LEVELS[: depth + 1]]
    joined: Any = tables[0]
    for parent, child in itertools.pairwise(tables):
        joined = joined.join(child, child.c[_parent_fk(child)] == parent.c.pk)

    keywords: list[str] = []
    columns: list[Any] = []
    conditions: list[ColumnElement[bool]] = []
    wanted = set(query.keys) | {UNIQUE_KEYS[lvl] for lvl in LEVELS[: depth + 1]}
    for keyword, _descending in query.order_by:
        attr = BY_KEYWORD.get(keyword)
        if attr is None or level_index(attr.level) > depth:
            raise QueryError(f"cannot sort {query.level.lower()}-level results by {keyword[:40]!r}")
        wanted.add(keyword)
    for keyword in sorted(wanted):
        attr = BY_KEYWORD.get(keyword)
        if attr is None or level_index(attr.level) > depth:
            continue
        table = schema.LEVEL_TABLES[attr.level]
        keywords.append(keyword)
        columns.append(table.c[attr.column].label(keyword))
        value = query.keys.get(keyword)
        if value:
            cond = condition_for(attr, value, table, case_insensitive=query.case_insensitive_names)
            if cond is not None:
                conditions.append(cond)
    if query.where is not None:
        conditions.append(expression_condition(query.where, depth))
    charset_table = schema.study if depth >= 1 else schema.patient
    columns.append(charset_table.c.charset.label("_charset"))
    stmt = select(*columns).select_from(joined).where(*conditions)
    if query.order_by:
        by_label = stmt.selected_columns
        # Then index order among equals: pages of a sort with ties neither repeat nor skip a row
        # (PostgreSQL returns equal rows in any order, and may change it from one page to the next).
        sort = [by_label[k].desc() if desc else by_label[k].asc() for k, desc in query.order_by]
        stmt = stmt.order_by(*sort, tables[-1].c.pk)
    else:
        stmt = stmt.order_by(tables[-1].c.pk)
    if query.limit is not None:
        stmt = stmt.limit(query.limit)
    if query.offset:
        stmt = stmt.offset(query.offset)
    return stmt, keywords


def count_statement(query: Query) -> Select[Any]:
    """``SELECT count(*)`` over what ``query`` matches, ignoring its ordering and paging.

    It counts the joined rows straight (no subquery of the selected columns): the same plan
    the database uses for the page's matching, with nothing to sort.
    """
    stmt, _keywords = build(query)
    return stmt.with_only_columns(func.count()).order_by(None).limit(None).offset(None)


def _parent_fk(table: Any) -> str:
    return {"study": "patient_pk", "series": "study_pk", "instance": "series_pk"}[table.name]
