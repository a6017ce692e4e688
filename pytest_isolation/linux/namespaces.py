"""Linux namespaces for the sandbox engine: the runner's side.

Every sandbox process comes from a **zygote**, a fresh interpreter started once
per runner with an empty environment (see :mod:`.sandbox_init`): no process
of a sandbox is a copy of the runner, so none holds its memory, environment
variables or open files.  For each environment the zygote forks a process
that builds the namespaces, and an init (PID 1 inside) that sets up the file
system view, enters the sandbox's own user namespace with no capability, with
no_new_privs and the seccomp filter, and from then on starts the commands::

    runner ──control──▶ zygote ──fork──▶ outer ──fork──▶ init (PID 1) ──▶ shepherd ──▶ command

The sandbox's user namespace owns none of the other namespaces, so even its
root can change nothing of the mounts, the network or the host name; when the
runner is root, root inside is uid 65534 (``nobody``) outside, and the
environment's own directories are idmapped so that the host sees their files
as root's.  Rootless, the same structure sits in a user namespace of the
runner's own uid.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sandbox_init
from .sandbox_init import enter_user_namespace, harden
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    set_parent_death_signal,
    setns,
)

#: The uid (and gid) that root inside a sandbox is outside, when the runner is root.
SANDBOX_UID = 65534
#: Where the sandbox's private temporary directory is mounted.
TMP = "/tmp"
#: Directories hidden behind an empty, read-only tmpfs: per-user runtime directories
#: (session buses, agents, rootless container sockets).
MASKED_DIRECTORIES = ("/run/user",)
#: Seconds an environment's processes get to start, and to be gone at teardown.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import sandbox_init; sandbox_init.boot()"


class SandboxError(OSError):
    """The sandbox's processes could not be started or reached; says why."""


@dataclass(frozen=True)
class Mount:
    """A bind: ``source`` on the host at ``target`` inside."""

    source: str
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class SandboxConfig:
    """What one sandbox is made of; plain data, decided by the engine.

    ``needed`` are host paths the sandbox must be able to read (the interpreter,
    and for a test body its import path) and ``writable`` those it may write
    besides its own directories (pytest's temporary directories); ``mounts`` are
    the user's binds, applied last.
    """

    workspace: str
    home: str
    hostname: str = "sandbox"
    network: bool = False
    readonly_root: bool = True
    mounts: tuple[Mount, ...] = ()
    needed: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    cgroup_procs: tuple[str, ...] = ()
    inside: bool = False
    #: a host directory shown as the private /tmp; None: a tmpfs of the sandbox's own
    tmp_source: str | None = None
    rootless: bool = field(default_factory=lambda: os.geteuid() != 0)

    @property
    def map_to(self) -> int:
        """The uid root inside is in the namespace the sandbox is made in."""
        return 0 if self.rootless else SANDBOX_UID

    def message(self, seccomp: bytes) -> dict[str, Any]:
        """The JSON-ready configuration the sandbox's init reads."""
        binds = self.binds()
        return {
            "workspace": self.workspace,
            "home": self.home,
            "tmp_mountpoint": TMP,
            "tmp_source": self.tmp_source,
            "hostname": self.hostname,
            "network": self.network,
            "readonly_root": self.readonly_root,
            "rootless": self.rootless,
            "uid": os.geteuid(),
            "gid": os.getegid(),
            "map_to": self.map_to,
            "idmap": not self.rootless,
            "binds": [
                {"source": b.source, "target": b.target, "readonly": b.readonly} for b in binds
            ],
            "skeletons": [] if self.rootless else skeletons(b.target for b in binds),
            "masked_dirs": list(MASKED_DIRECTORIES),
            # the listening ones of the host's network, but these: listed by the sandbox's
            # process while it still is in that network (beside the run, not in it)
            "masked_sockets_but": [TMP, *MASKED_DIRECTORIES],
            "cgroup_procs": list(self.cgroup_procs),
            "inside": self.inside,
            "seccomp": base64.b64encode(seccomp).decode(),
        }

    def binds(self) -> list[Mount]:
        """Every bind, in the order made: the environment's own and what the sandbox needs
        (outer before inner), then the user's ``mounts``."""
        automatic = [
            Mount(self.workspace, self.workspace, False),
            Mount(self.home, self.home, False),
        ]
        automatic += [Mount(p, p, False) for p in self.writable]
        for path in self.needed:
            if _within(path, TMP) or (not self.rootless and not _sandbox_reaches(path)):
                automatic.append(Mount(path, path, True))
        kept: list[Mount] = []
        for bind in sorted(automatic, key=lambda m: m.target.count("/")):
            covered = [m for m in kept if _within(bind.target, m.target)]
            # a read-only path under a writable bind is shown by it; the reverse is kept
            if any(m.readonly == bind.readonly or not m.readonly for m in covered):
                continue
            kept.append(bind)
        return kept + list(self.mounts)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _may(info: os.stat_result, uid: int, bits: int) -> bool:
    """Whether ``uid`` (with that gid and no other group) has ``bits`` (r=4, w=2, x=1)."""
    if info.st_uid == uid:
        mode = info.st_mode >> 6
    elif info.st_gid == uid:
        mode = info.st_mode >> 3
    else:
        mode = info.st_mode
    return mode & bits == bits


