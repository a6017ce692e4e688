"""The ``sandbox`` engine: Linux namespaces plus cgroup limits, for every command.

Each command runs in fresh PID, mount, UTS and IPC namespaces (and a network
namespace with only loopback, unless ``network=True``; a user namespace when
not root), under an init process that reaps zombies and takes everything
down with it.  Inside, the root filesystem is read-only (``readonly_root``),
``/tmp`` is the environment's own, and the workspace and HOME keep their host
paths, read-write.  All commands of an environment share one cgroup per
controller, beneath this process's own cgroup, which carries the memory, pids
and cpu limits and is killed and removed at teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

from ..errors import CommandTimeout, EngineUnavailable, InvalidSpec, ResourceLimitExceeded
from ..execution import ExecResult, Usage, execute
from ..linux.cgroups import LIMIT_CONTROLLERS, CgroupSet, Counters, Layout, discover, kill_cgroup
from ..linux.namespaces import (
    Mount,
    MountTable,
    SandboxConfig,
    enter_sandbox,
    pid_namespace_for_children,
    probe,
    user_namespaces_allowed,
)
from ..spec import EnvSpec, Option, boolean, string
from .base import Availability, Engine, EngineContext, Resources
from .basic import LOCAL_OPTIONS, LocalEnvironment, make_root

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
        "inside": Option(
            "inside", "run the test function itself inside the sandbox", boolean, False
        ),
    }
)


class SandboxEnvironment(LocalEnvironment):
    """A :class:`LocalEnvironment` whose commands run in namespaces under its cgroups."""

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        root: Path,
        cgroups: CgroupSet,
        config: SandboxConfig,
    ):
        self.cgroups = cgroups
        self.config = config
        self._inside = config
        super().__init__(env_id=env_id, spec=spec, resources=resources, root=root)

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
        assert self.path is not None
        config = dataclasses.replace(
            self.config, cwd=str(self.path / cwd) if cwd is not None else None
        )
        before = self.cgroups.counters()
        environ = {**self.environ, **env}
        try:
            result = execute(
                argv,
                env=environ,
                input=input,
                timeout=timeout,
                # the environment's cgroup holds the command's processes for teardown already
                on_spawn=None if self.cgroups.paths else self.resources.track_process,
                preexec=functools.partial(enter_sandbox, config, argv, environ),
            )
        except CommandTimeout:
            self.cgroups.kill_processes()
            raise
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

    def usage(self) -> Usage:
        usage = super().usage()
        peak = self.cgroups.counters().peak_memory
        if peak is not None:
            usage.peak_memory = peak
        return usage

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Inside mode, in the parent around the fork: decide the child's mounts here, once
        (pytest's working directory and import path visible, its temporary directories
        writable), and as root let the fork itself enter a new PID namespace, which saves
        the child a fork of its own."""
        import glob
        import tempfile

        readonly = self.config.readonly_root
        seen = [
            Mount(d, d, readonly)
            for d in dict.fromkeys((os.getcwd(), *sys.path))
            if d and os.path.isdir(d)
        ]
        temp = [
            Mount(d, d, readonly=False)
            for d in glob.glob(os.path.join(tempfile.gettempdir(), "pytest-of-*"))
        ]
        mounts = (*self.config.mounts, *_outermost(seen), *temp)
        self._inside = dataclasses.replace(self.config, cwd=os.getcwd(), mounts=mounts)
        if self.config.user_namespace:
            yield  # rootless: the PID namespace needs the user namespace, made in the child
            return
        with pid_namespace_for_children():
            yield

    def enter(self) -> None:
        """Inside mode, in the forked child: go into the sandbox (see :meth:`forking`)."""
        enter_sandbox(self._inside)

    def explain_exit(self, status: int | None, timed_out: bool, error: str) -> str:
        counters = self.cgroups.counters()
        limits = self.spec.limits
        if counters.oom_kills and not timed_out:
            return (
                f"the test process was killed by the out-of-memory killer: the memory limit of "
                f"{_size(limits.memory)} was reached (peak {_size(counters.peak_memory)})"
            )
        reason = super().explain_exit(status, timed_out, error)
        if counters.pids_refused:
            reason += (
                f"; the pids limit of {limits.pids} refused "
                f"{counters.pids_refused} process creation(s)"
            )
        return reason

    def validate(self) -> list[str]:
        problems = super().validate()
        problems += [f"cgroup {d} is missing" for d in self.cgroups.directories() if not d.is_dir()]
        return problems


