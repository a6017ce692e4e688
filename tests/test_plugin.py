"""The pytest surface: marker, fixtures, options, ini keys, scopes, summary."""

from __future__ import annotations

import pytest


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


UNAVAILABLE_ENGINE = """
import pytest
from pytest_isolation import Availability
from pytest_isolation.engines.basic import BasicEngine

class GhostEngine(BasicEngine):
    name = "ghost"

    def availability(self):
        return Availability(False, reason="the ghost daemon is not running",
                            fix="start ghostd")

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(GhostEngine)
"""


def test_marker_options_reach_the_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("basic", env={"GREETING": "hi"}, inherit_env=["KEEP_*"])
        def test_it(isolated_env):
            out = isolated_env.run("env").stdout
            assert "GREETING=hi" in out
            assert "KEEP_ME=1" in out
            assert "SECRET_TOKEN" not in out
        """
    )
    monkeypatch.setenv("KEEP_ME", "1")
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t")
    pytester.runpytest().assert_outcomes(passed=1)


def test_unknown_engine_on_the_command_line_lists_engines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(isolated_env): pass")
    result = pytester.runpytest("--isolation=dokcer")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*unknown isolation engine 'dokcer'; available engines: basic, docker, kubernetes, "
            "sandbox, virtualenv*--isolation*"
        ]
    )


def test_unknown_engine_in_a_marker_is_a_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("dokcer")
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_unknown_engine_in_a_marker_is_a_collection_error.py::test_it: unknown isolation "
            "engine 'dokcer'; available engines: basic, docker, kubernetes, sandbox, "
            "virtualenv*"
        ]
    )


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        (
            '"basic", memory="1G"',
            "*test_it*does not accept option 'memory'; allowed options: "
            "env, inherit_env, keep, keep_ttl, limits, network, scope*",
        ),
        ('"basic", limits={"memory": "12XB"}', "*test_it*limits.memory: '12XB' is not a size*"),
        ('"basic", limits={"pids": -1}', "*test_it*pids must be positive*"),
        (
            '"basic", scope="class"',
            "*test_it*option 'scope'*expected one of function, module, session*",
        ),
        ('"basic", inherit_env=7', "*test_it*option 'inherit_env'*expected a list of strings*"),
        ('"basic", "virtualenv"', "*test_it*takes the engine as its only positional argument*"),
        ("engine=3", "*test_it*the engine must be a name*"),
    ],
)
def test_bad_marker_options_are_collection_errors(
    pytester: pytest.Pytester, marker: str, expected: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated({marker})
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting*", expected])


@pytest.mark.parametrize(
    ("args", "environ", "ini", "expected"),
    [
        (["--isolation-keep=sometimes"], {}, "", "*keep policy 'sometimes'*--isolation-keep*"),
        ([], {"PYTEST_ISOLATION_KEEP": "sometimes"}, "", "*PYTEST_ISOLATION_KEEP*"),
        ([], {}, "isolation_keep = sometimes", "*isolation_keep in *tox.ini*"),
        (["--isolation-keep-ttl=later"], {}, "", "*'later' is not a duration*"),
        (
            ["--isolation-option=virtualenv.pythn=3.12"],
            {},
            "",
            "*does not accept option 'pythn'*--isolation-option*",
        ),
        (["--isolation-option=dokcer.image=x"], {}, "", "*unknown isolation engine 'dokcer'*"),
    ],
)
def test_bad_settings_are_usage_errors_naming_their_source(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    environ: dict[str, str],
    ini: str,
    expected: str,
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile("def test_it(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_precedence_marker_cli_env_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker beats --isolation, which beats the env var, which beats the ini key."""
    pytester.makeini("[pytest]\nisolation = ghost\n")
    pytester.makeconftest(UNAVAILABLE_ENGINE.replace("Availability(False", "Availability(True"))
    pytester.makepyfile(
        """
        import pytest

        def test_default(isolated_env, request):
            assert isolated_env.engine == request.config.getoption("expected")

        @pytest.mark.isolated("basic")
        def test_marker(isolated_env):
            assert isolated_env.engine == "basic"
        """
    )
    pytester.makeconftest(
        UNAVAILABLE_ENGINE.replace("Availability(False", "Availability(True")
        + "\ndef pytest_addoption(parser):\n    parser.addoption('--expected')\n"
    )
    pytester.runpytest("--expected=ghost").assert_outcomes(passed=2)
    monkeypatch.setenv("PYTEST_ISOLATION", "basic")
    pytester.runpytest("--expected=basic").assert_outcomes(passed=2)
    pytester.runpytest("--expected=ghost", "--isolation=ghost").assert_outcomes(passed=2)


