#!/usr/bin/env python
"""What the sandbox engine costs: per test in inside mode, and per command, next to its peers.

Run from the repository root (as root, or where user namespaces are allowed)::

    python benchmarks/bench_sandbox.py [--python PATH] [--rounds N] [--tests N] [--quick]

Two tables, every row timed in this one process run, the variants of a table
interleaved round by round (in a rotating order) so that machine noise hits
all of them alike.

* per-test overhead: wall time of one ``PYTHON -m pytest`` run of a generated
  file of trivial tests (``def test_N(): pass``), plain and with each way of
  running every test in a process of its own: pytest-forked (``--forked``),
  pytest-isolate (``--isolate``), a minimal fork-per-test plugin written here
  (the floor of any fork-based design on this pytest), and the sandbox
  engine's inside mode (``--isolation=sandbox --isolation-inside``).  The
  overhead per test is (variant - plain) / tests.
* ``true`` in a sandbox: ``env.run(["true"])`` in a ``sandbox`` environment
  (one environment, many commands) against ``unshare`` and ``bwrap`` with the
  same namespaces, the ``basic`` engine's ``env.run``, and a plain
  ``subprocess.run(["true"])`` (the baseline).

With ``--before REV`` the first table has one more row: inside mode as the
code at git revision ``REV`` runs it (checked out beside, imported first), so
that a change is measured against what it replaced in the same run.

The peers (pytest-forked, pytest-isolate) are not installed in the development
environment: their plugins would load into the project's own test runs.  Give
``--python`` an interpreter that has them, with pytest-isolation installed too,
so that one pytest runs every variant.

Everything is made under one temporary folder (``TMPDIR``, the ledger, the
template cache), removed at the end; the script exits 1 if any environment,
folder, cgroup or ledger record is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common import environ, isolation_dirs, ms

from pytest_isolation import IsolationManager
from pytest_isolation.ledger import Ledger
from pytest_isolation.linux.cgroups import discover

if TYPE_CHECKING:
    from pytest_isolation.engines.base import IsolatedEnvironment

CGROUP_ROOT = Path("/sys/fs/cgroup")
TARGET_INSIDE_OVERHEAD_MS = 5.0
#: env.run(["true"]) in a sandbox, at most this many times unshare with the same namespaces
TARGET_RUN_RATIO = 1.5
FORK_PLUGIN = "bench_fork_reference"

#: The minimal fork-per-test plugin: fork, run the protocol in the child, send the reports
#: back through a pipe with pytest's own serialization hooks (as pytest-isolation does).
FORK_PLUGIN_SOURCE = '''\
"""Fork per test, nothing else: the floor of any fork-based runner on this pytest."""

import json
import os

import pytest
from _pytest.runner import runtestprotocol


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    hook = item.config.hook
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        status = 1
        try:
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            data = [hook.pytest_report_to_serializable(config=item.config, report=r)
                    for r in reports]
            with os.fdopen(write, "wb") as pipe:
                pipe.write(json.dumps(data).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    for serialized in json.loads(data) if data else []:
        report = hook.pytest_report_from_serializable(config=item.config, data=serialized)
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
'''

#: Run by the peer interpreter when pytest-forked fails: which report field marshal refuses.
FORKED_PROBE = """\
import marshal, pytest_forked
from _pytest.reports import TestReport
report = TestReport("t.py::test_0", ("t.py", 0, "test_0"), {}, "passed", None, "call")
for name, value in pytest_forked.serialize_report(report).items():
    try:
        marshal.dumps(value)
    except ValueError as exc:
        print(f"{name} is a {type(value).__module__}.{type(value).__qualname__}: {exc}")
"""

#: One test that fails unless it runs in the sandbox (its own UTS namespace).
CHECK_SOURCE = """\
import socket


def test_runs_in_the_sandbox():
    assert socket.gethostname() == "sandbox"
