"""The sandbox's own processes: a fresh interpreter that holds nothing of the runner.

The runner starts this program once, as ``python -I -S -B -c BOOT DIR FD`` with an
empty environment: the **zygote**.  It imports what every later role needs and
then only forks, so that no process of a sandbox is a copy of the runner (its
memory, its environment variables, its open files).  Per environment::

    zygote   one per runner; forks an outer process per environment; exits, killing
             them, when the runner's end of its control socket closes
    outer    makes the namespaces (mount, pid, uts, ipc, net; rootless: user as well)
             and the sandbox's user namespace, forks init, waits for it
    init     PID 1 inside: joins the cgroups, sets up the mounts, enters the sandbox's
             user namespace (root inside, an unprivileged uid outside), drops every
             capability, sets no_new_privs, installs the seccomp filter, then serves
             the environment's commands and reaps whatever is orphaned inside
    shepherd one per command, forked by init: a child subreaper that spawns the
             command in a session of its own and, when it ends (or on request),
             kills everything it left, then reports its status

Everything this module does is decided by the runner and sent as JSON (see
:class:`pytest_isolation.linux.namespaces.SandboxConfig`); it uses the standard
library only, and imports everything it will ever need before it drops its
privileges, since the interpreter's own files may be out of the sandbox's reach.
"""

from __future__ import annotations

import array  # noqa: F401  (socket.recv_fds needs it; imported before privileges go)
import base64
import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import stat
import sys
from typing import Any, NoReturn

if __package__:
    from . import syscalls as sc
else:  # the zygote: started with this directory on sys.path and nothing else
    import syscalls as sc  # type: ignore[import-not-found,no-redef]

#: Exit status of init or outer when the sandbox could not be set up.
SETUP_FAILED = 125
#: The uid (and gid) that root inside a sandbox is outside, when the runner is root.
SANDBOX_UID = 65534
#: The largest message on a control socket (a sandbox's configuration).
MESSAGE_SIZE = 1 << 20
MAX_FDS = 16

#: mount options that a user namespace may not clear on a mount it inherited
_LOCKED_FLAGS = {
    "nosuid": sc.MS_NOSUID,
    "nodev": sc.MS_NODEV,
    "noexec": sc.MS_NOEXEC,
    "noatime": sc.MS_NOATIME,
    "nodiratime": sc.MS_NODIRATIME,
    "relatime": sc.MS_RELATIME,
    "strictatime": sc.MS_STRICTATIME,
}
#: device nodes of the sandbox's /dev, bound from the host's (as bubblewrap's --dev)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: /proc files hidden behind an empty file, and directories made read-only (as Docker does)
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "sysrq-trigger")
PROC_READ_ONLY = ("sys", "bus", "fs", "irq")
_ESCAPE = re.compile(r"\\([0-7]{3})")


