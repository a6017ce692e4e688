"""Reading and writing files strictly beneath a directory that an environment controls.

A command in an environment can plant symbolic links (``ln -s /etc/passwd
out.txt``) or hard links in its workspace, then wait for the test to write or
read "its" file.  Every path here is resolved one directory descriptor at a
time, never through a link that leaves the directory: with ``openat2`` and
``RESOLVE_BENEATH`` where the kernel has it (Linux 5.6+: links that stay
inside are followed), otherwise by a walk that refuses every symbolic link
(``O_NOFOLLOW`` at each step).  Writes go to a new file that is then renamed
over the target, so nothing is ever written through an existing inode (a hard
link to a file elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import IsolationError
from .linux.syscalls import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, openat2

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@functools.cache
def _has_openat2() -> bool:
    """Whether this kernel has openat2 (Linux 5.6+)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.close(openat2(-100, "/", _DIRECTORY, 0, RESOLVE_BENEATH))  # -100: AT_FDCWD
    except OSError as exc:
        return exc.errno != errno.ENOSYS
    return True


class OutsideWorkspace(IsolationError):
    """A path that would leave the environment's directory (a link planted inside)."""


def read_beneath(root: Path, parts: Sequence[str]) -> bytes:
    """The bytes of ``root/parts...``; raises :class:`OutsideWorkspace` for a path that
    leaves ``root`` and :class:`FileNotFoundError` for one that is not there."""
    with _directory(root, parts[:-1], create=False) as parent:
        fd = _open(parent, parts[-1], os.O_RDONLY | os.O_CLOEXEC, root, parts)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()


def write_beneath(
    root: Path, parts: Sequence[str], data: bytes, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``root/parts...`` by a new file holding ``data`` (parents made as needed),
    owned by ``owner`` (uid, gid) when given; raises :class:`OutsideWorkspace`."""
    with _directory(root, parts[:-1], create=True, owner=owner) as parent:
        temporary = f".{parts[-1]}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o644, dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if owner is not None:
                    os.fchown(handle.fileno(), *owner)
            os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=parent)
            raise


@contextlib.contextmanager
def _directory(
    root: Path, parts: Sequence[str], *, create: bool, owner: tuple[int, int] | None = None
) -> Iterator[int]:
    """A descriptor of the directory ``root/parts...``, reached beneath ``root``."""
    current = os.open(root, _DIRECTORY | os.O_NOFOLLOW)
    try:
        for index, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=current)
                except FileExistsError:
                    pass
                else:
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=current, follow_symlinks=False)
            following = _open(current, part, _DIRECTORY, root, parts[: index + 1])
            os.close(current)
            current = following
        yield current
    finally:
        os.close(current)


def _open(parent: int, name: str, flags: int, root: Path, parts: Sequence[str]) -> int:
    try:
        if _has_openat2():
            return openat2(parent, name, flags, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        # EXDEV: openat2 met a link out of the directory; ELOOP: a link where none may be
        if exc.errno in (errno.EXDEV, errno.ELOOP) or (
            exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY and _is_link(parent, name)
        ):
            where = root.joinpath(*parts)
            raise OutsideWorkspace(
                f"refusing {where}: it is a link that leaves {root} (planted by a command "
                "in the environment?); read or write it from inside with env.run()"
            ) from None
        if exc.errno == errno.ENOENT:
            missing = str(root.joinpath(*parts))
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), missing) from None
        raise


def _is_link(parent: int, name: str) -> bool:
    try:
        os.readlink(name, dir_fd=parent)
    except OSError:
        return False
    return True