"""


class NotMeasurable(Exception):
    """A variant that cannot run here (a missing or broken peer or tool); its row says why."""


@dataclass
class Row:
    """One line of a table: a variant, its samples (seconds) and the round of each."""

    label: str
    command: str
    samples: list[float] = field(default_factory=list)
    rounds: dict[int, list[float]] = field(default_factory=dict)
    #: why a peer cannot be measured here (a "not measurable" row)
    problem: str | None = None
    #: why a pytest-isolation row failed: the script then exits 1
    failure: str | None = None

    def add(self, seconds: float, round_index: int) -> None:
        self.samples.append(seconds)
        self.rounds.setdefault(round_index, []).append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Variant:
    """A row, how to take one sample, and how to check it works (untimed, first)."""

    row: Row
    sample: Callable[[], float]
    check: Callable[[], object]
    peer: bool = False  # a failure makes the row "not measurable", not a failure of ours


# --- helpers --------------------------------------------------------------------------------


def _short(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " | ".join(lines[:1] + lines[-2:]) if len(lines) > 3 else " | ".join(lines)
    return joined[:limit] or "no output"


def timed_call(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one command; raises with its output if it fails."""
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise RuntimeError(f"exited {result.returncode}: {_short(output)}")
    return elapsed


def isolation_cgroups() -> set[str]:
    """Every cgroup named ``pytest-isolation*``, in every hierarchy."""
    found: set[str] = set()
    if not CGROUP_ROOT.is_dir():
        return found
    for directory, children, _ in os.walk(CGROUP_ROOT):
        for child in children:
            if child.startswith("pytest-isolation"):
                found.add(os.path.join(directory, child))
    return found


