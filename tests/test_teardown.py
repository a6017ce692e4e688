"""Teardown you can trust: whatever ends a test or a run, nothing is left behind.

Most tests drive pytest as a user would (``pytester``); signals need a real
process of their own, so those start ``python -m pytest`` and signal it.  Every
inner test writes the root folder of its environment to ``roots.txt`` so that
the outer test can check the folder itself, not only what pytest reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, ClassVar, TypeVar

import pluggy
import psutil
import pytest

from pytest_isolation import (
    Engine,
    EnvironmentCreationError,
    EnvStatus,
    IsolatedEnvironment,
    IsolationManager,
    Resources,
    TeardownError,
    hookspecs,
)
from pytest_isolation import engines as builtin_engines
from pytest_isolation.engines.basic import LOCAL_OPTIONS, LocalEnvironment, make_root
from pytest_isolation.manager import signals_deferred
from tests.conftest import DAEMONS, cli, sleep_command, wait_for

if TYPE_CHECKING:
    from pytest_isolation import EnvSpec, Ledger, ResourceRecord

T = TypeVar("T")

#: Seconds to wait for something a child process does (start-up included).
PATIENCE = 30.0

#: Lets an inner test module tell the outer test where its environment lives.
REMEMBER = '''
from pathlib import Path

def remember(env):
    """Append the root folder of ``env`` to roots.txt beside this file."""
    with open(Path(__file__).with_name("roots.txt"), "a") as out:
        out.write(str(env.root) + "\\n")
'''


# --- helpers ----------------------------------------------------------------------------------


def roots(pytester: pytest.Pytester) -> list[Path]:
    """The root folders the inner tests reported, in order (complete lines only: a child
    process may be writing the next one)."""
    listing = pytester.path / "roots.txt"
    if not listing.exists():
        return []
    return [Path(line) for line in listing.read_text().split("\n")[:-1] if line]


def complete_line(path: Path) -> str | None:
    """The content of ``path`` once a writer has finished its line, else None."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text.strip() if text.endswith("\n") else None


def roots_when(pytester: pytest.Pytester, count: int) -> list[Path] | None:
    made = roots(pytester)
    return made if len(made) >= count else None


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def pytest_process(pytester: pytest.Pytester, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``python -m pytest`` run in ``pytester.path``, output to ``output.txt``; killed and
    waited for when the block ends, whatever happened in it."""
    with (pytester.path / "output.txt").open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=PATIENCE)


def output_of(pytester: pytest.Pytester) -> str:
    return (pytester.path / "output.txt").read_text(errors="replace")


def wait_for_root(pytester: pytest.Pytester) -> Path:
    """The root of the first environment, once the inner test has reported it."""
    return wait_for(lambda: roots(pytester)[0] if roots(pytester) else None, "the inner test")


# --- 1. the end of a test ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        pytest.param(
            "def test_it(isolated_env):\n    remember(isolated_env)\n",
            {"passed": 1},
            id="passing",
        ),
        pytest.param(
            "def test_it(isolated_env):\n    remember(isolated_env)\n    assert False\n",
            {"failed": 1},
            id="failing",
        ),
        pytest.param(
            "import pytest\n\n"
            "@pytest.fixture\n"
            "def broken(isolated_env):\n"
            "    remember(isolated_env)\n"
            "    raise RuntimeError('another fixture broke')\n\n"
            "def test_it(isolated_env, broken):\n    pass\n",
            {"errors": 1},
            id="setup-error-after-env",
        ),
    ],
)
def test_env_is_removed_at_the_end_of_the_test(
    pytester: pytest.Pytester, isolation_state: Ledger, body: str, outcome: dict[str, int]
) -> None:
    """Whether the test passes, fails or errors in set-up, its environment is removed."""
    pytester.makepyfile(REMEMBER + "\n" + body)
    pytester.runpytest().assert_outcomes(**outcome)
    [root] = roots(pytester)
    assert not root.exists()
    assert isolation_state.records() == []


def test_env_is_removed_when_the_test_raises_keyboard_interrupt(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A KeyboardInterrupt in a test interrupts the run and still removes its environment."""
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
    raise KeyboardInterrupt
"""
    )
    # pytester re-raises an inner Ctrl-C unless told not to
    result = pytester.runpytest(no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    [root] = roots(pytester)
    assert not root.exists()
    assert isolation_state.records() == []


# --- 1b. daemons: what left the command's process group ---------------------------------------

#: The inner test: start the daemon, check it runs on after its command and was recorded.
DAEMON_TEST = """
import json, time
import psutil
import pytest

def daemons():
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == {argv!r}]

@pytest.mark.isolated({engine!r})
def test_it(isolated_env):
    isolated_env.run({command!r}).check()
    deadline = time.monotonic() + 10
    while not daemons() and time.monotonic() < deadline:
        time.sleep(0.01)
    (daemon,) = daemons()
    assert daemon.is_running()
    recorded = [
        r.identifier for r in isolated_env.resources.records
        if r.kind == "process" and r.data.get("orphan")
    ]
    with open("daemon.json", "w") as note:
        json.dump({{"pid": daemon.pid, "recorded": recorded}}, note)
