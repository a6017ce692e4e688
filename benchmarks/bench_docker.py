#!/usr/bin/env python
"""What one docker environment costs, next to what a user would otherwise do.

Run from the repository root, with a docker daemon and the test image present::

    python benchmarks/bench_docker.py [--repeat N] [--quick] [--peers DIR]

Two groups of rows, each with a baseline, all measured in this one process
run on the same local image (nothing is pulled):

* a container per environment: ``docker run -d`` + ``docker rm -f`` through the
  CLI (baseline), the docker SDK's ``containers.run`` + ``remove``,
  testcontainers' ``DockerContainer`` (``start`` + ``stop``), and the ``docker``
  engine through :class:`IsolationManager`, without a pool and with
  ``pool=4`` while every "test" takes about 100 ms (a sleep between an
  environment's creation and its teardown).  Creation time is what the table
  ranks; teardown is timed separately and never added in.
* exec latency, on one running container: ``docker exec`` through the CLI
  (baseline), the SDK's ``exec_run`` and the engine's ``env.run``.

The rows of a group are sampled round by round in a rotating order, so that
machine noise hits all of them alike; the pool rows run their samples back to
back, as a test suite would (interleaving would give the pool idle time to
refill that a real suite does not give it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import environ, ms

from pytest_isolation import IsolationManager
from pytest_isolation.engines.docker import SESSION_LABEL, DockerEnvironment
from pytest_isolation.ledger import Ledger

#: The image every row starts (CI builds it offline, see .ci/run).
DEFAULT_IMAGE = os.environ.get("PYTEST_ISOLATION_TEST_IMAGE", "piso-test-python:bookworm")
#: Where ``--peers`` comes from when not given: a folder with testcontainers and its deps.
PEERS_VARIABLE = "PYTEST_ISOLATION_BENCH_DOCKER_PEERS"
#: Labels every container this benchmark starts outside the engine, to find leftovers.
BENCH_LABEL = "pytest-isolation.bench"
TARGET_POOL_MS = 60.0
COMMAND = ["sleep", "infinity"]

#: (seconds to create, seconds to tear down) of one sample.
Sample = tuple[float, float]


class NotMeasurable(Exception):
    """A peer that cannot run here; its row says why."""


@dataclass
class Row:
    """One line of a table: a variant and its samples."""

    label: str
    command: str
    create: list[float] = field(default_factory=list)
    teardown: list[float] = field(default_factory=list)
    problem: str | None = None  # a peer that cannot be measured here
    failure: str | None = None  # a pytest-isolation row that failed
    has_teardown: bool = True

    def add(self, samples: Sequence[Sample]) -> None:
        for create, teardown in samples:
            self.create.append(create)
            self.teardown.append(teardown)

    @property
    def median(self) -> float:
        return statistics.median(self.create)


@dataclass
class Variant:
    row: Row
    sample: Callable[[], list[Sample]]
    check: Callable[[], object]
    peer: bool = False  # a failure is "not measurable", not a failure of pytest-isolation


def run(argv: Sequence[str]) -> str:
    """Run a command quietly; its stdout, or raise with its output if it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    return result.stdout


def short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (" | ".join(lines[:2]) or type(exc).__name__)[:300]


