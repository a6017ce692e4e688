"""The built-in engines, registered through the same hook as third-party ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from .basic import BasicEngine
from .docker import DockerEngine
from .kubernetes import KubernetesEngine
from .sandbox import SandboxEngine
from .virtualenv import VirtualenvEngine

if TYPE_CHECKING:
    from ..manager import EngineRegistry

hookimpl = pluggy.HookimplMarker("pytest")

BUILTIN_ENGINES = (BasicEngine, VirtualenvEngine, SandboxEngine, DockerEngine, KubernetesEngine)


@hookimpl(tryfirst=True)
def pytest_isolation_register_engines(registry: EngineRegistry) -> None:
    # First, so that a plugin taking a built-in's name must say replace=True.
    for engine in BUILTIN_ENGINES:
        registry.register(engine)
