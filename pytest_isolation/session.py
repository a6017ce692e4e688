"""The per-run state of the pytest plugin: environments per scope, reports, summary."""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import pytest

from .engines.base import EnvStatus, IsolatedEnvironment
from .errors import InvalidSpec, TeardownError
from .manager import IsolationManager
from .spec import EnvSpec, Settings, resolve_spec

SPEC_KEY = pytest.StashKey[EnvSpec]()
FAILED_KEY = pytest.StashKey[bool]()
#: Templates and caches unused for this long are removed at the end of a run.
CACHE_MAX_AGE = 30 * 24 * 3600.0


@dataclass(frozen=True)
class SetupEvent:
    nodeid: str
    engine: str
    env_id: str
    duration: float


@dataclass(frozen=True)
class KeptEvent:
    nodeid: str
    engine: str
    env_id: str
    path: str


class IsolationSession:
    """Hands environments to tests and tears them down when their scope ends."""

    def __init__(
        self, config: pytest.Config, settings: Settings, session_id: str, *, worker: bool
    ) -> None:
        self.config = config
        self.settings = settings
        self.worker = worker
        self.manager = IsolationManager(session_id=session_id, hook=config.hook, settings=settings)
        self._scoped: dict[tuple[str, str], IsolatedEnvironment] = {}
        self._users: dict[str, list[pytest.Item]] = {}
        self._events: list[dict[str, Any]] = []  # waiting to ride on the next report
        self.setups: list[SetupEvent] = []
        self.kept: list[KeptEvent] = []
        self._previous_sigterm: Any = None
        self._install_sigterm()

    # --- settings and specs ---

    def validate_settings(self) -> None:
        """Fail fast on an unknown default engine or bad ``ENGINE.OPTION=VALUE`` defaults."""
        names = self.manager.registry.names()
        engine = self.settings.engine
        if engine.value not in self.manager.registry:
            from .errors import UnknownEngine

            raise UnknownEngine(engine.value, names, source=engine.source)
        for name, options in self.settings.options.items():
            if name not in self.manager.registry:
                source = next(iter(options.values())).source
                from .errors import UnknownEngine

                raise UnknownEngine(name, names, source=source)
            resolve_spec(
                self.manager.registry.get(name),
                {},
                where="settings",
                base_dir=self.config.rootpath,
                settings=self.settings,
            )

    def spec_for(self, item: pytest.Item) -> EnvSpec:
        """The spec of ``item`` from its marker and the run's settings, resolved once."""
        spec = item.stash.get(SPEC_KEY, None)
        if spec is None:
            marker = item.get_closest_marker("isolated")
            args, kwargs = (marker.args, dict(marker.kwargs)) if marker else ((), {})
            where = (
                f"@pytest.mark.isolated on {item.nodeid}"
                if marker
                else f"isolated_env of {item.nodeid}"
            )
            if len(args) > 1:
                raise InvalidSpec(
                    f"isolated() takes the engine as its only positional argument, got {args!r}",
                    source=where,
                )
            engine = args[0] if args else kwargs.pop("engine", None)
            if engine is not None and not isinstance(engine, str):
                raise InvalidSpec(f"the engine must be a name, got {engine!r}", source=where)
            spec = self.manager.resolve(engine, kwargs, where=where, base_dir=item.path.parent)
            item.stash[SPEC_KEY] = spec
        return spec

    @pytest.hookimpl(wrapper=True)
    def pytest_pycollect_makeitem(
        self, collector: pytest.Collector, name: str, obj: object
    ) -> Generator[None, object, object]:
        """Check every marked test's options while collecting, so mistakes are collection errors."""
        result = yield
        items = result if isinstance(result, list) else [result]
        for item in items:
            if isinstance(item, pytest.Item) and item.get_closest_marker("isolated"):
                try:
                    self.spec_for(item)
                except InvalidSpec as exc:
                    raise collector.CollectError(f"{item.nodeid}: {exc}") from None
        return result

    # --- environments ---

    def environment_for(self, item: pytest.Item) -> IsolatedEnvironment:
        """The environment of ``item``: made now, or shared within its scope."""
        try:
            spec = self.spec_for(item)
        except InvalidSpec as exc:
            pytest.fail(str(exc), pytrace=False)
        availability = self.manager.availability(spec.engine)
        if not availability:
            message = f"isolation engine {spec.engine!r} is unavailable: {availability.reason}"
            if availability.fix:
                message += f"; {availability.fix}"
            if self.settings.requires(spec.engine):
                pytest.fail(
                    f"{message} (required by {self.settings.require.source})", pytrace=False
                )
            pytest.skip(message)
        node: pytest.Item | pytest.Collector | None = item
        if spec.scope == "module":
            node = item.getparent(pytest.Module) or item
        elif spec.scope == "session":
            node = item.session
        assert node is not None
        key = (node.nodeid, spec.key)
        env = self._scoped.get(key)
        if env is None:
            env = self.manager.create(spec, description=item.nodeid)
            self._scoped[key] = env
            self._users[env.id] = []
            node.addfinalizer(partial(self._finish, key, env))
            event = SetupEvent(item.nodeid, spec.engine, env.id, env.usage().setup_duration)
            self._events.append({"setup": event.__dict__})
        self._users[env.id].append(item)
        return env

    def _finish(self, key: tuple[str, str], env: IsolatedEnvironment) -> None:
        self._scoped.pop(key, None)
        users = self._users.pop(env.id, [])
        failed = any(user.stash.get(FAILED_KEY, False) for user in users)
        keep = env.spec.keep == "all" or (env.spec.keep == "failed" and failed)
        try:
            self.manager.destroy(env, keep=keep)
        finally:
            if env.status is EnvStatus.KEPT:
                where = getattr(env, "root", None) or env.path or env.id
                event = KeptEvent(users[0].nodeid if users else "", env.engine, env.id, str(where))
                self._events.append({"kept": event.__dict__})

    # --- reports ---

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and report.when in ("setup", "call"):
            item.stash[FAILED_KEY] = True
        if self._events:
            # rides on the report so that it reaches the xdist controller too
            report.isolation_events = self._events  # type: ignore[attr-defined]
            self._events = []
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._absorb(getattr(report, "isolation_events", ()))

    def _absorb(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            if "setup" in event:
                self.setups.append(SetupEvent(**event["setup"]))
            if "kept" in event:
                self.kept.append(KeptEvent(**event["kept"]))

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.manager.registry.seal()
        if self.worker:
            return
        swept = self.manager.sweep()
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and (swept.released or swept.failed):
            line = f"isolation: released {len(swept.released)} leftover resource(s) of ended runs"
            if swept.failed:
                line += f"; {len(swept.failed)} could not be released (pytest-isolation cleanup)"
            reporter.write_line(line)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        # events of teardowns that no report followed (an interrupted run's session finish)
        self._absorb(self._events)
        self._events = []
        if not self.setups and not self.kept:
            return
        write = terminalreporter.write_line
        terminalreporter.ensure_newline()  # else the first line after the title is blank
        terminalreporter.section("isolation")
        counts = Counter(event.engine for event in self.setups)
        total = sum(event.duration for event in self.setups)
        per_engine = ", ".join(f"{engine}: {count}" for engine, count in sorted(counts.items()))
        write(f"{len(self.setups)} environment(s) ({per_engine}); set-up took {total:.2f}s")
        if self.settings.durations > 0 and self.setups:
            slowest = sorted(self.setups, key=lambda e: e.duration, reverse=True)
            write(f"slowest {min(self.settings.durations, len(slowest))} set-up(s):")
            for event in slowest[: self.settings.durations]:
                write(f"  {event.duration * 1000:8.1f}ms  {event.engine:<10}  {event.nodeid}")
        if self.kept:
            write("kept for debugging (remove with `pytest-isolation cleanup`):")
            for kept in self.kept:
                write(f"  {kept.nodeid or kept.env_id}: {kept.path}")

    # --- signals and the end of the run ---

    def _install_sigterm(self) -> None:
        """Make SIGTERM an interrupt, so that pytest tears everything down as for Ctrl-C."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # someone else handles it already
        self._previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)

    def close(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        try:
            self.manager.close()
        except TeardownError as exc:  # finalizers did not run (an internal error): say so
            sys.stderr.write(f"pytest-isolation: {exc}\n")
        if not self.worker:
            # xdist workers killed before their teardown (SIGTERM to the controller alone)
            # leave resources of this run whose owners are gone: release them now.
            own = self.manager.session_id
            self.manager.sweep(select=lambda record: record.owner.session == own)
        self.manager.prune_caches(CACHE_MAX_AGE)


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")