def new_cgroups(before: set[str], grace: float = 5.0) -> list[str]:
    """``pytest-isolation*`` cgroups that were not there at the start and stay.

    Another pytest-isolation run on this machine (in the same delegated cgroup) makes
    and removes cgroups of its own all the time; theirs go within ``grace`` seconds.
    """
    deadline = time.monotonic() + grace
    while True:
        left = sorted(isolation_cgroups() - before)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def processes_using(folder: Path, grace: float = 5.0) -> list[str]:
    """Processes (other than this one) whose command line names ``folder``: a watchdog
    (``--state-dir``) or a pytest run that outlived its run; they get ``grace`` seconds."""
    needle = os.fsencode(folder)
    deadline = time.monotonic() + grace
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes()
                if needle in command:
                    text = command.replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry.name}: {text.strip()[:120]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# --- table 1: per-test overhead of a pytest run -----------------------------------------------


class Suite:
    """The generated test files and the pytest command lines that run them."""

    def __init__(self, root: Path, python: str, tests: int) -> None:
        self.python = python
        self.tests = tests
        self.folder = root / "suite"
        self.check_folder = root / "check"
        self.plugins = root / "plugins"
        for folder in (self.folder, self.check_folder, self.plugins):
            folder.mkdir()
        body = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(tests))
        (self.folder / "test_trivial.py").write_text(body.rstrip() + "\n", "utf-8")
        (self.check_folder / "test_check.py").write_text(CHECK_SOURCE, "utf-8")
        (self.plugins / f"{FORK_PLUGIN}.py").write_text(FORK_PLUGIN_SOURCE, "utf-8")
        for folder in (self.folder, self.check_folder):
            (folder / "pytest.ini").write_text("[pytest]\n", "utf-8")

    def argv(self, extra: Sequence[str], folder: Path | None = None) -> list[str]:
        folder = folder or self.folder
        test_file = next(folder.glob("test_*.py"))
        return [
            self.python,
            "-m",
            "pytest",
            str(test_file),
            "-q",
            "-c",
            str(folder / "pytest.ini"),
            "--rootdir",
            str(folder),
            "-p",
            "no:cacheprovider",
            *extra,
        ]

    def env(self, plugin_path: bool, first_on_path: Path | None = None) -> dict[str, str] | None:
        if not plugin_path and first_on_path is None:
            return None
        paths = [str(first_on_path)] if first_on_path is not None else []
        if plugin_path:
            paths.append(str(self.plugins))
        paths += filter(None, [os.environ.get("PYTHONPATH")])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}

    def run(
        self,
        extra: Sequence[str],
        *,
        plugin_path: bool = False,
        folder: Path | None = None,
        first_on_path: Path | None = None,
    ) -> tuple[float, int, str]:
        """(wall seconds, exit status, output) of one pytest run."""
        started = time.perf_counter()
        result = subprocess.run(
            self.argv(extra, folder),
            capture_output=True,
            text=True,
            env=self.env(plugin_path, first_on_path),
            check=False,
        )
        elapsed = time.perf_counter() - started
        return elapsed, result.returncode, result.stdout + result.stderr

    def has_module(self, module: str) -> bool:
        probe = [self.python, "-c", f"import {module}"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0

    def why_failed(self, status: int, output: str, tests: int) -> str:
        """The first error line of a failed run, and how many of its tests passed."""
        passed = re.search(r"(\d+) passed", output)
        count = f"{passed.group(1) if passed else 0}/{tests} tests passed"
        error = re.search(r"^E\s+(\S.*)$", output, re.MULTILINE)
        summary = re.search(r"^(?:FAILED|ERROR)\b.*? - (.*)$", output, re.MULTILINE)
        usage = re.search(r"^(?:ERROR|error): (.*)$", output, re.MULTILINE)
        for found in (error, summary, usage):
            if found:
                message = found.group(1).strip()
                for folder in (self.folder, self.check_folder):
                    message = message.replace(f"{folder}{os.sep}", "")
                return f"exit {status}, {count}: {message[:200]}"
        return f"exit {status}, {count}: {_short(output)}"

    def variant(
        self,
        row: Row,
        extra: Sequence[str],
        *,
        module: str | None = None,
        plugin_path: bool = False,
        peer: bool = False,
        diagnose: Callable[[], str] | None = None,
        first_on_path: Path | None = None,
    ) -> Variant:
        expected = f"{self.tests} passed"

        def sample() -> float:
            elapsed, status, output = self.run(
                extra, plugin_path=plugin_path, first_on_path=first_on_path
            )
            if status or expected not in output:
                raise RuntimeError(self.why_failed(status, output, self.tests))
            return elapsed

        def check() -> None:
            if module and not self.has_module(module):
                raise NotMeasurable(f"{module} is not installed in {self.python} (see --python)")
            try:
                sample()
            except RuntimeError as exc:
                hint = diagnose() if diagnose else ""
                raise RuntimeError(f"{exc}{'; ' + hint if hint else ''}") from None

        return Variant(row, sample, check, peer)

    def forked_diagnosis(self) -> str:
        """Why pytest-forked's child fails: the report field marshal cannot serialize."""
        result = subprocess.run(
            [self.python, "-c", FORKED_PROBE], capture_output=True, text=True, check=False
        )
        found = result.stdout.strip().splitlines()
        if not found:
            return ""
        return f"its child cannot marshal pytest's TestReport ({found[0]})"

    def check_sandbox(self, extra: Sequence[str]) -> None:
        """The sandbox row's tests really run in the sandbox (and are not skipped)."""
        _, status, output = self.run(
            [*extra, "--isolation-require=sandbox"], folder=self.check_folder
        )
        if status or "1 passed" not in output:
            raise RuntimeError(
                f"a test that checks it runs in the sandbox: {self.why_failed(status, output, 1)}"
            )


def pytest_variants(suite: Suite, before: tuple[str, Path] | None = None) -> list[Variant]:
    n = suite.tests
    sandbox = ["-p", "pytest_isolation.plugin", "--isolation=sandbox", "--isolation-inside"]
    inside = suite.variant(
        Row(
            "sandbox engine, inside mode",
            f"pytest -p pytest_isolation.plugin --isolation=sandbox --isolation-inside, {n} tests",
        ),
        sandbox,
        module="pytest_isolation",
    )
    check_runs = inside.check

    def check_inside() -> None:
        check_runs()
        suite.check_sandbox(sandbox)

    inside.check = check_inside
    earlier = []
    if before is not None:
        revision, checkout = before
        earlier.append(
            suite.variant(
                Row(
                    f"inside mode at {revision[:10]}",
                    f"the same run with the code of git revision {revision} imported first "
                    "(PYTHONPATH), for the same run's before and after",
                ),
                sandbox,
                module="pytest_isolation",
                first_on_path=checkout,
            )
        )
    return [
        suite.variant(
            Row("plain pytest (baseline)", f"pytest on {n} trivial tests (def test_N(): pass)"),
            [],
        ),
        suite.variant(
            Row(
                "pytest-isolation plugin loaded",
                "pytest -p pytest_isolation.plugin: the plugin, no isolation asked for "
                "(mostly a fixed start-up cost, spread over the tests)",
            ),
            ["-p", "pytest_isolation.plugin"],
            module="pytest_isolation",
        ),
        suite.variant(
            Row(
                "fork per test (minimal reference)",
                f"pytest -p {FORK_PLUGIN}: this script's own plugin, fork + JSON reports "
                "through a pipe, nothing else",
            ),
            ["-p", FORK_PLUGIN],
            plugin_path=True,
        ),
        suite.variant(
            Row("pytest-forked", "pytest -p pytest_forked --forked"),
            ["-p", "pytest_forked", "--forked"],
            module="pytest_forked",
            peer=True,
            diagnose=suite.forked_diagnosis,
        ),
        suite.variant(
            Row("pytest-isolate", "pytest -p pytest_isolate.plugin --isolate"),
            ["-p", "pytest_isolate.plugin", "--isolate"],
            module="pytest_isolate",
            peer=True,
        ),
        *earlier,
        inside,
    ]


# --- table 2: one command in a sandbox --------------------------------------------------------


class Commands:
    """``true`` run each way; one long-lived environment per engine."""

    def __init__(self) -> None:
        self.manager = IsolationManager()
        self.envs: dict[str, IsolatedEnvironment] = {}
        self.root = os.geteuid() == 0

    def close(self) -> None:
        self.manager.close()

    def env_run(self, engine: str) -> Callable[[], float]:
        def sample() -> float:
            env = self.envs.get(engine)
            if env is None:
                env = self.envs[engine] = self.manager.create(engine)
            started = time.perf_counter()
            result = env.run(["true"])
            elapsed = time.perf_counter() - started
            if not result.ok:
                raise RuntimeError(f"exited {result.returncode}: {_short(result.stderr)}")
            return elapsed

        return sample

    def unshare_argv(self) -> list[str]:
        user = "" if self.root else "--user --map-root-user "
        return f"unshare {user}--pid --fork --mount-proc --net --uts --ipc --mount true".split()

    @staticmethod
    def bwrap_argv() -> list[str]:
        binds = "--ro-bind / / --proc /proc --dev /dev"
        return f"bwrap --unshare-all --die-with-parent {binds} true".split()

    def tool(self, argv: list[str], package: str) -> tuple[Callable[[], float], Callable[[], None]]:
        def sample() -> float:
            return timed_call(argv)

        def check() -> None:
            if shutil.which(argv[0]) is None:
                raise NotMeasurable(
                    f"{argv[0]} is not installed (Debian: apt-get install {package})"
                )
            sample()

        return sample, check

    def variants(self) -> list[Variant]:
        who = "as root, so no --user" if self.root else "not root: --user --map-root-user"
        unshare_sample, unshare_check = self.tool(self.unshare_argv(), "util-linux")
        bwrap_sample, bwrap_check = self.tool(self.bwrap_argv(), "bubblewrap")
        basic = self.env_run("basic")
        sandbox = self.env_run("sandbox")

        def plain() -> float:
            return timed_call(["true"])

        return [
            Variant(Row("subprocess true (baseline)", "subprocess.run(['true'])"), plain, plain),
            Variant(
                Row(
                    "basic engine env.run",
                    "env.run(['true']) in one IsolationManager().create('basic') "
                    "(no namespaces: the cost of env.run itself)",
                ),
                basic,
                basic,
            ),
            Variant(
                Row(
                    "sandbox engine env.run",
                    "env.run(['true']) in one IsolationManager().create('sandbox'): the "
                    "environment's init starts each command (a shepherd, then the command)",
                ),
                sandbox,
                sandbox,
            ),
            Variant(
                Row(
                    f"unshare ({'root' if self.root else 'rootless'})",
                    " ".join(self.unshare_argv()) + f" ({who})",
                ),
                unshare_sample,
                unshare_check,
                peer=True,
            ),
            Variant(
                Row("bwrap", " ".join(self.bwrap_argv())), bwrap_sample, bwrap_check, peer=True
            ),
        ]


# --- running and reporting ------------------------------------------------------------------


def check_all(variants: Sequence[Variant]) -> None:
    """Run each variant once, untimed; a peer that fails becomes "not measurable", a row
    of pytest-isolation that fails (or cannot run with ``--python``) a failure."""
    for variant in variants:
        try:
            variant.check()
        except NotMeasurable as exc:
            if variant.peer:
                variant.row.problem = str(exc)
            else:
                variant.row.failure = str(exc)
        except Exception as exc:
            if variant.peer:
                variant.row.problem = _short(str(exc), 400)
            else:
                variant.row.failure = _short(str(exc), 400)


def measure(variants: Sequence[Variant], rounds: int, per_round: int, progress: str) -> None:
    """``rounds`` rounds; in each, every variant takes ``per_round`` samples, in a rotating
    order."""
    live = [v for v in variants if not (v.row.problem or v.row.failure)]
    for index in range(rounds):
        print(f"  {progress}: round {index + 1}/{rounds}", file=sys.stderr, flush=True)
        shift = index % len(live) if live else 0
        for variant in live[shift:] + live[:shift]:
            for _ in range(per_round):
                if variant.row.problem or variant.row.failure:
                    break
                try:
                    variant.row.add(variant.sample(), index)
                except Exception as exc:
                    message = f"failed while timing: {_short(str(exc))}"
                    if variant.peer:
                        variant.row.problem = message
                    else:
                        variant.row.failure = message


def paired(row: Row, baseline: Row) -> float | None:
    """Median over rounds of (row's median - baseline's median) within the same round."""
    differences = [
        statistics.median(samples) - statistics.median(baseline.rounds[index])
        for index, samples in row.rounds.items()
        if samples and baseline.rounds.get(index)
    ]
    return statistics.median(differences) if differences else None


def table(title: str, rows: Sequence[Row], extra: str, value: Callable[[Row], str]) -> list[str]:
    """min / median / max ms, ratio to the first row (the baseline), and one more column."""
    baseline = rows[0]
    header = (
        f"{'row':<36} {'n':>4} {'min ms':>9} {'median ms':>10} {'max ms':>9} "
        f"{'x baseline':>10} {extra:>17}"
    )
    lines = [title, header, "-" * len(header)]
    for row in rows:
        if row.failure:
            lines.append(f"{row.label:<36} FAILED: {row.failure}")
            continue
        if row.problem or not row.samples:
            lines.append(f"{row.label:<36} not measurable: {row.problem or 'no samples'}")
            continue
        ratio = f"{row.median / baseline.median:.2f}" if baseline.samples else "n/a"
        lines.append(
            f"{row.label:<36} {len(row.samples):>4} {ms(min(row.samples)):>9} "
            f"{ms(row.median):>10} {ms(max(row.samples)):>9} {ratio:>10} {value(row):>17}"
        )
    return lines


def peer_versions(python: str) -> str:
    code = (
        "import importlib.metadata as m, platform\n"
        "names = ['pytest', 'pytest-forked', 'pytest-isolate', 'pytest-isolation']\n"
        "found = []\n"
        "for n in names:\n"
        "    try: found.append(f'{n} {m.version(n)}')\n"
        "    except m.PackageNotFoundError: found.append(f'{n} missing')\n"
        "print(f'Python {platform.python_version()}, ' + ', '.join(found))\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return result.stdout.strip() or f"cannot run {python}: {_short(result.stderr)}"


def tool_versions() -> str:
    found = []
    for argv in (["unshare", "--version"], ["bwrap", "--version"]):
        if shutil.which(argv[0]):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            found.append(result.stdout.strip().splitlines()[0] if result.stdout.strip() else "?")
    return ", ".join(found) or "no unshare, no bwrap"


REPOSITORY = Path(__file__).resolve().parent.parent


def checkout(revision: str, where: Path) -> tuple[str, Path]:
    """``revision`` checked out at ``where`` (a git worktree of this repository)."""
    resolved = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), resolved],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    )
    return resolved, where


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs every pytest variant: it needs pytest and "
        "pytest-isolation, and pytest-forked and pytest-isolate for their rows "
        "(default: this one)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="pytest runs per variant (default 5)"
    )
    parser.add_argument(
        "--tests", type=int, default=None, help="trivial tests per pytest run (default 200)"
    )
    parser.add_argument(
        "--run-rounds",
        type=int,
        default=None,
        help="rounds of the `true` rows (default 20); each takes --run-per-round samples",
    )
    parser.add_argument(
        "--run-per-round",
        type=int,
        default=10,
        help="samples of each `true` row per round (default 10)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 2 rounds of 50 tests, 5 `true` rounds"
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also time inside mode as git revision REV runs it (checked out beside, "
        "imported first), to compare a change with what it replaced in one run",
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.tests = args.tests or (50 if args.quick else 200)
    args.run_rounds = args.run_rounds or (5 if args.quick else 20)
    if min(args.rounds, args.tests, args.run_rounds, args.run_per_round) < 1:
        parser.error("counts must be at least 1")
    return args


def report(
    args: argparse.Namespace, suite: Suite, pytest_rows: Sequence[Row], run_rows: Sequence[Row]
) -> list[str]:
    n = suite.tests
    plain = pytest_rows[0]

    def per_test(row: Row) -> str:
        if row is plain:
            return "-"
        return f"{(row.median - plain.median) / n * 1000:+.2f}"

    def over(row: Row) -> str:
        if row is run_rows[0]:
            return "-"
        return f"{(row.median - run_rows[0].median) * 1000:+.2f}"

    lines = [
        "pytest-isolation sandbox benchmark",
        f"this interpreter: Python {platform.python_version()}; "
        f"pytest runs ({args.python}): {peer_versions(args.python)}",
        f"{tool_versions()}; {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
        f"{'root' if os.geteuid() == 0 else 'not root (user namespaces)'}",
        f"sandbox cgroups: {discover().describe()}",
        "",
    ]
    lines += table(
        f"per-test overhead: one pytest run of {n} trivial tests, {args.rounds} rounds "
        "(wall time of the whole run; overhead = (variant - plain) / tests)",
        pytest_rows,
        "overhead/test ms",
        per_test,
    )
    lines.append("")
    lines += table(
        f"`true` in a sandbox: {args.run_rounds} rounds x {args.run_per_round} runs "
        "(wall time of one command)",
        run_rows,
        "+ms over baseline",
        over,
    )
    lines += ["", "what each row runs:"]
    lines += [f"  {row.label}: {row.command}" for row in [*pytest_rows, *run_rows]]
    lines += ["", "target:"]
    inside = pytest_rows[-1]
    if inside.samples and plain.samples and not inside.failure:
        overhead = (inside.median - plain.median) / n * 1000
        pair = paired(inside, plain)
        verdict = "PASS" if overhead <= TARGET_INSIDE_OVERHEAD_MS else "FAIL"
        lines.append(
            f"  sandbox inside mode adds {overhead:.2f} ms per test (difference of medians; "
            f"target <= {TARGET_INSIDE_OVERHEAD_MS:g} ms): {verdict}"
            + (f"; paired per round: {pair / n * 1000:.2f} ms" if pair is not None else "")
        )
        loaded = pytest_rows[1]
        if loaded.samples:
            lines.append(
                f"  over the plugin-loaded run: {(inside.median - loaded.median) / n * 1000:.2f}"
                " ms per test (without the plugin's fixed start-up cost)"
            )
        fork = next(r for r in pytest_rows if r.label.startswith("fork per test"))
        if fork.samples:
            floor = (fork.median - plain.median) / n * 1000
            lines.append(
                f"  of which a bare fork per test costs {floor:.2f} ms "
                f"(minimal reference plugin); the sandbox adds {overhead - floor:.2f} ms on top"
            )
    else:
        lines.append("  sandbox inside mode: no samples: FAIL")
    earlier = next((r for r in pytest_rows if r.label.startswith("inside mode at ")), None)
    if earlier is not None and earlier.samples and inside.samples:
        change = (inside.median - earlier.median) / n * 1000
        ratio = _paired_ratio(inside, earlier)
        verdict = "PASS" if change <= 0 or (ratio is not None and ratio <= 1.0) else "FAIL"
        lines.append(
            f"  inside mode now vs {earlier.label[len('inside mode at ') :]}: {change:+.2f} ms "
            f"per test"
            + (f", paired ratio {ratio:.2f}" if ratio is not None else "")
            + f" (target: no slower): {verdict}"
        )
    sandbox_run = next(r for r in run_rows if r.label.startswith("sandbox engine"))
    unshare = next(r for r in run_rows if r.label.startswith("unshare"))
    if sandbox_run.samples and unshare.samples:
        ratio = _paired_ratio(sandbox_run, unshare)
        shown = ratio if ratio is not None else sandbox_run.median / unshare.median
        verdict = "PASS" if shown <= TARGET_RUN_RATIO else "FAIL"
        lines.append(
            f"  env.run(['true']) in a sandbox: {ms(sandbox_run.median)} ms, {shown:.2f}x "
            f"unshare ({ms(unshare.median)} ms; paired per round; target <= "
            f"{TARGET_RUN_RATIO:g}x): {verdict}"
        )
    return lines


def _paired_ratio(row: Row, baseline: Row) -> float | None:
    """Median over rounds of row's median / baseline's median within the same round."""
    ratios = [
        statistics.median(samples) / statistics.median(baseline.rounds[index])
        for index, samples in row.rounds.items()
        if samples and baseline.rounds.get(index)
    ]
    return statistics.median(ratios) if ratios else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("the sandbox engine needs Linux", file=sys.stderr)
        return 1
    host_temp = Path(tempfile.gettempdir())
    before_dirs = isolation_dirs(host_temp)
    before_cgroups = isolation_cgroups()
    root = Path(tempfile.mkdtemp(prefix="piso-bench-sandbox-")).resolve()
    temp = root / "tmp"
    private: dict[str, str | None] = {
        "TMPDIR": str(temp),
        "PYTEST_ISOLATION_STATE_DIR": str(root / "state"),
        "PYTEST_ISOLATION_CACHE_DIR": str(root / "cache"),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # each pytest run names its plugins
        "PYTEST_ADDOPTS": None,
        "COLUMNS": "250",  # pytest's summary lines uncut, for the "not measurable" reasons
    }
    for name in os.environ:
        # no default engine, options or require switch of the host: every row gets defaults
        if name.startswith("PYTEST_ISOLATION") and name not in private:
            private[name] = None
    lines: list[str] = []
    problems: list[str] = []
    saved_tempdir = tempfile.tempdir
    try:
        with environ(**private):
            temp.mkdir()
            tempfile.tempdir = str(temp)
            suite = Suite(root, args.python, args.tests)
            commands = Commands()
            before = checkout(args.before, root / "before") if args.before else None
            try:
                pytest_group = pytest_variants(suite, before)
                run_group = commands.variants()
                print("checking every variant once (untimed) ...", file=sys.stderr)
                check_all([*pytest_group, *run_group])
                measure(pytest_group, args.rounds, 1, "pytest runs")
                measure(run_group, args.run_rounds, args.run_per_round, "`true` runs")
            finally:
                commands.close()
                if before is not None:
                    subprocess.run(
                        ["git", "worktree", "remove", "--force", str(before[1])],
                        cwd=REPOSITORY,
                        capture_output=True,
                        check=False,
                    )
            pytest_rows = [v.row for v in pytest_group]
            run_rows = [v.row for v in run_group]
            lines = report(args, suite, pytest_rows, run_rows)
            problems += [f"{r.label} failed" for r in [*pytest_rows, *run_rows] if r.failure]
            ledger = Ledger()
            leftover = ledger.records()
            if leftover:
                problems.append(
                    f"{len(leftover)} ledger record(s) left: "
                    + ", ".join(f"{r.kind} {r.identifier}" for r in leftover[:5])
                )
            stray = sorted(p.name for p in ledger.root.iterdir()) if ledger.root.is_dir() else []
            if stray and not leftover:
                problems.append(f"{len(stray)} file(s) left in the ledger: {stray[:5]}")
            running = processes_using(root)
            if running:
                problems.append(f"{len(running)} process(es) of this run still running: {running}")
            leaked = sorted(isolation_dirs(temp))
            if leaked:
                problems.append(f"{len(leaked)} pytest-isolation-* folder(s) left: {leaked[:5]}")
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(root, ignore_errors=True)
    cgroups_left = new_cgroups(before_cgroups)
    if cgroups_left:
        problems.append(
            f"{len(cgroups_left)} pytest-isolation* cgroup(s) made during this run are left: "
            f"{cgroups_left[:5]}"
        )
    if root.exists():
        problems.append(f"{root} could not be removed")
    new_in_host_temp = isolation_dirs(host_temp) - before_dirs
    if new_in_host_temp:  # not ours: this run's go under root/tmp, checked above
        lines.append(
            f"note: {len(new_in_host_temp)} pytest-isolation-* folder(s) appeared in {host_temp} "
            "meanwhile, not made by this run; left alone"
        )
    if before_cgroups:
        lines.append(
            f"note: {len(before_cgroups)} pytest-isolation* cgroup(s) existed before this run "
            "(not ours); left alone"
        )
    lines += [f"PROBLEM: {problem}" for problem in problems]
    if not problems:
        lines.append(
            "left behind: nothing (ledger empty, no pytest-isolation-* folders, "
            f"no pytest-isolation* cgroups, no processes; {root} removed)"
        )
    print("\n".join(lines))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
