"""cgroups v1 and v2: where the plugin may make cgroups, their limits, counters and kill.

Every cgroup the plugin makes lives in its own subtree, ``pytest-isolation``,
in each hierarchy it uses, and nowhere else:

* beneath the runner's own cgroup where that is delegated to it (writable, and
  on v2 with the controller available), as systemd's ``Delegate=yes`` intends;
* at the root of the hierarchy where nothing is delegated and the runner is
  root (a root shell's pids and cpu cgroups on v1, a v2 tree whose controllers
  stop above the runner), as Docker and nsjail keep theirs;
* nowhere otherwise: the limit is unavailable, with the reason and the fix.

On cgroup v2 a cgroup that holds processes cannot enable controllers for its
children ("no internal processes"; writing ``+memory`` to its own
``cgroup.subtree_control`` fails with EBUSY).  The runner's processes are then
moved into a leaf, ``pytest-isolation.processes``, beside the subtree, the
controllers enabled, and the processes given back once no environment of any
run uses the subtree any more.  That move is in the ledger, so a killed runner's
watchdog gives them back too.

All file access goes through :class:`CgroupFS`, the kernel's interface here, so
that the algorithm can be exercised against a stand-in of cgroup v2's rules on
machines that have only v1 (see ``tests/cgroup_v2_standin.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..spec import Limits

Controller = Literal["memory", "pids", "cpu", "io"]
CONTROLLERS: tuple[Controller, ...] = ("memory", "pids", "cpu", "io")
#: the name of a controller's hierarchy on cgroup v1, where it differs
V1_NAMES: Mapping[Controller, str] = {"io": "blkio"}
#: which controller enforces which limit
LIMIT_CONTROLLERS: Mapping[str, Controller] = {
    "memory": "memory",
    "pids": "pids",
    "cpus": "cpu",
    "io_weight": "io",
}
#: the plugin's own cgroup in each hierarchy; every environment's cgroup is a child of it
SUBTREE = "pytest-isolation"
#: cgroup v2: where a delegated cgroup's processes go so that its children get controllers
LEAF = "pytest-isolation.processes"
_CPU_PERIOD = 100_000
_ROOTLESS_FIX = (
    "run pytest in a delegated cgroup: on cgroup v2 with systemd, "
    "`systemd-run --user --scope -p Delegate=yes pytest ...`; or run as root"
)


class CgroupFS:
    """The cgroup file interface, as the plugin uses it: the kernel's, here."""

    def read(self, path: Path) -> str:
        return path.read_text()

    def write(self, path: Path, value: str) -> None:
        with open(path, "w") as handle:
            handle.write(value)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def mkdir(self, path: Path) -> None:
        path.mkdir(exist_ok=True)

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def children(self, path: Path) -> list[Path]:
        """The child cgroups of ``path``."""
        try:
            return [entry for entry in path.iterdir() if entry.is_dir()]
        except FileNotFoundError:
            return []

    def writable(self, path: Path) -> bool:
        return os.access(path, os.W_OK) and os.access(path / "cgroup.procs", os.W_OK)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


