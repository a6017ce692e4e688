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


#: Ways a command starts something that leaves its process group and outlives it; ``{sleep}``
#: is the daemon's own command line, unique to the test.
DAEMONS = {
    # a daemon detaches before its starter returns: wait until setsid(1) has made its session
    "setsid": [
        "sh",
        "-c",
        "setsid {sleep} >/dev/null 2>&1 </dev/null & pid=$!\n"
        'while :; do set -- $(cat /proc/$pid/stat); [ "$6" = "$pid" ] && break; sleep 0.01; done',
    ],
    # a daemon with a worker: the worker is the daemon's child, never the runner's, and is
    # orphaned again when the daemon is killed
    "daemon-with-worker": [
        "sh",
        "-c",
        "setsid sh -c '{sleep} & wait' >/dev/null 2>&1 </dev/null & pid=$!\n"
        'while :; do set -- $(cat /proc/$pid/stat); [ "$6" = "$pid" ] && break; sleep 0.01; done',
    ],
    # bash's job control puts a background job in a process group of its own, tty or not
    "job-control-nohup": ["bash", "-c", "set -m; nohup {sleep} >/dev/null 2>&1 </dev/null &"],
    "start-new-session": [
        "python3",
        "-c",
        "import subprocess; subprocess.Popen('{sleep}'.split(), start_new_session=True, "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
    ],
    # fork, setsid, fork again: the classic daemon; the first child ends, the second lives on
    "double-fork": [
        "python3",
        "-c",
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        fd = os.open(os.devnull, os.O_RDWR)\n"
        "        [os.dup2(fd, n) for n in (0, 1, 2)]\n"
        "        os.execvp('sleep', '{sleep}'.split())\n"
        "    os._exit(0)\n"
        "os.wait()",
    ],
}


def sleep_command() -> list[str]:
    """A command line no other test runs: ``sleep`` for about a day, a unique fraction."""
    return ["sleep", f"86400.{time.monotonic_ns() % 10**9:09d}"]


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


#: A PEP 517 build backend kept in the project's own tree (``backend-path``), so that building
#: needs nothing from an index: uv runs it exactly as it runs setuptools or hatchling.  It
#: packs ``src/`` into a wheel; ``build_editable`` makes a wheel with a ``.pth`` to ``src/``.
#: While the file ``slow-build`` exists in the project, a build writes ``build-started`` and
#: sleeps, so that tests can kill a run in the middle of one.
PROJECT_BACKEND = """\
import base64, hashlib, os, time, zipfile

NAME, VERSION, REQUIRES, SCRIPTS = {name!r}, {version!r}, {requires!r}, {scripts!r}
MODULE = NAME.replace("-", "_")
DIST_INFO = f"{{MODULE}}-{{VERSION}}.dist-info"


def _pause():
    if os.path.exists("slow-build"):
        with open("build-started", "w") as note:
            note.write(str(os.getpid()))
        time.sleep(300)


def _wheel(directory, files):
    metadata = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
    metadata += "".join(f"Requires-Dist: {{r}}\\n" for r in REQUIRES)
    files = dict(files)
    files[f"{{DIST_INFO}}/METADATA"] = metadata.encode()
    files[f"{{DIST_INFO}}/WHEEL"] = (
        b"Wheel-Version: 1.0\\nGenerator: piso-backend\\nRoot-Is-Purelib: true\\n"
        b"Tag: py3-none-any\\n"
    )
    if SCRIPTS:
        entries = "".join(f"{{k}} = {{v}}\\n" for k, v in SCRIPTS.items())
        files[f"{{DIST_INFO}}/entry_points.txt"] = ("[console_scripts]\\n" + entries).encode()
    name = f"{{MODULE}}-{{VERSION}}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(os.path.join(directory, name), "w") as archive:
        for path, data in sorted(files.items()):
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{{path}},sha256={{digest.decode()}},{{len(data)}}")
        record.append(f"{{DIST_INFO}}/RECORD,,")
        archive.writestr(f"{{DIST_INFO}}/RECORD", "\\n".join(record) + "\\n")
    return name


def _sources():
    found = {{}}
    for folder, _, names in os.walk("src"):
        for name in names:
            if name.endswith(".pyc"):
                continue
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, "src").replace(os.sep, "/")] = handle.read()
    return found


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _pause()
    return _wheel(wheel_directory, _sources())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _pause()
    src = os.path.abspath("src") + "\\n"
    return _wheel(wheel_directory, {{f"_{{MODULE}}_editable.pth": src.encode()}})
"""


def make_project(
    directory: Path,
    name: str,
    version: str = "0.1",
    *,
    code: str | None = None,
    requires: Sequence[str] = (),
    scripts: dict[str, str] | None = None,
) -> Path:
    """Write a Python project that builds offline: ``pyproject.toml`` naming the in-tree
    backend :data:`PROJECT_BACKEND`, and ``src/<module>/__init__.py`` with ``code``."""
    module = name.replace("-", "_")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(
        "[build-system]\n"
        "requires = []\n"
        'build-backend = "piso_backend"\n'
        'backend-path = ["_backend"]\n\n'
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{version}"\n'
        f"dependencies = {list(requires)!r}\n".replace("'", '"')
    )
    (directory / "_backend").mkdir(exist_ok=True)
    (directory / "_backend" / "piso_backend.py").write_text(
        PROJECT_BACKEND.format(
            name=name, version=version, requires=list(requires), scripts=dict(scripts or {})
        )
    )
    package = directory / "src" / module
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        code or f"VERSION = {version!r}\n\ndef main():\n    print(VERSION)\n"
    )
    return directory


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
