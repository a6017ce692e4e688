"""Linux namespaces from Python: the plumbing of the sandbox engine.

A sandboxed command runs as a chain of three processes::

    outer   forked from the caller: joins the cgroups, unshares the namespaces
            (with a user namespace when not root), forks init, waits for it and
            exits with its status
    init    PID 1 of the new PID namespace: sets up mounts, hostname and
            loopback, spawns the command, reaps every zombie and exits with the
            command's status; when it exits, the kernel kills everything inside
    command spawned with ``posix_spawn``, which copies no memory of the caller

The outer process and init have ``PR_SET_PDEATHSIG`` set, so a dying parent
takes the chain down.  Only the standard library is used, through ``ctypes`` for the few
system calls Python lacks before 3.12.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import signal
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

#: mount options that a user namespace may not clear on a mount it inherited
_LOCKED_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}


@functools.cache
def _c() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def unshare(flags: int) -> None:
    _check(_c().unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def b(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(
        _c().mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
        f"mount {target}",
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_c().sethostname(raw, len(raw)), "sethostname")


def set_parent_death_signal(signum: int = signal.SIGKILL) -> None:
    _check(_c().prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


@contextlib.contextmanager
def pid_namespace_for_children() -> Iterator[None]:
    """Make the next fork of this thread PID 1 of a new PID namespace (root only), then
    return this thread's children to its own PID namespace."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    caller = os.getpid()
    try:
        unshare(CLONE_NEWPID)
        try:
            yield
        finally:
            if os.getpid() == caller:  # not in the child, which leaves this block too
                _check(_c().setns(own, CLONE_NEWPID), "setns")
    finally:
        os.close(own)


def write_id_maps(uid: int, gid: int) -> None:
    """Map ``uid``/``gid`` outside to root inside a user namespace we just entered."""
    with open("/proc/self/setgroups", "w") as handle:
        handle.write("deny")
    with open("/proc/self/uid_map", "w") as handle:
        handle.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as handle:
        handle.write(f"0 {gid} 1")


@dataclass(frozen=True)
class Mount:
    """An extra bind mount: ``source`` on the host at ``target`` inside."""

    source: str
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class SandboxConfig:
    """Everything the outer and init processes need; plain data, decided before forking."""

    workspace: str
    private_tmp: str
    tmp_mountpoint: str = "/tmp"
    home: str | None = None
    cwd: str | None = None
    hostname: str = "sandbox"
    network: bool = False
    readonly_root: bool = True
    user_namespace: bool = False
    mounts: tuple[Mount, ...] = ()
    cgroup_procs: tuple[str, ...] = ()
    #: the caller's mount table, read before forking (see :func:`mount_table`)
    mounts_before: MountTable | None = field(default=None, compare=False)
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)

    @property
    def flags(self) -> int:
        flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID
        if not self.network:
            flags |= CLONE_NEWNET
        if self.user_namespace:
            flags |= CLONE_NEWUSER
        return flags


def user_namespaces_allowed() -> str | None:
    """``None`` if this process may create user namespaces, else the reason it may not."""
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = 1
    if limit == 0:
        return "user namespaces are disabled (sysctl user.max_user_namespaces = 0)"
    try:
        if Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() == "0":
            return (
                "unprivileged user namespaces are disabled "
                "(sysctl kernel.unprivileged_userns_clone = 0)"
            )
    except OSError:
        pass
    try:
        restricted = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").read_text()
        if restricted.strip() == "1":
            return (
                "AppArmor restricts unprivileged user namespaces "
                "(sysctl kernel.apparmor_restrict_unprivileged_userns = 1)"
            )
    except OSError:
        pass
    return None


def probe(config: SandboxConfig) -> str | None:
    """Try the namespaces of ``config`` in a throw-away child; ``None`` if they work."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        try:
            unshare(config.flags)
            if config.user_namespace:
                write_id_maps(config.uid, config.gid)
            os._exit(0)
        except BaseException as exc:
            os.write(write, str(exc).encode()[:1000])
            os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        message = handle.read().decode()
    os.waitpid(pid, 0)
    return message or None


# --- the process chain -------------------------------------------------------------------------


def enter_sandbox(
    config: SandboxConfig, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Put a freshly forked child (the outer process) into the sandbox of ``config``.

    With ``argv``, never returns: init spawns the command (``posix_spawn``,
    no copy of the caller's memory) and reaps until it is gone; its status
    comes back as the outer process's exit status (a death by signal as
    128 + signal).  Without ``argv``, returns in init itself, PID 1 inside
    every namespace, to run Python code there (the test body): one fork fewer
    of a large process, and when that code ends, everything it left dies.
    """
    try:
        with contextlib.suppress(PermissionError):  # already leads one when run by subprocess
            os.setsid()  # one process group for the chain, so it can be killed at once
        set_parent_death_signal()
        for procs in config.cgroup_procs:
            with open(procs, "w") as handle:
                handle.write("0")  # "0" is the writing process itself
        born_init = os.getpid() == 1  # forked into a new PID namespace by the caller
        unshare(config.flags & ~CLONE_NEWPID if born_init else config.flags)
        if config.user_namespace:
            write_id_maps(config.uid, config.gid)
    except BaseException as exc:
        _die(f"entering the sandbox failed: {exc}", 125)
    if not born_init:
        init = os.fork()
        if init:
            _release_fds()
            _wait_and_exit(init)
    try:  # PID 1 from here on
        set_parent_death_signal()
        _setup_mounts(config)
        sethostname(config.hostname)
        if not config.network:
            loopback_up()
        os.chdir(config.cwd or config.workspace)
    except BaseException as exc:
        _die(f"setting up the sandbox failed: {exc}", 125)
    if argv is None:
        return
    try:
        command = os.posix_spawnp(
            argv[0], list(argv), dict(env or {}), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ)
        )
    except OSError as exc:
        _die(f"{argv[0]}: {exc.strerror}", 127 if exc.errno == errno.ENOENT else 126)
    _release_fds()
    _reap_until(command)


