"""Helpers for the test suite: private ledgers, a shared template cache, local wheels."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from pytest_isolation.ledger import Ledger
from tests.rootless import Rootless, make_rootless

T = TypeVar("T")

#: Engines CI requires (PYTEST_ISOLATION_REQUIRE), read before the fixtures below hide the
#: variable from the runs that tests start.
REQUIRED = {name.strip() for name in os.environ.get("PYTEST_ISOLATION_REQUIRE", "").split(",")}
#: The image the docker tests start; CI builds it offline (see .ci/run).
TEST_IMAGE = os.environ.get("PYTEST_ISOLATION_TEST_IMAGE", "piso-test-python:bookworm")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def cli(*args: str, module: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``pytest-isolation ARGS`` (or ``python -m pytest_isolation ARGS``) in a process of its
    own, so that its owner is not the test."""
    if module:
        command = [sys.executable, "-m", "pytest_isolation"]
    else:
        script = Path(sys.executable).with_name("pytest-isolation")
        assert script.exists(), f"the console script is not installed next to {sys.executable}"
        command = [str(script)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def need_engine(name: str) -> None:
    """Skip (locally) or fail (where CI requires ``name``) when the engine cannot run here."""
    from pytest_isolation import IsolationManager

    with IsolationManager(load_entry_points=False) as manager:
        availability = manager.availability(name)
    if availability:
        return
    message = f"engine {name!r} unavailable: {availability.reason}; {availability.fix}"
    if name in REQUIRED or "all" in REQUIRED:
        pytest.fail(f"{message} (required by PYTEST_ISOLATION_REQUIRE)", pytrace=False)
    pytest.skip(message)


def build_wheel(
    directory: Path,
    name: str,
    version: str,
    *,
    code: str | None = None,
    requires: Sequence[str] = (),
    scripts: dict[str, str] | None = None,
) -> Path:
    """Write a pure-Python wheel of module ``name`` by hand: no build backend, no network.

    ``scripts`` maps console-script names to ``module:function`` entry points.
    """
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        f"{module}/__init__.py": code
        or f"VERSION = {version!r}\n\ndef main():\n    print(VERSION)\n",
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    if scripts:
        files[f"{dist_info}/entry_points.txt"] = "[console_scripts]\n" + "".join(
            f"{script} = {target}\n" for script, target in scripts.items()
        )
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            data = text.encode()
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


@dataclass(frozen=True)
class Wheelhouse:
    """A folder of tiny local wheels, for offline installs."""

    path: Path

    def options(self) -> str:
        """Marker arguments that install from here only."""
        return f"find_links=[{str(self.path)!r}], offline=True"


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    """``tinypkg`` 1.0 and 2.0, ``tinycli`` (a console script) and ``needstiny`` (depends on
    tinypkg<2)."""
    path = tmp_path_factory.mktemp("wheelhouse")
    build_wheel(path, "tinypkg", "1.0")
    build_wheel(path, "tinypkg", "2.0")
    build_wheel(path, "tinycli", "0.1", scripts={"tinycli": "tinycli:main"})
    build_wheel(path, "needstiny", "0.1", requires=["tinypkg<2"])
    return Wheelhouse(path)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One template cache (and uv cache) for the whole test session, so templates are reused."""
    return tmp_path_factory.mktemp("isolation-cache")


@pytest.fixture(autouse=True)
def isolation_state(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Ledger]:
    """A private ledger and temp directory per test, both checked empty at the end; the
    shared template cache.

    With a temp directory of its own, each test sees only the environment folders it made,
    also when other runs (or xdist workers of this one) work beside it.
    """
    state = tmp_path_factory.mktemp("isolation-state")
    private_tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("PYTEST_ISOLATION_STATE_DIR", str(state))
    monkeypatch.setenv("PYTEST_ISOLATION_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("UV_CACHE_DIR", str(shared_cache / "uv"))
    for name in [n for n in os.environ if n.startswith("PYTEST_ISOLATION") and "_DIR" not in n]:
        monkeypatch.delenv(name)  # CI's require switch is for the outer run only
    ledger = Ledger(state)
    yield ledger
    left = ledger.records()
    assert not left, f"ledger entries left behind: {[(r.kind, r.identifier) for r in left]}"
    folders = sorted(p.name for p in private_tmp.glob("pytest-isolation-*"))
    assert not folders, f"environment folders left behind: {folders}"


@pytest.fixture
def run_env() -> dict[str, str]:
    """The environment for ``runpytest_subprocess``: this process's, as monkeypatched."""
    return dict(os.environ)


def other_interpreter() -> Path | None:
    """A Python interpreter other than the running one, if this machine has one."""
    current = Path(sys.executable).resolve()
    candidates = [shutil.which(f"python3.{minor}") for minor in range(10, 15)]
    candidates += [str(p) for p in Path.home().glob(".pyenv/versions/3.*/bin/python3")]
    candidates.append("/usr/bin/python3")
    for candidate in candidates:
        # pyenv shims are scripts that may name no installed version
        if candidate is None or "shims" in candidate or not Path(candidate).exists():
            continue
        if Path(candidate).resolve() != current:
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def rootless() -> Iterator[Rootless]:
    """A world-readable copy of the plugin and pytest, run as uid 65534 (see tests/rootless.py)."""
    yield from make_rootless()
