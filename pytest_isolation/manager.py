"""The IsolationManager: engines in, environments out, teardown guaranteed.

The manager resolves specs, creates environments through engines, fires
the ``pytest_isolation_*`` hooks in order, and tears every environment down
again — on success, on failure half way through set-up, at the end of a scope,
at exit.  It needs no pytest: use it as a context manager::

    with IsolationManager() as manager:
        env = manager.create("virtualenv", packages=["attrs"])
        env.run(["python", "-c", "import attrs"]).check()
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any

import pluggy

from . import hookspecs
from .engines.base import (
    Availability,
    Engine,
    EngineContext,
    EnvStatus,
    IsolatedEnvironment,
    Progress,
    Resources,
)
from .errors import (
    EngineUnavailable,
    EnvironmentCreationError,
    InvalidSpec,
    IsolationError,
    TeardownError,
    UnknownEngine,
)
from .ledger import Ledger, Owner, ResourceRecord, same_process
from .spec import EnvSpec, Settings, resolve_spec
from .watchdog import Watchdog

ENTRY_POINT_GROUP = "pytest_isolation.engines"


def new_session_id() -> str:
    """A fresh run id: the value of the ``pytest-isolation.session`` label."""
    return uuid.uuid4().hex[:16]


def cache_dir() -> Path:
    """Where templates and caches live: ``$PYTEST_ISOLATION_CACHE_DIR`` or the XDG cache."""
    explicit = os.environ.get("PYTEST_ISOLATION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-isolation"


class EngineRegistry:
    """The engines a run knows, by name; filled through ``pytest_isolation_register_engines``."""

    def __init__(self) -> None:
        self._engines: dict[str, type[Engine]] = {}
        self.broken: dict[str, str] = {}
        self._sealed = False

    def register(self, engine: type[Engine], *, replace: bool = False) -> None:
        """Add ``engine`` under ``engine.name``; ``replace`` overrides an engine of that name.

        Raises :class:`InvalidSpec` for a name that is taken (without ``replace``),
        and for a replacement once the run has started: a ``conftest.py`` found
        during collection would otherwise change an engine for tests outside
        its directory too.
        """
        name = getattr(engine, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{engine!r} has no 'name': set name = '...' on the engine class")
        current = self._engines.get(name)
        if current is not None and current is not engine:
            where = f"{engine.__module__}.{engine.__qualname__}"
            if not replace:
                raise InvalidSpec(
                    f"engine {name!r} is registered twice ({current.__module__}."
                    f"{current.__qualname__} and {where}); pass replace=True to override it",
                    source="pytest_isolation_register_engines",
                )
            if self._sealed:
                raise InvalidSpec(
                    f"{where} replaces engine {name!r} after the run started, which would change "
                    "it for every test of the run; replace engines in the rootdir conftest.py or "
                    "a plugin (new engine names may be added anywhere)",
                    source="pytest_isolation_register_engines",
                )
        self._engines[name] = engine
        self.broken.pop(name, None)

    def seal(self) -> None:
        """From now on engines may be added but not replaced."""
        self._sealed = True

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register the engines of installed distributions (``[project.entry-points]``)."""
        for point in entry_points(group=group):
            try:
                self.register(point.load())
            except Exception as exc:  # a broken third-party package must not break the run
                self.broken.setdefault(
                    point.name, f"entry point {point.value!r} cannot be used: {exc}"
                )

    def names(self) -> list[str]:
        return sorted(self._engines)

    def get(self, name: str) -> type[Engine]:
        try:
            return self._engines[name]
        except KeyError:
            raise UnknownEngine(name, self.names()) from None

    def __contains__(self, name: object) -> bool:
        return name in self._engines


@dataclass
class SweepReport:
    """What a sweep released, left alone, or failed to release."""

    released: list[ResourceRecord] = field(default_factory=list)
    failed: list[tuple[ResourceRecord, BaseException]] = field(default_factory=list)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them.

    Teardown runs inside this, so a Ctrl-C (or a second one) cannot cut it
    off half way; the interrupt still happens, right after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[signal.Signals] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))

    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, leave it alone
            previous[signum] = signal.signal(signum, remember)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def _standalone_hook() -> pluggy.HookRelay:
    from . import engines

    plugins = pluggy.PluginManager("pytest")
    plugins.add_hookspecs(hookspecs)
    plugins.register(engines, "isolation-engines")
    return plugins.hook


