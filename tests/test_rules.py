"""Rule expressions and rule sets (edge/_rules.py): pure unit tests, no network."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

import edge._rules as rules_module
from edge import RuleError
from edge._rules import Expression, Rule, RuleSet, RuleSpec, check_rules, compile_expression, compile_rules

# The input of SPEC §4's pump pipeline.
PUMP = {"rms": "float", "kurtosis": "float", "temp_c": "float", "rpm": "float", "asset": "str?"}
# A wider set of fields to exercise every type; "blob" has a type the checker does not know, so it is untyped.
FIELDS = {
    **PUMP,
    "n": "int",
    "x": "float",
    "y": "float",
    "t": "float?",
    "k": "int?",
    "name": "str",
    "flag": "bool",
    "maybe": "bool?",
    "blob": "json",
}

SPEC_RULES = [
    RuleSpec(when="temp_c > 95 or rms > 7.5", action="shutdown", label="critical"),
    RuleSpec(when="rms > 4.5 and kurtosis > 5", action="inspect", label="anomaly"),
    RuleSpec(default=True, action="none", label="normal"),
]


def ev(text: str, **values: object) -> object:
    return compile_expression(text, FIELDS).evaluate(values)


def holds(text: str, **values: object) -> bool:
    return compile_expression(text, FIELDS).test(values)


def rule_error(text: str, fields: dict[str, str] = FIELDS) -> RuleError:
    with pytest.raises(RuleError) as info:
        compile_expression(text, fields)
    return info.value


class Recorder(dict[str, object]):
    """An input that records which fields the expression reads."""

    def __init__(self, **values: object) -> None:
        super().__init__(values)
        self.reads: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:  # the compiled closures read fields with .get
        self.reads.append(key)
        return super().get(key, default)


# --- parsing, precedence and values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 * 3 == 7", True),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 - 3 - 4", -5),
        ("8 / 2 / 2", 2.0),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("7.5 % 2", 1.5),
        ("10 - 2 * 3 + 1", 5),
        ("-2 * 3", -6),
        ("2 * -3", -6),
        ("- -2", 2),
        ("+2 - -2", 4),
        ("-(1 + 2)", -3),
        ("1 / 4", 0.25),
        ("1e3", 1000.0),
        ("2.5E-3", 0.0025),
        (".5 + 1.", 1.5),
        ("007", 7),
        ("'ab' == \"ab\"", True),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'a\\b'", "a\\b"),
        (r"'\n\t\r'", "\n\t\r"),
        (r"'caf\u00e9'", "café"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("none", None),
        ("'a' < 'b'", True),
        ("abs(-3)", 3),
        ("abs(-2.5)", 2.5),
        ("min(3, 1, 2)", 1),
        ("max(3, 1, 2,)", 3),
        ("max(abs(-7), min(2, 9))", 7),
    ],
)
def test_values_and_precedence(text: str, expected: object) -> None:
    value = ev(text)
    assert value == expected
    assert type(value) is type(expected)


def test_int_stays_int_and_division_gives_float() -> None:
    assert ev("n * 2 + 1", n=3) == 7
    assert type(ev("n * 2 + 1", n=3)) is int
    assert ev("n / 2", n=5) == 2.5
    assert compile_expression("n / 2", FIELDS).result_type == "float"
    assert compile_expression("n % 2", FIELDS).result_type == "int"
    assert compile_expression("n + x", FIELDS).result_type == "float"
    assert compile_expression("max(n, 2)", FIELDS).result_type == "int"


BOOL_PRECEDENCE = [
    ("not flag or maybe", lambda flag, maybe, x: (not flag) or maybe),
    ("not flag and maybe", lambda flag, maybe, x: (not flag) and maybe),
    ("flag or maybe and x > 1", lambda flag, maybe, x: flag or (maybe and x > 1)),
    ("not x > 1 and flag", lambda flag, maybe, x: (not x > 1) and flag),
    ("not not flag", lambda flag, maybe, x: flag),
    ("not (flag or maybe)", lambda flag, maybe, x: not (flag or maybe)),
    ("flag == maybe or x == 2", lambda flag, maybe, x: flag == maybe or x == 2),
    ("flag and maybe or x > 1 and flag", lambda flag, maybe, x: (flag and maybe) or (x > 1 and flag)),
    ("(x * 2 > 3) == flag", lambda flag, maybe, x: (x * 2 > 3) == flag),
]


@pytest.mark.parametrize(("text", "python"), BOOL_PRECEDENCE, ids=[t for t, _ in BOOL_PRECEDENCE])
def test_boolean_precedence_matches_python(text: str, python: Any) -> None:
    expression = compile_expression(text, FIELDS)
    for flag, maybe, x in itertools.product([True, False], [True, False], [0.0, 1.5, 2.0]):
        expected = bool(python(flag, maybe, x))
        assert expression.evaluate({"flag": flag, "maybe": maybe, "x": x}) is expected, (flag, maybe, x)


@pytest.mark.parametrize(
    ("text", "x", "expected"),
    [
        ("x < 2", 1, True),
        ("x < 2", 2, False),
        ("x <= 2", 2, True),
        ("x <= 2", 3, False),
        ("x > 2", 3, True),
        ("x > 2", 2, False),
        ("x >= 2", 2, True),
        ("x >= 2", 1, False),
        ("x == 2", 2.0, True),
        ("x == 2", 2.5, False),
        ("x != 2", 2.5, True),
        ("x != 2", 2, False),
        ("2 < x", 3, True),  # the constant on the left
        ("2 < x", 1, False),
        ("x - 1 > 0", 1.5, True),  # an expression on the left
        ("x > y", 1, False),  # fields on both sides (y = 2)
        ("y > x", 1, True),
    ],
)
def test_comparison_operators(text: str, x: float, expected: bool) -> None:
    assert holds(text, x=x, y=2) is expected


@pytest.mark.parametrize(
    ("text", "x", "expected"),
    [
        ("0 < x < 5", 3, True),
        ("0 < x < 5", 0, False),
        ("0 < x < 5", 5, False),
        ("0 < x < 5", -1, False),
        ("0 <= x <= 5 != x", 5, False),
        ("0 <= x <= 5 != x", 4, True),
        ("5 > x >= 1", 1, True),
        ("5 > x >= 1", 0.5, False),
        ("0 < x != null", 1, True),
    ],
)
def test_chained_comparisons_work_as_in_python(text: str, x: float, expected: bool) -> None:
    assert holds(text, x=x) is expected


def test_chained_comparison_evaluates_each_operand_once_and_stops_early() -> None:
    expression = compile_expression("0 < x + y < 5", FIELDS)
    values = Recorder(x=1.0, y=2.0)
    assert expression.test(values) is True
    assert sorted(values.reads) == ["x", "y"]

    later = compile_expression("x > 100 < y", FIELDS)
    values = Recorder(x=1.0, y=2.0)
    assert later.test(values) is False
    assert values.reads == ["x"]  # the first link failed, so y is never read


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("n in [1, 2, 3]", {"n": 2}, True),
        ("n in [1, 2, 3]", {"n": 4}, False),
        ("n not in [1, 2, 3]", {"n": 4}, True),
        ("n not in [1, 2, 3]", {"n": 3}, False),
        ("n in [1.0, 2.5]", {"n": 1}, True),
        ("n in []", {"n": 1}, False),
        ("n not in []", {"n": 1}, True),
        ("name in ['pump', 'fan']", {"name": "fan"}, True),
        ("name in ['pump', 'fan',]", {"name": "valve"}, False),
        ("'pu' in name", {"name": "pump-3"}, True),
        ("'pu' not in name", {"name": "pump-3"}, False),
        ("name in 'pump-3 fan-2'", {"name": "fan"}, True),
        ("x in [y, 3]", {"x": 2.0, "y": 2.0}, True),  # a list that is not constant
        ("x in [y, 3]", {"x": 3.0, "y": 2.0}, True),
        ("x in [y, 3]", {"x": 4.0, "y": 2.0}, False),
        ("x not in [y * 2, 3]", {"x": 4.0, "y": 2.0}, False),
        ("x in [y, 3]", {"x": 3.0}, True),  # a null item does not match but does not hide the others
    ],
)
def test_in_and_not_in(text: str, values: dict[str, object], expected: bool) -> None:
    assert compile_expression(text, FIELDS).test(values) is expected


def test_functions() -> None:
    assert ev("abs(x) > 2", x=-2.5) is True
    assert ev("min(x, y)", x=3.0, y=1.5) == 1.5
    assert ev("max(x, y, n)", x=3.0, y=1.5, n=7) == 7
    assert ev("max(x - y, 0)", x=1.0, y=1.5) == 0
    assert ev("abs(min(x, -y))", x=3.0, y=4.0) == 4.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("abs()", "abs() takes exactly 1 argument (0 given)"),
        ("abs(1, 2)", "abs() takes exactly 1 argument (2 given)"),
        ("min(1)", "min() takes at least 2 arguments (1 given)"),
        ("max()", "max() takes at least 2 arguments (0 given)"),
        ("sqrt(x) > 1", "unknown function 'sqrt' (functions: abs, min, max)"),
        ("rms(1)", "'rms' is a field, not a function"),
    ],
)
def test_function_errors(text: str, fragment: str) -> None:
    error = rule_error(text)
    assert error.message == fragment
    assert error.column == 1
    assert error.expression == text


# --- run-time semantics: short-circuit, null, undefined arithmetic -----------------------------------


def test_short_circuit_guards_a_division_by_zero() -> None:
    guarded = compile_expression("x != 0 and 10 / x > 1", FIELDS)
    assert guarded.test({"x": 0}) is False
    assert guarded.test({"x": 5.0}) is True
    assert guarded.test({"x": 20.0}) is False
    either = compile_expression("x == 0 or 10 / x > 1", FIELDS)
    assert either.test({"x": 0}) is True
    assert either.test({"x": 20.0}) is False


def test_and_or_do_not_evaluate_the_right_side_when_decided() -> None:
    values = Recorder(x=0.0, y=1.0)
    assert compile_expression("x == 0 or y > 0", FIELDS).test(values) is True
    assert values.reads == ["x"]
    values = Recorder(x=1.0, y=1.0)
    assert compile_expression("x == 0 and y > 0", FIELDS).test(values) is False
    assert values.reads == ["x"]
    values = Recorder(x=1.0, y=1.0, n=1)
    assert compile_expression("x == 0 and y > 0 and n > 0", FIELDS).test(values) is False
    assert values.reads == ["x"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10 / x > 1", False),
        ("10 / x <= 1", False),
        ("10 / x == 1", False),
        ("10 / x != 1", False),
        ("n % 0 == 0", False),
        ("n % x == 0", False),
        ("not (10 / x > 1)", True),  # `not` negates the plain False of the comparison
        ("1 / 0 > 1", False),  # constant-folded, same semantics
        ("1 / 0 < 1", False),
        ("10 / x > 1 or n == 3", True),
    ],
)
def test_division_by_zero_makes_its_comparison_false(text: str, expected: bool) -> None:
    assert holds(text, x=0.0, n=3) is expected
    assert ev("10 / x", x=0.0) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t > 5", False),
        ("t <= 5", False),
        ("t == 5", False),
        ("t != 5", False),
        ("t + 1 > 0", False),
        ("t * 0 == 0", False),
        ("-t < 0", False),
        ("abs(t) >= 0", False),
        ("max(t, 1) >= 1", False),
        ("min(1, 2, t) >= 0", False),
        ("0 < t < 5", False),
        ("t in [1, 2]", False),
        ("t not in [1, 2]", False),
        ("asset == 'p1'", False),
        ("asset != 'p1'", False),
        ("asset in ['p1']", False),
        ("asset not in ['p1']", False),
        ("'p' in asset", False),
        ("asset == null", True),
        ("asset != null", False),
        ("null == asset", True),
        ("asset == none", True),
        ("t == null", True),
        ("not (t > 5)", True),
        ("maybe", False),
        ("not maybe", True),
        ("maybe or t == null", True),
        ("k == null and t == null", True),
    ],
)
def test_null_fields(text: str, expected: bool) -> None:
    assert holds(text, t=None, k=None, asset=None, maybe=None) is expected
    assert holds(text) is expected  # an absent field reads as null


def test_null_propagates_through_arithmetic_and_functions() -> None:
    assert ev("t + 1", t=None) is None
    assert ev("-t", t=None) is None
    assert ev("abs(t)", t=None) is None
    assert ev("max(t, 1)", t=None) is None
    assert ev("min(1, 2, t)", t=None) is None
    assert ev("t + 1", t=1.5) == 2.5
    assert holds("asset != 'p1'", asset="p2") is True
    assert holds("asset != null", asset="p2") is True


def test_untyped_fields_are_not_checked_and_never_raise() -> None:
    texts = ["blob > 3", "blob + 1 > 2", "blob in [1, 2]", "'x' in blob", "abs(blob) > 1", "min(blob, 1) < 2"]
    expressions = [compile_expression(text, FIELDS) for text in texts]
    for weird in ([1], {"a": 1}, "text", 5, 2.5, True, None):
        for expression in expressions:
            assert isinstance(expression.test({"blob": weird}), bool), (expression, weird)
    assert holds("blob > 3", blob=4) is True
    assert holds("'x' in blob", blob="xyz") is True
    assert holds("blob in [1, 2]", blob=[1]) is False  # unhashable: False, not TypeError


# --- compile-time errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment", "column"),
    [
        ("(temp_c > 95 rms", "expected ')', found 'rms'", 14),
        ("(rms > 1", "expected ')', found the end of the expression", 9),
        ("rms > ", "expected an expression, found the end of the expression", 7),
        ("rms >> 1", "expected an expression, found '>'", 6),
        ("rms = 1", "'=' is not an operator (did you mean '=='?)", 5),
        ("rms > 1 && rpm > 2", "'&' is not an operator (use 'and')", 9),
        ("rms > 1 || rpm > 2", "'|' is not an operator (use 'or')", 9),
        ("!flag", "'!' is not an operator (use 'not' or '!=')", 1),
        ("rms @ 2", "unexpected character '@'", 5),
        ("rms > .", "unexpected character '.'", 7),
        ("temp_é > 1", "unexpected character 'é'", 6),
        ("asset == 'abc", "unterminated string (no closing ')", 10),
        ("'abc\\", "unterminated string (no closing ')", 1),
        ("rms > 1 rpm", "expected an operator or the end, found 'rpm'", 9),
        ("rms > 1 AND rpm > 2", "expected an operator or the end, found 'AND'", 9),
        ("rms > 1 'x'", "expected an operator or the end, found string 'x'", 9),
        ("1.2.3 > rms", "malformed number '1.2.3'", 1),
        ("12abc > rms", "malformed number '12abc'", 1),
        ("rms > 1e", "malformed number: expected digits after the exponent", 9),
        ("max(rms, 2", "expected ')' or ',', found the end of the expression", 11),
        ("max(rms 2)", "expected ')' or ',', found '2'", 9),
        ("abs(,)", "expected an expression, found ','", 5),
        ("rms in [1, 2", "expected ']' or ',', found the end of the expression", 13),
        ("rms not 5", "expected 'in', found '5'", 9),
        ("not", "expected an expression, found the end of the expression", 4),
        ("rms > 1 and", "expected an expression, found the end of the expression", 12),
        ("()", "expected an expression, found ')'", 2),
        (r"'a\q'", "unknown escape '\\q' in string", 3),
        (r"'\u12'", "malformed escape: \\u needs four hex digits", 2),
        ("9" * 5000, "number too long", 1),
        ("", "empty expression", 1),
        ("   ", "empty expression", 1),
    ],
)
def test_syntax_errors_name_the_column_and_what_was_expected(text: str, fragment: str, column: int) -> None:
    error = rule_error(text)
    assert error.message == fragment
    assert error.column == column
    assert error.expression == text
    if text.strip():
        assert f"at column {column} in {text!r}" in str(error)


def test_unknown_field_names_it_and_lists_the_known_ones() -> None:
    error = rule_error("rms > 1 and tmp_c > 90", PUMP)
    assert error.message == (
        "unknown field 'tmp_c' (did you mean 'temp_c'? known: rms, kurtosis, temp_c, rpm, asset)"
    )
    assert error.column == 13
    assert rule_error("zzz > 1", PUMP).message == (
        "unknown field 'zzz' (known: rms, kurtosis, temp_c, rpm, asset)"
    )
    assert rule_error("x > 1", {}).message == "unknown field 'x' (known: none declared)"


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("True", "did you mean 'true'?"),
        ("NULL", "did you mean 'null'?"),
        ("abs > 1", "did you mean abs(...)?"),
    ],
)
def test_unknown_field_hints(text: str, hint: str) -> None:
    assert hint in rule_error(text, PUMP).message


@pytest.mark.parametrize(
    ("text", "fragment", "column"),
    [
        ("temp_c > 'hot'", "cannot compare field 'temp_c' (float) with 'hot' (str)", 8),
        ("asset + 1 > 2", "'+' needs a number, not field 'asset' (str?)", 1),
        ("2 * name", "'*' needs a number, not field 'name' (str)", 5),
        ("-name", "unary '-' needs a number, not field 'name' (str)", 2),
        ("(rms > 1) and (asset + 1 > 2)", "'+' needs a number, not field 'asset' (str?)", 16),
        ("flag == 1", "cannot compare field 'flag' (bool) with 1 (int)", 6),
        ("name == rms * 2", "cannot compare field 'name' (str) with a float expression", 6),
        ("x < 2 == true", "cannot compare 2 (int) with true (bool)", 7),  # each link of a chain is checked
        ("flag < true", "'<' orders numbers or strings, not field 'flag' (bool)", 6),
        ("rms in 'abc'", "'in' on a string needs a string on its left, not field 'rms' (float)", 5),
        ("rms in ['a', 'b']", "'in' compares field 'rms' (float) with a list of str", 5),
        ("rms in rpm", "'in' needs a list or a string on its right, not field 'rpm' (float)", 5),
        ("rms in [1, 'a']", "a list cannot mix kinds: 1 (int) and 'a' (str)", 8),
        ("rms in [1, null]", "null in a list never matches; test it with '== null'", 12),
        ("rms in [[1]]", "a list cannot hold a list", 9),
        ("rms == [1, 2]", "'==' cannot take a list; a list is only allowed on the right of 'in'", 5),
        ("[1, 2]", "a list is only allowed on the right of 'in'", 1),
        ("abs(name) > 1", "abs() needs a number, not field 'name' (str)", 5),
        ("max(1, flag) > 1", "max() needs a number, not field 'flag' (bool)", 8),
        ("rms and kurtosis > 1", "'and' takes true/false, not field 'rms' (float)", 1),
        ("rms > 1 or 'x'", "'or' takes true/false, not 'x' (str)", 12),
        ("not rms", "'not' takes true/false, not field 'rms' (float)", 5),
        ("rms < null", "'<' cannot take null; only '== null' and '!= null' test for it", 5),
        ("asset in null", "'in' cannot take null; only '== null' and '!= null' test for it", 7),
    ],
)
def test_type_errors(text: str, fragment: str, column: int) -> None:
    error = rule_error(text)
    assert error.message.startswith(fragment), error.message
    assert error.column == column


@pytest.mark.parametrize(
    "text",
    [
        "n == 2.0",
        "n < rms",
        "asset == null",
        "asset != none",
        "name < 'm'",
        "flag == true",
        "flag",
        "maybe or flag",
        "rms in [1, 2.5]",
        "blob > 3",
        "blob in [1, 2.5]",
        "'x' in blob",
        "blob + 1 > 2 and name in blob",
        "x in [y, n, 3]",
    ],
)
def test_well_typed_expressions_compile(text: str) -> None:
    assert compile_expression(text, FIELDS).text == text


def test_keywords_are_lowercase_and_case_sensitive() -> None:
    assert holds("flag and not maybe", flag=True, maybe=False) is True
    assert rule_error("flag AND maybe").column == 6
    assert "did you mean 'false'?" in rule_error("flag == False").message


def test_nesting_is_bounded_instead_of_overflowing_the_stack() -> None:
    assert ev("(" * 30 + "x" + ")" * 30 + " > 1", x=2.0) is True
    assert "nested too deeply" in rule_error("(" * 40 + "x" + ")" * 40 + " > 1").message
    assert "nested too deeply" in rule_error("not " * 200 + "flag").message
    assert "nested too deeply" in rule_error("-" * 5000 + "x > 1").message
    assert "nested too deeply" in rule_error("[" * 100 + "1" + "]" * 100).message
    assert ev(" + ".join(["x"] * 60) + " > 1", x=1.0) is True
    assert "too deep" in rule_error(" + ".join(["x"] * 5000) + " > 1").message
    # A long flat `or` is one node, so it is not limited.
    assert ev(" or ".join(["x > 1"] * 500), x=2.0) is True


def test_expression_attributes() -> None:
    expression = compile_expression("temp_c > 95 or rms > 7.5", PUMP)
    assert isinstance(expression, Expression)
    assert expression.text == "temp_c > 95 or rms > 7.5"
    assert expression.fields_used == frozenset({"temp_c", "rms"})
    assert expression.result_type == "bool"
    assert repr(expression) == "Expression('temp_c > 95 or rms > 7.5')"
    assert compile_expression("1 + 2", PUMP).fields_used == frozenset()
    assert compile_expression("rms * 2", PUMP).result_type == "float"
    assert compile_expression("blob", FIELDS).result_type == "any"


def test_test_is_a_bool_even_for_a_non_boolean_expression() -> None:
    expression = compile_expression("x - 1", FIELDS)
    assert expression.evaluate({"x": 1.0}) == 0.0
    assert expression.test({"x": 1.0}) is False
    assert expression.test({"x": 3.0}) is True
    assert compile_expression("maybe", FIELDS).test({"maybe": None}) is False


# --- rules and rule sets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "action", "label"),
    [
        ({"rms": 1.0, "kurtosis": 1.0, "temp_c": 96.0, "rpm": 1500.0}, "shutdown", "critical"),
        ({"rms": 8.0, "kurtosis": 1.0, "temp_c": 40.0, "rpm": 1500.0}, "shutdown", "critical"),
        ({"rms": 8.0, "kurtosis": 9.0, "temp_c": 40.0, "rpm": 1500.0}, "shutdown", "critical"),  # first wins
        ({"rms": 5.0, "kurtosis": 6.0, "temp_c": 40.0, "rpm": 1500.0, "asset": "p1"}, "inspect", "anomaly"),
        ({"rms": 5.0, "kurtosis": 4.0, "temp_c": 40.0, "rpm": 1500.0}, "none", "normal"),
        ({"rms": 4.5, "kurtosis": 6.0, "temp_c": 40.0, "rpm": 1500.0}, "none", "normal"),
        ({"rms": 7.5, "kurtosis": 1.0, "temp_c": 95.0, "rpm": 1500.0, "asset": None}, "none", "normal"),
    ],
)
def test_spec_rules_decide(values: dict[str, object], action: str, label: str) -> None:
    rule = compile_rules(SPEC_RULES, PUMP).decide(values)
    assert (rule.action, rule.label) == (action, label)


def test_rule_set_shape() -> None:
    rule_set = compile_rules(SPEC_RULES, PUMP)
    assert isinstance(rule_set, RuleSet)
    assert len(rule_set) == 3
    assert [r.index for r in rule_set] == [0, 1, 2]
    assert [r.action for r in rule_set.rules] == ["shutdown", "inspect", "none"]
    assert rule_set.default is rule_set.rules[-1]
    assert rule_set.default.is_default and rule_set.default.when is None
    assert not rule_set.rules[0].is_default
    assert isinstance(rule_set.rules[0], Rule)
    assert rule_set.rules[0].when is not None and rule_set.rules[0].when.text == "temp_c > 95 or rms > 7.5"
    assert rule_set.actions == frozenset({"shutdown", "inspect", "none"})
    assert rule_set.fields_used == frozenset({"temp_c", "rms", "kurtosis"})


def test_label_defaults_to_action() -> None:
    rule_set = compile_rules(
        [RuleSpec(when="rms > 1", action="inspect"), RuleSpec(default=True, action="none")], PUMP
    )
    assert [(r.action, r.label) for r in rule_set] == [("inspect", "inspect"), ("none", "none")]


def test_rule_spec_decodes_from_the_spec_toml() -> None:
    class Pipeline(msgspec.Struct, forbid_unknown_fields=True):
        rules: list[RuleSpec]

    text = """
