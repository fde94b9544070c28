"""The filter language (index/filters.py), run by a real in-memory SQLite over canonical metadata."""

from __future__ import annotations

import json
import operator
import re
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.filters import MAX_DEPTH, MAX_FILTER_CHARS, FilterError, compile_filter
from index.metadata import canonical_json


def make_db(items: Mapping[int, Mapping | None]) -> sqlite3.Connection:
    """items(rowid, metadata) with each dict stored as canonical JSON (None: a NULL column)."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE items (rowid INTEGER PRIMARY KEY, metadata TEXT)")
    db.executemany(
        "INSERT INTO items (rowid, metadata) VALUES (?, ?)",
        [(rowid, None if meta is None else canonical_json(meta)) for rowid, meta in items.items()],
    )
    return db


def select(db: sqlite3.Connection, text: str) -> set[int]:
    sql, params = compile_filter(text)
    return {rowid for (rowid,) in db.execute(f"SELECT rowid FROM items WHERE {sql}", params)}


ITEMS: dict[int, dict | None] = {
    1: {"color": "red", "n": 1, "tags": ["cat", "dog"], "flag": True},
    2: {"color": "blue", "n": 2.0, "tags": ["dog"], "flag": False},  # 2.0 is stored as 2
    3: {"color": "red", "n": 3.5, "tags": [], "size": "big"},
    4: {"color": "Red", "n": "1", "tags": "cat", "flag": 1},  # strings and numbers never meet
    5: {"n": [0, 10], "tags": ["cat", 1, True]},
    6: {},
    7: None,
}
ALL = set(ITEMS)


@pytest.fixture(scope="module")
def db() -> sqlite3.Connection:
    return make_db(ITEMS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # equality; a list matches when one element does
        ("color = 'red'", {1, 3}),
        ('color == "red"', {1, 3}),
        ("color = 'RED'", set()),  # strings compare exactly
        ("tags = 'cat'", {1, 4, 5}),
        ("tags = 'dog'", {1, 2}),
        # != is not (=): items without the key match
        ("color != 'red'", ALL - {1, 3}),
        ("tags != 'cat'", ALL - {1, 4, 5}),
        # numbers: 1 equals 1.0, never the string '1' or the boolean true
        ("n = 1", {1}),
        ("n = 1.0", {1}),
        ("n = 2", {2}),
        ("n = 2e0", {2}),
        ("n = '1'", {4}),
        ("n = 3.5", {3}),
        ("tags = 1", {5}),
        ("flag = 1", {4}),
        # booleans: only true equals true
        ("flag = true", {1}),
        ("flag = TRUE", {1}),
        ("flag = false", {2}),
        ("flag != true", ALL - {1}),
        ("tags = true", {5}),
        ("tags = false", set()),
        # ranges compare numbers only; a list matches when one numeric element is in range
        ("n > 1", {2, 3, 5}),
        ("n >= 1", {1, 2, 3, 5}),
        ("n < 1", {5}),
        ("n <= 1", {1, 5}),
        ("n < 0", set()),
        ("n > -1.5", {1, 2, 3, 5}),
        ("n > 1 and n < 3", {2, 5}),  # 5: 10 > 1 and 0 < 3, by different elements
        ("tags > 0", {5}),  # the 1 in the list; true is not a number
        ("flag >= 0", {4}),
        ("color > 0", set()),
        # in / not in
        ("color in ['red', 'blue']", {1, 2, 3}),
        ("n in [1, '1']", {1, 4}),
        ("tags in ['dog', true]", {1, 2, 5}),
        ("color not in ['red', 'blue']", ALL - {1, 2, 3}),
        ("n in [2.0]", {2}),
        ("n NOT IN [1, 2, 3.5]", ALL - {1, 2, 3}),
        # exists: the key is there at all, whatever its value (an empty list too)
        ("exists size", {3}),
        ("exists tags", {1, 2, 3, 4, 5}),
        ("exists flag", {1, 2, 4}),
        ("not exists color", {5, 6, 7}),
        ("EXISTS nothing", set()),
        # boolean structure and precedence: not > and > or
        ("color = 'red' and n = 1", {1}),
        ("color = 'red' or n = 2", {1, 2, 3}),
        ("color = 'blue' or color = 'red' and n = 1", {1, 2}),
        ("(color = 'blue' or color = 'red') and n = 1", {1}),
        ("n = 1 and color = 'red' or color = 'blue'", {1, 2}),
        ("n = 1 and (color = 'red' or color = 'blue')", {1}),
        ("not color = 'red' and exists color", {2, 4}),
        ("not (color = 'red' and exists color)", ALL - {1, 3}),
        ("not color = 'red' or exists size", ALL - {1}),
        ("not not color = 'red'", {1, 3}),
        ("((color = 'red'))", {1, 3}),
        ("exists color and not exists flag", {3}),
        ("tags = 'cat' AND tags = 'dog'", {1}),
        ("tags = 'cat' Or n >= 3", {1, 3, 4, 5}),
        # layout: whitespace anywhere, none needed around operators
        ("color='red'and n=1", {1}),
        ("\n  color\t=\n'red'  ", {1, 3}),
    ],
)
def test_operators(db: sqlite3.Connection, text: str, expected: set[int]) -> None:
    assert select(db, text) == expected


@pytest.mark.parametrize(
    "key",
    ["with space", "a.b", "dotted.key.x", 'quo"te', "back\\slash", 'both\\"', "é☃", "日本語", "tab\there",
     "new\nline", "back`tick", "in", "$", "[0]", "a'b", "-x", "a" * 255],
)
def test_any_key_is_reachable(key: str) -> None:
    db = make_db({1: {key: "v", "other": 1}, 2: {key: ["w", 2]}, 3: {"other": "v"}, 4: {key + "x": "v"}})
    quoted = "`" + key.replace("`", "``") + "`"
    assert select(db, f"{quoted} = 'v'") == {1}
    assert select(db, f"{quoted} = 'w'") == {2}
    assert select(db, f"{quoted} > 1") == {2}
    assert select(db, f"{quoted} in ['v', 'w']") == {1, 2}
    assert select(db, f"exists {quoted}") == {1, 2}
    assert select(db, f"{quoted} != 'v'") == {2, 3, 4}


@pytest.mark.parametrize("key", ["color", "a.b", "x-y", "_under", "A1", "a.b-c_d"])
def test_bare_keys(key: str) -> None:
    db = make_db({1: {key: 1}, 2: {key.upper() + "!": 1}})
    assert select(db, f"{key} = 1") == {1}


def test_sql_shape() -> None:
    assert compile_filter("color = 'red'") == (
        "EXISTS (SELECT 1 FROM json_each(metadata, ?) AS j WHERE j.type = 'text' AND j.value = ?)",
        ['$."color"', "red"],
    )
    assert compile_filter("exists `a b`", column="items.metadata") == (
        "(json_type(items.metadata, ?) IS NOT NULL)", ['$."a b"'],
    )
    # floats bind as text converted by SQLite itself, so they parse exactly as the stored JSON does
    sql, params = compile_filter("x < 0.1 or x in [1, 2.5, 'a', true]")
    assert "CAST(? AS REAL)" in sql and params == ['$."x"', "0.1", '$."x"', "a", 1, "2.5"]
    # keys holding '"', '\' or control characters are found by scanning the object's keys
    sql, params = compile_filter('`a"b` = 1')
    assert "json_each(metadata) AS k WHERE k.key = ?" in sql and params == ['a"b', 1, 1]


def test_column_must_be_an_identifier() -> None:
    for bad in ["metadata; DROP TABLE items", "", "a b", "1col"]:
        with pytest.raises(ValueError, match="column must be an identifier"):
            compile_filter("a = 1", column=bad)


def test_other_column_names_and_combination_with_other_conditions() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, meta TEXT)")
    db.executemany("INSERT INTO things VALUES (?, ?)", [(1, '{"a":1}'), (2, '{"a":2}'), (3, '{"a":1}')])
    sql, params = compile_filter("a = 1 or a = 2", column="t.meta")
    rows = db.execute(f"SELECT id FROM things AS t WHERE {sql} AND id > ?", [*params, 1]).fetchall()
    assert rows == [(2,), (3,)]


def test_numbers_compare_exactly() -> None:
    db = make_db({1: {"x": 0.1}, 2: {"x": 0.30000000000000004}, 3: {"x": 2**53 + 1}, 4: {"x": 1e300},
                  5: {"x": -2**63}, 6: {"x": 2**63 - 1}, 7: {"x": 1e-300}})
    assert select(db, "x = 0.1") == {1}
    assert select(db, "x = 0.10000000000000001") == {1}  # the same double
    assert select(db, "x = 0.3") == set()
    assert select(db, "x = 0.30000000000000004") == {2}
    assert select(db, "x = 9007199254740993") == {3}
    assert select(db, "x = 9007199254740992") == set()
    assert select(db, "x > 9007199254740992.0") == {3, 4, 6}
    assert select(db, "x = 1e300") == {4}
    assert select(db, "x = -9223372036854775808") == {5}
    assert select(db, "x = 9223372036854775807") == {6}
    assert select(db, "x < 9223372036854775808") == {1, 2, 3, 5, 6, 7}  # beyond int64: compared as a float
    assert select(db, "x > 0 and x < 1e-299") == {7}
    assert select(db, "x = -0.0 or x = .1") == {1}


@pytest.mark.parametrize(
    ("value", "literal"),
    [("it's", "'it\\'s'"), ('say "hi"', '"say \\"hi\\""'), ("a\\b", "'a\\\\b'"), ("é", '"\\u00e9"'),
     ("😀", '"\\ud83d\\ude00"'), ("😀", "'😀'"), ("tab\t/", "'tab\\t\\/'"), ("", "''"), ("日本", '"日本"')],
)
def test_string_literals(value: str, literal: str) -> None:
    db = make_db({1: {"s": value}, 2: {"s": value + "x"}})
    assert select(db, f"s = {literal}") == {1}


def test_items_without_metadata() -> None:
    db = make_db({1: None, 2: {}, 3: {"a": 1}})
    assert select(db, "a = 1") == {3}
    assert select(db, "a != 1") == {1, 2}
    assert select(db, "not exists a") == {1, 2}
    assert select(db, "a not in [1]") == {1, 2}


def at(text: str, position: int, message: str) -> str:
    return f"filter: {message} at character {position}: {text}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("color = ", at("color = ", 9, "expected a value after '='")),
        ("color =", at("color =", 8, "expected a value after '='")),
        ("color = red", at("color = red", 9, "expected a value after '=', got the word 'red' "
                                              "(write strings in quotes: 'red')")),
        ("size > 'big'", at("size > 'big'", 8, "'>' needs a number, got the string 'big'")),
        ("n < true", at("n < true", 5, "'<' needs a number, got the boolean true")),
        ("n >= FALSE", at("n >= FALSE", 6, "'>=' needs a number, got the boolean false")),
        ("a in []", at("a in []", 6, "'in' needs at least one value, got an empty list []")),
        ("a not in [ ]", at("a not in [ ]", 10, "'not in' needs at least one value, got an empty list []")),
        ("a in 'x'", at("a in 'x'", 6, "expected a list such as [1, 2] after 'in', got the string 'x'")),
        ("a in [1", at("a in [1", 8, "expected ',' or ']' in the list after 'in'")),
        ("a in [1 2]", at("a in [1 2]", 9, "expected ',' or ']' in the list after 'in', got the number 2")),
        ("a in [1,]", at("a in [1,]", 9, "expected a value after ',', got ']'")),
        ("a in [[1]]", at("a in [[1]]", 7, "expected a value after '[', got '[' (lists cannot be nested)")),
        ("a = [1]", at("a = [1]", 5, "'=' compares with one value, not a list (to match any of several, use: "
                                     "key in [...])")),
        ("a not = 1", at("a not = 1", 7, "expected 'in' after 'not' (as in: key not in [...]), got '='")),
        ("a <> 1", at("a <> 1", 3, "unknown operator '<>' (use != for 'not equal')")),
        ("a => 1", at("a => 1", 3, "unknown operator '=>' (use >=)")),
        ("a ~ 1", at("a ~ 1", 3, "unknown operator '~' (the operators are =, ==, !=, <, <=, >, >=, in, not in)")),
        ("a = 1 && b = 2", at("a = 1 && b = 2", 7, "unknown operator '&&' (write 'and')")),
        ("a = 1 || b = 2", at("a = 1 || b = 2", 7, "unknown operator '||' (write 'or')")),
        ("!a = 1", at("!a = 1", 1, "unknown operator '!' (write 'not')")),
        ("a like 'x'", at("a like 'x'", 3, "expected an operator (=, ==, !=, <, <=, >, >=, in, not in) after the key "
                                           "'a', got 'like'")),
        ("a", at("a", 2, "expected an operator (=, ==, !=, <, <=, >, >=, in, not in) after the key 'a'")),
        ("a = 1 b = 2", at("a = 1 b = 2", 7, "expected 'and', 'or' or the end of the filter, got 'b'")),
        ("a = 1 'x'", at("a = 1 'x'", 7, "expected 'and', 'or' or the end of the filter, got the string 'x'")),
        ("(a = 1", at("(a = 1", 1, "'(' is never closed")),
        ("((a = 1) or b = 2", at("((a = 1) or b = 2", 1, "'(' is never closed")),
        ("(a = 1 b = 2)", at("(a = 1 b = 2)", 8, "expected ')' to close the '(' at character 1, got 'b'")),
        ("a = 1)", at("a = 1)", 6, "unexpected ')' with no matching '('")),
        ("()", at("()", 2, "expected a condition (a key, 'not', 'exists' or '('), got ')'")),
        ("a = 1 and", at("a = 1 and", 10, "expected a condition (a key, 'not', 'exists' or '(')")),
        ("= 1", at("= 1", 1, "expected a condition (a key, 'not', 'exists' or '('), got '='")),
        ("exists", at("exists", 7, "expected a key after 'exists'")),
        ("exists 3", at("exists 3", 8, "expected a key after 'exists', got the number 3")),
        ("in = 1", at("in = 1", 1, "expected a key, got the keyword 'in' (to use it as a key, write it in "
                                   "backquotes: `in`)")),
        ("a = 1 and OR = 2", at("a = 1 and OR = 2", 11, "expected a key, got the keyword 'OR' (to use it as a key, "
                                                        "write it in backquotes: `OR`)")),
        ("`` = 1", at("`` = 1", 1, "empty key `` (metadata keys are 1 to 256 characters)")),
        ("`a = 1", at("`a = 1", 1, "unterminated key: the backquote here is never closed (write `` for a backquote "
                                   "inside a key)")),
        ("a = 'x", at("a = 'x", 5, "unterminated string: the ' here is never closed")),
        ('a = "x\\"', at('a = "x\\"', 5, 'unterminated string: the " here is never closed')),
        ("a = 'x\\q'", at("a = 'x\\q'", 7, "invalid escape \\q in a string (the escapes are \\\" \\' \\\\ \\/ \\b \\f "
                                           "\\n \\r \\t \\uXXXX; write \\\\ for a backslash)")),
        ("a = '\\u12'", at("a = '\\u12'", 6, "invalid escape: \\u needs four hexadecimal digits, as in \\u00e9")),
        ("a = '\\udc00'", at("a = '\\udc00'", 6, "\\udc00 is half of a surrogate pair (write the whole pair, or the "
                                                 "character itself)")),
        ("a = '\\u0000'", at("a = '\\u0000'", 5, "strings cannot contain U+0000 (NUL)")),
        ("a = null", at("a = null", 5, "null is not a value (metadata never holds null; to match items without the "
                                       "key, use: not exists a)")),
        ("a = 3abc", at("a = 3abc", 5, "invalid number '3abc' (write numbers like 3, -2.5 or 1e6, and strings in "
                                       "quotes)")),
        ("a = 1.2.3", at("a = 1.2.3", 5, "invalid number '1.2.3' (write numbers like 3, -2.5 or 1e6, and strings in "
                                         "quotes)")),
        ("a > 1e400", at("a > 1e400", 5, "the number 1e400 is out of range for a 64-bit float")),
        ("a = - 1", at("a = - 1", 5, "unexpected character '-'")),
        ("a = 1; drop", at("a = 1; drop", 6, "unexpected character ';'")),
        (f"`{'k' * 257}` = 1", at(f"`{'k' * 257}` = 1", 1, "the key is 257 characters long, over the limit of 256 "
                                                            "for metadata keys")[:100]),
    ],
)
def test_error_messages(text: str, message: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    assert str(caught.value).startswith(message) if len(text) > 100 else str(caught.value) == message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("text", ["", " ", "\n\t "])
def test_empty_filter_is_an_error(text: str) -> None:
    with pytest.raises(FilterError, match=re.escape("filter is empty (leave the filter out to match every item)")):
        compile_filter(text)


def test_long_filters_are_quoted_around_the_error() -> None:
    text = "a = 1 and " * 50 + "b = ?" + " or c = 2" * 20
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    position = text.index("?")  # 0-based 504; the excerpt is 40 characters either side
    assert str(caught.value) == at("..." + text[position - 40 : position + 40] + "...", position + 1,
                                   "unexpected character '?'")
    assert str(caught.value).endswith("a = 1 and b = ? or c = 2 or c = 2 or c = 2 or c = 2 or...")


def test_length_limit() -> None:
    ok = "a = '" + "x" * (MAX_FILTER_CHARS - 6) + "'"
    assert len(ok) == MAX_FILTER_CHARS
    compile_filter(ok)
    with pytest.raises(FilterError) as caught:
        compile_filter(ok + " ")
    assert str(caught.value) == "filter is 4097 characters long, over the limit of 4096"


def test_depth_limit() -> None:
    assert MAX_DEPTH == 32
    db = make_db({1: {"a": 1}, 2: {"a": 2}})
    assert select(db, "(" * 32 + "a = 1" + ")" * 32) == {1}
    assert select(db, "not " * 32 + "a = 1") == {1}
    assert select(db, "not (" * 16 + "a = 1" + ")" * 16) == {1}
    for text, position in [("(" * 33 + "a = 1" + ")" * 33, 33), ("not " * 33 + "a = 1", 129),
                           ("(not " * 17 + "a = 1" + ")" * 17, 81)]:
        with pytest.raises(FilterError) as caught:
            compile_filter(text)
        assert str(caught.value).startswith(
            f"filter: the filter nests parentheses and 'not' more than 32 levels deep (simplify it) "
            f"at character {position}: "
        )


@pytest.mark.parametrize("op", ["and", "or"])
def test_the_longest_chains_run_in_sqlite(op: str) -> None:
    """512 and 585 terms; SQLite caps expression depth at 1000 (chains compile to balanced trees)."""
    term = "a=1" if op == "or" else "a>0"
    terms = (MAX_FILTER_CHARS + len(op) + 2) // (len(term) + len(op) + 2)
    text = f" {op} ".join([term] * terms)
    assert len(text) <= MAX_FILTER_CHARS and terms >= 512
    db = make_db({1: {"a": 1}, 2: {"a": 0}})
    assert select(db, text) == {1}
    assert select(db, "not (" + f" {op} ".join([term] * (terms - 1)) + ")") == {2}


def test_the_longest_list_runs_in_sqlite() -> None:
    values = ",".join(str(i) for i in range(1000))[: MAX_FILTER_CHARS - 10].rsplit(",", 1)[0]
    text = f"a in [{values}]"
    db = make_db({1: {"a": 1}, 2: {"a": 999999}, 3: {"a": [5, "x"]}})
    assert select(db, text) == {1, 3}
    assert select(db, text.replace("in", "not in")) == {2}


def test_filter_text_must_be_valid_unicode() -> None:
    with pytest.raises(FilterError, match=re.escape("the lone surrogate U+D800 is not valid Unicode text at character 6")):
        compile_filter("a = '\ud800'")
    with pytest.raises(FilterError, match="filter must be a string, got bytes"):
        compile_filter(b"a = 1")  # type: ignore[arg-type]


# --------------------------------------------------------------------- property: SQL == spec --
# A filter AST is a tuple: ("cmp", key, op, value), ("in", key, values, negated), ("exists", key),
# ("not", node), ("and", [nodes]), ("or", [nodes]). `evaluate` is docs/filters.md as code.

KEYS = ["n", "tags", "a.b", "with space", 'quo"te', "back\\slash", "in", "é`\t"]
STRINGS = ["red", "Red", "", "1", "true", "it's \"\\", "😀"]
RANGES = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

few_numbers = st.sampled_from([0, 1, 2, -1, 0.5, 1.0, 2.0, -0.0])
numbers = st.one_of(
    few_numbers,
    few_numbers,
    few_numbers,  # mostly values that items share, so that filters match some items and not others
    st.sampled_from([0.1, 1e20, 2**53 + 1, 2**63 - 1, -(2**63), 5e-324]),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.sampled_from(STRINGS), numbers, st.booleans())
metadata = st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, st.lists(scalars, max_size=3)), min_size=1, max_size=6)


def leaves() -> st.SearchStrategy:
    key = st.sampled_from(KEYS)
    return st.one_of(
        st.tuples(st.just("cmp"), key, st.sampled_from(["=", "!="]), scalars),
        st.tuples(st.just("cmp"), key, st.sampled_from(sorted(RANGES)), numbers),
        st.tuples(st.just("in"), key, st.lists(scalars, min_size=1, max_size=4), st.booleans()),
        st.tuples(st.just("exists"), key),
    )


asts = st.recursive(
    leaves(),
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=8,
)


def elements(meta: Mapping, key: str) -> list:
    if key not in meta:
        return []
    value = meta[key]
    return list(value) if isinstance(value, list | tuple) else [value]


def same(element: object, value: object) -> bool:
    if isinstance(element, bool) or isinstance(value, bool):
        return isinstance(element, bool) and isinstance(value, bool) and element == value
    if isinstance(element, str) or isinstance(value, str):
        return isinstance(element, str) and isinstance(value, str) and element == value
    return element == value


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def evaluate(node: tuple, meta: Mapping | None) -> bool:
    meta = meta or {}
    kind = node[0]
    if kind == "exists":
        return node[1] in meta
    if kind == "cmp":
        _, key, op, value = node
        if op == "=":
            return any(same(e, value) for e in elements(meta, key))
        if op == "!=":
            return not any(same(e, value) for e in elements(meta, key))
        return any(is_number(e) and RANGES[op](e, value) for e in elements(meta, key))
    if kind == "in":
        _, key, values, negated = node
        found = any(same(e, v) for e in elements(meta, key) for v in values)
        return not found if negated else found
    if kind == "not":
        return not evaluate(node[1], meta)
    results = [evaluate(child, meta) for child in node[1]]
    return all(results) if kind == "and" else any(results)


PRECEDENCE = {"or": 1, "and": 2, "not": 3}


def render(node: tuple, draw_bool: Iterable[bool], needs: int = 0) -> str:
    """Filter text with the fewest parentheses precedence allows (and some extra), random keyword case."""
    flips = iter(draw_bool)

    def flip() -> bool:
        return next(flips, False)

    def word(w: str) -> str:
        return w.upper() if flip() else w

    def key(k: str) -> str:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", k) and k not in ("in",) and not flip():
            return k
        return "`" + k.replace("`", "``") + "`"

    def value(v: object) -> str:
        if isinstance(v, bool):
            return word("true" if v else "false")
        if isinstance(v, str):
            if flip():
                return json.dumps(v, ensure_ascii=flip())
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'").replace("\t", "\\t") + "'"
        return repr(v)

    def go(n: tuple, needs: int) -> str:
        kind = n[0]
        if kind == "cmp":
            op = "==" if n[2] == "=" and flip() else n[2]
            text = f"{key(n[1])} {op} {value(n[3])}"
        elif kind == "in":
            text = f"{key(n[1])} {word('not in') if n[3] else word('in')} [{', '.join(value(v) for v in n[2])}]"
        elif kind == "exists":
            text = f"{word('exists')} {key(n[1])}"
        elif kind == "not":
            text = f"{word('not')} {go(n[1], PRECEDENCE['not'])}"
        else:
            text = f" {word(kind)} ".join(go(child, PRECEDENCE[kind]) for child in n[1])
        if PRECEDENCE.get(kind, 9) < needs or flip():
            return f"({text})"
        return text

    return go(node, needs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.one_of(metadata, st.none()), min_size=2, max_size=8),
    node=asts,
    flips=st.lists(st.booleans(), max_size=40),
)
def test_sql_agrees_with_the_spec(items: list[dict | None], node: tuple, flips: list[bool]) -> None:
    text = render(node, flips)
    db = make_db(dict(enumerate(items, start=1)))
    expected = {rowid for rowid, meta in enumerate(items, start=1) if evaluate(node, meta)}
    assert select(db, text) == expected, text


# ------------------------------------------------------------------ docs/filters.md is true --

DOC = (Path(__file__).resolve().parents[2] / "docs" / "filters.md").read_text()


def doc_section(title: str) -> str:
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_documented_examples() -> None:
    section = doc_section("Examples")
    items = {int(m.group(1)): json.loads(m.group(2))
             for m in re.finditer(r"^\| (\d+) \| `(\{.*?\})`", section, re.MULTILINE)}
    rows = re.findall(r"^\| `(.+)` \| ([\d, ]+|none) \|$", section, re.MULTILINE)
    assert len(items) == 6 and len(rows) >= 20
    db = make_db(items)
    for text, ids in rows:
        expected = set() if ids == "none" else {int(i) for i in ids.split(",")}
        assert select(db, text) == expected, text


def test_the_documented_error_messages() -> None:
    rows = [line for line in doc_section("Errors").splitlines() if line.startswith("| `")]
    assert len(rows) >= 12
    for row in rows:
        text, message = (cell.strip() for cell in row.strip("|").split(" | ", 1))
        text, message = text[1:-1], message[2:-2] if message.startswith("``") else message[1:-1]
        with pytest.raises(FilterError) as caught:
            compile_filter(text)
        assert str(caught.value) == message, text
