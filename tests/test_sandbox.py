"""The sandbox engine on a real kernel: namespaces, cgroup limits, the test body inside, rootless.

Nothing here is mocked.  Commands run through ``IsolationManager`` in real
namespaces under real cgroups, and their effects are checked from the host:
its ``/tmp``, its processes, its loopback listeners, its cgroup tree.  A
missing kernel feature fails the test with the engine's own explanation,
never skips it: the machines this suite runs on have them.

cgroup limits need the pids and cpu controllers delegated to this process (see
``.ci/run``); the memory controller is delegated by the machine.  The
rootless tests run pytest as uid 65534 with Debian's ``/usr/bin/python3`` and
a world-readable copy of the packages, since the development interpreter lives
under ``/root``.
"""

from __future__ import annotations

import ctypes
import fnmatch
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psutil
import pytest

from pytest_isolation import (
    CommandTimeout,
    ExecResult,
    IsolationManager,
    ResourceLimitExceeded,
)
from pytest_isolation.engines.sandbox import SandboxEnvironment
from tests.conftest import cli, wait_for
from tests.rootless import NOBODY, Rootless, assert_clean

if TYPE_CHECKING:
    from pytest_isolation.linux.cgroups import Controller

T = TypeVar("T")

#: Seconds to wait for something a child process does (start-up included).
PATIENCE = 30.0
#: Processes a sandboxed command may see in its /proc: init, the shepherds it keeps ready
#: and the command's own, a shell, what the shell runs.
HANDFUL = 6


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def manager() -> Iterator[IsolationManager]:
    """A manager with this test's private ledger and temp directory (set by the conftest)."""
    with IsolationManager() as made:
        yield made


def sandbox(manager: IsolationManager, **options: object) -> SandboxEnvironment:
    """A sandbox environment; an unavailable engine or controller fails with the reason."""
    env = manager.create(manager.spec("sandbox", **options))
    assert isinstance(env, SandboxEnvironment), env
    return env


def sh(env: SandboxEnvironment, script: str, cwd: str | None = None) -> ExecResult:
    return env.run(script, shell=True, timeout=PATIENCE, cwd=cwd)


