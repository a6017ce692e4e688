"""Which Python interpreter a ``python=`` option names, as a real executable.

Version managers put *shims* on ``PATH``: scripts named ``python3.12`` that
pick an interpreter at run time (pyenv, asdf and mise in ``.../shims``).  A
shim fails for a version that is installed but not selected (``pyenv:
python3.12: command not found``), and its path says nothing about the
interpreter behind it, so it must neither be given to an installer nor key a
template.  Interpreters are therefore looked up on ``PATH`` without the shim
folders and, in their place, among the versions the manager installed
(``$PYENV_ROOT/versions/*/bin``, ``~/.asdf/installs/python/*/bin``,
mise's ``installs/python/*/bin``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

_VERSION = re.compile(r"^(?:python|py)?(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


def is_shim(path: Path) -> bool:
    """Whether ``path`` is a version manager's shim rather than an interpreter."""
    if path.parent.name == "shims":
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and (b"pyenv" in head or b"asdf" in head or b"mise" in head)


def manager_installs() -> list[Path]:
    """``bin`` folders of the interpreters version managers installed, newest version first."""
    roots = []
    pyenv = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    roots.append(Path(pyenv) / "versions")
    asdf = os.environ.get("ASDF_DATA_DIR") or str(Path.home() / ".asdf")
    roots.append(Path(asdf) / "installs" / "python")
    mise = os.environ.get("MISE_DATA_DIR") or str(Path.home() / ".local" / "share" / "mise")
    roots.append(Path(mise) / "installs" / "python")
    found: list[Path] = []
    for root in roots:
        try:
            versions = [entry for entry in root.iterdir() if (entry / "bin").is_dir()]
        except OSError:
            continue
        found += [entry / "bin" for entry in sorted(versions, key=_version_order, reverse=True)]
    return found


def _version_order(path: Path) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in re.split(r"[.\-]", path.name))


def search_path(path: str | None = None) -> str:
    """``PATH`` with the shim folders replaced by the version managers' interpreters."""
    entries = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    kept = [entry for entry in entries if entry and Path(entry).name != "shims"]
    return os.pathsep.join([*kept, *(str(p) for p in manager_installs())])


def candidate_names(request: str) -> list[str]:
    """Executable names for a request: ``"3.12"`` -> ``python3.12``; a name stays itself."""
    match = _VERSION.match(request)
    if match is None:
        return [request]
    major, minor = match[1], match[2]
    return [f"python{major}.{minor}"] if minor else [f"python{major}"]


def resolve_shim(shim: Path) -> Path | None:
    """The interpreter a shim stands for, found among the managers' installs by its name."""
    return find_on(shim.name, (str(p) for p in manager_installs()))


def find_on(name: str, folders: Iterable[str]) -> Path | None:
    """The first executable ``name`` in ``folders`` that is not a shim."""
    for folder in folders:
        found = shutil.which(name, path=folder)
        if found and not is_shim(Path(found)):
            return Path(found)
    return None


def find_interpreter(request: str) -> Path | None:
    """A real interpreter for a version or name request on this machine's ``PATH``, shims
    left out, managers' installs included; None if there is none."""
    for name in candidate_names(request):
        found = find_on(name, search_path().split(os.pathsep))
        if found is not None:
            return found
    return None
