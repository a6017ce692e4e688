"""Inside mode's fork transport: a worker forked from the runner into an environment on
this machine (the sandbox), started ahead of its turn.

A worker is forked, enters its environment and prepares its protocol while the
test before it still runs; then it waits on a pipe for its turn.  What a fork of
a large runner costs (copying its page tables), and what entering a sandbox
costs, is paid on another core beside the previous test instead of between two
tests.  A worker whose turn never comes (the run stopped, ``-x``) sees the pipe
close and exits without a word.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import worker
from .channel import Channel

if TYPE_CHECKING:
    import pytest

    from ..engines.base import IsolatedEnvironment

_GO = b"g"


class ForkedWorker:
    """One forked worker: its process, the channel its events come on, its turn."""

    def __init__(self, pid: int, channel: Channel, turn: int) -> None:
        self.pid = pid
        self.channel = channel
        self._turn = turn  # the write end; closed once the worker may run (or never will)

    @classmethod
    def start(
        cls,
        item: pytest.Item,
        env: IsolatedEnvironment,
        relay: worker.Relay,
        coverage: Path,
        *,
        others: Iterable[int] = (),
    ) -> ForkedWorker:
        """Fork a worker that enters ``env``, prepares ``item``'s protocol and waits for
        :meth:`go`.  ``others`` are the runner's descriptors of other workers, closed in
        the child.  Raises ``OSError`` when the fork fails."""
        events_read, events_write = os.pipe()
        turn_read, turn_write = os.pipe()
        pid = -1
        try:
            with env.forking(), _quiet_fork_warning():
                gc.freeze()  # the worker does not touch (and copy) the runner's objects
                try:
                    pid = os.fork()
                finally:
                    if pid != 0:
                        gc.unfreeze()
        except BaseException:
            for fd in (events_read, events_write, turn_read, turn_write):
                os.close(fd)
            raise
        if pid == 0:  # pragma: no cover - the worker; its events are checked by the runner
            for fd in (events_read, turn_write, *others):
                with contextlib.suppress(OSError):
                    os.close(fd)
            worker.run(
                item, env, Channel(events_write), relay, coverage, turn=lambda: _turn(turn_read)
            )
        os.close(events_write)
        os.close(turn_read)
        return cls(pid, Channel(events_read), turn_write)

    def descriptors(self) -> list[int]:
        """The runner's descriptors of this worker (for other workers to close)."""
        return [fd for fd in (self.channel.fd, self._turn) if fd >= 0]

    def go(self) -> None:
        """Let the worker run its test (again: nothing)."""
        if self._turn >= 0:
            with contextlib.suppress(OSError):  # a worker that died waiting: its end says so
                os.write(self._turn, _GO)
            self._close_turn()

    def end(self, *, kill: bool) -> int:
        """Reap the worker, killing its process group first when ``kill``; its exit
        status, a death by signal as 128 + signal.  A worker that never went is
        told so (it exits without running anything)."""
        self._close_turn()
        self.channel.close()
        if kill:
            for target in (-self.pid, self.pid):  # the worker leads its own process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(target, signal.SIGKILL)
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                return 0
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)

    def _close_turn(self) -> None:
        if self._turn >= 0:
            os.close(self._turn)
            self._turn = -1


def _turn(fd: int) -> bool:
    """In the worker: wait until the runner says go (True) or lets it go (False)."""
    try:
        return os.read(fd, 1) == _GO
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_fork_warning() -> Iterator[None]:
    """Python 3.12+ warns when a multi-threaded process forks; the fork is the plugin's,
    and the worker touches nothing of the other threads: not the user's warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r".*use of fork\(\) may lead to deadlocks",
            category=DeprecationWarning,
        )
        yield
