"""pytest-isolation: isolated environments for pytest tests, behind one marker.

Public names only; see the documentation for the contract of each.
"""

from __future__ import annotations

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
