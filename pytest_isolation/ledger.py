"""The durable record of every live resource, so nothing outlives its run.

Each resource is written to the ledger *before* it is created and removed
only after it was released.  A run that is killed leaves its records behind;
the next run (or ``pytest-isolation cleanup``) finds the ones whose owner
process is gone and releases them.

One JSON file per resource, written to a temporary name and renamed into
place, keeps writes atomic and lets any number of processes (xdist workers,
concurrent runs) share the ledger without a global lock.  A sweeper claims a
record by renaming it, so two sweepers never release the same resource.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil

_CLAIM = ".reaping."


def state_dir() -> Path:
    """Where the ledger lives: ``$PYTEST_ISOLATION_STATE_DIR``, else the XDG state directory."""
    explicit = os.environ.get("PYTEST_ISOLATION_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "pytest-isolation"


def process_started(pid: int) -> float | None:
    """The start time of ``pid`` (seconds since the epoch), or ``None`` if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def same_process(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a reused pid)."""
    now = process_started(pid)
    return now is not None and abs(now - started) < 0.05


@dataclass(frozen=True)
class Owner:
    """The process that made a resource; a resource is orphaned once its owner is gone."""

    session: str
    pid: int
    started: float
    host: str

    @classmethod
    def current(cls, session: str) -> Owner:
        pid = os.getpid()
        return cls(session, pid, process_started(pid) or time.time(), socket.gethostname())

    def alive(self) -> bool:
        """Whether the owner still runs; records of other hosts count as alive (never ours).

        A zombie does not run: a killed runner whose parent has not reaped it yet is gone.
        """
        if self.host != socket.gethostname():
            return True
        if not same_process(self.pid, self.started):
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


@dataclass(frozen=True)
class ResourceRecord:
    """One resource: enough to release it without the process that made it.

    ``kind`` says how to release it (``directory``, ``process``, ...);
    ``identifier`` names it (a path, a pid, a container id).
    """

    kind: str
    identifier: str
    engine: str
    env_id: str
    owner: Owner
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""
    kept_until: float | None = None
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> str:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["owner"] = asdict(self.owner)
        body["data"] = dict(self.data)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResourceRecord:
        body = json.loads(text)
        body["owner"] = Owner(**body["owner"])
        body["data"] = MappingProxyType(body.get("data") or {})
        return cls(**body)

    @property
    def kept(self) -> bool:
        return self.kept_until is not None


class Ledger:
    """The ledger directory; see the module docstring for the protocol."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "ledger"

    def _path(self, record_id: str) -> Path:
        return self.root / f"{record_id}.json"

    def add(self, record: ResourceRecord) -> ResourceRecord:
        """Write ``record`` atomically; call this before creating the resource."""
        self._write(record)
        return record

    update = add

    def _write(self, record: ResourceRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{record.id}.{os.getpid()}.tmp"
        temporary.write_text(record.to_json(), encoding="utf-8")
        os.replace(temporary, self._path(record.id))

    def remove(self, record: ResourceRecord) -> None:
        """Forget ``record``; call this after the resource was released."""
        with contextlib.suppress(FileNotFoundError):
            self._path(record.id).unlink()

    def records(self) -> list[ResourceRecord]:
        """Every record, oldest first, including ones a dead sweeper had claimed."""
        found: list[ResourceRecord] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if _CLAIM in name:
                claimer = name.rsplit(_CLAIM, 1)[1]
                if claimer.isdigit() and psutil.pid_exists(int(claimer)):
                    continue
            elif not name.endswith(".json"):
                continue
            try:
                found.append(ResourceRecord.from_json(Path(entry.path).read_text("utf-8")))
            except FileNotFoundError:
                continue  # removed while we looked
            except (ValueError, TypeError, KeyError):
                continue  # a corrupt file: cleanup --all reports and removes it
        return sorted(found, key=lambda r: r.created)

    def corrupt(self) -> list[Path]:
        """Files in the ledger that cannot be read as records."""
        bad = []
        for item in sorted(self.root.glob("*.json")):
            try:
                ResourceRecord.from_json(item.read_text("utf-8"))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError, KeyError):
                bad.append(item)
        return bad

    def for_session(self, session: str) -> list[ResourceRecord]:
        return [r for r in self.records() if r.owner.session == session]

    @contextlib.contextmanager
    def claim(self, record: ResourceRecord) -> Iterator[bool]:
        """Take ``record`` for releasing; yields ``False`` if another sweeper has it.

        The record is removed when the block succeeds and handed back when it raises.
        """
        claimed = self.root / f"{record.id}.json{_CLAIM}{os.getpid()}"
        source = self._path(record.id)
        if not source.exists():
            for stale in self.root.glob(f"{record.id}.json{_CLAIM}*"):
                claimer = stale.name.rsplit(_CLAIM, 1)[1]
                if not (claimer.isdigit() and psutil.pid_exists(int(claimer))):
                    source = stale  # its sweeper died: take the claim over
                    break
        try:
            os.rename(source, claimed)
        except FileNotFoundError:
            yield False
            return
        try:
            yield True
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(claimed, self._path(record.id))
            raise
        else:
            with contextlib.suppress(FileNotFoundError):
                claimed.unlink()

    def keep(self, record: ResourceRecord, until: float) -> ResourceRecord:
        """Mark ``record`` as kept for debugging until ``until`` (epoch seconds)."""
        kept = replace(record, kept_until=until)
        self._write(kept)
        return kept
