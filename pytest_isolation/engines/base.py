"""The contract every engine implements, built-in or third-party.

An :class:`Engine` makes environments.  Whatever it makes (directories,
processes, containers ...) it first declares to :class:`Resources`, which
writes the ledger and stacks the resource for release in reverse order.  The
engine's :meth:`Engine.release` undoes one resource from its ledger record
alone, so the same code tears down a live environment and reaps the leftovers
of a killed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import os
import shlex
import shutil
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar, Literal

from ..beneath import read_beneath, write_beneath
from ..errors import InvalidSpec, IsolationError, OperationNotSupported
from ..execution import Command, ExecResult, Usage, normalize_command
from ..ledger import Ledger, Owner, ResourceRecord, process_started, same_process

if TYPE_CHECKING:
    from ..spec import EnvSpec, Option, Settings

__all__ = [
    "Availability",
    "Engine",
    "EngineContext",
    "EnvStatus",
    "IsolatedEnvironment",
    "Progress",
    "Resources",
]


class EnvStatus(str, enum.Enum):
    """Where an environment is in its life."""

    CREATING = "creating"
    READY = "ready"
    TEARING_DOWN = "tearing down"
    DESTROYED = "destroyed"
    KEPT = "kept"
    FAILED = "failed"


@dataclass(frozen=True)
class Availability:
    """Whether an engine can run here; if not, why and how to fix it."""

    available: bool
    reason: str = ""
    fix: str = ""
    detail: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class Progress:
    """One slow set-up step (a template build, an image pull) starting or ending.

    ``state`` is ``"started"``, ``"finished"`` or ``"failed"``; ``duration`` is
    the step's seconds, set once it ended.  The plugin prints each as one line.
    """

    engine: str
    step: str
    state: Literal["started", "finished", "failed"]
    duration: float | None = None


def _no_progress(progress: Progress) -> None:
    """Where no one listens (an engine made outside a manager)."""


@dataclass(frozen=True)
class EngineContext:
    """What an engine may use from the run: its identity and where to put things.

    ``progress`` receives the steps of slow set-ups (see :meth:`step`);
    ``recreate`` asks engines to rebuild, once in this run, every cached
    template the run uses (``--isolation-recreate``).
    """

    session_id: str
    owner: Owner
    cache_dir: Path
    temp_dir: Path
    ledger: Ledger
    #: The run's settings (engine option defaults from the command line, environment and
    #: ini), for checks that must use them before any environment asks (which cluster).
    settings: Settings | None = None
    progress: Callable[[Progress], None] = _no_progress
    recreate: bool = False

    @contextlib.contextmanager
    def step(self, engine: str, step: str) -> Iterator[None]:
        """Report ``step`` of ``engine`` as started, then finished (or failed) with its time."""
        self.progress(Progress(engine, step, "started"))
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.progress(Progress(engine, step, "failed", time.monotonic() - started))
            raise
        self.progress(Progress(engine, step, "finished", time.monotonic() - started))

    def engine_resources(self, engine: str, release: Callable[[ResourceRecord], None]) -> Resources:
        """A stack for resources an engine keeps across environments (networks, pools)."""
        return Resources(
            self.ledger, self.owner, engine=engine, env_id=f"{engine}-shared", release=release
        )


class Resources:
    """The resources of one environment, recorded in the ledger before they exist.

    :meth:`add` writes the record and stacks it; :meth:`release_all` releases
    the stack in reverse order, continuing past failures, and removes a
    record from the ledger only once its resource is gone.
    """

    def __init__(
        self,
        ledger: Ledger,
        owner: Owner,
        *,
        engine: str,
        env_id: str,
        release: Callable[[ResourceRecord], None],
        description: str = "",
    ) -> None:
        self.ledger = ledger
        self.owner = owner
        self.engine = engine
        self.env_id = env_id
        self.description = description
        self._release = release
        self._stack: list[ResourceRecord] = []
        self._lock = threading.Lock()

    @property
    def records(self) -> tuple[ResourceRecord, ...]:
        return tuple(self._stack)

    def add(self, kind: str, identifier: str, **data: object) -> ResourceRecord:
        """Record a resource about to be created; call before creating it.

        Safe to call from several threads (commands run from threads of a test).
        """
        record = self.ledger.add(
            ResourceRecord(
                kind=kind,
                identifier=identifier,
                engine=self.engine,
                env_id=self.env_id,
                owner=self.owner,
                data=data,
                description=self.description,
            )
        )
        with self._lock:
            self._stack.append(record)
        return record

    def update(self, record: ResourceRecord, **data: object) -> ResourceRecord:
        """Add what became known about a recorded resource (a generated name) to its record."""
        updated = dataclasses.replace(record, data={**record.data, **data})
        with self._lock:
            self._stack[self._stack.index(record)] = updated
        self.ledger.update(updated)
        return updated

    def track_process(self, pid: int) -> Callable[[], None]:
        """Record a running command's process group for as long as it runs (an ``on_spawn``
        hook): a teardown while it still runs (a command of another thread) kills it too."""
        record = self.add("process", str(pid), started=_started(pid), group=True)
        return functools.partial(self.forget, record)

    def forget(self, record: ResourceRecord) -> None:
        """Drop ``record`` unreleased: its resource is gone, or now belongs to something that
        outlives the environment (a finished template, handed to the cache)."""
        with self._lock:
            if record in self._stack:
                self._stack.remove(record)
        self.ledger.remove(record)

    def transfer(self, record: ResourceRecord, to: Resources) -> ResourceRecord:
        """Hand one resource to another stack (a pooled container to its environment):
        recorded there before it is forgotten here, so the ledger never loses it."""
        moved = to.add(record.kind, record.identifier, **record.data)
        with self._lock:
            self._stack.remove(record)
        self.ledger.remove(record)
        return moved

    def release_all(self) -> list[BaseException]:
        """Release every resource, newest first; returns the failures instead of stopping."""
        errors: list[BaseException] = []
        while True:
            with self._lock:
                if not self._stack:
                    break
                record = self._stack.pop()
            try:
                self._release(record)
            except Exception as exc:
                errors.append(exc)  # the record stays in the ledger for cleanup to retry
            else:
                self.ledger.remove(record)
        return errors

    def keep(self, until: float) -> list[ResourceRecord]:
        """Mark every resource as kept until ``until`` and hand them to the ledger alone."""
        kept = [self.ledger.keep(record, until) for record in self._stack]
        self._stack.clear()
        return kept


def _started(pid: int) -> float:
    return process_started(pid) or time.time()


def release_directory(record: ResourceRecord) -> None:
    """Remove a directory tree, making read-only parts writable first.

    An environment's directory whose record names the token of its commands
    (``orphans``, see :mod:`pytest_isolation.orphans`) has what they left
    running killed first.
    """
    path = Path(record.identifier)
    if not path.is_absolute() or path == Path(path.anchor) or len(path.parts) < 3:
        # a record is data from a file: never let a damaged one name "." or "/"
        raise IsolationError(f"refusing to remove {record.identifier!r}: not an environment's path")
    token = record.data.get("orphans")
    if isinstance(token, str):
        from ..orphans import release_orphans, started_here

        made_here = started_here(record.owner.pid, record.owner.started)
        release_orphans(token, made_here=made_here)

    def make_writable(function: Callable[..., object], name: str, exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
        function(name)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable)


def release_process(record: ResourceRecord) -> None:
    """Kill a recorded process, or everything left in its process group.

    A pid that now belongs to another process (a different start time) is left
    alone.  A group outlives its leader, and the kernel does not reuse a pid
    while a group of that id has members, so with the leader gone, whatever
    is still in the group is the command's.
    """
    pid = int(record.identifier)
    started = record.data.get("started")
    if not isinstance(started, int | float):
        return
    now = process_started(pid)
    if now is not None and not same_process(pid, float(started)):
        return  # the pid was reused
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if record.data.get("group"):
            os.killpg(pid, signal.SIGKILL)
        elif now is not None:
            os.kill(pid, signal.SIGKILL)


class Engine(ABC):
    """Creates environments of one kind.  Engines never import pytest.

    Subclasses set :attr:`name`, declare their marker :attr:`options` and the
    :attr:`supported_limits` they enforce, implement :meth:`create`, and
    extend :meth:`release` for resource kinds of their own.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    supported_limits: ClassVar[frozenset[str]] = frozenset({"timeout"})

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    def availability(self) -> Availability:
        """Whether this engine can create environments on this machine."""
        return Availability(True)

    def doctor(self) -> list[str]:
        """Extra lines ``pytest-isolation doctor`` prints under this engine: what was
        checked, what works here and what does not, with the fix."""
        return []

    @abstractmethod
    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> IsolatedEnvironment:
        """Make an environment for ``spec``; declare each resource to ``resources`` first.

        On failure, raise: the manager releases whatever ``resources`` holds.
        """

    def release(self, record: ResourceRecord) -> None:
        """Undo one resource from its ledger record; tolerate a resource that is already gone."""
        releasers: dict[str, Callable[[ResourceRecord], None]] = {
            "directory": release_directory,
            "process": release_process,
        }
        try:
            releaser = releasers[record.kind]
        except KeyError:
            raise IsolationError(
                f"engine {self.name!r} cannot release resources of kind {record.kind!r}"
            ) from None
        releaser(record)

    def sweep_labelled(
        self, *, recorded: set[str], select: Callable[[Mapping[str, str]], bool]
    ) -> list[str]:
        """Remove objects this engine labelled (containers, namespaces) that no ledger record
        lists and whose owner ``select`` accepts; return their names.

        ``select`` gets the owner labels as ``session``, ``pid``, ``started`` and ``host``.
        Engines without labelled objects have nothing to do.
        """
        return []

    @classmethod
    def validate_spec(cls, spec: EnvSpec) -> None:
        """Raise :class:`InvalidSpec` for option combinations this engine cannot honour."""

    def prune_cache(self, older_than: float | None) -> list[str]:
        """Remove cached data unused for ``older_than`` seconds (all if None); returns what went."""
        return []

    def close(self) -> None:
        """Release engine-wide state (clients, pools) at the end of the run."""


