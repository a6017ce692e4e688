"""The ``virtualenv`` engine: a fresh Python environment per test, in milliseconds.

The first environment for a given spec (interpreter, packages, index
settings) is built with uv — or virtualenv and pip where uv is missing — as a
*template* in the cache directory.  Every environment after that is made from
the template: by default a venv of its own whose ``site-packages`` layers the
template's beneath it (a ``.pth`` entry, as ``uv run --with`` layers
environments), so its cost does not grow with the number of packages; only
the files that name the template's path (activation scripts, script
shebangs) are rewritten.  ``link="hardlink"`` and ``link="copy"`` give every
environment all the files instead.

Templates are keyed by the content of everything they are made of (see
:mod:`.venv_inputs`): a local project is built once per run and counts by
its wheel, local files by their digests, requirements files with what they
include.  A template is built under a file lock in a directory of its own and
becomes usable only when a symbolic link is renamed onto it, so a build cut
short (a SIGKILL) is never used; while it builds it is in the ledger, with
its installer processes.  A template in use by a live or kept environment is
never removed.
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
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast

from ..errors import CommandFailed, EngineUnavailable, EnvironmentCreationError, IsolationError
from ..execution import ExecResult, execute
from ..orphans import EnvironmentProcesses
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
from .interpreters import find_interpreter, is_shim, resolve_shim, search_path
from .venv_inputs import (
    Inputs,
    InstallSources,
    ResolvedInputs,
    find_project,
    is_project,
    local_path,
)

TEMPLATE_FORMAT = 3
_INSTALLER_ENV = ("UV_", "PIP_", "VIRTUALENV_")
_META = ".pytest-isolation-template.json"
_FULL_REWRITE = ".pytest-isolation-rewrite.json"
_LAYER = "_pytest_isolation_template.pth"
_BIN = "Scripts" if os.name == "nt" else "bin"


def requirement_list(value: object, base_dir: Path) -> tuple[str, ...]:
    """Requirements; local paths among them (``./dist/pkg.whl``, ``../lib``) are made absolute
    from ``base_dir`` and must exist (a folder must be a Python project)."""
    items = string_list(value, base_dir)
    resolved = []
    for item in items:
        local = local_path(item)
        if local is None:
            resolved.append(item)
            continue
        target = (base_dir / Path(local).expanduser()).resolve()
        if target.is_dir():
            if not is_project(target):
                raise ValueError(
                    f"{item!r} is a folder without pyproject.toml, setup.py or setup.cfg"
                )
        elif not target.is_file():
            raise ValueError(f"{item!r} does not exist (looked for {target})")
        resolved.append(str(target))
    return tuple(resolved)


def project_option(value: object, base_dir: Path) -> str | None:
    """``True``: the project holding the test file (the nearest folder at or above it with
    pyproject.toml, setup.py or setup.cfg); a path: that project; ``False``: none."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no"):
        value = value.strip().lower() in ("true", "yes", "on")
    if value is False or value is None:
        return None
    if value is True:
        found = find_project(base_dir.resolve())
        if found is None:
            raise ValueError(
                f"no pyproject.toml, setup.py or setup.cfg in {base_dir} or a folder above it; "
                "pass the project's folder, e.g. project='path/to/project'"
            )
        return str(found)
    folder = Path(path(value, base_dir))
    if not (folder.is_dir() and is_project(folder)):
        raise ValueError(f"{value!r} is not a folder with pyproject.toml, setup.py or setup.cfg")
    return str(folder)


