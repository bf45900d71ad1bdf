r"""Rule expressions and rule sets: conditions parsed once, compiled to closures, never `eval`ed.

A rule's `when` goes through a hand-written tokenizer and a recursive-descent parser into a small
AST, is type-checked against the pipeline's declared input fields, and is compiled into nested
Python closures; evaluating a rule is then a handful of calls, with no tree walk and no dispatch.

Grammar (lowest precedence first, as in Python)::

    expression := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := sum (compare_op sum)*         chained as in Python: 0 < x < 5 is 0 < x and x < 5
    compare_op := "<" | "<=" | ">" | ">=" | "==" | "!=" | "in" | "not" "in"
    sum        := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "%") unary)*
    unary      := ("-" | "+") unary | primary
    primary    := NUMBER | STRING | "true" | "false" | "null" | "none"
                | NAME | NAME "(" [expression ("," expression)* [","]] ")"
                | "(" expression ")" | "[" [expression ("," expression)* [","]] "]"

NUMBER is `12`, `1.5`, `.5`, `1e3`, `2.5E-3` (an int unless it has a `.` or an exponent). STRING is
`'...'` or `"..."` with the escapes `\\ \' \" \n \r \t \uXXXX`. NAME is `[A-Za-z_][A-Za-z0-9_]*` and
must be a declared input field. The functions are `abs(x)`, `min(a, b, ...)` and `max(a, b, ...)`.
Keywords are lowercase and case-sensitive. Columns in errors are 1-based offsets into the text.

Static checks (a `RuleError` at compile time): unknown fields and functions, arity, nesting (at
most 32 brackets or unary operators deep, 64 operators deep), and types — arithmetic, unary minus
and `abs`/`min`/`max` need numbers; `< <= > >=` need two numbers or two strings; `==`/`!=` need
comparable kinds (numbers with numbers, strings with strings, bools with bools; anything with
`null`); `in` needs a list or a string on its right (a string on its left for a string, an element
of the list's kind for a list); a list may not mix kinds or hold `null`; `and`, `or` and `not` take
booleans; a rule's `when` must be a boolean. A field whose type is not one of `int`, `float`, `str`,
`bool` (each optionally followed by `?`) is not type-checked.

Run-time semantics (evaluating against a validated input never raises):
- `null`: a field that is null — or absent from the input — makes every comparison it takes part
  in False: `<`, `==`, `!=`, `in` and `not in` alike. Only the literal tests `x == null` and
  `x != null` see it. Arithmetic and functions with a null operand give null.
- Undefined arithmetic (division or modulo by zero, overflow) gives null, so the comparison that
  contains it is False; `not (10 / x > 1)` is then True, since `not` negates a plain boolean.
- `and` and `or` short-circuit and give true or false. Arithmetic and `%` follow Python.
- Everything is deterministic: the same input always gives the same result.
"""

from __future__ import annotations

import difflib
import operator
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgspec

from ._errors import RuleError

__all__ = [
    "Expression",
    "GuardSet",
    "Rule",
    "RuleSet",
    "RuleSpec",
    "check_guards",
    "check_rules",
    "compile_expression",
    "compile_guards",
    "compile_rules",
]

_Fn = Callable[[Mapping[str, object]], object]

_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false", "null", "none"})
_FUNCTIONS = {"abs": (1, 1), "min": (2, None), "max": (2, None)}  # name -> (least, most) arguments
FIELD_TYPES = ("float", "int", "str", "bool")  # the input field types, and so the language's value types
_NUMERIC = frozenset({"int", "float"})
# Both limits keep the parser's recursion and the closures' call depth far below Python's stack limit.
_MAX_NESTING = 32
_MAX_DEPTH = 64

_DIGITS = frozenset(string.digits)
_NAME_START = frozenset(string.ascii_letters + "_")
_NAME_CHARS = _NAME_START | _DIGITS
_HEX = frozenset(string.hexdigits)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_TWO_CHAR_OPS = frozenset({"<=", ">=", "==", "!="})
_ONE_CHAR_OPS = frozenset("<>+-*/%(),[]")
_MISTAKES = {
    "=": "'=' is not an operator (did you mean '=='?)",
    "!": "'!' is not an operator (use 'not' or '!=')",
    "&": "'&' is not an operator (use 'and')",
    "|": "'|' is not an operator (use 'or')",
}


# --- tokens -------------------------------------------------------------------------------------


