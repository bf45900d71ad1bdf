"""The architecture, checked: who may import whom (an import walk over the source, no dependency).

    edge.tools ──► edge.cli ──► edge.fleet ──► edge (runtime) ──► models, sync
        (demo, bench, ...)   (the `edge` command)

Arrows point one way only. `models` and `sync` never import `edge`; the runtime and the fleet
never import the command line or the tools; the fleet's protocol, signing and archive modules
import neither the runtime nor onnxruntime; the pure decision modules never import nats; tools
use only the public names of each package. And the operator's commands really do not load
onnxruntime (checked in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge", "models", "sync")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


MODULES = source_modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str, *, at_import_time: bool) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import statement in `module`.

    `at_import_time`: only what runs when the module is imported: not under `if TYPE_CHECKING`,
    not inside a function (those are the deliberate lazy imports).
    """
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(nodes: list[ast.stmt]) -> Iterator[tuple[str, list[str]]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, []
            elif isinstance(node, ast.ImportFrom):
                yield _absolute(module, node), [alias.name for alias in node.names]
            elif isinstance(node, ast.If) and _is_type_checking(node):
                if not at_import_time:
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if not at_import_time:
                    yield from walk(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        yield from walk([c for c in children if isinstance(c, ast.stmt | ast.ExceptHandler)])  # type: ignore[misc]

    yield from walk(tree.body)


def _expand(target: str, names: list[str]) -> list[str]:
    """`from edge import fleet` imports the module edge.fleet: count it as such."""
    found = [target]
    found += [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return found


@cache
def closure(module: str) -> frozenset[str]:
    """Every module `module` loads when imported (parents included), ours and third parties' top names."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
        if current not in MODULES:
            continue
        for target, names in imports(current, at_import_time=True):
            for name in _expand(target, names):
                todo.append(name if name in MODULES else name.split(".")[0])
    return frozenset(seen)


def direct(module: str) -> set[str]:
    return {name for target, names in imports(module, at_import_time=False) for name in _expand(target, names)}


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


RUNTIME = [m for m in MODULES if in_package(m, "edge") and not any(
    in_package(m, p) for p in ("edge.cli", "edge.tools", "edge.fleet"))
    and m not in ("edge.__main__", "edge.chaos", "edge.cloudsim")]  # the command's entry and two tool aliases
FLEET = [m for m in MODULES if in_package(m, "edge.fleet")]
FLEET_PURE = ["edge.fleet._protocol", "edge.fleet._signing", "edge.fleet._archive", "edge.fleet._provision",
              "edge.fleet._desired", "edge.fleet._rollout"]
RUNTIME_PROPER = {"edge._runtime", "edge._pipeline", "edge._approvals", "edge._deployments", "edge._ladder",
                  "edge._nats_server", "edge.fleet._service"}
PURE_DECISIONS = ["edge._rules", "edge._ladder", "edge._governance", "edge._link", "edge._inputs", "edge._codec"]
TOOLS = [m for m in MODULES if in_package(m, "edge.tools")]


def test_the_walk_sees_the_layers() -> None:
    """The checks below are only as good as the walk: it must find what we know is there."""
    assert {"edge._runtime", "edge.fleet._service", "edge.cli._main", "edge.tools.demo"} <= set(MODULES)
    assert "edge.fleet" in direct("edge._runtime")
    assert "onnxruntime" in direct("models._session")  # the lazy import, inside a function
    assert "onnxruntime" not in closure("models")  # ... that importing the package does not run
    assert "nats" in closure("edge._runtime") and "edge._config" in closure("edge.fleet._archive")


@pytest.mark.parametrize("package", ["models", "sync"])
def test_models_and_sync_never_import_edge(package: str) -> None:
    for module in (m for m in MODULES if in_package(m, package)):
        assert not any(in_package(i, "edge") for i in direct(module)), module


@pytest.mark.parametrize("module", RUNTIME + FLEET)
def test_runtime_and_fleet_never_import_the_cli_or_the_tools(module: str) -> None:
    bad = {i for i in direct(module) if in_package(i, "edge.cli") or in_package(i, "edge.tools")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", FLEET_PURE)
def test_fleet_protocol_signing_and_archive_load_neither_the_runtime_nor_onnxruntime(module: str) -> None:
    loaded = closure(module)
    assert not loaded & RUNTIME_PROPER, f"{module} loads {sorted(loaded & RUNTIME_PROPER)}"
    assert "onnxruntime" not in loaded


@pytest.mark.parametrize("module", PURE_DECISIONS)
def test_pure_decision_modules_never_import_nats(module: str) -> None:
    assert "nats" not in closure(module), module


@pytest.mark.parametrize("module", TOOLS)
def test_tools_use_only_public_names(module: str) -> None:
    public = {p: set(getattr(__import__(p, fromlist=["__all__"]), "__all__", [])) for p in
              ("edge", "edge.fleet", "edge.cli", "models", "sync")}
    for target, names in imports(module, at_import_time=False):
        if in_package(target, "edge.tools") or not any(in_package(target, p) for p in PACKAGES):
            continue  # a tool's own modules, or a third party's
        if any(part.startswith("_") for part in target.split(".")):
            pytest.fail(f"{module} imports the private module {target}")
        if target in public:
            private = [n for n in names if n not in public[target]]
            assert not private, f"{module} imports {private} from {target}, which are not in its __all__"


def test_tests_import_public_names_from_the_door() -> None:
    """A test may unit-test a private module, but a name the package exports comes from its door."""
    public = {p: set(__import__(p, fromlist=["__all__"]).__all__) for p in ("edge", "edge.fleet", "models", "sync")}
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                door = node.module.rsplit("._", 1)[0] if "._" in node.module else None
                if door in public and any(alias.name in public[door] for alias in node.names):
                    offenders.append(f"{path.name}: from {node.module} import ...")
    assert not offenders, offenders


@pytest.mark.parametrize("argv", [["fleet", "ls", "--help"], ["fleet", "rollout", "status", "--help"],
                                  ["audit", "tail", "--help"], ["check", "BUNDLED"]])
def test_operator_commands_do_not_load_onnxruntime(argv: list[str]) -> None:
    """In a fresh interpreter, as an operator's laptop would run them."""
    code = (
        "import sys\n"
        "from edge import BUNDLED_CONFIG\n"
        "from edge.cli import main\n"
        f"argv = [str(BUNDLED_CONFIG) if a == 'BUNDLED' else a for a in {argv!r}]\n"
        "try:\n"
        "    code = main(argv)\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "print('ORT' if 'onnxruntime' in sys.modules else 'NO-ORT', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "NO-ORT 0", result.stdout + result.stderr


def test_loading_a_model_does_load_onnxruntime() -> None:
    """The other side of the check above: the probe would notice onnxruntime."""
    code = ("import sys\nfrom models import bundled_model_path, load_model\n"
            "load_model(bundled_model_path('pump-anomaly'))\nprint('onnxruntime' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stdout + result.stderr
