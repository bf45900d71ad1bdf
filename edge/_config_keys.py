"""The config's keys, read from its Structs: one source of truth for what a config may say.

Two uses of one walk over `msgspec.inspect`'s view of the config Structs:

- `config_keys(Config)` lists every key with its type, default and one-line meaning (the
  `msgspec.Meta(description=...)` each field carries): `edge config reference`.
- `key_problems(data, Config)` reads a config's raw data (parsed TOML, a pushed config) before it
  is decoded and finds *every* unknown key (with a "did you mean"), missing required key and value
  of the wrong type, each with its key path (`pipelines[0].rules[2].when`). msgspec itself stops
  at the first, so without this an operator would fix a file one line per run.

A field whose metadata says `extra={"not_a_key": True}` is the loader's own (`Config.base_dir`):
not listed, and refused in a file like any unknown key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import msgspec
import msgspec.inspect as mi

from ._codec import validation_issue
from ._errors import Problem

NOT_A_KEY = msgspec.Meta(extra={"not_a_key": True})  # a Struct field the loader sets; never a key of a file
# A pushed config comes from outside: what its problems quote of it is bounded (one unknown key of a
# megabyte, or a hundred thousand of them, must not make a reply or an audit record that size).
MAX_PROBLEMS = 100
MAX_KEY_CHARS = 64


class KeyDoc(msgspec.Struct, frozen=True):
    """One key a config accepts: where (`pipelines[].rules[].when`), its type, default and meaning."""

    key: str
    type: str
    required: bool
    default: Any  # as plain data; None when required or unset
    default_text: str  # as it would be written in TOML: `1000`, `"batch"`, `[]`, `(unset)`, `(required)`
    meaning: str


class KeyProblems(msgspec.Struct, frozen=True):
    """What the pre-pass found: every problem, the data without the offending keys, and the tables
    whose own keys had one (a semantic problem with a key beside it may only be its consequence)."""

    problems: list[Problem]
    cleaned: dict[str, Any]
    tables: list[str]


# ---------------------------------------------------------------------------------------------
# The walk


class _Field(msgspec.Struct, frozen=True):
    name: str
    type: mi.Type  # without its Metadata
    python_type: Any  # as annotated (what msgspec.convert checks a value against)
    required: bool
    default: Any
    meaning: str


@cache
def _fields(cls: type[msgspec.Struct]) -> dict[str, _Field]:
    """The keys of one config table, by name, in declaration order."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    annotated = {f.name: f.type for f in msgspec.structs.fields(cls)}
    fields: dict[str, _Field] = {}
    for f in info.fields:
        bare, meaning, extra = _unwrap(f.type)
        if extra.get("not_a_key"):
            continue
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        else:
            default = None if f.default is msgspec.NODEFAULT else f.default
        fields[f.encode_name] = _Field(f.encode_name, bare, annotated[f.name], f.required, default, meaning)
    return fields


def _unwrap(t: mi.Type) -> tuple[mi.Type, str, dict[str, Any]]:
    """(the type without its Metadata, its description, its `extra`)."""
    if isinstance(t, mi.Metadata):
        meaning = str((t.extra_json_schema or {}).get("description", ""))
        return t.type, meaning, dict(t.extra or {})
    return t, "", {}


def _table(t: mi.Type) -> type[msgspec.Struct] | None:
    """The Struct behind a table-valued type (`X` or `X | None`), else None."""
    t = _unwrap(t)[0]
    if isinstance(t, mi.StructType):
        return t.cls
    if isinstance(t, mi.UnionType):
        tables = [_unwrap(m)[0] for m in t.types if not isinstance(m, mi.NoneType)]
        if len(tables) == 1 and isinstance(tables[0], mi.StructType):
            return tables[0].cls
    return None