rules = [
  { when = "temp_c > 95 or rms > 7.5", action = "shutdown", label = "critical" },
  { when = "rms > 4.5 and kurtosis > 5", action = "inspect", label = "anomaly" },
  { default = true, action = "none", label = "normal" },
]
"""
    pipeline = msgspec.toml.decode(text, type=Pipeline)
    assert pipeline.rules == SPEC_RULES
    assert check_rules(pipeline.rules, PUMP) == []
    with pytest.raises(msgspec.ValidationError, match="unknown field `whn`"):
        msgspec.convert({"whn": "rms > 1", "action": "x"}, RuleSpec)
    with pytest.raises(msgspec.ValidationError, match="missing required field `action`"):
        msgspec.convert({"when": "rms > 1"}, RuleSpec)


WHEN = RuleSpec(when="rms > 1", action="inspect")
DEFAULT = RuleSpec(default=True, action="none")


@pytest.mark.parametrize(
    ("specs", "problems"),
    [
        ([WHEN, DEFAULT], []),
        ([WHEN], [("rules", 'no default rule: the last rule must be { default = true, action = "..." }')]),
        ([], [("rules", 'no default rule: the last rule must be { default = true, action = "..." }')]),
        (
            [DEFAULT, WHEN],
            [("rules[0].default", "the default rule must be last: rules[1] after it could never match")],
        ),
        (
            [WHEN, DEFAULT, WHEN, WHEN, WHEN, WHEN],
            [
                (
                    "rules[1].default",
                    "the default rule must be last: rules[2], rules[3], rules[4], ..."
                    " after it could never match",
                )
            ],
        ),
        ([WHEN, DEFAULT, DEFAULT], [("rules[2].default", "a second default rule (the first is rules[1])")]),
        (
            [WHEN, RuleSpec(default=True, when="rms > 2", action="none")],
            [("rules[1].when", "the default rule must not have 'when': it always matches")],
        ),
        (
            [RuleSpec(action="inspect"), DEFAULT],
            [("rules[0]", "a rule needs 'when' (or 'default = true' for the last rule)")],
        ),
        (
            [RuleSpec(when="tmp_c > 1", action="inspect"), DEFAULT],
            [
                (
                    "rules[0].when",
                    "unknown field 'tmp_c' (did you mean 'temp_c'? known: rms, kurtosis, temp_c, rpm, asset)"
                    " at column 1",
                )
            ],
        ),
        (
            [RuleSpec(when="rms + 1", action="inspect"), DEFAULT],
            [("rules[0].when", "must be true or false, not a float expression; compare it (e.g. 'x > 0')")],
        ),
        (
            [RuleSpec(when="rms > 1", action=""), DEFAULT],
            [("rules[0].action", "must name an action, not be empty")],
        ),
    ],
)
def test_check_rules(specs: list[RuleSpec], problems: list[tuple[str, str]]) -> None:
    assert check_rules(specs, PUMP) == problems


def test_check_rules_reports_every_problem_in_order_under_the_given_path() -> None:
    specs = [
        RuleSpec(when="tmp_c > 1", action="shutdown"),
        RuleSpec(action="inspect"),
        RuleSpec(when="rms > (1", action="inspect"),
        RuleSpec(when="asset > 1", action=" "),
    ]
    problems = check_rules(specs, PUMP, path="pipelines[0].rules")
    assert [path for path, _ in problems] == [
        "pipelines[0].rules[0].when",
        "pipelines[0].rules[1]",
        "pipelines[0].rules[2].when",
        "pipelines[0].rules[3].when",
        "pipelines[0].rules[3].action",
        "pipelines[0].rules",
    ]
    assert problems[2][1] == "expected ')', found the end of the expression at column 9"
    assert problems[3][1] == "cannot compare field 'asset' (str?) with 1 (int) at column 7"


def test_compile_rules_raises_the_first_problem() -> None:
    specs = [RuleSpec(when="rms > 1", action="inspect"), RuleSpec(when="tmp_c > 1", action="shutdown")]
    with pytest.raises(RuleError) as info:
        compile_rules(specs, PUMP, path="pipelines[0].rules")
    error = info.value
    assert error.message.startswith("pipelines[0].rules[1].when: unknown field 'tmp_c'")
    assert error.expression == "tmp_c > 1"
    assert error.column == 1
    assert str(error).endswith("at column 1 in 'tmp_c > 1'")
    with pytest.raises(RuleError, match=r"^rules: no default rule"):
        compile_rules([RuleSpec(when="rms > 1", action="inspect")], PUMP)


def test_rule_set_refuses_rules_without_a_last_default() -> None:
    when = compile_expression("rms > 1", PUMP)
    with pytest.raises(RuleError, match="exactly one default rule"):
        RuleSet([Rule(when, "inspect", "inspect", 0)])
    with pytest.raises(RuleError, match="exactly one default rule"):
        RuleSet([Rule(None, "none", "none", 0), Rule(when, "inspect", "inspect", 1)])
    with pytest.raises(RuleError, match="exactly one default rule"):
        RuleSet([])


# --- determinism and robustness -----------------------------------------------------------------------

ROBUST_TEXTS = [
    "temp_c > 95 or rms > 7.5",
    "rms > 4.5 and kurtosis > 5",
    "x != 0 and 10 / x > 1",
    "n % k == 0 or k == null",
    "0 < x / y < t",
    "max(x, y, t) - min(n, k) >= abs(x - y)",
    "x * 1e308 * 10 > y",  # overflows to inf: no exception
    "t in [1, 2.5, n] or asset in ['a', 'b']",
    "'p' in asset or not (t > 1)",
    "-(x % y) <= t % x",
    "maybe or flag and x > y",
]


def _random_input(rng: random.Random) -> dict[str, object]:
    numbers = [0, 0.0, -0.0, 1, -1, 2.5, -7, 1e308, -1e308, 5e-324, 10**18]
    return {
        "rms": rng.choice(numbers),
        "kurtosis": rng.choice(numbers),
        "temp_c": rng.choice(numbers),
        "rpm": rng.choice(numbers),
        "x": rng.choice(numbers),
        "y": rng.choice(numbers),
        "n": rng.choice([0, 1, -3, 10**18]),
        "t": rng.choice([*numbers, None]),
        "k": rng.choice([0, 2, -5, None]),
        "asset": rng.choice(["a", "pump", "", None]),
        "name": rng.choice(["a", "pump", ""]),
        "flag": rng.choice([True, False]),
        "maybe": rng.choice([True, False, None]),
    }


def test_evaluation_never_raises_and_is_deterministic() -> None:
    rng = random.Random(1234)
    expressions = [compile_expression(text, FIELDS) for text in ROBUST_TEXTS]
    again = [compile_expression(text, FIELDS) for text in ROBUST_TEXTS]
    for _ in range(500):
        values = _random_input(rng)
        if rng.random() < 0.2:
            values.pop(rng.choice(sorted(values)))  # absent fields read as null
        for first, second in zip(expressions, again, strict=True):
            result = first.test(values)
            assert isinstance(result, bool)
            assert first.test(values) is result
            assert second.test(values) is result
            value = first.evaluate(values)
            assert value == second.evaluate(values) or value != value  # NaN is not equal to itself


_SOUP = [
    *[
        "x",
        "n",
        "t",
        "asset",
        "flag",
        "blob",
        "1",
        "0",
        "2.5",
        "1e3",
        "'a'",
        "true",
        "null",
        "[1, 2]",
        "['a']",
        "[]",
    ],
    *[
        "abs(",
        "min(",
        "foo(",
        "(",
        ")",
        "[",
        "]",
        ",",
        "+",
        "-",
        "*",
        "/",
        "%",
        "<",
        "<=",
        "==",
        "!=",
        "in",
        "not",
    ],
    *["and", "or", "=", "!", "'", "\\", ".", "é", "1.2.3"],
]


def test_any_text_compiles_or_raises_rule_error_and_what_compiles_never_raises() -> None:
    rng = random.Random(7)
    inputs = [
        {"x": x, "n": n, "t": t, "asset": asset, "flag": True, "blob": blob}
        for x, n, t, asset, blob in itertools.product(
            [0.0, -1.5, 1e308], [0, 3], [None, 0.0], [None, "a"], [None, [1], "a"]
        )
    ]
    compiled = 0
    for _ in range(5000):
        text = " ".join(rng.choice(_SOUP) for _ in range(rng.randint(1, 10)))
        try:
            expression = compile_expression(text, FIELDS)
        except RuleError as e:
            assert 1 <= e.column <= len(text) + 1, (text, e.column)
            continue
        compiled += 1
        for values in inputs:
            assert isinstance(expression.test(values), bool), (text, values)
            expression.evaluate(values)
    assert compiled > 50  # the soup does produce valid expressions, so the second half is exercised


def test_decisions_are_deterministic() -> None:
    rule_set = compile_rules(SPEC_RULES, PUMP)
    rebuilt = compile_rules(SPEC_RULES, PUMP)
    grid = [
        {"rms": rms, "kurtosis": kurtosis, "temp_c": temp_c, "rpm": 1500.0}
        for rms, kurtosis, temp_c in itertools.product(
            [0.0, 4.5, 5.0, 7.5, 8.0], [4.0, 5.0, 6.0], [20.0, 95.0, 96.0]
        )
    ]
    first = [rule_set.decide(values).action for values in grid]
    assert first == [rule_set.decide(values).action for values in grid]
    assert first == [rebuilt.decide(values).action for values in grid]
    assert set(first) == {"shutdown", "inspect", "none"}


# --- the module never runs Python code from a string ----------------------------------------------------

_BANNED_NAMES = {"eval", "exec", "compile", "__import__", "getattr", "globals", "locals", "vars"}
_BANNED_MODULES = {"builtins", "importlib", "code", "codeop", "ast", "pickle", "marshal"}


def _dangerous(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in _BANNED_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in _BANNED_NAMES:
            found.append(node.attr)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in _BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _BANNED_MODULES:
            found.append(node.module or "")
    return found


def test_the_guard_catches_eval_exec_and_compile() -> None:
    assert _dangerous("eval('1')") == ["eval"]
    assert _dangerous("f = exec") == ["exec"]
    assert _dangerous("import builtins\nbuiltins.compile('1', '', 'eval')") == ["builtins", "compile"]
    assert _dangerous("from importlib import import_module") == ["importlib"]


def test_rules_module_never_uses_eval_exec_or_compile() -> None:
    source = Path(rules_module.__file__).read_text(encoding="utf-8")
    assert _dangerous(source) == []