def python(env: SandboxEnvironment, code: str, timeout: float = PATIENCE) -> ExecResult:
    return env.run([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def unique_sleep() -> str:
    """A ``sleep`` duration no other process on the host has on its command line."""
    return f"60.{secrets.randbelow(10**9):09d}"


def sleepers(duration: str) -> list[psutil.Process]:
    """Live host processes running ``sleep duration``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == ["sleep", duration] and not gone(process):
            found.append(process)
    return found


def cgroups_named(name: str) -> list[str]:
    """Every cgroup directory called ``name``, in any hierarchy."""
    return glob.glob(f"/sys/fs/cgroup/*/**/{name}", recursive=True)


def pids_of(directory: Path) -> list[int]:
    return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]


def numeric(listing: str) -> list[int]:
    return [int(entry) for entry in listing.split() if entry.isdigit()]


def mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def namespace(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def kernel_value(env: SandboxEnvironment, controller: Controller, v1: str, v2: str) -> str:
    """A file of the environment's cgroup for ``controller``, by its cgroup v1 or v2 name."""
    version = env.cgroups.layout.hierarchies[controller].version
    return (env.cgroups.paths[controller] / (v1 if version == 1 else v2)).read_text().strip()


@dataclass
class Listener:
    """A TCP listener on the host's 127.0.0.1."""

    sock: socket.socket

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def accepted(self, timeout: float) -> bytes | None:
        """What the first client sent, or None if no client came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            client, _ = self.sock.accept()
        except TimeoutError:
            return None
        with client:
            client.settimeout(PATIENCE)
            return client.recv(100)


@pytest.fixture
def listener() -> Iterator[Listener]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield Listener(sock)


CONNECT = """
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", {port}), timeout=5) as conn:
        conn.sendall(b"{token}")
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(1)
print("connected")
"""


# --- A. what a command sees -------------------------------------------------------------------


def test_a_command_gets_new_namespaces_of_every_kind(manager: IsolationManager) -> None:
    """A command gets new ipc, mnt, net, pid, uts and user namespaces, also as root: root
    inside is uid 65534 outside."""
    env = sandbox(manager)
    kinds = ["ipc", "mnt", "net", "pid", "uts", "user"]
    script = " ; ".join(f"readlink /proc/self/ns/{kind}" for kind in kinds)
    inside = sh(env, f"{script}; id -u; cat /proc/self/uid_map").check()
    lines = inside.stdout.split("\n")
    seen = dict(zip(kinds, lines, strict=False))
    for kind in kinds:
        assert seen[kind] != namespace(kind), f"the {kind} namespace is the host's"
    assert lines[len(kinds)] == "0"
    assert lines[len(kinds) + 1].split() == ["0", "65534", "1"]


def test_pid_namespace_hides_host_processes(manager: IsolationManager) -> None:
    """/proc shows a few processes; a host process can be neither seen nor killed from inside."""
    env = sandbox(manager)
    host = subprocess.Popen(["sleep", "60"])
    try:
        listing = sh(env, "echo $$; ls /proc").check().stdout.split()
        own, pids = int(listing[0]), numeric(" ".join(listing[1:]))
        # the sandbox's init, its shepherds (this command's, the next one's), the shell, ls
        assert 1 in pids and own in pids and len(pids) <= HANDFUL, listing
        assert len(numeric(" ".join(os.listdir("/proc")))) > HANDFUL  # the host has more
        probe = sh(env, f"test -e /proc/{host.pid} && echo visible; kill -KILL {host.pid}")
        assert "visible" not in probe.stdout
        assert probe.returncode != 0
        assert "No such process" in probe.stderr, probe.stderr
        time.sleep(0.1)  # a signal, had it been delivered, would have landed by now
        assert host.poll() is None, "the sandbox killed a host process"
    finally:
        host.kill()
        host.wait()


def test_network_namespace_has_only_loopback_and_it_is_up(manager: IsolationManager) -> None:
    """By default the only interface is lo, up and working, and there is no route."""
    env = sandbox(manager)
    devices = sh(env, "cat /proc/net/dev").check().stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    routes = sh(env, "cat /proc/net/route").check().stdout.splitlines()
    assert routes[1:] == [], routes  # the header alone
    report = python(
        env,
        """
        import fcntl, json, socket, struct
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen()
            client.connect(server.getsockname())
            request = struct.pack("16sH", b"lo", 0)
            flags = struct.unpack("16sH", fcntl.ioctl(client, 0x8913, request))[1]
        print(json.dumps({"names": [n for _, n in socket.if_nameindex()], "up": flags & 1}))
        """,
    ).check()
    seen = json.loads(report.stdout)
    assert seen == {"names": ["lo"], "up": 1}
    if shutil.which("ip"):
        links = sh(env, "ip -o link show").check().stdout.splitlines()
        assert len(links) == 1 and ": lo: <" in links[0] and ",UP" in links[0], links


def test_sysfs_shows_only_the_sandbox_network_devices(manager: IsolationManager) -> None:
    """/sys/class/net lists the sandbox's own interfaces, not the host's devices."""
    env = sandbox(manager)
    listed = sh(env, "cat /proc/net/dev; echo ---; ls /sys/class/net").check().stdout
    devices, names = listed.split("---\n")
    own = sorted(line.split(":")[0].strip() for line in devices.splitlines()[2:])
    shown = names.split()
    assert shown == own, f"/sys/class/net inside lists {shown}, the namespace has only {own}"


def test_host_loopback_is_out_of_reach_unless_network_is_true(
    manager: IsolationManager, listener: Listener
) -> None:
    """The host's 127.0.0.1 is out of reach by default, and reachable with network=True."""
    cut_off = sandbox(manager)
    token = secrets.token_hex(8)
    code = CONNECT.format(port=listener.port, token=token)
    refused = python(cut_off, code)
    assert refused.returncode == 1 and "ConnectionRefusedError" in refused.stdout, refused
    assert listener.accepted(timeout=0.2) is None
    connected = sandbox(manager, network=True)
    assert python(connected, code).check().stdout.strip() == "connected"
    assert listener.accepted(timeout=PATIENCE) == token.encode()
    net = sh(connected, "readlink /proc/self/ns/net").check().stdout.strip()
    assert net == namespace("net")


def test_hostname_is_sandbox_or_the_hostname_option(manager: IsolationManager) -> None:
    """The host name is "sandbox" or the ``hostname`` option; the host keeps its own."""
    before = socket.gethostname()
    assert sh(sandbox(manager), "uname -n").check().stdout.strip() == "sandbox"
    named = sandbox(manager, hostname="box-7")
    assert sh(named, "uname -n; cat /proc/sys/kernel/hostname").check().stdout.split() == [
        "box-7",
        "box-7",
    ]
    assert socket.gethostname() == before


def test_root_filesystem_is_read_only_by_default(manager: IsolationManager) -> None:
    """/etc, /usr and the host-writable /var/tmp are read-only unless readonly_root=False."""
    name = f"piso-{secrets.token_hex(6)}"
    targets = [Path(directory) / name for directory in ("/etc", "/usr", "/var/tmp")]
    try:  # should the protection fail, the host keeps nothing of it
        env = sandbox(manager)
        for target in targets:
            result = sh(env, f"echo x > {target}")
            assert result.returncode != 0
            assert "Read-only file system" in result.stderr, result.stderr
            assert not target.exists()
        sh(sandbox(manager, readonly_root=False), f"echo x > {targets[-1]}").check()
        assert targets[-1].read_text() == "x\n"
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_tmp_is_private_and_goes_with_the_environment(manager: IsolationManager) -> None:
    """/tmp is the environment's own, apart from the host's, and goes at teardown."""
    name = f"piso-{secrets.token_hex(6)}"
    host_file = Path("/tmp") / f"{name}-host"
    host_file.write_text("host")
    try:
        env = sandbox(manager)
        result = sh(env, f"echo inside > /tmp/{name}; test -e {host_file} && echo visible")
        assert "visible" not in result.stdout
        assert not (Path("/tmp") / name).exists()
        assert (env.tmp / name).read_text() == "inside\n"
        manager.destroy(env)
        assert not env.root.exists()
    finally:
        host_file.unlink()
        (Path("/tmp") / name).unlink(missing_ok=True)  # had the protection failed


def test_workspace_is_the_working_directory_and_shared_with_the_host(
    manager: IsolationManager,
) -> None:
    """Commands start in the workspace, at its host path, and share its files with the host."""
    env = sandbox(manager)
    assert env.path is not None
    env.write_file("sub/from-host.txt", "from the host")
    result = sh(env, "pwd; cat sub/from-host.txt; echo made > made.txt").check()
    assert result.stdout.splitlines() == [str(env.path), "from the host"]
    assert (env.path / "made.txt").read_text() == "made\n"
    assert sh(env, "pwd", cwd="sub").check().stdout.strip() == str(env.path / "sub")


def test_home_and_tmpdir_inside(manager: IsolationManager) -> None:
    """HOME is the environment's home at its host path, writable; TMPDIR is /tmp."""
    env = sandbox(manager)
    result = sh(env, 'echo "$HOME"; echo "$TMPDIR"; echo rc > "$HOME/.rc"').check()
    assert result.stdout.splitlines() == [str(env.home), "/tmp"]
    assert (env.home / ".rc").read_text() == "rc\n"
    assert python(env, "import tempfile; print(tempfile.gettempdir())").check().stdout == "/tmp\n"


def test_mounts_option_binds_read_only_and_read_write(
    manager: IsolationManager, tmp_path: Path
) -> None:
    """``mounts`` binds read-only by default, read-write on request, also under /tmp."""
    ro, rw, mapped = (tmp_path / name for name in ("ro", "rw", "mapped"))
    for directory in (ro, rw, mapped):
        directory.mkdir()
    (ro / "data.txt").write_text("data")
    env = sandbox(
        manager,
        mounts=[
            f"{ro}:/srv",
            f"{ro}:/tmp/ro-data",
            f"{rw}:/tmp/rw-data:rw",
            {"source": str(mapped), "target": "/tmp/mapped", "readonly": False},
        ],
    )
    assert sh(env, "cat /srv/data.txt /tmp/ro-data/data.txt").check().stdout == "datadata"
    for target in ("/srv", "/tmp/ro-data"):
        refused = sh(env, f"echo x > {target}/new.txt")
        assert "Read-only file system" in refused.stderr, (target, refused)
    sh(env, "echo w > /tmp/rw-data/w.txt; echo m > /tmp/mapped/m.txt").check()
    assert (rw / "w.txt").read_text() == "w\n"
    assert (mapped / "m.txt").read_text() == "m\n"
    assert sorted(os.listdir(ro)) == ["data.txt"]


def test_mounts_through_the_marker_of_shared_and_repeated_environments(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """``mounts`` given in the marker works for a module-scoped environment and for many
    function-scoped ones (whose specs are compared and prepared ahead)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "seen.txt").write_text("seen")
    pytester.makepyfile(
        f"""
        import pytest

        SHARED = pytest.mark.isolated("sandbox", scope="module", mounts=["{data}:/srv"])
        EACH = pytest.mark.isolated("sandbox", mounts=[{{"source": "{data}", "target": "/srv"}}])

        @SHARED
        def test_shared_1(isolated_env):
            assert isolated_env.run(["cat", "/srv/seen.txt"]).check().stdout == "seen"

        @SHARED
        def test_shared_2(isolated_env):
            assert isolated_env.run(["cat", "/srv/seen.txt"]).check().stdout == "seen"

        @pytest.mark.parametrize("n", range(4))
        @EACH
        def test_each(isolated_env, n):
            assert isolated_env.run(["cat", "/srv/seen.txt"]).check().stdout == "seen"
        """
    )
    pytester.runpytest("--isolation-require=sandbox").assert_outcomes(passed=6)


def test_ipc_namespace_hides_host_sysv_segments(manager: IsolationManager) -> None:
    """A SysV shared memory segment of the host is not listed inside."""
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_private, ipc_creat, ipc_rmid = 0, 0o1000, 0
    shmid = libc.shmget(ipc_private, 4096, ipc_creat | 0o600)
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:

        def ids(table: str) -> list[int]:
            return [int(line.split()[1]) for line in table.splitlines()[1:] if line.strip()]

        assert shmid in ids(Path("/proc/sysvipc/shm").read_text())
        inside = ids(sh(sandbox(manager), "cat /proc/sysvipc/shm").check().stdout)
        assert inside == []
    finally:
        libc.shmctl(shmid, ipc_rmid, None)


SHARED_MEMORY = """
import multiprocessing, os
from multiprocessing import shared_memory

lock = multiprocessing.Lock()  # a POSIX semaphore, made in /dev/shm
with lock:
    block = shared_memory.SharedMemory(name="{name}", create=True, size=4096)
    seen = sorted(os.listdir("/dev/shm"))
    block.close()
    block.unlink()
print(" ".join(seen))
"""


def test_dev_shm_is_private_and_writable(manager: IsolationManager) -> None:
    """POSIX semaphores and shared memory work inside, in a /dev/shm apart from the host's."""
    name = f"piso-{secrets.token_hex(6)}"
    host_segment = Path("/dev/shm") / f"{name}-host"
    host_segment.write_text("host")
    try:
        result = python(sandbox(manager), SHARED_MEMORY.format(name=name))
        assert result.returncode == 0, result.stderr
        seen = result.stdout.split()
        assert name in seen and host_segment.name not in seen, seen
        assert not (Path("/dev/shm") / name).exists()
    finally:
        host_segment.unlink()


# --- B. limits --------------------------------------------------------------------------------


MEMORY_BOMB = """
import sys
blocks, size = [], 1 << 20
for _ in range(512):  # 512M at most, should the limit be gone
    blocks.append(b"x" * size)
print("survived")
"""


def test_memory_limit_stops_a_memory_bomb(manager: IsolationManager) -> None:
    """A memory bomb is OOM-killed: ResourceLimitExceeded("memory") with the measured peak."""
    env = sandbox(manager, limits={"memory": "64M"})
    limit = 64 * 1024 * 1024
    assert kernel_value(env, "memory", "memory.limit_in_bytes", "memory.max") == str(limit)
    python(env, "b = b'x' * (16 << 20)").check()
    with pytest.raises(ResourceLimitExceeded) as caught:
        python(env, MEMORY_BOMB)
    assert caught.value.limit == "memory"
    measured = caught.value.measured
    assert isinstance(measured, int) and limit // 2 < measured <= limit, measured
    assert "out-of-memory killer" in str(caught.value) and "64.0M" in str(caught.value)
    python(env, "print('still usable')").check()


FORK_BOMB = """
import os, time
made = 0
try:
    for _ in range(200):  # bounded, should the limit be gone
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
finally:
    with open("forked.txt", "w") as out:
        out.write(str(made))
"""


def test_pids_limit_contains_a_fork_bomb(manager: IsolationManager) -> None:
    """A fork bomb stays under limits.pids: ResourceLimitExceeded("pids"), nothing left."""
    env = sandbox(manager, limits={"pids": 32})
    assert env.path is not None
    pids_dir = env.cgroups.paths["pids"]
    assert (pids_dir / "pids.max").read_text().strip() == "32"
    with pytest.raises(ResourceLimitExceeded) as caught:
        python(env, FORK_BOMB)
    assert caught.value.limit == "pids"
    assert isinstance(caught.value.measured, int) and caught.value.measured >= 1
    made = int((env.path / "forked.txt").read_text())
    assert 0 < made < 32, made
    # what is left in the environment's cgroup is its init and the shepherd it keeps ready
    init = env.sandbox.init

    def only_the_sandbox_itself() -> bool:
        left = set(pids_of(pids_dir)) - {init}
        return len(left) <= 1 and all(psutil.Process(pid).ppid() == init for pid in left)

    wait_for(only_the_sandbox_itself, "the fork bomb's processes to be gone")
    subprocess.run(["true"], check=True)


CPU_BURN = """
import json, os, resource, time
start = time.monotonic()
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass
        os._exit(0)
    workers.append(pid)
for pid in workers:
    os.waitpid(pid, 0)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime, "wall": time.monotonic() - start}))
"""


def test_cpus_limit_sets_the_quota_and_throttles_a_busy_loop(manager: IsolationManager) -> None:
    """limits.cpus=0.5 sets a 50/100ms CFS quota that holds busy loops to half a CPU."""
    env = sandbox(manager, limits={"cpus": 0.5})
    quota = kernel_value(env, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0]
    period = kernel_value(env, "cpu", "cpu.cfs_period_us", "cpu.max").split()[-1]
    assert (quota, period) == ("50000", "100000")
    measured = json.loads(python(env, CPU_BURN).check().stdout)
    ratio = measured["cpu"] / measured["wall"]
    # Unthrottled, two busy processes on this 2-core machine get close to 2 CPUs; the low
    # bound leaves room for other load on the machine.
    assert 0.2 < ratio < 0.8, measured
    throttling = kernel_value(env, "cpu", "cpu.stat", "cpu.stat").splitlines()
    stat = dict(line.split() for line in throttling)
    assert int(stat["nr_throttled"]) > 0, stat


def test_io_weight_is_set_in_the_environments_cgroup(manager: IsolationManager) -> None:
    """limits.io_weight reaches the kernel's proportional I/O weight of the environment's
    cgroup (blkio.bfq.weight here), which holds its processes."""
    env = sandbox(manager, limits={"io_weight": 300})
    assert env.cgroups.io_weight() == 300
    io = env.cgroups.paths["io"]
    assert io.parent.name == "pytest-isolation"
    assert env.sandbox.init in pids_of(io)
    sh(env, "dd if=/dev/zero of=data bs=64k count=16 status=none").check()


def test_disk_limit_caps_what_the_environment_writes(manager: IsolationManager) -> None:
    """limits.disk caps the workspace, HOME and /tmp together: past it, writes fail with
    ENOSPC and the command raises ResourceLimitExceeded("disk"); the mount goes at teardown."""
    env = sandbox(manager, limits={"disk": "8M"})
    assert env.path is not None
    sh(env, 'head -c 3M /dev/zero > a; head -c 3M /dev/zero > "$HOME/b"').check()
    with pytest.raises(ResourceLimitExceeded) as caught:
        sh(env, "head -c 3M /dev/zero > /tmp/c")
    assert caught.value.limit == "disk"
    assert "disk limit of 8.0M" in str(caught.value)
    assert (env.path / "a").stat().st_size == 3 << 20
    sh(env, "rm /tmp/c; head -c 1M /dev/zero > d").check()  # room again once freed
    assert str(env.root) in mount_points()
    manager.destroy(env)
    assert str(env.root) not in mount_points()
    assert not env.root.exists()


def test_timeout_kills_the_whole_tree(manager: IsolationManager) -> None:
    """A timeout raises CommandTimeout and kills a grandchild that left the command's session."""
    env = sandbox(manager)
    duration = unique_sleep()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            env.run(["sh", "-c", f"setsid sleep {duration} & echo started; sleep 60"], timeout=2)
        except BaseException as exc:
            raised.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    try:
        grandchild = wait_for(lambda: sleepers(duration), "the background grandchild")[0]
    finally:
        thread.join(PATIENCE)
    assert time.monotonic() - started < 10
    assert len(raised) == 1 and isinstance(raised[0], CommandTimeout), raised
    assert "started" in raised[0].stdout
    wait_for(lambda: gone(grandchild), f"the grandchild {grandchild.pid} to be killed", 5)
    for directory in env.cgroups.directories():
        assert pids_of(directory) == [], directory


def test_teardown_kills_everything_in_the_cgroups_and_removes_them(
    manager: IsolationManager,
) -> None:
    """Teardown kills whatever is in the environment's cgroups and removes them all."""
    env = sandbox(manager, limits={"memory": "128M", "pids": 64, "cpus": 1})
    name = env.root.name
    assert sorted(env.cgroups.paths) == ["cpu", "memory", "pids"]
    made = sorted(str(d) for d in env.cgroups.directories())
    assert made and sorted(cgroups_named(name)) == made, made
    duration = unique_sleep()
    # the command returns at once; its background child may not outlive it
    sh(env, f"setsid sleep {duration} > /dev/null 2>&1 &").check()
    wait_for(lambda: not sleepers(duration), "the background child to be killed", 5)
    # something that joined the environment's cgroups later is killed at teardown
    straggler = subprocess.Popen(["sleep", "60"])
    try:
        for directory in env.cgroups.directories():
            (directory / "cgroup.procs").write_text(str(straggler.pid))
        manager.destroy(env)
        assert straggler.wait(timeout=5) == -signal.SIGKILL
    finally:
        straggler.kill()
        straggler.wait()
    assert cgroups_named(name) == []
    assert not env.root.exists()
    assert [r for r in manager.ledger.records() if r.env_id == env.id] == []


LIMITED = """
import os
import pytest

@pytest.mark.isolated("sandbox", limits={"pids": 16, "cpus": 0.5, "memory": "128M"})
def test_limited(isolated_env):
    isolated_env.run("true").check()
    with open("cgroups.txt", "w") as out:
        out.write("\\n".join(str(d) for d in isolated_env.cgroups.directories()))

@pytest.mark.isolated("sandbox", inside=True, limits={"pids": 16, "io_weight": 300})
def test_limited_inside():
    assert os.getpid() > 1
"""

#: Starts a command in the root cgroup of the pids and cpu hierarchies, as a root shell is.
AT_HIERARCHY_ROOTS = (
    "echo $$ > /sys/fs/cgroup/pids/cgroup.procs && echo $$ > /sys/fs/cgroup/cpu/cgroup.procs "
    '&& exec "$@"'
)


def test_limits_work_for_root_whose_cgroups_are_hierarchy_roots(pytester: pytest.Pytester) -> None:
    """As root in the root cgroup of a hierarchy (nothing delegated), the limits still work:
    the plugin makes its own subtree there, and nothing of it is left after the run."""
    pytester.makepyfile(LIMITED)
    result = pytester.run(
        "sh",
        "-c",
        AT_HIERARCHY_ROOTS,
        "sh",
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--isolation-require=sandbox",
        timeout=PATIENCE,
    )
    result.assert_outcomes(passed=2)
    made = (pytester.path / "cgroups.txt").read_text().split()
    assert {Path(d).parent.name for d in made} == {"pytest-isolation"}, made
    assert {"/sys/fs/cgroup/pids/pytest-isolation", "/sys/fs/cgroup/cpu/pytest-isolation"} <= {
        str(Path(d).parent) for d in made
    }
    assert [d for d in made if os.path.exists(d)] == []


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ('limits={"swap": "1G"}', "*test_it*unknown limit 'swap'; allowed limits:*"),
        (
            'limits={"io_weight": 50}',
            "*test_it*limits.io_weight: io_weight must be from 100 to 1000*",
        ),
        (
            'mounts=["/no/such/source:/srv"]',
            "*test_it*option 'mounts'*mount source /no/such/source does not exist*",
        ),
        (
            'mounts=["/srv:relative/target"]',
            "*test_it*option 'mounts'*mount target 'relative/target' must be an absolute path*",
        ),
        (
            'mounts=["/srv:/no/such/target"]',
            "*test_it*option 'mounts'*/no/such/target does not exist on this machine*",
        ),
        ('scope="module", inside=True', "*test_it*inside=True*scope must be 'function'*"),
    ],
    ids=[
        "unknown-limit",
        "io-weight",
        "no-source",
        "relative-target",
        "no-target",
        "module-inside",
    ],
)
def test_bad_sandbox_options_are_collection_errors(
    pytester: pytest.Pytester, marker: str, expected: str
) -> None:
    """Options the sandbox cannot honour fail at collection, naming the option."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("sandbox", {marker})
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting*", expected])


# --- C. the test body inside ------------------------------------------------------------------


#: Records, from the runner (on the host), every path an environment of the run made.
RECORD_ENVIRONMENTS = """
from pathlib import Path

HERE = Path(__file__).parent

def pytest_isolation_env_created(env):
    with (HERE / "roots.txt").open("a") as roots:
        roots.write(f"{env.root}\\n")
    with (HERE / "cgroups.txt").open("a") as cgroups:
        cgroups.write("".join(f"{path}\\n" for path in env.cgroups.directories()))
"""


def assert_nothing_left(pytester: pytest.Pytester, environments: int, cgroups: int = 0) -> None:
    """The environments' folders and cgroups that the inner run recorded are all gone.

    Environments have cgroups only for the limits they ask for (``cgroups`` of them in all):
    without limits the PID namespace alone takes everything inside down with its init.
    """
    roots = (pytester.path / "roots.txt").read_text().split()
    made = (pytester.path / "cgroups.txt").read_text().split()
    assert len(roots) == environments, roots
    assert len(made) == cgroups, made
    assert [path for path in roots + made if os.path.exists(path)] == []


OUTCOMES = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_pass():
    print("captured on the way")

def test_fail():
    left, right = 3, 4
    assert left == right

def test_skip():
    pytest.skip("not today")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert 1 == 2

def test_error(broken):
    pass
"""


def report_lines(result: pytest.RunResult) -> list[str]:
    prefixes = (">", "E ", "PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS", "test_")
    return [line for line in result.stdout.lines if line.startswith(prefixes)]


def test_inside_reports_exactly_as_in_process(pytester: pytest.Pytester) -> None:
    """Tests run inside report outcomes, messages and output exactly as in-process."""
    pytester.makepyfile(test_outcomes=OUTCOMES)
    pytester.makeconftest(RECORD_ENVIRONMENTS)
    here = pytester.runpytest("-rA")
    inside = pytester.runpytest("-rA", "--isolation=sandbox", "--isolation-inside")
    for result in (here, inside):
        result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    assert report_lines(inside) == report_lines(here)
    inside.stdout.fnmatch_lines(["E       assert 3 == 4", "*captured on the way*"])
    assert_nothing_left(pytester, environments=5)


WHERE_AM_I = """
import os, socket

def test_pid_is_small():
    assert os.getpid() < 10

def test_hostname():
    assert socket.gethostname() == "sandbox"

def test_only_loopback():
    with open("/proc/net/dev") as dev:
        assert [line.split(":")[0].strip() for line in dev.readlines()[2:]] == ["lo"]

def test_root_is_read_only():
    try:
        open("/var/tmp/piso-inside-probe", "w").close()
    except OSError as exc:
        assert exc.errno == 30  # EROFS
    else:
        os.remove("/var/tmp/piso-inside-probe")
        raise AssertionError("/var/tmp is writable")
"""


def test_isolation_inside_runs_a_whole_file_inside(pytester: pytest.Pytester) -> None:
    """--isolation=sandbox --isolation-inside runs unmarked tests inside a sandbox each."""
    pytester.makepyfile(test_where=WHERE_AM_I)
    pytester.makeconftest(RECORD_ENVIRONMENTS)
    pytester.runpytest().assert_outcomes(failed=4)
    inside = pytester.runpytest("--isolation=sandbox", "--isolation-inside")
    inside.assert_outcomes(passed=4)
    inside.stdout.fnmatch_lines(["*4 environment(s) (sandbox: 4)*"])
    assert_nothing_left(pytester, environments=4)


def test_isolation_inside_with_basic_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """--isolation-inside with an engine that cannot host a test body stops the run."""
    pytester.makepyfile("def test_it(): pass")
    result = pytester.runpytest("--isolation-inside")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*--isolation-inside runs test bodies inside environments, which the 'basic' engine "
            "cannot host; choose --isolation=sandbox*"
        ]
    )


def test_inside_marker_pid_tmp_path_and_captured_output(pytester: pytest.Pytester) -> None:
    """A marked test runs as a small pid, can use tmp_path, and its output shows with -rP."""
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.isolated("sandbox", inside=True)
        def test_inside(tmp_path):
            (tmp_path / "note.txt").write_text("noted")
            assert (tmp_path / "note.txt").read_text() == "noted"
            print(f"INSIDE-PID={os.getpid()}")
            assert os.getpid() < 10

        def test_host():
            assert os.getpid() > 10
        """
    )
    result = pytester.runpytest("-rP")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*Captured stdout call*", "INSIDE-PID=[0-9]"])


def test_inside_segfault_fails_and_the_run_goes_on(pytester: pytest.Pytester) -> None:
    """A test that segfaults inside fails naming SIGSEGV, and the next test runs."""
    pytester.makepyfile(
        """
        import ctypes
        import pytest

        @pytest.mark.isolated("sandbox", inside=True)
        def test_crash():
            ctypes.string_at(0)

        @pytest.mark.isolated("sandbox", inside=True)
        def test_next():
            pass
        """
    )
    pytester.makeconftest(RECORD_ENVIRONMENTS)
    result = pytester.runpytest("-p", "no:faulthandler")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["*test_crash*", "*the test process crashed: killed by SIGSEGV (11)*"]
    )
    assert_nothing_left(pytester, environments=2)


def test_inside_out_of_memory_fails_naming_the_limit(pytester: pytest.Pytester) -> None:
    """A test OOM-killed inside fails saying so, with the memory limit."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("sandbox", inside=True, limits={{"memory": "64M"}})
        def test_bomb():
            exec({MEMORY_BOMB!r})
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the test process was killed by the out-of-memory killer: the memory limit of 64.0M "
            "was reached (peak *M)*"
        ]
    )


def test_inside_timeout_fails_and_kills_what_the_test_started(pytester: pytest.Pytester) -> None:
    """A test past its timeout fails as timed out, and its background process dies."""
    duration = unique_sleep()
    pytester.makepyfile(
        f"""
        import subprocess, time
        import pytest

        @pytest.mark.isolated("sandbox", inside=True, limits={{"timeout": 1}})
        def test_slow():
            subprocess.run(["sh", "-c", "setsid sleep {duration} >/dev/null 2>&1 &"], check=True)
            time.sleep(60)
        """
    )
    started = time.monotonic()
    result = pytester.runpytest()
    assert time.monotonic() - started < 15
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*the test timed out after 1s and was killed with everything it started*"]
    )
    wait_for(lambda: not sleepers(duration), "the test's background process to be killed", 5)


def test_inside_leaves_no_process_behind(pytester: pytest.Pytester) -> None:
    """A background process left by a passing inside test does not outlive it."""
    duration = unique_sleep()
    pytester.makepyfile(
        f"""
        import subprocess
        import pytest

        @pytest.mark.isolated("sandbox", inside=True)
        def test_daemon():
            subprocess.run(["sh", "-c", "setsid sleep {duration} >/dev/null 2>&1 &"], check=True)
        """
    )
    pytester.makeconftest(RECORD_ENVIRONMENTS)
    pytester.runpytest().assert_outcomes(passed=1)
    wait_for(lambda: not sleepers(duration), "the test's background process to be killed", 5)
    assert_nothing_left(pytester, environments=1)


def test_inside_results_reach_junitxml(pytester: pytest.Pytester) -> None:
    """--junitxml records the outcomes and messages of tests run inside."""
    pytester.makepyfile(
        test_junit="""
        import os
        import pytest

        pytestmark = pytest.mark.isolated("sandbox", inside=True)

        def test_good():
            assert os.getpid() < 10

        def test_bad():
            left, right = 3, 4
            assert left == right
        """
    )
    pytester.runpytest("--junitxml=report.xml").assert_outcomes(passed=1, failed=1)
    suite = ET.parse(pytester.path / "report.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["test_good"].find("failure") is None
    failure = cases["test_bad"].find("failure")
    assert failure is not None and "assert 3 == 4" in (failure.get("message") or ""), failure


def test_inside_with_xdist(pytester: pytest.Pytester) -> None:
    """Inside mode works in xdist workers, and leaves nothing behind."""
    pytester.makepyfile(test_where=WHERE_AM_I)
    pytester.makeconftest(RECORD_ENVIRONMENTS)
    result = pytester.runpytest("-n", "2", "--isolation=sandbox", "--isolation-inside")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 environment(s) (sandbox: 4)*"])
    assert_nothing_left(pytester, environments=4)


# --- D. rootless ------------------------------------------------------------------------------


ROOTLESS_COMMANDS = f"""
import os
import pytest

def test_really_unprivileged():
    assert (os.getuid(), os.geteuid(), os.getgid()) == ({NOBODY}, {NOBODY}, {NOBODY})
    assert os.getgroups() == []

@pytest.mark.isolated("sandbox")
def test_command_in_namespaces(isolated_env):
    assert isolated_env.config.rootless
    out = isolated_env.run("id -u; echo $$; ls /proc", shell=True).check().stdout.split()
    uid, own, pids = out[0], int(out[1]), [int(e) for e in out[2:] if e.isdigit()]
    assert uid == "0"  # nobody outside, root of its own user namespace inside
    assert own in pids and 1 in pids and len(pids) <= {HANDFUL}, out
    host_ns = os.readlink("/proc/self/ns/user")
    inside_ns = isolated_env.run("readlink /proc/self/ns/user").check().stdout.strip()
    assert inside_ns != host_ns

@pytest.mark.isolated("sandbox")
def test_only_loopback(isolated_env):
    dev = isolated_env.run("cat /proc/net/dev").check().stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in dev] == ["lo"]
    assert isolated_env.run("cat /proc/net/route").check().stdout.splitlines()[1:] == []

@pytest.mark.isolated("sandbox")
def test_read_only_root_writable_workspace(isolated_env):
    probe = "/var/tmp/piso-rootless-probe"
    try:
        refused = isolated_env.run(["sh", "-c", f"echo x > {{probe}}"])
        assert "Read-only file system" in refused.stderr, refused
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    isolated_env.run("sh -c 'echo made > made.txt'").check()
    made = isolated_env.path / "made.txt"
    assert made.read_text() == "made\\n" and made.stat().st_uid == {NOBODY}
"""


def test_rootless_commands_run_in_user_namespaces(rootless: Rootless) -> None:
    """As uid 65534: own pids, loopback only, read-only root, a workspace of its own."""
    result, work = rootless.run("commands", ROOTLESS_COMMANDS, "--isolation-require=sandbox")
    assert result.ret == 0, "\n".join(result.outlines + result.errlines)
    result.assert_outcomes(passed=4)
    assert_clean(work)


ROOTLESS_INSIDE = """
import os
import socket
import pytest


@pytest.mark.isolated("sandbox", inside=True)
def test_inside_passes():
    assert os.getpid() < 10 and socket.gethostname() == "sandbox"

@pytest.mark.isolated("sandbox", inside=True)
def test_inside_fails():
    left, right = 3, 4
    assert left == right

@pytest.mark.isolated("sandbox", limits={"memory": "64M"})
def test_memory_limited(isolated_env):
    pass

@pytest.mark.isolated("sandbox", limits={"pids": 16})
def test_pids_limited(isolated_env):
    pass
"""


def test_rootless_inside_mode_and_unavailable_limits(rootless: Rootless) -> None:
    """As uid 65534: inside mode works; limits without a delegated cgroup skip, naming the
    controller and the fix, or fail where the run requires the engine; never ignored."""
    result, work = rootless.run("inside", ROOTLESS_INSIDE, "-rs")
    result.assert_outcomes(passed=1, failed=1, skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "E       assert 3 == 4",
            "*the memory limit needs the memory cgroup controller: this process's cgroup at "
            "/sys/fs/cgroup/memory is /sys/fs/cgroup/memory/*, not writable, and it is not "
            "root: nothing there is delegated to it; run as root, or have a cgroup delegated*",
            "*the pids limit needs the pids cgroup controller: this process's cgroup at "
            "/sys/fs/cgroup/pids is the root of the hierarchy*",
        ]
    )
    assert_clean(work)
    required, work = rootless.run("required", ROOTLESS_INSIDE, "--isolation-require=sandbox")
    required.assert_outcomes(passed=1, failed=1, errors=2)
    required.stdout.fnmatch_lines(["*the pids limit needs the pids cgroup controller*required*"])
    assert_clean(work)


def test_doctor_says_for_each_limit_whether_it_works_here_and_the_fix(rootless: Rootless) -> None:
    """doctor, as root: every limit works, in the plugin's subtrees; as nobody: the cgroup
    limits are unavailable with the reason and the fix, the others work."""
    as_root = cli("doctor")
    assert as_root.returncode == 0, as_root.stderr
    lines = as_root.stdout.splitlines()
    for limit, controller in (("cpus", "cpu"), ("pids", "pids"), ("io_weight", "blkio")):
        expected = (
            f"*limit {limit}: works (cgroup v1, under /sys/fs/cgroup/{controller}/pytest-isolation*"
        )
        assert fnmatch.filter(lines, expected), (expected, lines)
    for limit in ("disk", "memory", "network", "timeout"):
        assert fnmatch.filter(lines, f"*limit {limit}: works (*"), (limit, lines)
    assert fnmatch.filter(lines, "*seccomp filter: * system calls*denied*")
    work = rootless.folder("doctor")
    as_nobody = rootless.python(work, "-m", "pytest_isolation", "doctor")
    assert as_nobody.ret == 0, as_nobody.errlines
    as_nobody.stdout.fnmatch_lines_random(
        [
            "*[[]ok[]] sandbox: available (rootless)*",
            "*limit pids: unavailable: the pids limit needs the pids cgroup controller: this "
            "process's cgroup at /sys/fs/cgroup/pids is the root of the hierarchy, and it is not "
            "root: nothing there is delegated to it; fix: run as root, or have a cgroup "
            "delegated*",
            "*limit disk: unavailable: the disk limit is a size-limited tmpfs*needs root; fix: *",
            "*limit network: works*",
            "*limit timeout: works*",
        ]
    )
