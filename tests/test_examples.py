"""The example suite and script keep working (the parts that need no package index)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import build_wheel, make_project

if TYPE_CHECKING:
    import pytest

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


def first_python_block(markdown: str) -> str:
    """The first ```python block of a Markdown text."""
    match = re.search(r"```python\n(.*?)```", markdown, re.DOTALL)
    assert match, "no python block"
    return match[1]


def test_readme_first_example_tests_a_local_project_against_two_versions_of_a_dependency(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """The README's first example, run as written in a project `mycli` that depends on click:
    each test gets the project built and one of the two click versions. No index is reachable
    in tests, so the two click wheels are stand-ins built here (same names and versions, a
    module that has only ``__version__``), given through --isolation-option."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("7.1.2", "8.1.7"):
        build_wheel(wheels, "click", version, code=f"__version__ = {version!r}\n")
    make_project(
        pytester.path,
        "mycli",
        requires=["click"],
        scripts={"mycli": "mycli:main"},
        code="def main():\n    print('usage: mycli [--help]')\n",
    )
    pytester.makepyfile(test_readme=first_python_block((ROOT / "README.md").read_text()))
    result = pytester.runpytest(
        "--isolation-option",
        f"virtualenv.find_links=[{str(wheels)!r}]",
        "--isolation-option",
        "virtualenv.offline=true",
        "-v",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            f"isolation: virtualenv: building {pytester.path} (uv build): done in *",
            "*test_cli_with_each_click?7.1.2? PASSED*",
            "*test_cli_with_each_click?8.1.7? PASSED*",
        ]
    )