# --- messages ----------------------------------------------------------------------------------


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(
    sock: socket.socket, size: int = MESSAGE_SIZE
) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; ``None`` at end of file."""
    data, fds, _, _ = socket.recv_fds(sock, size, MAX_FDS)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def _say(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # else the runner is gone: there is nobody to tell
        send(sock, message)


# --- the zygote --------------------------------------------------------------------------------


def zygote(control_fd: int) -> NoReturn:
    """Serve ``create`` and ``probe`` requests of the runner until its socket closes."""
    control = socket.socket(fileno=control_fd)
    children: set[int] = set()

    def reap(*_: object) -> None:
        for pid in list(children):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0]
            except ChildProcessError:
                done = pid
            if done:
                children.discard(pid)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.umask(0o022)
    try:
        users = _user_namespaces(rootless=os.geteuid() != 0)
    except OSError as exc:
        users, broken = {}, f"cannot create user namespaces: {exc}"
    else:
        broken = ""
    signal.signal(signal.SIGCHLD, reap)
    _say(control, {"hello": True})
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)  # started: from here on errors travel on the sockets
    os.close(devnull)
    while True:
        try:
            request, fds = receive(control)
        except OSError:
            request, fds = None, []
        if request is None:
            break
        try:
            pid = os.fork()
        except OSError as exc:
            _say(control, {"error": f"fork failed: {exc}"})
            for fd in fds:
                os.close(fd)
            continue
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            if broken:
                _say(socket.socket(fileno=fds[0]), {"error": broken})
                os._exit(1)
            if request.get("op") == "probe":
                _probe(request, fds, users)
            _outer(request["config"], fds, users)
        children.add(pid)
        for fd in fds:
            os.close(fd)
        _say(control, {"pid": pid})
    for pid in children:  # the runner is gone: nothing of its sandboxes may outlive it
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _probe(request: dict[str, Any], fds: list[int], users: dict[str, int]) -> NoReturn:
    """Try the namespaces and the filter; report the first failure."""
    sock = socket.socket(fileno=fds[0])
    try:
        sc.set_parent_death_signal()
        if "setup" in users:
            sc.setns(users["setup"], sc.CLONE_NEWUSER)
        sc.unshare(request["flags"])
        if request.get("seccomp"):
            sc.set_no_new_privs()
            sc.load_seccomp(base64.b64decode(request["seccomp"]))
    except BaseException as exc:
        _say(sock, {"error": str(exc)})
        os._exit(1)
    _say(sock, {"ok": True})
    os._exit(0)


# --- outer -------------------------------------------------------------------------------------


def _outer(config: dict[str, Any], fds: list[int], users: dict[str, int]) -> NoReturn:
    sock = socket.socket(fileno=fds[0])
    try:
        sc.set_parent_death_signal()
        if "setup" in users:  # rootless: the user namespace that owns all the others
            sc.setns(users["setup"], sc.CLONE_NEWUSER)
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
        if not config["network"]:
            flags |= sc.CLONE_NEWNET
        config["masked_sockets"] = unix_sockets(exclude=config["masked_sockets_but"])
        sc.unshare(flags)
        init = os.fork()
    except BaseException as exc:
        _say(sock, {"error": f"creating the namespaces failed: {exc}"})
        os._exit(SETUP_FAILED)
    if init == 0:
        _init(config, sock, users)
    _say(sock, {"outer": os.getpid(), "init": init})
    sock.close()
    while True:
        try:
            _, status = os.waitpid(init, 0)
        except InterruptedError:
            continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _user_namespaces(*, rootless: bool) -> dict[str, int]:
    """The user namespaces every sandbox of this runner uses, made once.

    ``sandbox``, where a sandbox's processes live: its root is uid 65534 outside
    (root runner) or the runner's own uid; it owns no other namespace, so its
    capabilities are worth nothing.  Rootless, ``setup`` (the runner's uid as
    root) owns the sandboxes' other namespaces and is its parent.
    """
    if not rootless:
        return {"sandbox": _new_user_namespace(f"0 {SANDBOX_UID} 1")}
    setup = _new_user_namespace(f"0 {os.geteuid()} 1", f"0 {os.getegid()} 1", own=True)
    sandbox = _new_user_namespace("0 0 1", own=True, parent=setup)
    return {"setup": setup, "sandbox": sandbox}


def _new_user_namespace(
    uid_map: str, gid_map: str | None = None, *, own: bool = False, parent: int | None = None
) -> int:
    """A descriptor of a new user namespace (a child of ``parent``'s, or of this
    process's) with these maps, made by a short-lived child.

    With ``own``, the child maps itself (its own uid only, as an unprivileged
    process may, with setgroups denied); otherwise this process, privileged in
    the parent namespace, writes the maps.
    """
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        os.close(done_w)
        try:
            if parent is not None:
                sc.setns(parent, sc.CLONE_NEWUSER)
            sc.unshare(sc.CLONE_NEWUSER)
            if own:
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", uid_map)
                _write("/proc/self/gid_map", gid_map or uid_map)
            os.write(ready_w, b"1")
        except BaseException as exc:
            os.write(ready_w, f"0{exc}".encode()[:500])
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 512)
        if answer != b"1":
            raise OSError(errno.EPERM, answer[1:].decode(errors="replace"))
        if not own:
            _write(f"/proc/{child}/uid_map", uid_map)
            _write(f"/proc/{child}/gid_map", gid_map or uid_map)
        return os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(done_w, b"1")
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(child, 0)


# --- init --------------------------------------------------------------------------------------


def _init(config: dict[str, Any], sock: socket.socket, users: dict[str, int]) -> NoReturn:
    namespaces: list[int] = []
    user = users["sandbox"]
    try:
        sc.set_parent_death_signal()
        os.setsid()  # a session of its own: no terminal, no signal meant for the runner
        for procs in config["cgroup_procs"]:
            _write(procs, "0")  # "0": the writing process
        sc.unshare(sc.CLONE_NEWCGROUP)  # its cgroup (the environment's, if any) is "/" inside
        idmapped = _setup_mounts(config, user)
        sc.sethostname(config["hostname"])
        if not config["network"]:
            sc.loopback_up()
        if config["inside"]:
            # for the test body to join later: opened while this process may still open them
            kinds = ["user"] if config["rootless"] else []
            kinds += ["mnt", "net", "uts", "ipc", "cgroup", "pid"]
            namespaces = [os.open(f"/proc/self/ns/{k}", os.O_RDONLY | os.O_CLOEXEC) for k in kinds]
            namespaces.append(os.dup(user))  # the sandbox's own user namespace, joined last
        enter_user_namespace(user, drop_groups=not config["rootless"])
        for fd in users.values():  # what was sent on is a copy
            os.close(fd)
        sc.set_parent_death_signal()  # a change of credentials cleared it
        harden(base64.b64decode(config["seccomp"]))
        os.chdir("/")
    except BaseException as exc:
        _say(sock, {"error": f"setting up the sandbox failed: {exc}"})
        os._exit(SETUP_FAILED)
    try:
        send(sock, {"ready": True, "idmapped": idmapped}, namespaces)
    except OSError:
        os._exit(0)
    for fd in namespaces:
        os.close(fd)
    _serve(sock)


def enter_user_namespace(user: int, *, drop_groups: bool) -> None:
    """Join the sandbox's user namespace ``user`` and become its root, which is an
    unprivileged uid outside.  The namespace owns none of the others, so its
    capabilities change nothing of the sandbox's mounts, network or processes."""
    sc.setns(user, sc.CLONE_NEWUSER)
    if drop_groups:
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def harden(program: bytes) -> None:
    """no_new_privs, no capability of any kind, not dumpable, then the seccomp filter."""
    sc.set_no_new_privs()
    sc.drop_capabilities()
    sc.set_dumpable(False)
    sc.load_seccomp(program)


def _serve(sock: socket.socket) -> NoReturn:
    """PID 1: hand each requested command to a shepherd; reap every orphan; leave (taking
    the whole PID namespace along) when the runner closes the socket.

    One shepherd is always forked ahead and waits for its command, so that starting
    a command costs no fork of its own.
    """
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    spare = _spare_shepherd(sock, wake_r, wake_w)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                _drain(wake_r)
                _reap_all()
                continue
            try:
                request, fds = receive(sock)
            except OSError:
                request, fds = None, []
            if request is None:
                os._exit(0)
            if spare is None:
                spare = _spare_shepherd(sock, wake_r, wake_w)
            if spare is None:
                _fail_command(fds, "cannot start a shepherd (fork failed)", 126)
                continue
            try:
                send(spare, request, fds)
            except OSError as exc:
                _fail_command(fds, f"the shepherd is gone: {exc}", 126)
            else:
                for received in fds:
                    os.close(received)
            spare.close()
            spare = _spare_shepherd(sock, wake_r, wake_w)


def _spare_shepherd(sock: socket.socket, wake_r: int, wake_w: int) -> socket.socket | None:
    """Fork a shepherd that waits for its command on the socket returned."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        shepherd = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if shepherd == 0:
        signal.set_wakeup_fd(-1)
        for fd in (wake_r, wake_w):
            os.close(fd)
        sock.close()
        ours.close()
        try:
            request, fds = receive(theirs)
        except OSError:
            request = None
        if request is None:
            os._exit(0)  # never used: the sandbox is ending
        theirs.close()
        _shepherd(request, fds)
    theirs.close()
    return ours


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fail_command(fds: list[int], message: str, code: int) -> None:
    if len(fds) == 4:
        try:
            os.write(fds[2], f"pytest-isolation sandbox: {message}\n".encode())
            send(socket.socket(fileno=os.dup(fds[3])), {"status": code})
        except OSError:
            pass
    for fd in fds:
        os.close(fd)


# --- shepherd ----------------------------------------------------------------------------------


def _shepherd(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """Spawn one command, relay its end; kill all it left (it is a child subreaper)."""
    stdin, stdout, stderr, status_fd = fds
    status = socket.socket(fileno=status_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sc.set_child_subreaper()
    argv: list[str] = request["argv"]
    environ: dict[str, str] = request["env"]
    try:
        os.chdir(request["cwd"])
        path = _which(argv[0], environ.get("PATH", os.defpath))
        command = os.posix_spawn(
            path,
            argv,
            environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGCHLD),
        )
    except OSError as exc:
        name = exc.filename if isinstance(exc.filename, str) else argv[0]
        where = "working directory " if exc.filename == request["cwd"] else ""
        os.write(stderr, f"{where}{name}: {os.strerror(exc.errno or 0)}\n".encode())
        code = 127 if exc.errno == errno.ENOENT and not where else 126
        _say(status, {"status": code})
        os._exit(0)
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    _say(status, {"pid": command})
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(status.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    result: dict[str, Any] | None = None
    own_peak = _own_peak()
    while result is None:
        result = _wait_for(command, own_peak)
        if result is not None:
            break
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                _drain(wake_r)
            else:  # the runner asks for the end (a timeout) or is gone: kill the command
                with contextlib.suppress(OSError):
                    status.recv(64)
                _kill(command)
    _kill_descendants()
    _say(status, result)
    os._exit(0)


def _wait_for(command: int, own_peak: int) -> dict[str, Any] | None:
    """The command's status once it ended (reaping every other child on the way)."""
    while True:
        try:
            pid, raw, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return {"status": 126}
        if pid == 0:
            return None
        if pid == command:
            code = 128 + os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
            peak = usage.ru_maxrss * 1024
            return {
                "status": code,
                "cpu": usage.ru_utime + usage.ru_stime,
                # after a spawn, a child's peak starts at the spawner's own
                "peak": peak if peak > own_peak else None,
            }


def _kill(command: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(command, signal.SIGKILL)
    _kill_descendants()


def _kill_descendants() -> None:
    """SIGKILL every child (orphans come back here, to the subreaper) until none is left."""
    me = os.getpid()
    while True:
        children = _children(me)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            pid, _ = os.waitpid(-1, 0 if children else os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0 and not children:
            return


def _children(parent: int) -> list[int]:
    """The children of ``parent`` (this process): its threads' ``children`` files where
    the kernel has them, else a look through ``/proc``."""
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
        found: list[int] = []
        for task in tasks:
            with open(f"/proc/{parent}/task/{task}/children", "rb") as handle:
                found += [int(pid) for pid in handle.read().split()]
        return found
    except FileNotFoundError:
        pass  # no CONFIG_PROC_CHILDREN
    except OSError:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(name))
    return found


def _own_peak() -> int:
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _which(name: str, path: str) -> str:
    """The file ``name`` names, searched on ``path`` as execvp would; an error otherwise."""
    if "/" in name:
        return name
    denied = None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        try:
            info = os.stat(candidate)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                denied = exc
            continue
        if stat.S_ISREG(info.st_mode):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = OSError(errno.EACCES, os.strerror(errno.EACCES), name)
    if denied is not None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), name)
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)


