"""pytest-isolation: isolated environments for pytest tests, behind one marker.

Public names only; see the documentation for the contract of each.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engines.base import (
        Availability,
        Engine,
        EngineContext,
        EnvStatus,
        IsolatedEnvironment,
        RemoteEnvironment,
        Resources,
    )
    from .errors import (
        CommandFailed,
        CommandTimeout,
        EngineUnavailable,
        EnvironmentCreationError,
        InvalidSpec,
        IsolationError,
        OperationNotSupported,
        ResourceLimitExceeded,
        TeardownError,
        UnknownEngine,
    )
    from .execution import ExecResult, Usage
    from .ledger import Ledger, ResourceRecord
    from .manager import EngineRegistry, IsolationManager
    from .spec import EnvSpec, Limits, Option

#: Where each public name lives: imported when first used, so that loading the pytest
#: plugin imports nothing a run measuring its own coverage would see as already run.
_PUBLIC = {
    "Availability": ".engines.base",
    "Engine": ".engines.base",
    "EngineContext": ".engines.base",
    "EnvStatus": ".engines.base",
    "IsolatedEnvironment": ".engines.base",
    "RemoteEnvironment": ".engines.base",
    "Resources": ".engines.base",
    "CommandFailed": ".errors",
    "CommandTimeout": ".errors",
    "EngineUnavailable": ".errors",
    "EnvironmentCreationError": ".errors",
    "InvalidSpec": ".errors",
    "IsolationError": ".errors",
    "OperationNotSupported": ".errors",
    "ResourceLimitExceeded": ".errors",
    "TeardownError": ".errors",
    "UnknownEngine": ".errors",
    "ExecResult": ".execution",
    "Usage": ".execution",
    "Ledger": ".ledger",
    "ResourceRecord": ".ledger",
    "EngineRegistry": ".manager",
    "IsolationManager": ".manager",
    "EnvSpec": ".spec",
    "Limits": ".spec",
    "Option": ".spec",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Availability",
    "CommandFailed",
    "CommandTimeout",
    "Engine",
    "EngineContext",
    "EngineRegistry",
    "EngineUnavailable",
    "EnvSpec",
    "EnvStatus",
    "EnvironmentCreationError",
    "ExecResult",
    "InvalidSpec",
    "IsolatedEnvironment",
    "IsolationError",
    "IsolationManager",
    "Ledger",
    "Limits",
    "OperationNotSupported",
    "Option",
    "RemoteEnvironment",
    "ResourceLimitExceeded",
    "ResourceRecord",
    "Resources",
    "TeardownError",
    "UnknownEngine",
    "Usage",
    "__version__",
]