def _die(message: str, status: int) -> NoReturn:
    with contextlib.suppress(OSError):
        os.write(2, f"pytest-isolation sandbox: {message}\n".encode())
    os._exit(status)


def _release_fds() -> None:
    # A waiting process must not hold the caller's pipes (stdout, stderr, the error pipe
    # of subprocess), or the caller would wait for their EOF instead of the command's.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 1 << 20)


def _wait_and_exit(child: int) -> NoReturn:
    while True:
        with contextlib.suppress(InterruptedError):
            _, status = os.waitpid(child, 0)
            os._exit(exit_code(status))


def _reap_until(command: int) -> NoReturn:
    """PID 1: reap every orphan, not only the command; leave with the command."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(command, signal.SIGKILL))
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == command:
            os._exit(exit_code(status))


def exit_code(status: int) -> int:
    """An exit status, with a death by signal as 128 + signal, the way shells report it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# --- mounts ---------------------------------------------------------------------------------


_ESCAPE = re.compile(r"\\([0-7]{3})")


class MountTable:
    """The mount table, to find each path's mount and its locked flags.

    Read when an environment is made, before any fork: a new mount namespace
    starts as a copy of the caller's, so every command's child can use it
    instead of reading and parsing it again.
    """

    def __init__(self) -> None:
        self.points: list[tuple[str, set[str]]] = []
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                target = _ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040: a space
                self.points.append((target, set(fields[5].split(","))))

    def options(self, path: str) -> set[str]:
        holders = [(point, options) for point, options in self.points if _within(path, point)]
        return max(holders, key=lambda item: len(item[0]))[1] if holders else set()

    def locked(self, path: str) -> int:
        """Flags of the mount holding ``path`` that a user namespace may not clear."""
        options = self.options(path)
        return sum(flag for name, flag in _LOCKED_FLAGS.items() if name in options)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _bind(source: str, target: str, *, readonly: bool, locked: int) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    # a bind takes the flags of its source's mount; set ours, keeping the locked ones
    mount(None, target, None, MS_BIND | MS_REMOUNT | (MS_RDONLY if readonly else 0) | locked)


def _setup_mounts(config: SandboxConfig) -> None:
    """Private propagation; the root read-only (optionally); the binds (workspace and HOME
    read-write at their own paths, then ``mounts``); the private tmp at ``/tmp``; a fresh
    ``/proc``, ``/sys`` (with its own network) and ``/dev/shm``."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    table = config.mounts_before or MountTable()
    binds = [Mount(d, d, readonly=False) for d in (config.workspace, config.home) if d]
    binds += config.mounts
    carried = [b for b in binds if _within(b.target, config.tmp_mountpoint)]
    for bind in carried:
        # /tmp is about to be covered by the private tmp: put what must appear under /tmp
        # inside the private tmp first, at the path it has outside.
        inner = os.path.join(
            config.private_tmp, os.path.relpath(bind.target, config.tmp_mountpoint)
        )
        if os.path.isdir(bind.source):
            os.makedirs(inner, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inner), exist_ok=True)
            open(inner, "ab").close()
        _bind(bind.source, inner, readonly=bind.readonly, locked=table.locked(bind.source))
    if config.readonly_root:
        for target, options in table.points:
            if "ro" in options or _within(target, "/proc"):
                continue
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY | table.locked(target)
            with contextlib.suppress(OSError):  # mounts this namespace may not change stay
                mount(None, target, None, flags)
    for bind in binds:
        if bind not in carried:
            _bind(
                bind.source, bind.target, readonly=bind.readonly, locked=table.locked(bind.source)
            )
    _bind(
        config.private_tmp,
        config.tmp_mountpoint,
        readonly=False,
        locked=table.locked(config.private_tmp),
    )
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not config.network:
        # /sys shows the network namespace of whoever mounted it: the host's devices
        mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.isdir("/dev/shm"):
        # POSIX shared memory of its own, writable also under a read-only root
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