def _interpreter_binds() -> list[Mount]:
    """The running interpreter's environment (a virtualenv), read-only, where the private
    /tmp would hide it: ``sys.executable`` keeps working inside."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix)}
    return [Mount(p, p, readonly=True) for p in sorted(prefixes) if p.startswith("/tmp/")]


def _outermost(mounts: list[Mount]) -> list[Mount]:
    """Drop binds that lie inside another bind of the list (one bind shows them all)."""
    keep: list[Mount] = []
    for mount in sorted(mounts, key=lambda m: len(m.target)):
        if not any(
            m.target == mount.target or mount.target.startswith(m.target.rstrip("/") + "/")
            for m in keep
        ):
            keep.append(mount)
    return keep


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
    description = "Linux namespaces (pid, mount, net, uts, ipc; user when rootless) + cgroups"
    options = SANDBOX_OPTIONS
    supported_limits = frozenset({"memory", "cpus", "pids", "timeout", "network"})

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._availability: Availability | None = None

    @functools.cached_property
    def layout(self) -> Layout:
        return discover()

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
        if rootless and (why := user_namespaces_allowed()):
            return Availability(
                False,
                reason=f"not root, and {why}",
                fix="enable user namespaces (sysctl) or run as root",
            )
        failure = probe(SandboxConfig(workspace="/", private_tmp="/tmp", user_namespace=rootless))
        if failure:
            need = "CAP_SYS_ADMIN" if not rootless else "user namespaces"
            return Availability(
                False,
                reason=f"cannot create namespaces: {failure}",
                fix=f"run where {need} is available (a container may need "
                "--privileged or a seccomp profile that allows unshare)",
            )
        mode = "rootless, user namespace" if rootless else "root"
        return Availability(True, detail=f"{mode}; cgroups: {self.layout.describe()}")

    @classmethod
    def validate_spec(cls, spec: EnvSpec) -> None:
        if spec.options.get("inside") and spec.scope != "function":
            raise InvalidSpec(
                "inside=True runs every test in a sandbox of its own, so scope must be "
                f"'function', not {spec.scope!r}",
                option="inside",
            )

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> SandboxEnvironment:
        needed = sorted(
            {
                LIMIT_CONTROLLERS[name]
                for name in spec.limits.requested()
                if name in LIMIT_CONTROLLERS
            }
        )
        missing = [c for c in needed if c not in self.layout.hierarchies]
        if missing:
            limit = next(k for k, v in LIMIT_CONTROLLERS.items() if v == missing[0])
            raise EngineUnavailable(
                self.name,
                f"the {limit} limit needs the {missing[0]} cgroup controller: "
                f"{self.layout.reasons[missing[0]]}",
            )
        root = make_root(self, env_id, resources)
        # Only the controllers the limits need: moving a process into a cgroup costs an RCU
        # grace period on cgroup v1 (~6 ms here), and without limits the PID namespace
        # already guarantees that everything inside dies with its init.
        cgroups = CgroupSet(root.name, self.layout, needed)
        for directory in cgroups.directories():
            resources.add("cgroup", str(directory))
        cgroups.create()
        cgroups.apply(spec.limits)
        network = spec.limits.network is True
        config = SandboxConfig(
            workspace=str(root / "workspace"),
            home=str(root / "home"),
            private_tmp=str(root / "tmp"),
            hostname=cast("str", spec.options["hostname"]),
            network=network,
            readonly_root=cast("bool", spec.options["readonly_root"]),
            user_namespace=os.geteuid() != 0,
            mounts=(*cast("tuple[Mount, ...]", spec.options["mounts"]), *_interpreter_binds()),
            cgroup_procs=cgroups.procs_files(),
            mounts_before=MountTable(),
        )
        return SandboxEnvironment(
            env_id=env_id, spec=spec, resources=resources, root=root, cgroups=cgroups, config=config
        )

    def release(self, record: ResourceRecord) -> None:
        if record.kind == "cgroup":
            kill_cgroup(Path(record.identifier))
        else:
            super().release(record)