"""


@pytest.mark.parametrize("engine", ["basic", "virtualenv"])
@pytest.mark.parametrize("daemon", list(DAEMONS))
def test_a_daemon_a_command_started_is_recorded_and_killed_at_teardown(
    pytester: pytest.Pytester, isolation_state: Ledger, engine: str, daemon: str
) -> None:
    """setsid, a job-control shell's nohup, start_new_session and a double fork all leave the
    command's process group; the daemon runs on for the rest of the test, is recorded in the
    ledger, and is killed (and reaped) when its environment is torn down."""
    argv = sleep_command()
    command = [part.format(sleep=" ".join(argv)) for part in DAEMONS[daemon]]
    pytester.makepyfile(DAEMON_TEST.format(engine=engine, argv=argv, command=command))
    pytester.runpytest().assert_outcomes(passed=1)
    note = json.loads((pytester.path / "daemon.json").read_text())
    if daemon != "daemon-with-worker":  # the worker is the daemon's child, not the runner's
        assert str(note["pid"]) in note["recorded"]
    assert not psutil.pid_exists(note["pid"])  # killed and reaped, not left a zombie
    assert [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == argv] == []
    assert isolation_state.records() == []


def test_teardown_reaps_no_child_of_the_tests_own(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A process the test itself started (not through its environment) is left to the test:
    teardown neither kills nor reaps it, so the test's wait() sees its real exit status."""
    pytester.makepyfile(
        """
        import subprocess, time
        import pytest

        def test_it(isolated_env):
            mine = subprocess.Popen(["sh", "-c", "sleep 0.3; exit 7"], start_new_session=True)
            isolated_env.run(["sh", "-c", "setsid sleep 60 >/dev/null 2>&1 &"]).check()
            done = subprocess.Popen(["sh", "-c", "exit 5"], start_new_session=True)
            time.sleep(0.1)  # a zombie of the test's own when the environment goes
            isolated_env.run(["true"]).check()
            with open("codes.txt", "w") as out:
                out.write(f"{done.wait()} ")
            test_it.mine = mine

        def test_later():
            assert test_it.mine.wait(timeout=10) == 7
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)
    assert (pytester.path / "codes.txt").read_text() == "5 "
    assert isolation_state.records() == []


# --- 2. SIGTERM -------------------------------------------------------------------------------


def test_sigterm_ends_the_run_and_removes_the_env(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """SIGTERM to a running pytest interrupts it, and the environment is torn down first."""
    pytester.makepyfile(
        REMEMBER
        + """
import time

def test_it(isolated_env):
    remember(isolated_env)
    time.sleep(60)
"""
    )
    with pytest_process(pytester) as process:
        root = wait_for_root(pytester)
        assert root.is_dir()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=PATIENCE)
    assert returncode == pytest.ExitCode.INTERRUPTED, output_of(pytester)
    assert not root.exists()
    assert isolation_state.records() == []


def test_sigterm_during_run_kills_the_command(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """SIGTERM while ``env.run()`` waits for a command kills the command and removes the env."""
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
    isolated_env.run(["sh", "-c", "echo $$ > command.pid; exec sleep 60"])
"""
    )
    with pytest_process(pytester) as process:
        root = wait_for_root(pytester)
        pid_file = root / "workspace" / "command.pid"
        command = psutil.Process(int(wait_for(lambda: complete_line(pid_file), "the command")))
        try:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=PATIENCE)
            assert returncode == pytest.ExitCode.INTERRUPTED, output_of(pytester)
            wait_for(lambda: gone(command), "the command to be killed", timeout=5)
        finally:
            with contextlib.suppress(psutil.Error):
                command.kill()
    assert not root.exists()
    assert isolation_state.records() == []


# --- 3. SIGKILL: leftovers for the next run and for cleanup ----------------------------------


