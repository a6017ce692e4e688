"""Running a test's own body inside its environment, reported as if it ran in-process.

The runner forks; the child enters the environment (``env.enter()``) and runs
the test protocol (setup, call, teardown) there.  Its reports travel back
through a pipe, serialized by pytest's own report hooks (as pytest-xdist
does), and the parent logs them.  A child that dies before reporting —
a crash, a signal, the out-of-memory killer, a timeout — becomes a failure
that says which, and the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .engines.base import IsolatedEnvironment

_CHILD_FAILED = 70  # the child's exit status when it could not run the protocol at all


@dataclass
class Outcome:
    """What came back from the child: reports, or how it died."""

    reports: list[pytest.TestReport]
    status: int | None  # exit status of the child (128 + signal), None when not waited for
    timed_out: bool
    error: str  # the child's own traceback, when the protocol could not run


def run_forked(
    item: pytest.Item, nextitem: pytest.Item | None, env: IsolatedEnvironment
) -> Outcome:
    """Fork, enter ``env`` in the child, run ``item``'s protocol there."""
    read, write = os.pipe()
    with env.forking():
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its effects are checked by the parent
        os.close(read)
        _child(item, nextitem, env.enter, write)
    os.close(write)
    data, timed_out = _read_all(read, pid, env.spec.limits.timeout)
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = {}
    # The child is a process of the sandbox's PID namespace: until it is reaped the
    # namespace cannot end, so it is reaped now, before the environment's teardown.
    _, status = os.waitpid(pid, 0)
    code: int | None = (
        128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    )
    reports: list[pytest.TestReport] = []
    for serialized in payload.get("reports", []):
        if isinstance(serialized.get("longrepr"), list):
            # JSON has no tuples; a skip's (path, line, reason) must be one again
            serialized["longrepr"] = tuple(serialized["longrepr"])
        report = item.config.hook.pytest_report_from_serializable(
            config=item.config, data=serialized
        )
        reports.append(report)
    error = payload.get("error", "")
    return Outcome(reports, code, timed_out, error)


def _child(
    item: pytest.Item, nextitem: pytest.Item | None, enter: Callable[[], None], write: int
) -> None:  # pragma: no cover - runs in the forked child
    payload: dict[str, object]
    try:
        enter()
        reports = run_protocol(item, nextitem)
        hook = item.config.hook
        payload = {
            "reports": [
                hook.pytest_report_to_serializable(config=item.config, report=report)
                for report in reports
            ]
        }
    except BaseException:
        payload = {"error": traceback.format_exc()}
    data = json.dumps(payload).encode()
    with contextlib.suppress(OSError):
        view = memoryview(data)
        while view:
            view = view[os.write(write, view) :]
    os._exit(0 if "reports" in payload else _CHILD_FAILED)


def run_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> list[pytest.TestReport]:
    """setup, call, teardown of ``item`` with reports made but not logged."""
    reports = [_call_and_report(item, "setup")]
    if reports[0].passed:
        reports.append(_call_and_report(item, "call"))
    reports.append(_call_and_report(item, "teardown", nextitem=nextitem))
    return reports


def _call_and_report(
    item: pytest.Item, when: str, nextitem: pytest.Item | None = None
) -> pytest.TestReport:
    hook = getattr(item.ihook, f"pytest_runtest_{when}")
    kwargs = {"nextitem": nextitem} if when == "teardown" else {}
    call = pytest.CallInfo.from_call(
        lambda: hook(item=item, **kwargs),
        when=when,  # type: ignore[arg-type]
        reraise=(pytest.exit.Exception, KeyboardInterrupt),
    )
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report


def _read_all(fd: int, pid: int, timeout: float | None) -> tuple[bytes, bool]:
    """Read the child's reports until EOF; on timeout kill its process group."""
    chunks = []
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([pipe], [], [], wait)
            if not ready:
                timed_out = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            block = pipe.read(65536)
            if not block:
                break
            chunks.append(block)
    return b"".join(chunks), timed_out


def failure_report(item: pytest.Item, when: str, message: str) -> pytest.TestReport:
    """A failed report for ``item`` whose text is ``message`` alone (no traceback)."""
    call = pytest.CallInfo.from_call(
        lambda: pytest.fail(message, pytrace=False),
        when=when,  # type: ignore[arg-type]
    )
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report
