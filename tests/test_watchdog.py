"""Nothing leaks, ever: a killed run's resources are reaped within two seconds.

Each test starts a real pytest run in a subprocess whose test makes an
environment, writes down what it made, and blocks; then kills the run the way
users do and checks that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from pytest_isolation.ledger import Ledger
from tests.conftest import DAEMONS, TEST_IMAGE, cli, need_engine, sleep_command, wait_for

REAPED_WITHIN = 2.0  # seconds from the kill until nothing is left (Ryuk: 10 s, Docker only)

BLOCKING_TEST = """
import json, os, sys, time
import pytest

@pytest.mark.isolated({marker})
def test_blocks(isolated_env):
    made = {{
        "root": str(getattr(isolated_env, "root", "")),
        "cgroups": [str(p) for p in getattr(getattr(isolated_env, "cgroups", None),
                                              "directories", lambda: [])()],
        "container": getattr(isolated_env, "name", ""),
        "pid": os.getpid(),
    }}
    if {run_command}:
        # a command still running inside the environment when the run dies
        import threading
        threading.Thread(
            target=isolated_env.run, args=(["sh", "-c", "sleep 300"],), daemon=True
        ).start()
        time.sleep(0.5)
    with open({state!r} + ".tmp", "w") as handle:
        json.dump(made, handle)
    os.replace({state!r} + ".tmp", {state!r})
    time.sleep(300)
"""

ENGINES = {
    "basic": ('"basic"', True),
    "virtualenv": ('"virtualenv"', True),
    "sandbox": ('"sandbox", limits={"memory": "256M"}', True),
    "docker": (f'"docker", image={TEST_IMAGE!r}, network=True', True),
}


def start_run(tmp_path: Path, engine: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A pytest run, in a session of its own, whose test blocks after making its env."""
    marker, run_command = ENGINES[engine]
    run = f"{engine}-{time.monotonic_ns()}"
    state = tmp_path / f"made-{run}.json"
    suite = tmp_path / f"suite-{run}"  # one each: concurrent runs must not share a test file
    suite.mkdir()
    (suite / "test_blocking.py").write_text(
        BLOCKING_TEST.format(marker=marker, run_command=run_command, state=str(state))
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *extra,
            str(suite / "test_blocking.py"),
        ],
        cwd=suite,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return process, state


def made_by(state: Path) -> dict[str, Any]:
    return dict(json.loads(state.read_text()))


def leftovers(made: dict[str, Any], ledger: Ledger) -> list[str]:
    """What of the run still exists."""
    left = []
    if made["root"] and Path(made["root"]).exists():
        left.append(made["root"])
    left += [path for path in made["cgroups"] if Path(path).exists()]
    if made["container"]:
        import docker

        client = docker.from_env()
        try:
            names = [c.name for c in client.containers.list(all=True)]
            networks = [n.name for n in client.networks.list()]
        finally:
            client.close()
        if made["container"] in names:
            left.append(f"container {made['container']}")
        session = made["container"].split("-")[2]
        prefix = f"pytest-isolation-{session}"
        left += [f"network {n}" for n in networks if n and n.startswith(prefix)]
    # the pid only: a process can die between the listing and another look at it
    left += [f"process {p.pid} (sleep 300)" for p in sleepers()]
    left += [f"ledger {r.kind} {r.identifier}" for r in ledger.records()]
    return left