def reachable(path: str, uid: int) -> bool:
    """Whether ``uid`` could read ``path``: every directory above passable, the path
    itself readable (and, a directory, listable)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if not _may(info, uid, 5 if stat.S_ISDIR(info.st_mode) else 4):
        return False
    return blocked_ancestor(path, uid) is None


@functools.lru_cache(maxsize=256)
def _sandbox_reaches(path: str) -> bool:
    """:func:`reachable` for the sandbox's uid, looked at once per run for each path (the
    interpreter and the import path, the same for every environment): a path that later
    turns unreachable fails to import inside, one that turns reachable is bound anyway."""
    return reachable(path, SANDBOX_UID)


def blocked_ancestor(path: str, uid: int) -> str | None:
    """The outermost directory above ``path`` that ``uid`` may not pass through."""
    parts = Path(path).parts
    for depth in range(2, len(parts)):
        directory = os.path.join(*parts[:depth])
        try:
            info = os.stat(directory)
        except OSError:
            return None  # not there: a mount point will be made, nothing to pass through
        if not _may(info, uid, 1):
            return directory
    return None


def skeletons(targets: Iterable[str]) -> list[str]:
    """The directories to cover with a tmpfs holding only the mount points bound into
    them: the outermost ones above ``targets`` (outside the private /tmp) that the
    sandbox's uid may not pass through, such as ``/root`` above an interpreter."""
    found: list[str] = []
    for target in targets:
        if _within(target, TMP):
            continue
        blocked = blocked_ancestor(target, SANDBOX_UID)
        if blocked is not None and not any(_within(blocked, f) for f in found):
            found = [f for f in found if not _within(f, blocked)] + [blocked]
    return sorted(found)


# --- the zygote --------------------------------------------------------------------------------


class Zygote:
    """The runner's handle on its zygote: started on first use, one per engine."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        here = str(Path(sandbox_init.__file__).parent)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _BOOT, here, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # no terminal's signals, its own process group
            )
        finally:
            theirs.close()
        self._control = ours
        self._lock = threading.Lock()
        self.sandboxes: set[Sandbox] = set()
        reply = self._reply(START_TIMEOUT)
        if reply.get("hello") is not True:
            raise SandboxError(f"the sandbox's zygote did not start: {reply}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _reply(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self._control], [], [], timeout)
        message, fds = sandbox_init.receive(self._control) if ready else (None, [])
        for fd in fds:
            os.close(fd)
        if message is None:
            self.process.poll()
            error = b""
            if self.process.stderr is not None and self.process.returncode is not None:
                error = self.process.stderr.read()
            raise SandboxError(
                f"the sandbox's zygote ({sys.executable}) "
                + ("did not answer" if not ready else f"exited: {error.decode(errors='replace')}")
            )
        return message

    def _request(self, message: dict[str, Any]) -> socket.socket:
        """Send ``message`` with a new socket whose other end the zygote's child gets."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                sandbox_init.send(self._control, message, [theirs.fileno()])
                reply = self._reply(START_TIMEOUT)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if "error" in reply:
            ours.close()
            raise SandboxError(f"the sandbox's zygote: {reply['error']}")
        return ours

    def probe(self, flags: int, rootless: bool, seccomp: bytes | None) -> str | None:
        """Try these namespaces (and the filter) in a throw-away process; the failure, if any."""
        message = {
            "op": "probe",
            "flags": flags,
            "rootless": rootless,
            "uid": os.geteuid(),
            "gid": os.getegid(),
            "seccomp": base64.b64encode(seccomp).decode() if seccomp else None,
        }
        with contextlib.closing(self._request(message)) as sock:
            answer = _receive_within(sock, START_TIMEOUT)
        return None if answer.get("ok") else str(answer.get("error", "no answer"))

    def create(self, config: SandboxConfig, seccomp: bytes) -> Sandbox:
        """Start a sandbox of ``config`` and wait until it is ready; raises
        :class:`SandboxError` with the reason."""
        return self.start(config, seccomp).result()

    def start(self, config: SandboxConfig, seccomp: bytes) -> PendingSandbox:
        """Start a sandbox of ``config`` without waiting for it: its processes make it
        while the caller goes on."""
        sock = self._request({"op": "create", "config": config.message(seccomp)})
        return PendingSandbox(self, sock, config, seccomp)

    def close(self) -> None:
        """End the zygote; it kills whatever sandbox is still running."""
        self._control.close()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def descriptors(self) -> list[int]:
        """Every descriptor of this zygote and its sandboxes that a forked child must close."""
        fds = [self._control.fileno()]
        for sandbox in list(self.sandboxes):
            fds += sandbox.descriptors()
        return [fd for fd in fds if fd >= 0]