class IsolatedEnvironment(ABC):
    """One isolated environment, handed to a test as ``isolated_env``.

    ``path`` is the host path of its workspace, or ``None`` where the
    workspace lives elsewhere (a container, a pod).
    """

    def __init__(self, *, env_id: str, spec: EnvSpec, resources: Resources, path: Path | None):
        self.id = env_id
        self.spec = spec
        self.path = path
        self.resources = resources
        self.status = EnvStatus.CREATING
        self._usage = Usage()

    @property
    def engine(self) -> str:
        return self.spec.engine

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"<{type(self).__name__} {self.id} {self.status.value}{where}>"

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: str | bytes | None = None,
        shell: bool = False,
    ) -> ExecResult:
        """Run a command inside the environment and return its result (never raises for a
        non-zero exit; call :meth:`ExecResult.check` for that).

        ``timeout`` defaults to the environment's ``timeout`` limit; ``cwd`` is
        relative to the workspace; ``env`` adds variables for this command.
        """
        if self.status is not EnvStatus.READY:
            raise IsolationError(f"environment {self.id} is {self.status.value}, not ready")
        argv = normalize_command(cmd, shell=shell)
        if timeout is None:
            timeout = self.spec.limits.timeout
        result = self._run(argv, timeout=timeout, env=dict(env or {}), cwd=cwd, input=input)
        self._usage.add(result)
        return result

    @abstractmethod
    def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None,
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None,
        input: str | bytes | None,
    ) -> ExecResult:
        """Execute ``argv`` in the environment."""

    def install(self, packages: Sequence[str]) -> ExecResult:
        """Install Python packages into the environment."""
        raise OperationNotSupported(self.engine, "install", "use the virtualenv engine")

    def write_file(self, rel: str, data: str | bytes) -> None:
        """Write ``data`` to ``rel`` inside the workspace, creating parent directories.

        The file is replaced, never written through: a link a command planted there
        (to a file outside the workspace) raises
        :class:`~pytest_isolation.beneath.OutsideWorkspace`.
        """
        write_beneath(
            self._workspace(),
            workspace_relative(rel, self.id).parts,
            data.encode() if isinstance(data, str) else data,
            owner=self._file_owner(),
        )

    def read_file(self, rel: str) -> bytes:
        """The bytes of ``rel`` inside the workspace; a path that leaves it through a link
        raises :class:`~pytest_isolation.beneath.OutsideWorkspace`."""
        return read_beneath(self._workspace(), workspace_relative(rel, self.id).parts)

    def _workspace(self) -> Path:
        if self.path is None:
            raise OperationNotSupported(self.engine, "file access without a host path")
        return self.path

    def _file_owner(self) -> tuple[int, int] | None:
        """Who must own the files the test writes, where that is not the runner."""
        return None

    def usage(self) -> Usage:
        """Set-up time and what the environment's commands used so far."""
        return self._usage

    def forking(self) -> contextlib.AbstractContextManager[None]:
        """Inside mode, in the parent: what must happen around the fork of the test."""
        return contextlib.nullcontext()

    def enter(self) -> None:
        """Move the calling process, freshly forked, into the environment (inside mode).

        Returns in a process inside; processes it leaves behind on the way
        never return.  Engines that cannot host Python code do not offer it.
        """
        raise OperationNotSupported(self.engine, "enter", "inside=True needs the sandbox engine")

    def explain_exit(self, status: int | None, timed_out: bool, error: str) -> str:
        """Why a process that entered the environment ended without reporting."""
        limit = self.spec.limits.timeout
        if timed_out:
            return f"the test timed out after {limit:g}s and was killed with everything it started"
        if error:
            return f"the test could not run inside the environment:\n{error}"
        if status is not None and status > 128:
            number = status - 128
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            return f"the test process crashed: killed by {name} ({number})"
        return f"the test process exited with status {status} before reporting"

    def report_sections(self) -> list[tuple[str, str]]:
        """Extra (title, text) sections for the report of a failing test (logs, history)."""
        return []

    def validate(self) -> list[str]:
        """Problems that make the environment unusable; empty when it is healthy."""
        if self.path is not None and not self.path.is_dir():
            return [f"workspace {self.path} is missing"]
        return []