class Bench:
    """The variants of both groups, and what they need."""

    def __init__(self, args: argparse.Namespace, run_id: str) -> None:
        import docker

        self.args = args
        self.image = args.image
        self.run_id = run_id
        self.label = f"{BENCH_LABEL}={run_id}"
        self.client = docker.from_env()
        self.docker_cli = shutil.which("docker")
        self.manager = IsolationManager()
        self.sessions = [self.manager.session_id]
        self.testcontainers: Any = None
        self.exec_env: DockerEnvironment | None = None

    # --- a container per environment ---

    def _cli(self, *, check: bool = False) -> list[Sample]:
        if self.docker_cli is None:
            raise NotMeasurable("the docker CLI is not on PATH")
        started = time.perf_counter()
        ident = run(
            [
                self.docker_cli,
                "run",
                "-d",
                "--init",
                "--network",
                "none",
                "--label",
                self.label,
                self.image,
                *COMMAND,
            ]
        ).strip()
        created = time.perf_counter()
        if check:
            run([self.docker_cli, "exec", ident, "true"])
        run([self.docker_cli, "rm", "-f", ident])
        return [(created - started, time.perf_counter() - created)]

    def _sdk(self, *, check: bool = False) -> list[Sample]:
        started = time.perf_counter()
        container = self.client.containers.run(
            self.image,
            COMMAND,
            detach=True,
            init=True,
            network_mode="none",
            labels={BENCH_LABEL: self.run_id},
        )
        created = time.perf_counter()
        if check:
            container.reload()
            assert container.status == "running", container.status
        container.remove(force=True)
        return [(created - started, time.perf_counter() - created)]

    def _load_testcontainers(self) -> Any:
        if self.testcontainers is None:
            peers = self.args.peers
            if peers is not None and str(peers) not in sys.path:
                sys.path.append(str(peers))  # appended: never shadows what the venv has
            # Ryuk, testcontainers' reaper, is an image of its own that cannot be pulled here
            os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
            try:
                module = importlib.import_module("testcontainers.core.container")
            except Exception as exc:
                raise NotMeasurable(
                    f"cannot import testcontainers ({type(exc).__name__}: {exc}); install it "
                    "with pip install --target DIR testcontainers and pass --peers DIR"
                ) from None
            self.testcontainers = module.DockerContainer
        return self.testcontainers

    def _testcontainers(self, *, check: bool = False) -> list[Sample]:
        container_class = self._load_testcontainers()
        started = time.perf_counter()
        container = container_class(self.image, command=COMMAND).with_kwargs(
            init=True, network_mode="none", labels={BENCH_LABEL: self.run_id}
        )
        container.start()
        created = time.perf_counter()
        try:
            if check:
                wrapped = container.get_wrapped_container()
                wrapped.reload()
                assert wrapped.status == "running", wrapped.status
        finally:
            container.stop()
        return [(created - started, time.perf_counter() - created)]

    def _engine(self, *, check: bool = False) -> list[Sample]:
        started = time.perf_counter()
        env = self.manager.create("docker", image=self.image)
        created = time.perf_counter()
        if check:
            env.run(["true"]).check()
        self.manager.destroy(env)
        return [(created - started, time.perf_counter() - created)]

    def pooled(self, count: int, test_time: float) -> list[Sample]:
        """``count`` environments of a ``pool=N`` spec back to back, each used for
        ``test_time`` seconds, through a manager of their own; the first, which starts the
        pool, is not counted."""
        samples: list[Sample] = []
        with IsolationManager() as manager:
            self.sessions.append(manager.session_id)
            for index in range(count + 1):
                started = time.perf_counter()
                env = manager.create("docker", image=self.image, pool=self.args.pool)
                created = time.perf_counter()
                if index == 0:
                    env.run(["true"]).check()  # the environment works
                time.sleep(test_time)  # the test
                before_teardown = time.perf_counter()
                manager.destroy(env)
                if index:
                    samples.append((created - started, time.perf_counter() - before_teardown))
        return samples

    def creation_variants(self) -> list[Variant]:
        cli = self.docker_cli or "docker"
        return [
            Variant(
                Row(
                    "docker CLI: run -d / rm -f (baseline)",
                    f"{cli} run -d --init --network none --label L IMAGE sleep infinity; "
                    f"{cli} rm -f ID",
                ),
                self._cli,
                lambda: self._cli(check=True),
                peer=True,
            ),
            Variant(
                Row(
                    "docker SDK: containers.run / remove",
                    "client.containers.run(IMAGE, ['sleep', 'infinity'], detach=True, init=True, "
                    "network_mode='none', labels=L); container.remove(force=True); one client",
                ),
                self._sdk,
                lambda: self._sdk(check=True),
                peer=True,
            ),
            Variant(
                Row(
                    "testcontainers: DockerContainer",
                    "DockerContainer(IMAGE, command=['sleep', 'infinity']).with_kwargs(init=True, "
                    "network_mode='none', labels=L); .start(); .stop() (Ryuk disabled)",
                ),
                self._testcontainers,
                lambda: self._testcontainers(check=True),
                peer=True,
            ),
            Variant(
                Row(
                    "docker engine, no pool",
                    "manager.create('docker', image=IMAGE); manager.destroy(env); one "
                    "long-lived manager",
                ),
                self._engine,
                lambda: self._engine(check=True),
            ),
        ]

    # --- exec latency ---

    def exec_variants(self) -> list[Variant]:
        env = self.manager.create("docker", image=self.image)
        assert isinstance(env, DockerEnvironment)
        self.exec_env = env
        container = self.client.containers.get(env.name)
        cli = self.docker_cli

        def timed(action: Callable[[], object]) -> Callable[[], list[Sample]]:
            def sample() -> list[Sample]:
                started = time.perf_counter()
                action()
                return [(time.perf_counter() - started, 0.0)]

            return sample

        def docker_exec() -> None:
            if cli is None:
                raise NotMeasurable("the docker CLI is not on PATH")
            run([cli, "exec", env.name, "true"])

        def sdk_exec() -> None:
            result = container.exec_run(["true"])
            assert result.exit_code == 0, result

        def engine_run() -> None:
            env.run(["true"]).check()

        return [
            Variant(
                Row(
                    "docker exec CONTAINER true (baseline)",
                    f"{cli or 'docker'} exec NAME true",
                    has_teardown=False,
                ),
                timed(docker_exec),
                docker_exec,
                peer=True,
            ),
            Variant(
                Row(
                    "SDK: container.exec_run(['true'])",
                    "container.exec_run(['true']); one client",
                    has_teardown=False,
                ),
                timed(sdk_exec),
                sdk_exec,
                peer=True,
            ),
            Variant(
                Row(
                    "engine: env.run(['true'])",
                    "env.run(['true']).check() (exec with separate stdout/stderr, exit code)",
                    has_teardown=False,
                ),
                timed(engine_run),
                engine_run,
            ),
        ]

    # --- leftovers ---

    def leftovers(self) -> list[str]:
        """Containers and networks of this benchmark still there (removed as they are found)."""
        found: list[str] = []
        filters: list[dict[str, str | list[str] | bool]] = [{"label": self.label}]
        filters += [{"label": f"{SESSION_LABEL}={session}"} for session in self.sessions]
        for query in filters:
            for container in self.client.containers.list(all=True, filters=query):
                found.append(f"container {container.name}")
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            for network in self.client.networks.list(filters=query):
                found.append(f"network {network.name}")
                with contextlib.suppress(Exception):
                    network.remove()
        return found


