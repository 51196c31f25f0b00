"""The XML-RPC predicate parser (OsiriX ``DBWindowFind``) with generated and mutated predicates.

Text built from the grammar (comparisons, IN, BETWEEN, CAST to NSDate, nesting, modifiers), then
mutated, and plain random text: ``parse`` gives a tree or a ``PredicateError``; its translation to
the matcher and the query on a real index give rows or a ``PredicateError``/``QueryError``; and
each takes milliseconds, whatever the input (the parser's size and depth limits).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from macpacs.pacs_server.index import Query, QueryError
from macpacs.pacs_server.predicate import MAX_DEPTH, PredicateError, parse
from macpacs.pacs_server.xmlrpc import osirix

from .profiles import fuzz

KEYPATHS = [
    "name", "patientID", "date", "modality", "accessionNumber", "studyInstanceUID", "dateOfBirth",
    "study.name", "series.study.patientID", "seriesInstanceUID", "sopInstanceUID", "PatientID",
    "StudyDate", "NumberOfFrames", "#and", "foo", "foo.bar",
]  # fmt: skip
OPERATORS = ["==", "=", "!=", "<>", "<", "<=", "=<", ">", ">=", "=>", "LIKE", "CONTAINS", "BEGINSWITH", "ENDSWITH"]


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


constant = st.one_of(
    st.text(max_size=12).map(quoted),
    st.text(st.sampled_from("DOE*?%_!'\\"), max_size=8).map(lambda t: "'" + t.replace("'", "") + "'"),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**12), 10**12).map(lambda n: f'CAST({n}, "NSDate")'),
    st.from_regex(r"\A\d{4}-\d{2}-\d{2}( \d{2}:\d{2}:\d{2})?\Z").map(lambda d: f'CAST("{d}", "NSDate")'),
    st.sampled_from(["nil", "NULL", "YES", "NO", "TRUE", "FALSE", "$x", 'CAST(1, "NSString")']),
)
comparison = st.one_of(
    st.builds(
        lambda k, op, mod, c, flip: f"{c} {op}{mod} {k}" if flip else f"{k} {op}{mod} {c}",
        st.sampled_from(KEYPATHS),
        st.sampled_from(OPERATORS),
        st.sampled_from(["", "[c]", "[d]", "[cd]", "[x]"]),
        constant,
        st.booleans(),
    ),
    st.builds(lambda k, cs: f"{k} IN {{{', '.join(cs)}}}", st.sampled_from(KEYPATHS), st.lists(constant, max_size=4)),
    st.builds(lambda k, a, b: f"{k} BETWEEN {{{a}, {b}}}", st.sampled_from(KEYPATHS), constant, constant),
    st.sampled_from(["TRUEPREDICATE", "FALSEPREDICATE", "1 = 1", "name MATCHES 'x'", "ANY name == 'x'"]),
)
predicate = st.recursive(
    comparison,
    lambda inner: st.one_of(
        inner.map(lambda p: f"({p})"),
        inner.map(lambda p: f"NOT {p}"),
        inner.map(lambda p: f"!{p}"),
        st.tuples(inner, st.sampled_from([" AND ", " OR ", " && ", " || "]), inner).map("".join),
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(predicate)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # half of them as generated
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        text = text[:at] + draw(st.text(st.sampled_from("()\"'{},[]=<>!&|# \\.$"), max_size=3)) + text[at + cut :]
    return text


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory):
    from macpacs.pacs_server.archive import open_archive
    from macpacs.pacs_server.config import load
    from tests.synthetic import write_series

    root = tmp_path_factory.mktemp("fuzz-predicate")
    opened = open_archive(load(overrides={"storage": {"data_dir": str(root / "data")}}, environ={}))
    for path in write_series(root / "s", 3, size=4):
        assert opened.ingestor.ingest_file(path).ok
    yield opened
    opened.close()


def seen(what: str) -> None:
    """Counted in hypothesis' statistics (``--hypothesis-show-statistics``) when run by it."""
    if currently_in_test_context():
        event(what)


def run_predicate(archive, text: str) -> None:
    """What DBWindowFind does with a predicate, up to the rows (xmlrpc/methods.py)."""
    started = time.process_time()  # this process's CPU: another process's load does not count
    try:
        tree = parse(text)
    except PredicateError as exc:
        assert str(exc)
        seen("refused by the parser")
        return
    finally:
        spent = time.process_time() - started
        assert spent < 1.0, f"parsing took {spent:.2f} s of CPU"
    for entity in ("Study", "Series", "Image"):
        try:
            where = osirix.to_expression(entity, tree)
            query = Query(level=osirix.LEVEL_OF[entity], keys=dict.fromkeys(osirix.keywords(entity)), where=where)
            rows = archive.index.find_all(query)
        except (PredicateError, QueryError) as exc:
            assert str(exc)
            seen(f"{entity}: refused by the translation or the matcher")
            continue
        assert isinstance(rows, list)
        seen(f"{entity}: queried")


@fuzz(150)
@given(text=mutated())
def test_generated_predicates_give_rows_or_a_clear_error(archive, text: str) -> None:
    run_predicate(archive, text)


@fuzz(100)
@given(text=st.text(max_size=200))
def test_random_text_gives_a_clear_error(archive, text: str) -> None:
    run_predicate(archive, text)


@pytest.mark.parametrize(
    "text",
    [
        "(" * 100_000,
        "NOT " * (MAX_DEPTH + 5) + "name == 'x'",
        " AND ".join(["name == 'x'"] * 1000),
        '"' + "\\u" * 5000,
        "name == " + "9" * 10_000,
    ],
    ids=["parens", "nots", "comparisons", "escapes", "long-number"],
)
def test_hostile_predicates_are_refused_quickly(archive, text: str) -> None:
    run_predicate(archive, text)
