"""Processes that left their command's process group: found, recorded and killed with their
environment.

A command of a ``basic`` or ``virtualenv`` environment runs in a process group
of its own, killed when the command ends.  A daemon leaves that group:
``setsid``, ``nohup sh -c '...' &``, a double fork,
``subprocess.Popen(..., start_new_session=True)``.  Such a process would
outlive its test, the run and every cleanup.  Three things bring it back:

* While it has environments of these engines, the runner is a *child
  subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): an orphaned descendant is
  re-parented to the runner instead of to init, so it is one of the runner's
  own children — cheap to list (``/proc/self/task/*/children``) and the
  runner's to reap.
* Every command of an environment carries a token, the variable
  ``PYTEST_ISOLATION_ENV``, which its descendants inherit and which
  ``/proc/PID/environ`` shows for as long as they run (Jenkins' process tree
  killer finds a build's processes by the same kind of cookie).
* The ledger record of the environment's directory names its token, and
  each orphan found after a command gets a ``process`` record.  Releasing the
  directory first kills every process carrying the token: at teardown among
  the runner's children, where the subreaper brought them; once the runner is
  gone (the watchdog, ``cleanup``, the next run's sweep) among every process
  of the machine.

A process is the runner's to reap only when it is provably an environment's:
it carries the token, or (a zombie, whose environment can no longer be read)
it was seen carrying it, or it belongs to a session one of the environment's
commands or orphans led.  Other children of the runner (a test's own
``subprocess.Popen``) are never waited for here.

Where a cgroup can be made, :class:`EnvironmentProcesses` is the one place it
plugs in: create and record it in :meth:`EnvironmentProcesses.start`, move
each command into it in :meth:`EnvironmentProcesses.spawned`, and kill it in
:func:`release_orphans`, which the release of the environment's directory
calls.  The subreaper stays useful beside it: it keeps the
zombies of killed daemons off init.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import IsolationError
from .ledger import process_started

if TYPE_CHECKING:
    from .engines.base import Resources

#: The variable every command of an environment carries; its value is the environment's token.
TOKEN_VARIABLE = "PYTEST_ISOLATION_ENV"

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_KILL_PATIENCE = 5.0  # seconds to keep killing what an environment left before giving up


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` this module needs."""

    pid: int
    state: str
    ppid: int
    session: int
    start: int  # clock ticks after boot: with the pid, names one process for good

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s state, parent, session and start time; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    return ProcStat(pid, fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19]))


def _environ(pid: int) -> bytes | None:
    """``pid``'s environment as the kernel shows it (NUL-separated), None if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return b"\0" + handle.read()
    except OSError:
        return None


def _marker(token: str) -> bytes:
    return f"\0{TOKEN_VARIABLE}={token}\0".encode()


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children files of each thread, breadth first)."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop()
        for child in _children_of(current):
            found.append(child)
            queue.append(child)
    return found


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                children += [int(word) for word in handle.read().split()]
        except OSError:
            continue
    return children


def _kill(pid: int, start: int) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``start``."""
    stat = proc_stat(pid)
    if stat is None or stat.start != start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