def workspace_relative(rel: str, env_id: str) -> PurePosixPath:
    """``rel`` as a path inside a workspace; refuses absolute paths and ``..``."""
    relative = PurePosixPath(rel)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InvalidSpec(
            f"{rel!r} must be a relative path inside the workspace, without '..'",
            source=f"environment {env_id}",
        )
    return relative


class RemoteEnvironment(IsolatedEnvironment):
    """An environment whose workspace lives elsewhere (a container, a pod): ``path`` is
    None, files travel through the engine, and Python packages install with pip inside.

    ``label`` names it in messages; subclasses call :meth:`_remember` for each command
    so a failing test's report can show the last ones.
    """

    def __init__(self, *, env_id: str, spec: EnvSpec, resources: Resources, label: str):
        super().__init__(env_id=env_id, spec=spec, resources=resources, path=None)
        self.label = label
        self._history: deque[str] = deque(maxlen=20)

    def _remember(self, argv: Sequence[str], returncode: int | None) -> None:
        self._history.append(f"$ {shlex.join(argv)}  -> {returncode}")

    def install(self, packages: Sequence[str]) -> ExecResult:
        """``pip install`` inside the environment (system-wide: the environment is its own)."""
        if isinstance(packages, str):
            packages = [packages]
        command = [
            "python3",
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            *packages,
        ]
        return self.run(command, env={"PIP_BREAK_SYSTEM_PACKAGES": "1"}).check()

    def logs(self) -> str:
        """The output of the environment's main process."""
        return ""

    def report_sections(self) -> list[tuple[str, str]]:
        sections = []
        if self._history:
            sections.append((f"commands in {self.label}", "\n".join(self._history)))
        with contextlib.suppress(Exception):
            if logs := self.logs().strip():
                sections.append((f"logs of {self.label}", logs[-8000:]))
        return sections
