"""The watchdog: reaps what a runner made the moment the runner dies.

Every process that creates environments (a pytest run, each pytest-xdist
worker, a script using IsolationManager) starts one watchdog, a small Python
process in a session of its own, so that killing the runner's process group
does not take it down.  The runner holds the write end of a pipe to the
watchdog's stdin; the kernel closes it when the runner dies, however it dies
(SIGKILL, the OOM killer, an IDE's stop button).  At EOF the watchdog waits
until the runner is really gone, then releases every ledger record the runner
owns (matched by pid *and* start time, so a reused pid never counts) and every
labelled object the ledger no longer lists, and exits.  After a clean end the
runner writes ``bye`` first, and the watchdog exits without touching anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_BYE = b"bye\n"
_POLL = 0.01


class Watchdog:
    """The runner's side: start the helper, say goodbye at a clean end."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @classmethod
    def start(cls, state_dir: Path, session: str, pid: int, started: float) -> Watchdog:
        command = [
            sys.executable,
            # this file, not ``-m``: the package would import every engine (0.2 s of CPU,
            # taken from the run's first environment) to wait on a pipe
            __file__,
            "--state-dir",
            str(state_dir),
            "--session",
            session,
            "--pid",
            str(pid),
            "--started",
            repr(started),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives a kill of the runner's process group
            close_fds=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Tell the watchdog the run ended cleanly, and let it go."""
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(_BYE)
                stdin.flush()
            with contextlib.suppress(OSError):
                stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _runner_gone(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) >= 0.05:
            return True  # the pid was reused: our runner is gone
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch(state_dir: Path, session: str, pid: int, started: float) -> int:
    """Block until the runner's pipe closes; reap unless it said goodbye."""
    received = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(0, 64):
            received += chunk
            if received.endswith(_BYE):
                return 0
    while not _runner_gone(pid, started):
        time.sleep(_POLL)  # the pipe closed early (closed fds): wait for the runner itself
    reap(state_dir, session, pid, started)
    return 0


def reap(state_dir: Path, session: str, pid: int, started: float) -> None:
    """Release what the runner ``pid`` (started at ``started``) left: its ledger records,
    then labelled objects of its session and pid that no record lists."""
    os.environ["PYTEST_ISOLATION_STATE_DIR"] = str(state_dir)
    from pytest_isolation.ledger import Ledger
    from pytest_isolation.manager import IsolationManager

    with IsolationManager(session_id=f"{session}-watchdog", ledger=Ledger(state_dir)) as manager:

        def owned(record: object) -> bool:
            owner = getattr(record, "owner", None)
            return (
                owner is not None
                and owner.session == session
                and owner.pid == pid
                and abs(owner.started - started) < 0.05
            )

        manager.sweep(select=owned)
        manager.sweep_labels(session=session, pid=pid)


def sweep_labels_in_background(state_dir: Path) -> subprocess.Popen[bytes]:
    """Sweep labelled leftovers of dead owners in a process of its own: it asks daemons and
    imports their SDKs, which the run need neither wait for nor hear (warnings)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest_isolation.watchdog",
            "--sweep-labels",
            "--state-dir",
            str(state_dir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_isolation.watchdog")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument(
        "--sweep-labels",
        action="store_true",
        help="only sweep labelled objects of dead owners, then exit",
    )
    parser.add_argument("--session")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--started", type=float)
    args = parser.parse_args(argv)
    if args.sweep_labels:
        os.environ["PYTEST_ISOLATION_STATE_DIR"] = str(args.state_dir)
        from pytest_isolation.manager import IsolationManager

        with IsolationManager(session_id="label-sweep") as manager:
            manager.sweep_labels()
        return 0
    if args.session is None or args.pid is None or args.started is None:
        parser.error("--session, --pid and --started are needed to watch a runner")
    # A Ctrl-C at the terminal is for the runner; the watchdog outlives it on purpose.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return watch(args.state_dir, args.session, args.pid, args.started)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] == here:
        # run as a file: its folder must not shadow top-level modules, and the package it
        # belongs to must be the one imported when it reaps
        sys.path[0] = os.path.dirname(here)
    raise SystemExit(main())
