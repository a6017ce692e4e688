"""The side of inside mode where the test runs: pytest's whole protocol, every event relayed.

The worker runs ``pytest_runtest_protocol`` through the full hook chain, so
that other plugins' wrappers (timeout, faulthandler, rerunfailures, subtests,
warnings capture) run where the test runs, and relays every event that pytest
and its plugins report — ``logstart``, ``logreport``, ``warning_recorded``,
``logfinish`` — over the channel to the runner, which fires them again (the
pytest-xdist model).  Whatever happens, it ends with a ``done`` or ``crash``
event and never returns into the runner's loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from ..engines.base import IsolatedEnvironment
    from .channel import Channel


class Relay:
    """The events of a test's protocol, sent to the runner: a pytest plugin, registered
    in the runner at the start of the run and silent there; a child turns it on.

    Registered early so that pytest's historic hooks (``pytest_warning_recorded``)
    do not replay the runner's past warnings into it when a child starts.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.channel: Channel | None = None

    def _send(self, event: str, **payload: object) -> None:
        if self.channel is not None:
            self.channel.send(event, **payload)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self._send("logstart", nodeid=nodeid, location=location)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # last: plugins may still change the report here (pytest's subtests marks a test
        # with failed subtests failed in pytest_report_teststatus, called by the reporter)
        if self.channel is not None:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            self._send("logreport", report=data)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self._send("logfinish", nodeid=nodeid, location=location)

    @pytest.hookimpl(trylast=True)
    def pytest_warning_recorded(
        self,
        warning_message: warnings.WarningMessage,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        self._send(
            "warning",
            warning=serialize_warning(warning_message),
            when=when,
            nodeid=nodeid,
            location=location,
        )


def serialize_warning(message: warnings.WarningMessage) -> dict[str, Any]:
    """A warning as plain data (its class named by module and name)."""
    value = message.message
    return {
        "message": str(value),
        "args": list(value.args) if isinstance(value, Warning) else None,
        "category": [message.category.__module__, message.category.__qualname__],
        "filename": message.filename,
        "lineno": message.lineno,
        "line": message.line,
    }


def run(
    item: pytest.Item,
    env: IsolatedEnvironment,
    channel: Channel,
    relay: Relay,
    coverage: Path,
    *,
    turn: Callable[[], bool] | None = None,
) -> NoReturn:
    """In the forked child: enter ``env``, wait for ``turn`` (when given; False: exit
    without a word), run ``item``'s protocol, report, exit.

    Nothing leaves this function but the process itself: an error anywhere becomes a
    ``crash`` event, and the child exits.
    """
    try:
        _run(item, env, channel, relay, coverage, turn=turn)
    except BaseException:
        with contextlib.suppress(BaseException):
            channel.send("crash", error=traceback.format_exc())
    finally:
        os._exit(0)


def _run(
    item: pytest.Item,
    env: IsolatedEnvironment,
    channel: Channel,
    relay: Relay,
    coverage: Path,
    *,
    turn: Callable[[], bool] | None,
) -> None:
    env.enter()
    _quiet(item.config)
    state = item.session._setupstate  # no public API: pytest's per-session setup stack
    _adopt(state, item)
    if turn is not None and not turn():
        return  # the run ended before this test's turn
    relay.channel = channel
    measured = _measure(coverage)
    outcome: dict[str, object] = {}
    try:
        item.ihook.pytest_runtest_protocol(item=item, nextitem=None)
    except pytest.exit.Exception as exc:
        outcome = {"exit": exc.msg, "returncode": exc.returncode}
    except KeyboardInterrupt:
        outcome = {"interrupted": True}
    finally:
        with contextlib.suppress(BaseException):
            state.teardown_exact(None)  # what this child set up, also after pytest.exit
    if measured is not None:
        outcome["coverage"] = _save(measured)
    channel.send("done", **outcome)


def _quiet(config: pytest.Config) -> None:
    """Nothing of the child reaches the terminal through pytest's reporter (the runner
    reports the relayed events), and nothing talks to another process for it (a
    pytest-xdist worker's channel to its controller)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    writer = getattr(reporter, "_tw", None)  # no public API to silence a reporter
    if writer is not None:
        quiet = type(writer)(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the child
        reporter._tw = quiet  # type: ignore[union-attr]
    for plugin in list(config.pluginmanager.get_plugins()):
        # pytest-xdist's worker side (its module runs as execnet's __channelexec__)
        if type(plugin).__name__ == "WorkerInteractor":
            config.pluginmanager.unregister(plugin)


def _adopt(state: Any, item: pytest.Item) -> None:
    """Make the runner's setup stack this child's: nodes the runner set up stay set up
    here, but their finalizers are the runner's to run (fixtures are torn down where
    they were set up); nodes off this item's chain are the runner's business."""
    chain = set(item.listchain())
    for node in list(state.stack):
        if node in chain:
            _, error = state.stack[node]
            state.stack[node] = ([], error)
        else:
            del state.stack[node]


def _measure(directory: Path) -> object | None:
    """Coverage of the child, when coverage.py measures the run: a new measurement with
    the run's configuration, saved under ``directory`` (writable inside)."""
    if "coverage" not in sys.modules:
        return None
    import coverage

    parent = coverage.Coverage.current()
    if parent is None:
        return None
    parent.stop()  # its data is the runner's, saved by the runner
    serialize = getattr(getattr(parent, "config", None), "serialize", None)
    prefix = getattr(sys.modules.get("coverage.control"), "CONFIG_DATA_PREFIX", None)
    if callable(serialize) and isinstance(prefix, str):
        child = coverage.Coverage(
            config_file=prefix + serialize(),
            data_file=str(directory / ".coverage"),
            data_suffix=True,
        )
    else:  # an older coverage.py: its own options, as far as they can be read
        child = coverage.Coverage(
            data_file=str(directory / ".coverage"),
            data_suffix=True,
            branch=bool(parent.get_option("run:branch")),
            source=parent.get_option("run:source") or None,  # type: ignore[arg-type]
            include=parent.get_option("run:include") or None,  # type: ignore[arg-type]
            omit=parent.get_option("run:omit") or None,  # type: ignore[arg-type]
        )
    child.set_option("run:data_file", str(directory / ".coverage"))  # the config's would win
    child.start()
    return child


def _save(measured: object) -> str:
    cov: Any = measured
    cov.stop()
    cov.save()
    return str(cov.get_data().data_filename())


def deserialize_warning(data: dict[str, Any]) -> warnings.WarningMessage:
    """The warning :func:`serialize_warning` made plain data of."""
    module, name = data.get("category") or ("builtins", "UserWarning")
    category: type[Warning] = UserWarning
    with contextlib.suppress(Exception):
        found = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
        if isinstance(found, type) and issubclass(found, Warning):
            category = found
    args = data.get("args")
    try:
        message: Warning | str = category(*args) if isinstance(args, list) else data["message"]
    except Exception:
        message = category(data["message"])
    return warnings.WarningMessage(
        message,
        category,
        data.get("filename") or "",
        data.get("lineno") or 0,
        None,
        data.get("line"),
    )
