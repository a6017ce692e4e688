"""The one way pytest-isolation runs a command and collects what it did.

A local command runs in its own session (process group) so that a timeout, an
interrupt or its end takes down everything it started.  It is watched through
a pidfd and reaped with ``wait4``, which yields its exact CPU time and peak
memory (including waited-for descendants) at no extra cost.  :func:`collect`
is the one loop that feeds a command's input and reads its output, for local
commands and for those a sandbox runs (see :class:`Running`).
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
from typing import Protocol

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
    )
    forget = None
    local = _Local(process)
    try:
        forget = on_spawn(process.pid) if on_spawn else None
        assert process.stdout is not None
        assert process.stderr is not None
        stdin = None
        if process.stdin is not None:  # collect() owns and closes the one it is given
            stdin = os.dup(process.stdin.fileno())
            process.stdin.close()
        outcome = collect(
            local,
            stdin=stdin,
            stdout=process.stdout.fileno(),
            stderr=process.stderr.fileno(),
            data=data,
            deadline=None if timeout is None else started + timeout,
        )
    finally:
        if process.returncode is None:  # interrupted before the command ended
            local.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if forget:
            forget()
    return outcome.result(argv, started, timeout)


@dataclass(frozen=True)
class Exited:
    """How a command ended: its exit status and what it used, where known."""

    returncode: int
    cpu_time: float | None = None
    peak_memory: int | None = None


class Running(Protocol):
    """A started command, as :func:`collect` watches it: local or in a sandbox."""

    def exit_fd(self) -> int:
        """A descriptor that becomes readable when the command may have ended."""

    def poll(self) -> Exited | None:
        """The command's end, once :meth:`exit_fd` is readable; ``None`` if not yet."""

    def wait(self) -> Exited:
        """Block until the command has ended (after :meth:`kill`)."""

    def kill(self) -> None:
        """Kill the command and everything it started, now."""

    def sample_peak(self) -> int:
        """The command's peak memory so far in bytes, 0 where it cannot be read."""


@dataclass(frozen=True)
class Outcome:
    """What :func:`collect` saw: the output, and the end (``None`` after a timeout)."""

    stdout: str
    stderr: str
    exited: Exited | None

    def result(self, argv: Sequence[str], started: float, timeout: float | None) -> ExecResult:
        """The :class:`ExecResult`; raises :class:`CommandTimeout` if the command timed out."""
        if self.exited is None:
            assert timeout is not None
            raise CommandTimeout(list(argv), timeout, self.stdout, self.stderr)
        return ExecResult(
            tuple(argv),
            self.exited.returncode,
            self.stdout,
            self.stderr,
            time.monotonic() - started,
            self.exited.cpu_time,
            self.exited.peak_memory,
        )


class _Local:
    """A command run by this process, watched through a pidfd and reaped with ``wait4``,
    which yields its exact CPU time and peak memory."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._pidfd: int | None = None

    def exit_fd(self) -> int:
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.process.pid)
        return self._pidfd

    def poll(self) -> Exited:
        self.kill()  # the leader is a zombie, so its group id is still ours
        return self.wait()

    def wait(self) -> Exited:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        _, raw, rusage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(raw)
        # After vfork/exec the child's ru_maxrss starts at the runner's own peak, so it
        # is the command's figure only when above that (ru_maxrss is in kilobytes).
        maxrss = rusage.ru_maxrss * 1024
        peak = maxrss if maxrss > _own_peak() else None
        return Exited(self.process.returncode, rusage.ru_utime + rusage.ru_stime, peak)

    def kill(self) -> None:
        """SIGKILL the command's process group while its leader is unreaped.

        Once the leader is reaped its pid could be reused, so the group is never
        signalled after that.
        """
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def sample_peak(self) -> int:
        return _high_water_mark(self.process.pid)


def collect(
    running: Running,
    *,
    stdin: int | None,
    stdout: int,
    stderr: int,
    data: bytes | None,
    deadline: float | None,
) -> Outcome:
    """Feed ``data`` to ``stdin``, read ``stdout``/``stderr`` and wait for the command's end;
    past ``deadline`` (a ``time.monotonic()`` value) kill it.  Closes ``stdin`` once written."""
    chunks: dict[int, list[bytes]] = {stdout: [], stderr: []}
    pending = memoryview(data or b"")
    exited: Exited | None = None
    sampled = 0
    timed_out = False
    drain_until: float | None = None
    exit_fd = running.exit_fd()
    selector = selectors.DefaultSelector()
    try:
        selector.register(stdout, selectors.EVENT_READ)
        selector.register(stderr, selectors.EVENT_READ)
        selector.register(exit_fd, selectors.EVENT_READ)
        if stdin is not None:
            if pending:
                os.set_blocking(stdin, False)
                selector.register(stdin, selectors.EVENT_WRITE)
            else:
                os.close(stdin)
                stdin = None
        while selector.get_map():
            limit = drain_until if exited is not None else deadline
            wait = None if limit is None else max(0.0, limit - time.monotonic())
            if exited is None:
                wait = _SAMPLE_EVERY if wait is None else min(wait, _SAMPLE_EVERY)
            events = selector.select(wait)
            if not events and exited is None:
                sampled = max(sampled, running.sample_peak())
            if not events and limit is not None and time.monotonic() >= limit:
                if exited is not None:
                    break  # something outside the group holds the pipes: stop waiting for it
                timed_out = True
                running.kill()
                selector.unregister(exit_fd)
                exited = running.wait()
                drain_until = time.monotonic() + _DRAIN_GRACE
                continue
            for key, _ in events:
                if key.fd == exit_fd:
                    ended = running.poll()
                    if ended is None:
                        continue
                    selector.unregister(exit_fd)
                    exited = ended
                    drain_until = time.monotonic() + _DRAIN_GRACE
                elif key.fd == stdin:
                    try:
                        pending = pending[os.write(stdin, pending[:65536]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stdin)
                        os.close(stdin)
                        stdin = None
                else:
                    block = os.read(key.fd, 65536)
                    if block:
                        chunks[key.fd].append(block)
                    else:
                        selector.unregister(key.fd)
    finally:
        selector.close()
        if stdin is not None:
            os.close(stdin)
    assert exited is not None
    if exited.peak_memory is None and sampled:
        exited = Exited(exited.returncode, exited.cpu_time, sampled)
    out, err = _text(b"".join(chunks[stdout])), _text(b"".join(chunks[stderr]))
    return Outcome(out, err, None if timed_out else exited)


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


def _text(data: bytes) -> str:
    return data.decode(sys.getfilesystemencoding() if os.name == "nt" else "utf-8", "replace")
