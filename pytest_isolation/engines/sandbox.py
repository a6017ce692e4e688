"""The ``sandbox`` engine: Linux namespaces plus cgroup limits, a security boundary.

Each environment is a set of namespaces (mount, PID, UTS, IPC, cgroup, and a
network namespace with only loopback unless ``network=True``) built by the
sandbox's own init program, which is a fresh interpreter, never a copy of the
runner.  Inside, the root file system is read-only (``readonly_root``), ``/dev``
holds a few device nodes, ``/tmp`` is the environment's own, and the workspace
and HOME keep their host paths, read-write.  Every process inside runs in a user
namespace of its own that owns none of the others, with no capability, with
no_new_privs and a seccomp filter; when the runner is root, root inside is uid
65534 outside.  The environment's cgroups carry the memory, pids, cpu and I/O
limits and are killed and removed at teardown; see docs/engines.md for the
threat model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import shlex
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

from ..errors import (
    EngineUnavailable,
    EnvironmentCreationError,
    InvalidSpec,
    IsolationError,
    ResourceLimitExceeded,
)
from ..execution import ExecResult, Usage, collect
from ..ledger import same_process
from ..linux.cgroups import (
    LIMIT_CONTROLLERS,
    CgroupSet,
    Counters,
    Layout,
    Subtrees,
    discover,
    give_back,
    kill_cgroup,
    remove_subtree,
)
from ..linux.namespaces import (
    TMP,
    Mount,
    PendingSandbox,
    Sandbox,
    SandboxConfig,
    SandboxError,
    Zygote,
    namespace_flags,
    stop_init,
    user_namespaces_allowed,
)
from ..linux.seccomp import SeccompUnavailable, filter_program
from ..linux.seccomp import describe as describe_seccomp
from ..linux.syscalls import MNT_DETACH, MS_NODEV, MS_NOSUID, mount, umount
from ..spec import EnvSpec, Option, boolean, string
from .base import Availability, Engine, EngineContext, Resources
from .basic import LOCAL_OPTIONS, ROOT_DIRECTORIES, LocalEnvironment, make_root

if TYPE_CHECKING:
    from ..ledger import ResourceRecord


def _mounts(value: object, base_dir: Path) -> tuple[Mount, ...]:
    """``["/src:/dst", "/data:/data:rw", {"source": ..., "target": ..., "readonly": False}]``."""
    items = value if isinstance(value, list | tuple) else [value]
    mounts = []
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"expected 'SOURCE:TARGET[:ro|rw]', got {item!r}")
            source, target = parts[0], parts[1]
            readonly = len(parts) == 2 or parts[2] == "ro"
        elif isinstance(item, Mapping) and {"source", "target"} <= set(item):
            source, target = str(item["source"]), str(item["target"])
            readonly = bool(item.get("readonly", True))
        else:
            raise ValueError(f"expected 'SOURCE:TARGET[:ro|rw]' or a mapping, got {item!r}")
        source_path = (base_dir / source).resolve()
        if not source_path.exists():
            raise ValueError(f"mount source {source_path} does not exist")
        if not os.path.isabs(target):
            raise ValueError(f"mount target {target!r} must be an absolute path")
        if not Path(target).exists() and not target.startswith("/tmp/"):
            raise ValueError(
                f"mount target {target} does not exist on this machine, and the sandbox cannot "
                "create it on the read-only root: pick an existing path, or one under /tmp"
            )
        mounts.append(Mount(str(source_path), target, readonly))
    return tuple(mounts)


def _existing_paths(value: object, base_dir: Path) -> tuple[str, ...]:
    """Existing host paths (relative ones from ``base_dir``), absolute."""
    items = [value] if isinstance(value, str | os.PathLike) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a list of paths, got {value!r}")
    paths = []
    for item in items:
        if not isinstance(item, str | os.PathLike) or not str(item):
            raise ValueError(f"expected a path, got {item!r}")
        resolved = (base_dir / item).resolve()
        if not resolved.exists():
            raise ValueError(f"{resolved} does not exist")
        paths.append(str(resolved))
    return tuple(paths)


SANDBOX_OPTIONS = MappingProxyType(
    {
        **LOCAL_OPTIONS,
        "hostname": Option("hostname", "the host name inside", string, "sandbox"),
        "readonly_root": Option(
            "readonly_root",
            "make everything but the workspace, HOME and /tmp read-only",
            boolean,
            True,
        ),
        "mounts": Option("mounts", "extra binds: ['SOURCE:TARGET[:ro|rw]', ...]", _mounts, ()),
        "writable": Option(
            "writable",
            "host paths a test body inside may write, at their own paths (pytest's base "
            "temporary directory and tool caches are added for inside mode)",
            _existing_paths,
            (),
        ),
        "inside": Option(
            "inside", "run the test function itself inside the sandbox", boolean, False
        ),
    }
)


class SandboxEnvironment(LocalEnvironment):
    """A :class:`LocalEnvironment` whose commands run inside its sandbox, under its cgroups."""

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        root: Path,
        cgroups: CgroupSet,
        sandbox: Sandbox,
        engine: SandboxEngine,
    ):
        self.cgroups = cgroups
        self.sandbox = sandbox
        self._engine = engine
        super().__init__(env_id=env_id, spec=spec, resources=resources, root=root)
        if sandbox.config.tmp_source is None:
            #: the sandbox's private /tmp (a tmpfs of its own) as the host sees it, through
            #: its init's root, while the sandbox lives
            self.tmp = Path(f"/proc/{sandbox.init}/root{TMP}")

    @property
    def config(self) -> SandboxConfig:
        return self.sandbox.config

    def _file_owner(self) -> tuple[int, int] | None:
        if self.sandbox.idmapped or self.config.rootless:
            return None  # the runner's files are the sandbox root's
        return (self.config.map_to, self.config.map_to)

    def _base_environ(self) -> dict[str, str]:
        environ = super()._base_environ()
        for name in ("TMPDIR", "TMP", "TEMP"):
            environ[name] = "/tmp"  # the environment's own, mounted there
        environ.update(self.spec.env)
        return environ

    def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None,
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None,
        input: str | bytes | None,
    ) -> ExecResult:
        import time

        assert self.path is not None
        directory = str(self.path / cwd) if cwd is not None else str(self.path)
        data = input.encode() if isinstance(input, str) else input
        before = self.cgroups.counters()
        started = time.monotonic()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if data is not None else (os.open(os.devnull, os.O_RDONLY), None)
        try:
            command = self.sandbox.spawn(
                argv, {**self.environ, **env}, directory, stdin=in_r, stdout=out_w, stderr=err_w
            )
        except SandboxError as exc:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise IsolationError(f"sandbox {self.id}: {exc}") from None
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        try:
            outcome = collect(
                command,
                stdin=in_w,
                stdout=out_r,
                stderr=err_r,
                data=data,
                deadline=None if timeout is None else started + timeout,
            )
        finally:
            command.close()
            os.close(out_r)
            os.close(err_r)
        result = outcome.result(argv, started, timeout)
        after = self.cgroups.counters()
        if after.peak_memory is not None:
            result = dataclasses.replace(result, peak_memory=after.peak_memory)
        self._check_limits(result, before, after)
        return result

    def _check_limits(self, result: ExecResult, before: Counters, after: Counters) -> None:
        limits = self.spec.limits
        command = shlex.join(result.command)
        if after.oom_kills > before.oom_kills:
            raise ResourceLimitExceeded(
                "memory",
                f"{command!r} was killed by the out-of-memory killer: the memory limit of "
                f"{_size(limits.memory)} was reached (peak {_size(after.peak_memory)}, exit "
                f"status {result.returncode})",
                measured=after.peak_memory,
            )
        refused = after.pids_refused - before.pids_refused
        if refused and not result.ok:
            raise ResourceLimitExceeded(
                "pids",
                f"{command!r} hit the pids limit of {limits.pids}: {refused} process "
                f"creation(s) refused (exit status {result.returncode})",
                measured=refused,
            )
        if limits.disk is not None and not result.ok and self.disk_full():
            raise ResourceLimitExceeded(
                "disk",
                f"{command!r} filled the disk limit of {_size(limits.disk)} (the workspace, "
                f"HOME and /tmp together; exit status {result.returncode})",
                measured=limits.disk,
            )

    def disk_full(self) -> bool:
        """Whether the environment's size-limited file system has no block left."""
        if self.spec.limits.disk is None:
            return False
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize < 64 * 1024

    def usage(self) -> Usage:
        usage = super().usage()
        peak = self.cgroups.counters().peak_memory
        if peak is not None:
            usage.peak_memory = peak
        return usage

    def forking(self) -> contextlib.AbstractContextManager[None]:
        """Inside mode, in the parent around the fork (see :meth:`Sandbox.forking`)."""
        return self.sandbox.forking()

    def enter(self) -> None:
        """Inside mode, in the forked child: become a process of the sandbox, with the
        environment's variables (see :data:`RUNNER_VARIABLES` for what is kept)."""
        self.sandbox.join(close=self._engine.descriptors())
        kept = {k: v for k, v in os.environ.items() if k.startswith(RUNNER_VARIABLES)}
        os.environ.clear()
        os.environ.update(self.environ)
        os.environ.update(kept)
        if tempfile.tempdir is not None:
            # the sandbox's TMPDIR, as tempfile found the runner's: without probing it anew
            # (a test that watches os.unlink would see the probe in-process never makes)
            tempfile.tempdir = self.environ.get("TMPDIR", tempfile.tempdir)

    def explain_exit(self, status: int | None, timed_out: bool, error: str) -> str:
        counters = self.cgroups.counters()
        limits = self.spec.limits
        if counters.oom_kills and not timed_out:
            return (
                f"the test process was killed by the out-of-memory killer: the memory limit of "
                f"{_size(limits.memory)} was reached (peak {_size(counters.peak_memory)})"
            )
        reason = super().explain_exit(status, timed_out, error)
        if self.disk_full():
            reason += f"; the disk limit of {_size(limits.disk)} is used up"
        if counters.pids_refused:
            reason += (
                f"; the pids limit of {limits.pids} refused "
                f"{counters.pids_refused} process creation(s)"
            )
        return reason

    def validate(self) -> list[str]:
        problems = super().validate()
        problems += [f"cgroup {d} is missing" for d in self.cgroups.directories() if not d.is_dir()]
        if not same_process(self.sandbox.init, self._engine.started(self.sandbox.init)):
            problems.append(f"the sandbox's init (pid {self.sandbox.init}) is gone")
        return problems