def _receive_within(sock: socket.socket, timeout: float) -> dict[str, Any]:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise SandboxError(f"the sandbox did not answer within {timeout:g}s")
    message, fds = sandbox_init.receive(sock)
    for fd in fds:
        os.close(fd)
    if message is None:
        raise SandboxError("the sandbox's processes ended before answering")
    return message


class PendingSandbox:
    """A sandbox being made by the zygote's processes; :meth:`result` waits for it."""

    def __init__(
        self, zygote: Zygote, sock: socket.socket, config: SandboxConfig, seccomp: bytes
    ) -> None:
        self._zygote = zygote
        self._sock = sock
        self.config = config
        self._seccomp = seccomp
        self._sandbox: Sandbox | None = None

    def result(self) -> Sandbox:
        """The ready sandbox; raises :class:`SandboxError` with the reason it failed."""
        if self._sandbox is None:
            try:
                self._sandbox = Sandbox._started(self._sock, self.config, self._seccomp)
            except BaseException:
                self._sock.close()
                raise
            self._zygote.sandboxes.add(self._sandbox)
        return self._sandbox


# --- one sandbox -------------------------------------------------------------------------------


class Sandbox:
    """One running sandbox: its init's control socket, its pids, its namespaces."""

    def __init__(
        self,
        sock: socket.socket,
        config: SandboxConfig,
        seccomp: bytes,
        *,
        outer: int,
        init: int,
        idmapped: bool,
        namespaces: list[int],
    ) -> None:
        self._sock = sock
        self.config = config
        self.seccomp = seccomp
        self.outer = outer
        self.init = init
        self.idmapped = idmapped
        self.namespaces = namespaces
        self._lock = threading.Lock()
        self._own_pid_namespace: int | None = None

    @classmethod
    def _started(cls, sock: socket.socket, config: SandboxConfig, seccomp: bytes) -> Sandbox:
        deadline = time.monotonic() + START_TIMEOUT
        pids: dict[str, Any] = {}
        ready: dict[str, Any] | None = None
        namespaces: list[int] = []
        while ready is None or not pids:
            wait = deadline - time.monotonic()
            readable, _, _ = select.select([sock], [], [], max(0.0, wait))
            if not readable:
                raise SandboxError(f"the sandbox did not start within {START_TIMEOUT:g}s")
            message, fds = sandbox_init.receive(sock)
            if message is None:
                raise SandboxError("the sandbox's processes ended while starting")
            if "error" in message:
                for fd in fds:
                    os.close(fd)
                raise SandboxError(str(message["error"]))
            if message.get("ready"):
                ready, namespaces = message, fds
            elif "init" in message:
                pids = message
        return cls(
            sock,
            config,
            seccomp,
            outer=int(pids["outer"]),
            init=int(pids["init"]),
            idmapped=bool(ready.get("idmapped")),
            namespaces=namespaces,
        )

    def descriptors(self) -> list[int]:
        return [self._sock.fileno(), *self.namespaces]

    def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str,
        *,
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> RemoteCommand:
        """Start ``argv`` inside with the given descriptors as its standard streams."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                sandbox_init.send(
                    self._sock,
                    {"argv": list(argv), "env": env, "cwd": cwd},
                    [stdin, stdout, stderr, theirs.fileno()],
                )
        except OSError as exc:
            ours.close()
            raise SandboxError(f"the sandbox's init is gone: {exc}") from exc
        finally:
            theirs.close()
        return RemoteCommand(ours)

    def stop(self) -> None:
        """Kill everything inside (init takes its PID namespace along) and wait until it is
        all gone; close every descriptor."""
        self._sock.close()
        for fd in self.namespaces:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.namespaces = []
        stop_init(self.init, self.outer)

    # --- the test body inside (inside mode) ---

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Around the fork of a test body: as root, let the fork itself land in the
        sandbox's PID namespace (one fork of a large process fewer)."""
        if self.config.rootless:
            yield
            return
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        caller = os.getpid()
        try:
            setns(self._namespace("pid"), CLONE_NEWPID)
            try:
                yield
            finally:
                if os.getpid() == caller:  # not in the child, which leaves this block too
                    setns(own, CLONE_NEWPID)
        finally:
            os.close(own)

    def _namespace(self, kind: str) -> int:
        kinds = (["user"] if self.config.rootless else []) + [
            "mnt",
            "net",
            "uts",
            "ipc",
            "cgroup",
            "pid",
            "sandbox",
        ]
        return self.namespaces[kinds.index(kind)]

    def join(self, close: Iterable[int] = ()) -> None:
        """In a freshly forked child of the runner: become a process of this sandbox, as its
        commands are (same namespaces, cgroups, credentials, no capability, the filter).

        Closes ``close`` (the runner's descriptors of its sandboxes) first.  Rootless,
        the child forks once more to enter the PID namespace and returns in the
        grandchild; the child waits for it and exits with its status.
        """
        os.setsid()  # one process group for the test and what it starts, killable at once
        cwd = os.getcwd()
        keep = set(self.namespaces)
        for fd in close:
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for procs in self.config.cgroup_procs:
            with open(procs, "w") as handle:
                handle.write("0")
        if self.config.rootless:
            setns(self._namespace("user"), CLONE_NEWUSER)
        for kind in ("mnt", "net", "uts", "ipc", "cgroup"):
            setns(self._namespace(kind))
        if self.config.rootless:
            setns(self._namespace("pid"), CLONE_NEWPID)
            child = os.fork()
            if child:
                _wait_and_exit(child)
        enter_user_namespace(self._namespace("sandbox"), drop_groups=not self.config.rootless)
        for fd in self.namespaces:
            os.close(fd)
        set_parent_death_signal()
        harden(self.seccomp)
        try:
            os.chdir(cwd)  # joining the mount namespace moved it to "/"
        except OSError:
            os.chdir(self.config.workspace)