def test_sigkill_leaves_a_leftover_that_cleanup_removes_with_its_command(
    pytester: pytest.Pytester, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After SIGKILL the env and its running command are leftovers; `list` shows them,
    `cleanup --dry-run` only names them, `cleanup` kills the command's group and removes all."""
    # The watchdog reaps a killed run at once (test_watchdog.py); here it is killed too,
    # as by the OOM killer taking both: what is left waits for cleanup and the next run.
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
    isolated_env.run(["sh", "-c", "sleep 60 & echo $! > sleep.pid; wait"], timeout=120)
"""
    )
    survivors: list[psutil.Process] = []
    try:
        with pytest_process(pytester) as process:
            root = wait_for_root(pytester)
            pid_file = root / "workspace" / "sleep.pid"
            sleep_pid = wait_for(lambda: complete_line(pid_file), "the background sleep")
            record = wait_for(
                lambda: next((r for r in isolation_state.records() if r.kind == "process"), None),
                "the command's ledger record",
            )
            shell = psutil.Process(int(record.identifier))
            sleeper = psutil.Process(int(sleep_pid))
            survivors += [shell, sleeper]
            # the command runs in its own process group: the one cleanup must kill
            assert os.getpgid(sleeper.pid) == shell.pid
            process.kill()
            process.wait(timeout=PATIENCE)
        assert root.is_dir()
        assert not gone(shell)
        assert not gone(sleeper)
        kinds = sorted((r.kind, r.identifier) for r in isolation_state.records())
        assert kinds == [("directory", str(root)), ("process", str(shell.pid))]

        doctor = cli("doctor")
        assert "2 leftover or kept resource(s)" in doctor.stdout

        listing = cli("list")
        assert listing.returncode == 0, listing.stderr
        assert "leftover" in listing.stdout
        assert str(root) in listing.stdout
        assert f"process: {shell.pid}" in listing.stdout

        dry = cli("cleanup", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove directory {root}" in dry.stdout
        assert f"would remove process {shell.pid}" in dry.stdout
        assert root.is_dir()
        assert not gone(sleeper)
        assert len(isolation_state.records()) == 2

        cleanup = cli("cleanup")
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        assert f"removed directory {root}" in cleanup.stdout
        assert f"removed process {shell.pid}" in cleanup.stdout
        assert not root.exists()
        assert isolation_state.records() == []
        wait_for(lambda: gone(shell) and gone(sleeper), "the command's group to die", timeout=5)
    finally:
        for survivor in survivors:
            with contextlib.suppress(psutil.Error):
                survivor.kill()


def test_cleanup_kills_what_a_command_left_in_its_group_after_the_command_ended(
    pytester: pytest.Pytester, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed run's command started a background process and then ended on its own: cleanup
    must still kill the background process, which lives on in the command's process group."""
    # The watchdog reaps a killed run at once (test_watchdog.py); here it is killed too,
    # as by the OOM killer taking both: what is left waits for cleanup and the next run.
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
    isolated_env.run(
        ["sh", "-c", "sleep 60 & echo $! > sleep.pid; while [ ! -e go ]; do sleep 0.02; done"],
        timeout=120,
    )
"""
    )
    survivors: list[psutil.Process] = []
    try:
        with pytest_process(pytester) as process:
            root = wait_for_root(pytester)
            pid_file = root / "workspace" / "sleep.pid"
            sleep_pid = wait_for(lambda: complete_line(pid_file), "the background sleep")
            record = wait_for(
                lambda: next((r for r in isolation_state.records() if r.kind == "process"), None),
                "the command's ledger record",
            )
            shell = psutil.Process(int(record.identifier))
            sleeper = psutil.Process(int(sleep_pid))
            survivors += [shell, sleeper]
            process.kill()
            process.wait(timeout=PATIENCE)
        (root / "workspace" / "go").touch()  # the command ends; its background sleep does not
        # wait until it is reaped too: a zombie would still answer to its pid
        wait_for(lambda: not shell.is_running(), "the command to end and be reaped")
        assert not gone(sleeper)
        assert os.getpgid(sleeper.pid) == shell.pid

        cleanup = cli("cleanup")
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        assert not root.exists()
        assert isolation_state.records() == []
        wait_for(lambda: gone(sleeper), "the background sleep to be killed", timeout=5)
    finally:
        for survivor in survivors:
            with contextlib.suppress(psutil.Error):
                survivor.kill()


def test_next_run_sweeps_the_leftover_of_a_killed_run(
    pytester: pytest.Pytester, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new run releases the environment a SIGKILLed run left, at session start."""
    # The watchdog reaps a killed run at once (test_watchdog.py); here it is killed too,
    # as by the OOM killer taking both: what is left waits for cleanup and the next run.
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    killed = pytester.makepyfile(
        REMEMBER
        + """
import time

def test_it(isolated_env):
    remember(isolated_env)
    time.sleep(60)
"""
    )
    with pytest_process(pytester) as process:
        root = wait_for_root(pytester)
        process.kill()
        process.wait(timeout=PATIENCE)
    assert root.is_dir()
    assert len(isolation_state.records()) == 1

    killed.unlink()
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["isolation: released 1 leftover resource(s) of ended runs"])
    assert not root.exists()
    assert isolation_state.records() == []


# --- 4. keeping environments for debugging ----------------------------------------------------


