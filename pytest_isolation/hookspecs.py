"""Hooks of pytest-isolation, for plugins and ``conftest.py`` files.

Implement them with ``@pytest.hookimpl`` (or ``pluggy.HookimplMarker("pytest")``
where pytest is not imported).  Without pytest, an :class:`IsolationManager`
calls them through a plugin manager of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .engines.base import IsolatedEnvironment, Progress
    from .errors import TeardownError
    from .manager import EngineRegistry
    from .spec import EnvSpec

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(historic=True)
def pytest_isolation_register_engines(registry: EngineRegistry) -> None:
    """Register engines with ``registry.register(EngineClass)``.

    Called once per run, and for plugins registered later (deeper
    ``conftest.py`` files) as they arrive.  The built-in engines register
    here too, first, so a plugin overrides one with
    ``registry.register(MyEngine, replace=True)``; replacing is allowed only
    before the run starts (plugins and the rootdir ``conftest.py``).
    """


@hookspec
def pytest_isolation_env_creating(spec: EnvSpec) -> None:
    """An environment for ``spec`` is about to be created.

    Raising here prevents the creation; nothing has been made yet.
    """


@hookspec
def pytest_isolation_env_created(env: IsolatedEnvironment) -> None:
    """``env`` is ready.  If this hook raises, ``env`` is torn down and the error raised."""


@hookspec
def pytest_isolation_env_teardown(env: IsolatedEnvironment) -> None:
    """``env`` is about to be torn down (or kept, for debugging); it is still usable.

    An error raised here is reported, and teardown goes on.
    """


@hookspec
def pytest_isolation_env_destroyed(env_id: str, error: TeardownError | None) -> None:
    """The environment ``env_id`` is gone (or kept); ``error`` says what failed on the way."""


@hookspec
def pytest_isolation_progress(progress: Progress) -> None:
    """A slow set-up step (a template build, an image pull) started or ended.

    The plugin prints one line for each; ``progress.duration`` is set once it ended.
    """