#: Variables of the runner a test body keeps inside, beside the environment's own: what
#: pytest, its plugins and Python itself set for the run (never the runner's secrets).
RUNNER_VARIABLES = ("PYTEST_", "PYTHON", "COV_CORE_", "COVERAGE_", "VIRTUAL_ENV")


@functools.lru_cache(maxsize=1)
def _interpreter() -> tuple[str, ...]:
    """The running interpreter's installation and environment: ``sys.executable`` works
    inside (read-only), also where the sandbox's uid could not reach it otherwise."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return tuple(sorted(paths))


def _paths(spec: EnvSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What an environment of ``spec`` must read (the interpreter; for a test body inside,
    its working directory and import path) and write besides its own directories."""
    writable = cast("tuple[str, ...]", spec.options["writable"])
    if not spec.options.get("inside"):
        return _interpreter(), writable
    return _interpreter() + _import_path(os.getcwd(), tuple(sys.path)), writable


@functools.lru_cache(maxsize=8)
def _import_path(cwd: str, path: tuple[str, ...]) -> tuple[str, ...]:
    """The directories of the working directory and import path (as one test after the
    other has them: looked at once)."""
    here = [d for d in dict.fromkeys((cwd, *path)) if d and os.path.isdir(d)]
    return tuple(os.path.realpath(p) for p in here)


