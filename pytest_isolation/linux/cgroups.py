"""cgroups v1 and v2: limits, counters and a guaranteed kill for a sandbox's processes.

Child cgroups are created only beneath the cgroup this process is in (read
from ``/proc/self/cgroup``), never at the root of a hierarchy: that is the
part delegated to us, and the host's cgroup manager keeps the rest.  A
process whose cgroup *is* a hierarchy's root has been delegated nothing there;
the controller is reported unavailable with the way to fix it.

On cgroup v2, enabling a controller for children fails while the parent has
processes of its own ("no internal processes"); the usual cure, used here, is
to move this process into a leaf child of its cgroup first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..spec import Limits

Controller = Literal["memory", "pids", "cpu"]
CONTROLLERS: tuple[Controller, ...] = ("memory", "pids", "cpu")
#: which controller enforces which limit
LIMIT_CONTROLLERS: Mapping[str, Controller] = {"memory": "memory", "pids": "pids", "cpus": "cpu"}
_CPU_PERIOD = 100_000
_FIX = (
    "run pytest inside a delegated cgroup, e.g. `systemd-run --user --scope -p Delegate=yes "
    "pytest ...`, or (as root) move the shell into a child cgroup first: "
    "`mkdir {root}/tests && echo $$ > {root}/tests/cgroup.procs`"
)


@dataclass(frozen=True)
class Hierarchy:
    """One place where a controller lives: a v1 hierarchy, or the v2 tree."""

    version: Literal[1, 2]
    mountpoint: Path
    own: str  # this process's cgroup, relative to the mount point
    controllers: frozenset[str]

    @property
    def path(self) -> Path:
        return self.mountpoint / self.own.lstrip("/")


@dataclass(frozen=True)
class Layout:
    """Where each controller can be used by this process, or why it cannot."""

    hierarchies: Mapping[str, Hierarchy] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)

    def usable(self) -> list[Controller]:
        return [c for c in CONTROLLERS if c in self.hierarchies]

    def describe(self) -> str:
        parts = []
        for controller in CONTROLLERS:
            if controller in self.hierarchies:
                h = self.hierarchies[controller]
                parts.append(f"{controller}: v{h.version} under {h.path}")
            else:
                parts.append(f"{controller}: unavailable ({self.reasons.get(controller, '?')})")
        return "; ".join(parts)


def _cgroup_mounts() -> Iterator[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every cgroup mount."""
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if tail and tail[0] in ("cgroup", "cgroup2"):
                yield tail[0], Path(fields[4]), set(tail[2].split(",")) if len(tail) > 2 else set()


def discover() -> Layout:
    """Find, for each controller, the hierarchy and cgroup this process may use."""
    try:
        own_lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        return Layout(reasons=dict.fromkeys(CONTROLLERS, f"cannot read /proc/self/cgroup: {exc}"))
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in own_lines:
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            own_v2 = path
        for name in controllers.split(","):
            if name:
                own_v1[name] = path
    hierarchies: dict[str, Hierarchy] = {}
    reasons: dict[str, str] = {}
    for fstype, mountpoint, options in _cgroup_mounts():
        if fstype == "cgroup2" and own_v2 is not None:
            try:
                available = set(
                    (mountpoint / own_v2.lstrip("/") / "cgroup.controllers").read_text().split()
                )
            except OSError:
                continue
            for name in CONTROLLERS:
                if name in available:
                    hierarchies.setdefault(
                        name, Hierarchy(2, mountpoint, own_v2, frozenset(available))
                    )
        elif fstype == "cgroup":
            for name in CONTROLLERS:
                if name in options and name in own_v1 and name not in hierarchies:
                    hierarchies[name] = Hierarchy(
                        1, mountpoint, own_v1[name], frozenset(options & set(CONTROLLERS))
                    )
    usable: dict[str, Hierarchy] = {}
    for name in CONTROLLERS:
        hierarchy = hierarchies.get(name)
        if hierarchy is None:
            reasons[name] = (
                f"the {name} controller is neither mounted as a cgroup v1 hierarchy "
                "nor enabled for this process's cgroup v2 tree"
            )
        elif hierarchy.own in ("/", ""):
            reasons[name] = (
                f"this process's {name} cgroup is the root of the hierarchy at "
                f"{hierarchy.mountpoint}: nothing is delegated there; "
                + _FIX.format(root=hierarchy.mountpoint)
            )
        elif not os.access(hierarchy.path, os.W_OK):
            reasons[name] = (
                f"{hierarchy.path} is not writable by uid {os.geteuid()}; "
                + _FIX.format(root=hierarchy.path)
            )
        else:
            usable[name] = hierarchy
    return Layout(usable, reasons)


