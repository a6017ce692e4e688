"""The per-run state of the pytest plugin: environments per scope, reports, summary."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from functools import partial
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, cast

import pytest

from .engines.base import EnvStatus, IsolatedEnvironment, Progress
from .errors import EngineUnavailable, InvalidSpec, TeardownError, UnknownEngine
from .manager import IsolationManager
from .spec import EnvSpec, Settings, resolve_spec
from .watchdog import sweep_labels_in_background

if TYPE_CHECKING:
    from .inside.controller import Controller

SPEC_KEY = pytest.StashKey[EnvSpec]()
ENV_KEY = pytest.StashKey[IsolatedEnvironment]()
USED_KEY = pytest.StashKey[IsolatedEnvironment]()
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
        self._sweeping: subprocess.Popen[bytes] | None = None
        self._writing = threading.Lock()  # environments may be made from a test's threads
        self._inside: Controller | None = None
        self._failed: set[str] = set()  # node ids with a failed set-up or call, as logged

    # --- settings and specs ---

    def validate_settings(self) -> None:
        """Fail fast on an unknown default engine or bad ``ENGINE.OPTION=VALUE`` defaults."""
        names = self.manager.registry.names()
        engine = self.settings.engine
        if engine.value not in self.manager.registry:
            raise UnknownEngine(engine.value, names, source=engine.source)
        if self.settings.inside and "inside" not in self.manager.registry.get(engine.value).options:
            raise InvalidSpec(
                f"--isolation-inside runs test bodies inside environments, which the "
                f"{engine.value!r} engine cannot host; choose --isolation=sandbox",
                source=engine.source,
            )
        for name, options in self.settings.options.items():
            if name not in self.manager.registry:
                source = next(iter(options.values())).source
                raise UnknownEngine(name, names, source=source)
            resolve_spec(
                self.manager.registry.get(name),
                {},
                where="settings",
                base_dir=self.config.rootpath,
                settings=self.settings,
                complete=False,
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
        made = item.stash.get(ENV_KEY, None)
        if made is not None:
            return made  # inside mode: the parent made it before forking this process
        spec = self._usable_spec(item)
        node: pytest.Item | pytest.Collector | None = item
        if spec.scope == "module":
            node = item.getparent(pytest.Module) or item
        elif spec.scope == "session":
            node = item.session
        assert node is not None
        key = (node.nodeid, spec.key)
        env = self._scoped.get(key)
        if env is None:
            env = self._create(item, spec)
            self._scoped[key] = env
            self._users[env.id] = []
            node.addfinalizer(partial(self._finish, key, env))
        self._users[env.id].append(item)
        item.stash[USED_KEY] = env
        return env

    def _usable_spec(self, item: pytest.Item) -> EnvSpec:
        """The spec of ``item``; fails the test on a bad one, skips it if the engine cannot run."""
        try:
            spec = self.spec_for(item)
        except InvalidSpec as exc:
            pytest.fail(str(exc), pytrace=False)
        availability = self.manager.availability(spec.engine)
        if not availability:
            self._unavailable(EngineUnavailable(spec.engine, availability.reason, availability.fix))
        return spec

    def _unavailable(self, error: EngineUnavailable) -> NoReturn:
        if self.settings.requires(error.engine):
            pytest.fail(f"{error} (required by {self.settings.require.source})", pytrace=False)
        pytest.skip(str(error))

    def _create(self, item: pytest.Item, spec: EnvSpec) -> IsolatedEnvironment:
        missing: EngineUnavailable | None = None
        try:
            env = self.manager.create(spec, description=item.nodeid)
        except EngineUnavailable as exc:  # this spec needs what the machine lacks (a limit)
            missing = exc
        if missing is not None:
            self._unavailable(missing)  # outside the except: one message, not two chained
        event = SetupEvent(item.nodeid, spec.engine, env.id, env.usage().setup_duration)
        self._events.append({"setup": event.__dict__})
        return env

    def _finish(self, key: tuple[str, str], env: IsolatedEnvironment) -> None:
        self._scoped.pop(key, None)
        users = self._users.pop(env.id, [])
        failed = any(user.nodeid in self._failed for user in users)
        keep = env.spec.keep == "all" or (env.spec.keep == "failed" and failed)
        try:
            self.manager.destroy(env, keep=keep, keep_for=env.spec.keep_ttl)
        finally:
            if env.status is EnvStatus.KEPT:
                where = getattr(env, "root", None) or env.path or env.id
                event = KeptEvent(users[0].nodeid if users else "", env.engine, env.id, str(where))
                self._events.append({"kept": event.__dict__})

    # --- the test body inside its environment ---

    def runs_inside(self, item: pytest.Item) -> bool:
        if self.settings.inside:
            return True
        marker = item.get_closest_marker("isolated")
        if marker is None or not marker.kwargs.get("inside"):
            return False
        try:
            return bool(self.spec_for(item).options.get("inside"))
        except InvalidSpec:
            return False  # the normal protocol reports it

    @property
    def inside(self) -> Controller:
        """The runner of test bodies inside their environments (see :mod:`.inside`)."""
        if self._inside is None:
            from .inside.controller import Controller

            self._inside = Controller(self.config, self)
        return self._inside

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> object:
        """pytest's own loop, but an item that runs inside is handed to the controller
        instead of the protocol's hook chain: that chain (timeouts, reruns, subtests,
        faulthandler) runs where the test runs.  Only when some item runs inside, and
        never where pytest-xdist distributes the items."""
        if self.worker or self.config.pluginmanager.has_plugin("dsession"):
            return None
        if not any(self.runs_inside(item) for item in session.items):
            return None
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(
                f"{session.testsfailed} error{'s' if session.testsfailed != 1 else ''} "
                "during collection"
            )
        if session.config.option.collectonly:
            return True
        try:
            for index, item in enumerate(session.items):
                nextitem = session.items[index + 1] if index + 1 < len(session.items) else None
                if self.runs_inside(item):
                    self.inside.run(item, nextitem)
                else:
                    item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
                if session.shouldfail:
                    raise session.Failed(session.shouldfail)
                if session.shouldstop:
                    raise session.Interrupted(session.shouldstop)
        finally:
            self.inside.close()  # a next test made ahead whose turn never came
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> object:
        """In a pytest-xdist worker, whose loop is xdist's: an item that runs inside goes
        to the controller from here.  Inside the worker process itself, step aside."""
        if (self._inside is not None and self._inside.in_worker) or not self.runs_inside(item):
            return None
        self.inside.run(item, nextitem)
        return True

    # the controller's view of this run (see inside.controller.Host)

    def inside_environment(self, item: pytest.Item) -> IsolatedEnvironment:
        return self._inside_env(item)

    def finish_environment(self, item: pytest.Item, env: IsolatedEnvironment) -> None:
        self._finish(("", env.id), env)

    def log(self, item: pytest.Item, report: pytest.TestReport) -> None:
        self._log(item, report)

    def _inside_env(self, item: pytest.Item) -> IsolatedEnvironment:
        spec = self._usable_spec(item)
        if spec.scope != "function":
            pytest.fail(
                f"{item.nodeid}: inside=True runs every test in a sandbox of its own; "
                f"scope={spec.scope!r} cannot be shared with it (use scope='function')",
                pytrace=False,
            )
        options = {**spec.options, "inside": True}  # --isolation-inside: the engine must know
        if "writable" in self.manager.registry.get(spec.engine).options:
            options["writable"] = tuple(
                dict.fromkeys(
                    (*cast("tuple[str, ...]", spec.options["writable"]), *self._scratch())
                )
            )
        spec = dataclasses.replace(spec, options=MappingProxyType(options))
        env = self._create(item, spec)
        self._users[env.id] = [item]
        item.stash[ENV_KEY] = env
        return env

    def _scratch(self) -> list[str]:
        """What a test body may write inside as it would in-process: pytest's base
        temporary directory (made now, once, so that every test shares it) and the tool
        databases of the rootdir (``.pytest_cache``, hypothesis' ``.hypothesis``)."""
        found = []
        factory = getattr(self.config, "_tmp_path_factory", None)  # pytest's, no public API
        if factory is not None:
            # a base temporary directory pytest cannot make fails tmp_path inside as here
            with contextlib.suppress(OSError):
                found.append(str(factory.getbasetemp().resolve()))
        cache = self.config.rootpath / ".pytest_cache"
        if cache.is_dir():
            found.append(str(cache))
        if "hypothesis" in sys.modules:  # its example database, made where hypothesis would
            database = self.config.rootpath / ".hypothesis"
            with contextlib.suppress(OSError):
                database.mkdir(exist_ok=True)
                found.append(str(database))
        return found

    def _log(self, item: pytest.Item, report: pytest.TestReport) -> None:
        if self._events:
            report.isolation_events = self._events  # type: ignore[attr-defined]
            self._events = []
        item.ihook.pytest_runtest_logreport(report=report)

    # --- reports ---

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and report.when in ("setup", "call"):
            used = item.stash.get(USED_KEY, None)
            if used is not None:
                for title, text in used.report_sections():
                    report.sections.append((f"isolation: {title}", text))
        if self._events and not (self._inside is not None and self._inside.in_worker):
            # rides on the report so that it reaches the xdist controller too (a forked
            # worker's are copies of the runner's, which the runner sends itself)
            report.isolation_events = self._events  # type: ignore[attr-defined]
            self._events = []
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.when in ("setup", "call"):
            # the outcome as logged is final: a failure that pytest-rerunfailures retries is
            # logged as "rerun", and only a failure that stays keeps an environment
            self._failed.add(report.nodeid)
        self._absorb(getattr(report, "isolation_events", ()))
        if self._sweeping is not None and self._sweeping.poll() is not None:
            self._sweeping = None  # reaped as soon as it is done, not left a zombie

    def _absorb(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            if "setup" in event:
                self.setups.append(SetupEvent(**event["setup"]))
            if "kept" in event:
                self.kept.append(KeptEvent(**event["kept"]))
            if "progress" in event:  # from an xdist worker, once its step ended
                self._write_progress(Progress(**event["progress"]))

    def pytest_isolation_progress(self, progress: Progress) -> None:
        """One line when a slow set-up step starts and one when it ends, with its time."""
        if not self.worker:
            self._write_progress(progress)
        elif progress.state != "started":
            self._events.append({"progress": progress.__dict__})

    def _write_progress(self, progress: Progress) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < -1:
            return
        line = f"isolation: {progress.engine}: {progress.step}"
        if progress.state == "started":
            line += " ..."
        else:
            outcome = "done in" if progress.state == "finished" else "failed after"
            line += f": {outcome} {progress.duration or 0.0:.1f}s"
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        # set-up runs with output captured: step outside it, as live logging does
        outside = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with self._writing, outside:
            reporter.ensure_newline()
            reporter.write_line(line)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.manager.registry.seal()
        self._install_sigterm()
        if self.worker:
            return
        swept = self.manager.sweep()
        # objects only labels can find (their ledger was lost) take a daemon round trip and
        # an SDK's import: done beside the run, in a process of its own
        self._sweeping = sweep_labels_in_background(self.manager.ledger.root.parent)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        released = len(swept.released)
        if reporter is not None and (released or swept.failed):
            line = f"isolation: released {released} leftover resource(s) of ended runs"
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
        if self._inside is not None:
            self._inside.close()
        if self._sweeping is not None:
            try:
                self._sweeping.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._sweeping.kill()
                self._sweeping.wait()
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
