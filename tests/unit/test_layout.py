"""Packaging and module boundaries (house style)."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPONENTS = {"collector", "instrumentation", "trainer"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for component in COMPONENTS:
        for init in (ROOT / component).rglob("__init__.py"):
            dotted = ".".join(("tracetrain", *init.parent.relative_to(ROOT).parts))
            assert dotted in listed, f"{dotted} would silently drop out of the wheel"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_components_never_import_each_other(component):
    others = {f"tracetrain.{c}" for c in COMPONENTS - {component}}
    if component == "trainer":
        # The trainer runs agents (tracetrain rollout) and so uses the agent-side capture
        # library; it meets the collector only through the span tables.
        others.discard("tracetrain.instrumentation")
    allowed = {"tracetrain.instrumentation.semconv"}  # the leaf contract everyone reads
    for path in (ROOT / component).rglob("*.py"):
        for name in _imports(path):
            if any(name == o or name.startswith(o + ".") for o in others):
                assert name in allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_semconv_is_a_leaf():
    names = _imports(ROOT / "instrumentation" / "semconv.py")
    assert {name.split(".")[0] for name in names} <= {"__future__", "typing"}


def test_instrumentation_imports_only_otel_and_stdlib():
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "instrumentation").rglob("*.py"):
        if path.name == "cli.py":  # the `tracetrain run` launcher runs beside the agent, not inside it
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in stdlib or top in ("opentelemetry", "tracetrain", "wrapt"), f"{path.name} imports {name}"


def test_no_file_over_800_lines():
    for component in (*COMPONENTS, "tests", "examples", "bench"):
        for path in (ROOT / component).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 800, f"{path.relative_to(ROOT)} is over 800 lines"