class _Token(NamedTuple):
    kind: str  # "num", "str", "name", "end", or the operator / keyword itself ("<=", "and", "(")
    text: str
    value: object
    pos: int  # 0-based offset into the expression


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _DIGITS or (c == "." and i + 1 < n and text[i + 1] in _DIGITS):
            token = _scan_number(text, i)
            tokens.append(token)
            i += len(token.text)
        elif c in _NAME_START:
            j = i + 1
            while j < n and text[j] in _NAME_CHARS:
                j += 1
            word = text[i:j]
            tokens.append(_Token(word if word in _KEYWORDS else "name", word, word, i))
            i = j
        elif c in "'\"":
            token = _scan_string(text, i)
            tokens.append(token)
            i += len(token.text)
        elif text[i : i + 2] in _TWO_CHAR_OPS:
            tokens.append(_Token(text[i : i + 2], text[i : i + 2], None, i))
            i += 2
        elif c in _ONE_CHAR_OPS:
            tokens.append(_Token(c, c, None, i))
            i += 1
        else:
            raise RuleError(_MISTAKES.get(c, f"unexpected character {c!r}"), text, i + 1)
    tokens.append(_Token("end", "", None, n))
    return tokens


def _scan_number(text: str, start: int) -> _Token:
    n = len(text)
    i = start
    while i < n and text[i] in _DIGITS:
        i += 1
    is_float = False
    if i < n and text[i] == ".":
        is_float = True
        i += 1
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and text[i] in "eE":
        j = i + 1
        if j < n and text[j] in "+-":
            j += 1
        if j >= n or text[j] not in _DIGITS:
            raise RuleError("malformed number: expected digits after the exponent", text, j + 1)
        is_float = True
        i = j
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and (text[i] in _NAME_CHARS or text[i] == "."):
        while i < n and (text[i] in _NAME_CHARS or text[i] == "."):
            i += 1
        raise RuleError(f"malformed number {text[start:i]!r}", text, start + 1)
    literal = text[start:i]
    try:
        value: object = float(literal) if is_float else int(literal)
    except ValueError:  # int() refuses more than 4300 digits
        raise RuleError("number too long", text, start + 1) from None
    return _Token("num", literal, value, start)


def _scan_string(text: str, start: int) -> _Token:
    quote = text[start]
    n = len(text)
    i = start + 1
    chars: list[str] = []
    while True:
        if i >= n:
            raise RuleError(f"unterminated string (no closing {quote})", text, start + 1)
        c = text[i]
        if c == quote:
            return _Token("str", text[start : i + 1], "".join(chars), start)
        if c != "\\":
            chars.append(c)
            i += 1
            continue
        escape = text[i + 1 : i + 2]
        if escape in _ESCAPES:
            chars.append(_ESCAPES[escape])
            i += 2
        elif escape == "u" and len(text[i + 2 : i + 6]) == 4 and all(h in _HEX for h in text[i + 2 : i + 6]):
            chars.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
        elif escape == "u":
            raise RuleError("malformed escape: \\u needs four hex digits", text, i + 1)
        elif not escape:
            raise RuleError(f"unterminated string (no closing {quote})", text, start + 1)
        else:
            raise RuleError(f"unknown escape '\\{escape}' in string", text, i + 1)


def _describe_token(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the expression"
    return repr(token.text) if token.kind != "str" else f"string {token.text}"


# --- syntax tree --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Literal:
    value: object
    source: str
    pos: int
    depth: int = 1


@dataclass(frozen=True, slots=True)
class _Name:
    name: str
    pos: int
    depth: int = 1


@dataclass(frozen=True, slots=True)
class _ListExpr:
    items: tuple[_Node, ...]
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class _Unary:
    op: str  # "-", "+" or "not"
    operand: _Node
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class _Arith:
    op: str
    left: _Node
    right: _Node
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: str  # "and" or "or"; operands flattened so `a or b or c` is one node
    operands: tuple[_Node, ...]
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class _Compare:
    first: _Node
    links: tuple[tuple[str, int, _Node], ...]  # (operator, its position, right operand)
    pos: int
    depth: int


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Node, ...]
    pos: int
    depth: int


_Node = _Literal | _Name | _ListExpr | _Unary | _Arith | _BoolOp | _Compare | _Call

_COMPARE_OPS = frozenset({"<", "<=", ">", ">=", "==", "!=", "in"})


