"""The OsiriX predicate parser and its translation into matcher expressions (no server needed)."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from macpacs.pacs_server.index.matcher import All, AnyOf, Match, Not
from macpacs.pacs_server.predicate import (
    MAX_COMPARISONS,
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    Comparison,
    Constant,
    DateValue,
    Or,
    PredicateError,
    nsdate,
    parse,
)
from macpacs.pacs_server.predicate import Not as PNot
from macpacs.pacs_server.xmlrpc.osirix import element, nsdate_text, resolve, table_name, to_expression

C = Comparison


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ('name == "DOE"', C("name", "==", "DOE")),
        ("name = 'DOE'", C("name", "==", "DOE")),
        ('patientID != "1"', C("patientID", "!=", "1")),
        ('patientID <> "1"', C("patientID", "!=", "1")),
        ('name LIKE "DOE*"', C("name", "LIKE", "DOE*")),
        ('name like[c] "doe*"', C("name", "LIKE", "doe*", True)),
        ('name LIKE[cd] "doe*"', C("name", "LIKE", "doe*", True)),
        ('name LIKE[d] "doe*"', C("name", "LIKE", "doe*", False)),
        ('name CONTAINS "OE"', C("name", "CONTAINS", "OE")),
        ('name BEGINSWITH[c] "d"', C("name", "BEGINSWITH", "d", True)),
        ('name ENDSWITH "N"', C("name", "ENDSWITH", "N")),
        ('name ==[c] "doe"', C("name", "==", "doe", True)),
        ("numberOfImages > 2", C("numberOfImages", ">", 2)),
        ("numberOfImages >= 2.5", C("numberOfImages", ">=", 2.5)),
        ("numberOfImages =< -1", C("numberOfImages", "<=", -1)),
        ("numberOfImages => 1", C("numberOfImages", ">=", 1)),
        ('"DOE" == name', C("name", "==", "DOE")),
        ("3 < numberOfImages", C("numberOfImages", ">", 3)),
        ("study.patientID == '7'", C("study.patientID", "==", "7")),
        ("#name == 'x'", C("name", "==", "x")),
        ("name == nil", C("name", "==", None)),
        ("name == NULL", C("name", "==", None)),
        (r'name == "say \"hi\""', C("name", "==", 'say "hi"')),
        (r"name == 'it\'s'", C("name", "==", "it's")),
        (r'name == "a\\b"', C("name", "==", "a\\b")),
        (r'name == "\u00e9t\u00e9"', C("name", "==", "été")),
        ('name == "tab\\there"', C("name", "==", "tab\there")),
        ('name == "DOE" AND patientID == "1"', And((C("name", "==", "DOE"), C("patientID", "==", "1")))),
        ('name == "DOE" && patientID == "1"', And((C("name", "==", "DOE"), C("patientID", "==", "1")))),
        ('name == "A" OR name == "B"', Or((C("name", "==", "A"), C("name", "==", "B")))),
        ('name == "A" || name == "B"', Or((C("name", "==", "A"), C("name", "==", "B")))),
        ('NOT name == "A"', PNot(C("name", "==", "A"))),
        ('!name == "A"', PNot(C("name", "==", "A"))),
        ('not (name == "A")', PNot(C("name", "==", "A"))),
        ("TRUEPREDICATE", Constant(True)),
        ("falsepredicate", Constant(False)),
        ('modality IN {"CT", "MR"}', Or((C("modality", "==", "CT"), C("modality", "==", "MR")))),
        ("id BETWEEN {1, 5}", And((C("id", ">=", 1), C("id", "<=", 5)))),
    ],
)
def test_parses(text: str, tree: object) -> None:
    assert parse(text) == tree


def test_precedence_and_binds_tighter_than_or() -> None:
    a, b, c = (C(k, "==", "1") for k in "abc")
    assert parse('a == "1" OR b == "1" AND c == "1"') == Or((a, And((b, c))))
    assert parse('(a == "1" OR b == "1") AND c == "1"') == And((Or((a, b)), c))
    assert parse('NOT a == "1" AND b == "1"') == And((PNot(a), b))


def test_keywords_are_case_insensitive_but_key_paths_are_not() -> None:
    assert parse('Name like "x" and patientID == "1"') == And((C("Name", "LIKE", "x"), C("patientID", "==", "1")))


def test_cast_dates() -> None:
    number = parse('date >= CAST(726710400.0, "NSDate")')
    assert isinstance(number, Comparison) and isinstance(number.value, DateValue)
    assert number.value.has_time
    assert number.value.when == nsdate(726710400.0).when
    text = parse('date < CAST("2024-01-15 10:00:00 +0000", "NSDate")')
    assert isinstance(text, Comparison) and isinstance(text.value, DateValue)
    assert text.value.when.astimezone().utcoffset() is not None
    day = parse('date > CAST("2024-01-15", "NSDate")')
    assert isinstance(day, Comparison) and day.value == DateValue(datetime(2024, 1, 15), has_time=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name == "x" OR 1=1', "two constants (1 = 1)"),
        ("1 = 1", "two constants"),
        ("'a' == 'a'", "two constants"),
        ("name == patientID", "two attributes"),
        ('"x" LIKE name', "on the left"),
        ('name == "x', "never closed"),
        ("name == 'x\" OR 1=1", "never closed"),
        ('name == "x" OR', "found the end"),
        ('name == "x" garbage', "expected AND, OR"),
        ('name "x"', "comparison operator"),
        ("name ==", "found the end"),
        ("(name == 'x'", "')'"),
        ("name == 'x')", "expected AND, OR"),
        ("", "empty"),
        ("   ", "empty"),
        ('name MATCHES ".*"', "MATCHES"),
        ('ANY series.modality == "CT"', "not supported"),
        ("name == $NAME", "$variables"),
        ('name == "x"; DROP TABLE study', "unexpected ';'"),
        ('name == "x" -- comment', "unexpected"),
        ('name LIKE[q] "x"', "unknown modifier"),
        ('date > CAST("tomorrow", "NSDate")', "not a date"),
        ('date > CAST(1, "NSString")', "NSDate"),
        ('name == "\\u12"', "four hexadecimal"),
        ("name == `x`", "unexpected"),
        ("id IN {}", "a value"),
        ("id BETWEEN {1}", "exactly two"),
        ("id BETWEEN {1, 2, 3}", "exactly two"),
        ("name = = 'x'", "a value"),
        ("SUBQUERY(series, $s, $s.modality == 'CT').@count > 0", "$variables"),
    ],
)
def test_refuses(text: str, message: str) -> None:
    with pytest.raises(PredicateError, match=re.escape(message)):
        parse(text)


def test_error_names_the_position() -> None:
    with pytest.raises(PredicateError, match="at character 16"):
        parse('name == "x" OR 1=1 AND')


def test_limits_are_cheap() -> None:
    started = time.monotonic()
    with pytest.raises(PredicateError, match="characters long"):
        parse('name == "' + "x" * MAX_LENGTH + '"')
    with pytest.raises(PredicateError, match="levels deep"):
        parse("(" * (MAX_DEPTH + 1) + "name == 'x'" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(PredicateError, match="levels deep"):
        parse("NOT " * (MAX_DEPTH + 1) + "name == 'x'")
    with pytest.raises(PredicateError, match="comparisons"):
        parse(" OR ".join(["name == 'x'"] * (MAX_COMPARISONS + 1)))
    with pytest.raises(PredicateError, match="tokens"):
        parse("((((" * 1000)
    assert time.monotonic() - started < 5  # generous: the point is no blow-up


def test_within_limits_is_accepted() -> None:
    parse("(" * MAX_DEPTH + "name == 'x'" + ")" * MAX_DEPTH)
    parse(" OR ".join(["name == 'x'"] * MAX_COMPARISONS))


# -- translation onto the matcher -------------------------------------------------------------


def test_table_names() -> None:
    assert table_name("study") == "Study" and table_name("SERIES") == "Series" and table_name("Image") == "Image"
    with pytest.raises(PredicateError, match="not one of Study"):
        table_name("Patient; DROP")


@pytest.mark.parametrize(
    ("entity", "key", "keyword"),
    [
        ("Study", "name", "PatientName"),
        ("Study", "patientID", "PatientID"),
        ("Study", "studyInstanceUID", "StudyInstanceUID"),
        ("Study", "accessionNumber", "AccessionNumber"),
        ("Study", "studyName", "StudyDescription"),
        ("Study", "modality", "ModalitiesInStudy"),
        ("Study", "StudyDescription", "StudyDescription"),
        ("Series", "name", "SeriesDescription"),
        ("Series", "seriesDICOMUID", "SeriesInstanceUID"),
        ("Series", "seriesInstanceUID", "SeriesInstanceUID"),
        ("Series", "study.patientID", "PatientID"),
        ("Series", "study.name", "PatientName"),
        ("Image", "sopInstanceUID", "SOPInstanceUID"),
        ("Image", "series.seriesDICOMUID", "SeriesInstanceUID"),
        ("Image", "series.study.studyInstanceUID", "StudyInstanceUID"),
        ("Image", "SOPClassUID", "SOPClassUID"),
    ],
)
def test_resolve(entity: str, key: str, keyword: str) -> None:
    assert resolve(entity, key)[0] == keyword


@pytest.mark.parametrize(
    ("entity", "key"),
    [("Study", "sopInstanceUID"), ("Study", "SeriesInstanceUID"), ("Study", "series.modality"), ("Series", "pk")],
)
def test_resolve_refuses(entity: str, key: str) -> None:
    with pytest.raises(PredicateError, match="not an attribute"):
        resolve(entity, key)


def test_to_expression() -> None:
    tree = parse('(name LIKE[c] "doe*" OR patientID == "1") AND NOT modality == "CT" AND TRUEPREDICATE')
    assert to_expression("Study", tree) == All(
        (
            AnyOf((Match("PatientName", "like", "doe*", True), Match("PatientID", "eq", "1"))),
            Not(Match("ModalitiesInStudy", "eq", "CT")),
            All(()),
        )
    )
    assert to_expression("Study", parse('date >= "2024-01-15"')) == Match(
        "StudyDate", "ge", "20240115", time_keyword="StudyTime"
    )
    assert to_expression("Study", parse('dateOfBirth < "1970-01-02"')) == Match("PatientBirthDate", "lt", "19700102")
    assert to_expression("Study", parse("name == nil")) == Match("PatientName", "eq", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("date > 5", "is a date"),
        ("name > CAST(0, 'NSDate')", "not a date"),
        ("name == YES", "YES/NO"),
        ("numberOfImages == nil", "nil"),
        ("date == 'soon'", "not a date"),
    ],
)
def test_to_expression_refuses(text: str, message: str) -> None:
    with pytest.raises(PredicateError, match=message):
        to_expression("Study", parse(text))


def test_elements_use_osirix_names_and_strings() -> None:
    row = {
        "PatientName": "DOE^JOHN",
        "PatientID": "1",
        "StudyDate": "20240115",
        "StudyTime": "101500.25",
        "NumberOfStudyRelatedInstances": 3,
        "AccessionNumber": "",
        "PatientBirthDate": "",
    }
    out = element("Study", row)
    assert out["name"] == "DOE^JOHN" and out["numberOfImages"] == "3"
    assert out["date"] == nsdate_text("20240115", "101500")
    assert "accessionNumber" not in out and "dateOfBirth" not in out
    assert all(isinstance(v, str) for v in out.values())


def test_elements_carry_only_characters_xml_can() -> None:
    out = element("Study", {"PatientName": "DOE\x01^JO\x1bHN", "StudyDescription": "tab\tok"})
    assert out == {"name": "DOE\ufffd^JO\ufffdHN", "studyName": "tab\tok"}
