"""A safe parser for the subset of Apple's predicate format that OsiriX XML-RPC clients send.

``DBWindowFind`` takes a predicate string such as ``name LIKE[c] "DOE*" AND date >= CAST(
726710400, "NSDate")``. OsiriX hands it to ``NSPredicate predicateWithFormat:``; we tokenize and
parse it ourselves (recursive descent, no ``eval``, no SQL text) into a small tree that
``pacs_server.xmlrpc`` maps onto the one query matcher. Anything outside the subset is refused
with a message naming the position, and size, token, depth and comparison limits keep hostile
input from costing more than a few milliseconds.

Grammar (keywords are case-insensitive)::

    predicate  := or
    or         := and (("OR" | "||") and)*
    and        := not (("AND" | "&&") not)*
    not        := ("NOT" | "!") not | primary
    primary    := "(" predicate ")" | "TRUEPREDICATE" | "FALSEPREDICATE" | comparison
    comparison := operand operator modifier? operand
                | keypath "IN" "{" constant ("," constant)* "}"
                | keypath "BETWEEN" "{" constant "," constant "}"
    operator   := "==" | "=" | "!=" | "<>" | "<" | "<=" | "=<" | ">" | ">=" | "=>"
                | "LIKE" | "CONTAINS" | "BEGINSWITH" | "ENDSWITH"
    modifier   := "[c]" | "[d]" | "[cd]"
    operand    := keypath | constant
    constant   := string | number | "CAST" "(" (string | number) "," string ")" | "nil" | "NULL"
                | "YES" | "NO" | "TRUE" | "FALSE"
    keypath    := identifier ("." identifier)*      ("#" before a reserved word escapes it)

A comparison needs exactly one key path and one constant (``1 = 1`` is refused).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MAX_LENGTH = 16_384  # characters of predicate text
MAX_TOKENS = 2_000
MAX_DEPTH = 32  # nested parentheses / NOT
MAX_COMPARISONS = 200
# Numbers the index can compare with: whole numbers fit SQLite's (and PostgreSQL's) 64-bit
# integers, and others must be finite; anything larger is refused here, not by the database.
MAX_INTEGER = 2**63 - 1
MAX_NUMBER_LENGTH = 40  # characters of one number: more precision than a double holds

# NSDate's reference date: CAST(<seconds>, "NSDate") counts from here.
NSDATE_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)

KEYWORDS = {
    "AND", "OR", "NOT", "LIKE", "CONTAINS", "BEGINSWITH", "ENDSWITH", "IN", "BETWEEN", "MATCHES",
    "TRUEPREDICATE", "FALSEPREDICATE", "CAST", "NIL", "NULL", "YES", "NO", "TRUE", "FALSE",
    "ANY", "ALL", "SOME", "NONE", "UTI-CONFORMS-TO", "UTI-EQUALS",
}  # fmt: skip
STRING_OPERATORS = ("LIKE", "CONTAINS", "BEGINSWITH", "ENDSWITH")
SYMBOL_OPERATORS = {
    "==": "==", "=": "==", "!=": "!=", "<>": "!=",
    "<": "<", "<=": "<=", "=<": "<=", ">": ">", ">=": ">=", "=>": ">=",
}  # fmt: skip
MIRRORED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class PredicateError(ValueError):
    """The predicate is malformed or outside the supported subset; the message says where."""


@dataclass(frozen=True)
class DateValue:
    """A date constant: ``when`` is naive local time; ``has_time`` is False for a bare day."""

    when: datetime
    has_time: bool


Value = str | int | float | bool | DateValue | None


@dataclass(frozen=True)
class Comparison:
    key: str  # key path, e.g. "name" or "study.patientID"
    op: str  # ==, !=, <, <=, >, >=, LIKE, CONTAINS, BEGINSWITH, ENDSWITH
    value: Value
    case_insensitive: bool = False


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


@dataclass(frozen=True)
class Constant:
    value: bool  # TRUEPREDICATE / FALSEPREDICATE


Node = Comparison | And | Or | Not | Constant


@dataclass(frozen=True)
class Token:
    kind: str  # string number ident keyword op modifier ( ) { } , end
    text: str
    pos: int
    value: Value = None


_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>"""
    + _NUMBER
    + r""")
  | (?P<ident>\#?[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<modifier>\[[A-Za-z]{1,3}\])
  | (?P<op>==|!=|<>|<=|=<|>=|=>|&&|\|\||[=<>!])
  | (?P<punct>[(){},])
  | (?P<quote>["'])
  | (?P<variable>\$)
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``start``; returns its value and the index after it."""
    quote, out, i = text[start], [], start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= len(text):
                break
            nxt = text[i + 1]
            if nxt == "u":
                code, i = _unicode_escape(text, i)
                out.append(chr(code))
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    raise PredicateError(f"at character {start + 1}: string opened here is never closed (missing {quote})")