def sleepers() -> list[psutil.Process]:
    """The ``sleep 300`` commands the blocking tests started."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == ["sleep", "300"]:
            found.append(process)
    return found


@pytest.fixture
def engine_ready(request: pytest.FixtureRequest) -> str:
    engine: str = request.param
    need_engine(engine)
    return engine


def reaped_after(kill: Callable[[], None], made: dict[str, Any], ledger: Ledger) -> float:
    """Kill, then the seconds until nothing of the run is left."""
    started = time.monotonic()
    kill()
    deadline = started + 15
    while leftovers(made, ledger):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    left = leftovers(made, ledger)
    assert not left, f"still there {elapsed:.1f}s after the kill: {left}"
    return elapsed


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("engine_ready", list(ENGINES), indirect=True)
@pytest.mark.parametrize("how", ["sigkill", "sigkill-group", "sigterm", "sigint-twice"])
def test_a_killed_run_leaves_nothing(
    engine_ready: str, how: str, tmp_path: Path, isolation_state: Ledger
) -> None:
    """However the run is stopped, its environment is gone within two seconds."""
    process, state = start_run(tmp_path, engine_ready)
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the environment", 120)
        assert leftovers(made, isolation_state), "the environment should exist while it runs"

        def kill() -> None:
            if how == "sigkill":
                os.kill(process.pid, signal.SIGKILL)
            elif how == "sigkill-group":
                os.killpg(process.pid, signal.SIGKILL)  # the watchdog is in a session of its own
            elif how == "sigterm":
                os.kill(process.pid, signal.SIGTERM)
            else:
                os.kill(process.pid, signal.SIGINT)
                time.sleep(0.05)  # the second one lands while the first is tearing down
                os.kill(process.pid, signal.SIGINT)
            process.wait(timeout=30)

        elapsed = reaped_after(kill, made, isolation_state)
        assert elapsed <= REAPED_WITHIN, f"reaped only after {elapsed:.2f}s"
    finally:
        _stop(process)


def test_a_killed_xdist_worker_is_reaped(tmp_path: Path, isolation_state: Ledger) -> None:
    """An xdist worker killed mid-test: its own watchdog reaps its environment."""
    process, state = start_run(tmp_path, "basic", "-n", "2")
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the environment", 120)
        worker = made["pid"]
        assert worker != process.pid
        elapsed = reaped_after(lambda: os.kill(worker, signal.SIGKILL), made, isolation_state)
        assert elapsed <= REAPED_WITHIN
    finally:
        _stop(process)


def test_killing_one_run_leaves_a_concurrent_run_alone(
    tmp_path: Path, isolation_state: Ledger
) -> None:
    """Two runs share a ledger; the watchdog of the killed one touches only its own."""
    first, first_state = start_run(tmp_path, "basic")
    second, second_state = start_run(tmp_path, "basic")
    try:
        mine = wait_for(
            lambda: made_by(first_state) if first_state.exists() else None, "run 1", 120
        )
        theirs = wait_for(
            lambda: made_by(second_state) if second_state.exists() else None, "run 2", 120
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        wait_for(lambda: not Path(mine["root"]).exists(), "the killed run to be reaped", 5)
        time.sleep(0.5)  # time for a watchdog that overreached to do damage
        assert Path(theirs["root"]).is_dir()
        assert [r.owner.pid for r in isolation_state.records()] == [second.pid] * len(
            isolation_state.records()
        )
        assert isolation_state.records()
        os.kill(second.pid, signal.SIGTERM)  # ends cleanly: its own teardown
        second.wait(timeout=30)
        wait_for(lambda: not Path(theirs["root"]).exists(), "run 2 to tear down", 5)
    finally:
        _stop(first)
        _stop(second)


@pytest.mark.parametrize("ledger_damage", ["deleted", "corrupted"])
def test_labels_find_containers_when_the_ledger_is_lost(
    ledger_damage: str, tmp_path: Path, isolation_state: Ledger
) -> None:
    """Without the ledger, the watchdog still finds the run's container and network by label."""
    need_engine("docker")
    process, state = start_run(tmp_path, "docker")
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the container", 120)
        for entry in isolation_state.root.iterdir():
            if ledger_damage == "deleted":
                entry.unlink()
            else:
                entry.write_text("{not json")

        def kill() -> None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

        elapsed = reaped_after(
            kill, {**made, "root": "", "cgroups": []}, Ledger(tmp_path / "empty")
        )
        assert elapsed <= REAPED_WITHIN
    finally:
        _stop(process)
        for entry in isolation_state.root.iterdir():
            entry.unlink()  # the damaged files; what they named is gone


