"""The one way pytest-isolation runs a local command.

A command runs in its own session (process group) so that a timeout, an
interrupt or its end takes down everything it started.  On Linux the child is
watched through a pidfd and reaped with ``wait4``, which yields its exact CPU
time and peak memory (including waited-for descendants) at no extra cost.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CommandFailed, CommandTimeout

Command = str | Sequence[str]
#: Called with the pid of a started command; returns the callable run once it is gone.
SpawnHook = Callable[[int], Callable[[], None]]

_SAMPLE_EVERY = 0.02  # seconds between peak-memory samples of a running command
_DRAIN_GRACE = 2.0  # seconds to read output still buffered after a command's group is gone


@dataclass(frozen=True)
class ExecResult:
    """What a command did: exit status, output, and what it cost."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    cpu_time: float | None = None
    peak_memory: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> ExecResult:
        """Return ``self`` if the command succeeded, else raise :class:`CommandFailed`."""
        if not self.ok:
            raise CommandFailed(self.command, self.returncode, self.stdout, self.stderr)
        return self


@dataclass
class Usage:
    """What an environment cost: set-up time and what its commands used.

    ``peak_memory`` (bytes) and ``cpu_time`` (seconds) cover the commands run
    through the environment; they are ``None`` where they cannot be measured.
    """

    setup_duration: float = 0.0
    commands: int = 0
    command_time: float = 0.0
    cpu_time: float | None = None
    peak_memory: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def add(self, result: ExecResult) -> None:
        self.commands += 1
        self.command_time += result.duration
        if result.cpu_time is not None:
            self.cpu_time = (self.cpu_time or 0.0) + result.cpu_time
        if result.peak_memory is not None:
            self.peak_memory = max(self.peak_memory or 0, result.peak_memory)


def normalize_command(command: Command, *, shell: bool = False) -> list[str]:
    """An argv list: a string is split as a shell would, or run by one if ``shell`` is true."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command] if shell else shlex.split(command)
    if shell:
        raise TypeError("shell=True needs the command as one string")
    argv = [os.fspath(part) for part in command]
    if not argv:
        raise ValueError("cannot run an empty command")
    return argv


def execute(
    command: Command,
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    timeout: float | None = None,
    shell: bool = False,
    on_spawn: SpawnHook | None = None,
    preexec: Callable[[], None] | None = None,
) -> ExecResult:
    """Run ``command`` to completion and return its :class:`ExecResult`.

    Raises :class:`CommandTimeout` after ``timeout`` seconds, having killed the
    command's whole process group.  Whatever the command left running in its
    group when it exits is killed too.
    """
    argv = normalize_command(command, shell=shell)
    data = input.encode() if isinstance(input, str) else input
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # only the sandbox passes one: its child makes system calls, then forks or execs
        preexec_fn=preexec,  # noqa: PLW1509
    )
    forget = None
    try:
        forget = on_spawn(process.pid) if on_spawn else None
        outcome = _collect(process, data, None if timeout is None else started + timeout)
    finally:
        if process.returncode is None:  # interrupted before the command ended
            _kill_group(process)
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if forget:
            forget()
    stdout, stderr, returncode, cpu_time, peak = outcome
    duration = time.monotonic() - started
    if returncode is None:
        assert timeout is not None
        raise CommandTimeout(argv, timeout, stdout, stderr)
    return ExecResult(tuple(argv), returncode, stdout, stderr, duration, cpu_time, peak)


_Outcome = tuple[str, str, "int | None", "float | None", "int | None"]


def _collect(
    process: subprocess.Popen[bytes], data: bytes | None, deadline: float | None
) -> _Outcome:
    """Feed stdin, read stdout/stderr and reap the process; ``returncode`` is None on timeout."""
    assert process.stdout is not None
    assert process.stderr is not None
    if not hasattr(os, "pidfd_open"):  # pragma: no cover - non-Linux fallback
        return _collect_portable(process, data, deadline)
    out_fd, err_fd = process.stdout.fileno(), process.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    stdin_fd = process.stdin.fileno() if process.stdin is not None else -1
    pending = memoryview(data or b"")
    status: tuple[int, float, int] | None = None
    sampled = 0
    timed_out = False
    drain_until: float | None = None
    selector = selectors.DefaultSelector()
    pidfd = os.pidfd_open(process.pid)
    try:
        selector.register(out_fd, selectors.EVENT_READ)
        selector.register(err_fd, selectors.EVENT_READ)
        selector.register(pidfd, selectors.EVENT_READ)
        if process.stdin is not None:
            if pending:
                os.set_blocking(stdin_fd, False)
                selector.register(stdin_fd, selectors.EVENT_WRITE)
            else:
                process.stdin.close()
        while selector.get_map():
            limit = drain_until if status is not None else deadline
            wait = None if limit is None else max(0.0, limit - time.monotonic())
            if status is None:
                wait = _SAMPLE_EVERY if wait is None else min(wait, _SAMPLE_EVERY)
            events = selector.select(wait)
            if not events and status is None:
                sampled = max(sampled, _high_water_mark(process.pid))
            if not events and limit is not None and time.monotonic() >= limit:
                if status is not None:
                    break  # something outside the group holds the pipes: stop waiting for it
                timed_out = True
                _kill_group(process)
                selector.unregister(pidfd)
                status = _reap(process)
                drain_until = time.monotonic() + _DRAIN_GRACE
                continue
            for key, _ in events:
                if key.fd == pidfd:
                    selector.unregister(pidfd)
                    _kill_group(process)  # the leader is a zombie, so its group id is still ours
                    status = _reap(process)
                    drain_until = time.monotonic() + _DRAIN_GRACE
                elif key.fd == stdin_fd:
                    try:
                        pending = pending[os.write(stdin_fd, pending[:65536]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stdin_fd)
                        assert process.stdin is not None
                        process.stdin.close()
                else:
                    block = os.read(key.fd, 65536)
                    if block:
                        chunks[key.fd].append(block)
                    else:
                        selector.unregister(key.fd)
    finally:
        selector.close()
        os.close(pidfd)
    assert status is not None
    code, cpu_time, maxrss = status
    # After vfork/exec the child's ru_maxrss starts at the runner's own peak, so it
    # is the command's figure only when above that; otherwise use what was sampled.
    peak = maxrss if maxrss > _own_peak() else (sampled or None)
    stdout, stderr = _text(b"".join(chunks[out_fd])), _text(b"".join(chunks[err_fd]))
    return stdout, stderr, None if timed_out else code, cpu_time, peak


def _own_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _high_water_mark(pid: int) -> int:
    """The peak resident memory of ``pid``'s current program (VmHWM), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reap(process: subprocess.Popen[bytes]) -> tuple[int, float, int]:
    _, raw, rusage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(raw)
    # ru_maxrss is in kilobytes on Linux
    return process.returncode, rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss * 1024


def _collect_portable(
    process: subprocess.Popen[bytes], data: bytes | None, deadline: float | None
) -> _Outcome:  # pragma: no cover - exercised only where pidfds do not exist
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        out, err = process.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, err = process.communicate()
        return _text(out), _text(err), None, None, None
    return _text(out), _text(err), process.returncode, None, None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group while its leader is unreaped, then reap it.

    Once the leader is reaped its pid could be reused, so the group is never
    signalled after that.
    """
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _text(data: bytes) -> str:
    return data.decode(sys.getfilesystemencoding() if os.name == "nt" else "utf-8", "replace")