def test_unavailable_engine_skips_with_reason_and_fix(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(UNAVAILABLE_ENGINE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("ghost")
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*isolation engine 'ghost' is unavailable: the ghost daemon is not running; start ghostd*"]
    )


@pytest.mark.parametrize("how", ["cli", "env", "ini"])
def test_require_switch_turns_the_skip_into_a_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    pytester.makeconftest(UNAVAILABLE_ENGINE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("ghost")
        def test_it(isolated_env):
            pass
        """
    )
    args = []
    if how == "cli":
        args = ["--isolation-require=basic,ghost"]
    elif how == "env":
        monkeypatch.setenv("PYTEST_ISOLATION_REQUIRE", "ghost")
    else:
        pytester.makeini("[pytest]\nisolation_require = ghost\n")
    result = pytester.runpytest(*args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*isolation engine 'ghost' is unavailable*(required by *)*"])


def test_scopes_share_environments(pytester: pytest.Pytester) -> None:
    """function: one per test; module: one per module; session: one for the run."""
    test_code = """
        import pytest

        @pytest.mark.isolated(scope="function")
        def test_function_1(isolated_env, seen):
            seen.setdefault("function", set()).add(isolated_env.id)

        @pytest.mark.isolated(scope="function")
        def test_function_2(isolated_env, seen):
            seen.setdefault("function", set()).add(isolated_env.id)

        @pytest.mark.isolated(scope="module")
        def test_module_1(isolated_env, seen):
            seen.setdefault("module_" + __name__, set()).add(isolated_env.id)

        @pytest.mark.isolated(scope="module")
        def test_module_2(isolated_env, seen):
            seen.setdefault("module_" + __name__, set()).add(isolated_env.id)

        @pytest.mark.isolated(scope="session")
        def test_session(isolated_env, seen):
            seen.setdefault("session", set()).add(isolated_env.id)
    """
    pytester.makepyfile(test_a=test_code, test_b=test_code)
    pytester.makeconftest(
        """
        import pytest

        SEEN = {}

        @pytest.fixture
        def seen():
            return SEEN

        def pytest_sessionfinish(session):
            assert len(SEEN["function"]) == 4
            assert len(SEEN["module_test_a"]) == 1
            assert len(SEEN["module_test_b"]) == 1
            assert SEEN["module_test_a"] != SEEN["module_test_b"]
            assert len(SEEN["session"]) == 1
            print("SCOPES-OK")
        """
    )
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(["*SCOPES-OK*", "*7 environment(s) (basic: 7)*"])


def test_module_scope_lives_until_the_module_ends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.mark.isolated(scope="module")
        def test_write(isolated_env):
            isolated_env.write_file("note.txt", "from test_write")
            (isolated_env.path.parent.parent / "where").write_text(str(isolated_env.path))

        @pytest.mark.isolated(scope="module")
        def test_read(isolated_env):
            assert isolated_env.read_file("note.txt") == b"from test_write"
        """,
        test_b="""
        import os
        def test_gone(isolated_env):
            path = (isolated_env.path.parent.parent / "where").read_text()
            os.remove(isolated_env.path.parent.parent / "where")
            assert not os.path.exists(path)
        """,
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=3)


def test_marked_test_gets_an_environment_without_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated
        def test_it():
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 environment(s) (basic: 1)*"])


def test_isolation_manager_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(isolation_manager, isolated_env):
            assert isolation_manager.get(isolated_env.id) is isolated_env
            assert isolated_env in isolation_manager.list()
            assert isolation_manager.status(isolated_env.id).value == "ready"
            assert isolation_manager.validate(isolated_env.id) == []
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_summary_lists_the_slowest_setups(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_it(isolated_env, n):
            pass
        """
    )
    result = pytester.runpytest("--isolation-durations=2")
    result.stdout.fnmatch_lines(
        [
            "*= isolation =*",
            "4 environment(s) (basic: 4); set-up took *s",
            "slowest 2 set-up(s):",
            "*ms  basic *test_it[[]*]",
            "*ms  basic *test_it[[]*]",
        ]
    )
    result = pytester.runpytest("--isolation-durations=0")
    result.stdout.no_fnmatch_line("slowest * set-up(s):")


def test_usage_reports_time_cpu_and_memory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys

        def test_it(isolated_env):
            code = "b = bytearray(300 * 1024 * 1024); import time; time.sleep(0.1)"
            isolated_env.run([sys.executable, "-c", code]).check()
            usage = isolated_env.usage()
            assert usage.commands == 1
            assert usage.setup_duration > 0
            assert usage.command_time >= 0.1
            assert usage.cpu_time is not None and usage.cpu_time > 0
            assert usage.peak_memory is not None and usage.peak_memory >= 300 * 1024 * 1024
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_xdist_workers_share_the_run_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_it(isolated_env, isolation_manager, n):
            assert isolated_env.path.is_dir()
            name = isolated_env.path.parent.name
            assert name.startswith("pytest-isolation-" + isolation_manager.session_id[:8])
        """
    )
    result = pytester.runpytest("-n", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*6 environment(s) (basic: 6)*"])


def test_clash_with_pytest_isolated_is_explained(pytester: pytest.Pytester) -> None:
    """A plugin registered as 'isolated' (pytest-isolated's name) stops the run with advice."""
    pytester.makepyfile(isolated="", test_it="def test_it(): pass")
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "isolated")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pytest-isolated*also installed*same @pytest.mark.isolated marker*-p no:isolated*"]
    )