@dataclass
class Counters:
    """What the kernel counted for a cgroup set."""

    oom_kills: int = 0
    pids_refused: int = 0
    peak_memory: int | None = None
    cpu_time: float | None = None


class CgroupSet:
    """One sandbox's cgroup in each hierarchy that is used."""

    def __init__(self, name: str, layout: Layout, controllers: list[Controller]):
        self.name = name
        self.layout = layout
        self.paths: dict[Controller, Path] = {}
        for controller in controllers:
            hierarchy = layout.hierarchies[controller]
            self.paths[controller] = hierarchy.path / name

    def directories(self) -> list[Path]:
        """Each distinct cgroup directory (v2 shares one for every controller)."""
        return list(dict.fromkeys(self.paths.values()))

    def create(self) -> None:
        for controller, path in self.paths.items():
            hierarchy = self.layout.hierarchies[controller]
            if hierarchy.version == 2:
                _enable_v2(hierarchy, controller)
            path.mkdir(exist_ok=True)

    def apply(self, limits: Limits) -> None:
        """Write the limits; a limit whose controller is not in the set is an error."""
        for limit, controller in LIMIT_CONTROLLERS.items():
            value = getattr(limits, limit)
            if value is None:
                continue
            path = self.paths[controller]
            v2 = self.layout.hierarchies[controller].version == 2
            if limit == "memory":
                if v2:
                    _write(path / "memory.max", str(value))
                    _write_optional(path / "memory.swap.max", "0")
                else:
                    _write(path / "memory.limit_in_bytes", str(value))
                    _write_optional(path / "memory.memsw.limit_in_bytes", str(value))
            elif limit == "pids":
                _write(path / "pids.max", str(value))
            elif limit == "cpus":
                quota = max(1000, int(value * _CPU_PERIOD))
                if v2:
                    _write(path / "cpu.max", f"{quota} {_CPU_PERIOD}")
                else:
                    _write(path / "cpu.cfs_period_us", str(_CPU_PERIOD))
                    _write(path / "cpu.cfs_quota_us", str(quota))

    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(d / "cgroup.procs") for d in self.directories())

    def counters(self) -> Counters:
        counters = Counters()
        memory = self.paths.get("memory")
        if memory is not None:
            v2 = self.layout.hierarchies["memory"].version == 2
            events = _keyed(memory / ("memory.events" if v2 else "memory.oom_control"))
            counters.oom_kills = events.get("oom_kill", 0)
            peak = _number(memory / ("memory.peak" if v2 else "memory.max_usage_in_bytes"))
            counters.peak_memory = peak
        pids = self.paths.get("pids")
        if pids is not None:
            counters.pids_refused = _keyed(pids / "pids.events").get("max", 0)
        return counters

    def kill_processes(self) -> None:
        """Kill every process in the set, keeping the cgroups."""
        for directory in self.directories():
            kill_processes(directory)


def _enable_v2(hierarchy: Hierarchy, controller: str) -> None:
    control = hierarchy.path / "cgroup.subtree_control"
    if controller in control.read_text().split():
        return
    try:
        _write(control, f"+{controller}")
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # no internal processes: move this process into a leaf of its own cgroup first
        leaf = hierarchy.path / f"runner-{os.getpid()}"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
        _write(control, f"+{controller}")


def kill_processes(directory: Path) -> None:
    """SIGKILL every process in ``directory``: ``cgroup.kill`` on v2, one by one on v1."""
    kill_file = directory / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            _write(kill_file, "1")
        return
    for pid in _pids(directory):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill_cgroup(directory: Path, timeout: float = 5.0) -> None:
    """Kill every process in ``directory`` (and below) and remove it, waiting for them to go."""
    if not directory.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        for child in [p for p in directory.iterdir() if p.is_dir()]:
            kill_cgroup(child, max(0.1, deadline - time.monotonic()))
        kill_processes(directory)
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def _pids(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _write_optional(path: Path, value: str) -> None:
    if path.exists():
        with contextlib.suppress(OSError):
            _write(path, value)


def _keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, number = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(number)
    except OSError:
        pass
    return values


def _number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