def _size(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"


class SandboxEngine(Engine):
    """Namespaces and cgroups around every command; optionally around the test itself."""

    name = "sandbox"
    description = (
        "Linux namespaces (user, pid, mount, net, uts, ipc, cgroup), no capabilities, "
        "seccomp, cgroup limits"
    )
    options = SANDBOX_OPTIONS
    supported_limits = frozenset(
        {"memory", "cpus", "pids", "timeout", "network", "io_weight", "disk"}
    )

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._availability: Availability | None = None
        self._zygote: Zygote | None = None
        self._lock = threading.Lock()
        self._shared = context.engine_resources(self.name, self.release)
        self._live: dict[int, tuple[Sandbox, float]] = {}
        self._spares: dict[str, _Spare] = {}
        self._made: dict[str, int] = {}

    @functools.cached_property
    def layout(self) -> Layout:
        return discover()

    @functools.cached_property
    def subtrees(self) -> Subtrees:
        return Subtrees(self.layout, self._shared.add)

    def limit_problem(self, limit: str) -> tuple[str, str] | None:
        """Why ``limit`` cannot be enforced on this machine, and the fix; None if it can."""
        controller = LIMIT_CONTROLLERS.get(limit)
        if controller is not None and controller not in self.layout.hierarchies:
            return (
                f"the {limit} limit needs the {controller} cgroup controller: "
                f"{self.layout.reasons[controller]}",
                self.layout.fixes.get(controller, ""),
            )
        if limit == "disk" and os.geteuid() != 0:
            return (
                "the disk limit is a size-limited tmpfs mounted at the environment's "
                "directory, which needs root",
                "run as root, or drop the disk limit",
            )
        return None

    def doctor(self) -> list[str]:
        lines = [f"seccomp filter: {describe_seccomp()}"]
        lines += [f"limit {line}" for line in self.describe_limits()]
        if os.geteuid() != 0 and any(h.version == 2 for h in self.layout.hierarchies.values()):
            lines.append(
                "rootless on cgroup v2: limits need a delegated cgroup; with systemd, "
                "`systemd-run --user --scope -p Delegate=yes pytest ...`"
            )
        return lines

    def describe_limits(self) -> list[str]:
        """One line per limit: where it is enforced here, or why not and the fix."""
        lines = []
        for limit in sorted(self.supported_limits):
            problem = self.limit_problem(limit)
            if problem is not None:
                reason, fix = problem
                lines.append(f"{limit}: unavailable: {reason}" + (f"; fix: {fix}" if fix else ""))
                continue
            controller = LIMIT_CONTROLLERS.get(limit)
            if controller is not None:
                hierarchy = self.layout.hierarchies[controller]
                where = f"cgroup v{hierarchy.version}, under {hierarchy.subtree}"
                if limit == "io_weight":
                    where += "; takes effect under the BFQ I/O scheduler or io.cost"
            elif limit == "disk":
                where = "a size-limited tmpfs holding the workspace, HOME and /tmp"
            elif limit == "network":
                where = "a network namespace with loopback only, unless network=True"
            else:
                where = "commands and test bodies are killed with all they started"
            lines.append(f"{limit}: works ({where})")
        return lines

    def zygote(self) -> Zygote:
        """The sandbox's zygote of this run, started on first use (and recorded)."""
        with self._lock:
            if self._zygote is None:
                zygote = Zygote()
                self._zygote = zygote
                started = _started(zygote.pid)
                self._shared.add("process", str(zygote.pid), started=started, group=True)
            return self._zygote

    def started(self, pid: int) -> float:
        live = self._live.get(pid)
        return live[1] if live else 0.0

    def descriptors(self) -> list[int]:
        """The descriptors of this run's sandboxes, which no test body may keep."""
        return self._zygote.descriptors() if self._zygote is not None else []

    def availability(self) -> Availability:
        if self._availability is None:
            self._availability = self._check()
        return self._availability

    def _check(self) -> Availability:
        if not sys.platform.startswith("linux"):
            return Availability(
                False,
                reason=f"namespaces need Linux, this is {sys.platform}",
                fix="use the docker engine",
            )
        rootless = os.geteuid() != 0
        if why := user_namespaces_allowed():
            return Availability(
                False,
                reason=why,
                fix="enable user namespaces (sysctl), which the sandbox needs also as root",
            )
        try:
            program = filter_program()
        except SeccompUnavailable as exc:
            return Availability(False, reason=f"no seccomp filter: {exc}")
        try:
            failure = self.zygote().probe(
                namespace_flags(network=False, rootless=rootless), rootless, program
            )
        except SandboxError as exc:
            failure = str(exc)
        if failure:
            need = "CAP_SYS_ADMIN" if not rootless else "user namespaces"
            return Availability(
                False,
                reason=f"cannot create namespaces: {failure}",
                fix=f"run where {need} is available (a container may need "
                "--privileged or a seccomp profile that allows unshare)",
            )
        mode = "rootless" if rootless else "root (uid 65534 inside)"
        return Availability(True, detail=mode)

    @classmethod
    def validate_spec(cls, spec: EnvSpec) -> None:
        if spec.options.get("inside") and spec.scope != "function":
            raise InvalidSpec(
                "inside=True runs every test in a sandbox of its own, so scope must be "
                f"'function', not {spec.scope!r}",
                option="inside",
            )

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> SandboxEnvironment:
        for limit in spec.limits.requested():
            problem = self.limit_problem(limit)
            if problem is not None:
                raise EngineUnavailable(self.name, *problem)
        spare = self._take_spare(spec)
        if spare is not None:
            made = spare.hand_to(resources)
        else:
            made = self._prepare(spec, env_id, resources)
        sandbox = self._finish(made, resources)
        self._keep_spare(spec)
        return SandboxEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            root=made.root,
            cgroups=made.cgroups,
            sandbox=sandbox,
            engine=self,
        )

    def _prepare(self, spec: EnvSpec, env_id: str, resources: Resources) -> _Prepared:
        """Everything of an environment up to its sandbox, which is started, not awaited."""
        # Only the controllers the limits need: moving a process into a cgroup costs an RCU
        # grace period on cgroup v1 (~6 ms here), and without limits the PID namespace
        # already guarantees that everything inside dies with its init.
        requested = spec.limits.requested()
        needed = sorted({LIMIT_CONTROLLERS[n] for n in requested if n in LIMIT_CONTROLLERS})
        try:
            self.subtrees.prepare(needed)
        except OSError as exc:
            raise EnvironmentCreationError(
                self.name, f"cannot prepare the plugin's cgroups: {exc.strerror}"
            ) from None
        root = make_root(self, env_id, resources, names=("workspace", "home"))
        tmp_source = None
        if spec.limits.disk is not None:
            _size_limited(root, spec.limits.disk, resources)
            tmp_source = str(root / "tmp")
        cgroups = CgroupSet(root.name, self.layout, needed)
        for directory in cgroups.directories():
            resources.add("cgroup", str(directory))
        cgroups.create()
        try:
            cgroups.apply(spec.limits)
        except OSError as exc:
            raise EnvironmentCreationError(self.name, f"cannot set the limits: {exc}") from None
        readable, writable = _paths(spec)
        config = SandboxConfig(
            workspace=str(root / "workspace"),
            home=str(root / "home"),
            tmp_source=tmp_source,
            hostname=cast("str", spec.options["hostname"]),
            network=spec.limits.network is True,
            readonly_root=cast("bool", spec.options["readonly_root"]),
            mounts=cast("tuple[Mount, ...]", spec.options["mounts"]),
            needed=readable,
            writable=writable,
            cgroup_procs=cgroups.procs_files(),
            inside=bool(spec.options.get("inside")),
        )
        try:
            pending = self.zygote().start(config, filter_program())
        except (SandboxError, SeccompUnavailable) as exc:
            raise EnvironmentCreationError(self.name, str(exc)) from None
        return _Prepared(root, cgroups, pending)

    def _finish(self, made: _Prepared, resources: Resources) -> Sandbox:
        try:
            sandbox = made.pending.result()
        except SandboxError as exc:
            raise EnvironmentCreationError(self.name, str(exc)) from None
        started = _started(sandbox.init)
        self._live[sandbox.init] = (sandbox, started)
        resources.add("sandbox", str(sandbox.init), started=started, outer=sandbox.outer)
        return sandbox

    # --- spares: the next environment of a spec, made while the current one is used ---

    def _take_spare(self, spec: EnvSpec) -> _Spare | None:
        with self._lock:
            spare = self._spares.pop(spec.key, None)
        if spare is None:
            return None
        config = spare.made.pending.config
        if (config.needed, config.writable) == _paths(spec):
            return spare
        self._discard(spare)  # the test's import path or working directory changed
        return None

    def _keep_spare(self, spec: EnvSpec) -> None:
        """From the second environment of a function-scoped spec on, keep the next one in
        the making: a run of such tests pays for a sandbox's set-up beside each test."""
        if spec.scope != "function" or spec.keep != "none":
            return
        with self._lock:
            self._made[spec.key] = self._made.get(spec.key, 0) + 1
            if self._made[spec.key] < 2 or spec.key in self._spares:
                return
        spare_id = f"spare-{uuid.uuid4().hex[:8]}"
        resources = Resources(
            self.context.ledger,
            self.context.owner,
            engine=self.name,
            env_id=spare_id,
            release=self.release,
        )
        try:
            made = self._prepare(spec, spare_id, resources)
        except IsolationError:
            resources.release_all()
            return  # the next environment is made (and fails, saying why) when asked for
        with self._lock:
            self._spares[spec.key] = _Spare(resources, made)

    def _discard(self, spare: _Spare) -> None:
        with contextlib.suppress(IsolationError):
            self._finish(spare.made, spare.resources)
        spare.resources.release_all()

    def release(self, record: ResourceRecord) -> None:
        if record.kind == "cgroup":
            kill_cgroup(Path(record.identifier))
        elif record.kind == "cgroup-subtree":
            remove_subtree(Path(record.identifier))
        elif record.kind == "cgroup-leaf":
            give_back(Path(record.identifier))  # or left to the last run that uses it
        elif record.kind == "mount":
            _unmount(Path(record.identifier))
        elif record.kind == "sandbox":
            self._stop(record)
        else:
            super().release(record)

    def _stop(self, record: ResourceRecord) -> None:
        pid = int(record.identifier)
        live = self._live.pop(pid, None)
        if live is not None:
            sandbox = live[0]
            if self._zygote is not None:
                self._zygote.sandboxes.discard(sandbox)
            sandbox.stop()
            return
        started = record.data.get("started")
        if isinstance(started, int | float) and same_process(pid, float(started)):
            stop_init(pid)

    def close(self) -> None:
        with self._lock:
            spares = list(self._spares.values())
            self._spares.clear()
        for spare in spares:
            self._discard(spare)
        for pid, (sandbox, _) in list(self._live.items()):
            with contextlib.suppress(OSError):
                sandbox.stop()
            self._live.pop(pid, None)
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        self._shared.release_all()


