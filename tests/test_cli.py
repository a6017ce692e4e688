"""The ``pytest-isolation`` command: doctor, list and cleanup, run as a user runs them.

Each command runs in a process of its own, so the records this test process
makes belong to a live owner, as they would for a run in progress.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from pytest_isolation import IsolationManager, ResourceRecord
from pytest_isolation.engines.basic import LocalEnvironment
from pytest_isolation.ledger import Owner
from tests.conftest import cli

if TYPE_CHECKING:
    import pytest

    from pytest_isolation import Ledger


def ended_owner() -> Owner:
    """The owner of a run that has ended: a process that really existed and is gone."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    try:
        started = psutil.Process(process.pid).create_time()  # a zombie still tells its start
    finally:
        process.wait()
    return Owner("ended-run", process.pid, started, socket.gethostname())


def leftover(
    ledger: Ledger, directory: Path, *, kept_until: float | None = None, kind: str = "directory"
) -> ResourceRecord:
    """Record ``directory`` in the ledger as a resource of an ended run, and make it."""
    directory.mkdir()
    return ledger.add(
        ResourceRecord(
            kind=kind,
            identifier=str(directory),
            engine="basic",
            env_id=directory.name,
            owner=ended_owner(),
            description=f"test_x.py::{directory.name}",
            kept_until=kept_until,
        )
    )


# --- doctor -----------------------------------------------------------------------------------


def test_doctor_lists_the_engines_and_where_state_lives(isolation_state: Ledger) -> None:
    """`doctor` exits 0, says basic and virtualenv are available (uv named), and shows the
    ledger and cache folders in use."""
    result = cli("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pytest-isolation ")
    assert f"ledger: {isolation_state.root}" in lines
    assert f"cache:  {os.environ['PYTEST_ISOLATION_CACHE_DIR']}" in lines
    assert "  [ok] basic: available" in lines
    [virtualenv] = [line for line in lines if " virtualenv:" in line]
    assert virtualenv.startswith("  [ok] virtualenv: available (uv at ")
    uv = Path(virtualenv.split("(uv at ", 1)[1].rstrip(")"))
    assert uv.name.startswith("uv")
    assert uv.is_file()
    assert "leftover" not in result.stdout


def test_python_m_pytest_isolation_runs_the_same_command() -> None:
    """`python -m pytest_isolation doctor` works like the console script."""
    result = cli("doctor", module=True)
    assert result.returncode == 0, result.stderr
    assert "  [ok] basic: available" in result.stdout.splitlines()
    assert result.stdout == cli("doctor").stdout


def test_doctor_points_at_leftovers(isolation_state: Ledger, tmp_path: Path) -> None:
    """`doctor` counts leftover and kept resources and points at `list`."""
    record = leftover(isolation_state, tmp_path / "left")
    result = cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "1 leftover or kept resource(s): see `pytest-isolation list`" in result.stdout
    isolation_state.remove(record)


def test_a_command_is_required_and_help_names_them() -> None:
    """`pytest-isolation` alone is a usage error; `--help` names the three commands."""
    result = cli()
    assert result.returncode == 2
    assert "usage: pytest-isolation" in result.stderr
    assert "required" in result.stderr
    helped = cli("--help")
    assert helped.returncode == 0
    for command in ("doctor", "list", "cleanup"):
        assert command in helped.stdout


# --- list -------------------------------------------------------------------------------------