# --- mounts ------------------------------------------------------------------------------------


def unix_sockets(exclude: list[str]) -> list[str]:
    """Paths of the listening Unix sockets of this network namespace (``/proc/net/unix``),
    but those under ``exclude``: what the sandbox must not connect to."""
    paths: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            next(table, None)
            for line in table:
                fields = line.split(maxsplit=7)
                if len(fields) == 8 and fields[7].startswith("/"):
                    paths.add(fields[7].rstrip("\n"))
    except OSError:
        return []
    return sorted(p for p in paths if not any(_within(p, d) for d in exclude))


def mount_table() -> list[tuple[str, set[str]]]:
    """(mount point, options) of every mount, as ``/proc/self/mountinfo`` lists them."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            target = _ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040: a space
            points.append((target, set(fields[5].split(","))))
    return points


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _locked(table: list[tuple[str, set[str]]], path: str) -> int:
    """Flags of the mount holding ``path`` that a user namespace may not clear."""
    holders = [(point, options) for point, options in table if _within(path, point)]
    if not holders:
        return 0
    options = max(holders, key=lambda item: len(item[0]))[1]
    return sum(flag for name, flag in _LOCKED_FLAGS.items() if name in options)


class _Binder:
    """Makes the binds.  Each source is cut out as a detached tree first (idmapped where
    the kernel and file system allow: the host's root is the sandbox's root on it),
    while every source can still be seen and before the host's mounts turn
    read-only, and attached at its target later."""

    def __init__(self, table: list[tuple[str, set[str]]], user: int, idmap: bool) -> None:
        self.table = table
        self.user = user
        self.idmap = idmap
        self.idmapped = False
        self.trees: dict[int, tuple[int, bool]] = {}

    def prepare(self, number: int, source: str, *, readonly: bool) -> None:
        while True:
            try:
                userns = self.user if self.idmap else None
                tree = sc.clone_tree(source, userns, readonly=readonly)
            except OSError as exc:
                if self.idmap and exc.errno in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    self.idmap = False  # this file system cannot: plain trees from here
                    continue
                if exc.errno != errno.ENOSYS:
                    raise
                return  # no open_tree (Linux < 5.2): a plain bind when attached
            self.trees[number] = tree, self.idmap
            self.idmapped = self.idmapped or self.idmap
            return

    def bind(self, number: int, source: str, target: str, *, readonly: bool) -> None:
        tree, idmapped = self.trees.pop(number, (None, False))
        if tree is not None:
            try:
                sc.attach_tree(tree, target)
            finally:
                os.close(tree)
            if idmapped:
                return  # read-only already, where asked
        else:
            sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
        # a bind takes the flags of its source's mount; set ours, keeping the locked ones
        flags = sc.MS_BIND | sc.MS_REMOUNT | (sc.MS_RDONLY if readonly else 0)
        sc.mount(None, target, None, flags | _locked(self.table, source))


def _setup_mounts(config: dict[str, Any], user: int) -> bool:
    """Build the sandbox's view of the file system; whether its binds are idmapped.

    In order: private propagation; the binds' sources cut out while they can be
    seen; the private ``/tmp`` (a tmpfs of the sandbox's own, gone with it, so that
    no directory of the host becomes a mount point; with a disk limit, a directory
    of the environment's size-limited file system); a minimal ``/dev``; every
    host mount read-only; tmpfs skeletons over directories the sandbox's uid may
    not pass through (holding only the paths bound into them); the binds (the
    environment's own, then the user's ``mounts``, last); sockets and per-user
    runtime directories masked; a fresh ``/proc`` with its kernel knobs read-only;
    a fresh ``/sys`` for a private network.
    """
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    table = mount_table()
    tmp = config["tmp_mountpoint"]
    binds = config["binds"]
    # a source may be hidden later (by the private /tmp, a skeleton): look at each now
    directories = {bind["source"]: os.path.isdir(bind["source"]) for bind in binds}
    binder = _Binder(table, user, config["idmap"])
    tmp_source = config["tmp_source"]
    if tmp_source is not None:
        binder.prepare(-1, tmp_source, readonly=False)
    for number, bind in enumerate(binds):
        binder.prepare(number, bind["source"], readonly=bind["readonly"])
    if not binder.idmapped and not config["rootless"]:
        # without idmapped mounts the sandbox's root (an unprivileged uid outside) must own
        # its directories to write them; the host sees its files as that uid's
        for directory in (config["workspace"], config["home"], tmp_source):
            if directory is not None:
                os.chown(directory, config["map_to"], config["map_to"])
    tmp_flags = sc.MS_NOSUID | sc.MS_NODEV
    if tmp_source is None:
        sc.mount("tmpfs", tmp, "tmpfs", tmp_flags, "mode=1777")
        _setup_dev(os.path.join(tmp, ".pytest-isolation-dev"))
    else:  # a directory of the environment's size-limited file system, seen from the host
        # side here (through an idmapped bind, root of the host could not write it)
        for bind in binds:
            if _within(bind["target"], tmp):
                inner = os.path.join(tmp_source, os.path.relpath(bind["target"], tmp))
                _mountpoint(inner, directory=directories[bind["source"]])
        _setup_dev(os.path.join(tmp_source, ".pytest-isolation-dev"))
        binder.bind(-1, tmp_source, tmp, readonly=False)
    if config["readonly_root"]:
        _read_only(table)
        sc.mount(None, tmp, None, sc.MS_BIND | sc.MS_REMOUNT | tmp_flags)  # writable again
    for skeleton in config["skeletons"]:
        sc.mount("tmpfs", skeleton, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=64k")
    for bind in binds:
        _mountpoint(bind["target"], directory=directories[bind["source"]])
    for number, bind in enumerate(binds):
        binder.bind(number, bind["source"], bind["target"], readonly=bind["readonly"])
    for directory in config["masked_dirs"]:
        if os.path.isdir(directory):
            flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
            sc.mount("tmpfs", directory, "tmpfs", flags, "mode=0755")
    for path in config["masked_sockets"]:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                sc.mount("/dev/null", path, None, sc.MS_BIND)
        except OSError:
            pass  # gone since the runner listed it, or out of this view
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for name in PROC_MASKED:
        if os.path.exists(f"/proc/{name}"):
            sc.mount("/dev/null", f"/proc/{name}", None, sc.MS_BIND)
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}"
        if os.path.isdir(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
            sc.mount(None, path, None, flags | sc.MS_NOEXEC)
    if not config["network"]:
        # /sys shows the network namespace of whoever mounted it: the host's devices
        flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
        sc.mount("sysfs", "/sys", "sysfs", flags)
    for skeleton in config["skeletons"]:
        flags = sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
        sc.mount(None, skeleton, None, flags)
    return binder.idmapped


def _read_only(table: list[tuple[str, set[str]]]) -> None:
    """Every mount read-only (but the sandbox's own /dev/shm and /dev/pts): in one call
    where the kernel can, mount by mount otherwise."""
    try:
        sc.make_readonly("/")
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise
        for target, options in table:
            if "ro" in options or _within(target, "/proc") or _within(target, "/dev"):
                continue
            flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _locked(table, target)
            with contextlib.suppress(OSError):  # mounts this namespace may not change stay
                sc.mount(None, target, None, flags)
    else:
        for path, extra in (("/dev/shm", sc.MS_NODEV), ("/dev/pts", sc.MS_NOEXEC)):
            sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NOSUID | extra)


def _mountpoint(path: str, *, directory: bool) -> None:
    if os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if directory:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _setup_dev(staging: str) -> None:
    """A read-only /dev of a few device nodes bound from the host's, with a devpts and a
    /dev/shm of its own: built at ``staging`` (an empty place, removed after) and moved."""
    os.mkdir(staging, 0o755)
    sc.mount("tmpfs", staging, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            node = os.path.join(staging, name)
            os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            sc.mount(f"/dev/{name}", node, None, sc.MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, os.path.join(staging, name))
    for name in ("pts", "shm"):
        os.mkdir(os.path.join(staging, name), 0o755)
    sc.mount(staging, "/dev", None, sc.MS_MOVE)
    os.rmdir(staging)
    options = "newinstance,ptmxmode=0666,mode=0620"
    sc.mount("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, options)
    # POSIX shared memory of its own, writable also under a read-only root
    sc.mount("tmpfs", "/dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777")
    sc.mount(None, "/dev", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NOEXEC)


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def boot() -> NoReturn:
    """Entry point of ``python -I -S -B -c BOOT DIR FD``."""
    zygote(int(sys.argv[2]))