def test_keep_failed_keeps_the_env_of_a_failing_test_only(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """--isolation-keep=failed keeps (and names) a failing test's env, not a passing one's."""
    pytester.makepyfile(
        REMEMBER
        + """
def test_a_passes(isolated_env):
    remember(isolated_env)

def test_b_fails(isolated_env):
    remember(isolated_env)
    assert False
"""
    )
    result = pytester.runpytest_subprocess("--isolation-keep=failed")
    result.assert_outcomes(passed=1, failed=1)
    passed_root, failed_root = roots(pytester)
    try:
        result.stdout.fnmatch_lines(
            [
                "*kept for debugging (remove with `pytest-isolation cleanup`):",
                f"  test_keep_failed_keeps_the_env_of_a_failing_test_only.py::test_b_fails: "
                f"{failed_root}",
            ]
        )
        assert str(passed_root) not in result.stdout.str()
        assert not passed_root.exists()
        assert failed_root.is_dir()
        [record] = isolation_state.records()
        assert record.identifier == str(failed_root)
        assert record.kept
        assert record.kept_until is not None
        assert record.kept_until > time.time() + 3600  # the default TTL is a day
    finally:
        cleanup = cli("cleanup")
    assert f"removed directory {failed_root}" in cleanup.stdout
    assert not failed_root.exists()
    assert isolation_state.records() == []


def test_marker_keep_all_keeps_a_passing_tests_env_until_cleanup(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """keep="all" on the marker keeps a passing test's env; `cleanup` removes kept envs."""
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated(keep="all")
def test_it(isolated_env):
    remember(isolated_env)
"""
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    [root] = roots(pytester)
    try:
        result.stdout.fnmatch_lines(["*kept for debugging*", f"*::test_it: {root}"])
        assert root.is_dir()
        [record] = isolation_state.records()
        assert record.kept
        listing = cli("list")
        assert "kept (" in listing.stdout
    finally:
        cleanup = cli("cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"removed directory {root}" in cleanup.stdout
    assert not root.exists()
    assert isolation_state.records() == []


def test_expired_kept_env_is_swept_by_the_next_run_but_a_fresh_one_is_not(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A kept env past its --isolation-keep-ttl goes at the next run's start; one within stays."""
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
"""
    )
    try:
        pytester.runpytest_subprocess(
            "--isolation-keep=all", "--isolation-keep-ttl=1h"
        ).assert_outcomes(passed=1)
        pytester.runpytest_subprocess(
            "--isolation-keep=all", "--isolation-keep-ttl=1s"
        ).assert_outcomes(passed=1)
        fresh, expiring = roots(pytester)
        assert fresh.is_dir()
        assert expiring.is_dir()
        until = {r.identifier: r.kept_until for r in isolation_state.records()}
        deadline = until[str(expiring)]
        assert deadline is not None
        time.sleep(max(0.0, deadline - time.time()) + 0.1)

        result = pytester.runpytest_subprocess()
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["isolation: released 1 leftover resource(s) of ended runs"])
        assert not expiring.exists()
        assert fresh.is_dir()
        assert [r.identifier for r in isolation_state.records()] == [str(fresh)]
    finally:
        cli("cleanup")
    assert not fresh.exists()


def test_marker_keep_ttl_sets_how_long_one_environment_is_kept(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """keep_ttl= in the marker beats --isolation-keep-ttl for that environment."""
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated(keep="all", keep_ttl="90s")
def test_it(isolated_env):
    remember(isolated_env)
"""
    )
    try:
        before = time.time()
        pytester.runpytest_subprocess("--isolation-keep-ttl=1d").assert_outcomes(passed=1)
        (record,) = isolation_state.records()
        assert record.kept_until is not None
        assert before + 90 <= record.kept_until <= time.time() + 90
    finally:
        cli("cleanup")


def test_an_env_kept_in_an_interrupted_run_is_listed_in_the_summary(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """keep="all" and a Ctrl-C: the env is kept, and the summary still says where it is, since
    that is the only place a user learns the path."""
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated(keep="all")
def test_it(isolated_env):
    remember(isolated_env)
    raise KeyboardInterrupt
"""
    )
    result = pytester.runpytest_subprocess()
    [root] = roots(pytester)
    try:
        assert result.ret == pytest.ExitCode.INTERRUPTED
        assert root.is_dir()
        [record] = isolation_state.records()
        assert record.kept
        result.stdout.fnmatch_lines(["*kept for debugging*", f"*::test_it: {root}"])
    finally:
        cli("cleanup")
    assert not root.exists()


# --- 5. teardown errors -----------------------------------------------------------------------


def test_teardown_hook_error_is_reported_and_the_env_still_removed(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """An exception in pytest_isolation_env_teardown is a teardown ERROR; the env goes anyway."""
    pytester.makeconftest(
        """
def pytest_isolation_env_teardown(env):
    raise RuntimeError("the teardown hook broke")
"""
    )
    pytester.makepyfile(
        REMEMBER
        + """
def test_it(isolated_env):
    remember(isolated_env)
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_it*",
            "*TeardownError: teardown of environment * failed:",
            "*RuntimeError: the teardown hook broke",
        ]
    )
    [root] = roots(pytester)
    assert not root.exists()
    assert isolation_state.records() == []


