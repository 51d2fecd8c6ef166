"""Every library module imports, and every workflow script compiles (cheap guard against broken files)."""

from __future__ import annotations

import importlib
import py_compile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in (REPO / "dpo_ray").rglob("*.py")
    if p.name != "__init__.py"
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    assert importlib.import_module(module).__name__ == module


@pytest.mark.parametrize("script", sorted((REPO / "workflows").glob("*.py")), ids=lambda p: p.name)
def test_workflow_compiles(script):
    assert py_compile.compile(str(script), doraise=True)