def _hex4(text: str, i: int) -> int | None:
    digits = text[i + 2 : i + 6]
    return int(digits, 16) if text[i : i + 2] == "\\u" and re.fullmatch(r"[0-9A-Fa-f]{4}", digits) else None


def _unicode_escape(text: str, i: int) -> tuple[int, int]:
    """The character of the ``\\uXXXX`` escape at ``i`` (a UTF-16 pair taken together) and the
    index after it. A lone half of a pair is no character at all: it could not be stored or
    compared, so it is refused."""
    code = _hex4(text, i)
    if code is None:
        raise PredicateError(f"at character {i + 1}: \\u needs four hexadecimal digits")
    if 0xDC00 <= code <= 0xDFFF:
        raise PredicateError(f"at character {i + 1}: \\u{code:04X} is half of a UTF-16 pair without its first half")
    if 0xD800 <= code <= 0xDBFF:
        low = _hex4(text, i + 6)
        if low is None or not 0xDC00 <= low <= 0xDFFF:
            raise PredicateError(
                f"at character {i + 1}: \\u{code:04X} is the first half of a UTF-16 pair; "
                "follow it with the second half (\\uDC00 to \\uDFFF)"
            )
        return 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00), i + 12
    return code, i + 6


def number(word: str, pos: int | None = None) -> int | float:
    """``word`` (a number token at ``pos``, or a quoted value compared with a numeric attribute)
    as a number the index can compare with; PredicateError when it is none, or too large."""
    where = "" if pos is None else f"at character {pos + 1}: "
    if not _NUMBER_RE.fullmatch(word):
        raise PredicateError(f"{where}{word[:40]!r} is not a number")
    if len(word) > MAX_NUMBER_LENGTH:
        raise PredicateError(f"{where}number {word[:20]}... is too long (limit {MAX_NUMBER_LENGTH} characters)")
    if not any(c in word for c in ".eE"):
        value = int(word)
        if abs(value) > MAX_INTEGER:
            raise PredicateError(f"{where}{word} is out of range (at most {MAX_INTEGER})")
        return value
    real = float(word)
    if not math.isfinite(real):
        raise PredicateError(f"{where}{word} is too large for a number")
    return real


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise PredicateError(f"predicate is {len(text)} characters long (limit {MAX_LENGTH})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PredicateError(
            f"at character {exc.start + 1}: the predicate is not valid Unicode text (a lone UTF-16 surrogate)"
        ) from None
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise PredicateError(f"at character {pos + 1}: unexpected {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind == "space":
            pos = m.end()
            continue
        if kind == "quote":
            value, end = _read_string(text, pos)
            tokens.append(Token("string", text[pos:end], pos, value))
            pos = end
        elif kind == "variable":
            raise PredicateError(f"at character {pos + 1}: $variables are not supported; put the value in the text")
        else:
            word = m.group()
            if kind == "number":
                tokens.append(Token("number", word, pos, number(word, pos)))
            elif kind == "ident" and word.upper() in KEYWORDS:
                tokens.append(Token("keyword", word.upper(), pos))
            elif kind == "ident":
                tokens.append(Token("ident", word.lstrip("#"), pos))
            elif kind == "punct":
                tokens.append(Token(word, word, pos))
            else:
                tokens.append(Token(kind, word, pos))
            pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise PredicateError(f"predicate has more than {MAX_TOKENS} tokens")
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0
        self.comparisons = 0

    # -- helpers -------------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _advance(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _is(self, kind: str, *texts: str) -> bool:
        return self.tok.kind == kind and (not texts or self.tok.text in texts)

    def _error(self, expected: str) -> PredicateError:
        found = "the end of the predicate" if self.tok.kind == "end" else repr(self.tok.text)
        return PredicateError(f"at character {self.tok.pos + 1}: expected {expected}, found {found}")

    def _expect(self, kind: str, text: str | None = None, what: str | None = None) -> Token:
        if self.tok.kind != kind or (text is not None and self.tok.text != text):
            raise self._error(what or repr(text or kind))
        return self._advance()

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise PredicateError(f"at character {self.tok.pos + 1}: nested more than {MAX_DEPTH} levels deep")

    # -- grammar -------------------------------------------------------------------------------
    def parse(self) -> Node:
        node = self._or()
        if self.tok.kind != "end":
            raise self._error("AND, OR or the end of the predicate")
        return node

    def _or(self) -> Node:
        items = [self._and()]
        while self._is("keyword", "OR") or self._is("op", "||"):
            self._advance()
            items.append(self._and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def _and(self) -> Node:
        items = [self._not()]
        while self._is("keyword", "AND") or self._is("op", "&&"):
            self._advance()
            items.append(self._not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def _not(self) -> Node:
        if self._is("keyword", "NOT") or self._is("op", "!"):
            self._advance()
            self._enter()
            node = Not(self._not())
            self.depth -= 1
            return node
        return self._primary()

    def _primary(self) -> Node:
        if self._is("("):
            self._advance()
            self._enter()
            node = self._or()
            self.depth -= 1
            self._expect(")", what="')'")
            return node
        if self._is("keyword", "TRUEPREDICATE", "FALSEPREDICATE"):
            return Constant(self._advance().text == "TRUEPREDICATE")
        return self._comparison()

    def _comparison(self) -> Node:
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            raise PredicateError(f"predicate has more than {MAX_COMPARISONS} comparisons")
        if self._is("keyword", "ANY", "ALL", "SOME", "NONE"):
            raise PredicateError(
                f"at character {self.tok.pos + 1}: {self.tok.text} is not supported; "
                "compare attributes of the table itself, or of its parents (study.patientID from Series)"
            )
        start = self.tok
        left_key, left_value = self._operand()
        if self._is("keyword", "IN", "BETWEEN"):
            return self._aggregate(start, left_key)
        op_tok = self.tok
        if self._is("op") and op_tok.text in SYMBOL_OPERATORS:
            op = SYMBOL_OPERATORS[self._advance().text]
        elif self._is("keyword", *STRING_OPERATORS):
            op = self._advance().text
        elif self._is("keyword", "MATCHES"):
            raise PredicateError(f"at character {op_tok.pos + 1}: MATCHES (regular expressions) is not supported")
        else:
            raise self._error("a comparison operator (==, !=, <, >, LIKE, CONTAINS, BEGINSWITH, ENDSWITH)")
        case_insensitive = False
        if self._is("modifier"):
            flags = self._advance().text[1:-1].lower()
            if set(flags) - {"c", "d"} or not flags:
                raise PredicateError(
                    f"at character {op_tok.pos + 1}: unknown modifier [{flags}] (use [c], [d] or [cd])"
                )
            case_insensitive = "c" in flags  # [d]: diacritics are not folded; see docs/xmlrpc.md
        right_tok = self.tok
        right_key, right_value = self._operand()
        if left_key is not None and right_key is None:
            return Comparison(left_key, op, right_value, case_insensitive)
        if left_key is None and right_key is not None and op in MIRRORED:
            return Comparison(right_key, MIRRORED[op], left_value, case_insensitive)
        if left_key is None and right_key is not None:
            raise PredicateError(f"at character {start.pos + 1}: put the attribute name on the left of {op}")
        if left_key is None:
            both = f"{start.text} {op_tok.text} {right_tok.text}"
            raise PredicateError(
                f"at character {start.pos + 1}: comparison between two constants ({both}); "
                "one side must be an attribute name such as name or patientID"
            )
        raise PredicateError(
            f"at character {start.pos + 1}: comparing two attributes ({left_key} {op_tok.text} {right_key}) "
            "is not supported; compare an attribute with a constant"
        )

    def _aggregate(self, start: Token, key: str | None) -> Node:
        word = self._advance().text
        if key is None:
            raise PredicateError(f"at character {start.pos + 1}: {word} needs an attribute name on its left")
        self._expect("{", what="'{' opening a list of values")
        values = [self._constant()]
        while self._is(","):
            self._advance()
            values.append(self._constant())
            if len(values) > MAX_COMPARISONS:
                raise PredicateError(f"{word} list has more than {MAX_COMPARISONS} values")
        self._expect("}", what="'}' closing the list of values")
        self.comparisons += len(values)
        if self.comparisons > MAX_COMPARISONS:
            raise PredicateError(f"predicate has more than {MAX_COMPARISONS} comparisons")
        if word == "IN":
            return Or(tuple(Comparison(key, "==", v) for v in values))
        if len(values) != 2:
            raise PredicateError(f"at character {start.pos + 1}: BETWEEN takes exactly two values {{low, high}}")
        return And((Comparison(key, ">=", values[0]), Comparison(key, "<=", values[1])))

    def _operand(self) -> tuple[str | None, Value]:
        if self._is("ident"):
            return self._advance().text, None
        return None, self._constant()

    def _constant(self) -> Value:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self._advance()
            return tok.value
        if tok.kind == "keyword" and tok.text in ("NIL", "NULL"):
            self._advance()
            return None
        if tok.kind == "keyword" and tok.text in ("YES", "NO", "TRUE", "FALSE"):
            self._advance()
            return tok.text in ("YES", "TRUE")
        if tok.kind == "keyword" and tok.text == "CAST":
            return self._cast()
        raise self._error('an attribute name or a value (a quoted string, a number or CAST(..., "NSDate"))')

    def _cast(self) -> DateValue:
        start = self._advance()
        self._expect("(", what="'(' after CAST")
        inner = self.tok
        if inner.kind not in ("string", "number"):
            raise self._error("a number of seconds or a quoted date inside CAST")
        self._advance()
        self._expect(",", what="',' in CAST(value, \"NSDate\")")
        target = self._expect("string", what='"NSDate"')
        self._expect(")", what="')' closing CAST")
        if target.value != "NSDate":
            raise PredicateError(f'at character {start.pos + 1}: only CAST(..., "NSDate") is supported')
        if isinstance(inner.value, str):
            return parse_date(inner.value, inner.pos)
        return nsdate(float(inner.value or 0), inner.pos)


def nsdate(seconds: float, pos: int = 0) -> DateValue:
    """CAST(seconds, "NSDate"): seconds since 2001-01-01 UTC, seen in the server's local time.

    DICOM dates carry no time zone; OsiriX reads them as local time, so its clients compute
    these numbers from local dates, and converting back through local time meets them again.
    """
    try:
        when = (NSDATE_EPOCH + timedelta(seconds=seconds)).astimezone().replace(tzinfo=None)
    except (OverflowError, ValueError):
        raise PredicateError(f"at character {pos + 1}: {seconds} seconds is not a usable date") from None
    return DateValue(when, has_time=True)


_DATE_FORMATS = (
    ("%Y-%m-%d %H:%M:%S %z", True),  # NSDate's description: 2024-01-15 10:15:00 +0000
    ("%Y-%m-%d %H:%M:%S", True),
    ("%Y-%m-%dT%H:%M:%S", True),
    ("%Y%m%d%H%M%S", True),
    ("%Y-%m-%d", False),
    ("%Y%m%d", False),
)


def parse_date(text: str, pos: int = 0) -> DateValue:
    """A date written as text: NSDate's description, ISO 8601 or DICOM's YYYYMMDD."""
    for fmt, has_time in _DATE_FORMATS:
        try:
            when = datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
        if when.tzinfo is not None:
            try:
                when = when.astimezone().replace(tzinfo=None)
            except (OverflowError, ValueError):  # within hours of year 1 or 9999
                break
        return DateValue(when, has_time)
    raise PredicateError(
        f"at character {pos + 1}: {text[:40]!r} is not a date "
        '(use "YYYY-MM-DD", "YYYY-MM-DD HH:MM:SS +0000", "YYYYMMDD" or CAST(seconds, "NSDate"))'
    )


def parse(text: str) -> Node:
    """Parse an OsiriX predicate string; raises PredicateError with the position of the problem."""
    if not text.strip():
        raise PredicateError("the predicate is empty")
    return _Parser(text).parse()