def test_a_failing_teardown_does_not_stop_the_next_one(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """When the first of two environments (function, then module scope) fails to tear down,
    the second is still torn down, and both folders are gone."""
    pytester.makeconftest(
        """
torn_down = []

def pytest_isolation_env_teardown(env):
    torn_down.append(env.spec.scope)
    if len(torn_down) == 1:
        raise RuntimeError(f"first teardown ({env.spec.scope}) broke")
"""
    )
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated(scope="module")
def test_module_env(isolated_env):
    remember(isolated_env)

def test_function_env(isolated_env):
    remember(isolated_env)
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*RuntimeError: first teardown (function) broke"])
    module_root, function_root = roots(pytester)
    assert not function_root.exists()
    assert not module_root.exists()
    assert isolation_state.records() == []


FLAKY_ENGINE = """
import pytest
from pytest_isolation import Engine
from pytest_isolation.engines.basic import LOCAL_OPTIONS, LocalEnvironment, make_root

class FlakyEngine(Engine):
    name = "flaky"
    options = LOCAL_OPTIONS

    def create(self, spec, env_id, resources):
        root = make_root(self, env_id, resources)
        resources.add("widget", f"widget-{env_id}")
        return LocalEnvironment(env_id=env_id, spec=spec, resources=resources, root=root)

    def release(self, record):
        if record.kind == "widget":
            raise RuntimeError(f"cannot release {record.identifier}")
        super().release(record)

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(FlakyEngine)
"""


def test_a_resource_that_fails_to_release_is_reported_and_stays_in_the_ledger(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A release() that raises is a teardown ERROR naming it; its record stays for cleanup while
    the env's other resources are released."""
    pytester.makeconftest(FLAKY_ENGINE)
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated("flaky")
def test_it(isolated_env):
    remember(isolated_env)
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*TeardownError: teardown of environment * failed:",
            "*RuntimeError: cannot release widget-*",
        ]
    )
    [root] = roots(pytester)
    assert not root.exists()
    [record] = isolation_state.records()
    assert record.kind == "widget"
    assert record.engine == "flaky"
    isolation_state.remove(record)  # it names nothing real


# --- 6. hook order ----------------------------------------------------------------------------

RECORDING_CONFTEST = """
import json
import os
from pathlib import Path

FAIL = os.environ.get("FAIL_IN_HOOK")
roots = {}

def log(*entry):
    with open(Path(__file__).with_name("hooks.jsonl"), "a") as out:
        out.write(json.dumps(entry) + "\\n")

def pytest_isolation_env_creating(spec):
    log("creating", spec.engine)
    if FAIL == "creating":
        raise RuntimeError("creating hook says no")

def pytest_isolation_env_created(env):
    roots[env.id] = env.root
    log("created", env.id, str(env.root), env.status.value, env.root.is_dir())
    if FAIL == "created":
        raise RuntimeError("created hook says no")

def pytest_isolation_env_teardown(env):
    log("teardown", env.id, env.status.value, env.root.is_dir())

def pytest_isolation_env_destroyed(env_id, error):
    log("destroyed", env_id, error is None, roots[env_id].exists())
"""


def hook_calls(pytester: pytest.Pytester) -> list[list[object]]:
    log = pytester.path / "hooks.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_hooks_fire_in_order_with_matching_env_ids(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """creating, created, teardown, destroyed: in that order, for the same env, error None."""
    pytester.makeconftest(RECORDING_CONFTEST)
    pytester.makepyfile("def test_it(isolated_env):\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    creating, created, teardown, destroyed = hook_calls(pytester)
    assert creating == ["creating", "basic"]
    env_id, root = created[1], Path(str(created[2]))
    assert created == ["created", env_id, str(root), "ready", True]
    assert teardown == ["teardown", env_id, "tearing down", True]
    assert destroyed == ["destroyed", env_id, True, False]
    assert isolation_state.records() == []


def test_created_hook_error_is_a_setup_error_and_the_env_is_torn_down(
    pytester: pytest.Pytester, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If pytest_isolation_env_created raises, the test errors in set-up and the env it was
    given is torn down (destroyed fires, the folder is gone)."""
    monkeypatch.setenv("FAIL_IN_HOOK", "created")
    pytester.makeconftest(RECORDING_CONFTEST)
    pytester.makepyfile("def test_it(isolated_env):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_it*", "*created hook says no*"])
    names = [call[0] for call in hook_calls(pytester)]
    assert names == ["creating", "created", "teardown", "destroyed"]
    _, created, _, destroyed = hook_calls(pytester)
    assert destroyed == ["destroyed", created[1], True, False]
    assert not Path(str(created[2])).exists()
    assert isolation_state.records() == []


def test_creating_hook_error_is_a_setup_error_and_nothing_is_made(
    pytester: pytest.Pytester,
    isolation_state: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """If pytest_isolation_env_creating raises, the test errors in set-up and nothing exists."""
    monkeypatch.setenv("FAIL_IN_HOOK", "creating")
    # a temp dir of its own, so that no other run's folders can blur the picture
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    pytester.makeconftest(RECORDING_CONFTEST)
    pytester.makepyfile("def test_it(isolated_env):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_it*", "*creating hook says no*"])
    assert hook_calls(pytester) == [["creating", "basic"]]
    assert list(private_tmp.iterdir()) == []
    assert not isolation_state.root.exists()  # not a single record was ever written


# --- 7. third-party engines -------------------------------------------------------------------

MY_ENGINE = """
import pytest
from pytest_isolation import Engine
from pytest_isolation.engines.basic import LOCAL_OPTIONS, LocalEnvironment, make_root

class MyEnvironment(LocalEnvironment):
    made_by = "first"

class MyEngine(Engine):
    name = "myengine"
    options = LOCAL_OPTIONS
    environment = MyEnvironment

    def create(self, spec, env_id, resources):
        root = make_root(self, env_id, resources)
        return self.environment(env_id=env_id, spec=spec, resources=resources, root=root)
"""


