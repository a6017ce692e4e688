"""What a virtualenv template is made from, keyed by content so that it is never stale.

A template is reused while its key is unchanged, so the key must change with
everything the template is made of, not with the strings that name it:

* local files (wheels, sdists, requirements and constraints files, and the
  files those include with ``-r``/``-c``) count by their SHA-256, remembered
  by device, inode, size, modification and change time so that an unchanged
  file is hashed once (:class:`DigestCache`; a file changed less than
  :data:`RACY_WINDOW` before it was hashed is hashed again, as git does with
  racily clean entries);
* a local folder of ``find_links`` counts by the digests of its distributions;
* a local project directory (``project=``, or a directory in ``packages``) is
  built into a wheel once per run through PEP 517 (``uv build``, or ``pip
  wheel`` without uv) and counts by the digest of that wheel's contents (names
  and bytes of its members, not the zip's timestamps); installed editable it
  counts by its path and the digest of its metadata files.

Installers keep caches of their own, keyed on file names or paths: uv keeps
the first wheel it saw under a ``find_links`` file name (uv#16617, uv#4391).
So what a template installs from local files is a content-addressed copy in
:class:`InputStore`: a rebuilt wheel with the same name is a new path to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from filelock import FileLock

from ..errors import EnvironmentCreationError
from ..execution import execute

if TYPE_CHECKING:
    from .base import EngineContext, Resources
    from .virtualenv import Installer, VenvOptions

#: A file modified this close (ns) to the moment it was hashed is hashed again next time.
RACY_WINDOW = 2_000_000_000
#: Files that make a directory a Python project.
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
#: Suffixes of distributions an installer takes from a ``find_links`` folder.
DISTRIBUTIONS = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")
#: Folders a tree stamp of a project leaves out: tools' output, not its source.
_NOT_SOURCE = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "build",
        "dist",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
    }
)
#: Cached inputs and notes younger than this survive a prune that removes everything unused
#: (`cleanup --templates`): a build of another run may be about to use them.
_IN_FLIGHT = 600.0
_DIGESTS_FILE = "digests.json"
_DIGESTS_KEPT = 20_000


# --- what a package entry names ---------------------------------------------------------------


def local_path(entry: str) -> str | None:
    """The local path a ``packages`` entry names (a file or a project directory), or None for a
    requirement of the index (``attrs==23.2.0``) or a remote URL."""
    text = entry.strip()
    if " @ " in text:  # name @ file:///path
        text = text.partition(" @ ")[2].strip()
    if text.startswith("file:"):
        return unquote(urlparse(text).path)
    if "://" in text:
        return None
    if text in (".", "..") or text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return text
    if text.endswith(DISTRIBUTIONS) and "@" not in text:
        return text
    return None


def is_project(directory: Path) -> bool:
    return any((directory / name).is_file() for name in PROJECT_FILES)


def find_project(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds a Python project."""
    for folder in (start, *start.parents):
        if is_project(folder):
            return folder
    return None


# --- content digests ---------------------------------------------------------------------------