KERNEL = CgroupFS()


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller lives (a v1 hierarchy, or the v2 tree) and where the plugin's
    subtree goes in it."""

    version: Literal[1, 2]
    mountpoint: Path
    own: str  # this process's cgroup, relative to the mount point
    base: str  # the cgroup above the plugin's subtree: ``own`` (delegated) or "/" (root)

    @property
    def own_path(self) -> Path:
        return self.mountpoint / self.own.lstrip("/")

    @property
    def base_path(self) -> Path:
        return self.mountpoint / self.base.lstrip("/")

    @property
    def subtree(self) -> Path:
        return self.base_path / SUBTREE


@dataclass(frozen=True)
class Layout:
    """Where each controller can be used by this process, or why it cannot."""

    hierarchies: Mapping[Controller, Hierarchy] = field(default_factory=dict)
    reasons: Mapping[Controller, str] = field(default_factory=dict)
    fixes: Mapping[Controller, str] = field(default_factory=dict)

    def usable(self) -> list[Controller]:
        return [c for c in CONTROLLERS if c in self.hierarchies]

    def describe(self) -> str:
        parts = []
        for controller in CONTROLLERS:
            if controller in self.hierarchies:
                h = self.hierarchies[controller]
                parts.append(f"{controller}: v{h.version} under {h.subtree}")
            else:
                parts.append(f"{controller}: unavailable")
        return "; ".join(parts)


def _cgroup_mounts(mountinfo: str) -> Iterator[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every cgroup mount."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if tail and tail[0] in ("cgroup", "cgroup2"):
            yield tail[0], Path(fields[4]), set(tail[2].split(",")) if len(tail) > 2 else set()


def discover(
    fs: CgroupFS = KERNEL,
    *,
    self_cgroup: str | None = None,
    mountinfo: str | None = None,
    euid: int | None = None,
) -> Layout:
    """Find, for each controller, the hierarchy and the place of the plugin's subtree.

    ``self_cgroup`` and ``mountinfo`` are this process's ``/proc/self/cgroup``
    and ``/proc/self/mountinfo`` (read when not given); ``euid`` its effective uid.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        if self_cgroup is None:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        if mountinfo is None:
            mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as exc:
        reason = f"cannot read this process's cgroups: {exc}"
        return Layout(reasons=dict.fromkeys(CONTROLLERS, reason))
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in self_cgroup.splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            own_v2 = _above_leaf(path)
        for name in controllers.split(","):
            if name:
                own_v1[name] = _above_leaf(path)
    found: dict[Controller, Hierarchy] = {}
    reasons: dict[Controller, str] = {}
    fixes: dict[Controller, str] = {}
    for fstype, mountpoint, options in _cgroup_mounts(mountinfo):
        for controller in CONTROLLERS:
            if controller in found:
                continue
            placed: Hierarchy | tuple[str, str] | None = None
            if fstype == "cgroup":
                name = V1_NAMES.get(controller, controller)
                if name in options and name in own_v1:
                    placed = _place_v1(fs, mountpoint, own_v1[name], euid)
            elif own_v2 is not None:
                placed = _place_v2(fs, mountpoint, own_v2, controller, euid)
            if placed is not None:
                _record(controller, placed, found, reasons, fixes)
    for controller in CONTROLLERS:
        if controller not in found and controller not in reasons:
            reasons[controller] = (
                f"the {controller} controller is neither mounted as a cgroup v1 hierarchy "
                "nor enabled in the cgroup v2 tree"
            )
            fixes[controller] = "use a kernel with the controller, or a host that enables it"
    return Layout(found, reasons, fixes)


def _record(
    controller: Controller,
    placed: Hierarchy | tuple[str, str],
    found: dict[Controller, Hierarchy],
    reasons: dict[Controller, str],
    fixes: dict[Controller, str],
) -> None:
    if isinstance(placed, Hierarchy):
        found[controller] = placed
        reasons.pop(controller, None)
        fixes.pop(controller, None)
    else:
        reasons[controller], fixes[controller] = placed


def _above_leaf(path: str) -> str:
    """A runner moved into the plugin's leaf (by itself or a sibling) belongs to the cgroup
    above it."""
    parts = path.rstrip("/").split("/")
    if parts and parts[-1] == LEAF:
        return "/".join(parts[:-1]) or "/"
    return path