def test_a_conftest_engine_is_usable_by_marker_and_by_option(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """registry.register(MyEngine) in a conftest makes "myengine" usable in
    @pytest.mark.isolated("myengine") and as --isolation=myengine."""
    pytester.makeconftest(
        MY_ENGINE
        + """
@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(MyEngine)
"""
    )
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated("myengine")
def test_marker(isolated_env):
    remember(isolated_env)
    assert isolated_env.engine == "myengine"
    assert type(isolated_env).__name__ == "MyEnvironment"
    assert isolated_env.run("pwd").check().stdout.strip() == str(isolated_env.path)

def test_default(isolated_env):
    remember(isolated_env)
    assert isolated_env.engine == "myengine"
"""
    )
    pytester.runpytest("-k", "test_marker").assert_outcomes(passed=1)
    pytester.runpytest("-k", "test_default", "--isolation=myengine").assert_outcomes(passed=1)
    result = pytester.runpytest("-k", "test_default")
    result.assert_outcomes(failed=1)  # without the option, the default engine is basic
    assert len(roots(pytester)) == 3
    assert not any(root.exists() for root in roots(pytester))
    assert isolation_state.records() == []


TWICE_CONFTEST = (
    MY_ENGINE
    + """
class OtherEngine(MyEngine):
    pass

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(MyEngine)
    registry.register(OtherEngine)
"""
)


def test_registering_a_taken_name_without_replace_is_an_error(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A second engine under a registered name, without replace=True, stops the run with an
    error that says how to override."""
    pytester.makeconftest(TWICE_CONFTEST)
    pytester.makepyfile("def test_it():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret != pytest.ExitCode.OK
    output = result.stdout.str() + result.stderr.str()
    assert "engine 'myengine' is registered twice" in output
    assert "pass replace=True to override" in output
    assert " passed" not in output
    assert isolation_state.records() == []


def test_registering_a_taken_name_is_a_usage_error_not_an_internal_error(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """The clash is the user's configuration mistake: pytest should say so as a usage error
    (like an unknown engine), not as an INTERNALERROR traceback that blames a plugin bug."""
    pytester.makeconftest(TWICE_CONFTEST)
    pytester.makepyfile("def test_it():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *engine 'myengine' is registered twice*"])
    assert "INTERNALERROR" not in result.stderr.str()


def test_taking_a_builtin_name_without_replace_is_an_error_in_a_root_conftest_too(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """An engine that happens to be called "basic", registered without replace=True, is a
    clash ("replace=True to override a built-in", docs/extending.md), as it already is from
    a deeper conftest, instead of silently replacing the built-in for the whole run."""
    pytester.makeconftest(
        MY_ENGINE
        + """
class Accidental(MyEngine):
    name = "basic"

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(Accidental)
"""
    )
    pytester.makepyfile(
        "def test_it(isolated_env):\n    assert type(isolated_env).__name__ == 'LocalEnvironment'\n"
    )
    result = pytester.runpytest()
    assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    output = result.stdout.str() + result.stderr.str()
    assert "engine 'basic' is registered twice" in output
    assert isolation_state.records() == []


def test_replace_true_overrides_an_engine(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """register(..., replace=True) overrides an engine of the same name, a built-in one too."""
    pytester.makeconftest(
        MY_ENGINE
        + """
class Second(MyEnvironment):
    made_by = "second"

class SecondEngine(MyEngine):
    environment = Second

class MyBasic(SecondEngine):
    name = "basic"

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(MyEngine)
    registry.register(SecondEngine, replace=True)
    registry.register(MyBasic, replace=True)
"""
    )
    pytester.makepyfile(
        REMEMBER
        + """
import pytest

@pytest.mark.isolated("myengine")
def test_mine(isolated_env):
    remember(isolated_env)
    assert isolated_env.made_by == "second"

def test_basic(isolated_env):
    remember(isolated_env)
    assert isolated_env.engine == "basic"
    assert isolated_env.made_by == "second"
"""
    )
    pytester.runpytest().assert_outcomes(passed=2)
    assert not any(root.exists() for root in roots(pytester))
    assert isolation_state.records() == []


def test_a_subdirectory_conftest_cannot_replace_an_engine_for_the_whole_run(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """Engines are run-wide: a conftest.py found during collection may add engines but not
    replace one, which would change it for tests outside its directory too."""
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text(
        MY_ENGINE
        + """
class MyBasic(MyEngine):
    name = "basic"

@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(MyBasic, replace=True)
"""
    )
    (sub / "test_inside.py").write_text("def test_inside(isolated_env):\n    pass\n")
    pytester.makepyfile(test_outside="def test_outside(isolated_env):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*MyBasic replaces engine 'basic' after the run started*rootdir conftest.py or a plugin*"]
    )
    assert isolation_state.records() == []


def test_a_subdirectory_conftest_may_add_an_engine(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """A new engine name from a deeper conftest.py serves the tests that ask for it."""
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text(
        MY_ENGINE
        + """
@pytest.hookimpl
def pytest_isolation_register_engines(registry):
    registry.register(MyEngine)
"""
    )
    (sub / "test_inside.py").write_text(
        "import pytest\n\n@pytest.mark.isolated('myengine')\n"
        "def test_inside(isolated_env):\n    assert isolated_env.engine == 'myengine'\n"
    )
    pytester.runpytest().assert_outcomes(passed=1)
    assert isolation_state.records() == []


# --- 8. IsolationManager without pytest -------------------------------------------------------


def test_manager_context_destroys_every_env_at_exit(isolation_state: Ledger) -> None:
    """Leaving ``with IsolationManager()`` tears down every environment it made."""
    with IsolationManager() as manager:
        first = manager.create("basic")
        second = manager.create()
        paths = [first.path, second.path]
        assert all(path is not None and path.is_dir() for path in paths)
        assert len(isolation_state.records()) == 2
    assert not any(path is not None and path.exists() for path in paths)
    assert first.status is EnvStatus.DESTROYED
    assert second.status is EnvStatus.DESTROYED
    assert manager.list() == []
    assert isolation_state.records() == []


def test_manager_context_destroys_every_env_after_an_exception(isolation_state: Ledger) -> None:
    """An exception inside the ``with`` block propagates, and the environments still go."""
    made: list[IsolatedEnvironment] = []

    def use_and_fail() -> None:
        with IsolationManager() as manager:
            made.append(manager.create("basic"))
            raise LookupError("the block failed")

    with pytest.raises(LookupError, match="the block failed"):
        use_and_fail()
    [env] = made
    assert env.path is not None
    assert not env.path.exists()
    assert isolation_state.records() == []


class HalfwayEngine(Engine):
    """Makes a directory, then fails: what a buggy or unlucky engine does."""

    name = "halfway"
    made: ClassVar[list[Path]] = []
    failure: ClassVar[type[BaseException]] = RuntimeError

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> IsolatedEnvironment:
        folder = self.context.temp_dir / f"pytest-isolation-halfway-{env_id}"
        resources.add("directory", str(folder))
        folder.mkdir()
        (folder / "data").write_text("half made")
        type(self).made.append(folder)
        raise self.failure("the engine gave up half way")


def test_failed_create_leaves_nothing_and_raises_creation_error(isolation_state: Ledger) -> None:
    """An engine that fails after making a directory: the directory and its record are gone,
    and the caller gets EnvironmentCreationError caused by the engine's error."""
    HalfwayEngine.made = []
    with IsolationManager() as manager:
        manager.registry.register(HalfwayEngine)
        with pytest.raises(EnvironmentCreationError, match="the engine gave up") as info:
            manager.create("halfway")
        assert isinstance(info.value.__cause__, RuntimeError)
        assert manager.list() == []
    [folder] = HalfwayEngine.made
    assert not folder.exists()
    assert isolation_state.records() == []


def test_interrupted_create_leaves_nothing_and_propagates_the_interrupt(
    isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt during an engine's create still releases what it made, and stays a
    KeyboardInterrupt."""
    HalfwayEngine.made = []
    monkeypatch.setattr(HalfwayEngine, "failure", KeyboardInterrupt)
    with IsolationManager() as manager:
        manager.registry.register(HalfwayEngine)
        with pytest.raises(KeyboardInterrupt):
            manager.create("halfway")
    [folder] = HalfwayEngine.made
    assert not folder.exists()
    assert isolation_state.records() == []


@contextlib.contextmanager
def handler(
    signum: signal.Signals, function: Callable[[int, FrameType | None], object]
) -> Iterator[None]:
    """Install a signal handler for the block, restoring the previous one after."""
    previous = signal.signal(signum, function)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def test_signals_deferred_delays_sigint_until_the_block_ends() -> None:
    """A SIGINT inside signals_deferred() lets the block finish, then raises KeyboardInterrupt."""
    steps: list[str] = []

    def interrupted_block() -> None:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # plenty of time for Python to run the handler
            steps.append("block finished")

    # pytest leaves SIGINT to Python; set it explicitly in case a runner changed it
    with (
        handler(signal.SIGINT, signal.default_int_handler),
        pytest.raises(KeyboardInterrupt),
    ):
        interrupted_block()
    assert steps == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is not None


def test_signals_deferred_delays_sigterm_until_the_block_ends() -> None:
    """SIGTERM is held back too, then delivered to the handler that was there before."""
    delivered: list[str] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        delivered.append("handler")

    with handler(signal.SIGTERM, on_term):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            delivered.append("block finished")
        delivered.append("after")
    assert delivered == ["block finished", "handler", "after"]


def test_sigint_during_teardown_does_not_cut_it_short(isolation_state: Ledger) -> None:
    """A Ctrl-C arriving in the middle of destroy() waits until every resource is released."""

    class InterruptOnTeardown:
        @pluggy.HookimplMarker("pytest")
        def pytest_isolation_env_teardown(self, env: IsolatedEnvironment) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    plugins = pluggy.PluginManager("pytest")
    plugins.add_hookspecs(hookspecs)
    plugins.register(builtin_engines)
    plugins.register(InterruptOnTeardown())
    with IsolationManager(hook=plugins.hook) as manager:
        env = manager.create("basic")
        assert isinstance(env, LocalEnvironment)
        with handler(signal.SIGINT, signal.default_int_handler), pytest.raises(KeyboardInterrupt):
            manager.destroy(env)
        assert env.status is EnvStatus.DESTROYED
        assert not env.root.exists()
        assert isolation_state.records() == []


def test_interrupt_during_close_still_destroys_every_env(isolation_state: Ledger) -> None:
    """A Ctrl-C while the manager tears down the first of two environments at exit does not
    leave the second one behind: the interrupt comes once everything is gone."""
    interrupts: list[str] = []

    class InterruptOnce:
        @pluggy.HookimplMarker("pytest")
        def pytest_isolation_env_teardown(self, env: IsolatedEnvironment) -> None:
            if not interrupts:
                interrupts.append(env.id)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)

    plugins = pluggy.PluginManager("pytest")
    plugins.add_hookspecs(hookspecs)
    plugins.register(builtin_engines)
    plugins.register(InterruptOnce())
    manager = IsolationManager(hook=plugins.hook)
    older, newer = manager.create("basic"), manager.create("basic")
    assert isinstance(older, LocalEnvironment)
    assert isinstance(newer, LocalEnvironment)
    try:
        with handler(signal.SIGINT, signal.default_int_handler), pytest.raises(KeyboardInterrupt):
            manager.close()
        assert interrupts == [newer.id]  # newest first
        assert not newer.root.exists()
        assert not older.root.exists(), "the interrupt cut close() short: older env left behind"
        assert isolation_state.records() == []
    finally:
        manager.destroy_all()


def test_teardown_error_keeps_the_record_for_a_later_cleanup(isolation_state: Ledger) -> None:
    """Without pytest too: a release that fails raises TeardownError and keeps its record."""

    class Sticky(Engine):
        name = "sticky"
        options = LOCAL_OPTIONS

        def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> LocalEnvironment:
            root = make_root(self, env_id, resources)
            resources.add("sticker", env_id)
            return LocalEnvironment(env_id=env_id, spec=spec, resources=resources, root=root)

        def release(self, record: ResourceRecord) -> None:
            if record.kind == "sticker":
                raise OSError("sticker will not come off")
            super().release(record)

    with IsolationManager() as manager:
        manager.registry.register(Sticky)
        env = manager.create("sticky")
        assert isinstance(env, LocalEnvironment)
        with pytest.raises(TeardownError, match="sticker will not come off") as info:
            manager.destroy(env)
    assert env.status is EnvStatus.FAILED
    assert [type(error) for error in info.value.errors] == [OSError]
    assert not env.root.exists()
    [record] = isolation_state.records()
    assert record.kind == "sticker"
    isolation_state.remove(record)  # it names nothing real


# --- 9. pytest-xdist --------------------------------------------------------------------------


def test_xdist_tears_every_env_down_and_summarises_on_the_controller(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """With -n 2, every worker's environments are removed, and the controller's summary
    counts them all."""
    pytester.makepyfile(
        test_one=REMEMBER
        + """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_function_scope(isolated_env, n):
    remember(isolated_env)
""",
        test_two=REMEMBER
        + """
import pytest

pytestmark = pytest.mark.isolated(scope="module")

def test_a(isolated_env):
    remember(isolated_env)

def test_b(isolated_env):
    remember(isolated_env)
""",
    )
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*= isolation =*", "5 environment(s) (basic: 5); set-up took *"])
    made = roots(pytester)
    assert len(made) == 6
    assert len(set(made)) == 5  # the module-scope env is shared by its two tests
    assert not any(root.exists() for root in made)
    assert isolation_state.records() == []


def test_sigterm_to_the_xdist_controller_leaves_nothing_behind(
    pytester: pytest.Pytester, isolation_state: Ledger
) -> None:
    """SIGTERM to the controller of a -n 2 run (as `docker stop` or a job runner sends it to
    the main process only) still removes the environments the workers made."""
    pytester.makeconftest(
        """
import xdist.workermanage

# xdist waits 10s for workers to stop before it kills them; 1s is enough to show the outcome
xdist.workermanage.NodeManager.EXIT_TIMEOUT = 1
"""
    )
    pytester.makepyfile(
        REMEMBER
        + """
import time
import pytest


@pytest.mark.parametrize("n", range(2))
def test_it(isolated_env, n):
    remember(isolated_env)
    time.sleep(60)
"""
    )
    with pytest_process(pytester, "-n", "2") as process:
        made = wait_for(lambda: roots_when(pytester, 2), "both workers")
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=PATIENCE)
    try:
        assert returncode == pytest.ExitCode.INTERRUPTED, output_of(pytester)
        assert [root for root in made if root.exists()] == []
        assert isolation_state.records() == []
    finally:
        # release what the workers left, once they are gone
        wait_for(
            lambda: not any(r.owner.alive() for r in isolation_state.records()),
            "the workers to end",
        )
        cli("cleanup")
