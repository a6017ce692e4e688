"""The cgroup placement algorithm against cgroup v2's rules (a stand-in), and on real v1.

This machine's kernel mounts cgroup v1 only, where the sandbox's limits are
tested for real (``tests/test_sandbox.py``).  Users mostly run v2, where a
cgroup with processes cannot enable controllers for its children: the
algorithm that copes with that (move the runner's processes into a leaf, enable
the controllers, make the environments' cgroups beside it, give the processes
back) runs here against ``CgroupV2StandIn``, which enforces the v2 rules the
algorithm depends on.  The stand-in's own rules are tested first, so that a
test passing here does not rest on a stand-in more lenient than the kernel.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pytest_isolation.linux.cgroups import (
    LEAF,
    SUBTREE,
    CgroupSet,
    Layout,
    Subtrees,
    discover,
    give_back,
    kill_cgroup,
)
from pytest_isolation.spec import Limits
from tests.cgroup_v2_standin import MOUNT, CgroupV2StandIn

MOUNTINFO = (
    "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
#: the runner, its shell, and an unrelated process elsewhere
RUNNER, SHELL, OTHER = 4242, 4000, 999
#: a systemd scope delegated to the user, as `systemd-run --user --scope -p Delegate=yes` makes
SCOPE = "/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope"


def delegated_host() -> CgroupV2StandIn:
    """A v2 host: the runner and its shell in a delegated scope, memory/pids/cpu/io given."""
    host = CgroupV2StandIn()
    host.make(SCOPE)
    host.delegate(SCOPE, "memory", "pids", "cpu", "io")
    host.spawn(SCOPE, RUNNER)
    host.spawn(SCOPE, SHELL)
    host.make("/system.slice")
    host.spawn("/system.slice", OTHER)
    return host


class Ledger:
    """What the algorithm records, in order, with the state of the host at that moment."""

    def __init__(self, host: CgroupV2StandIn) -> None:
        self.host = host
        self.records: list[tuple[str, str]] = []
        self.runner_was: list[str] = []

    def __call__(self, kind: str, identifier: str) -> None:
        self.records.append((kind, identifier))
        self.runner_was.append(self.host.where(RUNNER))


def layout_of(host: CgroupV2StandIn, *, euid: int = 1000) -> Layout:
    return discover(host, self_cgroup=host.self_cgroup(RUNNER), mountinfo=MOUNTINFO, euid=euid)


# --- the stand-in keeps the rules --------------------------------------------------------------


def test_stand_in_refuses_controllers_for_children_of_a_cgroup_with_processes() -> None:
    host = delegated_host()
    with pytest.raises(OSError, match="busy") as caught:
        host.write(MOUNT / SCOPE.lstrip("/") / "cgroup.subtree_control", "+memory")
    assert caught.value.errno == errno.EBUSY


def test_stand_in_refuses_processes_in_a_cgroup_with_controllers_for_children() -> None:
    host = delegated_host()
    scope = MOUNT / SCOPE.lstrip("/")
    host.mkdir(scope / "leaf")
    host.write(scope / "leaf" / "cgroup.procs", str(RUNNER))
    host.write(scope / "leaf" / "cgroup.procs", str(SHELL))
    host.write(scope / "cgroup.subtree_control", "+memory")
    with pytest.raises(OSError, match="busy") as caught:
        host.write(scope / "cgroup.procs", str(RUNNER))
    assert caught.value.errno == errno.EBUSY
    # a controller's files exist only where the parent enabled it
    assert host.exists(scope / "leaf" / "memory.max")
    assert not host.exists(scope / "leaf" / "pids.max")


def test_stand_in_refuses_a_controller_the_parent_did_not_give() -> None:
    host = delegated_host()
    scope = MOUNT / SCOPE.lstrip("/")
    host.mkdir(scope / "child")
    with pytest.raises(OSError, match="No such file") as caught:
        host.write(scope / "child" / "cgroup.subtree_control", "+memory")
    assert caught.value.errno == errno.ENOENT


# --- the algorithm -----------------------------------------------------------------------------


def test_delegated_v2_moves_the_runner_into_a_leaf_and_makes_environments_beside_it() -> None:
    """In a delegated scope with processes: leaf first (recorded before), controllers on,
    the subtree beside the leaf, the environment's cgroup in it with its limits."""
    host = delegated_host()
    layout = layout_of(host)
    assert sorted(layout.hierarchies) == ["cpu", "io", "memory", "pids"], layout.reasons
    memory = layout.hierarchies["memory"]
    assert (memory.version, memory.own, memory.base) == (2, SCOPE, SCOPE)
    record = Ledger(host)
    subtrees = Subtrees(layout, record, host)
    subtrees.prepare(["memory", "pids", "cpu", "io"])
    scope = MOUNT / SCOPE.lstrip("/")
    assert record.records == [
        ("cgroup-leaf", str(scope / LEAF)),
        ("cgroup-subtree", str(scope / SUBTREE)),
    ]
    assert record.runner_was[0] == SCOPE, "the move was recorded only after it happened"
    assert host.where(RUNNER) == host.where(SHELL) == f"{SCOPE}/{LEAF}"
    assert host.where(OTHER) == "/system.slice"
    assert host.read(scope / "cgroup.subtree_control").split() == ["cpu", "io", "memory", "pids"]
    cgroups = CgroupSet("pytest-isolation-env1", layout, ["memory", "pids", "cpu", "io"], host)
    assert cgroups.directories() == [scope / SUBTREE / "pytest-isolation-env1"]
    cgroups.create()
    limits = Limits.parse({"memory": "64M", "pids": 16, "cpus": 0.5, "io_weight": 300})
    cgroups.apply(limits)
    env = scope / SUBTREE / "pytest-isolation-env1"
    assert host.read(env / "memory.max") == str(64 << 20)
    assert host.read(env / "memory.swap.max") == "0"
    assert host.read(env / "pids.max") == "16"
    assert host.read(env / "cpu.max") == "50000 100000"
    assert cgroups.io_weight() == 300
    # a process of the environment can go there: no controllers for its children
    host.spawn("/system.slice", 5000)
    host.write(env / "cgroup.procs", "5000")
    assert host.where(5000) == f"{SCOPE}/{SUBTREE}/pytest-isolation-env1"


