"""The exceptions pytest-isolation raises.

Every error derives from :class:`IsolationError` and carries its context as
attributes, so callers can react to the cause without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence


class IsolationError(Exception):
    """Base class of every error raised by pytest-isolation."""


class InvalidSpec(IsolationError, ValueError):
    """A setting, marker option or limit is malformed or not accepted.

    ``source`` names where the bad value came from (a marker, ``--isolation``,
    an ini key, an environment variable or an API call).
    """

    def __init__(self, message: str, *, source: str | None = None, option: str | None = None):
        self.source = source
        self.option = option
        super().__init__(f"{message} (from {source})" if source else message)


class EngineUnavailable(IsolationError):
    """An engine cannot run on this machine; ``reason`` says why, ``fix`` how to change that."""

    def __init__(self, engine: str, reason: str, fix: str = ""):
        self.engine = engine
        self.reason = reason
        self.fix = fix
        message = f"isolation engine {engine!r} is unavailable: {reason}"
        super().__init__(f"{message}; {fix}" if fix else message)


class UnknownEngine(InvalidSpec):
    """An engine name that no plugin registered."""

    def __init__(self, engine: str, available: Sequence[str], *, source: str | None = None):
        self.engine = engine
        self.available = tuple(available)
        super().__init__(
            f"unknown isolation engine {engine!r}; available engines: {', '.join(available)}",
            source=source,
            option="engine",
        )


class EnvironmentCreationError(IsolationError):
    """An environment could not be created; whatever was made was released again."""

    def __init__(self, engine: str, message: str, *, output: str = ""):
        self.engine = engine
        self.output = output
        text = f"{engine}: {message}"
        if output.strip():
            text += "\n" + _indent(output)
        super().__init__(text)


class OperationNotSupported(IsolationError, NotImplementedError):
    """The engine of an environment does not offer this operation."""

    def __init__(self, engine: str, operation: str, hint: str = ""):
        self.engine = engine
        self.operation = operation
        message = f"{operation}() is not supported by the {engine!r} engine"
        super().__init__(f"{message}; {hint}" if hint else message)


class CommandFailed(IsolationError):
    """A command exited with a non-zero status; the message carries its output."""

    def __init__(self, command: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.command = tuple(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {_quote(command)} exited with status {returncode}"
            + _section("stdout", stdout)
            + _section("stderr", stderr)
        )


class CommandTimeout(IsolationError):
    """A command ran longer than its timeout and was killed with everything it started."""

    def __init__(self, command: Sequence[str], timeout: float, stdout: str, stderr: str):
        self.command = tuple(command)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {_quote(command)} timed out after {timeout:g}s and was killed"
            + _section("stdout", stdout)
            + _section("stderr", stderr)
        )


class ResourceLimitExceeded(IsolationError):
    """A command hit a resource limit (``limit``) and was stopped by it."""

    def __init__(self, limit: str, message: str, *, measured: object = None):
        self.limit = limit
        self.measured = measured
        super().__init__(message)


class TeardownError(IsolationError):
    """Releasing one or more resources failed; ``errors`` holds each failure.

    The resources whose release failed stay in the ledger, so
    ``pytest-isolation cleanup`` can retry them.
    """

    def __init__(self, env_id: str, errors: Sequence[BaseException]):
        self.env_id = env_id
        self.errors = tuple(errors)
        lines = "\n".join(f"  - {type(e).__name__}: {e}" for e in errors)
        super().__init__(f"teardown of environment {env_id} failed:\n{lines}")


def _quote(command: Sequence[str]) -> str:
    import shlex

    return shlex.join(command)


def _indent(text: str, limit: int = 4000) -> str:
    text = text.rstrip()
    if len(text) > limit:
        text = "[...]\n" + text[-limit:]
    return "\n".join("    " + line for line in text.splitlines())


def _section(name: str, text: str) -> str:
    return f"\n  {name}:\n{_indent(text)}" if text.strip() else ""