def _place_v1(fs: CgroupFS, mountpoint: Path, own: str, euid: int) -> Hierarchy | tuple[str, str]:
    own_path = mountpoint / own.lstrip("/")
    if own not in ("/", "") and fs.writable(own_path):
        return Hierarchy(1, mountpoint, own, own)
    if euid == 0 and fs.writable(mountpoint):
        return Hierarchy(1, mountpoint, own, "/")
    where = "the root of the hierarchy" if own in ("/", "") else f"{own_path}, not writable"
    return (
        f"this process's cgroup at {mountpoint} is {where}, and it is not root: "
        "nothing there is delegated to it",
        "run as root, or have a cgroup delegated (chowned) to this user and run pytest in it",
    )


def _place_v2(
    fs: CgroupFS, mountpoint: Path, own: str, controller: Controller, euid: int
) -> Hierarchy | tuple[str, str] | None:
    own_path = mountpoint / own.lstrip("/")
    root_has = controller in _words(fs, mountpoint / "cgroup.controllers", default="")
    own_has = controller in _words(fs, own_path / "cgroup.controllers", default="")
    is_root = own in ("/", "")
    if own_has and not is_root and fs.writable(own_path):
        return Hierarchy(2, mountpoint, own, own)
    if euid == 0 and (root_has or (is_root and own_has)):
        return Hierarchy(2, mountpoint, own, "/")
    if not root_has and not own_has:
        return None  # not on this tree (another mount may be a v1 hierarchy of it)
    if not own_has:
        reason = f"the {controller} controller is not delegated to this process's cgroup {own}"
    else:
        reason = f"this process's cgroup {own_path} is not writable by uid {euid}"
    return reason, _ROOTLESS_FIX


def _words(fs: CgroupFS, path: Path, default: str | None = None) -> list[str]:
    try:
        return fs.read(path).split()
    except OSError:
        if default is None:
            raise
        return default.split()


# --- the plugin's subtrees ----------------------------------------------------------------