def test_without_its_watchdog_a_lost_ledger_is_swept_by_label(
    tmp_path: Path, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runner and watchdog both dead, ledger gone: `cleanup` finds the container by its
    labels (owner pid, start time, host) and removes it."""
    need_engine("docker")
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    process, state = start_run(tmp_path, "docker")
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the container", 120)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for entry in isolation_state.root.iterdir():
            entry.unlink()
        probe = {**made, "root": "", "cgroups": []}
        assert leftovers(probe, isolation_state), "the container should have survived"
        cleanup = cli("cleanup", module=True)
        assert cleanup.returncode == 0, cleanup.stderr
        assert f"removed {made['container']}" in cleanup.stdout
        assert not leftovers(probe, isolation_state)
    finally:
        _stop(process)


#: A test that starts a daemon through its environment, notes it, then blocks.
DAEMON_THEN_BLOCK = """
import json, os, time
import psutil
import pytest

@pytest.mark.isolated({engine!r})
def test_blocks(isolated_env):
    isolated_env.run({command!r}).check()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == {argv!r}]
        if found:
            break
        time.sleep(0.01)
    made = {{"root": str(isolated_env.root), "daemon": found[0].pid}}
    with open({state!r} + ".tmp", "w") as handle:
        json.dump(made, handle)
    os.replace({state!r} + ".tmp", {state!r})
    time.sleep(300)
"""


def daemon_run(
    tmp_path: Path, engine: str, daemon: str
) -> tuple[subprocess.Popen[bytes], Path, list[str]]:
    argv = sleep_command()
    command = [part.format(sleep=" ".join(argv)) for part in DAEMONS[daemon]]
    state = tmp_path / "made.json"
    (tmp_path / "test_daemon.py").write_text(
        DAEMON_THEN_BLOCK.format(engine=engine, command=command, argv=argv, state=str(state))
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_daemon.py"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return process, state, argv


def running(argv: list[str]) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["cmdline"] == argv and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.pid)
    return found


@pytest.mark.parametrize("engine", ["basic", "virtualenv"])
@pytest.mark.parametrize("daemon", ["setsid", "double-fork", "daemon-with-worker"])
def test_daemons_of_a_killed_run_are_reaped_by_its_watchdog(
    tmp_path: Path, isolation_state: Ledger, engine: str, daemon: str
) -> None:
    """SIGKILL of a runner whose environment started a daemon (it left the command's process
    group and lives on, re-parented to the runner): the watchdog finds it by its environment's
    token among all processes and kills it, within two seconds."""
    process, state, argv = daemon_run(tmp_path, engine, daemon)
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the daemon", 120)
        assert running(argv) == [made["daemon"]]
        started = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        wait_for(lambda: not running(argv), "the daemon to be killed", 15)
        wait_for(lambda: not Path(made["root"]).exists(), "the environment's removal", 15)
        wait_for(lambda: not isolation_state.records(), "the ledger to empty", 15)
        elapsed = time.monotonic() - started
        assert elapsed <= REAPED_WITHIN, f"reaped only after {elapsed:.2f}s"
    finally:
        _stop(process)
        for pid in running(argv):
            os.kill(pid, signal.SIGKILL)


def test_without_its_watchdog_a_killed_runs_daemon_is_killed_by_cleanup(
    tmp_path: Path, isolation_state: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runner and watchdog both killed: the daemon lives on until `pytest-isolation cleanup`,
    which finds it through the ledger and kills it."""
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    process, state, argv = daemon_run(tmp_path, "basic", "setsid")
    try:
        made = wait_for(lambda: made_by(state) if state.exists() else None, "the daemon", 120)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(0.3)
        assert running(argv) == [made["daemon"]], "the daemon should have survived the kill"
        cleanup = cli("cleanup", module=True)
        assert cleanup.returncode == 0, cleanup.stderr
        assert f"removed directory {made['root']}" in cleanup.stdout
        assert running(argv) == []
        assert isolation_state.records() == []
    finally:
        _stop(process)
        for pid in running(argv):
            os.kill(pid, signal.SIGKILL)