def test_preparing_twice_or_per_controller_moves_once() -> None:
    host = delegated_host()
    record = Ledger(host)
    subtrees = Subtrees(layout_of(host), record, host)
    subtrees.prepare(["pids"])
    subtrees.prepare(["pids", "memory"])
    assert [kind for kind, _ in record.records] == ["cgroup-leaf", "cgroup-subtree"]
    scope = MOUNT / SCOPE.lstrip("/")
    assert host.read(scope / SUBTREE / "cgroup.subtree_control").split() == ["memory", "pids"]


def test_giving_back_waits_for_the_last_environment_then_undoes_everything() -> None:
    """The processes go back, the controllers off, the leaf and the subtree gone, once no
    environment (of this or another run) uses the subtree."""
    host = delegated_host()
    layout = layout_of(host)
    Subtrees(layout, Ledger(host), host).prepare(["memory"])
    scope = MOUNT / SCOPE.lstrip("/")
    first = CgroupSet("pytest-isolation-a", layout, ["memory"], host)
    second = CgroupSet("pytest-isolation-b", layout, ["memory"], host)
    first.create()
    second.create()
    host.spawn(f"{SCOPE}/{SUBTREE}/pytest-isolation-b", 6000)
    kill_cgroup(first.directories()[0], fs=host)
    assert give_back(scope / LEAF, host) is False, "another environment still uses it"
    assert host.where(RUNNER) == f"{SCOPE}/{LEAF}"
    kill_cgroup(second.directories()[0], fs=host)
    assert 6000 in host.killed
    assert give_back(scope / LEAF, host) is True
    assert host.where(RUNNER) == host.where(SHELL) == SCOPE
    assert host.read(scope / "cgroup.subtree_control") == ""
    assert host.children(scope) == []