class Subtrees:
    """The plugin's subtree in each hierarchy, made ready for the controllers a run uses.

    ``record(kind, identifier)`` writes a ledger record before each thing that
    must be undone is done: the subtree (``cgroup-subtree``), and on cgroup v2
    the move of the runner's processes into the leaf (``cgroup-leaf``).
    """

    def __init__(
        self, layout: Layout, record: Callable[[str, str], object], fs: CgroupFS = KERNEL
    ) -> None:
        self.layout = layout
        self.fs = fs
        self._record = record
        self._ready: set[Controller] = set()

    def prepare(self, controllers: list[Controller]) -> None:
        """Make the subtrees of ``controllers`` ready for children with those controllers;
        raises :class:`OSError` naming the file that refused."""
        for controller in controllers:
            if controller in self._ready:
                continue
            hierarchy = self.layout.hierarchies[controller]
            if hierarchy.version == 2:
                self._enable_v2(hierarchy, controller)
            elif not self.fs.exists(hierarchy.subtree):
                self._record("cgroup-subtree", str(hierarchy.subtree))
                self.fs.mkdir(hierarchy.subtree)
            self._ready.add(controller)

    def _enable_v2(self, hierarchy: Hierarchy, controller: Controller) -> None:
        base, subtree = hierarchy.base_path, hierarchy.subtree
        control = base / "cgroup.subtree_control"
        if controller not in _words(self.fs, control):
            try:
                self.fs.write(control, f"+{controller}")
            except OSError as exc:
                if exc.errno != errno.EBUSY or hierarchy.base in ("/", ""):
                    raise _named(exc, control) from None
                self._move_to_leaf(base)
                try:
                    self.fs.write(control, f"+{controller}")
                except OSError as again:
                    raise _named(again, control) from None
        if not self.fs.exists(subtree):
            self._record("cgroup-subtree", str(subtree))
            self.fs.mkdir(subtree)
        inner = subtree / "cgroup.subtree_control"
        if controller not in _words(self.fs, inner):
            try:
                self.fs.write(inner, f"+{controller}")
            except OSError as exc:
                raise _named(exc, inner) from None

    def _move_to_leaf(self, base: Path) -> None:
        """No internal processes: move every process of ``base`` into its leaf."""
        leaf = base / LEAF
        self._record("cgroup-leaf", str(leaf))
        self.fs.mkdir(leaf)
        for pid in _pids(self.fs, base):
            try:
                self.fs.write(leaf / "cgroup.procs", str(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # gone meanwhile
                    raise _named(exc, leaf / "cgroup.procs") from None


def give_back(leaf: Path, fs: CgroupFS = KERNEL) -> bool:
    """Undo the move into ``leaf`` (a ``pytest-isolation.processes`` cgroup) once nothing of
    the plugin's subtree beside it is in use: controllers off, processes back, leaf gone.

    Returns False, changing nothing, while environments (of any run) still use it.
    """
    if leaf.name != LEAF:
        raise ValueError(f"{leaf} is not the plugin's leaf cgroup")
    base = leaf.parent
    subtree = base / SUBTREE
    if fs.exists(subtree):
        if fs.children(subtree):
            return False  # another run's environments
        with contextlib.suppress(FileNotFoundError):
            fs.rmdir(subtree)
    if any(child.name != LEAF for child in fs.children(base)):
        return False  # cgroups of someone else need the controllers
    for controller in _words(fs, base / "cgroup.subtree_control", default=""):
        fs.write(base / "cgroup.subtree_control", f"-{controller}")
    if fs.exists(leaf):
        for pid in _pids(fs, leaf):
            try:
                fs.write(base / "cgroup.procs", str(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # gone meanwhile
                    raise
        fs.rmdir(leaf)
    return True


def remove_subtree(subtree: Path, fs: CgroupFS = KERNEL) -> None:
    """Remove the plugin's (empty) subtree; one that other runs still use stays."""
    if subtree.name != SUBTREE:
        raise ValueError(f"{subtree} is not the plugin's subtree")
    try:
        fs.rmdir(subtree)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise


def _named(exc: OSError, path: Path) -> OSError:
    return OSError(exc.errno, f"{os.strerror(exc.errno or 0)}: writing {path}")


@dataclass
class Counters:
    """What the kernel counted for a cgroup set."""

    oom_kills: int = 0
    pids_refused: int = 0
    peak_memory: int | None = None


class CgroupSet:
    """One environment's cgroup in each hierarchy that is used, in the plugin's subtree."""

    def __init__(
        self, name: str, layout: Layout, controllers: list[Controller], fs: CgroupFS = KERNEL
    ):
        self.name = name
        self.layout = layout
        self.fs = fs
        self.paths: dict[Controller, Path] = {
            controller: layout.hierarchies[controller].subtree / name for controller in controllers
        }

    def directories(self) -> list[Path]:
        """Each distinct cgroup directory (v2 shares one for every controller)."""
        return list(dict.fromkeys(self.paths.values()))

    def create(self) -> None:
        for directory in self.directories():
            self.fs.mkdir(directory)

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
                    self.fs.write(path / "memory.max", str(value))
                    self._optional(path / "memory.swap.max", "0")
                else:
                    self.fs.write(path / "memory.limit_in_bytes", str(value))
                    self._optional(path / "memory.memsw.limit_in_bytes", str(value))
            elif limit == "pids":
                self.fs.write(path / "pids.max", str(value))
            elif limit == "cpus":
                quota = max(1000, int(value * _CPU_PERIOD))
                if v2:
                    self.fs.write(path / "cpu.max", f"{quota} {_CPU_PERIOD}")
                else:
                    self.fs.write(path / "cpu.cfs_period_us", str(_CPU_PERIOD))
                    self.fs.write(path / "cpu.cfs_quota_us", str(quota))
            elif limit == "io_weight":
                self._io_weight(path, int(value), v2=v2)

    def _io_weight(self, path: Path, weight: int, *, v2: bool) -> None:
        """The proportional I/O weight: ``io.weight`` (v2, the io.cost model) or
        ``io.bfq.weight`` (v2, BFQ), ``blkio.weight`` (v1, CFQ) or ``blkio.bfq.weight``."""
        names = ("io.weight", "io.bfq.weight") if v2 else ("blkio.weight", "blkio.bfq.weight")
        for name in names:
            if self.fs.exists(path / name):
                self.fs.write(path / name, str(weight))
                return
        raise OSError(
            errno.ENOENT,
            f"no I/O weight file ({' or '.join(names)}) in {path}: the kernel offers no "
            "proportional I/O control here (io.cost or the BFQ scheduler)",
        )

    def io_weight(self) -> int | None:
        """The weight in force, read back from the kernel."""
        path = self.paths.get("io")
        if path is None:
            return None
        for name in ("io.weight", "io.bfq.weight", "blkio.weight", "blkio.bfq.weight"):
            if self.fs.exists(path / name):
                words = self.fs.read(path / name).split()
                # v2 files read "default 500"; v1 files the number alone
                return (
                    int(words[words.index("default") + 1]) if "default" in words else int(words[0])
                )
        return None

    def _optional(self, path: Path, value: str) -> None:
        if self.fs.exists(path):
            with contextlib.suppress(OSError):
                self.fs.write(path, value)

    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(d / "cgroup.procs") for d in self.directories())

    def counters(self) -> Counters:
        counters = Counters()
        memory = self.paths.get("memory")
        if memory is not None:
            v2 = self.layout.hierarchies["memory"].version == 2
            events = _keyed(self.fs, memory / ("memory.events" if v2 else "memory.oom_control"))
            counters.oom_kills = events.get("oom_kill", 0)
            name = "memory.peak" if v2 else "memory.max_usage_in_bytes"
            counters.peak_memory = _number(self.fs, memory / name)
        pids = self.paths.get("pids")
        if pids is not None:
            counters.pids_refused = _keyed(self.fs, pids / "pids.events").get("max", 0)
        return counters

    def kill_processes(self) -> None:
        """Kill every process in the set, keeping the cgroups."""
        for directory in self.directories():
            kill_processes(directory, self.fs)


def kill_processes(directory: Path, fs: CgroupFS = KERNEL) -> None:
    """SIGKILL every process in ``directory``: ``cgroup.kill`` on v2, one by one on v1."""
    kill_file = directory / "cgroup.kill"
    if fs.exists(kill_file):
        with contextlib.suppress(OSError):
            fs.write(kill_file, "1")
            return
    for pid in _pids(fs, directory):
        fs.kill(pid)


def kill_cgroup(directory: Path, timeout: float = 5.0, fs: CgroupFS = KERNEL) -> None:
    """Kill every process in ``directory`` (and below) and remove it, waiting for them to go.

    Only an environment's cgroup, a child of the plugin's subtree, is touched: anything
    else (a damaged or planted ledger record) raises :class:`ValueError`.
    """
    if not fs.exists(directory):
        return
    if directory.parent.name != SUBTREE or not fs.exists(directory / "cgroup.procs"):
        raise ValueError(f"refusing to remove {directory}: not a cgroup in a {SUBTREE} subtree")
    _kill_and_remove(directory, time.monotonic() + timeout, fs)


def _kill_and_remove(directory: Path, deadline: float, fs: CgroupFS) -> None:
    if not fs.exists(directory):
        return
    while True:
        for child in fs.children(directory):
            _kill_and_remove(child, deadline, fs)
        kill_processes(directory, fs)
        try:
            fs.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def _pids(fs: CgroupFS, directory: Path) -> list[int]:
    try:
        return [int(p) for p in fs.read(directory / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _keyed(fs: CgroupFS, path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in fs.read(path).splitlines():
            key, _, number = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(number)
    except OSError:
        pass
    return values


def _number(fs: CgroupFS, path: Path) -> int | None:
    try:
        return int(fs.read(path).strip())
    except (OSError, ValueError):
        return None
