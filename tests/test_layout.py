"""The layout a reviewer relies on: the app and compat wings use the core only through
its public API, and every function in the package stays short enough to review.

Static checks on the source (no import): every ``import``/``from ... import`` in
``fasttversky/app`` or ``fasttversky/compat`` that reaches the core names no
``_``-prefixed module or name, and no ``fasttversky._x`` attribute is read; no function
in ``fasttversky/`` (Triton kernels included) is longer than 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fasttversky"
WINGS = ("app", "compat")
WING_FILES = sorted(p for w in WINGS for p in (PACKAGE / w).rglob("*.py"))
FILES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 80


def _package_of(path: Path) -> list[str]:
    """The package ``path`` belongs to (``fasttversky.compat.monai`` for monai/_base.py
    and for monai/__init__.py), split at the dots."""
    return list(path.relative_to(PACKAGE.parent).parts[:-1])


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if node.level == 0:
        return node.module or ""
    package = _package_of(path)
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _core_privates(path: Path) -> list[str]:
    """Private core names reached from ``path``: (line) what."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = _absolute(node, path)
            names = [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"] if node.value.id == "fasttversky" else []
        else:
            continue
        wing = path.relative_to(PACKAGE).parts[0]
        for name in names:
            parts = name.split(".")
            in_core = parts[0] == "fasttversky" and parts[1:2] != [wing]
            private = [p for p in parts[1:] if p.startswith("_") and not p.endswith("__")]
            if in_core and private:
                bad.append(f"line {node.lineno}: {name}")
    return bad


@pytest.mark.parametrize("path", WING_FILES, ids=[str(p.relative_to(PACKAGE)) for p in WING_FILES])
def test_wings_import_only_the_public_core(path):
    assert not _core_privates(path), _core_privates(path)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_functions_are_short(path):
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    # The checker itself: a private core import in a compat file is reported.
    fake = PACKAGE / "compat" / "monai" / "_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from ..._dispatch import BACKENDS\n")
    assert _core_privates(fake) == ["line 1: fasttversky._dispatch.BACKENDS"]
    monkeypatch.setattr(Path, "read_text", lambda self: "import fasttversky\nfasttversky._x\n")
    assert _core_privates(fake) == ["line 2: fasttversky._x"]
    monkeypatch.setattr(Path, "read_text", lambda self: "from .._common import plain\n")
    assert _core_privates(fake) == []
    app_file = PACKAGE / "app" / "training" / "_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from ...functional import _prepare\n")
    assert _core_privates(app_file) == ["line 1: fasttversky.functional._prepare"]
