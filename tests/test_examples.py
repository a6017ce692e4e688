"""The example suite and script keep working (the parts that need no package index)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_example_suite_passes_offline() -> None:
    """Every example that needs no network passes; the network one is deselected."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "examples",
            "-m",
            "not network",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 1 deselected" in result.stdout


def test_manager_script_runs_without_pytest() -> None:
    """The IsolationManager example creates a venv and tears it down."""
    result = subprocess.run(
        [sys.executable, "examples/manager_without_pytest.py"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "torn down: nothing is left behind" in result.stdout
    assert "/venv" in result.stdout