def _tables_in(t: mi.Type) -> tuple[str, type[msgspec.Struct]] | None:
    """("list", X) for an array of tables, ("dict", X) for a table of named tables, else None."""
    if isinstance(t, mi.ListType) and (item := _table(t.item_type)) is not None:
        return "list", item
    if isinstance(t, mi.DictType) and (value := _table(t.value_type)) is not None:
        return "dict", value
    return None


# ---------------------------------------------------------------------------------------------
# The reference


def config_keys(cls: type[msgspec.Struct]) -> list[KeyDoc]:
    """Every key of the config `cls` (and of its tables, depth first), as the reference lists them."""
    return list(_keys(cls, ""))


def _keys(cls: type[msgspec.Struct], prefix: str) -> Iterator[KeyDoc]:
    for field in _fields(cls).values():
        key = f"{prefix}{field.name}"
        default = None if field.required else msgspec.to_builtins(field.default)
        yield KeyDoc(key=key, type=type_name(field.type), required=field.required, default=default,
                     default_text=_default_text(field), meaning=field.meaning)
        table = _table(field.type)
        if table is not None:
            yield from _keys(table, f"{key}.")
        elif (tables := _tables_in(field.type)) is not None:
            kind, item = tables
            yield from _keys(item, f"{key}[]." if kind == "list" else f"{key}.<name>.")


def type_name(t: mi.Type) -> str:
    """A type as a TOML writer thinks of it: `integer`, `"a" | "b"`, `array of string`, `table`."""
    t = _unwrap(t)[0]
    match t:
        case mi.StrType():
            return "string"
        case mi.IntType():
            return "integer"
        case mi.FloatType():
            return "float"
        case mi.BoolType():
            return "boolean"
        case mi.LiteralType():
            return " | ".join(msgspec.json.encode(v).decode() for v in t.values)
        case mi.StructType():
            return "table"
        case mi.ListType():
            return f"array of {type_name(t.item_type)}"
        case mi.DictType():
            return f"table of {type_name(t.value_type)}"
        case mi.UnionType():
            return " or ".join(type_name(m) for m in t.types if not isinstance(m, mi.NoneType))
        case mi.AnyType():
            return "any"
    return type(t).__name__.removesuffix("Type").lower()


def _default_text(field: _Field) -> str:
    if field.required:
        return "(required)"
    if field.default is None:
        return "(unset)"
    if isinstance(field.default, msgspec.Struct):
        return "(table)"
    return _toml(msgspec.to_builtins(field.default))


def config_schema(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The config's JSON Schema (msgspec's, with each key's meaning), without the fields that are not keys."""
    schema: dict[str, Any] = msgspec.json.schema(cls)
    seen: set[type[msgspec.Struct]] = set()
    pending = [cls]
    while pending:
        table = pending.pop()
        if table in seen:
            continue
        seen.add(table)
        definition = schema.get("$defs", {}).get(table.__name__, {})
        keys = _fields(table)
        for name in list(definition.get("properties", {})):
            if name not in keys:
                del definition["properties"][name]
        if "required" in definition:
            definition["required"] = [name for name in definition["required"] if name in keys]
        for field in keys.values():
            nested = _table(field.type) or (_tables_in(field.type) or ("", None))[1]
            if nested is not None:
                pending.append(nested)
    return schema


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    return repr(value)


# ---------------------------------------------------------------------------------------------
# The pre-pass


def key_problems(data: Mapping[str, Any], cls: type[msgspec.Struct]) -> KeyProblems:
    """Every unknown, missing or mistyped key of `data` for the config `cls` (see the module docstring)."""
    problems: list[Problem] = []
    tables: list[str] = []
    cleaned = _check_table(data, cls, "", problems, tables, _everywhere(cls))
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], Problem("", f"... and {more} more problems with keys")]
    return KeyProblems(problems=problems, cleaned=cleaned, tables=tables)


