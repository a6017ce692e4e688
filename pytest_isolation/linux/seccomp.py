"""The sandbox's seccomp filter: the system calls that containers deny by default.

Compiled once per run with libseccomp (through ``pyseccomp``), which knows each
architecture's system call numbers, and handed to the sandbox as a BPF program
that :func:`pytest_isolation.linux.syscalls.load_seccomp` installs — the way
bubblewrap takes ``--seccomp FD``.

It is a deny list on top of what the sandbox already removes (capabilities,
no_new_privs, a user namespace): every call here either needs a capability the
sandbox never has, and is refused anyway, or reaches kernel surface that a test
never needs and that exploits favour.  A denied call fails with ``EPERM``
(``clone3`` with ``ENOSYS``, so that the C library falls back to ``clone``,
whose flags the filter can read), never kills the process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile

from .syscalls import NAMESPACE_FLAGS

#: Denied outright: mounts and root changes, kernel modules and reboots, the clock,
#: keyrings, BPF, perf events, userfaultfd, io_uring, raw I/O ports, file handles.
DENIED = (
    # mounts and the file system tree
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # namespaces of other processes
    "setns",
    # the kernel itself
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "_sysctl",
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    # the clock
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    # keyrings, BPF, perf, userfaultfd, io_uring, fanotify, file handles
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    "open_by_handle_at",
)

#: ioctl requests refused on every descriptor: pushing input into a terminal the sandbox
#: shares (TIOCSTI, bubblewrap's CVE-2017-5226) and the Linux console's TIOCLINUX.
DENIED_IOCTLS = (0x5412, 0x541C)


class SeccompUnavailable(RuntimeError):
    """libseccomp (or its Python binding) cannot be loaded here."""


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program: 8-byte ``struct sock_filter`` entries for this machine's
    architecture and its compat ones (x86 and x32 beside x86_64, arm beside aarch64).

    Raises :class:`SeccompUnavailable` with the reason when libseccomp cannot be loaded.
    """
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError, AttributeError, TypeError) as exc:
        # pyseccomp loads libseccomp.so.2 when imported: a missing library surfaces here
        raise SeccompUnavailable(
            f"libseccomp cannot be loaded ({exc}); install it "
            "(Debian/Ubuntu: apt-get install libseccomp2; Fedora: dnf install libseccomp)"
        ) from exc
    eperm = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    native = seccomp.system_arch()
    compat = {
        seccomp.Arch.X86_64: (seccomp.Arch.X86, seccomp.Arch.X32),
        seccomp.Arch.AARCH64: (seccomp.Arch.ARM,),
    }.get(native, ())
    for arch in compat:
        # libseccomp without that compat architecture: its calls are killed instead
        with contextlib.suppress(OSError):
            rules.add_arch(arch)

    def number(name: str) -> int | None:
        resolved = int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name))
        return None if resolved == -1 else resolved  # -1: unknown to this libseccomp

    for name in DENIED:
        call = number(name)
        if call is not None:
            rules.add_rule(eperm, call)
    for name in ("clone", "unshare"):
        call = number(name)
        if call is None:
            continue
        # clone's flags are its first argument on most architectures; libseccomp does not
        # reorder them, so on s390 (flags second) these rules do not match and clone runs
        for flag in NAMESPACE_FLAGS:
            rules.add_rule(eperm, call, seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    clone3 = number("clone3")
    if clone3 is not None:
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), clone3)
    ioctl = number("ioctl")
    if ioctl is not None:
        for request in DENIED_IOCTLS:
            rules.add_rule(eperm, ioctl, seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    with tempfile.TemporaryFile() as compiled:
        rules.export_bpf(compiled)
        compiled.seek(0)
        program = compiled.read()
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp produced no usable program ({len(program)} bytes)")
    return program


def describe() -> str:
    """One line for ``doctor``: what the filter denies, or why there is none."""
    try:
        program = filter_program()
    except SeccompUnavailable as exc:
        return f"unavailable: {exc}"
    return (
        f"{len(DENIED)} system calls, namespace flags of clone/unshare and "
        f"{len(DENIED_IOCTLS)} ioctls denied ({len(program) // 8} BPF instructions, "
        f"{os.uname().machine})"
    )
