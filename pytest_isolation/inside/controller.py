"""The runner's side of inside mode: start the test where its environment is, fire what
comes back as if the test had run here, and turn every way it can go wrong into the
report the user would have had in-process.

One item at a time: the environment is made here (its set-up is the item's
set-up), the transport starts the worker (a fork for the sandbox), and the
worker's events are fired again in this process — so the terminal, junitxml,
the warnings summary, ``-x`` and every other plugin see them as their own.
The runner keeps its own setup stack in step: the fixtures it set up for
earlier tests are torn down here, when the next item no longer needs them, as
pytest would have done.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from . import worker
from .channel import ChannelClosed
from .fork import ForkedWorker

if TYPE_CHECKING:
    from ..engines.base import IsolatedEnvironment


class Host(Protocol):
    """What the controller needs of the plugin's per-run state."""

    def inside_environment(self, item: pytest.Item) -> IsolatedEnvironment:
        """Make ``item``'s environment (its set-up); raise as a fixture would."""

    def finish_environment(self, item: pytest.Item, env: IsolatedEnvironment) -> None:
        """Tear ``env`` down (or keep it); raises ``TeardownError``."""

    def log(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """Log ``report`` for ``item`` (``pytest_runtest_logreport``)."""

    def runs_inside(self, item: pytest.Item) -> bool:
        """Whether ``item``'s body runs inside its environment."""


@dataclass
class _Run:
    """What came back from one worker."""

    started: bool = False
    phases: set[str] = field(default_factory=set)
    held: pytest.TestReport | None = None  # the last teardown report, until the runner's own
    finished: bool = False
    done: dict[str, Any] | None = None
    error: str = ""
    timed_out: bool = False
    status: int | None = None
    interrupted: BaseException | None = None  # what stopped the runner while it waited


@dataclass
class _Ready:
    """An item's environment made and its worker waiting for its turn, or why not."""

    item: pytest.Item
    made: pytest.CallInfo[tuple[IsolatedEnvironment, ForkedWorker]]
    coverage: Path

    def descriptors(self) -> list[int]:
        return [] if self.made.excinfo is not None else self.made.result[1].descriptors()


class Controller:
    """Runs items inside their environments, one at a time, for one pytest run.

    While one test runs, the next one's environment is made and its worker forked
    and waiting (see :mod:`.fork`); when the test is done the next one starts at
    once, and the finished test's environment is torn down beside it.  Reports are
    fired in the order pytest would fire them: the next test's events wait in their
    channel until the previous test's teardown is logged.
    """

    def __init__(self, config: pytest.Config, host: Host) -> None:
        self.config = config
        self.host = host
        self.relay = worker.Relay(config)
        self._ahead: _Ready | None = None  # the next item, made and waiting for its turn
        config.pluginmanager.register(self.relay, "isolation-relay")

    def run(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """The whole protocol of ``item`` (set-up, call, teardown, log) inside its
        environment; raises what pytest would have raised in-process (``pytest.exit``,
        ``KeyboardInterrupt``)."""
        self._lossy: set[str] = set()
        ready = self._take_ahead(item) or self._prepare(item)
        if ready.made.excinfo is not None:  # skipped, unavailable or failed to make
            self._without_worker(item, nextitem, ready.made)
            return
        env, started = ready.made.result
        run = _Run()
        try:
            started.go()
            if nextitem is not None and self.host.runs_inside(nextitem):
                self._ahead = self._prepare(nextitem)
            self._follow(item, env, started, run)
        except BaseException as exc:  # the runner was stopped while it waited
            run.interrupted = exc
        self._finish(item, nextitem, ready, run)

    def close(self) -> None:
        """Let a worker made ahead go unused (the run stopped before its turn) and tear
        its environment down."""
        ready, self._ahead = self._ahead, None
        if ready is None or ready.made.excinfo is not None:
            return
        env, started = ready.made.result
        started.end(kill=True)
        try:
            self.host.finish_environment(ready.item, env)
        except Exception as exc:  # no test to report it on: the run's warnings say it
            self._warn(
                ready.item,
                f"the environment of {ready.item.nodeid}, made ahead and "
                f"never used, could not be torn down: {exc}",
            )

    # --- make an environment and start its worker ---

    def _take_ahead(self, item: pytest.Item) -> _Ready | None:
        ready, self._ahead = self._ahead, None
        if ready is not None and ready.item is not item:  # not the item the runner expected
            self._ahead = ready
            self.close()
            return None
        return ready

    def _prepare(self, item: pytest.Item) -> _Ready:
        """Make ``item``'s environment and fork its worker, waiting for its turn; how
        that went, as pytest's record of a set-up."""
        coverage: list[Path] = []

        def make() -> tuple[IsolatedEnvironment, ForkedWorker]:
            env = self.host.inside_environment(item)
            coverage.append(Path(env.path or env.id))
            try:
                return env, self._fork(item, env, coverage[0])
            except BaseException:
                with contextlib.suppress(Exception):  # the fork's error is the one to see
                    self.host.finish_environment(item, env)
                raise

        made = pytest.CallInfo.from_call(
            make, when="setup", reraise=(pytest.exit.Exception, KeyboardInterrupt)
        )
        return _Ready(item, made, coverage[0] if coverage else Path())

    def _fork(self, item: pytest.Item, env: IsolatedEnvironment, coverage: Path) -> ForkedWorker:
        factory = getattr(self.config, "_tmp_path_factory", None)  # pytest's, no public API
        if factory is not None:
            factory.getbasetemp()  # made here once, so that workers share it
        others = self._ahead.descriptors() if self._ahead is not None else []
        return ForkedWorker.start(item, env, self.relay, coverage, others=others)

    @property
    def in_worker(self) -> bool:
        """True in a worker running its test: the plugin's own protocol hook steps aside."""
        return self.relay.channel is not None

    # --- follow a worker ---

    def _follow(
        self, item: pytest.Item, env: IsolatedEnvironment, started: ForkedWorker, run: _Run
    ) -> None:
        """Fire the worker's events here until it is done, dies, or runs out of time."""
        limit = env.spec.limits.timeout
        deadline = None if limit is None else time.monotonic() + limit
        channel = started.channel
        while run.done is None:
            try:
                event = channel.receive(deadline)
            except ChannelClosed:
                break
            if event is None:
                run.timed_out = True
                break
            self._fire(item, event, run)

    def _fire(self, item: pytest.Item, event: dict[str, Any], run: _Run) -> None:
        name = event["event"]
        ihook = item.ihook
        if name == "logstart":
            run.started = True
            ihook.pytest_runtest_logstart(nodeid=event["nodeid"], location=_location(event))
        elif name == "logreport":
            report = self._report(item, event)
            self._release_held(item, run)
            if report.nodeid == item.nodeid and report.when == "teardown":
                run.held = report  # logged once the runner's own teardown is known
            else:
                self.host.log(item, report)
            if report.nodeid == item.nodeid:
                run.phases.add(report.when)
        elif name == "warning":
            message = worker.deserialize_warning(event["warning"])
            self.config.hook.pytest_warning_recorded.call_historic(
                kwargs={
                    "warning_message": message,
                    "when": event.get("when", "runtest"),
                    "nodeid": event.get("nodeid", item.nodeid),
                    "location": _location(event) if event.get("location") else None,
                }
            )
        elif name == "logfinish":
            run.finished = True
        elif name == "done":
            run.done = event
        elif name == "crash":
            run.error = str(event.get("error", ""))

    def _report(self, item: pytest.Item, event: dict[str, Any]) -> pytest.TestReport:
        data = event["report"]
        if isinstance(data.get("longrepr"), list):
            # JSON has no tuples; a skip's (path, line, reason) must be one again
            data["longrepr"] = tuple(data["longrepr"])
        report: pytest.TestReport = self.config.hook.pytest_report_from_serializable(
            config=self.config, data=data
        )
        context = data.get("_subtest.context")
        if isinstance(context, dict) and hasattr(report, "context"):
            # pytest's subtests apply saferepr to the parameters again when a report is read
            # back (n=1 would show as n='1'); they travel already represented
            object.__setattr__(report.context, "kwargs", dict(context.get("kwargs") or {}))
        for place in event.get("lossy", ()):
            if place in self._lossy:
                continue  # the same value rides on the item's every report
            self._lossy.add(place)
            self._warn(
                item,
                f"a value in the report of {item.nodeid} could not be carried from inside its "
                f"environment and is shown as its repr ({place})",
            )
        return report

    def _warn(self, item: pytest.Item, text: str) -> None:
        """A warning about ``item`` in the run's warnings summary (as a warning raised by
        the test would be: this is not in any test's warning capture)."""
        path, line, _ = item.location
        message = warnings.WarningMessage(
            pytest.PytestWarning(text), pytest.PytestWarning, path, (line or 0) + 1
        )
        self.config.hook.pytest_warning_recorded.call_historic(
            kwargs={
                "warning_message": message,
                "when": "runtest",
                "nodeid": item.nodeid,
                "location": None,
            }
        )

    def _release_held(self, item: pytest.Item, run: _Run) -> None:
        """A teardown report followed by more (a rerun): log it now."""
        if run.held is not None:
            self.host.log(item, run.held)
            run.held = None

    # --- the end of an item ---

    def _finish(
        self, item: pytest.Item, nextitem: pytest.Item | None, ready: _Ready, run: _Run
    ) -> None:
        ihook = item.ihook
        env, started = ready.made.result
        ended = run.done is None or run.interrupted is not None
        if ended:  # a worker that is done is reaped once the next one went
            run.status = started.end(kill=True)
        if not run.started:
            ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        if ended:
            self._died(item, env, run)
        _collect_coverage(run.done, ready.coverage)
        teardown = self._teardown_here(item, nextitem, ready, run)
        report = teardown if teardown is not None else run.held
        if report is None:  # the worker never got as far as its teardown
            nothing = pytest.CallInfo.from_call(lambda: None, when="teardown")
            report = _made(item, nothing)
        elif run.held is not None and report is not run.held:
            report.sections = run.held.sections + report.sections
        self.host.log(item, report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if self._ahead is not None and not self._goes_on(item, run):
            self.close()  # started beside this teardown, which then stopped the run
        if isinstance(run.interrupted, KeyboardInterrupt | pytest.exit.Exception):
            raise run.interrupted
        if run.done is not None and run.done.get("interrupted"):
            raise KeyboardInterrupt
        if run.done is not None and "exit" in run.done:
            pytest.exit(str(run.done["exit"]), returncode=run.done.get("returncode"))

    def _goes_on(self, item: pytest.Item, run: _Run) -> bool:
        """Whether the run goes on after ``item`` (what pytest's loop checks, and what
        the worker reported: ``pytest.exit``, an interrupt)."""
        session = item.session
        if session.shouldfail or session.shouldstop:
            return False
        if isinstance(run.interrupted, KeyboardInterrupt | pytest.exit.Exception):
            return False
        return run.done is None or not (run.done.get("interrupted") or "exit" in run.done)

    def _may_start_next(self, item: pytest.Item, run: _Run) -> bool:
        """Whether the next test may start before this one's teardown is logged: when the
        run goes on and no teardown failure of the worker's may stop it (``-x``)."""
        if self._ahead is None or self._ahead.made.excinfo is not None:
            return False
        return self._goes_on(item, run) and not (run.held is not None and run.held.failed)

    def _died(self, item: pytest.Item, env: IsolatedEnvironment, run: _Run) -> None:
        """Reports for the phases the worker never reported: why it ended, as a failure."""
        if run.interrupted is not None and not isinstance(
            run.interrupted, KeyboardInterrupt | pytest.exit.Exception
        ):
            # an exception raised here while waiting (a timeout plugin's): the test's own
            error = run.interrupted
            call = pytest.CallInfo.from_call(_raiser(error), when="call")
        else:
            why = env.explain_exit(run.status, run.timed_out, run.error)
            call = pytest.CallInfo.from_call(lambda: pytest.fail(why, pytrace=False), when="call")
        if "setup" not in run.phases:
            passed = pytest.CallInfo.from_call(lambda: None, when="setup")
            self.host.log(item, _made(item, passed))
        if "call" not in run.phases:
            self.host.log(item, _made(item, call))

    def _teardown_here(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        ready: _Ready,
        run: _Run,
    ) -> pytest.TestReport | None:
        """The runner's part of the teardown: what it set up for earlier items and the next
        one does not need, then the worker's exit and the environment — while the next
        test, already waiting, runs.  A failing report, or None."""
        env, started = ready.made.result
        state = item.session._setupstate  # no public API: pytest's per-session setup stack
        ours = pytest.CallInfo.from_call(lambda: state.teardown_exact(nextitem), when="teardown")
        if ours.excinfo is None and self._may_start_next(item, run):
            assert self._ahead is not None
            self._ahead.made.result[1].go()
        if run.status is None:
            # before its environment goes: a PID namespace's init waits for it to be reaped
            run.status = started.end(kill=False)
        released = pytest.CallInfo.from_call(
            lambda: self.host.finish_environment(item, env), when="teardown"
        )
        failed = ours if ours.excinfo is not None else released
        if failed.excinfo is None:
            return None
        return _made(item, failed)

    def _without_worker(
        self, item: pytest.Item, nextitem: pytest.Item | None, made: pytest.CallInfo[Any]
    ) -> None:
        """No environment (skipped, unavailable, failed to make): report the set-up as
        pytest would report a fixture's failure."""
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        self.host.log(item, _made(item, made))
        state = item.session._setupstate
        teardown = pytest.CallInfo.from_call(
            lambda: state.teardown_exact(nextitem), when="teardown"
        )
        self.host.log(item, _made(item, teardown))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _made(item: pytest.Item, call: pytest.CallInfo[Any]) -> pytest.TestReport:
    """A report of the runner's own making (the worker's are the plugins'): pytest's
    plain one, for no plugin prepared this item here (pytest-rerunfailures' report hook
    expects its own protocol to have run in this process)."""
    return pytest.TestReport.from_item_and_call(item, call)


def _location(event: dict[str, Any]) -> tuple[str, int | None, str]:
    path, line, name = event["location"]
    return str(path), line, str(name)


def _raiser(error: BaseException) -> Any:
    def raise_it() -> None:
        raise error

    return raise_it


def _collect_coverage(done: dict[str, Any] | None, directory: Path) -> None:
    """Move the worker's coverage data beside the run's own, where coverage.py (or
    pytest-cov) combines it."""
    if done is None or not done.get("coverage"):
        return
    import coverage

    current = coverage.Coverage.current()
    source = Path(str(done["coverage"]))
    if current is None or not source.is_file():
        return
    data_file = Path(str(current.get_option("run:data_file") or ".coverage")).absolute()
    shutil.move(source, data_file.with_name(data_file.name + source.name[len(".coverage") :]))