def _check_table(data: Mapping[str, Any], cls: type[msgspec.Struct], where: str, problems: list[Problem],
                 tables: list[str], everywhere: Mapping[str, list[str]]) -> dict[str, Any]:
    fields = _fields(cls)
    cleaned: dict[str, Any] = {}
    own = False  # whether a key of this very table is in trouble (not one of a table inside it)
    for key, value in data.items():
        at = _join(where, _key_text(key))
        field = fields.get(key)
        if field is None:
            problems.append(Problem(at, "unknown key" + _suggestion(str(key), list(fields), everywhere)))
            own = True
            continue
        checked = _check_value(value, field, at, problems, tables, everywhere)
        if checked is _DROP:
            own = True
        else:
            cleaned[key] = checked
    for name, field in fields.items():
        if field.required and name not in data:
            problems.append(Problem(_join(where, name), "required key is missing"))
            own = True
    if own:
        tables.append(where)
    return cleaned


_DROP = object()  # a value with a problem: left out of the cleaned data


def _check_value(value: Any, field: _Field, at: str, problems: list[Problem], tables: list[str],
                 everywhere: Mapping[str, list[str]]) -> Any:
    table = _table(field.type)
    if table is not None and isinstance(value, Mapping):
        return _check_table(value, table, at, problems, tables, everywhere)
    nested = _tables_in(field.type)
    if nested is not None:
        kind, item = nested
        if kind == "list" and isinstance(value, list):
            return [_check_element(v, item, f"{at}[{i}]", problems, tables, everywhere) for i, v in enumerate(value)]
        if kind == "dict" and isinstance(value, Mapping):
            return {k: _check_element(v, item, f"{at}.{_key_text(k)}", problems, tables, everywhere)
                    for k, v in value.items()}
    try:
        msgspec.convert(value, field.python_type)
    except msgspec.ValidationError as exc:
        issue = validation_issue(str(exc))
        inner = issue.path if issue.located else ""
        where = at + inner if inner.startswith("[") else _join(at, inner)
        problems.append(Problem(where, issue.message))
        return _DROP
    return value


def _check_element(value: Any, cls: type[msgspec.Struct], at: str, problems: list[Problem], tables: list[str],
                   everywhere: Mapping[str, list[str]]) -> Any:
    if isinstance(value, Mapping):
        return _check_table(value, cls, at, problems, tables, everywhere)
    problems.append(Problem(at, f"expected a table, got {_toml_kind(value)}"))
    return value  # kept: the cleaned data then fails to decode, and the semantic checks are skipped


def _key_text(key: object) -> str:
    """A key of the file as it appears in a problem's path: cut when it is longer than a key should be."""
    text = str(key)
    return text if len(text) <= MAX_KEY_CHARS else f"{text[:MAX_KEY_CHARS]}...({len(text)} characters)"


def _toml_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


def _suggestion(key: str, siblings: list[str], everywhere: Mapping[str, list[str]]) -> str:
    """"; did you mean 'x'?" from the keys of the same table, else the key where it belongs elsewhere."""
    if len(key) > MAX_KEY_CHARS:
        return ""
    lowered = {s.lower(): s for s in siblings}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {lowered[close[0]]!r}?"
    if key in everywhere:
        places = everywhere[key]
        return f"; did you mean {places[0]!r}?" if len(places) == 1 else f" (it is a key of {', '.join(places)})"
    if siblings:
        return f" (expected one of: {', '.join(siblings)})"
    return ""


@cache
def _everywhere(cls: type[msgspec.Struct]) -> dict[str, list[str]]:
    """Key name → the full keys it is, for "this key belongs in another table" suggestions."""
    places: dict[str, list[str]] = {}
    for doc in config_keys(cls):
        places.setdefault(doc.key.rpartition(".")[2], []).append(doc.key)
    return places


def _join(where: str, key: str) -> str:
    if not key:
        return where
    return f"{where}.{key}" if where else key


def in_table(path: str, table: str) -> bool:
    """Whether the key at `path` (`pipelines[0].model`, `groups[1]`) is a key of `table` itself
    (`pipelines[0]`, "" for the top level), not of a table inside it."""
    return path.rpartition(".")[0] == table
