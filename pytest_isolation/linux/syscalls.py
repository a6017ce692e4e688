"""The Linux system calls the sandbox makes that Python's ``os`` module lacks (before 3.12).

Standard library only, through ``ctypes``: this module is imported both by the
runner and by the sandbox's init program (``sandbox_init.py``), which runs in a
fresh interpreter started with ``-I -S`` and sees nothing but the standard
library.  Every wrapper raises :class:`OSError` with the call's name and errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import signal
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: every namespace flag: what the seccomp filter refuses to clone or unshare
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
    0x00000080,  # CLONE_NEWTIME
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# the new mount API and openat2: the same numbers on every architecture but alpha
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _path(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(libc().setns(fd, nstype), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        libc().mount(
            _path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), _path(data)
        ),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(libc().umount2(_path(target), flags), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def clone_tree(source: str, userns_fd: int | None = None, *, readonly: bool = False) -> int:
    """A detached copy of the mounts at ``source`` (``open_tree``, Linux 5.2+), to attach
    with :func:`attach_tree` once ``source`` may be out of sight.

    With ``userns_fd``, its ownership is mapped through that user namespace (an
    idmapped mount, Linux 5.12+, on file systems that allow it), which needs
    CAP_SYS_ADMIN in the user namespace of ``source``'s file system (host root).
    """
    c = libc()
    tree = _check(
        c.syscall(
            _SYS_OPEN_TREE,
            -100,  # AT_FDCWD
            _path(source),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
        ),
        f"open_tree {source}",
    )
    if userns_fd is None:
        return tree
    try:
        flags = MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0)
        attr = _MountAttr(flags, 0, 0, userns_fd)
        _check(
            c.syscall(
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                AT_EMPTY_PATH | AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"mount_setattr {source}",
        )
    except BaseException:
        os.close(tree)
        raise
    return tree


def make_readonly(path: str) -> None:
    """Make every mount at and below ``path`` read-only in one call (``mount_setattr``
    with ``AT_RECURSIVE``, Linux 5.12+); raises :class:`OSError` (``ENOSYS`` before)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        libc().syscall(
            _SYS_MOUNT_SETATTR,
            -100,  # AT_FDCWD
            _path(path),
            AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


def attach_tree(tree: int, target: str) -> None:
    """Mount the detached tree ``tree`` (from :func:`clone_tree`) at ``target``."""
    _check(
        libc().syscall(_SYS_MOVE_MOUNT, tree, b"", -100, _path(target), MOVE_MOUNT_F_EMPTY_PATH),
        f"move_mount {target}",
    )


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """``openat2(2)``: open ``path`` relative to ``dir_fd`` under the ``resolve`` rules.

    Raises :class:`OSError`; ``ENOSYS`` where the kernel is older than 5.6.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    return _check(
        libc().syscall(
            _SYS_OPENAT2,
            dir_fd,
            _path(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        f"openat2 {path}",
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> None:
    _check(
        libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0),
        what,
    )


def set_parent_death_signal(signum: int = signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, signum, what="prctl(PR_SET_PDEATHSIG)")


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1, what="prctl(PR_SET_CHILD_SUBREAPER)")


def set_dumpable(dumpable: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(dumpable), what="prctl(PR_SET_DUMPABLE)")


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one Linux 5.9 knows


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable capability sets:
    nothing this process or what it executes does can gain one back (with no_new_privs)."""
    for capability in range(last_capability() + 1):
        try:
            prctl(PR_CAPBSET_DROP, capability, what="prctl(PR_CAPBSET_DROP)")
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a capability this kernel does not know
                raise
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="prctl(PR_CAP_AMBIENT)")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc().capset(ctypes.byref(header), data), "capset")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def load_seccomp(program: bytes) -> None:
    """Install a compiled seccomp-bpf ``program`` (8-byte ``struct sock_filter`` entries) on
    this thread; needs no_new_privs first.  Inherited by every child, kept across exec."""
    if not program or len(program) % 8:
        raise ValueError(f"not a BPF program: {len(program)} bytes")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p).value)
    _check(
        libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))