def _start(node: _Node) -> int:
    """Where a node's text begins (operator nodes keep their operator's position)."""
    match node:
        case _Arith():
            return _start(node.left)
        case _Compare():
            return _start(node.first)
        case _BoolOp():
            return _start(node.operands[0])
        case _:
            return node.pos


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.nesting = 0

    def parse(self) -> _Node:
        if self.tokens[0].kind == "end":
            raise RuleError("empty expression", self.text, 1)
        node = self.expression()
        token = self.tokens[self.i]
        if token.kind != "end":
            raise self.error(f"expected an operator or the end, found {_describe_token(token)}", token)
        return node

    def error(self, message: str, token: _Token) -> RuleError:
        return RuleError(message, self.text, token.pos + 1)

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, kind: str, alternatives: str = "") -> _Token:
        token = self.tokens[self.i]
        if token.kind != kind:
            wanted = f"'{kind}'" + (f" or {alternatives}" if alternatives else "")
            raise self.error(f"expected {wanted}, found {_describe_token(token)}", token)
        self.i += 1
        return token

    def enter(self, token: _Token) -> None:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise self.error(f"expression nested too deeply (more than {_MAX_NESTING} levels)", token)

    def check_depth(self, depth: int, pos: int) -> int:
        if depth > _MAX_DEPTH:
            raise RuleError(
                f"expression too deep (more than {_MAX_DEPTH} levels); split the rule", self.text, pos + 1
            )
        return depth

    def expression(self) -> _Node:
        return self.bool_op("or", self.and_expr)

    def and_expr(self) -> _Node:
        return self.bool_op("and", self.not_expr)

    def bool_op(self, op: str, operand: Callable[[], _Node]) -> _Node:
        first = operand()
        if self.peek().kind != op:
            return first
        operands = [first]
        pos = self.peek().pos
        while self.peek().kind == op:
            self.take()
            operands.append(operand())
        depth = self.check_depth(1 + max(o.depth for o in operands), pos)
        return _BoolOp(op, tuple(operands), pos, depth)

    def not_expr(self) -> _Node:
        token = self.peek()
        if token.kind != "not":
            return self.comparison()
        self.take()
        self.enter(token)
        operand = self.not_expr()
        self.nesting -= 1
        return _Unary("not", operand, token.pos, self.check_depth(operand.depth + 1, token.pos))

    def comparison(self) -> _Node:
        first = self.sum()
        links: list[tuple[str, int, _Node]] = []
        while True:
            token = self.peek()
            if token.kind in _COMPARE_OPS:
                self.take()
                op = token.kind
            elif token.kind == "not":
                self.take()
                self.expect("in")
                op = "not in"
            else:
                break
            links.append((op, token.pos, self.sum()))
        if not links:
            return first
        depth = 1 + max(first.depth, *(node.depth for _, _, node in links))
        return _Compare(first, tuple(links), links[0][1], self.check_depth(depth, links[0][1]))

    def sum(self) -> _Node:
        return self.arith(("+", "-"), self.term)

    def term(self) -> _Node:
        return self.arith(("*", "/", "%"), self.unary)

    def arith(self, ops: tuple[str, ...], operand: Callable[[], _Node]) -> _Node:
        left = operand()
        while self.peek().kind in ops:
            token = self.take()
            right = operand()
            depth = self.check_depth(1 + max(left.depth, right.depth), token.pos)
            left = _Arith(token.kind, left, right, token.pos, depth)
        return left

    def unary(self) -> _Node:
        token = self.peek()
        if token.kind not in ("-", "+"):
            return self.primary()
        self.take()
        self.enter(token)
        operand = self.unary()
        self.nesting -= 1
        return _Unary(token.kind, operand, token.pos, self.check_depth(operand.depth + 1, token.pos))

    def primary(self) -> _Node:
        token = self.take()
        kind = token.kind
        if kind in ("num", "str"):
            return _Literal(token.value, token.text, token.pos)
        if kind in ("true", "false"):
            return _Literal(kind == "true", kind, token.pos)
        if kind in ("null", "none"):
            return _Literal(None, kind, token.pos)
        if kind == "name":
            if self.peek().kind == "(":
                return self.call(token)
            return _Name(token.text, token.pos)
        if kind == "(":
            self.enter(token)
            node = self.expression()
            self.expect(")")
            self.nesting -= 1
            return node
        if kind == "[":
            self.enter(token)
            items = self.items("]")
            self.nesting -= 1
            depth = self.check_depth(1 + max((item.depth for item in items), default=0), token.pos)
            return _ListExpr(items, token.pos, depth)
        raise self.error(f"expected an expression, found {_describe_token(token)}", token)

    def call(self, name: _Token) -> _Node:
        self.enter(self.take())  # the "("
        args = self.items(")")
        self.nesting -= 1
        depth = self.check_depth(1 + max((arg.depth for arg in args), default=0), name.pos)
        return _Call(name.text, args, name.pos, depth)

    def items(self, close: str) -> tuple[_Node, ...]:
        """Comma-separated expressions up to `close`, a trailing comma allowed."""
        items: list[_Node] = []
        while self.peek().kind != close:
            items.append(self.expression())
            if self.peek().kind != ",":
                self.expect(close, "','")
                return tuple(items)
            self.take()
        self.take()
        return tuple(items)


# --- type checking and compilation to closures ----------------------------------------------------


class _Compiled(NamedTuple):
    """One compiled node: its static type, its closure, and what the compiler may specialise on."""

    type: str  # "int", "float", "str", "bool", "null", "list" or "any" (not checked)
    fn: _Fn
    what: str  # how errors name it: "field 'rms' (float)", "'hot' (str)", "a float expression"
    is_const: bool = False
    value: object = None  # the constant's value when is_const
    field: str | None = None  # the field's name when the node is a bare field
    elems: frozenset[str] = frozenset()  # a list's element types
    is_bool: bool = False  # the closure always returns a real bool


