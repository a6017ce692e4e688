"""The ``virtualenv`` engine: a fresh Python environment per test, in milliseconds.

The first environment for a given spec (interpreter, packages, index
settings) is built with uv — or virtualenv and pip where uv is missing — as a
*template* in the cache directory.  Every environment after that is a clone of
the template: files are reflinked or hard-linked, and only the few files that
name the template's path (activation scripts, script shebangs) are rewritten.

Templates are keyed by everything that shapes their content, including the
interpreter's path, size and modification time and the listing of local
``find_links`` folders, so a changed spec or interpreter builds a new one.
Builds hold a file lock, so concurrent runs and xdist workers build each
template once.  uv's own cache is shared and safe for concurrent use.

Hard-linked files share their data with the template.  pip and uv replace
files rather than editing them, so installing into a clone is safe; a test
that edits installed files in place should use ``link="copy"``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from filelock import FileLock, Timeout

from ..errors import CommandFailed, EngineUnavailable, EnvironmentCreationError
from ..execution import ExecResult, execute
from ..spec import (
    EnvSpec,
    Option,
    boolean,
    choice,
    path,
    path_or_url_list,
    string,
    string_list,
)
from .base import Availability, Engine, EngineContext, Resources
from .basic import LOCAL_OPTIONS, LocalEnvironment, make_root

TEMPLATE_FORMAT = 2
_INSTALLER_ENV = ("UV_", "PIP_", "VIRTUALENV_")
_META = ".pytest-isolation-template.json"
_BIN = "Scripts" if os.name == "nt" else "bin"

VIRTUALENV_OPTIONS = MappingProxyType(
    {
        **LOCAL_OPTIONS,
        "python": Option(
            "python",
            "the interpreter: a version such as '3.12', a name, or a path (default: the one "
            "running pytest)",
            string,
        ),
        "packages": Option(
            "packages", "requirements to install, e.g. ['attrs==23.2.0']", string_list, ()
        ),
        "requirements": Option("requirements", "a requirements file to install", path),
        "find_links": Option(
            "find_links", "folders or URLs with wheels (pip --find-links)", path_or_url_list, ()
        ),
        "index_url": Option("index_url", "the package index URL (pip --index-url)", string),
        "offline": Option(
            "offline", "install only from find_links and the installer's cache", boolean, False
        ),
        "creator": Option(
            "creator",
            "auto (uv if installed), uv or virtualenv",
            choice("auto", "uv", "virtualenv"),
            "auto",
        ),
        "seed": Option("seed", "put pip into the environment", boolean, False),
        "template": Option("template", "clone environments from a cached template", boolean, True),
        "link": Option(
            "link",
            "auto (reflink, hardlink, then copy) or copy (never share files with the template)",
            choice("auto", "copy"),
            "auto",
        ),
    }
)


@dataclass(frozen=True)
class VenvOptions:
    """The virtualenv engine's options of one spec, typed."""

    python: str | None = None
    packages: tuple[str, ...] = ()
    requirements: str | None = None
    find_links: tuple[str, ...] = ()
    index_url: str | None = None
    offline: bool = False
    creator: str = "auto"
    seed: bool = False
    template: bool = True
    link: str = "auto"

    @classmethod
    def of(cls, spec: EnvSpec) -> VenvOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.options.items() if k in names})  # type: ignore[arg-type]


