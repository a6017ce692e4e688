"""Inside mode is observed exactly as in-process: each test runs the same suite both ways.

Every test here runs pytest twice on the same files, plainly and with
``--isolation=sandbox --isolation-inside`` (a real sandbox per test), and
compares what pytest and its plugins report: outcomes, summary and report
lines, warnings, junitxml, coverage.  The cases are the bug reports of
pytest-forked, pytest-xdist and pytest-subtests, replayed: values JSON cannot
carry, subtests, warnings, coverage, fixtures across modules, pytest-timeout,
pytest-rerunfailures, --pdb, faulthandler, Ctrl-C in an embedded run,
pytest.exit, orphans, what a test may write, and what the plugin imports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

INSIDE = ("--isolation=sandbox", "--isolation-inside", "--isolation-require=sandbox")
#: Seconds one pytest run may take.
TIMEOUT = 300
#: Summary and report lines that differ between two runs for reasons of their own.
_NOISE = re.compile(r" in \d+\.\d+s| \(\d+:\d\d:\d\d\)|^=+ isolation =+$")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def normalized(result: pytest.RunResult) -> list[str]:
    """The lines a user reads about outcomes: progress, report and summary lines, without
    timings and the plugin's own section."""
    kept = []
    skipping = False
    for line in result.outlines:
        if line.startswith("=") and "isolation" in line:
            skipping = True
            continue
        if skipping and line.startswith("="):
            skipping = False
        if skipping or line.startswith(("platform ", "rootdir:", "plugins:", "cachedir:")):
            continue
        kept.append(_ADDRESS.sub(" at 0x...", _NOISE.sub("", line)).rstrip())
    return kept


def both(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, pytest.RunResult]:
    """The same run plainly and inside, each in a pytest process of its own (so that
    nothing of this run, its warning filters for one, reaches them)."""
    run = pytester.runpytest_subprocess
    return run(*args, timeout=TIMEOUT), run(*args, *INSIDE, timeout=TIMEOUT)


def assert_same(here: pytest.RunResult, inside: pytest.RunResult) -> None:
    assert here.parseoutcomes() == inside.parseoutcomes()
    assert normalized(here) == normalized(inside)
    assert here.ret == inside.ret


# --- 1. values JSON cannot carry ---------------------------------------------------------------


def test_a_value_json_cannot_carry_travels_as_its_repr_and_the_run_goes_on(
    pytester: pytest.Pytester,
) -> None:
    """record_property with an enum and a Path: the child reports, exits, and the run (one
    session, one summary) goes on; the value arrives as its repr, with a warning."""
    pytester.makepyfile(
        """
        import enum
        from pathlib import Path

        class Shade(enum.Enum):
            DARK = 1

        def test_properties(record_property):
            record_property("shade", Shade.DARK)
            record_property("where", Path("/some/where"))

        def test_next():
            pass
        """
    )
    here, inside = both(pytester, "--junitxml=report.xml", "-p", "no:warnings")
    assert here.parseoutcomes() == {"passed": 2}
    assert inside.parseoutcomes() == {"passed": 2, "warnings": 2}  # one per value carried
    assert sum("passed" in line and line.startswith("=") for line in inside.outlines) == 1
    properties = {
        p.get("name"): p.get("value")
        for p in ET.parse(pytester.path / "report.xml").iter("property")
    }
    assert properties["shade"] == "<Shade.DARK: 1>"
    assert properties["where"] == "PosixPath('/some/where')"
    inside.stdout.fnmatch_lines(
        ["*could not be carried from inside its environment and is shown as its repr*"]
    )


