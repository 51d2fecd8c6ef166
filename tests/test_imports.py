"""Lint (ruff: pyflakes, pycodestyle, import order, the library never importing the CLI) and every module imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in (REPO / "dpo_ray").rglob("*.py")
    if p.name != "__init__.py"
)


def test_ruff_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "dpo_ray", "workflows", "tests",
                           "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    """Import cycles show only at import time, which ruff does not check."""
    assert importlib.import_module(module).__name__ == module