class IsolationManager:
    """Creates environments through engines and owns their teardown.

    ``hook`` is the hook relay to fire events on (pytest's ``config.hook``);
    without one the manager makes its own with the built-in engines.
    """

    def __init__(
        self,
        *,
        session_id: str | None = None,
        hook: pluggy.HookRelay | None = None,
        ledger: Ledger | None = None,
        settings: Settings | None = None,
        cache: Path | None = None,
        temp_dir: Path | None = None,
        load_entry_points: bool = True,
    ) -> None:
        self.session_id = session_id or new_session_id()
        self.owner = Owner.current(self.session_id)
        self.ledger = ledger or Ledger()
        self.settings = settings or Settings()
        self.hook = hook or _standalone_hook()
        self.context = EngineContext(
            session_id=self.session_id,
            owner=self.owner,
            cache_dir=cache or cache_dir(),
            temp_dir=temp_dir or Path(tempfile.gettempdir()),
            ledger=self.ledger,
            settings=self.settings,
            progress=self._progress,
            recreate=self.settings.recreate,
        )
        self.registry = EngineRegistry()
        self.hook.pytest_isolation_register_engines.call_historic(
            kwargs={"registry": self.registry}
        )
        if load_entry_points:
            self.registry.load_entry_points()
        self._engines: dict[str, Engine] = {}
        self._availability: dict[str, Availability] = {}
        self._envs: dict[str, IsolatedEnvironment] = {}
        self._lock = threading.RLock()
        self._atexit_registered = False
        self._watchdog: Watchdog | None = None

    # --- context manager and exit fallback ---

    def __enter__(self) -> IsolationManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Tear down every environment left and close the engines; raises :class:`TeardownError`."""
        try:
            self.destroy_all()
        finally:
            for engine in self._engines.values():
                with contextlib.suppress(Exception):
                    engine.close()
            if self._atexit_registered:
                atexit.unregister(self._at_exit)
                self._atexit_registered = False
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _progress(self, progress: Progress) -> None:
        self.hook.pytest_isolation_progress(progress=progress)

    @property
    def watchdog_pid(self) -> int | None:
        """The pid of this manager's watchdog, once it runs."""
        return self._watchdog.pid if self._watchdog is not None else None

    # --- engines ---

    def engine(self, name: str) -> Engine:
        """The engine instance for ``name``, created on first use."""
        with self._lock:
            if name not in self._engines:
                self._engines[name] = self.registry.get(name)(self.context)
            return self._engines[name]

    def availability(self, name: str) -> Availability:
        """Whether engine ``name`` can run here (asked once per run)."""
        if name in self.registry.broken and name not in self.registry:
            return Availability(
                False,
                reason=self.registry.broken[name],
                fix="reinstall or fix the package that provides it",
            )
        if name not in self._availability:
            try:
                self._availability[name] = self.engine(name).availability()
            except IsolationError:
                raise
            except Exception as exc:
                self._availability[name] = Availability(
                    False, reason=f"availability check failed: {exc!r}"
                )
        return self._availability[name]

    # --- specs ---

    def spec(self, engine: str | None = None, /, **options: object) -> EnvSpec:
        """Resolve and validate an :class:`EnvSpec` as a marker with these arguments would."""
        return self.resolve(engine, options, where="IsolationManager.spec()")

    def resolve(
        self,
        engine: str | None,
        options: Mapping[str, object],
        *,
        where: str,
        base_dir: Path | None = None,
    ) -> EnvSpec:
        """The :class:`EnvSpec` for ``engine`` (None: the default engine) and marker-style
        ``options`` that came from ``where``; relative paths start at ``base_dir``."""
        name = engine or self.settings.engine.value
        source = where if engine else self.settings.engine.source
        if name not in self.registry:
            raise UnknownEngine(name, self.registry.names(), source=source)
        return resolve_spec(
            self.registry.get(name),
            options,
            where=where,
            base_dir=base_dir or Path.cwd(),
            settings=self.settings,
        )

    # --- environments ---

    def create(
        self, spec: EnvSpec | str | None = None, /, *, description: str = "", **options: object
    ) -> IsolatedEnvironment:
        """Create an environment; a name (or None) and options are resolved with :meth:`spec`.

        Fires ``pytest_isolation_env_creating`` and ``..._created``.  If set-up
        fails at any point, whatever was made is released before the error
        (an :class:`IsolationError`) propagates.
        """
        if not isinstance(spec, EnvSpec):
            spec = self.resolve(spec, options, where="IsolationManager.create()")
        elif options:
            raise TypeError("pass options either in the EnvSpec or as keywords, not both")
        availability = self.availability(spec.engine)
        if not availability:
            raise EngineUnavailable(spec.engine, availability.reason, availability.fix)
        self.hook.pytest_isolation_env_creating(spec=spec)
        engine = self.engine(spec.engine)
        env_id = uuid.uuid4().hex[:12]
        resources = Resources(
            self.ledger,
            self.owner,
            engine=spec.engine,
            env_id=env_id,
            release=engine.release,
            description=description,
        )
        self._register_at_exit()
        started = time.perf_counter()
        try:
            env = engine.create(spec, env_id, resources)
        except BaseException as exc:
            errors = resources.release_all()
            for error in errors:
                _add_note(exc, f"also, releasing a resource failed: {error!r}")
            if isinstance(exc, IsolationError) or not isinstance(exc, Exception):
                raise
            raise EnvironmentCreationError(spec.engine, f"set-up failed: {exc!r}") from exc
        env._usage.setup_duration = time.perf_counter() - started
        env.status = EnvStatus.READY
        with self._lock:
            self._envs[env.id] = env
        try:
            self.hook.pytest_isolation_env_created(env=env)
        except BaseException as exc:
            try:
                self.destroy(env)
            except TeardownError as teardown:
                _add_note(exc, str(teardown))
            raise
        return env

    def _register_at_exit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._at_exit)
            self._atexit_registered = True
        if self._watchdog is None and _watchdog_enabled():
            # before the first resource exists: from here on, a killed runner is reaped
            self._watchdog = Watchdog.start(
                self.ledger.root.parent, self.session_id, self.owner.pid, self.owner.started
            )

    def get(self, env_id: str) -> IsolatedEnvironment:
        """The live environment ``env_id``; ``KeyError`` if there is none."""
        with self._lock:
            return self._envs[env_id]

    def list(self) -> builtins.list[IsolatedEnvironment]:
        """The live environments, oldest first."""
        with self._lock:
            return list(self._envs.values())

    def status(self, env_id: str) -> EnvStatus:
        return self.get(env_id).status

    def validate(self, env_id: str) -> builtins.list[str]:
        """Problems of the environment (empty when healthy)."""
        env = self.get(env_id)
        return env.validate()

    def destroy(
        self, env: IsolatedEnvironment | str, *, keep: bool = False, keep_for: float | None = None
    ) -> None:
        """Tear ``env`` down (or keep it for debugging, for ``keep_for`` seconds).

        Every resource is released even when some fail or a hook raises;
        the failures are raised together as one :class:`TeardownError`, and
        the resources that could not be released stay in the ledger.
        """
        if isinstance(env, str):
            env = self.get(env)
        with signals_deferred():
            with self._lock:
                if self._envs.pop(env.id, None) is None:
                    return  # already torn down
            errors: builtins.list[BaseException] = []
            env.status = EnvStatus.TEARING_DOWN
            try:
                self.hook.pytest_isolation_env_teardown(env=env)
            except Exception as exc:
                errors.append(exc)
            if keep:
                ttl = self.settings.keep_ttl.value if keep_for is None else keep_for
                env.resources.keep(time.time() + ttl)
                env.status = EnvStatus.KEPT
            else:
                errors += env.resources.release_all()
                env.status = EnvStatus.FAILED if errors else EnvStatus.DESTROYED
            error = TeardownError(env.id, errors) if errors else None
            try:
                self.hook.pytest_isolation_env_destroyed(env_id=env.id, error=error)
            except Exception as exc:
                errors.append(exc)
                error = TeardownError(env.id, errors)
            if error is not None:
                raise error

    def destroy_all(self) -> None:
        """Tear down every live environment, newest first; raises one :class:`TeardownError`."""
        errors: list[BaseException] = []
        # One deferral around the loop: an interrupt waits until every environment is gone.
        with signals_deferred():
            for env in reversed(self.list()):
                try:
                    self.destroy(env)
                except TeardownError as exc:
                    errors.extend(exc.errors)
        if errors:
            raise TeardownError("(all)", errors)

    # --- leftovers ---

    def prune_caches(self, older_than: float | None) -> builtins.list[str]:
        """Drop cached data (templates) unused for ``older_than`` seconds, of the engines used."""
        removed: builtins.list[str] = []
        for engine in list(self._engines.values()):
            removed += engine.prune_cache(older_than)
        return removed

    def release_record(self, record: ResourceRecord) -> None:
        """Release one resource from its ledger record alone."""
        if record.engine in self.registry:
            self.engine(record.engine).release(record)
        else:  # its engine's plugin is gone; the generic kinds can still be released
            Engine.release(_Anonymous(self.context), record)

    def sweep_labels(
        self, *, session: str | None = None, pid: int | None = None
    ) -> builtins.list[str]:
        """Remove labelled objects (containers, networks, namespaces) no ledger record lists.

        With ``session`` and ``pid`` (the watchdog, once that runner is gone): the
        objects of that runner.  Without: those whose owner, named by the labels,
        provably no longer runs on this host.
        """
        recorded = {record.identifier for record in self.ledger.records()}
        host = socket.gethostname()

        def select(owner: Mapping[str, str]) -> bool:
            if session is not None and owner.get("session") != session:
                return False
            if pid is not None:
                return owner.get("pid") == str(pid)
            try:
                owner_pid, started = int(owner["pid"]), float(owner["started"])
            except (KeyError, ValueError):
                return False  # not provably ours to judge
            return owner.get("host") == host and not same_process(owner_pid, started)

        removed: builtins.list[str] = []
        for name in self.registry.names():
            engine_class = self.registry.get(name)
            if engine_class.sweep_labelled is Engine.sweep_labelled:
                continue  # no labelled objects: do not even create the engine
            with contextlib.suppress(Exception):
                removed += self.engine(name).sweep_labelled(recorded=recorded, select=select)
        return removed

    def sweep(
        self,
        *,
        include_kept: bool = False,
        include_live: bool = False,
        dry_run: bool = False,
        select: Callable[[ResourceRecord], bool] | None = None,
    ) -> SweepReport:
        """Release leftovers: resources whose owner process is gone.

        Kept environments go once their keep time is over, or always with
        ``include_kept``; ``include_live`` takes resources of running owners too
        (never this manager's own).  Each record is claimed first, so
        concurrent sweeps never release the same resource twice.
        """
        report = SweepReport()
        now = time.time()
        for record in reversed(self.ledger.records()):
            if select is not None and not select(record):
                continue
            if record.owner == self.owner:
                continue
            if record.owner.alive() and not include_live:
                continue
            if record.kept_until is not None and record.kept_until > now and not include_kept:
                continue
            if dry_run:
                report.released.append(record)
                continue
            try:
                with self.ledger.claim(record) as mine:
                    if mine:
                        self.release_record(record)
                        report.released.append(record)
            except Exception as exc:
                report.failed.append((record, exc))
        return report


class _Anonymous(Engine):
    name = "(unknown)"

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> IsolatedEnvironment:
        raise NotImplementedError


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)


def _watchdog_enabled() -> bool:
    """``PYTEST_ISOLATION_WATCHDOG=0`` turns the watchdog off (for debugging the reaping)."""
    return os.environ.get("PYTEST_ISOLATION_WATCHDOG", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )
