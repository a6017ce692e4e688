"""The sandbox as a security boundary: every escape we know of, tried as an attacker would.

Each attack runs inside a sandbox the way users' code runs there: through
``isolated_env.run()`` and in a test body with ``inside=True``, by a pytest run
as root and by one as uid 65534 (rootless, through user namespaces).  What
decides is the host, checked from outside after the run: the files the attacks
try to write are not there, the host's listening sockets accepted nothing, no
container appeared, the host's kernel settings are what they were, and no
secret of the runner came back.  The attacks' own assertions (the kernel's
error for each step) come on top.

The attacks are the ones found against this sandbox (the issue's list) and the
classics of the bubblewrap, nsjail and container trackers: remounting the
read-only root, unmounting the private /tmp, the host's Docker socket, a
cgroup v1 ``release_agent``, the runner's environment in /proc, links planted
for the runner's file helpers, TIOCSTI into the terminal, new user namespaces,
ptrace of init, keyrings, BPF and friends, raw devices, ``core_pattern``,
leaked descriptors, the host's Unix sockets (named and abstract).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_isolation import IsolationManager
from pytest_isolation.beneath import OutsideWorkspace
from tests.conftest import need_engine
from tests.rootless import Rootless, assert_clean

#: Seconds a whole run of the attacks may take.
PATIENCE = 120.0
#: The runner's secret, in the environment of every run below.
SECRET_NAME = "AWS_SECRET_ACCESS_KEY"

#: The attacks, run by pytest inside the sandbox.  Placeholders: {token} (unique per run),
#: {project} (the run's directory), {socket} (a host Unix socket), {victim} (a host file).
ATTACKS = r'''
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from pytest_isolation.beneath import OutsideWorkspace

TOKEN = "{token}"
MARK = "piso-escape-" + TOKEN
PROJECT = "{project}"
SOCKET = "{socket}"
VICTIM = "{victim}"
SANDBOX = pytest.mark.isolated("sandbox")
INSIDE = pytest.mark.isolated("sandbox", inside=True)

REMOUNT = f"""
mount -o remount,rw,bind / ; mount -o remount,rw / ; mount -o remount,rw,bind /etc
touch /etc/{{MARK}}-etc ; echo written > /usr/{{MARK}}-usr
umount -l /tmp ; umount /tmp ; mount -t tmpfs tmpfs /var/tmp
touch /tmp/{{MARK}}-tmp /var/tmp/{{MARK}}-vartmp
mount -o remount,rw,bind {{PROJECT}} ; touch {{PROJECT}}/{{MARK}}-project
exit 0
"""

RELEASE_AGENT = f"""
agent=$PWD/agent.sh
printf '#!/bin/sh\\ntouch /var/tmp/{{MARK}}-agent\\n' > "$agent" && chmod +x "$agent"
mkdir -p /tmp/cg-{{TOKEN}}
mount -t cgroup -o none,name=piso-{{TOKEN}} cgroup /tmp/cg-{{TOKEN}} && {{{{
    echo 1 > /tmp/cg-{{TOKEN}}/notify_on_release
    echo "$agent" > /tmp/cg-{{TOKEN}}/release_agent
    mkdir /tmp/cg-{{TOKEN}}/x && sh -c 'echo $$ > /tmp/cg-{{TOKEN}}/x/cgroup.procs'
    echo MOUNTED
}}}}
exit 0
"""

SECRETS = """
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do cat "$f" 2>/dev/null; echo; done
python3 -c 'open("/proc/1/mem", "rb").read(1)' 2>&1
"""

CORE_PATTERN = f"""
echo '|/bin/touch /var/tmp/{{MARK}}-core' > /proc/sys/kernel/core_pattern
echo /var/tmp/{{MARK}}-poweroff > /proc/sys/kernel/poweroff_cmd
exit 0
"""

DOCKER = f"""
import json, socket
body = json.dumps({{{{"Image": "scratch", "Cmd": ["true"]}}}}).encode()
request = (
    b"POST /containers/create?name={{MARK}}-docker HTTP/1.0\\r\\n"
    b"Content-Type: application/json\\r\\nContent-Length: " + str(len(body)).encode()
    + b"\\r\\n\\r\\n" + body
)
for path in ("/var/run/docker.sock", "/run/docker.sock"):
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            client.sendall(request)
            print("ANSWERED", client.recv(200))
    except OSError as exc:
        print(path, type(exc).__name__, exc.errno)
"""

UNIX_SOCKETS = f"""
import socket
for address in ({{SOCKET!r}}, "\\0" + {{MARK!r}}):
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(address)
            client.sendall(b"escaped")
            print("CONNECTED", repr(address))
    except OSError as exc:
        print(repr(address), type(exc).__name__)
"""

#: The checks of the process's own powers, in plain Python: run by a command and in a body.
CHECKS = """
import ctypes, errno, os

#: system calls that must fail with EPERM inside, with arguments (x86_64 numbers)
FORBIDDEN = {{
    "keyctl": (250, 0),
    "add_key": (248, 0),
    "bpf": (321, 0),
    "perf_event_open": (298, 0),
    "kexec_load": (246, 0),
    "init_module": (175, 0),
    "userfaultfd": (323, 0),
    "io_uring_setup": (425, 0),
    "open_by_handle_at": (304, 0),
    "setns": (308, 0),
    "unshare": (272, 0x10000000),
    "mount": (165, 0),
    "pivot_root": (155, 0),
    "chroot": (161, 0),
}}


def check_privileges():
    lines = open("/proc/self/status").read().splitlines()
    status = {{k: v.strip() for k, _, v in (line.partition(":") for line in lines)}}
    assert status["CapEff"] == status["CapBnd"] == "0" * 16, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status


def check_system_calls():
    libc = ctypes.CDLL(None, use_errno=True)
    for name, (number, first) in FORBIDDEN.items():
        assert libc.syscall(number, first, 0, 0, 0, 0) == -1, name
        assert ctypes.get_errno() == errno.EPERM, (name, os.strerror(ctypes.get_errno()))
    assert libc.syscall(435, 0, 0) == -1 and ctypes.get_errno() == errno.ENOSYS  # clone3
    for request in (0x5412, 0x541C):  # TIOCSTI, TIOCLINUX
        assert libc.ioctl(1, request, ctypes.c_char_p(b"x")) == -1
        assert ctypes.get_errno() == errno.EPERM, request
    assert libc.ptrace(16, 1, 0, 0) == -1, "PTRACE_ATTACH to init"
    assert ctypes.get_errno() == errno.EPERM
"""
exec(CHECKS)


def attack(run, script):
    return run(["sh", "-c", script])


def body_run(argv):
    """A command the test body itself starts, inside as the body is."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def check_remount(result):
    # the kernel refuses: no capability, the mounts locked, the calls filtered
    assert "mount:" in result.stderr, result.stderr
    assert "Read-only file system" in result.stderr, result.stderr


def check_release_agent(result):
    assert "MOUNTED" not in result.stdout, result


def check_secrets(result):
    seen = result.stdout + result.stderr
    assert TOKEN not in seen
    assert "PermissionError" in seen, seen


def check_core_pattern(result):
    assert "core_pattern" in result.stderr and "poweroff_cmd" in result.stderr, result.stderr


def check_docker(result):
    assert "ANSWERED" not in result.stdout, result.stdout


def check_sockets(result):
    assert "CONNECTED" not in result.stdout, result.stdout
    assert "ConnectionRefusedError" in result.stdout, result.stdout


def check_devices_and_descriptors(run):
    devices = run(["ls", "/dev"]).stdout.split()
    assert set(devices) <= {{
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "fd",
        "stdin", "stdout", "stderr", "ptmx",
    }}, devices
    assert run(["mknod", "node", "c", "1", "3"]).returncode != 0
    listing = run(["sh", "-c", "ls /proc/self/fd"]).stdout.split()
    assert sorted(listing) == ["0", "1", "2", "3"], listing  # 3: ls reading the directory
    nested = run(["unshare", "-U", "-r", "true"])
    assert nested.returncode != 0 and "Operation not permitted" in nested.stderr, nested


# --- through env.run() ---


@SANDBOX
def test_remount_and_umount(isolated_env):
    check_remount(attack(isolated_env.run, REMOUNT))


@SANDBOX
def test_release_agent(isolated_env):
    check_release_agent(attack(isolated_env.run, RELEASE_AGENT))


@SANDBOX
def test_runner_secrets(isolated_env):
    check_secrets(attack(isolated_env.run, SECRETS))


@SANDBOX
def test_kernel_knobs(isolated_env):
    check_core_pattern(attack(isolated_env.run, CORE_PATTERN))


@SANDBOX
def test_docker_socket(isolated_env):
    check_docker(isolated_env.run([sys.executable, "-c", DOCKER]))


@SANDBOX
def test_host_unix_sockets(isolated_env):
    check_sockets(isolated_env.run([sys.executable, "-c", UNIX_SOCKETS]))


@SANDBOX
def test_privileges_and_system_calls(isolated_env):
    code = CHECKS + "\ncheck_privileges()\ncheck_system_calls()\n"
    result = isolated_env.run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    check_devices_and_descriptors(isolated_env.run)


@pytest.mark.parametrize("engine", ["basic", "sandbox"])
def test_links_planted_for_the_file_helpers(isolation_manager, engine):
    env = isolation_manager.create(engine)
    try:
        env.run(["ln", "-s", VICTIM, "out.txt"]).check()
        env.run(["ln", "-s", os.path.dirname(VICTIM), "dir"]).check()
        with pytest.raises(OutsideWorkspace):
            env.read_file("out.txt")
        with pytest.raises(OutsideWorkspace):
            env.write_file("dir/" + os.path.basename(VICTIM), "pwned")
        env.write_file("out.txt", "replaced the link, not its target")
        assert env.read_file("out.txt") == b"replaced the link, not its target"
    finally:
        isolation_manager.destroy(env)


# --- in the test body (inside=True) ---


@INSIDE
def test_inside_remount_and_umount():
    check_remount(attack(body_run, REMOUNT))


@INSIDE
def test_inside_release_agent():
    check_release_agent(attack(body_run, RELEASE_AGENT))


@INSIDE
def test_inside_runner_secrets():
    assert TOKEN not in json.dumps(dict(os.environ))
    check_secrets(attack(body_run, SECRETS))


@INSIDE
def test_inside_kernel_knobs():
    check_core_pattern(attack(body_run, CORE_PATTERN))


@INSIDE
def test_inside_docker_socket():
    check_docker(body_run([sys.executable, "-c", DOCKER]))


@INSIDE
def test_inside_host_unix_sockets():
    check_sockets(body_run([sys.executable, "-c", UNIX_SOCKETS]))


@INSIDE
def test_inside_privileges_and_system_calls():
    check_privileges()
    check_system_calls()
    check_devices_and_descriptors(body_run)
'''


@dataclass
class Host:
    """What the attacks aim at on the host, and how it looked before."""

    token: str
    project: Path
    socket_path: Path
    victim: Path
    accepted: list[bytes] = field(default_factory=list)
    core_pattern: str = ""
    poweroff: str = ""

    @property
    def mark(self) -> str:
        return f"piso-escape-{self.token}"

    def hierarchy_made(self) -> bool:
        """Whether a cgroup v1 hierarchy named by the attack exists on the host."""
        return f"name=piso-{self.token}:" in Path("/proc/self/cgroup").read_text()

    def written(self) -> list[Path]:
        """Files the attacks tried to write, found on the host."""
        candidates = [
            Path("/etc") / f"{self.mark}-etc",
            Path("/usr") / f"{self.mark}-usr",
            Path("/tmp") / f"{self.mark}-tmp",
            Path("/var/tmp") / f"{self.mark}-vartmp",
            Path("/var/tmp") / f"{self.mark}-agent",
            Path("/var/tmp") / f"{self.mark}-core",
            self.project / f"{self.mark}-project",
        ]
        return [path for path in candidates if path.exists()]


@contextlib.contextmanager
def host_targets(project: Path, *, world: bool) -> Iterator[Host]:
    """A unix socket listener (named and abstract) and a victim file on the host; with
    ``world``, both open to every user, so that only the sandbox keeps nobody out."""
    token = secrets.token_hex(6)
    socket_path = Path("/var/tmp") / f"piso-escape-{token}.sock"
    victim = Path("/var/tmp") / f"piso-escape-{token}-victim"
    victim.write_text("original")
    victim.chmod(0o666 if world else 0o644)
    host = Host(token, project, socket_path, victim)
    host.core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    host.poweroff = Path("/proc/sys/kernel/poweroff_cmd").read_text()
    named = socket.socket(socket.AF_UNIX)
    abstract = socket.socket(socket.AF_UNIX)
    stop = threading.Event()
    try:
        named.bind(str(socket_path))
        socket_path.chmod(0o777 if world else 0o755)
        abstract.bind(f"\0piso-escape-{token}")
        for listener in (named, abstract):
            listener.listen()
            listener.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                for listener in (named, abstract):
                    with contextlib.suppress(TimeoutError, OSError):
                        client, _ = listener.accept()
                        with client:
                            client.settimeout(1)
                            host.accepted.append(client.recv(100) or b"(connected)")

        watcher = threading.Thread(target=accept, daemon=True)
        watcher.start()
        try:
            yield host
        finally:
            stop.set()
            watcher.join(5)
    finally:
        named.close()
        abstract.close()
        socket_path.unlink(missing_ok=True)
        victim.unlink(missing_ok=True)
        for path in host.written():
            path.unlink()  # should the sandbox have failed, the host keeps nothing of it
        if host.hierarchy_made():
            remove_hierarchy(f"piso-{token}")


def remove_hierarchy(name: str) -> None:
    """Undo a named cgroup v1 hierarchy an attack made (it outlives its mounts while it has
    child cgroups, and confuses container runtimes): mount it, empty it, unmount it."""
    mountpoint = Path(tempfile.mkdtemp(prefix="piso-hierarchy-"))
    try:
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", f"none,name={name}", "cgroup", str(mountpoint)],
            check=True,
        )
        try:
            for directory in sorted(mountpoint.rglob("*"), key=lambda p: -len(p.parts)):
                if directory.is_dir():
                    directory.rmdir()
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        mountpoint.rmdir()


def assert_host_unchanged(host: Host, output: str) -> None:
    assert not host.hierarchy_made(), "the sandbox made a cgroup hierarchy on the host"
    assert host.written() == [], "the sandbox wrote to the host"
    assert host.accepted == [], "a host socket accepted a connection from the sandbox"
    assert host.victim.read_text() == "original"
    assert Path("/proc/sys/kernel/core_pattern").read_text() == host.core_pattern
    assert Path("/proc/sys/kernel/poweroff_cmd").read_text() == host.poweroff
    assert f"{host.mark}-docker" not in docker_names()
    assert host.token not in output.replace(f"piso-escape-{host.token}", "")


def docker_names() -> str:
    """Every container's name, if a daemon answers (else nothing could have been made)."""
    try:
        listed = subprocess.run(
            ["docker", "ps", "-a", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return listed.stdout


def attacks(host: Host) -> str:
    return ATTACKS.format(
        token=host.token, project=host.project, socket=host.socket_path, victim=host.victim
    )


INNER_TESTS = 16


def test_escapes_as_root(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root (root inside is uid 65534 outside): every attack fails, the host unchanged."""
    with host_targets(pytester.path, world=True) as host:
        pytester.makepyfile(test_attacks=attacks(host))
        monkeypatch.setenv(SECRET_NAME, host.token)
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--isolation-require=sandbox", timeout=PATIENCE
        )
        output = "\n".join(result.outlines + result.errlines)
        result.assert_outcomes(passed=INNER_TESTS)
        assert_host_unchanged(host, output)


def test_escapes_rootless(rootless: Rootless) -> None:
    """As uid 65534 (user namespaces): every attack fails, the host unchanged."""
    work = rootless.root / "escapes"
    with host_targets(work, world=True) as host:
        result, work = rootless.run(
            "escapes",
            attacks(host),
            "--isolation-require=sandbox",
            env={SECRET_NAME: host.token},
        )
        output = "\n".join(result.outlines + result.errlines)
        assert result.ret == 0, output
        result.assert_outcomes(passed=INNER_TESTS)
        assert_host_unchanged(host, output)
    assert_clean(work)


def test_docker_daemon_is_out_of_reach() -> None:
    """With a Docker daemon running (root-owned socket), the sandbox cannot use it."""
    need_engine("docker")
    token = secrets.token_hex(6)
    with IsolationManager() as manager:
        env = manager.create("sandbox")
        code = (
            "import socket\n"
            "with socket.socket(socket.AF_UNIX) as c:\n"
            "    c.connect('/var/run/docker.sock')\n"
            f"    c.sendall(b'POST /containers/create?name=piso-escape-{token} HTTP/1.0\\r\\n"
            "Content-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{}')\n"
            "    print(c.recv(100))\n"
        )
        result = env.run([sys.executable, "-c", code])
    assert result.returncode != 0
    assert "PermissionError" in result.stderr or "ConnectionRefusedError" in result.stderr
    assert f"piso-escape-{token}" not in docker_names()


def test_file_helpers_refuse_links_for_every_local_engine(tmp_path: Path) -> None:
    """basic, virtualenv and sandbox: a link planted in the workspace never makes the
    runner read or write outside it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    with IsolationManager() as manager:
        for engine in ("basic", "virtualenv", "sandbox"):
            env = manager.create(engine)
            env.run(["ln", "-s", str(victim), "out.txt"]).check()
            env.run(["ln", "-s", str(tmp_path), "dir"]).check()
            with pytest.raises(OutsideWorkspace, match="it is a link that leaves"):
                env.read_file("out.txt")
            with pytest.raises(OutsideWorkspace):
                env.write_file("dir/victim.txt", "pwned")
            with pytest.raises(OutsideWorkspace):
                env.read_file("dir/victim.txt")
            env.write_file("out.txt", "mine")
            assert env.read_file("out.txt") == b"mine"
            manager.destroy(env)
    assert victim.read_text() == "original"