# --- installers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installer:
    """How to create a venv and install into it with one tool."""

    name: Literal["uv", "virtualenv"]
    executable: str

    def create(self, python: Path, target: Path, *, seed: bool) -> list[str]:
        if self.name == "uv":
            command = [
                self.executable,
                "venv",
                "--quiet",
                "--no-project",
                "--no-python-downloads",
                "--python",
                str(python),
            ]
            return [*command, *(["--seed"] if seed else []), str(target)]
        # pip stays in: it is how this installer installs packages
        return [
            self.executable,
            "-m",
            "virtualenv",
            "--quiet",
            "--no-periodic-update",
            "--no-setuptools",
            "--no-wheel",
            "--python",
            str(python),
            str(target),
        ]

    def install(
        self,
        venv_python: Path,
        options: VenvOptions,
        packages: Sequence[str],
        requirements: str | None = None,
    ) -> list[str]:
        if self.name == "uv":
            command = [self.executable, "pip", "install", "--quiet", "--python", str(venv_python)]
            offline = ["--offline"]
        else:
            command = [
                str(venv_python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ]
            offline = ["--no-index"]
        for link in options.find_links:
            command += ["--find-links", link]
        if options.index_url:
            command += ["--index-url", options.index_url]
        if options.offline:
            command += offline
        if requirements:
            command += ["--requirement", requirements]
        return [*command, *packages]


@functools.cache
def find_uv() -> str | None:
    """The uv binary: the one the ``uv`` package ships, else one on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def has_virtualenv() -> bool:
    import importlib.util

    return importlib.util.find_spec("virtualenv") is not None


# --- cloning ----------------------------------------------------------------------------------


class _Linker:
    """Makes one file of a clone: reflink, then hardlink, then copy, remembering what fails."""

    def __init__(self, mode: str) -> None:
        self.reflink = True
        self.hardlink = mode == "auto"

    def __call__(self, source: str, target: str) -> None:
        if self.reflink:
            try:
                _reflink(source, target)
                return
            except OSError:
                self.reflink = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
        if self.hardlink:
            try:
                os.link(source, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                    raise
                self.hardlink = False
        shutil.copy2(source, target)


def _reflink(source: str, target: str) -> None:
    import fcntl

    ficlone = 0x40049409  # _IOW(0x94, 9, int), Linux
    with open(source, "rb") as src, open(target, "xb") as dst:
        fcntl.ioctl(dst.fileno(), ficlone, src.fileno())
    shutil.copystat(source, target)


def clone_venv(template: Path, target: Path, rewrite: Sequence[str], link: str) -> None:
    """Copy the venv at ``template`` to ``target`` sharing file data where the filesystem can."""
    old, new = str(template), str(target)
    old_bytes, new_bytes = old.encode(), new.encode()
    rewritten = set(rewrite)
    linker = _Linker(link)

    def walk(source: str, destination: str, relative: str) -> None:
        os.mkdir(destination)
        with os.scandir(source) as entries:
            for entry in entries:
                if entry.name == _META:
                    continue
                target_path = os.path.join(destination, entry.name)
                rel = relative + entry.name
                if entry.is_symlink():
                    link_target = os.readlink(entry.path)
                    if link_target.startswith(old):
                        link_target = new + link_target[len(old) :]
                    os.symlink(link_target, target_path)
                elif entry.is_dir():
                    walk(entry.path, target_path, rel + "/")
                elif rel in rewritten:
                    with open(entry.path, "rb") as handle:
                        data = handle.read().replace(old_bytes, new_bytes)
                    with open(target_path, "xb") as handle:
                        handle.write(data)
                    shutil.copymode(entry.path, target_path)
                elif entry.stat().st_size == 0:
                    open(target_path, "xb").close()  # lock files and markers: never shared
                else:
                    linker(entry.path, target_path)

    walk(old, new, "")


def files_naming(root: Path) -> list[str]:
    """The text files under ``root`` that contain ``root``'s own path (relative, '/').

    Binary files are left out: a path inside them is length-prefixed or padded
    (bytecode, shared objects), so a textual replacement would corrupt them.
    Bytecode needs none anyway: the import system sets ``co_filename`` to the
    path it loads the source from.
    """
    needle = str(root).encode()
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            if os.path.islink(full) or name == _META:
                continue
            with open(full, "rb") as handle:
                content = handle.read()
            if needle in content and b"\0" not in content:
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(found)


# --- the engine -------------------------------------------------------------------------------


class VirtualenvEnvironment(LocalEnvironment):
    """A :class:`LocalEnvironment` with its own virtual environment activated."""

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        root: Path,
        venv: Path,
        installer: Installer,
    ):
        self.venv = venv
        self.installer = installer
        super().__init__(env_id=env_id, spec=spec, resources=resources, root=root)

    @property
    def python(self) -> Path:
        """The environment's Python interpreter."""
        return self.venv / _BIN / ("python.exe" if os.name == "nt" else "python")

    def _base_environ(self) -> dict[str, str]:
        environ = super()._base_environ()
        environ["VIRTUAL_ENV"] = str(self.venv)
        environ["PATH"] = os.pathsep.join(
            p for p in (str(self.venv / _BIN), environ.get("PATH", "")) if p
        )
        return environ

    def install(self, packages: Sequence[str]) -> ExecResult:
        """Install ``packages`` with the spec's index settings; raises :class:`CommandFailed`."""
        if isinstance(packages, str):
            packages = [packages]
        result = execute(
            self.installer.install(self.python, VenvOptions.of(self.spec), list(packages)),
            on_spawn=self.resources.track_process,
        )
        self._usage.add(result)
        return result.check()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.python.exists():
            problems.append(f"interpreter {self.python} is missing")
        return problems


class VirtualenvEngine(Engine):
    """A fresh virtual environment per environment, cloned from a cached template."""

    name = "virtualenv"
    description = "a fresh Python virtual environment (uv, or virtualenv as fallback)"
    options = VIRTUALENV_OPTIONS

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._interpreters: dict[tuple[str, str], Path] = {}

    @property
    def templates(self) -> Path:
        return self.context.cache_dir / "venv-templates"

    def availability(self) -> Availability:
        uv = find_uv()
        if uv:
            return Availability(True, detail=f"uv at {uv}")
        if has_virtualenv():
            return Availability(True, detail="virtualenv (uv not found; install it to go faster)")
        return Availability(
            False,
            reason="neither uv nor virtualenv is installed",
            fix="pip install 'pytest-isolation[uv]'",
        )

    def installer(self, spec: EnvSpec) -> Installer:
        wanted = VenvOptions.of(spec).creator
        uv = find_uv() if wanted in ("auto", "uv") else None
        if uv:
            return Installer("uv", uv)
        if wanted == "uv":
            raise EngineUnavailable(
                self.name, "creator='uv' was asked for but uv is not installed", "pip install uv"
            )
        if not has_virtualenv():
            raise EngineUnavailable(
                self.name, "virtualenv is not installed", "pip install virtualenv"
            )
        return Installer("virtualenv", sys.executable)

    def interpreter(self, request: str | None, installer: Installer) -> Path:
        """The interpreter a ``python=`` request names, resolved once per run."""
        if request is None:
            return Path(sys.executable)
        key = (request, installer.name)
        if key in self._interpreters:
            return self._interpreters[key]
        candidate = Path(request).expanduser()
        if os.sep in request or candidate.exists():
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                raise EnvironmentCreationError(
                    self.name, f"python={request!r}: no executable interpreter at that path"
                )
            found = candidate
        elif installer.name == "uv":
            result = execute(
                [
                    installer.executable,
                    "python",
                    "find",
                    "--no-python-downloads",
                    "--no-project",
                    request,
                ]
            )
            if not result.ok:
                raise EnvironmentCreationError(
                    self.name,
                    f"python={request!r}: no such interpreter found",
                    output=result.stderr,
                )
            found = Path(result.stdout.strip())
        else:
            names = [request] if not request[0].isdigit() else [f"python{request}"]
            which = next((w for w in map(shutil.which, names) if w), None)
            if which is None:
                raise EnvironmentCreationError(
                    self.name, f"python={request!r}: no {names[0]} on PATH"
                )
            found = Path(which)
        self._interpreters[key] = found
        return found

    def template_key(
        self, options: VenvOptions, installer: Installer, python: Path
    ) -> dict[str, object]:
        """Everything that shapes a template's content."""
        real = python.resolve()  # python, python3 and a venv's python are one interpreter
        stat = real.stat()
        # a new wheel in a local find_links folder must give a new template
        links = [link if "://" in link else [link, _listing(link)] for link in options.find_links]
        requirements = options.requirements
        return {
            "format": TEMPLATE_FORMAT,
            "installer": installer.name,
            "python": [str(real), stat.st_mtime_ns, stat.st_size],
            "packages": sorted(options.packages),
            "requirements": [requirements, _digest(Path(requirements))] if requirements else None,
            "find_links": links,
            "index_url": options.index_url,
            "offline": options.offline,
            "seed": options.seed,
            # the installers read these too (an index, find-links, bytecode compilation)
            "installer_settings": sorted(
                (name, value)
                for name, value in os.environ.items()
                if name.startswith(_INSTALLER_ENV) and not name.endswith("_CACHE_DIR")
            ),
        }

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> VirtualenvEnvironment:
        options = VenvOptions.of(spec)
        installer = self.installer(spec)
        python = self.interpreter(options.python, installer)
        if options.requirements and not Path(options.requirements).is_file():
            raise EnvironmentCreationError(
                self.name, f"requirements file {options.requirements} not found"
            )
        root = make_root(self, env_id, resources)
        venv = self._venv_location(root, resources)
        if options.template:
            template, rewrite = self._template(options, installer, python)
            clone_venv(template, venv, rewrite, options.link)
        else:
            self._build(options, installer, python, venv)
        return VirtualenvEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            root=root,
            venv=venv,
            installer=installer,
        )

    def _venv_location(self, root: Path, resources: Resources) -> Path:
        """``<root>/venv``, or beside the templates when they live on another filesystem
        (a tmpfs /tmp), where hardlinks and reflinks cannot reach."""
        self.templates.mkdir(parents=True, exist_ok=True)
        if os.stat(root).st_dev == os.stat(self.templates).st_dev:
            return root / "venv"
        live = self.context.cache_dir / "venvs" / root.name
        resources.add("directory", str(live))
        live.parent.mkdir(parents=True, exist_ok=True)
        return live

    def _template(
        self, options: VenvOptions, installer: Installer, python: Path
    ) -> tuple[Path, list[str]]:
        key = self.template_key(options, installer, python)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        template = self.templates / digest
        meta_path = template / _META
        with FileLock(str(template) + ".lock"):
            try:
                meta = json.loads(meta_path.read_text("utf-8"))
            except (FileNotFoundError, ValueError):
                meta = None
            if meta is None or not (template / _BIN).is_dir():
                shutil.rmtree(template, ignore_errors=True)  # a build that was cut short
                try:
                    self._build(options, installer, python, template)
                except BaseException:
                    shutil.rmtree(template, ignore_errors=True)
                    raise
                meta = {"key": key, "rewrite": files_naming(template), "created": time.time()}
                meta_path.write_text(json.dumps(meta, indent=1), "utf-8")
            else:
                os.utime(meta_path)  # last use, for pruning
        return template, list(meta["rewrite"])

    def _build(
        self, options: VenvOptions, installer: Installer, python: Path, target: Path
    ) -> None:
        steps = [installer.create(python, target, seed=options.seed)]
        packages, requirements = list(options.packages), options.requirements
        if packages or requirements:
            steps.append(
                installer.install(target / _BIN / "python", options, packages, requirements)
            )
        for command in steps:
            # run from the target's parent so that no project settings of the test's cwd apply
            result = execute(command, cwd=target.parent if target.parent.exists() else None)
            if not result.ok:
                what = (
                    "creating the virtual environment"
                    if command is steps[0]
                    else (f"installing {', '.join(packages) or requirements}")
                )
                raise EnvironmentCreationError(
                    self.name,
                    f"{what} with {installer.name} failed (exit status {result.returncode})",
                    output=(result.stdout + result.stderr),
                ) from CommandFailed(
                    result.command, result.returncode, result.stdout, result.stderr
                )

    def prune_cache(self, older_than: float | None) -> list[str]:
        """Remove templates not used for ``older_than`` seconds (every one if None)."""
        removed = []
        now = time.time()
        for lock_path in sorted(self.templates.glob("*.lock")):
            template = lock_path.with_suffix("")
            meta = template / _META
            with contextlib.suppress(Timeout), FileLock(str(lock_path), timeout=0):
                try:
                    age = now - meta.stat().st_mtime
                except FileNotFoundError:
                    age = float("inf")
                if older_than is None or age > older_than:
                    shutil.rmtree(template, ignore_errors=True)
                    removed.append(str(template))
        return removed


def _listing(path: str) -> list[tuple[str, int, int]]:
    """Names, modification times and sizes of a folder's entries (or of a single file)."""
    try:
        if os.path.isdir(path):
            return sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(path)
            )
        stat = os.stat(path)
        return [(os.path.basename(path), stat.st_mtime_ns, stat.st_size)]
    except OSError:
        return []


def _digest(file: Path) -> str | None:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