def _an(type_: str) -> str:
    """How a message names a computed value: "an int expression", "an untyped expression"."""
    return {"int": "an int", "any": "an untyped"}.get(type_, f"a {type_}") + " expression"


def _kind(type_: str) -> str:
    return "number" if type_ in _NUMERIC else type_


def _comparable(a: str, b: str) -> bool:
    return a == "any" or b == "any" or _kind(a) == _kind(b)


def _const(value: object, type_: str, what: str) -> _Compiled:
    return _Compiled(
        type_, lambda _v: value, what, is_const=True, value=value, is_bool=isinstance(value, bool)
    )


def _fold(node: _Compiled, operands: Sequence[_Compiled]) -> _Compiled:
    """Evaluate a node whose operands are all constants once, at compile time."""
    if not all(o.is_const for o in operands):
        return node
    # The static type stays: `1 / 0` folds to null but is still a float, so `1 / 0 > 1` is just False.
    return _const(node.fn({}), node.type, node.what)


def _null_predicate(op: str, left: _Compiled, right: _Compiled) -> Callable[[object, object], object]:
    """One link of a chained comparison as a predicate on its two values, with the null semantics."""
    if "null" in (left.type, right.type):
        if op == "==":
            return (lambda a, b: b is None) if left.type == "null" else (lambda a, b: a is None)
        return (lambda a, b: b is not None) if left.type == "null" else (lambda a, b: a is not None)
    compare = _COMPARISONS[op]

    def predicate(a: object, b: object) -> object:
        if a is None or b is None:
            return False
        try:
            return compare(a, b)
        except TypeError:
            return False

    return predicate


def _contains(a: object, b: object) -> bool:
    return a in b  # type: ignore[operator]  # the static check vouches for the container


def _not_contains(a: object, b: object) -> bool:
    return a not in b  # type: ignore[operator]


# Any: the static checker, not mypy, vouches that the operands fit the operator.
_COMPARISONS: dict[str, Callable[[Any, Any], object]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "in": _contains,
    "not in": _not_contains,
}
_FUNCTION_IMPLS: dict[str, Callable[..., Any]] = {"abs": abs, "min": min, "max": max}
_ARITHMETIC: dict[str, Callable[[Any, Any], object]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "%": operator.mod,
}


