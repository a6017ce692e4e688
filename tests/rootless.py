"""Running pytest as an unprivileged user (uid 65534), for the rootless tests.

The development interpreter lives under ``/root``, which uid 65534 cannot read:
the plugin, pytest and what they import are copied to a world-readable folder
and run with Debian's ``/usr/bin/python3`` (the same Python version) through
``setpriv``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pytest_isolation import Ledger

#: Seconds a rootless pytest run may take.
PATIENCE = 60.0


NOBODY = 65534
#: Modules the plugin and pytest import; with the distributions' metadata (entry points,
#: versions), copied where an unprivileged user can read them.
MODULES = (
    "pytest_isolation",
    "pluggy",
    "psutil",
    "filelock",
    "yaml",
    "_pytest",
    "pytest",
    "iniconfig",
    "packaging",
    "pygments",
    "py",  # pytest's own shim module
    "pyseccomp",
)
DISTRIBUTIONS = (
    "pytest-isolation",
    "pluggy",
    "psutil",
    "filelock",
    "PyYAML",
    "pytest",
    "iniconfig",
    "packaging",
    "Pygments",
    "pyseccomp",
)
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Rootless:
    """A world-readable copy of the packages, run by uid/gid 65534 with the system Python."""

    root: Path
    site: Path

    def run(
        self, name: str, test_code: str, *args: str, env: Mapping[str, str] | None = None
    ) -> tuple[pytest.RunResult, Path]:
        """Run ``test_code`` with pytest as nobody in a fresh folder (with ``env`` added to
        its environment); the result and the folder."""
        work = self.folder(name)
        (work / "test_rootless.py").write_text(textwrap.dedent(test_code))
        # -S: the copied packages and the standard library only, none of Debian's own
        return self.python(work, "-m", "pytest", "-p", "no:cacheprovider", *args, env=env), work

    def folder(self, name: str) -> Path:
        """A fresh folder for one run, with the state, cache, temp and home it uses."""
        work = self.root / name
        work.mkdir()
        work.chmod(0o755)
        for shared in ("state", "cache", "tmp", "home"):
            (work / shared).mkdir()
            (work / shared).chmod(0o777)  # nobody writes these
        return work

    def python(
        self, work: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> pytest.RunResult:
        """``python -S ARGS`` as nobody in ``work`` (made by :meth:`folder`)."""
        environ = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(work / "home"),
            "PYTHONPATH": str(self.site),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_ISOLATION_STATE_DIR": str(work / "state"),
            "PYTEST_ISOLATION_CACHE_DIR": str(work / "cache"),
            "TMPDIR": str(work / "tmp"),
            **(env or {}),
        }
        privileges = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        command = ["setpriv", *privileges, "--", SYSTEM_PYTHON, "-S", *args]
        started = time.monotonic()
        done = subprocess.run(
            command,
            cwd=work,
            env=environ,
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        return pytest.RunResult(
            done.returncode,
            done.stdout.splitlines(),
            done.stderr.splitlines(),
            time.monotonic() - started,
        )


def copy_packages(site: Path) -> None:
    for module in MODULES:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} is not installed"
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(source, site / module, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(spec.origin, site)
    for name in DISTRIBUTIONS:
        files = importlib.metadata.distribution(name).files or []
        metadata = next(f for f in files if f.name == "METADATA")
        info = Path(str(importlib.metadata.distribution(name).locate_file(metadata))).parent
        shutil.copytree(info, site / info.name)


def make_rootless() -> Iterator[Rootless]:
    """Debian's Python, the packages copied under a world-readable folder in /tmp."""
    if not os.path.exists(SYSTEM_PYTHON) or not shutil.which("setpriv"):
        pytest.fail(f"rootless tests need {SYSTEM_PYTHON} and setpriv (util-linux)")
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if tuple(map(int, version)) != sys.version_info[:2]:
        pytest.fail(
            f"{SYSTEM_PYTHON} is Python {'.'.join(version)} but these tests run on "
            f"{sys.version_info.major}.{sys.version_info.minor}: the copied C extensions "
            "(psutil, yaml) would not load"
        )
    # not under pytest's basetemp (mode 0700, unreadable by nobody), and not named like an
    # environment folder, which the leak checks would take for one
    root = Path(tempfile.mkdtemp(prefix="piso-rootless-", dir="/tmp"))
    try:
        root.chmod(0o755)
        site = root / "site"
        copy_packages(site)
        for directory, _, files in os.walk(site):
            os.chmod(directory, 0o755)
            for file in files:
                os.chmod(os.path.join(directory, file), 0o644)
        yield Rootless(root, site)
    finally:
        shutil.rmtree(root)


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_clean(work: Path) -> None:
    """Nothing of the rootless run left: no ledger record, no environment folder, no process
    working in its folder."""
    assert Ledger(work / "state").records() == []
    assert list((work / "tmp").glob("pytest-isolation-*")) == []
    inside = []
    for process in psutil.process_iter(["cwd"]):
        if (process.info["cwd"] or "").startswith(str(work)) and not gone(process):
            inside.append(process)
    assert inside == []
