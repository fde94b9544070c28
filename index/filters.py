"""The metadata filter language, compiled to a parametrised SQLite expression.

    compile_filter("color = 'red' and (year >= 2020 or tags in ['cat', 'dog'])")
    -> (sql, params) for  SELECT rowid FROM items WHERE <sql>

Grammar (keywords are case-insensitive; docs/filters.md is the user's page):

    filter     := or_expr END
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" or_expr ")"
                | "exists" KEY
                | KEY ("=" | "==" | "!=") VALUE
                | KEY ("<" | "<=" | ">" | ">=") NUMBER
                | KEY ["not"] "in" "[" VALUE ("," VALUE)* "]"
    KEY        := [A-Za-z_][A-Za-z0-9_.-]*  (not a keyword)  |  `any text` (`` for a backquote)
    VALUE      := "string" | 'string' (JSON escapes) | NUMBER | true | false
    NUMBER     := -?digits[.digits][e[+-]digits]

SQLite evaluates the result; nothing here evaluates a filter. Every comparison
becomes an EXISTS over json_each of the key's value, which yields one row for a
scalar, one per element for a list and none for a missing key, so "a list
matches when one of its elements does" needs no extra code. The row's `type`
keeps strings, numbers and booleans apart: json_each reports 'text',
'integer'/'real', and 'true'/'false' (whose value is 1/0, so booleans are
matched on type alone and never equal a number).

Keys are located with a quoted JSON path, '$."key"', bound as a parameter,
unless the key holds '"', '\\' or a control character (what canonical JSON
escapes). Such keys cannot be written in a path portably: SQLite 3.40 (the one
this was tested on) ends a quoted label at the first '"' and compares it with
the key's raw JSON text, escapes undecoded; the 3.45 rewrite decodes escapes,
and only later releases skip an escaped '"' inside the quotes. For those keys
the expression scans the object's members instead (json_each(metadata) AS k
WHERE k.key = ?, the key decoded by any version). Both shapes are tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_FILTER_CHARS = 4096
MAX_DEPTH = 32
MAX_KEY_CHARS = 256  # the metadata key limit (index/metadata.py); longer keys can never match
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

KEYWORDS = frozenset({"and", "or", "not", "in", "exists", "true", "false"})
OPERATORS = ("=", "==", "!=", "<", "<=", ">", ">=")
RANGE_OPERATORS = frozenset({"<", "<=", ">", ">="})
_OPERATOR_LIST = "=, ==, !=, <, <=, >, >=, in, not in"
_OPERATOR_HINTS = {
    "<>": "use != for 'not equal'",
    "=<": "use <=",
    "=>": "use >=",
    "!": "write 'not'",
    "&": "write 'and'",
    "&&": "write 'and'",
    "|": "write 'or'",
    "||": "write 'or'",
    "===": "use =",
    "!==": "use !=",
}

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMBER_TAIL = re.compile(r"[A-Za-z0-9_.]")
_OPERATOR_RUN = re.compile(r"[=!<>~&|^%]+")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
# Characters canonical JSON escapes in a key; a quoted path cannot reach such a key before SQLite 3.45.
_NEEDS_SCAN = re.compile(r'["\\\x00-\x1f]')


class FilterError(ValueError):
    """A filter that does not parse or cannot match; the message quotes it and points at the place."""


# ----------------------------------------------------------------------------- syntax tree --

Value = str | int | float | bool


@dataclass(frozen=True)
class Compare:
    key: str
    op: str  # "=", "!=", "<", "<=", ">", ">="  ("==" is parsed as "=")
    value: Value


@dataclass(frozen=True)
class In:
    key: str
    values: tuple[Value, ...]
    negated: bool


@dataclass(frozen=True)
class Exists:
    key: str


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node = Compare | In | Exists | Not | And | Or


# ---------------------------------------------------------------------------------- tokens --


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "key", "str", "num", "op", "(", ")", "[", "]", ",", "end"
    value: object
    pos: int  # 0-based offset of the token's first character
    raw: str


def _excerpt(text: str, pos: int) -> str:
    if len(text) <= 100:
        return text
    start, end = max(0, pos - 40), min(len(text), pos + 40)
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")


def _error(text: str, pos: int, message: str) -> FilterError:
    return FilterError(f"filter: {message} at character {pos + 1}: {_excerpt(text, pos)}")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "()[],":
            tokens.append(_Token(c, c, i, c))
            i += 1
        elif c in "\"'":
            value, end = _read_string(text, i)
            tokens.append(_Token("str", value, i, text[i:end]))
            i = end
        elif c == "`":
            value, end = _read_backquoted(text, i)
            tokens.append(_Token("key", value, i, text[i:end]))
            i = end
        elif m := _NUMBER.match(text, i):
            end = m.end()
            if end < n and _NUMBER_TAIL.match(text, end):
                bad = re.match(r"[^\s()\[\],]*", text[i:]).group()
                raise _error(text, i, f"invalid number {bad!r} (write numbers like 3, -2.5 or 1e6, and strings in quotes)")
            tokens.append(_Token("num", _number(text, i, m.group()), i, m.group()))
            i = end
        elif m := _WORD.match(text, i):
            tokens.append(_Token("word", m.group(), i, m.group()))
            i = m.end()
        elif m := _OPERATOR_RUN.match(text, i):
            op = m.group()
            if op not in OPERATORS:
                hint = _OPERATOR_HINTS.get(op, f"the operators are {_OPERATOR_LIST}")
                raise _error(text, i, f"unknown operator {op!r} ({hint})")
            tokens.append(_Token("op", op, i, op))
            i = m.end()
        else:
            raise _error(text, i, f"unexpected character {c!r}")
    tokens.append(_Token("end", None, n, ""))
    return tokens


def _number(text: str, pos: int, raw: str) -> int | float:
    if not any(ch in raw for ch in ".eE"):
        n = int(raw)
        if INT64_MIN <= n <= INT64_MAX:
            return n
    try:
        x = float(raw)
    except OverflowError:  # an integer of 309+ digits
        x = float("inf")
    if x in (float("inf"), float("-inf")):
        raise _error(text, pos, f"the number {raw} is out of range for a 64-bit float")
    return x


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote, i, n, out = text[start], start + 1, len(text), []
    while i < n:
        c = text[i]
        if c == quote:
            value = "".join(out)
            if "\x00" in value:
                raise _error(text, start, "strings cannot contain U+0000 (NUL)")
            return value, i + 1
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = text[i + 1 : i + 2]
        if not e:
            break
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e == "u":
            cp, i = _read_unicode_escape(text, i)
            out.append(chr(cp))
        else:
            raise _error(
                text, i, f"invalid escape \\{e} in a string (the escapes are \\\" \\' \\\\ \\/ \\b \\f \\n \\r \\t "
                "\\uXXXX; write \\\\ for a backslash)"
            )
    raise _error(text, start, f"unterminated string: the {quote} here is never closed")


def _read_unicode_escape(text: str, i: int) -> tuple[int, int]:
    """The code point of the \\uXXXX escape at text[i] (a surrogate pair counts as one), and the end."""
    digits = text[i + 2 : i + 6]
    if not _HEX4.fullmatch(digits):
        raise _error(text, i, "invalid escape: \\u needs four hexadecimal digits, as in \\u00e9")
    cp = int(digits, 16)
    if 0xD800 <= cp < 0xDC00 and text[i + 6 : i + 8] == "\\u" and _HEX4.fullmatch(text[i + 8 : i + 12]):
        low = int(text[i + 8 : i + 12], 16)
        if 0xDC00 <= low < 0xE000:
            return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00), i + 12
    if 0xD800 <= cp < 0xE000:
        raise _error(text, i, f"\\u{digits} is half of a surrogate pair (write the whole pair, or the character itself)")
    return cp, i + 6


def _read_backquoted(text: str, start: int) -> tuple[str, int]:
    i, n, out = start + 1, len(text), []
    while i < n:
        c = text[i]
        if c == "`":
            if text[i + 1 : i + 2] == "`":
                out.append("`")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise _error(text, start, "unterminated key: the backquote here is never closed (write `` for a backquote inside a key)")


# ---------------------------------------------------------------------------------- parser --


def _show(token: _Token) -> str:
    if token.kind == "str":
        return f"the string {token.value!r}"
    if token.kind == "num":
        return f"the number {token.raw}"
    return repr(token.raw) if token.kind != "key" else token.raw


def _render_key(key: str) -> str:
    """A key as filter text: bare when it can be, else in backquotes."""
    if _WORD.fullmatch(key) and key.lower() not in KEYWORDS:
        return key
    return "`" + key.replace("`", "``") + "`"


def _got(token: _Token) -> str:
    """', got X' for a token; nothing at the end of the filter, which the position already says."""
    return "" if token.kind == "end" else f", got {_show(token)}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def error(self, token: _Token, message: str) -> FilterError:
        return _error(self.text, token.pos, message)

    @staticmethod
    def is_keyword(token: _Token, word: str) -> bool:
        return token.kind == "word" and token.raw.lower() == word

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(
                token, f"the filter nests parentheses and 'not' more than {MAX_DEPTH} levels deep (simplify it)"
            )

    def parse(self) -> Node:
        node = self.or_expr()
        token = self.peek()
        if token.kind == ")":
            raise self.error(token, "unexpected ')' with no matching '('")
        if token.kind != "end":
            raise self.error(token, f"expected 'and', 'or' or the end of the filter{_got(token)}")
        return node

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.is_keyword(self.peek(), "or"):
            self.take()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.is_keyword(self.peek(), "and"):
            self.take()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Node:
        if not self.is_keyword(self.peek(), "not"):
            return self.primary()
        self.enter(self.take())
        node = Not(self.not_expr())
        self.depth -= 1
        return node

    def primary(self) -> Node:
        token = self.peek()
        if token.kind == "(":
            self.enter(self.take())
            node = self.or_expr()
            close = self.peek()
            if close.kind == "end":
                raise self.error(token, "'(' is never closed")
            if close.kind != ")":
                raise self.error(close, f"expected ')' to close the '(' at character {token.pos + 1}{_got(close)}")
            self.take()
            self.depth -= 1
            return node
        if self.is_keyword(token, "exists"):
            self.take()
            return Exists(self.key("after 'exists'"))
        key = self.key("")
        op = self.peek()
        if op.kind == "op":
            self.take()
            value, at = self.value(f"after {op.raw!r}", op.raw, key)
            if op.raw in RANGE_OPERATORS and isinstance(value, bool | str):
                got = f"the boolean {str(value).lower()}" if isinstance(value, bool) else f"the string {value!r}"
                raise self.error(at, f"{op.raw!r} needs a number, got {got}")
            return Compare(key, "=" if op.raw == "==" else op.raw, value)
        if self.is_keyword(op, "in"):
            self.take()
            return In(key, self.values("in", key), negated=False)
        if self.is_keyword(op, "not"):
            self.take()
            after = self.peek()
            if not self.is_keyword(after, "in"):
                raise self.error(after, f"expected 'in' after 'not' (as in: key not in [...]){_got(after)}")
            self.take()
            return In(key, self.values("not in", key), negated=True)
        raise self.error(op, f"expected an operator ({_OPERATOR_LIST}) after the key {key!r}{_got(op)}")

    def key(self, context: str) -> str:
        token = self.take()
        where = f" {context}" if context else ""
        if token.kind == "word" and token.raw.lower() in KEYWORDS:
            raise self.error(
                token,
                f"expected a key{where}, got the keyword {token.raw!r} "
                f"(to use it as a key, write it in backquotes: `{token.raw}`)",
            )
        if token.kind not in ("word", "key"):
            expected = f"a key{where}" if context else "a condition (a key, 'not', 'exists' or '(')"
            raise self.error(token, f"expected {expected}{_got(token)}")
        key = str(token.value)
        if not key:
            raise self.error(token, f"empty key `` (metadata keys are 1 to {MAX_KEY_CHARS} characters)")
        if len(key) > MAX_KEY_CHARS:
            raise self.error(
                token, f"the key is {len(key)} characters long, over the limit of {MAX_KEY_CHARS} for metadata keys"
            )
        if "\x00" in key:
            raise self.error(token, "keys cannot contain U+0000 (NUL)")
        return key

    def value(self, context: str, op: str, key: str) -> tuple[Value, _Token]:
        token = self.take()
        if token.kind in ("str", "num"):
            return token.value, token  # type: ignore[return-value]
        if token.kind == "word":
            word = token.raw.lower()
            if word in ("true", "false"):
                return word == "true", token
            if word == "null":
                raise self.error(
                    token, "null is not a value (metadata never holds null; "
                    f"to match items without the key, use: not exists {_render_key(key)})"
                )
            raise self.error(
                token, f"expected a value {context}, got the word {token.raw!r} "
                f"(write strings in quotes: '{token.raw}')"
            )
        if token.kind == "[" and op in ("=", "==", "!="):
            raise self.error(
                token, f"{op!r} compares with one value, not a list (to match any of several, use: key in [...])"
            )
        if token.kind == "[":
            raise self.error(token, f"expected a value {context}, got '[' (lists cannot be nested)")
        raise self.error(token, f"expected a value {context}{_got(token)}")

    def values(self, name: str, key: str) -> tuple[Value, ...]:
        opening = self.take()
        if opening.kind != "[":
            raise self.error(opening, f"expected a list such as [1, 2] after {name!r}{_got(opening)}")
        if self.peek().kind == "]":
            raise self.error(opening, f"{name!r} needs at least one value, got an empty list []")
        values = [self.value("after '['", "in", key)[0]]
        while True:
            token = self.take()
            if token.kind == "]":
                return tuple(values)
            if token.kind != ",":
                raise self.error(token, f"expected ',' or ']' in the list after {name!r}{_got(token)}")
            values.append(self.value("after ','", "in", key)[0])


def parse_filter(text: str) -> Node:
    """The syntax tree of a filter, or FilterError saying what is wrong and where."""
    if not isinstance(text, str):
        raise FilterError(f"filter must be a string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter is {len(text)} characters long, over the limit of {MAX_FILTER_CHARS}")
    if not text.strip():
        raise FilterError("filter is empty (leave the filter out to match every item)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _error(text, e.start, f"the lone surrogate U+{ord(text[e.start]):04X} is not valid Unicode text") from None
    return _Parser(text).parse()


# -------------------------------------------------------------------------------- compiler --


class _Compiler:
    def __init__(self, column: str) -> None:
        self.column = column

    def compile(self, node: Node) -> tuple[str, list]:
        if isinstance(node, Compare):
            if node.op == "!=":
                sql, params = self.any_element(node.key, self.condition_eq([node.value]))
                return f"(NOT {sql})", params
            if node.op == "=":
                return self.any_element(node.key, self.condition_eq([node.value]))
            placeholder, param = _number_param(node.value)  # type: ignore[arg-type]
            return self.any_element(node.key, (f"{{a}}.type IN ('integer', 'real') AND {{a}}.value {node.op} "
                                               f"{placeholder}", [param]))
        if isinstance(node, In):
            sql, params = self.any_element(node.key, self.condition_eq(node.values))
            return (f"(NOT {sql})", params) if node.negated else (sql, params)
        if isinstance(node, Exists):
            if _NEEDS_SCAN.search(node.key):
                return f"EXISTS (SELECT 1 FROM json_each({self.column}) AS k WHERE k.key = ?)", [node.key]
            return f"(json_type({self.column}, ?) IS NOT NULL)", [_path(node.key)]
        if isinstance(node, Not):
            sql, params = self.compile(node.operand)
            return f"(NOT {sql})", params
        if isinstance(node, And | Or):
            parts = [self.compile(operand) for operand in node.operands]
            return _balanced(parts, "AND" if isinstance(node, And) else "OR")
        raise TypeError(f"not a filter node: {node!r}")

    @staticmethod
    def condition_eq(values: tuple[Value, ...] | list[Value]) -> tuple[str, list]:
        """A condition on alias {a} true when the JSON value equals one of `values` (types kept apart)."""
        strings: list[str] = []
        numbers: list[tuple[str, object]] = []
        booleans: list[str] = []
        for v in values:
            if isinstance(v, bool):
                name = "true" if v else "false"
                if name not in booleans:
                    booleans.append(name)
            elif isinstance(v, str):
                if v not in strings:
                    strings.append(v)
            else:
                pair = _number_param(v)
                if pair not in numbers:
                    numbers.append(pair)
        terms: list[str] = []
        params: list = []
        if strings:
            terms.append(f"{{a}}.type = 'text' AND {{a}}.value {_in_or_eq(['?'] * len(strings))}")
            params += strings
        if numbers:
            placeholders = [p for p, _ in numbers]
            terms.append(f"{{a}}.type IN ('integer', 'real') AND {{a}}.value {_in_or_eq(placeholders)}")
            params += [param for _, param in numbers]
        if booleans:
            terms.append(f"{{a}}.type IN ({', '.join(repr(b) for b in booleans)})")
        if len(terms) == 1:
            return terms[0], params
        return " OR ".join(f"({t})" for t in terms), params

    def any_element(self, key: str, condition: tuple[str, list]) -> tuple[str, list]:
        """EXISTS: metadata[key], or one element of it when it is a list, satisfies `condition`."""
        template, params = condition
        on_j = template.format(a="j")
        if not _NEEDS_SCAN.search(key):
            return (f"EXISTS (SELECT 1 FROM json_each({self.column}, ?) AS j WHERE {on_j})", [_path(key), *params])
        on_k = template.format(a="k")
        return (
            f"EXISTS (SELECT 1 FROM json_each({self.column}) AS k WHERE k.key = ? AND (({on_k}) OR EXISTS "
            f"(SELECT 1 FROM json_each(CASE WHEN k.type = 'array' THEN k.value ELSE '[]' END) AS j WHERE {on_j})))",
            [key, *params, *params],
        )


def _in_or_eq(placeholders: list[str]) -> str:
    return f"= {placeholders[0]}" if len(placeholders) == 1 else f"IN ({', '.join(placeholders)})"


def _number_param(value: int | float) -> tuple[str, object]:
    """Integers bind as themselves. A float binds as its shortest repr, converted by SQLite's own
    text-to-real routine: the one its JSON parser uses on the stored text (canonical JSON writes floats
    with the same repr), so equal numbers compare equal even where that routine is not correctly rounded."""
    if isinstance(value, int):
        return "?", value
    return "CAST(? AS REAL)", repr(float(value))


def _path(key: str) -> str:
    """The JSON path of a top-level key that needs no escaping ('"', '\\' and control characters do not occur)."""
    return f'$."{key}"'


def _balanced(parts: list[tuple[str, list]], op: str) -> tuple[str, list]:
    """`a OP b OP c ...` as a balanced tree of parentheses. SQLite limits expression depth (1000 by
    default) and a flat chain nests one level per term: about 585 at most within MAX_FILTER_CHARS, which
    fits, but a balanced tree keeps the depth logarithmic should the length limit ever grow."""
    if len(parts) == 1:
        return parts[0]
    mid = len(parts) // 2
    left_sql, left_params = _balanced(parts[:mid], op)
    right_sql, right_params = _balanced(parts[mid:], op)
    return f"({left_sql} {op} {right_sql})", left_params + right_params


def compile_filter(text: str, column: str = "metadata") -> tuple[str, list]:
    """Compile a filter to (sql_expression, params) for `SELECT rowid FROM items WHERE <sql_expression>`.

    `column` names the TEXT column holding canonical metadata JSON (index/metadata.py); it is written
    into the SQL, so it must be a plain identifier (optionally table.column). Raises FilterError for a
    filter that is empty, too long, too deep or malformed; the message quotes it and gives the position.
    """
    if not _COLUMN.fullmatch(column):
        raise ValueError(f"column must be an identifier such as 'metadata' or 'items.metadata', got {column!r}")
    return _Compiler(column).compile(parse_filter(text))