class _Compiler:
    def __init__(self, text: str, fields: Mapping[str, str]) -> None:
        self.text = text
        self.fields = fields
        self.used: set[str] = set()

    def error(self, message: str, pos: int) -> RuleError:
        return RuleError(message, self.text, pos + 1)

    def build(self, node: _Node) -> _Compiled:
        match node:
            case _Literal():
                return self.literal(node)
            case _Name():
                return self.name(node)
            case _ListExpr():
                return self.list_expr(node)
            case _Unary(op="not"):
                return self.not_expr(node)
            case _Unary():
                return self.unary(node)
            case _Arith():
                return self.arith(node)
            case _BoolOp():
                return self.bool_op(node)
            case _Compare():
                return self.comparison(node)
            case _Call():
                return self.call(node)

    def literal(self, node: _Literal) -> _Compiled:
        value = node.value
        if value is None:
            type_ = "null"
        elif isinstance(value, bool):
            type_ = "bool"
        elif isinstance(value, int):
            type_ = "int"
        elif isinstance(value, float):
            type_ = "float"
        else:
            type_ = "str"
        return _const(value, type_, f"{node.source} ({type_})")

    def name(self, node: _Name) -> _Compiled:
        declared = self.fields.get(node.name)
        if declared is None:
            raise self.error(self.unknown_field(node.name), node.pos)
        self.used.add(node.name)
        base = declared.strip().removesuffix("?").strip()
        type_ = base if base in FIELD_TYPES else "any"
        name = node.name

        def load(v: Mapping[str, object]) -> object:
            return v.get(name)  # an absent field reads as null

        return _Compiled(type_, load, f"field '{name}' ({declared.strip()})", field=name)

    def unknown_field(self, name: str) -> str:
        known = ", ".join(self.fields) if self.fields else "none declared"
        if name.lower() in _KEYWORDS:
            hint = f"did you mean '{name.lower()}'? keywords are lowercase; "
        elif name in _FUNCTIONS:
            hint = f"did you mean {name}(...)? "
        else:
            close = difflib.get_close_matches(name, list(self.fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field '{name}' ({hint}known: {known})"

    def list_expr(self, node: _ListExpr) -> _Compiled:
        items = [self.build(item) for item in node.items]
        kinds: dict[str, _Compiled] = {}
        for item, source in zip(items, node.items, strict=True):
            if item.type == "null":
                raise self.error("null in a list never matches; test it with '== null'", _start(source))
            if item.type == "list":
                raise self.error("a list cannot hold a list", _start(source))
            if item.type != "any":
                kinds.setdefault(_kind(item.type), item)
        if len(kinds) > 1:
            first, second = list(kinds.values())[:2]
            raise self.error(f"a list cannot mix kinds: {first.what} and {second.what}", node.pos)
        elems = frozenset(item.type for item in items)
        if all(item.is_const for item in items):
            # A constant list becomes a frozenset once, so `in` is a hash lookup.
            members = frozenset(item.value for item in items)
            return _Compiled("list", lambda _v: members, "a list", is_const=True, value=members, elems=elems)
        fns = tuple(item.fn for item in items)
        return _Compiled("list", lambda v: tuple(fn(v) for fn in fns), "a list", elems=elems)

    def not_expr(self, node: _Unary) -> _Compiled:
        operand = self.build(node.operand)
        self.require_bool(operand, node.operand, "'not'")
        fn = operand.fn

        def negate(v: Mapping[str, object]) -> object:
            return not fn(v)

        return _fold(_Compiled("bool", negate, "a bool expression", is_bool=True), [operand])

    def require_bool(self, operand: _Compiled, node: _Node, context: str) -> None:
        if operand.type not in ("bool", "any"):
            raise self.error(
                f"{context} takes true/false, not {operand.what}; write a comparison such as 'x > 0'",
                _start(node),
            )

    def require_number(self, operand: _Compiled, node: _Node, context: str) -> None:
        if operand.type not in ("int", "float", "any"):
            raise self.error(f"{context} needs a number, not {operand.what}", _start(node))

    def unary(self, node: _Unary) -> _Compiled:
        operand = self.build(node.operand)
        self.require_number(operand, node.operand, f"unary '{node.op}'")
        fn = operand.fn
        op: Callable[[Any], object] = operator.neg if node.op == "-" else operator.pos

        def apply(v: Mapping[str, object]) -> object:
            a = fn(v)
            if a is None:
                return None
            try:
                return op(a)
            except TypeError:
                return None

        return _fold(_Compiled(operand.type, apply, _an(operand.type)), [operand])

    def arith(self, node: _Arith) -> _Compiled:
        left, right = self.build(node.left), self.build(node.right)
        self.require_number(left, node.left, f"'{node.op}'")
        self.require_number(right, node.right, f"'{node.op}'")
        if "any" in (left.type, right.type):
            type_ = "any"
        elif node.op == "/" or "float" in (left.type, right.type):
            type_ = "float"
        else:
            type_ = "int"
        op = _ARITHMETIC[node.op]
        lf, rf = left.fn, right.fn
        apply: _Fn
        if right.is_const and right.value is not None:
            c = right.value  # `rms * 2`: the constant is bound once

            def apply(v: Mapping[str, object]) -> object:
                a = lf(v)
                if a is None:
                    return None
                try:
                    return op(a, c)
                except (ArithmeticError, TypeError):  # x / 0, x % 0, overflow: undefined, so null
                    return None

        else:

            def apply(v: Mapping[str, object]) -> object:
                a = lf(v)
                if a is None:
                    return None
                b = rf(v)
                if b is None:
                    return None
                try:
                    return op(a, b)
                except (ArithmeticError, TypeError):
                    return None

        return _fold(_Compiled(type_, apply, _an(type_)), [left, right])

    def bool_op(self, node: _BoolOp) -> _Compiled:
        operands = [self.build(o) for o in node.operands]
        for compiled, source in zip(operands, node.operands, strict=True):
            self.require_bool(compiled, source, f"'{node.op}'")
        fns = tuple(o.fn for o in operands)
        is_and = node.op == "and"
        fn: _Fn
        if len(fns) == 2 and all(o.is_bool for o in operands):
            # Both sides give real bools, so Python's own short-circuit already gives a bool.
            a, b = fns
            if is_and:

                def fn(v: Mapping[str, object]) -> object:
                    return a(v) and b(v)

            else:

                def fn(v: Mapping[str, object]) -> object:
                    return a(v) or b(v)

        elif is_and:

            def fn(v: Mapping[str, object]) -> object:
                for f in fns:
                    if not f(v):
                        return False
                return True

        else:

            def fn(v: Mapping[str, object]) -> object:
                for f in fns:
                    if f(v):
                        return True
                return False

        return _fold(_Compiled("bool", fn, "a bool expression", is_bool=True), operands)

    def comparison(self, node: _Compare) -> _Compiled:
        operands = [self.build(node.first)]
        for op, pos, right_node in node.links:
            operands.append(self.build(right_node))
            self.check_comparison(op, pos, operands[-2], operands[-1])
        if len(node.links) == 1:
            compiled = self.single_comparison(node.links[0][0], operands[0], operands[1])
        else:
            compiled = self.chain([op for op, _, _ in node.links], operands)
        return _fold(compiled, operands)

    def check_comparison(self, op: str, pos: int, left: _Compiled, right: _Compiled) -> None:
        if "null" in (left.type, right.type):
            if op not in ("==", "!="):
                raise self.error(f"'{op}' cannot take null; only '== null' and '!= null' test for it", pos)
            return
        if left.type == "list" or (right.type == "list" and op not in ("in", "not in")):
            raise self.error(f"'{op}' cannot take a list; a list is only allowed on the right of 'in'", pos)
        if op in ("in", "not in"):
            if right.type == "str":
                if left.type not in ("str", "any"):
                    raise self.error(f"'{op}' on a string needs a string on its left, not {left.what}", pos)
            elif right.type == "list":
                for elem in sorted(right.elems):
                    if not _comparable(left.type, elem):
                        raise self.error(f"'{op}' compares {left.what} with a list of {elem}", pos)
            elif right.type != "any":
                raise self.error(f"'{op}' needs a list or a string on its right, not {right.what}", pos)
            return
        if op not in ("==", "!="):
            for side in (left, right):
                if side.type not in ("int", "float", "str", "any"):
                    raise self.error(f"'{op}' orders numbers or strings, not {side.what}", pos)
        if not _comparable(left.type, right.type):
            raise self.error(f"cannot compare {left.what} with {right.what}", pos)

    def single_comparison(self, op: str, left: _Compiled, right: _Compiled) -> _Compiled:
        """One comparison, specialised on its operands' shapes: `field > 95` is the hot case."""
        fn: _Fn
        if "null" in (left.type, right.type):
            return self.null_test(op, left, right)
        compare = _COMPARISONS[op]
        lf, rf = left.fn, right.fn
        if right.is_const and left.field is not None:
            name, c = left.field, right.value

            def fn(v: Mapping[str, object]) -> object:
                a = v.get(name)
                if a is None:
                    return False
                try:
                    return compare(a, c)
                except TypeError:  # values the static check could not see (an untyped field)
                    return False

        elif right.is_const:
            c = right.value

            def fn(v: Mapping[str, object]) -> object:
                a = lf(v)
                if a is None:
                    return False
                try:
                    return compare(a, c)
                except TypeError:
                    return False

        elif left.is_const:
            c = left.value

            def fn(v: Mapping[str, object]) -> object:
                b = rf(v)
                if b is None:
                    return False
                try:
                    return compare(c, b)
                except TypeError:
                    return False

        else:

            def fn(v: Mapping[str, object]) -> object:
                a = lf(v)
                if a is None:
                    return False
                b = rf(v)
                if b is None:
                    return False
                try:
                    return compare(a, b)
                except TypeError:
                    return False

        return _Compiled("bool", fn, "a bool expression", is_bool=True)

    def null_test(self, op: str, left: _Compiled, right: _Compiled) -> _Compiled:
        """`x == null` / `x != null`: the only comparisons that see a null instead of being False."""
        other = left.fn if right.type == "null" else right.fn
        fn: _Fn
        if op == "==":

            def fn(v: Mapping[str, object]) -> object:
                return other(v) is None

        else:

            def fn(v: Mapping[str, object]) -> object:
                return other(v) is not None

        return _Compiled("bool", fn, "a bool expression", is_bool=True)

    def chain(self, ops: list[str], operands: list[_Compiled]) -> _Compiled:
        start = operands[0].fn
        steps = tuple(
            (_null_predicate(op, left, right), right.fn)
            for op, left, right in zip(ops, operands, operands[1:], strict=False)
        )

        def fn(v: Mapping[str, object]) -> object:
            a = start(v)
            for predicate, right in steps:
                b = right(v)  # each operand is evaluated once, and only if the links before it held
                if not predicate(a, b):
                    return False
                a = b
            return True

        return _Compiled("bool", fn, "a bool expression", is_bool=True)

    def call(self, node: _Call) -> _Compiled:
        if node.name not in _FUNCTIONS:
            if node.name in self.fields:
                raise self.error(f"'{node.name}' is a field, not a function", node.pos)
            raise self.error(f"unknown function '{node.name}' (functions: {', '.join(_FUNCTIONS)})", node.pos)
        least, most = _FUNCTIONS[node.name]
        count = len(node.args)
        if count < least or (most is not None and count > most):
            expected = f"exactly {least}" if least == most else f"at least {least}"
            plural = "" if least == 1 else "s"
            raise self.error(f"{node.name}() takes {expected} argument{plural} ({count} given)", node.pos)
        args = [self.build(arg) for arg in node.args]
        for arg, source in zip(args, node.args, strict=True):
            self.require_number(arg, source, f"{node.name}()")
        types = {arg.type for arg in args}
        type_ = "any" if "any" in types else "float" if "float" in types else "int"
        function = _FUNCTION_IMPLS[node.name]
        fns = tuple(arg.fn for arg in args)
        apply: _Fn
        if len(fns) == 1:
            f0 = fns[0]

            def apply(v: Mapping[str, object]) -> object:
                a = f0(v)
                if a is None:
                    return None
                try:
                    return function(a)
                except TypeError:
                    return None

        elif len(fns) == 2:
            f0, f1 = fns

            def apply(v: Mapping[str, object]) -> object:
                a = f0(v)
                if a is None:
                    return None
                b = f1(v)
                if b is None:
                    return None
                try:
                    return function(a, b)
                except TypeError:
                    return None

        else:

            def apply(v: Mapping[str, object]) -> object:
                values = [f(v) for f in fns]
                if None in values:
                    return None
                try:
                    return function(*values)
                except TypeError:
                    return None

        return _fold(_Compiled(type_, apply, _an(type_)), args)


# --- public API ---------------------------------------------------------------------------------


class Expression:
    """A compiled rule expression: `evaluate` gives its value, `test` its truth; neither ever raises
    on a validated input."""

    __slots__ = ("_evaluate", "_test", "fields_used", "result_type", "text")

    def __init__(
        self, text: str, fields_used: frozenset[str], result_type: str, fn: _Fn, is_bool: bool
    ) -> None:
        self.text = text
        self.fields_used = fields_used
        self.result_type = result_type  # "bool", "int", "float", "str", "null", "list" or "any"
        self._evaluate = fn
        self._test: Callable[[Mapping[str, object]], bool]
        if is_bool:
            self._test = fn  # type: ignore[assignment]  # the compiler vouches that it returns a bool
        else:
            self._test = lambda v: bool(fn(v))

    def evaluate(self, values: Mapping[str, object]) -> object:
        """The expression's value for one input (null as None)."""
        return self._evaluate(values)

    def test(self, values: Mapping[str, object]) -> bool:
        """Whether the expression holds for one input."""
        return self._test(values)

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(text: str, fields: Mapping[str, str]) -> Expression:
    """Parse, type-check and compile `text` against `fields` (name -> "float", "int", "str", "bool",
    a trailing "?" for optional); raises `RuleError` with a 1-based column."""
    tree = _Parser(text).parse()
    compiler = _Compiler(text, fields)
    compiled = compiler.build(tree)
    if compiled.type == "list":
        raise RuleError("a list is only allowed on the right of 'in'", text, tree.pos + 1)
    return Expression(text, frozenset(compiler.used), compiled.type, compiled.fn, compiled.is_bool)


class RuleSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One rule as written in a config: a `when` condition, or `default = true` for the last rule;
    `label` defaults to `action`."""

    when: Annotated[str | None, msgspec.Meta(description="a condition on the input's fields: rms > 4.5 and rpm < 900")
                    ] = None
    default: Annotated[bool, msgspec.Meta(description="true for the last rule: it always holds (rules only)")] = False
    action: Annotated[str, msgspec.Meta(description="the action it decides")]
    label: Annotated[str, msgspec.Meta(description="the decision's label; empty: the action")] = ""


class Rule(msgspec.Struct, frozen=True):
    """A compiled rule; `when` is None for the default rule, `index` its place in the list."""

    when: Expression | None
    action: str
    label: str
    index: int

    @property
    def is_default(self) -> bool:
        """Whether this is the default rule, which always matches."""
        return self.when is None


class RuleSet:
    """An ordered list of rules ending with the default; `decide` returns the first that matches."""

    __slots__ = ("_checks", "actions", "default", "fields_used", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        if not self.rules or not self.rules[-1].is_default or any(r.is_default for r in self.rules[:-1]):
            raise RuleError("a rule set needs exactly one default rule, and it must be last")
        self.default = self.rules[-1]
        self.fields_used = frozenset(f for r in self.rules if r.when is not None for f in r.when.fields_used)
        self.actions = frozenset(r.action for r in self.rules)
        # decide() walks plain (test, rule) pairs: no attribute lookups per rule in the hot path.
        self._checks = tuple((r.when._test, r) for r in self.rules[:-1] if r.when is not None)

    def decide(self, values: Mapping[str, object]) -> Rule:
        """The first rule whose condition holds for `values`, else the default rule."""
        for test, rule in self._checks:
            if test(values):
                return rule
        return self.default

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self.rules)} rules, actions={sorted(self.actions)})"


class GuardSet:
    """An ordered list of guards: rules with no default; `match` returns the first that holds, or None."""

    __slots__ = ("_checks", "actions", "fields_used", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        if any(r.is_default for r in self.rules):
            raise RuleError("guards have no default: every guard needs 'when'")
        self.fields_used = frozenset(f for r in self.rules if r.when is not None for f in r.when.fields_used)
        self.actions = frozenset(r.action for r in self.rules)
        self._checks = tuple((r.when._test, r) for r in self.rules if r.when is not None)

    def match(self, values: Mapping[str, object]) -> Rule | None:
        """The first guard whose condition holds for `values`, else None."""
        for test, rule in self._checks:
            if test(values):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"GuardSet({len(self.rules)} guards, actions={sorted(self.actions)})"


class _Problem(NamedTuple):
    path: str
    message: str
    expression: str = ""
    column: int = 0


def _build(
    specs: Sequence[RuleSpec], fields: Mapping[str, str], path: str, *, guards: bool = False
) -> tuple[list[Rule], list[_Problem]]:
    """Compile `specs` and collect every problem; `guards`: a list with no default, every entry a `when`."""
    rules: list[Rule] = []
    problems: list[_Problem] = []
    defaults = [i for i, spec in enumerate(specs) if spec.default]
    for i, spec in enumerate(specs):
        key = f"{path}[{i}]"
        when: Expression | None = None
        if guards and (spec.default or spec.when is None):
            # A guard that always matched would take every decision away from the ladder.
            at = f"{key}.default" if spec.default else key
            problems.append(_Problem(at, "guards have no default: a guard needs 'when' and no 'default = true'"))
        elif spec.default:
            if spec.when is not None:
                problems.append(
                    _Problem(f"{key}.when", "the default rule must not have 'when': it always matches")
                )
            if i != defaults[0]:
                first = f"{path}[{defaults[0]}]"
                problems.append(_Problem(f"{key}.default", f"a second default rule (the first is {first})"))
            else:
                unreachable = [f"{path}[{j}]" for j in range(i + 1, len(specs)) if not specs[j].default]
                if unreachable:
                    shown = ", ".join(unreachable[:3]) + (", ..." if len(unreachable) > 3 else "")
                    problems.append(
                        _Problem(
                            f"{key}.default",
                            f"the default rule must be last: {shown} after it could never match",
                        )
                    )
        elif spec.when is None:
            problems.append(_Problem(key, "a rule needs 'when' (or 'default = true' for the last rule)"))
        else:
            try:
                when = compile_expression(spec.when, fields)
            except RuleError as e:
                problems.append(_Problem(f"{key}.when", e.message, e.expression, e.column))
            else:
                if when.result_type not in ("bool", "any"):
                    problems.append(
                        _Problem(
                            f"{key}.when",
                            f"must be true or false, not {_an(when.result_type)}; compare it (e.g. 'x > 0')",
                            spec.when,
                        )
                    )
        if not spec.action.strip():
            problems.append(_Problem(f"{key}.action", "must name an action, not be empty"))
        rules.append(Rule(when, spec.action, spec.label or spec.action, i))
    if not defaults and not guards:
        problems.append(
            _Problem(path, 'no default rule: the last rule must be { default = true, action = "..." }')
        )
    return rules, problems


def _pairs(problems: Sequence[_Problem]) -> list[tuple[str, str]]:
    return [(p.path, f"{p.message} at column {p.column}" if p.column else p.message) for p in problems]


def _raise_first(problems: Sequence[_Problem]) -> None:
    if problems:
        first = problems[0]
        raise RuleError(f"{first.path}: {first.message}", first.expression, first.column)


def check_rules(
    specs: Sequence[RuleSpec], fields: Mapping[str, str], path: str = "rules"
) -> list[tuple[str, str]]:
    """Every problem with a rules list as (key path, message), e.g. ("rules[2].when", "unknown field
    'tmp_c' (...) at column 1"); empty when the list is valid."""
    return _pairs(_build(specs, fields, path)[1])


def compile_rules(specs: Sequence[RuleSpec], fields: Mapping[str, str], path: str = "rules") -> RuleSet:
    """Compile a rules list into a `RuleSet`; raises `RuleError` on the first problem `check_rules` finds."""
    rules, problems = _build(specs, fields, path)
    _raise_first(problems)
    return RuleSet(rules)


def check_guards(
    specs: Sequence[RuleSpec], fields: Mapping[str, str], path: str = "guards"
) -> list[tuple[str, str]]:
    """Every problem with a guards list, as `check_rules` reports them; a guard may not be a default."""
    return _pairs(_build(specs, fields, path, guards=True)[1])


def compile_guards(specs: Sequence[RuleSpec], fields: Mapping[str, str], path: str = "guards") -> GuardSet:
    """Compile a guards list (possibly empty) into a `GuardSet`; raises `RuleError` on the first problem."""
    guards, problems = _build(specs, fields, path, guards=True)
    _raise_first(problems)
    return GuardSet(guards)
