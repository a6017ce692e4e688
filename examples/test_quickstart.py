"""pytest-isolation in a few tests: a private workspace, a fresh virtualenv, shared scopes.

Run with ``python -m pytest examples`` (add ``--isolation-keep=failed`` to keep
the environment of a failing test for a look).
"""

from __future__ import annotations

import json
import sys

import pytest

from pytest_isolation import IsolatedEnvironment


def test_a_private_workspace(isolated_env: IsolatedEnvironment) -> None:
    """Without a marker: the basic engine, a workspace with its own HOME and TMPDIR."""
    isolated_env.write_file("settings/app.json", json.dumps({"debug": True}))
    result = isolated_env.run(["sh", "-c", "cat settings/app.json; echo; echo $HOME"]).check()
    config, home = result.stdout.splitlines()
    assert json.loads(config) == {"debug": True}
    assert home != "/root" and home.startswith(str(isolated_env.path.parent))


@pytest.mark.isolated("basic", env={"APP_MODE": "test"})
def test_host_secrets_do_not_leak_in(isolated_env: IsolatedEnvironment) -> None:
    """Only an allow-list of host variables (PATH, locale...) and the ones given get in."""
    variables = isolated_env.run(["env"]).stdout
    assert "APP_MODE=test" in variables
    assert "PYTEST_CURRENT_TEST" not in variables


@pytest.mark.isolated("virtualenv")
def test_a_fresh_virtualenv(isolated_env: IsolatedEnvironment) -> None:
    """A venv of the running interpreter: pytest, installed on the host, is not in it."""
    code = (
        "import importlib.util, sys; print(sys.prefix); print(importlib.util.find_spec('pytest'))"
    )
    prefix, pytest_spec = isolated_env.run(["python", "-c", code]).check().stdout.split()
    assert prefix != sys.prefix
    assert pytest_spec == "None"


@pytest.mark.network
@pytest.mark.isolated("virtualenv", packages=["attrs==23.2.0"])
def test_packages_from_the_index(isolated_env: IsolatedEnvironment) -> None:
    """Packages the test asks for; the second test with this spec clones a cached template."""
    result = isolated_env.run(["python", "-c", "import attrs; print(attrs.__version__)"])
    assert result.check().stdout.strip() == "23.2.0"


@pytest.mark.isolated("basic", scope="module")
def test_module_scope_first(isolated_env: IsolatedEnvironment) -> None:
    """scope="module": one environment for every test of this module that asks for it."""
    isolated_env.write_file("state.txt", "written by the first test")


@pytest.mark.isolated("basic", scope="module")
def test_module_scope_second(isolated_env: IsolatedEnvironment) -> None:
    assert isolated_env.read_file("state.txt") == b"written by the first test"


@pytest.mark.isolated("basic", limits={"timeout": "2s"})
def test_a_runaway_command_is_stopped(isolated_env: IsolatedEnvironment) -> None:
    """The timeout limit kills a command and everything it started."""
    from pytest_isolation import CommandTimeout

    with pytest.raises(CommandTimeout):
        isolated_env.run(["sh", "-c", "sleep 30 & sleep 30"])
