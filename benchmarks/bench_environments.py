#!/usr/bin/env python
"""How long one isolated environment takes to make, next to what a user would otherwise do.

Run from the repository root::

    python benchmarks/bench_environments.py [--repeat N] [--slow-repeat N] [--quick]

Two groups of rows, each with a baseline; every row is timed in this one
process run, with the variants of a group interleaved round by round so that
machine noise hits all of them alike.  Creation time is what the table ranks;
teardown is timed separately (its own column) and never counted in creation.

* workspace per test: the ``basic`` engine (through a pytest run with the
  ``isolated_env`` fixture, and through :class:`IsolationManager` directly)
  against pytest's own ``tmp_path`` in a pytest run.  ``pytest.TempPathFactory``
  can only be constructed through a private argument (``_ispytest``), so
  ``tmp_path`` is measured where users meet it: as the set-up phase of a test
  in an in-process pytest run.
* virtual environment with one package: the ``virtualenv`` engine cold (empty
  template cache) and warm (template cached) against ``python -m venv`` +
  ``pip``, ``virtualenv`` + ``pip``, ``uv venv`` + ``uv pip``, and the
  ``virtualenv`` fixture of the ``pytest-virtualenv`` package.  The package is
  a tiny wheel built here by hand, installed offline from a local folder.
* the project under test: a local project (hatchling, built by ``uv build``)
  and a requirements file that includes another with ``-r``, warm and cold,
  against ``uv venv`` + ``uv pip install PROJECT -r requirements.txt``.
* a stack of about 50 distributions from the package index (a web framework,
  a data stack, their dependencies), warm and cold, against ``uv venv`` +
  ``uv pip install`` of the same; uv's cache is filled once before timing.
  These two groups download from the index (``--no-index-rows`` leaves them
  out).

Everything is made under one temporary folder (the state, template, uv, pip
and virtualenv caches too) and removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from common import environ, isolation_dirs, ms

import pytest_isolation.plugin
from pytest_isolation import IsolationManager
from pytest_isolation.engines.virtualenv import VirtualenvEnvironment, find_uv
from pytest_isolation.ledger import Ledger

PACKAGE = "piso_benchpkg"
VERSION = "1.0"
BIN = "Scripts" if os.name == "nt" else "bin"
#: Where ``--peers`` comes from when not given: a folder with pytest-virtualenv and its deps.
PEERS_VARIABLE = "PYTEST_ISOLATION_BENCH_PEERS"
TARGET_BASIC_OVERHEAD_MS = 0.5
TARGET_WARM_VENV_MS = 10.0
TARGET_COLD_RATIO = 1.0
#: Warm environments taken per round in the project and stack groups.
WARM_PER_ROUND = 10
#: Top-level requirements of the stack row: about 50 distributions once resolved.
STACK = (
    "flask",
    "fastapi",
    "uvicorn",
    "requests",
    "httpx",
    "pydantic",
    "sqlalchemy",
    "alembic",
    "numpy",
    "pandas",
    "rich",
    "attrs",
    "pyyaml",
    "marshmallow",
    "pytest",
    "openpyxl",
    "tabulate",
    "markdown",
)
PROJECT = "piso_benchproj"

#: (seconds to create, seconds to tear down) of one sample.
Sample = tuple[float, float]


# --- the local package ---------------------------------------------------------------------


def build_wheel(directory: Path, name: str, version: str) -> Path:
    """Write a pure-Python wheel of module ``name`` by hand: no build backend, no network."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
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


# --- rows -----------------------------------------------------------------------------------


class NotMeasurable(Exception):
    """A variant that cannot run here (a missing or broken peer); its row says why."""


@dataclass
class Row:
    """One line of the table: a variant and its samples."""

    label: str
    command: str
    create: list[float] = field(default_factory=list)
    teardown: list[float] = field(default_factory=list)
    #: why a peer cannot be measured here (a "not measurable" row)
    problem: str | None = None
    #: why a pytest-isolation row failed (no samples), or made an unusable environment
    failure: str | None = None
    broken: str | None = None
    #: why the teardown column means nothing for this row (then it shows n/a)
    teardown_untimed: str | None = None

    #: the samples of each round, for comparisons within a round
    rounds: dict[int, list[Sample]] = field(default_factory=dict)

    def add(self, samples: Sequence[Sample], round_index: int = 0) -> None:
        for create, teardown in samples:
            self.create.append(create)
            self.teardown.append(teardown)
        self.rounds.setdefault(round_index, []).extend(samples)

    @property
    def median(self) -> float:
        return statistics.median(self.create)


@dataclass
class Variant:
    """A row and how to take its samples (one call may yield several, as a pytest run does)."""

    row: Row
    sample: Callable[[], list[Sample]]
    warm_up: Callable[[], object]
    peer: bool = False  # a failure is "not measurable", not a failure of pytest-isolation


# --- helpers --------------------------------------------------------------------------------


def run(argv: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None) -> None:
    """Run a command quietly; raise with its output if it fails."""
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def check_import(python: Path) -> None:
    run([python, "-c", f"import {PACKAGE}; assert {PACKAGE}.VERSION == {VERSION!r}"])