VIRTUALENV_OPTIONS = MappingProxyType(
    {
        **LOCAL_OPTIONS,
        "python": Option(
            "python",
            "the interpreter: a version such as '3.12', a name, or a path (default: the one "
            "running pytest); version managers' shims are looked through",
            string,
        ),
        "project": Option(
            "project",
            "install the project under test: True for the one holding the test file, or its "
            "folder; built into a wheel once per run (PEP 517)",
            project_option,
        ),
        "editable": Option(
            "editable",
            "install the project and local folders in packages editable instead of built",
            boolean,
            False,
        ),
        "packages": Option(
            "packages",
            "requirements to install, e.g. ['attrs==23.2.0']; local wheels and project "
            "folders too ('./dist/pkg.whl', '../lib')",
            requirement_list,
            (),
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
        "template": Option("template", "make environments from a cached template", boolean, True),
        "link": Option(
            "link",
            "auto (the template's site-packages layered beneath the environment's own: "
            "constant time), hardlink (every file reflinked or hard-linked) or copy (every "
            "file copied: nothing shared with the template)",
            choice("auto", "hardlink", "copy"),
            "auto",
        ),
    }
)


@dataclass(frozen=True)
class VenvOptions:
    """The virtualenv engine's options of one spec, typed."""

    python: str | None = None
    project: str | None = None
    editable: bool = False
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

    def describe(self) -> str:
        """What a template of these options holds, in a few words (progress lines)."""
        parts = []
        if self.project:
            kind = "editable project" if self.editable else "project"
            parts.append(f"{kind} {Path(self.project).name}")
        if self.packages:
            names = [Path(p).name if os.sep in p else p for p in self.packages]
            shown = ", ".join(names[:3])
            parts.append(shown + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        if self.requirements:
            parts.append(f"-r {Path(self.requirements).name}")
        return "; ".join(parts) or "no packages"


# --- installers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installer:
    """How to create a venv, install into it and build a project, with one tool."""

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

    def _index(self, sources: InstallSources) -> list[str]:
        command: list[str] = []
        for link in sources.find_links:
            command += ["--find-links", link]
        if sources.index_url:
            command += ["--index-url", sources.index_url]
        if sources.offline:
            command.append("--offline" if self.name == "uv" else "--no-index")
        return command

    def install(self, venv_python: Path, sources: InstallSources) -> list[str]:
        if self.name == "uv":
            command = [self.executable, "pip", "install", "--quiet", "--python", str(venv_python)]
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
        command += self._index(sources)
        if sources.requirements:
            command += ["--requirement", sources.requirements]
        for editable in sources.editables:
            command += ["--editable", editable]
        return [*command, *sources.packages]

    def build_wheel(self, project: Path, python: Path, sources: InstallSources) -> list[str]:
        """The PEP 517 build of ``project`` into a wheel in the folder ``OUT`` (a placeholder
        argument, replaced by the caller)."""
        if self.name == "uv":
            return [
                self.executable,
                "build",
                "--wheel",
                "--quiet",
                "--no-progress",
                "--python",
                str(python),
                *self._index(sources),
                "--out-dir",
                "OUT",
                str(project),
            ]
        return [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            *self._index(sources),
            "--wheel-dir",
            "OUT",
            str(project),
        ]

    @property
    def builder(self) -> str:
        return "uv build" if self.name == "uv" else "pip wheel"


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
        self.hardlink = mode != "copy"

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


def clone_venv(
    template: Path,
    target: Path,
    rewrite: Sequence[str],
    link: str,
    layered: Collection[str] = (),
) -> None:
    """Make the venv at ``template`` again at ``target``.

    Files are shared where the filesystem can (``link`` "auto"/"hardlink": a
    reflink, else a hard link) or copied ("copy"); those named in ``rewrite``
    (relative, '/') get ``template``'s path replaced by ``target``'s.  A folder
    named in ``layered`` (a site-packages) is made empty with one ``.pth``
    file that adds the template's folder after it on ``sys.path``, and
    processes that folder's own ``.pth`` files.
    """
    old, new = str(template), str(target)
    old_bytes, new_bytes = old.encode(), new.encode()
    rewritten = set(rewrite)
    layers = set(layered)
    linker = _Linker(link)

    def walk(source: str, destination: str, relative: str) -> None:
        os.mkdir(destination)
        if relative.rstrip("/") in layers:
            with open(os.path.join(destination, _LAYER), "x", encoding="utf-8") as handle:
                handle.write(f"import site; site.addsitedir({source!r})\n")
            return
        with os.scandir(source) as entries:
            for entry in entries:
                if entry.name in (_META, _FULL_REWRITE):
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


def files_naming(root: Path, skip: Collection[str] = ()) -> list[str]:
    """The text files under ``root`` that contain ``root``'s own path (relative, '/'), leaving
    out the folders in ``skip`` (relative).

    Binary files are left out: a path inside them is length-prefixed or padded
    (bytecode, shared objects), so a textual replacement would corrupt them.
    Bytecode needs none anyway: the import system sets ``co_filename`` to the
    path it loads the source from.
    """
    needle = str(root).encode()
    found = []
    skipped = {os.path.join(root, name) for name in skip}
    for directory, names, files in os.walk(root):
        names[:] = [n for n in names if os.path.join(directory, n) not in skipped]
        for name in files:
            full = os.path.join(directory, name)
            if os.path.islink(full) or name in (_META, _FULL_REWRITE):
                continue
            with open(full, "rb") as handle:
                content = handle.read()
            if needle in content and b"\0" not in content:
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(found)


def site_packages_of(venv: Path) -> list[str]:
    """The site-packages folders of a venv (relative, '/'), not reached through a symlink."""
    found = []
    for pattern in ("lib/*/site-packages", "Lib/site-packages", "site-packages"):
        for candidate in venv.glob(pattern):
            relative = candidate.relative_to(venv)
            parts = [venv.joinpath(*relative.parts[: i + 1]) for i in range(len(relative.parts))]
            if candidate.is_dir() and not any(part.is_symlink() for part in parts):
                found.append(relative.as_posix())
    return sorted(found)


# --- the engine -------------------------------------------------------------------------------


class TemplateVanished(IsolationError):
    """The template an environment was being made from was removed meanwhile."""


class VirtualenvEnvironment(LocalEnvironment):
    """A :class:`LocalEnvironment` with its own virtual environment activated.

    ``template`` is the template it was made from (None with ``template=False``).
    """

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        root: Path,
        venv: Path,
        installer: Installer,
        inputs: Inputs,
        template: Path | None = None,
        processes: EnvironmentProcesses | None = None,
    ):
        self.venv = venv
        self.installer = installer
        self.template = template
        self._inputs = inputs
        super().__init__(
            env_id=env_id, spec=spec, resources=resources, root=root, processes=processes
        )

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
        options = VenvOptions.of(self.spec)
        sources = self._inputs.materialized(
            InstallSources(
                tuple(packages),
                find_links=options.find_links,
                index_url=options.index_url,
                offline=options.offline,
            )
        )
        result = execute(
            self.installer.install(self.python, sources),
            on_spawn=self.resources.track_process,
        )
        self._usage.add(result)
        return result.check()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.python.exists():
            problems.append(f"interpreter {self.python} is missing")
        if self.template is not None and not (self.template / _META).exists():
            problems.append(f"its template {self.template} was removed")
        return problems


class VirtualenvEngine(Engine):
    """A fresh virtual environment per environment, made from a cached template."""

    name = "virtualenv"
    description = "a fresh Python virtual environment (uv, or virtualenv as fallback)"
    options = VIRTUALENV_OPTIONS

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._interpreters: dict[tuple[str, str], Path] = {}
        self._seen: dict[str, tuple[Path, dict[str, object]]] = {}
        self.inputs = Inputs(context)

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
        """The real interpreter a ``python=`` request names, resolved once per run.

        Shims of version managers (pyenv, asdf, mise) are looked through: they
        stand for an interpreter chosen at run time, which may be none.
        """
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
            if is_shim(candidate):
                real = resolve_shim(candidate)
                if real is None:
                    raise EnvironmentCreationError(
                        self.name,
                        f"python={request!r} is a version manager's shim and no installed "
                        f"{candidate.name} stands behind it; pass an interpreter's own path",
                    )
                found = real
        elif installer.name == "uv":
            result = execute(
                [
                    installer.executable,
                    "python",
                    "find",
                    "--no-python-downloads",
                    "--no-project",
                    request,
                ],
                env={**os.environ, "PATH": search_path()},
            )
            if not result.ok:
                raise EnvironmentCreationError(
                    self.name,
                    f"python={request!r}: no such interpreter found",
                    output=result.stderr,
                )
            found = Path(result.stdout.strip())
        else:
            which = find_interpreter(request)
            if which is None:
                raise EnvironmentCreationError(
                    self.name, f"python={request!r}: no such interpreter on PATH"
                )
            found = which
        self._interpreters[key] = found
        return found

    def template_key(
        self, options: VenvOptions, installer: Installer, python: Path, inputs: ResolvedInputs
    ) -> dict[str, object]:
        """Everything that shapes a template's content, local inputs by their content."""
        real = python.resolve()  # python, python3 and a venv's python are one interpreter
        stat = real.stat()
        return {
            "format": TEMPLATE_FORMAT,
            "installer": installer.name,
            "python": [str(real), stat.st_mtime_ns, stat.st_size],
            **inputs.key,
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
        try:
            return self._create(
                spec=spec,
                options=options,
                installer=installer,
                python=python,
                env_id=env_id,
                resources=resources,
            )
        except TemplateVanished as first:
            # removed by hand or by an older version's cleanup: start over, once
            errors = resources.release_all()
            if errors:
                raise EnvironmentCreationError(
                    self.name, f"{first}; releasing what was made failed: {errors[0]!r}"
                ) from first
        try:
            return self._create(
                spec=spec,
                options=options,
                installer=installer,
                python=python,
                env_id=env_id,
                resources=resources,
            )
        except TemplateVanished as second:
            raise EnvironmentCreationError(
                self.name,
                f"{second} twice in a row: something other than pytest-isolation removes "
                f"templates from {self.templates} (by hand, or an older version's "
                "`cleanup --templates`); run again once it has stopped",
            ) from None

    def _create(
        self,
        *,
        spec: EnvSpec,
        options: VenvOptions,
        installer: Installer,
        python: Path,
        env_id: str,
        resources: Resources,
    ) -> VirtualenvEnvironment:
        resolved = self.inputs.resolve(options, installer, python, resources)
        token = EnvironmentProcesses.new_token()
        template: Path | None = None
        if not options.template:
            root = make_root(self, env_id, resources, orphans=token)
            venv = root / "venv"
            sources = self.inputs.sources(options, resolved)
            self._build(
                options=options,
                installer=installer,
                python=python,
                target=venv,
                sources=sources,
                resources=resources,
            )
        else:
            key = self.template_key(options, installer, python, resolved)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            with self._lock(digest):
                found = self._current(digest)
                if found is None:
                    found = self._build_template(
                        digest=digest,
                        key=key,
                        options=options,
                        installer=installer,
                        python=python,
                        resolved=resolved,
                        resources=resources,
                    )
                template, meta = found
                # recorded under the lock: a prune sees the template is in use
                root = make_root(self, env_id, resources, template=str(template), orphans=token)
            venv = self._venv_location(root, resources, options.link)
            self._clone(template, meta, venv, options.link)
        return VirtualenvEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            root=root,
            venv=venv,
            installer=installer,
            inputs=self.inputs,
            template=template,
            processes=EnvironmentProcesses.start(resources, token),
        )

    def _clone(self, template: Path, meta: dict[str, object], venv: Path, link: str) -> None:
        rewrite = cast("list[str]", meta["rewrite"])
        layered = cast("list[str]", meta["site_packages"]) if link == "auto" else ()
        if link != "auto":
            rewrite = self._full_rewrite(template, rewrite)
        try:
            clone_venv(template, venv, rewrite, link, layered)
        except FileNotFoundError as exc:
            if (template / _META).exists():
                raise
            self._seen.clear()
            raise TemplateVanished(f"the template {template} was removed while in use") from exc

    def _full_rewrite(self, template: Path, rewrite: list[str]) -> list[str]:
        """Files naming the template anywhere (site-packages too), for clones of every file;
        found once and noted beside the template."""
        note = template / _FULL_REWRITE
        with contextlib.suppress(OSError, ValueError):
            return list(json.loads(note.read_text("utf-8")))
        found = files_naming(template)
        temporary = note.with_name(f".{note.name}.{uuid.uuid4().hex}")
        with contextlib.suppress(OSError):
            temporary.write_text(json.dumps(found), "utf-8")
            os.replace(temporary, note)
        return sorted(set(found) | set(rewrite))

    @contextlib.contextmanager
    def _lock(self, digest: str) -> Iterator[None]:
        """The template's build lock; waiting for another process's build is reported."""
        self.templates.mkdir(parents=True, exist_ok=True)
        with _flock(self.templates / f"{digest}.lock", wait=False) as held:
            if held:
                yield
                return
        step = f"waiting for template {digest}, which another process is building"
        with self.context.step(self.name, step), _flock(self.templates / f"{digest}.lock"):
            yield

    def _current(self, digest: str) -> tuple[Path, dict[str, object]] | None:
        """The complete template of ``digest`` (the build its link points at), if any and
        usable in this run."""
        try:
            template = self.templates / os.readlink(self.templates / digest)
        except OSError:
            return None
        seen = self._seen.get(digest)
        if seen is not None and seen[0] == template:
            if not (template / _META).exists():
                return None
            return seen
        meta_path = template / _META
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if self.context.recreate and meta.get("session") != self.context.session_id:
            return None  # --isolation-recreate: built anew, once per run
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # last use, for pruning
        self._seen[digest] = (template, meta)
        return template, meta

    def _build_template(
        self,
        *,
        digest: str,
        key: dict[str, object],
        options: VenvOptions,
        installer: Installer,
        python: Path,
        resolved: ResolvedInputs,
        resources: Resources,
    ) -> tuple[Path, dict[str, object]]:
        """Build a template in a directory of its own, then make it the current one by
        renaming its link into place; in the ledger (with its processes) while it builds."""
        template = self.templates / f"{digest}.{uuid.uuid4().hex[:8]}"
        record = resources.add("directory", str(template))
        step = f"building template {digest} ({options.describe()}; python {python})"
        with self.context.step(self.name, step):
            sources = self.inputs.sources(options, resolved)
            self._build(
                options=options,
                installer=installer,
                python=python,
                target=template,
                sources=sources,
                resources=resources,
            )
            site_packages = site_packages_of(template)
            meta: dict[str, object] = {
                "key": key,
                "rewrite": files_naming(template, skip=site_packages),
                "site_packages": site_packages,
                "session": self.context.session_id,
                "created": time.time(),
            }
            temporary = template / f".{_META}.tmp"
            temporary.write_text(json.dumps(meta, indent=1), "utf-8")
            os.replace(temporary, template / _META)
            link = self.templates / f".{digest}.{uuid.uuid4().hex}.link"
            os.symlink(template.name, link)
            os.replace(link, self.templates / digest)  # the template is usable from here on
        resources.forget(record)
        self._seen[digest] = (template, meta)
        self._remove_unused(digest)
        return template, meta

    def _venv_location(self, root: Path, resources: Resources, link: str) -> Path:
        """``<root>/venv``; for hard links across filesystems (a tmpfs /tmp), beside the
        templates instead, where the links can reach."""
        if link != "hardlink" or os.stat(root).st_dev == os.stat(self.templates).st_dev:
            return root / "venv"
        live = self.context.cache_dir / "venvs" / root.name
        resources.add("directory", str(live))
        live.parent.mkdir(parents=True, exist_ok=True)
        return live

    def _build(
        self,
        *,
        options: VenvOptions,
        installer: Installer,
        python: Path,
        target: Path,
        sources: InstallSources,
        resources: Resources,
    ) -> None:
        steps = [installer.create(python, target, seed=options.seed)]
        if sources:
            steps.append(installer.install(target / _BIN / "python", sources))
        for command in steps:
            # run from the target's parent so that no project settings of the test's cwd apply
            result = execute(
                command,
                cwd=target.parent if target.parent.exists() else None,
                on_spawn=resources.track_process,
            )
            if not result.ok:
                what = (
                    "creating the virtual environment"
                    if command is steps[0]
                    else f"installing {options.describe()}"
                )
                raise EnvironmentCreationError(
                    self.name,
                    f"{what} with {installer.name} failed (exit status {result.returncode})",
                    output=(result.stdout + result.stderr),
                ) from CommandFailed(
                    result.command, result.returncode, result.stdout, result.stderr
                )

    # --- the cache ---

    def _in_use(self) -> set[str]:
        """Templates live or kept environments were made from, and builds under way: the
        ledger's word, so no run removes what another one uses."""
        used = set()
        for record in self.context.ledger.records():
            used.add(record.identifier)
            template = record.data.get("template")
            if isinstance(template, str):
                used.add(template)
        return used

    def _remove_unused(self, digest: str) -> None:
        """Remove the builds of ``digest`` that its link no longer points at and no
        environment uses (what ``--isolation-recreate`` replaced)."""
        try:
            current = os.readlink(self.templates / digest)
        except OSError:
            current = None
        used = self._in_use()
        for build in self.templates.glob(f"{digest}.*"):
            if build.name != current and build.is_dir() and str(build) not in used:
                _remove(build)

    def prune_cache(self, older_than: float | None) -> list[str]:
        """Remove templates not used for ``older_than`` seconds (every one if None), except
        those live or kept environments were made from or another process is building;
        then inputs and notes unused as long."""
        removed: list[str] = []
        if not self.templates.is_dir():
            return removed
        for lock_path in sorted(self.templates.glob("*.lock")):
            with _flock(lock_path, wait=False) as held:
                if held:  # else a build is under way
                    removed += self._prune(lock_path.name[: -len(".lock")], older_than)
        for trash in self.templates.glob(".trash-*"):  # removals cut short
            shutil.rmtree(trash, ignore_errors=True)
        removed += self.inputs.prune(older_than)
        return removed

    def _prune(self, digest: str, older_than: float | None) -> list[str]:
        """Under the template's lock: its builds no environment uses, the current one only
        once unused for ``older_than`` seconds."""
        used = self._in_use()  # read under the lock: a new environment records its use there
        try:
            current: str | None = os.readlink(self.templates / digest)
        except OSError:
            current = None
        builds = [p for p in self.templates.glob(f"{digest}.*") if p.is_dir()]
        legacy = self.templates / digest
        if legacy.is_dir() and not legacy.is_symlink():
            builds.append(legacy)  # a template of an older format
        removed = []
        for build in builds:
            if str(build) in used:
                continue
            if build.name == current:
                if older_than is not None:
                    try:
                        age = time.time() - (build / _META).stat().st_mtime
                    except FileNotFoundError:
                        age = float("inf")
                    if age <= older_than:
                        continue
                with contextlib.suppress(FileNotFoundError):
                    (self.templates / digest).unlink()
            _remove(build)
            removed.append(str(build))
        return removed


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (the kind :class:`filelock.FileLock` takes, so the
    two exclude each other), held for the block; yields False if ``wait`` is off and another
    process holds it.  A fraction of FileLock's cost: this is on every environment's path."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Remove a folder at once for its readers (renamed aside first), then its files."""
    trash = folder.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