def _wait_and_exit(child: int) -> None:
    os.closerange(3, 1 << 16)  # the parent's pipes are the grandchild's now
    while True:
        with contextlib.suppress(InterruptedError):
            _, status = os.waitpid(child, 0)
            os._exit(
                os.waitstatus_to_exitcode(status) & 0xFF
                if os.WIFEXITED(status)
                else 128 + os.WTERMSIG(status)
            )


def stop_init(init: int, outer: int | None = None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGKILL a sandbox's init and wait until its PID namespace is empty."""
    try:
        pidfd = os.pidfd_open(init)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, 9)
        # readable once init has exited, which is after every process inside is gone
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


class RemoteCommand:
    """A command the sandbox's init started (see :class:`pytest_isolation.execution.Running`)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def exit_fd(self) -> int:
        return self._sock.fileno()

    def poll(self) -> Any:
        from ..execution import Exited

        try:
            message, fds = sandbox_init.receive(self._sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            return Exited(126)  # the sandbox is gone (torn down while the command ran)
        if "status" not in message:
            return None
        cpu, peak = message.get("cpu"), message.get("peak")
        return Exited(
            int(message["status"]),
            float(cpu) if isinstance(cpu, int | float) else None,
            int(peak) if isinstance(peak, int) and peak > 0 else None,
        )

    def wait(self) -> Any:
        while True:
            select.select([self._sock], [], [])
            ended = self.poll()
            if ended is not None:
                return ended

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            sandbox_init.send(self._sock, {"kill": True})

    def sample_peak(self) -> int:
        return 0

    def close(self) -> None:
        self._sock.close()


def namespace_flags(*, network: bool, rootless: bool) -> int:
    """The clone flags a sandbox is made with."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC
    if not network:
        flags |= CLONE_NEWNET
    if rootless:
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
    with contextlib.suppress(OSError):
        setting = Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip()
        if setting == "0" and os.geteuid() != 0:
            return (
                "unprivileged user namespaces are disabled "
                "(sysctl kernel.unprivileged_userns_clone = 0)"
            )
    with contextlib.suppress(OSError):
        restricted = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").read_text()
        if restricted.strip() == "1" and os.geteuid() != 0:
            return (
                "AppArmor restricts unprivileged user namespaces "
                "(sysctl kernel.apparmor_restrict_unprivileged_userns = 1)"
            )
    return None