class Workspace:
    """The benchmark's temporary folder: numbered sub-folders, all removed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._counter = 0

    def fresh(self, prefix: str) -> Path:
        """A path that does not exist yet."""
        self._counter += 1
        return self.root / f"{prefix}-{self._counter}"


class Report:
    """Collects the per-phase durations of the tests of one in-process pytest run."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.failures: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.phases.setdefault(report.nodeid, {})[report.when] = report.duration
        if report.failed:
            self.failures.append(f"{report.nodeid} ({report.when}): {report.longreprtext}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.failures.append(f"collecting {report.nodeid}: {report.longreprtext}")


@dataclass
class PytestRun:
    """An in-process pytest run of one generated test file, repeatable."""

    work: Workspace
    name: str
    source: str
    plugins: Sequence[object]
    #: the set-up phase counts as creation; with ``call_counts`` the call phase too
    call_counts: bool = False
    wall: list[float] = field(default_factory=list)
    tests: int = 0

    def __post_init__(self) -> None:
        self.folder = self.work.root / "pytest-runs" / self.name
        self.folder.mkdir(parents=True)
        (self.folder / "pytest.ini").write_text("[pytest]\n", "utf-8")
        (self.folder / f"test_{self.name}.py").write_text(self.source, "utf-8")

    def __call__(self, *, drop_first: bool = True) -> list[Sample]:
        """Run it; the first test of a run carries session-scoped set-up, so it is dropped."""
        report = Report()
        args = [
            str(self.folder / f"test_{self.name}.py"),
            "-c",
            str(self.folder / "pytest.ini"),
            "--rootdir",
            str(self.folder),
            "--basetemp",
            str(self.work.fresh("basetemp")),
            "--import-mode=importlib",
            "-p",
            "no:terminal",
            "-p",
            "no:cacheprovider",
        ]
        started = time.perf_counter()
        code = pytest.main(args, plugins=[*self.plugins, report])
        self.wall.append(time.perf_counter() - started)
        if report.failures or code != 0:
            detail = "\n".join(report.failures) or f"pytest exited {code}"
            raise RuntimeError(f"pytest run {self.name!r} failed:\n{detail[-4000:]}")
        samples = [
            (
                phases.get("setup", 0.0) + (phases.get("call", 0.0) if self.call_counts else 0.0),
                phases.get("teardown", 0.0),
            )
            for phases in report.phases.values()
        ]
        self.tests = len(samples)
        return samples[1:] if drop_first and len(samples) > 1 else samples


# --- the variants ---------------------------------------------------------------------------


class Bench:
    """Builds the variants of both groups and runs them."""

    def __init__(self, work: Workspace, wheelhouse: Path, tests_per_run: int) -> None:
        self.work = work
        self.wheelhouse = wheelhouse
        self.tests_per_run = tests_per_run
        self.manager = IsolationManager()
        uv = find_uv()
        self.uv = Path(uv) if uv else None
        self.manager_init: list[float] = []

    def close(self) -> None:
        self.manager.close()

    # --- workspace per test ---

    def _tests(
        self, body: str, marker: str = "", fixture: str = "tmp_path", count: int | None = None
    ) -> str:
        count = self.tests_per_run + 1 if count is None else count
        return textwrap.dedent(
            f"""\
            import pytest

            {marker}
            @pytest.mark.parametrize("i", range({count}))
            def test_env({fixture}, i):
                {body}
            """
        )

    def workspace_variants(self) -> list[Variant]:
        plugin = pytest_isolation.plugin
        tmp_path = PytestRun(self.work, "tmp_path", self._tests("assert tmp_path.is_dir()"), [])
        tmp_path_with_plugin = PytestRun(
            self.work, "tmp_path_plugin", self._tests("assert tmp_path.is_dir()"), [plugin]
        )
        basic = PytestRun(
            self.work,
            "basic",
            self._tests(
                "assert isolated_env.path.is_dir()",
                '@pytest.mark.isolated("basic")',
                "isolated_env",
            ),
            [plugin],
        )

        def manager_basic() -> list[Sample]:
            started = time.perf_counter()
            env = self.manager.create("basic")
            created = time.perf_counter()
            self.manager.destroy(env)
            return [(created - started, time.perf_counter() - created)]

        def manager_init() -> list[Sample]:
            started = time.perf_counter()
            manager = IsolationManager()
            self.manager_init.append(time.perf_counter() - started)
            manager.close()
            return []

        n = self.tests_per_run
        return [
            Variant(
                Row(
                    "tmp_path, pytest run (baseline)",
                    f"pytest run of {n}+1 tests taking tmp_path, no pytest-isolation plugin; "
                    "per-test set-up phase",
                ),
                tmp_path,
                lambda: tmp_path(drop_first=False),
            ),
            Variant(
                Row(
                    "tmp_path, pytest run, plugin loaded",
                    "the same with pytest-isolation's plugin loaded (its autouse fixture)",
                ),
                tmp_path_with_plugin,
                lambda: tmp_path_with_plugin(drop_first=False),
            ),
            Variant(
                Row(
                    "basic: isolated_env, pytest run",
                    f"pytest run of {n}+1 tests, @pytest.mark.isolated('basic') + isolated_env; "
                    "per-test set-up phase",
                ),
                basic,
                lambda: basic(drop_first=False),
            ),
            Variant(
                Row(
                    "basic: IsolationManager.create",
                    "manager.create('basic') / manager.destroy(env), one long-lived manager",
                ),
                manager_basic,
                manager_basic,
            ),
            Variant(
                Row("IsolationManager() itself", "IsolationManager() then .close(); not a row"),
                manager_init,
                manager_init,
            ),
        ]

    # --- virtual environment with one package ---

    def _cold_engine(self, creator: str) -> Callable[[], list[Sample]]:
        def sample() -> list[Sample]:
            cache = self.work.fresh("cold-cache")
            try:
                with environ(PYTEST_ISOLATION_CACHE_DIR=str(cache)), IsolationManager() as manager:
                    started = time.perf_counter()
                    env = self._create_venv(manager, creator)
                    created = time.perf_counter()
                    manager.destroy(env)
                    return [(created - started, time.perf_counter() - created)]
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        return sample

    def _create_venv(
        self, manager: IsolationManager, creator: str = "auto"
    ) -> VirtualenvEnvironment:
        env = manager.create(
            "virtualenv",
            creator=creator,
            packages=[PACKAGE],
            find_links=[str(self.wheelhouse)],
            offline=True,
        )
        assert isinstance(env, VirtualenvEnvironment)
        return env

    def _warm_engine(self) -> list[Sample]:
        started = time.perf_counter()
        env = self._create_venv(self.manager)
        created = time.perf_counter()
        self.manager.destroy(env)
        return [(created - started, time.perf_counter() - created)]

    def _check_engine(self, creator: str = "auto") -> None:
        with IsolationManager() as manager:
            env = self._create_venv(manager, creator)
            env.run(["python", "-c", f"import {PACKAGE}"]).check()

    def _pip_baseline(
        self, create: Callable[[Path], list[str | Path]], *, check: bool = False
    ) -> list[Sample]:
        venv = self.work.fresh("venv")
        python = venv / BIN / "python"
        started = time.perf_counter()
        run(create(venv), cwd=self.work.root)
        run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--no-index",
                "--find-links",
                self.wheelhouse,
                PACKAGE,
            ],
            cwd=self.work.root,
        )
        created = time.perf_counter()
        if check:
            check_import(python)
        shutil.rmtree(venv)
        return [(created - started, time.perf_counter() - created)]

    def _uv_baseline(self, *, check: bool = False) -> list[Sample]:
        if self.uv is None:
            raise NotMeasurable("uv is not installed")
        venv = self.work.fresh("venv")
        python = venv / BIN / "python"
        started = time.perf_counter()
        run([self.uv, "venv", "--quiet", "--python", sys.executable, venv], cwd=self.work.root)
        run(
            [
                self.uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                python,
                "--offline",
                "--find-links",
                self.wheelhouse,
                PACKAGE,
            ],
            cwd=self.work.root,
        )
        created = time.perf_counter()
        if check:
            check_import(python)
        shutil.rmtree(venv)
        return [(created - started, time.perf_counter() - created)]

    def _pytest_virtualenv(self, peers: Path | None) -> tuple[PytestRun, PytestRun] | str:
        """Two pytest runs with pytest-virtualenv's fixture (timed, checked), or why not."""
        if peers is not None and str(peers) not in sys.path:
            sys.path.append(str(peers))  # appended: never shadows what the venv has
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module: ModuleType = importlib.import_module("pytest_virtualenv")
        except Exception as exc:
            return (
                f"cannot import pytest_virtualenv ({type(exc).__name__}: {exc}); install it "
                f"with pip install --target DIR pytest-virtualenv and pass --peers DIR"
            )
        self.peer_warnings = sorted({str(w.message).splitlines()[0] for w in caught})
        install = 'virtualenv.install_package("' + PACKAGE + '")'
        timed = PytestRun(
            self.work,
            "pytest_virtualenv",
            self._tests(install, fixture="virtualenv", count=1),
            [module],
        )
        timed.call_counts = True
        check = install + f'; virtualenv.run([str(virtualenv.python), "-c", "import {PACKAGE}"])'
        checked = PytestRun(
            self.work,
            "pytest_virtualenv_check",
            self._tests(check, fixture="virtualenv", count=1),
            [module],
        )
        return timed, checked

    def venv_variants(self, peers: Path | None) -> tuple[list[Variant], list[Variant]]:
        """The fast rows and the slow rows of the second group."""
        uv = str(self.uv) if self.uv else "uv"
        fast = [
            Variant(
                Row(
                    "uv venv + uv pip install (baseline)",
                    f"{uv} venv --python {sys.executable} DIR; {uv} pip install --python "
                    f"DIR/bin/python --offline --find-links WHEELS {PACKAGE}",
                ),
                self._uv_baseline,
                lambda: self._uv_baseline(check=True),
                peer=True,
            ),
            Variant(
                Row(
                    "virtualenv engine, warm",
                    "manager.create('virtualenv', packages=[PKG], find_links=[WHEELS], "
                    "offline=True), template cached; one long-lived manager",
                ),
                self._warm_engine,
                self._check_engine,
            ),
            Variant(
                Row(
                    "virtualenv engine, cold (uv)",
                    "the same with a fresh PYTEST_ISOLATION_CACHE_DIR and a new manager (uv's "
                    "own cache stays warm)",
                ),
                self._cold_engine("auto"),
                self._check_engine,
            ),
        ]
        warm_pytest = PytestRun(
            self.work,
            "venv_warm",
            self._tests(
                "assert isolated_env.python.exists()",
                f"@pytest.mark.isolated('virtualenv', packages=[{PACKAGE!r}], "
                f"find_links=[{str(self.wheelhouse)!r}], offline=True)",
                "isolated_env",
            ),
            [pytest_isolation.plugin],
        )
        fast.insert(
            2,
            Variant(
                Row(
                    "virtualenv engine, warm, pytest run",
                    f"pytest run of {self.tests_per_run}+1 tests with "
                    "@pytest.mark.isolated('virtualenv', ...) + isolated_env; set-up phase",
                ),
                warm_pytest,
                lambda: warm_pytest(drop_first=False),
            ),
        )
        slow = [
            Variant(
                Row(
                    "python -m venv + pip install",
                    f"{sys.executable} -m venv DIR; DIR/bin/python -m pip install --no-index "
                    f"--find-links WHEELS {PACKAGE}",
                ),
                lambda: self._pip_baseline(lambda d: [sys.executable, "-m", "venv", d]),
                lambda: self._pip_baseline(lambda d: [sys.executable, "-m", "venv", d], check=True),
                peer=True,
            ),
            Variant(
                Row(
                    "virtualenv + pip install",
                    f"{sys.executable} -m virtualenv DIR; DIR/bin/python -m pip install "
                    f"--no-index --find-links WHEELS {PACKAGE}",
                ),
                lambda: self._pip_baseline(
                    lambda d: [sys.executable, "-m", "virtualenv", "--quiet", d]
                ),
                lambda: self._pip_baseline(
                    lambda d: [sys.executable, "-m", "virtualenv", "--quiet", d], check=True
                ),
                peer=True,
            ),
            Variant(
                Row(
                    "virtualenv engine, cold (virtualenv)",
                    "the cold engine row with creator='virtualenv' (virtualenv + pip)",
                ),
                self._cold_engine("virtualenv"),
                lambda: self._check_engine("virtualenv"),
            ),
        ]
        pv_row = Row(
            "pytest-virtualenv fixture",
            "pytest run of 1 test: virtualenv fixture + virtualenv.install_package(PKG) "
            "(PIP_NO_INDEX=1, PIP_FIND_LINKS=WHEELS); set-up + call phases",
            teardown_untimed="its fixture's code after the yield never runs "
            "(pytest-fixture-config's yield_requires_config does not resume the generator); "
            "the venv is deleted later, when VirtualEnv.__del__ runs",
        )
        found = self._pytest_virtualenv(peers)
        if isinstance(found, str):
            pv_row.problem = found
            slow.append(Variant(pv_row, list, list, peer=True))
        else:
            timed, checked = found
            pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheelhouse)}

            def pv_sample() -> list[Sample]:
                with environ(**pip_env):
                    return timed(drop_first=False)

            def pv_check() -> list[Sample]:
                with environ(**pip_env):
                    return checked(drop_first=False)

            slow.append(Variant(pv_row, pv_sample, pv_check, peer=True))
        return fast, slow

    # --- the project under test, and a stack of about 50 packages ---

    def make_project(self) -> tuple[Path, Path]:
        """A hatchling project depending on the local package, and a requirements file that
        pins that package in a file it includes with -r."""
        project = self.work.root / "project"
        (project / "src" / PROJECT).mkdir(parents=True)
        (project / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""\
                [build-system]
                requires = ["hatchling"]
                build-backend = "hatchling.build"

                [project]
                name = "{PROJECT}"
                version = "0.1"
                dependencies = ["{PACKAGE}"]
                """
            )
        )
        (project / "src" / PROJECT / "__init__.py").write_text("VERSION = '0.1'\n")
        requirements = self.work.root / "requirements" / "requirements.txt"
        requirements.parent.mkdir()
        requirements.write_text("-r base.txt\n")
        (requirements.parent / "base.txt").write_text(f"{PACKAGE}=={VERSION}\n")
        return project, requirements

    def _uv_pair(
        self, *install: str | Path, check: str
    ) -> tuple[Callable[[], list[Sample]], Callable[[], object]]:
        """``uv venv`` + ``uv pip install INSTALL`` into a fresh folder: a sample, and the
        same checking that ``check`` runs in what it made."""

        def sample(checked: bool = False) -> list[Sample]:
            if self.uv is None:
                raise NotMeasurable("uv is not installed")
            venv = self.work.fresh("venv")
            python = venv / BIN / "python"
            started = time.perf_counter()
            run([self.uv, "venv", "--quiet", "--python", sys.executable, venv], cwd=self.work.root)
            run(
                [self.uv, "pip", "install", "--quiet", "--python", python, *install],
                cwd=self.work.root,
            )
            created = time.perf_counter()
            if checked:
                run([python, "-c", check])
            shutil.rmtree(venv)
            return [(created - started, time.perf_counter() - created)]

        return sample, functools.partial(sample, True)

    def _engine(self, cold: bool, **options: Any) -> Callable[[], list[Sample]]:
        """The virtualenv engine with ``options``: warm (one long-lived manager, template
        cached) or cold (a fresh template cache and manager, uv's cache kept)."""

        def sample() -> list[Sample]:
            if not cold:  # milliseconds each: several per round, so noise averages out
                samples = []
                for _ in range(WARM_PER_ROUND):
                    started = time.perf_counter()
                    env = self.manager.create("virtualenv", **options)
                    created = time.perf_counter()
                    self.manager.destroy(env)
                    samples.append((created - started, time.perf_counter() - created))
                return samples
            cache = self.work.fresh("cold-cache")
            try:
                with environ(PYTEST_ISOLATION_CACHE_DIR=str(cache)), IsolationManager() as manager:
                    started = time.perf_counter()
                    env = manager.create("virtualenv", **options)
                    created = time.perf_counter()
                    manager.destroy(env)
                    return [(created - started, time.perf_counter() - created)]
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        return sample

    def _engine_check(self, check: str, **options: Any) -> Callable[[], object]:
        """Make one environment with the long-lived manager (so that what it does once per
        run, such as building a local project, is done) and check it works."""

        def warm_up() -> None:
            env = self.manager.create("virtualenv", **options)
            try:
                env.run(["python", "-c", check]).check()
            finally:
                self.manager.destroy(env)

        return warm_up

    def project_variants(self) -> list[Variant]:
        project, requirements = self.make_project()
        check = f"import {PROJECT}, {PACKAGE}"
        options: dict[str, Any] = {
            "project": str(project),
            "requirements": str(requirements),
            "find_links": [str(self.wheelhouse)],
        }
        baseline, checked = self._uv_pair(
            "--find-links", self.wheelhouse, project, "-r", requirements, check=check
        )
        return [
            Variant(
                Row(
                    "uv venv + uv pip install PROJECT -r REQS",
                    f"uv venv DIR; uv pip install --python DIR/bin/python --find-links WHEELS "
                    f"PROJECT -r REQS (PROJECT: hatchling, depends on {PACKAGE}; REQS: -r "
                    "base.txt, which pins it); uv's cache keeps the project's build",
                ),
                baseline,
                checked,
                peer=True,
            ),
            Variant(
                Row(
                    "virtualenv engine, warm: project + -r",
                    "manager.create('virtualenv', project=PROJECT, requirements=REQS, "
                    "find_links=[WHEELS]); project built once per run (uv build), template "
                    "cached; one long-lived manager",
                ),
                self._engine(False, **options),
                self._engine_check(check, **options),
            ),
            Variant(
                Row(
                    "virtualenv engine, cold: project + -r",
                    "the same with a fresh PYTEST_ISOLATION_CACHE_DIR and a new manager: "
                    "the project's uv build, then the template",
                ),
                self._engine(True, **options),
                self._engine_check(check, **options),
            ),
        ]

    def stack_variants(self) -> list[Variant]:
        check = "import flask, fastapi, pandas, numpy, sqlalchemy"
        baseline, checked = self._uv_pair(*STACK, check=check)
        options: dict[str, Any] = {"packages": list(STACK)}
        return [
            Variant(
                Row(
                    "uv venv + uv pip install STACK",
                    f"uv venv DIR; uv pip install --python DIR/bin/python {' '.join(STACK)} "
                    "(from the index; uv's cache warm)",
                ),
                baseline,
                checked,
                peer=True,
            ),
            Variant(
                Row(
                    "virtualenv engine, warm: STACK",
                    "manager.create('virtualenv', packages=STACK), template cached",
                ),
                self._engine(False, **options),
                self._engine_check(check, **options),
            ),
            Variant(
                Row(
                    "virtualenv engine, cold: STACK",
                    "the same with a fresh PYTEST_ISOLATION_CACHE_DIR and a new manager "
                    "(uv's cache warm, as for the baseline)",
                ),
                self._engine(True, **options),
                self._engine_check(check, **options),
            ),
            Variant(
                Row(
                    "virtualenv engine, warm: STACK, hardlink",
                    "the same with link='hardlink': every file of the template linked "
                    "(sampled in rounds of its own, after the others)",
                ),
                self._engine(False, link="hardlink", **options),
                self._engine_check(check, link="hardlink", **options),
            ),
        ]


# --- running and reporting ------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " | ".join(lines[:1] + lines[-2:]) if len(lines) > 3 else " | ".join(lines)
    return (text or type(exc).__name__)[-400:]


def warm_up(variants: Sequence[Variant]) -> None:
    """Run each variant once, untimed: checks it works (and the package imports).

    A peer that fails is not measurable; a pytest-isolation row whose environment
    does not work is still timed, and flagged.
    """
    for variant in variants:
        if variant.row.problem:
            continue
        try:
            variant.warm_up()
        except NotMeasurable as exc:
            variant.row.problem = str(exc)
        except Exception as exc:
            if variant.peer:
                variant.row.problem = _short(exc)
            else:
                variant.row.broken = _short(exc)


def measure(variants: Sequence[Variant], rounds: int, progress: str) -> None:
    """``rounds`` rounds; each round samples every variant once, in a rotating order.

    Each round starts with the disk's pending writes flushed (untimed), so that
    what an earlier round wrote does not slow a later one down.
    """
    live = [v for v in variants if not v.row.problem]
    for index in range(rounds):
        print(f"  {progress}: round {index + 1}/{rounds}", file=sys.stderr, flush=True)
        if hasattr(os, "sync"):
            os.sync()
        shift = index % len(live) if live else 0
        for variant in live[shift:] + live[:shift]:
            if variant.row.problem or variant.row.failure:
                continue
            try:
                variant.row.add(variant.sample(), index)
            except Exception as exc:
                if variant.peer:
                    variant.row.problem = f"failed while timing: {_short(exc)}"
                else:
                    variant.row.failure = _short(exc)


def paired(row: Row, baseline: Row, *, with_teardown: bool = False) -> float | None:
    """The median over rounds of (row's median - baseline's median) within the same round:
    steadier than a difference of overall medians when the machine's load comes and goes."""
    differences = []
    for index, samples in row.rounds.items():
        other = baseline.rounds.get(index)
        if not samples or not other:
            continue
        differences.append(
            statistics.median(c + (t if with_teardown else 0.0) for c, t in samples)
            - statistics.median(c + (t if with_teardown else 0.0) for c, t in other)
        )
    return statistics.median(differences) if differences else None


def table(title: str, rows: Sequence[Row], baseline: Row) -> list[str]:
    header = (
        f"{'row':<42} {'n':>4} {'min ms':>9} {'median ms':>10} {'max ms':>9} "
        f"{'x baseline':>10} {'teardown med ms':>15}"
    )
    lines = [title, header, "-" * len(header)]
    for row in rows:
        if row.failure:
            lines.append(f"{row.label:<42} FAILED: {row.failure}")
            continue
        if row.problem or not row.create:
            lines.append(f"{row.label:<42} not measurable: {row.problem or 'no samples'}")
            continue
        if baseline.create and not baseline.problem:
            ratio = f"{row.median / baseline.median:.2f}"
        else:
            ratio = "n/a"
        label = f"{row.label} (!)" if row.broken else row.label
        lines.append(
            f"{label:<42} {len(row.create):>4} {ms(min(row.create)):>9} "
            f"{ms(row.median):>10} {ms(max(row.create)):>9} {ratio:>10} "
            f"{'n/a' if row.teardown_untimed else ms(statistics.median(row.teardown)):>15}"
        )
    for row in rows:
        if row.teardown_untimed:
            lines.append(f"teardown n/a for {row.label}: {row.teardown_untimed}")
        if row.broken:
            lines.append(f"(!) {row.label}: the environment it makes does not work: {row.broken}")
    return lines


def versions() -> str:
    found = [f"Python {platform.python_version()}", f"pytest {pytest.__version__}"]
    for name in ("virtualenv", "pip"):
        with contextlib.suppress(Exception):
            found.append(f"{name} {importlib.import_module(name).__version__}")
    uv = find_uv()
    if uv:
        result = subprocess.run([uv, "--version"], capture_output=True, text=True, check=False)
        found.append(result.stdout.strip())
    return ", ".join(found) + f"; {platform.system()} {platform.release()}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds of the fast rows (default 20)"
    )
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=None,
        help="rounds of the slow rows: python -m venv, virtualenv, pytest-virtualenv (default 5)",
    )
    parser.add_argument(
        "--tests-per-run",
        type=int,
        default=None,
        help="timed tests in each pytest run of the fast rows (default 10)",
    )
    parser.add_argument(
        "--index-repeat",
        type=int,
        default=None,
        help="rounds of the project and stack rows, which use the package index (default 5)",
    )
    parser.add_argument(
        "--index-rows-only",
        action="store_true",
        help="only the project and stack rows",
    )
    parser.add_argument(
        "--no-index-rows",
        action="store_true",
        help="leave out the project and stack rows (they download from the package index)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few rounds, for a smoke test (5 fast, 2 slow, 5 tests per run)",
    )
    parser.add_argument(
        "--peers",
        type=Path,
        default=os.environ.get(PEERS_VARIABLE) or None,
        help="a folder with pytest-virtualenv and its dependencies (pip install --target), "
        f"appended to sys.path; default ${PEERS_VARIABLE}",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeat = args.repeat or (5 if quick else 20)
    args.slow_repeat = args.slow_repeat or (2 if quick else 5)
    args.index_repeat = args.index_repeat or (2 if quick else 5)
    args.tests_per_run = args.tests_per_run or (5 if quick else 10)
    if min(args.repeat, args.slow_repeat, args.index_repeat, args.tests_per_run) < 1:
        parser.error("counts must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    host_temp = Path(tempfile.gettempdir())
    before = isolation_dirs(host_temp)
    root = Path(tempfile.mkdtemp(prefix="piso-bench-")).resolve()
    work = Workspace(root)
    # Everything goes under root, temp files included: the environments' folders
    # (pytest-isolation-*) land in root/tmp, where a leak is ours for sure.
    temp = root / "tmp"
    private = {
        "TMPDIR": str(temp),
        "PYTEST_ISOLATION_STATE_DIR": str(root / "state"),
        "PYTEST_ISOLATION_CACHE_DIR": str(root / "cache"),
        "UV_CACHE_DIR": str(root / "uv-cache"),
        "PIP_CACHE_DIR": str(root / "pip-cache"),
        "VIRTUALENV_OVERRIDE_APP_DATA": str(root / "virtualenv-app-data"),
        "WORKSPACE": str(root / "pytest-shutil"),  # where pytest-virtualenv makes its folders
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # each pytest run names its plugins
        "PYTEST_ADDOPTS": None,
    }
    for name in os.environ:
        # no default engine, options or require switch of the host, and no installer
        # settings (find-links, indexes, UV_COMPILE_BYTECODE ...): every row gets defaults
        if name.startswith(("PYTEST_ISOLATION", "PIP_", "UV_", "VIRTUALENV_")) and (
            name not in private
        ):
            private[name] = None
    private.pop(PEERS_VARIABLE, None)
    lines: list[str] = []
    problems: list[str] = []
    saved_tempdir = tempfile.tempdir
    try:
        with environ(**private):
            for folder in (temp, root / "pytest-shutil", root / "wheelhouse"):
                folder.mkdir()
            tempfile.tempdir = str(temp)
            build_wheel(root / "wheelhouse", PACKAGE, VERSION)
            bench = Bench(work, root / "wheelhouse", args.tests_per_run)
            try:
                group_a = [] if args.index_rows_only else bench.workspace_variants()
                fast_b, slow_b = (
                    ([], []) if args.index_rows_only else bench.venv_variants(args.peers)
                )
                group_c = [] if args.no_index_rows else bench.project_variants()
                group_d = [] if args.no_index_rows else bench.stack_variants()
                print("warming up (untimed; checks every variant works) ...", file=sys.stderr)
                warm_up([*group_a, *fast_b, *slow_b, *group_c, *group_d])
                # group by group: the venv rows' disk writes would otherwise land on the
                # sub-millisecond rows; ratios are taken within a group
                measure(group_a, args.repeat, "workspace rows")
                measure(fast_b, args.repeat, "fast venv rows")
                measure(slow_b, args.slow_repeat, "slow venv rows")
                measure(group_c, args.index_repeat, "project rows")
                # the hardlink row writes and removes thousands of files a sample: on its own,
                # so that its disk traffic does not land on the other rows
                measure(group_d[:-1], args.index_repeat, "stack rows")
                measure(group_d[-1:], args.index_repeat, "stack row, hardlink")
                lines = [] if args.index_rows_only else report(bench, group_a, fast_b, slow_b, args)
                lines += report_index_rows(group_c, group_d, args)
            finally:
                bench.close()
            rows = [v.row for v in [*group_a, *fast_b, *slow_b, *group_c, *group_d]]
            problems += [f"{r.label} failed" for r in rows if r.failure]
            problems += [f"{r.label} made environments that do not work" for r in rows if r.broken]
            leftover = Ledger().records()
            if leftover:
                problems.append(
                    f"{len(leftover)} ledger record(s) left: "
                    + ", ".join(f"{r.kind} {r.identifier}" for r in leftover[:5])
                )
            leaked = sorted(isolation_dirs(temp))
            if leaked:
                problems.append(f"{len(leaked)} pytest-isolation-* folder(s) left: {leaked[:5]}")
            peer_left = list((root / "pytest-shutil").iterdir())
            if peer_left:
                lines.append(f"note: pytest-virtualenv left {len(peer_left)} workspace(s) behind")
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(root, ignore_errors=True)
    new_in_host_temp = isolation_dirs(host_temp) - before
    if new_in_host_temp:  # not removed: they may belong to another run going on now
        lines.append(
            f"note: {len(new_in_host_temp)} pytest-isolation-* folder(s) appeared in {host_temp} "
            f"meanwhile, not made by this run (this run's own go under {temp}, checked "
            "above); left alone"
        )
    lines += [f"PROBLEM: {problem}" for problem in problems]
    if not problems:
        lines.append(
            f"left behind: nothing (ledger empty, no pytest-isolation-* folders; {root} removed)"
        )
    print("\n".join(lines))
    return 1 if problems else 0


def report(
    bench: Bench,
    group_a: Sequence[Variant],
    fast_b: Sequence[Variant],
    slow_b: Sequence[Variant],
    args: argparse.Namespace,
) -> list[str]:
    rows_a = [v.row for v in group_a if v.row.label != "IsolationManager() itself"]
    rows_b = [v.row for v in [*fast_b, *slow_b]]
    by_label = {row.label: row for row in [*rows_a, *rows_b]}
    tmp_path = rows_a[0]
    uv_row = rows_b[0]
    lines = [
        "pytest-isolation environment benchmark",
        versions(),
        f"rounds: {args.repeat} (fast rows), {args.slow_repeat} (slow rows); "
        f"{args.tests_per_run} timed tests per pytest run (its first test, which carries "
        "session set-up, is dropped)",
        "times are CREATION only (create + whatever the variant needs to be usable); "
        "teardown is timed separately and shown in the last column, never added in",
        "",
    ]
    lines += table("workspace per test (baseline: tmp_path, pytest run)", rows_a, tmp_path)
    lines.append("")
    lines += table(
        f"virtual environment with one local package '{PACKAGE}' (baseline: uv venv + uv pip)",
        rows_b,
        uv_row,
    )
    lines += ["", "what each row runs:"]
    for row in [*rows_a, *rows_b]:
        lines.append(f"  {row.label}: {row.command}")
    lines += ["", "targets:"]
    basic = by_label["basic: isolated_env, pytest run"]
    over = paired(basic, tmp_path)
    both = paired(basic, tmp_path, with_teardown=True)
    if over is not None and both is not None:
        verdict = "PASS" if over * 1000 <= TARGET_BASIC_OVERHEAD_MS else "MISS"
        lines.append(
            f"  basic over tmp_path, per test (pytest runs; median of per-round differences): "
            f"set-up {over * 1000:+.3f} ms (target <= {TARGET_BASIC_OVERHEAD_MS} ms): "
            f"{verdict}; set-up + teardown {both * 1000:+.3f} ms"
        )
        lines.append(
            f"  (difference of the overall medians: {(basic.median - tmp_path.median) * 1000:+.3f}"
            " ms)"
        )
    warm = by_label["virtualenv engine, warm"]
    if warm.create:
        verdict = "PASS" if warm.median * 1000 <= TARGET_WARM_VENV_MS else "MISS"
        lines.append(
            f"  warm virtualenv env with one package (IsolationManager.create): median "
            f"{ms(warm.median)} ms (target <= {TARGET_WARM_VENV_MS:g} ms): {verdict}"
        )
    if uv_row.create and warm.create:
        lines.append(
            f"  warm engine is {uv_row.median / warm.median:.1f}x faster than uv venv + uv pip"
        )
    venv_row = by_label["python -m venv + pip install"]
    if venv_row.create and warm.create and not venv_row.problem:
        lines.append(
            f"  warm engine is {venv_row.median / warm.median:.0f}x faster than "
            "python -m venv + pip"
        )
    lines += ["", "notes:"]
    if bench.manager_init:
        lines.append(
            f"  IsolationManager() construction + close: median "
            f"{ms(statistics.median(bench.manager_init))} ms (once per run; not in any row)"
        )
    for variant in [*group_a, *fast_b]:
        run_ = variant.sample
        if isinstance(run_, PytestRun) and run_.wall:
            lines.append(
                f"  whole pytest run '{run_.name}' ({run_.tests} tests): median "
                f"{ms(statistics.median(run_.wall))} ms wall"
            )
    for warning in getattr(bench, "peer_warnings", []):
        lines.append(f"  pytest-virtualenv warned on import: {warning}")
    return lines


def report_index_rows(
    project: Sequence[Variant], stack: Sequence[Variant], args: argparse.Namespace
) -> list[str]:
    """The project and stack tables, with their targets, ratios paired per round."""
    lines: list[str] = []
    for title, group in (
        ("the project under test + a requirements file with -r", project),
        (f"a stack of {len(STACK)} requirements, about 50 distributions", stack),
    ):
        if not group:
            continue
        rows = [v.row for v in group]
        baseline = rows[0]
        lines += [
            "",
            *table(
                f"{title} (baseline: {baseline.label}; rounds: {args.index_repeat})", rows, baseline
            ),
        ]
        lines += [f"  {row.label}: {row.command}" for row in rows]
        for row in rows[1:]:
            if not row.create:
                continue
            if "warm" in row.label and "hardlink" not in row.label:
                verdict = "PASS" if row.median * 1000 <= TARGET_WARM_VENV_MS else "MISS"
                lines.append(
                    f"  target: {row.label}: median {ms(row.median)} ms "
                    f"(target <= {TARGET_WARM_VENV_MS:g} ms): {verdict}"
                )
            ratio = paired_ratio(row, baseline) if baseline.create else None
            if "cold" in row.label and ratio is not None:
                if group is stack:
                    verdict = "PASS" if ratio <= TARGET_COLD_RATIO else "MISS"
                    lines.append(
                        f"  target: {row.label}: {ratio:.2f}x {baseline.label} (median of "
                        f"per-round ratios; target <= {TARGET_COLD_RATIO:g}x): {verdict}"
                    )
                else:  # not the same work: uv reuses its build of the project, edited or not
                    lines.append(
                        f"  {row.label}: {ratio:.2f}x {baseline.label} (median of per-round "
                        "ratios); it builds the project (uv build) where the baseline reuses "
                        "uv's cached build, which a source edit does not invalidate"
                    )
    return lines


def paired_ratio(row: Row, baseline: Row) -> float | None:
    """The median over rounds of row / baseline within the same round."""
    ratios = [
        statistics.median(c for c, _ in samples) / statistics.median(c for c, _ in other)
        for index, samples in row.rounds.items()
        if samples and (other := baseline.rounds.get(index))
    ]
    return statistics.median(ratios) if ratios else None


if __name__ == "__main__":
    sys.exit(main())