def check_all(variants: Sequence[Variant]) -> None:
    """Run each variant once, untimed: checks it works; a peer that fails is not measurable."""
    for variant in variants:
        try:
            variant.check()
        except NotMeasurable as exc:
            variant.row.problem = str(exc)
        except Exception as exc:
            if variant.peer:
                variant.row.problem = short(exc)
            else:
                variant.row.failure = short(exc)


def measure(variants: Sequence[Variant], rounds: int, progress: str) -> None:
    """``rounds`` rounds; each samples every variant once, in a rotating order."""
    live = [v for v in variants if not v.row.problem and not v.row.failure]
    for index in range(rounds):
        if index % 10 == 0:
            print(f"  {progress}: round {index + 1}/{rounds}", file=sys.stderr, flush=True)
        shift = index % len(live) if live else 0
        for variant in live[shift:] + live[:shift]:
            if variant.row.problem or variant.row.failure:
                continue
            try:
                variant.row.add(variant.sample())
            except Exception as exc:
                if variant.peer:
                    variant.row.problem = f"failed while timing: {short(exc)}"
                else:
                    variant.row.failure = short(exc)


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
        ratio = f"{row.median / baseline.median:.2f}" if baseline.create else "n/a"
        teardown = ms(statistics.median(row.teardown)) if row.has_teardown else "-"
        lines.append(
            f"{row.label:<42} {len(row.create):>4} {ms(min(row.create)):>9} "
            f"{ms(row.median):>10} {ms(max(row.create)):>9} {ratio:>10} {teardown:>15}"
        )
    return lines


def versions(bench: Bench) -> str:
    import docker

    found = [f"Python {platform.python_version()}", f"docker SDK {docker.__version__}"]
    with contextlib.suppress(Exception):
        found.append(f"daemon {bench.client.version()['Version']}")
    if bench.docker_cli:
        with contextlib.suppress(Exception):
            found.append(f"CLI {run([bench.docker_cli, 'version', '-f', '{{.Client.Version}}'])}")
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        if bench.testcontainers is not None:
            found.append(f"testcontainers {version('testcontainers')}")
    return ", ".join(part.strip() for part in found) + f"; {platform.system()} {platform.release()}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=None, help="rounds per group (default 20)")
    parser.add_argument(
        "--pool-samples",
        type=int,
        default=None,
        help="environments taken back to back from the pool (default 40)",
    )
    parser.add_argument("--pool", type=int, default=4, help="the pool size (default 4)")
    parser.add_argument(
        "--test-time",
        type=float,
        default=0.1,
        help="seconds each simulated test uses its pooled environment (default 0.1)",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, for a smoke test (5 rounds, 10 pooled)"
    )
    parser.add_argument(
        "--peers",
        type=Path,
        default=os.environ.get(PEERS_VARIABLE) or None,
        help="a folder with testcontainers and its dependencies (pip install --target), "
        f"appended to sys.path; default ${PEERS_VARIABLE}",
    )
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 20)
    args.pool_samples = args.pool_samples or (10 if args.quick else 40)
    if min(args.repeat, args.pool_samples, args.pool) < 1:
        parser.error("counts must be at least 1")
    return args