@dataclass(frozen=True)
class _Prepared:
    """An environment's directory and cgroups, and its sandbox in the making."""

    root: Path
    cgroups: CgroupSet
    pending: PendingSandbox


@dataclass(frozen=True)
class _Spare:
    """A prepared environment waiting for a test, its resources in a stack of its own."""

    resources: Resources
    made: _Prepared

    def hand_to(self, resources: Resources) -> _Prepared:
        """Give every resource to ``resources`` (recorded there before forgotten here)."""
        for record in self.resources.records:
            self.resources.transfer(record, resources)
        return self.made


def _size_limited(root: Path, size: int, resources: Resources) -> None:
    """Mount a tmpfs of ``size`` bytes at ``root`` (recorded first) holding the workspace,
    HOME and tmp (the sandbox's /tmp): what the environment may write in all."""
    resources.add("mount", str(root))
    mount("tmpfs", str(root), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700")
    for name in ROOT_DIRECTORIES:
        (root / name).mkdir()


def _unmount(path: Path) -> None:
    """Unmount an environment's size-limited tmpfs; nothing but those is ever unmounted."""
    if not path.is_absolute() or not path.name.startswith("pytest-isolation-"):
        raise IsolationError(f"refusing to unmount {path}: not an environment's directory")
    try:
        umount(str(path), MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise


def _started(pid: int) -> float:
    from ..ledger import process_started

    started = process_started(pid)
    if started is None:
        raise EnvironmentCreationError("sandbox", f"the sandbox's process {pid} is gone")
    return started