def test_list_with_an_empty_ledger_says_so() -> None:
    """`list` on an empty ledger says there is nothing in it."""
    result = cli("list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no environments in the ledger"


def test_list_tells_live_leftover_and_kept_apart(isolation_state: Ledger, tmp_path: Path) -> None:
    """`list` marks each environment live (owner running), leftover (owner gone), kept, or kept
    past its time."""
    gone = leftover(isolation_state, tmp_path / "gone")
    kept = leftover(isolation_state, tmp_path / "kept", kept_until=time.time() + 7200)
    expired = leftover(isolation_state, tmp_path / "expired", kept_until=time.time() - 5)
    with IsolationManager() as manager:
        live = manager.create("basic")
        result = cli("list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line[:1] != " "}
    assert " leftover " in rows[gone.env_id]
    assert " kept (2h left) " in rows[kept.env_id]
    assert " kept (expired) " in rows[expired.env_id]
    assert " live " in rows[live.id]
    assert f"    directory: {tmp_path / 'gone'}" in result.stdout
    for record in (gone, kept, expired):
        isolation_state.remove(record)


def test_list_reports_an_unreadable_entry_beside_readable_ones(
    isolation_state: Ledger, tmp_path: Path
) -> None:
    """`list` names an unreadable ledger file and how to remove it."""
    record = leftover(isolation_state, tmp_path / "gone")
    corrupt = corrupt_entry(isolation_state)
    result = cli("list")
    assert f"unreadable ledger entry: {corrupt} (removed by `cleanup --all`)" in result.stdout
    corrupt.unlink()
    isolation_state.remove(record)


def test_list_reports_an_unreadable_entry_when_it_is_the_only_one(
    isolation_state: Ledger,
) -> None:
    """`list` names an unreadable ledger file even when no readable record exists, instead of
    calling the ledger empty."""
    corrupt = corrupt_entry(isolation_state)
    result = cli("list")
    corrupt.unlink()
    assert f"unreadable ledger entry: {corrupt}" in result.stdout
    assert "no environments in the ledger" not in result.stdout


# --- cleanup ----------------------------------------------------------------------------------


def test_cleanup_with_an_empty_ledger_has_nothing_to_do() -> None:
    """`cleanup` on an empty ledger says so and succeeds."""
    result = cli("cleanup")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nothing to clean up"


def test_cleanup_removes_leftovers_and_kept_envs_of_ended_runs(
    isolation_state: Ledger, tmp_path: Path
) -> None:
    """`cleanup` removes what ended runs left, kept environments included (expired or not);
    `--dry-run` before it only names them."""
    folders = [tmp_path / "gone", tmp_path / "kept", tmp_path / "expired"]
    leftover(isolation_state, folders[0])
    leftover(isolation_state, folders[1], kept_until=time.time() + 7200)
    leftover(isolation_state, folders[2], kept_until=time.time() - 5)

    dry = cli("cleanup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for folder in folders:
        assert f"would remove directory {folder} (basic, env {folder.name})" in dry.stdout
        assert folder.is_dir()
    assert len(isolation_state.records()) == 3

    result = cli("cleanup")
    assert result.returncode == 0, result.stderr
    for folder in folders:
        assert f"removed directory {folder} (basic, env {folder.name})" in result.stdout
        assert not folder.exists()
    assert isolation_state.records() == []


def corrupt_entry(ledger: Ledger) -> Path:
    """A ledger file that cannot be read: a write cut short by hand."""
    ledger.root.mkdir(parents=True, exist_ok=True)
    corrupt = ledger.root / "0123456789abcdef.json"
    corrupt.write_text('{"kind": "directory", "identif')
    return corrupt


def test_cleanup_all_removes_a_corrupt_ledger_file(isolation_state: Ledger) -> None:
    """An unreadable ledger file is left by plain `cleanup` and by `--all --dry-run`, and
    removed by `cleanup --all`."""
    corrupt = corrupt_entry(isolation_state)
    assert cli("cleanup").returncode == 0
    assert corrupt.exists()
    dry = cli("cleanup", "--all", "--dry-run")
    assert f"would remove unreadable ledger entry {corrupt}" in dry.stdout
    assert corrupt.exists()

    result = cli("cleanup", "--all")
    assert result.returncode == 0, result.stderr
    assert f"removed unreadable ledger entry {corrupt}" in result.stdout
    assert not corrupt.exists()


def test_cleanup_templates_removes_cached_venv_templates(
    isolation_state: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cleanup --templates` removes the virtualenv templates of the cache (and `--dry-run`
    does not)."""
    # a cache of its own: removing the shared one would slow the other tests down
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_ISOLATION_CACHE_DIR", str(cache))
    with IsolationManager() as manager:
        env = manager.create("virtualenv")
        env.run(["python", "-c", "import sys; assert sys.prefix != sys.base_prefix"]).check()
    listing = list((cache / "venv-templates").iterdir())
    templates = [path for path in listing if path.is_dir() and not path.is_symlink()]
    assert len(templates) == 1
    [template] = templates
    [link] = [path for path in listing if path.is_symlink()]  # the name a template is used by
    assert (template / "bin" / "python").exists()

    dry = cli("cleanup", "--templates", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert template.is_dir()

    result = cli("cleanup", "--templates")
    assert result.returncode == 0, result.stderr
    assert f"removed cached {template}" in result.stdout
    assert not template.exists()
    assert not link.is_symlink()
    assert isolation_state.records() == []


def test_plain_cleanup_leaves_a_live_owners_environment(isolation_state: Ledger) -> None:
    """Resources of a run still in progress (this process) survive `cleanup`."""
    with IsolationManager() as manager:
        env = manager.create("basic")
        assert isinstance(env, LocalEnvironment)
        result = cli("cleanup")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "nothing to clean up"
        assert env.root.is_dir()
        assert [r.identifier for r in isolation_state.records()] == [str(env.root)]
        env.run("true").check()  # still usable
    assert not env.root.exists()
    assert isolation_state.records() == []


def test_cleanup_all_takes_a_live_owners_environment_too(isolation_state: Ledger) -> None:
    """`cleanup --all` removes resources of runs that still seem alive; the owner's own
    teardown afterwards copes with the resource being gone already."""
    with IsolationManager() as manager:
        env = manager.create("basic")
        assert isinstance(env, LocalEnvironment)
        result = cli("cleanup", "--all")
        assert result.returncode == 0, result.stderr
        assert f"removed directory {env.root}" in result.stdout
        assert not env.root.exists()
        assert isolation_state.records() == []
    assert isolation_state.records() == []


def test_cleanup_reports_what_it_cannot_release_and_keeps_it(
    isolation_state: Ledger, tmp_path: Path
) -> None:
    """A leftover of a kind no installed engine knows is reported on stderr, exit status 1,
    and its record stays for a later attempt."""
    record = leftover(isolation_state, tmp_path / "odd", kind="widget")
    result = cli("cleanup")
    assert result.returncode == 1
    assert f"failed to remove widget {tmp_path / 'odd'}" in result.stderr
    assert "cannot release resources of kind 'widget'" in result.stderr
    assert isolation_state.records() == [record]
    isolation_state.remove(record)
