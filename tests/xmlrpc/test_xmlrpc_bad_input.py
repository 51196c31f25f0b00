"""Issue 14, finding 8 (XML-RPC): numbers out of range and text that is not Unicode are a 400 with
a message, never a 500 with a traceback in the log. Fixed cases first, then hypothesis: predicate
texts through the parser and the index in process (many), and through a real server (fewer).
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from macpacs.pacs_server.archive import Archive, open_archive
from macpacs.pacs_server.config import load
from macpacs.pacs_server.index import Query, QueryError
from macpacs.pacs_server.predicate import MAX_INTEGER, PredicateError, parse
from macpacs.pacs_server.xmlrpc import osirix
from tests.conftest import ServerProcess, store_studies

from .test_xmlrpc import call_body, post, start

STUDIES = [
    ("DOE^JOHN", "PID001", "20240115", "CT", "ACC001", "CT CHEST", 2),
    ("SMITH^ANNA", "PID003", "20231201", "CT", "ACC003", "CT ABDOMEN", 1),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("xmlrpc-bad-input")
    server = start(base)
    store_studies(server, base / "in", STUDIES)
    yield server
    server.stop()


def call(server: ServerProcess, request: str, table: str = "Study") -> tuple[int, str]:
    status, reason, _body = post(server, call_body("DBWindowFind", {"request": request, "table": table}))
    return status, reason


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ("numberOfImages > " + "9" * 5000, "is too long"),
        ("numberOfImages > " + "9" * 23, "out of range"),
        (f"numberOfImages > {MAX_INTEGER + 1}", "out of range"),
        (f"numberOfImages > -{MAX_INTEGER + 1}", "out of range"),
        ("numberOfImages > 1e400", "too large for a number"),
        ('numberOfImages > "99999999999999999999999"', "out of range"),
        ('numberOfImages > "1e400"', "too large for a number"),
        ('numberOfImages > "many"', "is not a number"),
        ("name == " + "1" * 5000, "is too long"),
        ("name == 1e400", "too large for a number"),
        (r'name == "\uD800"', "first half of a UTF-16 pair"),
        (r'name == "\uDC00"', "without its first half"),
        (r'name == "\uD800\u0041"', "first half of a UTF-16 pair"),
        ('date > CAST(1e300, "NSDate")', "not a usable date"),
        ('date > CAST(9223372036854775807, "NSDate")', "not a usable date"),
    ],
)
def test_bad_numbers_and_text_are_400(pacs: ServerProcess, request_: str, message: str) -> None:
    status, reason = call(pacs, request_)
    assert status == 400 and message in reason, reason
    assert "failed on the server" not in pacs.log()


def test_large_numbers_in_range_are_served(pacs: ServerProcess) -> None:
    for request in (f"numberOfImages < {MAX_INTEGER}", f"numberOfImages > -{MAX_INTEGER}", "numberOfImages < 1.5e300"):
        assert call(pacs, request)[0] == 200
    assert call(pacs, r'name == "\uD83D\uDE00"')[0] == 200  # a pair is one character


def test_oversized_xml_rpc_values_are_400_or_served(pacs: ServerProcess) -> None:
    def display(value: bytes) -> bytes:
        return (
            b"<methodCall><methodName>DisplayStudy</methodName><params><param><value><struct><member>"
            b"<name>PatientID</name><value>" + value + b"</value></member></struct></value></param></params>"
            b"</methodCall>"
        )

    status, reason, _ = post(pacs, display(b"<int>" + b"9" * 5000 + b"</int>"))
    assert status == 400 and "not a valid XML-RPC" in reason
    assert post(pacs, display(b"<int>" + b"9" * 30 + b"</int>"))[:2] == (200, "OK")  # digits matching nothing
    assert post(pacs, display(b"<double>1e400</double>"))[:2] == (200, "OK")


# -- generated predicates ---------------------------------------------------------------------------------

KEYS = ["name", "patientID", "numberOfImages", "date", "dateOfBirth", "modality", "id", "studyInstanceUID",
        "series.study.name", "study.patientID", "SeriesNumber", "instanceNumber", "nothing"]  # fmt: skip
OPS = ["==", "!=", "<", "<=", ">", ">=", "LIKE", "LIKE[c]", "CONTAINS", "BEGINSWITH[cd]", "ENDSWITH", "=", "<>"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # what XML can carry


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


VALUES = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=False).map(lambda f: repr(f).replace("inf", "1e400")),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    TEXT.map(_quoted),
    st.sampled_from(
        ["nil", "YES", "NO", '"2024-01-15"', '"\\uD800"', '"\\uDBFF\\uDFFF"', '"\\u00e9"', "TRUEPREDICATE"]
    ),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), TEXT.map(_quoted)).map(
        lambda v: f'CAST({v}, "NSDate")'
    ),
)
COMPARISON = st.builds(lambda k, o, v: f"{k} {o} {v}", st.sampled_from(KEYS), st.sampled_from(OPS), VALUES)
PREDICATES = st.recursive(
    COMPARISON,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} AND {b}", inner, inner),
        st.builds(lambda a, b: f"({a}) || ({b})", inner, inner),
        st.builds(lambda a: f"NOT ({a})", inner),
        st.builds(lambda k, vs: f"{k} IN {{{', '.join(vs)}}}", st.sampled_from(KEYS), st.lists(VALUES, max_size=4)),
    ),
    max_leaves=6,
)
ANY_TEXT = st.one_of(PREDICATES, TEXT, st.text(max_size=60))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    data = tmp_path_factory.mktemp("predicates") / "data"
    opened = open_archive(load(overrides={"storage": {"data_dir": str(Path(data))}}, environ={}))
    yield opened
    opened.close()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=ANY_TEXT, table=st.sampled_from(["Study", "Series", "Image"]))
def test_generated_predicates_in_process(archive: Archive, text: str, table: str) -> None:
    """Parser, translation and the index: a PredicateError or QueryError (a 400), nothing else."""
    try:
        where = osirix.to_expression(table, parse(text))
        archive.index.find_all(Query(level=osirix.LEVEL_OF[table], where=where, limit=5))
    except (PredicateError, QueryError):
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(PREDICATES, TEXT), table=st.sampled_from(["Study", "Series", "Image"]))
def test_generated_predicates_over_the_network(pacs: ServerProcess, text: str, table: str) -> None:
    """No 500 and no hang: every answer is 200 or a 400 with a message, within seconds."""
    started = time.monotonic()
    status, reason, body = post(pacs, call_body("DBWindowFind", {"request": text, "table": table}))
    assert time.monotonic() - started < 10
    assert status in (200, 400), (status, reason)
    if status == 400:
        (reply,), _ = xmlrpc.client.loads(body)
        assert reply["error"] == "400" and reply["message"]