def test_a_value_json_cannot_carry_under_xdist(pytester: pytest.Pytester) -> None:
    """Under xdist, the same value never aborts the run ("no active workers")."""
    pytester.makepyfile(
        """
        import enum

        class Shade(enum.Enum):
            DARK = 1

        def test_properties(record_property):
            record_property("shade", Shade.DARK)

        def test_other():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", *INSIDE, timeout=TIMEOUT)
    result.assert_outcomes(passed=2)
    assert "no active workers" not in result.stdout.str()


# --- 2. subtests ---------------------------------------------------------------------------------


SUBTESTS = """
def test_subtests(subtests):
    for n in range(3):
        with subtests.test(msg="n", n=n):
            assert n != 1

def test_plain():
    pass
"""


def test_a_failing_subtest_fails_inside_as_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUBTESTS)
    here, inside = both(pytester, "-rA")
    assert_same(here, inside)
    assert inside.parseoutcomes()["failed"] >= 1
    inside.stdout.fnmatch_lines(["*SUBFAILED*test_subtests*"])


# --- 3. warnings ---------------------------------------------------------------------------------


WARNS = """
import warnings

def test_warns():
    warnings.warn("careful here", UserWarning)

def test_deprecated():
    warnings.warn("old way", DeprecationWarning)
"""


def test_warnings_reach_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(WARNS)
    here, inside = both(pytester)
    assert_same(here, inside)
    inside.stdout.fnmatch_lines(["*warnings summary*", "*UserWarning: careful here*"])


def test_warnings_as_errors_fail_as_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(WARNS)
    here, inside = both(pytester, "-W", "error::UserWarning")
    assert_same(here, inside)
    assert inside.parseoutcomes() == {"failed": 1, "passed": 1, "warnings": 1}


# --- 4. coverage ---------------------------------------------------------------------------------


def test_coverage_of_code_run_inside_is_collected(pytester: pytest.Pytester) -> None:
    """pytest-cov's report is the same: the lines a test ran inside count as run."""
    pytester.makepyfile(
        shapes="""
        def area(w, h):
            if w < 0:
                raise ValueError("negative")
            return w * h

        def unused():
            return 1
        """,
        test_shapes="""
        import shapes

        def test_area():
            assert shapes.area(2, 3) == 6
        """,
    )
    args = ("--cov=shapes", "--cov-report=term-missing", "-p", "no:cacheprovider")
    here, inside = both(pytester, *args)
    assert here.ret == inside.ret == 0

    def table(result: pytest.RunResult) -> list[str]:
        return [line for line in result.outlines if line.startswith(("shapes", "TOTAL"))]

    assert table(here) == table(inside), (table(here), table(inside))
    assert any("67%" in line for line in table(inside)), table(inside)
    assert not list(pytester.path.glob(".coverage.*")), "left uncombined"


# --- 5. fixtures across modules ------------------------------------------------------------------


def test_the_runners_setup_stack_stays_in_step(pytester: pytest.Pytester) -> None:
    """A module fixture set up by a plain test, an inside test that ends the module, then
    plain tests in the next module: no "previous item was not torn down properly", and
    each fixture torn down once, where it was set up."""
    pytester.makeconftest(
        """
        import os
        import pytest

        @pytest.fixture(scope="module")
        def resource(request):
            print(f"UP {request.module.__name__} {os.getpid()}")
            yield
            print(f"DOWN {request.module.__name__} {os.getpid()}")
        """
    )
    pytester.makepyfile(
        test_a="""
        import pytest

        def test_plain(resource):
            pass

        @pytest.mark.isolated("sandbox", inside=True)
        def test_inside(resource):
            pass
        """,
        test_b="""
        def test_plain_next(resource):
            pass

        def test_plain_last():
            pass
        """,
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", timeout=TIMEOUT)
    result.assert_outcomes(passed=4)
    events = re.findall(r"(UP|DOWN) test_a (\d+)", result.stdout.str())
    assert [event for event, _ in events] == ["UP", "DOWN"], events
    assert len({pid for _, pid in events}) == 1, f"set up and torn down apart: {events}"


# --- 6. pytest-timeout ---------------------------------------------------------------------------


def test_pytest_timeout_fires_in_the_test_not_the_runner(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        def test_slow():
            time.sleep(30)

        def test_next():
            pass
        """
    )
    here, inside = both(
        pytester, "--timeout=1", "--timeout-method=signal", "-p", "no:cacheprovider"
    )
    assert "INTERNALERROR" not in inside.stdout.str()
    assert here.parseoutcomes() == inside.parseoutcomes() == {"failed": 1, "passed": 1}
    inside.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout*"])


# --- 7. pytest-rerunfailures ---------------------------------------------------------------------


def test_rerunfailures_reruns_inside_and_a_rerun_that_passed_keeps_nothing(
    pytester: pytest.Pytester,
) -> None:
    """pytest-rerunfailures reruns the test where it runs; with --isolation-keep=failed the
    environment of a test that passed on its rerun is not kept."""
    pytester.makepyfile(
        """
        ATTEMPTS = []

        def test_flaky():
            ATTEMPTS.append(1)
            assert len(ATTEMPTS) > 1, "first time"
        """
    )
    here, inside = both(pytester, "--reruns=2", "-p", "no:cacheprovider", "--isolation-keep=failed")
    assert here.parseoutcomes() == inside.parseoutcomes() == {"passed": 1, "rerun": 1}
    assert_same(here, inside)
    assert "kept for debugging" not in inside.stdout.str()


# --- 8. --pdb and faulthandler -------------------------------------------------------------------


def test_pdb_works_in_the_test_inside(pytester: pytest.Pytester) -> None:
    """--pdb stops in the failing test inside (it has the terminal's input) as in-process."""
    pytester.makepyfile(
        """
        def test_fails():
            value = 41
            assert value == 42
        """
    )
    results = []
    for extra in ((), INSIDE):
        results.append(
            pytester.run(
                sys.executable,
                "-m",
                "pytest",
                "--pdb",
                "-p",
                "no:cacheprovider",
                *extra,
                stdin=b"p value + 1\ncontinue\n",
                timeout=120,
            )
        )
    for result in results:
        result.stdout.fnmatch_lines(["*(Pdb) 42*"])
        result.assert_outcomes(failed=1)


def test_faulthandler_timeout_dumps_the_test_not_the_runner(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        def test_hangs_a_while():
            time.sleep(2.5)
        """
    )
    here, inside = both(pytester, "-o", "faulthandler_timeout=1")
    for result in (here, inside):
        result.assert_outcomes(passed=1)
        result.stderr.fnmatch_lines(["*Timeout*", "*test_hangs_a_while*"])
    assert "_follow" not in inside.stderr.str() and "receive" not in inside.stderr.str()


# --- 9. embedded runs ----------------------------------------------------------------------------


def test_ctrl_c_in_an_embedded_run_leaves_no_child_behind(pytester: pytest.Pytester) -> None:
    """pytest.main() in a long-lived process (an IDE): after Ctrl-C, nothing the inside
    test started outlives the call, while the process goes on."""
    pytester.makepyfile(
        test_long="""
        import subprocess, time

        def test_long():
            subprocess.Popen(["sleep", "300.5137"])
            time.sleep(300)

        def test_next():  # made ahead, waiting, when Ctrl-C comes
            pass
        """
    )
    pytester.makeconftest(RECORD_ROOTS)
    script = pytester.makepyfile(
        host="""
        import os, signal, sys, threading, time
        import psutil, pytest

        threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        code = pytest.main(["test_long.py", "-p", "no:cacheprovider",
                            "--isolation=sandbox", "--isolation-inside"])
        time.sleep(0.5)
        me = psutil.Process()
        left = [p.pid for p in me.children(recursive=True) if p.status() != "zombie"]
        sleeping = [p.pid for p in psutil.process_iter(["cmdline"])
                    if p.info["cmdline"] == ["sleep", "300.5137"]]
        print("RESULT", int(code), left, sleeping)
        """
    )
    result = pytester.run(sys.executable, str(script), timeout=60)
    line = next(line for line in result.outlines if line.startswith("RESULT"))
    assert line == "RESULT 2 [] []", line
    roots = (pytester.path / "roots.txt").read_text().split()
    assert len(roots) == 2
    assert [root for root in roots if Path(root).exists()] == []


# --- 10. the fork of a multi-threaded runner -----------------------------------------------------


def test_forking_a_runner_with_threads_blames_nothing_on_the_test(
    pytester: pytest.Pytester,
) -> None:
    """On Python 3.12+ a fork with threads alive warns (a DeprecationWarning): the fork is
    the plugin's, so neither the warnings summary nor -W error shows it."""
    pytester.makeconftest(
        """
        import threading, time
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        """
    )
    pytester.makepyfile("def test_it():\n    pass\n")
    here, inside = both(pytester, "-W", "error::DeprecationWarning")
    assert_same(here, inside)
    assert "multi-threaded" not in inside.stdout.str()


# --- 11. pytest.exit -----------------------------------------------------------------------------


def test_pytest_exit_inside_stops_the_run_with_its_status(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_first():
            pytest.exit("database is down", returncode=3)

        def test_second():
            pass
        """
    )
    here, inside = both(pytester, "-p", "no:cacheprovider")
    assert here.ret == inside.ret == 3
    assert here.parseoutcomes() == inside.parseoutcomes()
    inside.stdout.fnmatch_lines(["*database is down*"])
    assert "test_second" not in inside.stdout.str()


# --- 12. orphans are reaped ----------------------------------------------------------------------


def test_a_background_process_that_ends_is_reaped(pytester: pytest.Pytester) -> None:
    """The test body is not PID 1: an orphan it leaves is reaped, not left a zombie."""
    pytester.makepyfile(
        """
        import os, subprocess, time

        def test_orphan_goes_away():
            shell = subprocess.run(["sh", "-c", "sleep 0.2 & echo $!"],
                                   capture_output=True, text=True, check=True)
            orphan = int(shell.stdout)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{orphan}"):
                assert time.monotonic() < deadline, open(f"/proc/{orphan}/status").read()
                time.sleep(0.05)
        """
    )
    here, inside = both(pytester)
    assert_same(here, inside)
    inside.assert_outcomes(passed=1)


# --- 13. what a test may write -------------------------------------------------------------------


WRITES = """
import os, pathlib, tempfile

def test_tmp_path(tmp_path):
    (tmp_path / "a").write_text("a")

def test_tempfile():
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(b"x")

def test_home_cache():
    cache = pathlib.Path.home() / ".cache" / "tool"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "entry").write_text("x")
"""


def test_a_test_writes_where_it_would_in_process(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmp_path, tempfile (TMPDIR outside /tmp), HOME's caches and a --basetemp inside
    the project (as tox passes) work inside; the host's HOME is left alone."""
    pytester.makepyfile(WRITES)
    elsewhere = tmp_path / "elsewhere-tmp"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    (pytester.path / ".tox" / "py").mkdir(parents=True)  # as tox makes it
    for args in ((), ("--basetemp=.tox/py/tmp",)):
        here, inside = both(pytester, "-p", "no:cacheprovider", *args)
        assert_same(here, inside)
        inside.assert_outcomes(passed=3)


def test_hypothesis_keeps_its_example_database(pytester: pytest.Pytester) -> None:
    pytest.importorskip("hypothesis")
    pytester.makepyfile(
        """
        from hypothesis import given, strategies as st

        @given(st.integers())
        def test_property(n):
            assert n == n
        """
    )
    here, inside = both(pytester, "-p", "no:cacheprovider")
    assert_same(here, inside)
    assert "in-memory" not in inside.stdout.str()
    assert (pytester.path / ".hypothesis").is_dir()


def test_tempfile_knows_its_directory_as_in_process(pytester: pytest.Pytester) -> None:
    """tempfile found its directory before the test, in the runner: inside it is the
    sandbox's /tmp, known as well, so the test sees no probe file made and unlinked
    (click's suite watches os.unlink around its pager's temporary file)."""
    pytester.makepyfile(
        """
        import os, tempfile

        def test_no_probe(monkeypatch):
            unlinked = []
            monkeypatch.setattr(os, "unlink", lambda *args, **kwargs: unlinked.append(args))
            with tempfile.NamedTemporaryFile(delete=False) as handle:
                name = handle.name
            assert unlinked == []
            monkeypatch.undo()
            os.unlink(name)
        """
    )
    here, inside = both(pytester)
    assert_same(here, inside)
    inside.assert_outcomes(passed=1)


# --- 14. tmp_path litter -------------------------------------------------------------------------


def test_inside_tests_share_one_base_temporary_directory(pytester: pytest.Pytester) -> None:
    """Every test inside makes its tmp_path in the run's one base temporary directory, as
    in-process: no numbered folder per test left for pytest's rotation."""
    pytester.makepyfile(
        "".join(f"def test_{i}(tmp_path):\n    (tmp_path / 'x').touch()\n\n" for i in range(8))
    )
    listings = []
    for name, extra in (("here", ()), ("inside", INSIDE)):
        base = pytester.path / name
        result = pytester.runpytest_subprocess(
            f"--basetemp={base}", "-p", "no:cacheprovider", *extra, timeout=TIMEOUT
        )
        result.assert_outcomes(passed=8)
        listings.append(sorted(p.name for p in base.iterdir()))
    assert listings[0] == listings[1]
    assert len(listings[1]) == 16, listings[1]  # test_N0 and its test_Ncurrent link, for 8


# --- 15. imports at load time --------------------------------------------------------------------


def test_loading_the_plugin_imports_nothing_coverage_would_miss() -> None:
    """Loading the plugin imports none of filelock, psutil or yaml (a suite measuring its
    own coverage with --cov=filelock would see its module bodies as missed)."""
    code = (
        "import sys, pytest_isolation.plugin\n"
        "print(sorted(m for m in ('filelock', 'psutil', 'yaml') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# --- 16. the next test, made ahead -------------------------------------------------------------

#: Each test leaves a mark in pytest's base temporary directory (writable inside) when it runs.
MARKS = """
import os, pytest

def mark(request, tmp_path_factory):
    (tmp_path_factory.getbasetemp() / request.node.name).touch()

def test_first(request, tmp_path_factory):
    mark(request, tmp_path_factory)

def test_fails(request, tmp_path_factory):
    mark(request, tmp_path_factory)
    assert False

def test_after(request, tmp_path_factory):
    mark(request, tmp_path_factory)

def test_last(request, tmp_path_factory):
    mark(request, tmp_path_factory)
"""

RECORD_ROOTS = """
def pytest_isolation_env_created(env):
    with open("roots.txt", "a") as roots:
        roots.write(f"{env.root}\\n")
"""


@pytest.mark.parametrize("stop", [["-x"], ["--maxfail=1"], ["--sw-reset"]])
def test_a_test_made_ahead_never_runs_when_the_run_stops_before_it(
    pytester: pytest.Pytester, stop: list[str]
) -> None:
    """The next test's worker waits, made ahead, while one runs: when the run stops after
    a failure (-x, --maxfail, --sw) it never starts, and its environment goes."""
    pytester.makepyfile(test_marks=MARKS)
    pytester.makeconftest(RECORD_ROOTS)
    ran = {}
    results = []
    base = pytester.path / "base"  # emptied by each run
    for name, extra in (("here", ()), ("inside", INSIDE)):
        result = pytester.runpytest_subprocess(f"--basetemp={base}", *stop, *extra, timeout=TIMEOUT)
        results.append(result)
        ran[name] = sorted(p.name for p in base.iterdir() if p.name.startswith("test_"))
    assert_same(*results)
    assert ran["here"] == ran["inside"] == ["test_fails", "test_first"]
    roots = (pytester.path / "roots.txt").read_text().split()
    assert len(roots) == 3  # test_after's too, made ahead
    assert [root for root in roots if Path(root).exists()] == []


def test_an_environment_made_ahead_that_fails_is_its_own_tests_error_in_order(
    pytester: pytest.Pytester,
) -> None:
    """The next test's environment is made while one runs; when that fails, the error is
    the next test's set-up error, reported after the running test, as in-process."""
    pytester.makeconftest(
        """
        def pytest_isolation_env_creating(spec):
            if spec.options.get("hostname") == "broken":
                raise RuntimeError("no sandbox named broken today")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        def test_a():
            pass

        @pytest.mark.isolated("sandbox", hostname="broken")
        def test_b():
            pass

        def test_c():
            pass
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-v", "-rA", f"--junitxml={junit}", *INSIDE, timeout=TIMEOUT
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_a PASSED*",
            "*::test_b ERROR*",
            "*::test_c PASSED*",
            "*ERROR at setup of test_b*",
            "*RuntimeError: no sandbox named broken today*",
        ]
    )
    cases = ET.parse(junit).getroot().iter("testcase")
    assert [(case.get("name"), [c.tag for c in case]) for case in cases] == [
        ("test_a", []),
        ("test_b", ["error"]),
        ("test_c", []),
    ]


# --- a real suite, both ways ---------------------------------------------------------------------


def test_a_suite_of_every_kind_of_test_has_identical_outcomes(pytester: pytest.Pytester) -> None:
    """A few hundred generated tests: fixtures of every scope, parametrize, skip and xfail,
    warnings, subtests, capsys, monkeypatch, tmp_path, classes and modules."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def session_value():
            return {"count": 0}

        @pytest.fixture(scope="module")
        def module_value(session_value):
            session_value["count"] += 1
            return session_value["count"]

        @pytest.fixture
        def function_value(module_value):
            return module_value * 10
        """
    )
    body = textwrap.dedent(
        """
        import os, warnings
        import pytest

        @pytest.fixture(scope="class")
        def class_value():
            return "class"

        @pytest.mark.parametrize("n", range(12))
        def test_param(n, function_value, tmp_path):
            (tmp_path / "f").write_text(str(n))
            assert n % 7 != 6 or n == 6

        @pytest.mark.parametrize("n", range(6))
        def test_fail_some(n):
            assert n % 5 != 4

        def test_skip():
            pytest.skip("not here")

        @pytest.mark.xfail(reason="known", strict=False)
        def test_xfail():
            assert False

        @pytest.mark.xfail(reason="passes", strict=False)
        def test_xpass():
            pass

        def test_warn():
            warnings.warn("from a test", UserWarning)

        def test_capsys(capsys):
            print("hello")
            assert capsys.readouterr().out == "hello\\n"

        def test_monkeypatch(monkeypatch):
            monkeypatch.setenv("SOME_VALUE", "1")
            assert os.environ["SOME_VALUE"] == "1"

        def test_subtests(subtests):
            for n in range(3):
                with subtests.test(n=n):
                    assert n != 2

        class TestGroup:
            @pytest.mark.parametrize("n", range(5))
            def test_method(self, n, class_value):
                assert class_value == "class"

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_error(broken):
            pass
        """
    )
    pytester.makepyfile(**{f"test_module_{m}": body for m in range(8)})
    here, inside = both(pytester, "-rA", "-p", "no:cacheprovider")
    outcomes = here.parseoutcomes()
    assert outcomes["passed"] >= 200, outcomes
    assert_same(here, inside)


def test_json_is_what_the_channel_carries() -> None:
    """The channel's encoding never fails: what JSON cannot carry becomes its repr."""
    from pytest_isolation.inside.channel import portable

    lossy: list[str] = []
    carried = portable({"a": {1, 2}, 3: Path("/x"), "ok": [1, "b", None]}, lossy)
    assert json.loads(json.dumps(carried)) == {
        "a": "{1, 2}",
        "3": "PosixPath('/x')",
        "ok": [1, "b", None],
    }
    assert lossy == ["a: set", "3: PosixPath"]
