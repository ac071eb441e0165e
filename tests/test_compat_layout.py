"""The compat wing's shape: it uses the core only through its public API, and its
functions stay short enough to review.

Static checks on the source (no import): every ``import``/``from ... import`` in
``fasttversky/compat`` that reaches the core names no ``_``-prefixed module or name, and
no ``fasttversky._x`` attribute is read; no function is longer than 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parents[1] / "fasttversky" / "compat"
FILES = sorted(COMPAT.rglob("*.py"))
MAX_FUNCTION_LINES = 80


def _package_of(path: Path) -> list[str]:
    """The package ``path`` belongs to (``fasttversky.compat.monai`` for monai/_base.py
    and for monai/__init__.py), split at the dots."""
    return list(path.relative_to(COMPAT.parent.parent).parts[:-1])


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
        for name in names:
            parts = name.split(".")
            in_core = parts[0] == "fasttversky" and parts[1:2] != ["compat"]
            if in_core and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"line {node.lineno}: {name}")
    return bad


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(COMPAT)) for p in FILES])
def test_compat_imports_only_the_public_core(path):
    assert not _core_privates(path), _core_privates(path)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(COMPAT)) for p in FILES])
def test_compat_functions_are_short(path):
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    # The checker itself: a private core import in a compat file is reported.
    fake = COMPAT / "monai" / "_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from ..._dispatch import BACKENDS\n")
    assert _core_privates(fake) == ["line 1: fasttversky._dispatch.BACKENDS"]
    monkeypatch.setattr(Path, "read_text", lambda self: "import fasttversky\nfasttversky._x\n")
    assert _core_privates(fake) == ["line 2: fasttversky._x"]
    monkeypatch.setattr(Path, "read_text", lambda self: "from .._common import plain\n")
    assert _core_privates(fake) == []
