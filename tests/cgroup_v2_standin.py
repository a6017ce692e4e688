"""A STAND-IN for the cgroup v2 file interface, for machines whose kernel mounts only v1.

It is not a cgroup implementation: it holds a tree of cgroups in memory and
answers reads and writes of their interface files with the rules of cgroup v2
that the plugin's cgroup code depends on, as Documentation/admin-guide/cgroup-v2.rst
states them, and nothing more:

* a cgroup's ``cgroup.controllers`` are its parent's ``cgroup.subtree_control``
  (the root's are the machine's);
* ``+name`` in ``cgroup.subtree_control`` needs the controller in the cgroup's own
  ``cgroup.controllers`` (else ENOENT) and, but at the root, no process in the
  cgroup ("no internal processes": EBUSY);
* ``-name`` fails with EBUSY while a child has it in its own ``subtree_control``;
* a pid written to ``cgroup.procs`` moves that process, unless the target has
  controllers enabled for children (EBUSY, but at the root) or the process does
  not exist (ESRCH);
* a controller's interface files exist only where it is in ``cgroup.controllers``;
* ``rmdir`` fails with EBUSY while the cgroup has processes or children;
* ``cgroup.kill`` kills every process of the subtree.

The real v1 machinery is exercised beside it by ``tests/test_sandbox.py``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from pytest_isolation.linux.cgroups import CgroupFS

MOUNT = Path("/sys/fs/cgroup")

#: The interface files each controller adds to a cgroup, with their initial contents.
CONTROLLER_FILES = {
    "memory": {
        "memory.max": "max",
        "memory.swap.max": "max",
        "memory.peak": "0",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    },
    "pids": {"pids.max": "max", "pids.events": "max 0\n"},
    "cpu": {"cpu.max": "max 100000", "cpu.stat": "usage_usec 0\n"},
    "io": {"io.weight": "default 100\n"},
}


def _error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@dataclass
class Cgroup:
    """One cgroup of the stand-in."""

    parent: Cgroup | None
    children: dict[str, Cgroup] = field(default_factory=dict)
    processes: set[int] = field(default_factory=set)
    subtree_control: set[str] = field(default_factory=set)
    files: dict[str, str] = field(default_factory=dict)
    writable: bool = True


class CgroupV2StandIn(CgroupFS):
    """A cgroup v2 tree at ``/sys/fs/cgroup`` in memory, with processes as bare pids."""

    def __init__(self, controllers: tuple[str, ...] = ("cpu", "io", "memory", "pids")) -> None:
        self.available = set(controllers)
        self.root = Cgroup(None)
        self.killed: list[int] = []

    # --- setting the scene ---

    def make(self, path: str, *, writable: bool = True) -> Cgroup:
        """Create the cgroup at ``path`` (below the mount) and its parents, as an admin would."""
        node = self.root
        for part in Path(path).parts[1:] if path.startswith("/") else Path(path).parts:
            if part not in node.children:
                node.children[part] = Cgroup(node)
            node = node.children[part]
        node.writable = writable
        return node

    def delegate(self, path: str, *controllers: str) -> None:
        """Enable ``controllers`` on every cgroup above ``path``, as systemd's Delegate= does."""
        node = self.root
        for part in Path(path).parts[1:]:
            node.subtree_control |= set(controllers)
            node = node.children[part]

    def spawn(self, path: str, pid: int) -> None:
        """A process ``pid`` in the cgroup at ``path``."""
        self._locate(MOUNT / path.lstrip("/"))[0].processes.add(pid)

    def where(self, pid: int) -> str:
        """The cgroup of ``pid`` (as ``/proc/PID/cgroup`` shows it), or "" if it is gone."""

        def search(node: Cgroup, path: str) -> str:
            if pid in node.processes:
                return path or "/"
            for name, child in node.children.items():
                found = search(child, f"{path}/{name}")
                if found:
                    return found
            return ""

        return search(self.root, "")

    def self_cgroup(self, pid: int) -> str:
        return f"0::{self.where(pid)}\n"

    # --- the file interface ---

    def _locate(self, path: Path) -> tuple[Cgroup, str | None]:
        """The cgroup of ``path`` and the interface file it names (None for the directory)."""
        relative = path.relative_to(MOUNT).parts
        node = self.root
        for index, part in enumerate(relative):
            if part in node.children:
                node = node.children[part]
            elif index == len(relative) - 1:
                return node, part
            else:
                raise _error(errno.ENOENT, path)
        return node, None

    def _controllers(self, node: Cgroup) -> set[str]:
        return self.available if node.parent is None else node.parent.subtree_control

    def _files(self, node: Cgroup) -> dict[str, str]:
        files = {
            "cgroup.controllers": " ".join(sorted(self._controllers(node))),
            "cgroup.subtree_control": " ".join(sorted(node.subtree_control)),
            "cgroup.procs": "".join(f"{pid}\n" for pid in sorted(node.processes)),
        }
        if node.parent is not None:
            files["cgroup.kill"] = ""
        for controller in self._controllers(node) if node.parent is not None else ():
            for name, value in CONTROLLER_FILES[controller].items():
                files[name] = node.files.get(name, value)
        return files

    def read(self, path: Path) -> str:
        node, name = self._locate(path)
        files = self._files(node)
        if name is None:
            raise _error(errno.EISDIR, path)
        if name not in files:
            raise _error(errno.ENOENT, path)
        return files[name]

    def exists(self, path: Path) -> bool:
        try:
            node, name = self._locate(path)
        except OSError:
            return False
        return name is None or name in self._files(node)

    def writable(self, path: Path) -> bool:
        try:
            node, name = self._locate(path)
        except OSError:
            return False
        return name is None and node.writable

    def children(self, path: Path) -> list[Path]:
        node, name = self._locate(path)
        return [] if name is not None else [path / child for child in node.children]

    def mkdir(self, path: Path) -> None:
        parent, name = self._locate(path)
        if name is None:
            return  # exists
        if name.startswith("cgroup.") or not parent.writable:
            raise _error(errno.EACCES, path)
        parent.children[name] = Cgroup(parent)

    def rmdir(self, path: Path) -> None:
        node, name = self._locate(path)
        if name is not None or node.parent is None:
            raise _error(errno.ENOENT if name is not None else errno.EBUSY, path)
        if node.processes or node.children:
            raise _error(errno.EBUSY, path)
        parent = node.parent
        del parent.children[next(k for k, v in parent.children.items() if v is node)]

    def write(self, path: Path, value: str) -> None:
        node, name = self._locate(path)
        if name is None or name not in self._files(node):
            raise _error(errno.ENOENT, path)
        if not node.writable and name.startswith("cgroup."):
            raise _error(errno.EACCES, path)
        if name == "cgroup.subtree_control":
            self._subtree_control(node, path, value)
        elif name == "cgroup.procs":
            self._move(node, path, int(value.strip()))
        elif name == "cgroup.kill":
            self._kill_all(node)
        elif name in ("cgroup.controllers", "memory.peak", "memory.events", "pids.events"):
            raise _error(errno.EACCES, path)
        else:
            node.files[name] = value.strip()

    def _subtree_control(self, node: Cgroup, path: Path, value: str) -> None:
        for word in value.split():
            sign, controller = word[0], word[1:]
            if sign == "+":
                if controller not in self._controllers(node):
                    raise _error(errno.ENOENT, path)
                if node.parent is not None and node.processes:
                    raise _error(errno.EBUSY, path)  # no internal processes
                node.subtree_control.add(controller)
            elif sign == "-":
                if any(controller in child.subtree_control for child in node.children.values()):
                    raise _error(errno.EBUSY, path)
                node.subtree_control.discard(controller)
            else:
                raise _error(errno.EINVAL, path)

    def _move(self, target: Cgroup, path: Path, pid: int) -> None:
        source = self._holder(self.root, pid)
        if source is None:
            raise _error(errno.ESRCH, path)
        if target.parent is not None and target.subtree_control:
            raise _error(errno.EBUSY, path)  # no internal processes
        source.processes.discard(pid)
        target.processes.add(pid)

    def _holder(self, node: Cgroup, pid: int) -> Cgroup | None:
        if pid in node.processes:
            return node
        for child in node.children.values():
            found = self._holder(child, pid)
            if found is not None:
                return found
        return None

    def _kill_all(self, node: Cgroup) -> None:
        self.killed += sorted(node.processes)
        node.processes.clear()
        for child in node.children.values():
            self._kill_all(child)

    def kill(self, pid: int) -> None:
        holder = self._holder(self.root, pid)
        if holder is not None:
            holder.processes.discard(pid)
            self.killed.append(pid)
