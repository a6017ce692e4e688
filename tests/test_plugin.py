"""The pytest surface: marker, fixtures, options, ini keys, scopes, summary."""

from __future__ import annotations

import pytest

from tests.conftest import Wheelhouse


def test_help_shows_the_isolation_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "isolated environments (pytest-isolation):",
            "*--isolation=ENGINE*",
            "*--isolation-keep=none|failed|all*",
            "*--isolation-require=ENGINE*",
        ]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.isolated(engine=None, **options):*"])


def test_fixture_without_marker_gets_a_basic_environment(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os

        def test_it(isolated_env):
            assert isolated_env.engine == "basic"
            result = isolated_env.run(["sh", "-c", "pwd; echo $HOME; echo $TMPDIR"]).check()
            cwd, home, tmp = result.stdout.split()
            assert cwd == str(isolated_env.path)
            assert home.startswith(str(isolated_env.path.parent))
            assert tmp.startswith(str(isolated_env.path.parent))
            assert os.path.isdir(home) and os.path.isdir(tmp)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
