"""Guards for the whole project: a test that leaks fails.

An isolation plugin must leave nothing behind, so every test here is checked
for what it leaves: environment variables, the working directory, child
processes, ``pytest-isolation-*`` folders in the temp directory, and records
in its ledger.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest


def _isolation_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("pytest-isolation-*")}


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between the listing and this look
        return False


def _wait_for_children_gone(before: set[int], timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid in _children() - before if _running(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _live_in_this_run(request: pytest.FixtureRequest) -> set[str]:
    """Folders of module- and session-scoped environments of this run, which outlive a test."""
    from pytest_isolation.plugin import SESSION_KEY

    session = request.config.stash.get(SESSION_KEY, None)
    if session is None:
        return set()
    return {env.path.parent.name for env in session.manager.list() if env.path is not None}


def _watchdog_of_this_run(request: pytest.FixtureRequest) -> set[int]:
    """The run's own watchdog lives as long as the run, not a test."""
    from pytest_isolation.plugin import SESSION_KEY

    session = request.config.stash.get(SESSION_KEY, None)
    pid = session.manager.watchdog_pid if session is not None else None
    return {pid} if pid is not None else set()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves environment variables, cwd, processes or folders behind."""
    environ = dict(os.environ)
    cwd = os.getcwd()
    children = _children()
    folders = _isolation_dirs()
    yield
    problems = []
    # Being autouse in the root conftest, this is set up before every other function
    # fixture and torn down after them: monkeypatch and pytester have undone their changes.
    changed = {
        k
        for k in set(environ) | set(os.environ)
        if environ.get(k) != os.environ.get(k) and k != "PYTEST_CURRENT_TEST"
    }
    if changed:
        problems.append(f"environment variables changed: {sorted(changed)}")
    if os.getcwd() != cwd:
        problems.append(f"working directory changed to {os.getcwd()}")
    leaked = _wait_for_children_gone(children) - _watchdog_of_this_run(request)
    if leaked:
        problems.append(f"child processes left running: {sorted(leaked)}")
    # tests that use a private temp directory have it checked by their own fixture
    new_folders = _isolation_dirs() - folders - _live_in_this_run(request)
    if new_folders and "isolation_state" not in request.fixturenames:
        problems.append(f"folders left in {tempfile.gettempdir()}: {sorted(new_folders)}")
    if problems:
        pytest.fail("test leaked: " + "; ".join(problems), pytrace=False)