class DigestCache:
    """SHA-256 of local files, remembered across runs by their stat (``cache_dir/digests.json``).

    Thread-safe; writes are atomic and last-writer-wins between processes (a
    lost entry only costs one more hashing).
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / _DIGESTS_FILE
        self._entries: dict[str, list[int | str]] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[int | str]]:
        if self._entries is None:
            try:
                loaded = json.loads(self.path.read_text("utf-8"))
                self._entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def digest(self, file: Path) -> str:
        """The SHA-256 (hex) of ``file``'s content; raises ``OSError`` if it cannot be read."""
        stat = os.stat(file)
        stamp: list[int | str] = [
            stat.st_dev,
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ctime_ns,
        ]
        key = str(file)
        with self._lock:
            entry = self._load().get(key)
        if entry is not None and len(entry) == 7 and entry[:5] == stamp:
            hashed_at = entry[5]
            if isinstance(hashed_at, int) and hashed_at - stat.st_mtime_ns > RACY_WINDOW:
                return str(entry[6])
        hashed_at = time.time_ns()
        digest = file_digest(file)
        with self._lock:
            self._load()[key] = [*stamp, hashed_at, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write new digests (atomically), keeping the most recently hashed entries."""
        with self._lock:
            if not self._dirty or self._entries is None:
                return
            entries = self._entries
            if len(entries) > _DIGESTS_KEPT:
                newest = sorted(entries.items(), key=lambda item: int(item[1][5]), reverse=True)
                entries = dict(newest[:_DIGESTS_KEPT])
                self._entries = entries
            self._dirty = False
            text = json.dumps(entries)
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
            temporary.write_text(text, "utf-8")
            os.replace(temporary, self.path)


def file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def wheel_digest(wheel: Path) -> str:
    """A digest of a wheel's members (names and bytes), blind to the zip's timestamps, so that
    rebuilding unchanged sources gives the same digest."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def tree_stamp(directory: Path) -> str:
    """A digest of the names, sizes and modification times of a source tree's files (tools'
    output folders left out): changes with any edit of the sources."""
    digest = hashlib.sha256()
    for folder, names, files in os.walk(directory):
        names[:] = sorted(n for n in names if n not in _NOT_SOURCE and not n.endswith(".egg-info"))
        for name in sorted(files):
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                stat = os.stat(path)
                relative = os.path.relpath(path, directory)
                digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


# --- the content-addressed store ---------------------------------------------------------------


class InputStore:
    """Content-addressed copies of local inputs under ``cache_dir``: ``inputs/<digest>/<name>``
    for files, ``find-links/<digest>/`` for folders (links to stored files).

    Entries are made under a temporary name and renamed into place, so a
    reader never sees half of one.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.files = cache_dir / "inputs"
        self.folders = cache_dir / "find-links"

    def put(
        self, source: Path, digest: str, *, digest_of: Callable[[Path], str] | None = None
    ) -> Path:
        """The stored copy of ``source`` whose content has ``digest`` (by ``digest_of``, the
        SHA-256 of its bytes unless told), made if missing."""
        name = source.name
        home = self.files / digest[:32]
        stored = home / name
        if stored.is_file():
            _touch(home)
            return stored
        self.files.mkdir(parents=True, exist_ok=True)
        temporary = self.files / f".{digest[:32]}.{uuid.uuid4().hex}"
        temporary.mkdir()
        try:
            copy_file(source, temporary / name)
            if (digest_of or file_digest)(temporary / name) != digest:
                raise EnvironmentCreationError(
                    "virtualenv", f"{source} changed while it was being copied; run again"
                )
            with contextlib.suppress(FileExistsError, OSError):
                os.rename(temporary, home)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        if not stored.is_file():  # a directory of that digest without this name
            home.mkdir(parents=True, exist_ok=True)
            copy_file(source, stored)
        return stored

    def view(self, entries: Sequence[tuple[Path, str]]) -> Path:
        """A folder holding, under their names, stored copies of ``entries`` (path, digest):
        a ``find_links`` folder whose paths change whenever a file's content does."""
        listing = sorted((path.name, digest) for path, digest in entries)
        key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]
        folder = self.folders / key
        if folder.is_dir():
            _touch(folder)
            return folder
        self.folders.mkdir(parents=True, exist_ok=True)
        temporary = self.folders / f".{key}.{uuid.uuid4().hex}"
        temporary.mkdir()
        try:
            for path, digest in entries:
                stored = self.put(path, digest)
                try:
                    os.link(stored, temporary / path.name)
                except OSError:
                    shutil.copy2(stored, temporary / path.name)
            with contextlib.suppress(FileExistsError, OSError):
                os.rename(temporary, folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return folder

    def prune(self, older_than: float) -> list[str]:
        """Remove entries unused for ``older_than`` seconds."""
        removed = []
        now = time.time()
        for parent in (self.folders, self.files):
            with contextlib.suppress(FileNotFoundError):
                for entry in list(parent.iterdir()):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > older_than:
                            shutil.rmtree(entry, ignore_errors=True)
                            removed.append(str(entry))
        return removed


def copy_file(source: Path, target: Path) -> None:
    """Copy sharing data where the filesystem can (a reflink), else byte for byte."""
    try:
        import fcntl

        with open(source, "rb") as src, open(target, "xb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())  # FICLONE
        shutil.copystat(source, target)
    except (OSError, ImportError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        shutil.copy2(source, target)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


# --- requirements files -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequirementsWalk:
    """What a requirements file pulls in: every file reached (by content) and local folders."""

    files: tuple[tuple[str, str], ...]  # (path, digest): requirements, constraints, local dists
    trees: tuple[str, ...]  # local project folders, keyed per run by their tree stamp
    links: tuple[str, ...]  # local --find-links folders


_NESTED = {"-r": "requirement", "--requirement": "requirement"}
_NESTED.update({"-c": "constraint", "--constraint": "constraint"})
_EDITABLE = ("-e", "--editable")
_LINKS = ("-f", "--find-links")


def requirement_lines(text: str) -> Iterator[str]:
    """Logical lines of a requirements file: continuations joined, comments and blanks gone."""
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.lstrip().startswith("#"):
            continue
        line = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if line:
            yield line
    if pending.strip():
        yield pending.strip()


def walk_requirements(path: Path, digests: DigestCache) -> RequirementsWalk:
    """Follow ``path`` and every ``-r``/``-c`` file it includes (relative to the including
    file's folder), noting local distributions, projects and ``--find-links`` folders.

    Raises ``FileNotFoundError`` naming the file that includes a missing one.
    """
    files: dict[str, str] = {}
    trees: list[str] = []
    links: list[str] = []
    pending: list[tuple[Path, Path | None]] = [(path.resolve(), None)]
    while pending:
        current, parent = pending.pop()
        if str(current) in files:
            continue
        try:
            files[str(current)] = digests.digest(current)
            text = current.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            where = f" (included by {parent})" if parent else ""
            raise FileNotFoundError(f"requirements file {current} not found{where}") from None
        base = current.parent
        for line in requirement_lines(text):
            words = shlex.split(line, posix=True) if "'" in line or '"' in line else line.split()
            if not words:
                continue
            first, rest = words[0], words[1:]
            option, _, attached = first.partition("=")
            if option in _NESTED or (first[:2] in ("-r", "-c") and len(first) > 2):
                target = attached or (rest[0] if rest else "")
                if first[:2] in ("-r", "-c") and len(first) > 2 and not attached:
                    target = first[2:]
                if target and "://" not in target:
                    pending.append(((base / os.path.expanduser(target)).resolve(), current))
                continue
            if option in _LINKS:
                target = attached or (rest[0] if rest else "")
                if target and "://" not in target:
                    links.append(str((base / target).resolve()))
                continue
            if option in _EDITABLE:
                target = attached or (rest[0] if rest else "")
                found = local_path(target) if target else None
                if found is not None:
                    trees.append(str((base / os.path.expanduser(found)).resolve()))
                continue
            if first.startswith("-"):
                continue  # --index-url, --hash ...: the file's own digest covers them
            found = local_path(line.split(";")[0].strip())
            if found is None:
                continue
            target_path = (base / os.path.expanduser(found)).resolve()
            if target_path.is_dir():
                trees.append(str(target_path))
            elif target_path.is_file():
                files[str(target_path)] = digests.digest(target_path)
    return RequirementsWalk(tuple(sorted(files.items())), tuple(sorted(trees)), tuple(links))


# --- local projects ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltProject:
    """A local project built into a wheel this run."""

    source: str
    wheel: str  # the stored copy
    digest: str


@dataclass
class ProjectBuilds:
    """Local projects built into wheels, each once per run (shared by xdist workers through the
    run id), recorded in the ledger while they build."""

    context: EngineContext
    store: InputStore

    @property
    def folder(self) -> Path:
        return self.context.cache_dir / "projects"

    def wheel(
        self, project: Path, command: Sequence[str], resources: Resources, what: str
    ) -> BuiltProject:
        """The wheel of ``project`` built by ``command`` (``OUT`` standing for the output
        folder), built by the first process of this run that asks (xdist workers share it)."""
        name = hashlib.sha256(json.dumps([str(project), *command]).encode()).hexdigest()[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / f"{name}.{self.context.session_id}.json"
        with FileLock(str(self.folder / f"{name}.lock")):
            built = _read_built(marker)
            if built is None:
                built = self._build(project, command, resources, what)
                temporary = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
                temporary.write_text(json.dumps(built.__dict__), "utf-8")
                os.replace(temporary, marker)
        return built

    def _build(
        self, project: Path, command: Sequence[str], resources: Resources, what: str
    ) -> BuiltProject:
        out = self.folder / f".build-{uuid.uuid4().hex}"
        record = resources.add("directory", str(out))
        try:
            out.mkdir()
            with self.context.step("virtualenv", f"building {project} ({what})"):
                result = execute(
                    [str(out) if word == "OUT" else word for word in command],
                    cwd=project,
                    on_spawn=resources.track_process,
                    env=_quiet_env(),
                )
            if not result.ok:
                raise EnvironmentCreationError(
                    "virtualenv",
                    f"building the project {project} with {what} failed "
                    f"(exit status {result.returncode})",
                    output=result.stdout + result.stderr,
                )
            wheels = sorted(out.glob("*.whl"))
            if len(wheels) != 1:
                raise EnvironmentCreationError(
                    "virtualenv",
                    f"building the project {project} with {what} gave "
                    f"{len(wheels)} wheels, expected one",
                    output=result.stdout + result.stderr,
                )
            digest = wheel_digest(wheels[0])
            stored = self.store.put(wheels[0], digest, digest_of=wheel_digest)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            resources.forget(record)
        return BuiltProject(str(project), str(stored), digest)

    def prune(self, older_than: float) -> None:
        """Drop the per-run notes of builds older than ``older_than`` seconds."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.folder.iterdir():
                with contextlib.suppress(OSError):
                    if entry.suffix == ".json" and now - entry.stat().st_mtime > older_than:
                        entry.unlink()


def _read_built(marker: Path) -> BuiltProject | None:
    try:
        built = BuiltProject(**json.loads(marker.read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return built if Path(built.wheel).is_file() else None


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def metadata_digest(project: Path, digests: DigestCache) -> str:
    """A digest of a project's metadata files, what an editable install depends on."""
    parts = []
    for name in PROJECT_FILES:
        path = project / name
        if path.is_file():
            parts.append(f"{name}:{digests.digest(path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class InstallSources:
    """What one install command takes: requirements and the places to find them."""

    packages: tuple[str, ...] = ()
    editables: tuple[str, ...] = ()
    requirements: str | None = None
    find_links: tuple[str, ...] = ()
    index_url: str | None = None
    offline: bool = False

    def __bool__(self) -> bool:
        return bool(self.packages or self.editables or self.requirements)


# --- a spec's inputs, resolved ------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedInputs:
    """A spec's inputs by content (for the template key) and how to install them."""

    key: dict[str, object]
    local_files: tuple[tuple[str, str], ...]  # (path, digest) in packages
    built: tuple[tuple[str, str], ...]  # (project folder, stored wheel)
    links: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (folder, ((file, digest)...))


class Inputs:
    """Resolves a spec's local inputs into content keys, once per file state and per run."""

    def __init__(self, context: EngineContext) -> None:
        self.context = context
        self.digests = DigestCache(context.cache_dir)
        self.store = InputStore(context.cache_dir)
        self.builds = ProjectBuilds(context, self.store)
        self._trees: dict[str, str] = {}
        self._wheels: dict[str, BuiltProject] = {}

    def resolve(
        self, options: VenvOptions, installer: Installer, python: Path, resources: Resources
    ) -> ResolvedInputs:
        """Digests of every local input; local projects built (once per run) unless editable.

        Raises :class:`EnvironmentCreationError` for an input that vanished or a failed build.
        """
        try:
            return self._resolve(options, installer, python, resources)
        except FileNotFoundError as exc:
            raise EnvironmentCreationError("virtualenv", str(exc)) from None
        finally:
            self.digests.save()

    def _resolve(
        self, options: VenvOptions, installer: Installer, python: Path, resources: Resources
    ) -> ResolvedInputs:
        local: dict[str, object] = {}
        files: list[tuple[str, str]] = []
        built: list[tuple[str, str]] = []
        # local entries were made absolute when the spec was read; others are requirements
        folders = [p for p in options.packages if os.path.isabs(p) and os.path.isdir(p)]
        if options.project:
            folders.insert(0, options.project)
        for folder in folders:
            if options.editable:
                local[folder] = ["editable", metadata_digest(Path(folder), self.digests)]
                continue
            wheel = self._wheel(Path(folder), options, installer, python, resources)
            local[folder] = ["wheel", wheel.digest]
            built.append((folder, wheel.wheel))
        for entry in options.packages:
            if os.path.isabs(entry) and os.path.isfile(entry):
                digest = self.digests.digest(Path(entry))
                local[entry] = ["file", digest]
                files.append((entry, digest))
        links = []
        link_key: list[object] = []
        for link in options.find_links:
            if "://" in link:
                link_key.append(link)
                continue
            listing = self._listing(Path(link))
            links.append((link, listing))
            link_key.append([link, [[Path(f).name, d] for f, d in listing]])
        requirements: dict[str, object] | None = None
        if options.requirements:
            walk = walk_requirements(Path(options.requirements), self.digests)
            requirements = {
                "files": [list(item) for item in walk.files],
                "trees": [[tree, self._tree(tree)] for tree in walk.trees],
                "links": [[folder, self._listing(Path(folder))] for folder in walk.links],
            }
        key: dict[str, object] = {
            "packages": sorted(options.packages),
            "local": local,
            "project": options.project,
            "editable": options.editable,
            "requirements": requirements,
            "find_links": link_key,
        }
        return ResolvedInputs(key, tuple(files), tuple(built), tuple(links))

    def _wheel(
        self,
        project: Path,
        options: VenvOptions,
        installer: Installer,
        python: Path,
        resources: Resources,
    ) -> BuiltProject:
        """``project`` built into a wheel, once per run."""
        settings = [options.find_links, options.index_url, options.offline]
        memo = json.dumps([str(project), installer.name, str(python), settings])
        known = self._wheels.get(memo)
        if known is not None:
            return known
        index = self.materialized(
            InstallSources(
                find_links=options.find_links,
                index_url=options.index_url,
                offline=options.offline,
            )
        )
        built = self.builds.wheel(
            project, installer.build_wheel(project, python, index), resources, installer.builder
        )
        self._wheels[memo] = built
        return built

    def _listing(self, folder: Path) -> tuple[tuple[str, str], ...]:
        """The distributions of a local folder with their digests (missing folder: none)."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return ()
        return tuple(
            (entry.path, self.digests.digest(Path(entry.path)))
            for entry in entries
            if entry.name.endswith(DISTRIBUTIONS) and entry.is_file()
        )

    def _tree(self, folder: str) -> str:
        """A local project folder named in a requirements file, looked at once per run."""
        if folder not in self._trees:
            self._trees[folder] = tree_stamp(Path(folder))
        return self._trees[folder]

    def materialized(self, sources: InstallSources) -> InstallSources:
        """``sources`` with local find_links folders replaced by content-addressed views."""
        links = []
        for link in sources.find_links:
            if "://" in link:
                links.append(link)
            else:
                listing = self._listing(Path(link))
                links.append(str(self.store.view([(Path(f), d) for f, d in listing])))
        return InstallSources(
            sources.packages,
            sources.editables,
            sources.requirements,
            tuple(links),
            sources.index_url,
            sources.offline,
        )

    def sources(self, options: VenvOptions, resolved: ResolvedInputs) -> InstallSources:
        """The install command's inputs, local files replaced by their stored copies."""
        stored = {
            path: str(self.store.put(Path(path), digest)) for path, digest in resolved.local_files
        }
        wheels = dict(resolved.built)
        packages = []
        editables = []
        if options.project:
            if options.editable:
                editables.append(options.project)
            else:
                packages.append(wheels[options.project])
        for entry in options.packages:
            if entry in wheels:
                packages.append(wheels[entry])
            elif options.editable and os.path.isabs(entry) and os.path.isdir(entry):
                editables.append(entry)
            else:
                packages.append(stored.get(entry, entry))
        return self.materialized(
            InstallSources(
                tuple(packages),
                tuple(editables),
                options.requirements,
                tuple(options.find_links),
                options.index_url,
                options.offline,
            )
        )

    def prune(self, older_than: float | None) -> list[str]:
        age = max(older_than or 0.0, _IN_FLIGHT)
        self.builds.prune(age)
        return self.store.prune(age)