class Subreaper:
    """The runner's child-subreaper attribute, on while any local environment lives.

    The kernel keeps the attribute per process, so there is one of these per
    process (:data:`SUBREAPER`), shared by every manager in it.  It is turned
    off again when the last environment is gone, unless the process was a
    subreaper before (a container's init, a service manager).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._owned = False
        #: children already known to be none of an environment's: pid -> start
        self._foreign: dict[int, int] = {}
        #: children being waited for right now by :func:`~pytest_isolation.execution.execute`
        self._leaders: set[int] = set()

    def acquire(self) -> bool:
        """One more environment needs orphans brought back; returns whether they will be."""
        with self._lock:
            if self._users == 0 and not self._turn_on():
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0 and self._owned:
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)
                self._owned = False

    def _turn_on(self) -> bool:
        if self._owned:
            return True
        if not sys.platform.startswith("linux"):
            return False
        try:
            current = ctypes.c_int(0)
            got = _libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(current), 0, 0, 0)
            if got == 0 and current.value:
                return True  # one already, by someone else's choice: never turned off here
            if _prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
                return False
        except (OSError, AttributeError):
            return False
        self._owned = True
        return True

    def children(self) -> list[int]:
        """The runner's children: its commands, other code's, and adopted orphans."""
        return _children_of(os.getpid())

    def leading(self, pid: int) -> Callable[[], None]:
        """Mark ``pid`` as a command being waited for; returns the unmark."""
        with self._lock:
            self._leaders.add(pid)

        def done() -> None:
            with self._lock:
                self._leaders.discard(pid)

        return done

    def is_leader(self, pid: int) -> bool:
        with self._lock:
            return pid in self._leaders

    def foreign(self, stat: ProcStat) -> bool:
        with self._lock:
            return self._foreign.get(stat.pid) == stat.start

    def mark_foreign(self, stat: ProcStat) -> None:
        with self._lock:
            if len(self._foreign) > 4096:  # pids of long-gone children
                self._foreign.clear()
            self._foreign[stat.pid] = stat.start


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> int:
    return int(_libc().prctl(option, value, 0, 0, 0))


#: The one per process (see :class:`Subreaper`).
SUBREAPER = Subreaper()

#: Environments of this process whose processes are tracked, by token: teardown finds them here.
_LIVE: dict[str, EnvironmentProcesses] = {}
_LIVE_LOCK = threading.Lock()


class EnvironmentProcesses:
    """Everything the commands of one environment started, daemons included.

    Made by :meth:`start` before the environment's first command; commands
    carry :attr:`environ`, are reported to :meth:`spawned`, and :meth:`collect`
    runs after each.  Teardown happens when the environment's directory record,
    which names the token (``orphans``), is released (:func:`release_orphans`).
    """

    def __init__(self, resources: Resources, token: str, subreaper: bool) -> None:
        self.resources = resources
        self.token = token
        self.subreaper = subreaper
        self._marker = _marker(token)
        self._lock = threading.Lock()
        #: processes seen carrying the token: pid -> start
        self._known: dict[int, int] = {}
        #: sessions the environment's commands and orphans lead: pid -> start
        self._sessions: dict[int, int] = {}
        self._commands = 0  # none run: nothing can have been left

    @staticmethod
    def new_token() -> str:
        """A token for an environment: goes into its directory's ledger record
        (``orphans=TOKEN``) before :meth:`start`."""
        return uuid.uuid4().hex

    @classmethod
    def start(cls, resources: Resources, token: str) -> EnvironmentProcesses:
        """Bring orphans of the environment's commands back to this process from now on.

        ``token`` must already be in the ledger: in the ``orphans`` data of the
        environment's directory record.
        """
        processes = cls(resources, token, SUBREAPER.acquire())
        with _LIVE_LOCK:
            _LIVE[token] = processes
        return processes

    @property
    def environ(self) -> dict[str, str]:
        """Variables every command of the environment carries."""
        return {TOKEN_VARIABLE: self.token}

    def spawned(self, pid: int) -> Callable[[], None]:
        """A command started (an ``on_spawn`` hook): record its process group while it runs."""
        # (a cgroup of the environment would take ``pid`` here)
        stat = proc_stat(pid)
        with self._lock:
            self._commands += 1
            if stat is not None:
                self._sessions[pid] = stat.start
        unmark = SUBREAPER.leading(pid)
        forget = self.resources.track_process(pid)

        def done() -> None:
            unmark()
            forget()

        return done

    def collect(self) -> None:
        """After a command: record the orphans it left, reap those that have ended."""
        if not self.subreaper:
            return
        for pid in SUBREAPER.children():
            stat = proc_stat(pid)
            if stat is None or SUBREAPER.is_leader(pid) or SUBREAPER.foreign(stat):
                continue
            if stat.zombie:
                if self._owns_zombie(stat):
                    _reap(pid)
                continue
            with self._lock:
                if self._known.get(pid) == stat.start:
                    continue
            environ = _environ(pid)
            if environ is None:
                continue
            if self._marker in environ:
                self._adopt(stat)
            elif f"\0{TOKEN_VARIABLE}=".encode() not in environ:
                SUBREAPER.mark_foreign(stat)

    def _adopt(self, stat: ProcStat) -> None:
        with self._lock:
            self._known[stat.pid] = stat.start
            self._sessions.setdefault(stat.session, stat.start)
        started = process_started(stat.pid)
        if started is not None:
            self.resources.add("process", str(stat.pid), started=started, orphan=True)

    def _owns_zombie(self, stat: ProcStat) -> bool:
        with self._lock:
            if self._known.get(stat.pid) == stat.start:
                return True
            # a member of a session the environment led, started after its leader
            leader = self._sessions.get(stat.session)
            return leader is not None and leader <= stat.start

    def kill_all(self) -> None:
        """Kill and reap every process of the environment among this process's children
        (and their descendants); raises :class:`IsolationError` for survivors."""
        if not self._commands:
            return
        deadline = time.monotonic() + _KILL_PATIENCE
        while True:
            alive: list[ProcStat] = []
            for pid in SUBREAPER.children():
                stat = proc_stat(pid)
                if stat is None or SUBREAPER.is_leader(pid):
                    continue
                if stat.zombie:
                    if self._owns_zombie(stat):
                        _reap(pid)
                    continue
                with self._lock:
                    known = self._known.get(pid) == stat.start
                environ = None if known else _environ(pid)
                if known or (environ is not None and self._marker in environ):
                    alive.append(stat)
            if not alive:
                return
            if time.monotonic() > deadline:
                raise IsolationError(
                    f"processes of environment {self.resources.env_id} survived SIGKILL: "
                    f"{sorted(s.pid for s in alive)}"
                )
            for stat in alive:
                with self._lock:
                    self._known[stat.pid] = stat.start
                    self._sessions.setdefault(stat.session, stat.start)
                # descendants first seen now: their parents die, they come here next round
                for pid in _descendants(stat.pid):
                    child = proc_stat(pid)
                    if child is not None:
                        with self._lock:
                            self._known[pid] = child.start
                        _kill(pid, child.start)
                _kill(stat.pid, stat.start)
            for stat in alive:
                _reap(stat.pid, block_for=0.5)

    def close(self) -> None:
        """The environment is gone: stop bringing orphans back for it."""
        with _LIVE_LOCK:
            _LIVE.pop(self.token, None)
        if self.subreaper:
            self.subreaper = False
            SUBREAPER.release()


def _reap(pid: int, block_for: float = 0.0) -> None:
    """Wait for the ended child ``pid`` (for up to ``block_for`` seconds)."""
    deadline = time.monotonic() + block_for
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.001)


def started_here(pid: int, started: float) -> bool:
    """Whether the process ``pid`` that started at ``started`` is this one."""
    return pid == os.getpid() and abs(started - _own_start()) < 0.05


@functools.cache
def _own_start_of(pid: int) -> float:
    return process_started(pid) or 0.0


def _own_start() -> float:
    return _own_start_of(os.getpid())  # keyed by pid: a forked child asks anew


def release_orphans(token: str, *, made_here: bool = False) -> None:
    """Kill every process of the environment whose token is ``token`` (from a ledger record).

    In the runner that made the environment (``made_here``), among its
    children, where the subreaper brought them; anywhere else, among all
    processes.  A token not of the form this module makes is refused.
    """
    if not _TOKEN.match(token):
        raise IsolationError(f"refusing to release orphans of {token!r}: not a token of ours")
    if not sys.platform.startswith("linux"):
        return
    with _LIVE_LOCK:
        live = _LIVE.get(token)
    if live is not None and live.subreaper:
        try:
            live.kill_all()
        finally:
            live.close()
        return
    if live is not None:
        live.close()
    elif made_here:
        return  # never started (set-up failed before), or already torn down
    kill_token_holders(token)


def kill_token_holders(token: str, patience: float = _KILL_PATIENCE) -> None:
    """Kill every process of the machine that carries ``token``, and their descendants,
    until none is left; raises :class:`IsolationError` for survivors."""
    marker = _marker(token)
    deadline = time.monotonic() + patience
    while True:
        holders = list(_holders(marker, _all_pids()))
        if not holders:
            return
        if time.monotonic() > deadline:
            raise IsolationError(
                f"processes carrying {TOKEN_VARIABLE}={token} survived SIGKILL: "
                f"{sorted(s.pid for s in holders)}"
            )
        for stat in holders:
            for pid in _descendants(stat.pid):
                child = proc_stat(pid)
                if child is not None:
                    _kill(pid, child.start)
            _kill(stat.pid, stat.start)
            if stat.ppid == os.getpid():
                _reap(stat.pid, block_for=0.5)
        time.sleep(0.005)


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError as exc:  # pragma: no cover - /proc is always there on Linux
        if exc.errno == errno.ENOENT:
            return []
        raise


def _holders(marker: bytes, pids: Iterable[int]) -> Iterable[ProcStat]:
    own = os.getpid()
    for pid in pids:
        if pid == own:
            continue
        environ = _environ(pid)
        if environ is None or marker not in environ:
            continue
        stat = proc_stat(pid)
        if stat is not None and not stat.zombie:
            yield stat