def test_a_runner_started_inside_the_leaf_belongs_to_the_cgroup_above_it() -> None:
    """A second run started from a shell already moved into the leaf places its subtree
    beside the leaf, not below it (no nesting run after run)."""
    host = delegated_host()
    Subtrees(layout_of(host), Ledger(host), host).prepare(["pids"])
    host.spawn(f"{SCOPE}/{LEAF}", 7000)
    layout = discover(host, self_cgroup=host.self_cgroup(7000), mountinfo=MOUNTINFO, euid=1000)
    pids = layout.hierarchies["pids"]
    assert pids.own == SCOPE and pids.subtree == MOUNT / SCOPE.lstrip("/") / SUBTREE
    Subtrees(layout, Ledger(host), host).prepare(["pids", "memory"])
    assert host.where(7000) == f"{SCOPE}/{LEAF}"


def test_root_in_the_root_cgroup_needs_no_leaf() -> None:
    """The root cgroup may hold processes and enable controllers: the subtree goes there."""
    host = CgroupV2StandIn()
    host.spawn("/", RUNNER)
    layout = layout_of(host, euid=0)
    assert layout.hierarchies["memory"].base == "/"
    record = Ledger(host)
    Subtrees(layout, record, host).prepare(["memory", "pids"])
    assert record.records == [("cgroup-subtree", str(MOUNT / SUBTREE))]
    assert host.where(RUNNER) == "/"
    assert host.read(MOUNT / SUBTREE / "cgroup.subtree_control").split() == ["memory", "pids"]


def test_root_whose_cgroup_lacks_a_controller_uses_the_root_of_the_tree() -> None:
    """Root in a cgroup the controller does not reach (a service's scope without
    Delegate=): the plugin's subtree at the root of the tree, as Docker does."""
    host = CgroupV2StandIn()
    host.make("/system.slice/ci.service")
    host.delegate("/system.slice/ci.service", "memory")
    host.spawn("/system.slice/ci.service", RUNNER)
    layout = layout_of(host, euid=0)
    pids = layout.hierarchies["pids"]
    assert pids.base == "/" and pids.subtree == MOUNT / SUBTREE
    Subtrees(layout, Ledger(host), host).prepare(["pids"])
    cgroups = CgroupSet("pytest-isolation-env", layout, ["pids"], host)
    cgroups.create()
    cgroups.apply(Limits.parse({"pids": 8}))
    assert host.read(MOUNT / SUBTREE / "pytest-isolation-env" / "pids.max") == "8"
    assert host.where(RUNNER) == "/system.slice/ci.service"


def test_not_delegated_and_not_root_is_unavailable_with_the_fix() -> None:
    host = CgroupV2StandIn()
    host.make(SCOPE, writable=False)
    host.delegate(SCOPE, "memory")
    host.spawn(SCOPE, RUNNER)
    layout = layout_of(host)
    assert "pids" not in layout.hierarchies
    reason = layout.reasons["pids"]
    assert "not delegated to this process's cgroup" in reason
    assert "systemd-run --user --scope -p Delegate=yes" in layout.fixes["pids"]
    assert "not writable by uid 1000" in layout.reasons["memory"]


def test_releasing_refuses_what_is_not_an_environments_cgroup() -> None:
    host = delegated_host()
    with pytest.raises(ValueError, match="not a cgroup in a pytest-isolation subtree"):
        kill_cgroup(MOUNT / "system.slice", fs=host)
    assert host.where(OTHER) == "/system.slice"
    with pytest.raises(ValueError, match="not the plugin's leaf"):
        give_back(MOUNT / "system.slice", host)


# --- the real kernel (v1 here) -----------------------------------------------------------------


def test_this_machine_places_every_controller_for_root() -> None:
    """On this machine, as root, every controller is usable, in a pytest-isolation subtree."""
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root")
    layout = discover()
    assert sorted(layout.hierarchies) == ["cpu", "io", "memory", "pids"], layout.reasons
    for hierarchy in layout.hierarchies.values():
        assert hierarchy.subtree.name == SUBTREE
        assert Path("/sys/fs/cgroup") in hierarchy.subtree.parents
