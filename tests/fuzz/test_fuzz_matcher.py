"""The one query matcher (C-FIND, QIDO-RS, XML-RPC, the study list) with generated matching keys.

Any level, any attribute, any value (wildcards, ranges, UID lists, odd text), any order and page:
the matcher answers rows or a ``QueryError``, nothing else, on a real SQLite and PostgreSQL index. And wildcard
matching of a plain attribute is what DICOM says it is (PS3.4 C.2.2.2.4), checked against a
regular expression over stored IDs full of SQL ``LIKE``'s own special characters.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from macpacs.pacs_server.index import Query, QueryError
from macpacs.pacs_server.index.attributes import ATTRIBUTES, LEVELS
from tests.conftest import BACKENDS, index_url_for
from tests.synthetic import write_series

from .profiles import fuzz

# Stored patient IDs: SQL LIKE's wildcards and our escape character, literally, and case pairs.
IDS = ["A", "AB", "ab", "A_B", "A%B", "A!B", "AAB", "B", "A*B", "A?B", "BA", "A!!"]
KEYWORDS = sorted(attr.keyword for attr in ATTRIBUTES)

# Values a matching key may hold: DICOM's wildcards and ranges, list separators, SQL's specials.
special = st.sampled_from(["*", "?", "-", "\\", "^", "=", "%", "_", "!", "'", '"', " ", ".", "\x00", "é", "中"])
value = st.one_of(
    st.none(),
    st.text(st.one_of(special, st.characters(codec="utf-8")), max_size=30),
    st.from_regex(r"\A\d{0,8}-?\d{0,8}\Z"),
    st.from_regex(r"\A[\d.]{1,20}(\\[\d.]{1,20}){0,3}\Z"),
    st.text(max_size=2).map(lambda s: s * 600),  # past the length limit
)


@pytest.fixture(scope="module", params=BACKENDS)
def archive(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load

    root = tmp_path_factory.mktemp("fuzz-matcher")
    overrides = {"storage": {"data_dir": str(root / "data")}, "index": {"url": index_url_for(request, request.param)}}
    opened = open_archive(load(overrides=overrides, environ={}))
    for n, pid in enumerate(IDS):
        for path in write_series(root / str(n), 2, size=4, patient_id=pid, patient_name=f"DOE^{pid}"):
            assert opened.ingestor.ingest_file(Path(path)).ok
    yield opened
    opened.close()


queries = st.builds(
    Query,
    level=st.sampled_from(LEVELS),
    keys=st.dictionaries(st.sampled_from(KEYWORDS), value, max_size=5),
    case_insensitive_names=st.booleans(),
    limit=st.one_of(st.none(), st.integers(0, 50)),
    offset=st.integers(0, 50),
    order_by=st.lists(st.tuples(st.sampled_from(KEYWORDS), st.booleans()), max_size=2),
)


@fuzz(120)
@given(query=queries)
def test_any_query_gives_rows_or_a_query_error(archive, query: Query) -> None:
    try:
        rows = archive.index.find_all(query)
        page, total = archive.index.page(query)
    except QueryError as exc:
        assert str(exc)
        event("refused")
        return
    event("answered")
    assert len(rows) <= (query.limit if query.limit is not None else len(rows))
    assert rows == page and total >= len(rows)


def dicom_wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


@fuzz(100)
@given(pattern=st.text(st.sampled_from("AaB*?_%!"), max_size=6))
def test_wildcards_match_as_dicom_says(archive, pattern: str) -> None:
    rows = archive.index.find_all(Query("PATIENT", {"PatientID": pattern}))
    found = {row["PatientID"] for row in rows}
    if pattern in ("", "*"):
        assert found == set(IDS)
    else:
        assert found == {pid for pid in IDS if dicom_wildcard(pattern).fullmatch(pid)}
