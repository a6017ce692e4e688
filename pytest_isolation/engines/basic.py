"""The ``basic`` engine: a private workspace with its own HOME and TMPDIR and a clean environment.

Layout of one environment (``<root>`` is ``$TMPDIR/pytest-isolation-<session>-<id>``)::

    <root>/workspace   the working directory of every command (``env.path``)
    <root>/home        HOME
    <root>/tmp         TMPDIR, TMP and TEMP

Commands see only the variables of an allow-list (``PATH``, locale and
terminal settings, ``USER``), those named by the ``inherit_env`` option, and
those the test passes — so secrets and settings of the host do not leak in.

What a command starts is killed with it (its process group), and what left the
group (a daemon) is killed at teardown: see :mod:`pytest_isolation.orphans`.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import cast

from ..execution import ExecResult, execute
from ..orphans import EnvironmentProcesses
from ..spec import EnvSpec, Option, string_list
from .base import Engine, IsolatedEnvironment, Resources

#: Host variables every local environment inherits; ``inherit_env`` adds more names or patterns.
DEFAULT_INHERIT = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TERM",
    "TZ",
    "USER",
    "LOGNAME",
    "SYSTEMROOT",
    "COMSPEC",
    "PATHEXT",
    "WINDIR",
)

LOCAL_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "inherit_env": Option(
            "inherit_env",
            "names or glob patterns of host environment variables to pass through",
            string_list,
            (),
        ),
    }
)


class LocalEnvironment(IsolatedEnvironment):
    """An environment whose commands run on the host, in a private directory tree.

    With ``processes``, what its commands start outside their process groups
    is tracked and killed at teardown too (engines without a PID namespace).
    """

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        root: Path,
        processes: EnvironmentProcesses | None = None,
    ):
        super().__init__(env_id=env_id, spec=spec, resources=resources, path=root / "workspace")
        self.root = root
        self.home = root / "home"
        self.tmp = root / "tmp"
        self.processes = processes
        self.environ = self._base_environ()

    def _base_environ(self) -> dict[str, str]:
        inherited = _matcher(cast("tuple[str, ...]", self.spec.options["inherit_env"]))
        environ = {name: value for name, value in os.environ.items() if inherited(name)}
        tmp = str(self.tmp)
        environ.update(HOME=str(self.home), TMPDIR=tmp, TMP=tmp, TEMP=tmp)
        if self.processes is not None:
            environ.update(self.processes.environ)
        environ.update(self.spec.env)
        return environ

    def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None,
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None,
        input: str | bytes | None,
    ) -> ExecResult:
        assert self.path is not None
        processes = self.processes
        try:
            return execute(
                argv,
                cwd=self.path / cwd if cwd is not None else self.path,
                env={**self.environ, **env},
                input=input,
                timeout=timeout,
                on_spawn=processes.spawned if processes else self.resources.track_process,
            )
        finally:
            if processes is not None:
                processes.collect()


@functools.lru_cache(maxsize=64)
def _matcher(extra: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled test for the allow-list plus ``extra`` names or glob patterns."""
    patterns = DEFAULT_INHERIT + extra
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns)).match


#: the directories of an environment's root
ROOT_DIRECTORIES = ("workspace", "home", "tmp")


def make_root(
    engine: Engine,
    env_id: str,
    resources: Resources,
    names: tuple[str, ...] = ROOT_DIRECTORIES,
    **data: object,
) -> Path:
    """Create ``<root>`` with the directories ``names``, recorded (with ``data``) before
    it exists."""
    context = engine.context
    root = context.temp_dir / f"pytest-isolation-{context.session_id[:8]}-{env_id}"
    resources.add("directory", str(root), **data)
    root.mkdir(mode=0o700)  # fails if the name exists: never adopt someone else's directory
    for name in names:
        (root / name).mkdir()
    return root


class BasicEngine(Engine):
    """A private workspace directory with its own HOME/TMPDIR and a clean environment."""

    name = "basic"
    description = "a private workspace with its own HOME and TMPDIR and a clean environment"
    options = LOCAL_OPTIONS

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> LocalEnvironment:
        token = EnvironmentProcesses.new_token()
        root = make_root(self, env_id, resources, orphans=token)
        return LocalEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            root=root,
            processes=EnvironmentProcesses.start(resources, token),
        )