def benchmark(bench: Bench, args: argparse.Namespace) -> list[str]:
    """Measure both groups; the report's lines (a failed pytest-isolation row adds a line
    starting with FAILED)."""
    bench.client.images.get(args.image)  # present, or nothing here can run
    creation = bench.creation_variants()
    print("checking every variant once (untimed) ...", file=sys.stderr)
    check_all(creation)
    measure(creation, args.repeat, "a container per environment")
    pool_row = Row(
        f"docker engine, pool={args.pool}, {args.test_time * 1000:.0f} ms tests",
        f"manager.create('docker', image=IMAGE, pool={args.pool}); the test sleeps "
        f"{args.test_time:g}s; manager.destroy(env); {args.pool_samples} back to back after "
        "one that starts the pool; a manager of its own",
    )
    burst_row = Row(
        f"docker engine, pool={args.pool}, back to back",
        f"the same with tests that take no time ({args.pool_samples} environments; only "
        "the teardown gives the pool time to refill)",
    )
    print("  the pool rows ...", file=sys.stderr, flush=True)
    for row, test_time in ((pool_row, args.test_time), (burst_row, 0.0)):
        try:
            row.add(bench.pooled(args.pool_samples, test_time))
        except Exception as exc:
            row.failure = short(exc)
    execs = bench.exec_variants()
    check_all(execs)
    measure(execs, args.repeat * 5, "exec latency")

    rows_a = [v.row for v in creation]
    rows_a[4:4] = [pool_row, burst_row]
    rows_b = [v.row for v in execs]
    lines = [
        "pytest-isolation docker benchmark",
        versions(bench),
        f"image {args.image}; {args.repeat} rounds ({args.repeat * 5} for exec); times are "
        "CREATION only (until the container runs), teardown is its own column",
        "",
        *table("a container per environment (baseline: docker CLI run -d)", rows_a, rows_a[0]),
        "",
        *table("exec latency (baseline: docker exec CLI)", rows_b, rows_b[0]),
        "",
        "what each row runs:",
        *[f"  {row.label}: {row.command}" for row in [*rows_a, *rows_b]],
        "",
        "targets:",
    ]
    if pool_row.create:
        verdict = "PASS" if pool_row.median * 1000 <= TARGET_POOL_MS else "FAIL"
        lines.append(
            f"  docker engine with pool={args.pool} and {args.test_time * 1000:.0f} ms tests: "
            f"median {ms(pool_row.median)} ms per environment (target <= {TARGET_POOL_MS:g} ms): "
            f"{verdict}"
        )
    plain = rows_a[3]
    if pool_row.create and plain.create:
        lines.append(
            f"  with the pool an environment is ready {plain.median / pool_row.median:.1f}x "
            "sooner than without"
        )
    lines += [f"FAILED {row.label}: {row.failure}" for row in [*rows_a, *rows_b] if row.failure]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="piso-bench-docker-")).resolve()
    private: dict[str, str | None] = {
        "TMPDIR": str(root / "tmp"),
        "PYTEST_ISOLATION_STATE_DIR": str(root / "state"),
        "PYTEST_ISOLATION_CACHE_DIR": str(root / "cache"),
    }
    for name in os.environ:
        if name.startswith("PYTEST_ISOLATION") and name not in private:
            private[name] = None  # no host defaults, options or require switch
    private.pop(PEERS_VARIABLE, None)
    private.pop("PYTEST_ISOLATION_TEST_IMAGE", None)
    problems: list[str] = []
    lines: list[str] = []
    saved_tempdir = tempfile.tempdir
    try:
        with environ(**private):
            (root / "tmp").mkdir()
            tempfile.tempdir = str(root / "tmp")
            bench = Bench(args, uuid.uuid4().hex[:12])
            try:
                lines = benchmark(bench, args)
            finally:
                if bench.exec_env is not None:
                    bench.manager.destroy(bench.exec_env)
                bench.manager.close()
                left = bench.leftovers()
                bench.client.close()
            problems += [
                line.removeprefix("FAILED ") for line in lines if line.startswith("FAILED")
            ]
            if left:
                problems.append(f"left behind (now removed): {', '.join(left[:10])}")
            records = Ledger().records()
            if records:
                problems.append(
                    f"{len(records)} ledger record(s) left: "
                    + ", ".join(f"{r.kind} {r.identifier}" for r in records[:5])
                )
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(root, ignore_errors=True)
    lines += [f"PROBLEM: {problem}" for problem in problems]
    if not problems:
        lines.append(
            f"left behind: nothing (no labelled container or network, ledger empty; {root} removed)"
        )
    print("\n".join(lines))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
