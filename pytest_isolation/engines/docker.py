"""The ``docker`` engine: a container per environment, through the docker SDK.

Each environment is a container started from ``image`` with a long-running
init (``sleep infinity`` under ``--init``), working directory ``/workspace``,
no network unless asked for, every capability dropped but a minimal set, and
``no-new-privileges``.  Commands run through ``exec`` with separate stdout and
stderr; files travel through the archive API.  Containers and networks carry
the labels ``pytest-isolation.session``, ``pytest-isolation.pid`` and
``pytest-isolation.created``, and are recorded in the ledger by name before
they are created.

``pool=N`` keeps N started containers of a spec ready in the background; each
is handed out once and removed with its environment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shlex
import signal
import socket
import struct
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from ..errors import (
    CommandTimeout,
    EnvironmentCreationError,
    InvalidSpec,
    IsolationError,
    ResourceLimitExceeded,
)
from ..execution import ExecResult, Usage
from ..spec import EnvSpec, Option, boolean, choice, path, string, string_list
from .base import (
    Availability,
    Engine,
    EngineContext,
    RemoteEnvironment,
    Resources,
    workspace_relative,
)

if TYPE_CHECKING:
    import docker

    from ..ledger import ResourceRecord

SESSION_LABEL = "pytest-isolation.session"
PID_LABEL = "pytest-isolation.pid"
CREATED_LABEL = "pytest-isolation.created"
#: the owner's start time and host: with the pid, proof of whose an object is
STARTED_LABEL = "pytest-isolation.started"
HOST_LABEL = "pytest-isolation.host"
WORKSPACE = "/workspace"
#: what most commands need back after ``cap_drop=ALL``: files and ownership, setuid tools
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL")
_INSTALL_FIX = "pip install 'pytest-isolation[docker]'"


def _port(value: object, base_dir: Path) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    ports = []
    for item in items:
        text = str(item)
        number, _, protocol = text.partition("/")
        if isinstance(item, bool) or not number.isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"expected container ports like 8080 or '53/udp', got {item!r}")
        if protocol not in ("", "tcp", "udp", "sctp"):
            raise ValueError(f"unknown protocol {protocol!r} in {item!r}; use tcp, udp or sctp")
        ports.append(f"{number}/{protocol or 'tcp'}")
    return tuple(ports)


def _volumes(value: object, base_dir: Path) -> tuple[tuple[str, str, str], ...]:
    items = value if isinstance(value, list | tuple) else [value]
    volumes = []
    for item in items:
        parts = str(item).split(":") if isinstance(item, str) else []
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"expected 'SOURCE:TARGET[:ro|rw]', got {item!r}")
        source = (
            parts[0]
            if not parts[0].startswith((".", "/", "~"))
            else str((base_dir / Path(parts[0]).expanduser()).resolve())
        )
        if not parts[1].startswith("/"):
            raise ValueError(f"volume target {parts[1]!r} must be an absolute path")
        volumes.append((source, parts[1], parts[2] if len(parts) == 3 else "rw"))
    return tuple(volumes)


def _count(value: object, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"expected zero or more, got {number}")
    return number


DOCKER_OPTIONS = MappingProxyType(
    {
        "image": Option(
            "image", "the image (also --isolation-image, ini isolation_docker_image)", string
        ),
        "pull": Option(
            "pull",
            "never, missing (default) or always",
            choice("never", "missing", "always"),
            "missing",
        ),
        "dockerfile": Option(
            "dockerfile",
            "build the image from this Dockerfile once per content (cached by hash)",
            path,
        ),
        "build_context": Option(
            "build_context", "the build context (default: the Dockerfile's folder)", path
        ),
        "ports": Option(
            "ports", "container ports to publish on 127.0.0.1 (needs network=True)", _port, ()
        ),
        "volumes": Option(
            "volumes", "binds or named volumes: ['SOURCE:TARGET[:ro|rw]']", _volumes, ()
        ),
        "user": Option("user", "the user commands run as (name or uid[:gid])", string),
        "read_only": Option(
            "read_only", "read-only root filesystem (tmpfs /tmp and /workspace)", boolean, False
        ),
        "cap_add": Option("cap_add", "capabilities to add to the minimal set", string_list, ()),
        "pool": Option("pool", "keep this many started containers of the spec ready", _count, 0),
    }
)


@dataclass(frozen=True)
class DockerOptions:
    image: str | None = None
    pull: str = "missing"
    dockerfile: str | None = None
    build_context: str | None = None
    ports: tuple[str, ...] = ()
    volumes: tuple[tuple[str, str, str], ...] = ()
    user: str | None = None
    read_only: bool = False
    cap_add: tuple[str, ...] = ()
    pool: int = 0

    @classmethod
    def of(cls, spec: EnvSpec) -> DockerOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.options.items() if k in names})  # type: ignore[arg-type]


class DockerEnvironment(RemoteEnvironment):
    """One container; commands run through ``exec``."""

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        engine: DockerEngine,
        container: Any,
    ):
        super().__init__(env_id=env_id, spec=spec, resources=resources, label=container.name)
        self._engine = engine
        self.container = container
        self.name: str = container.name
        self.ports: dict[str, int] = _published(container)

    @property
    def client(self) -> docker.DockerClient:
        return self._engine.client

    def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None,
        env: dict[str, str],
        cwd: str | os.PathLike[str] | None,
        input: str | bytes | None,
    ) -> ExecResult:
        workdir = str(PurePosixPath(WORKSPACE) / cwd) if cwd is not None else WORKSPACE
        environment = [f"{k}={v}" for k, v in {**self.spec.env, **env}.items()]
        api = self.client.api
        started = time.monotonic()
        wall_started = time.time()
        exec_id = api.exec_create(
            self.container.id,
            ["/sbin/docker-init", "-s", "--", *argv],
            stdin=input is not None,
            stdout=True,
            stderr=True,
            environment=environment,
            workdir=workdir,
            user=DockerOptions.of(self.spec).user or "",
        )["Id"]
        stream = api.exec_start(exec_id, socket=True)
        # the raw socket under the SDK's wrapper (unix, tcp or tls), for timeouts and shutdown
        raw = cast("socket.socket", getattr(stream, "_sock", stream))
        data = input.encode() if isinstance(input, str) else input
        try:
            stdout, stderr, timed_out = _exchange(raw, data, timeout)
        finally:
            with contextlib.suppress(OSError):
                stream.close()
            with contextlib.suppress(OSError):
                raw.close()
        if timed_out:
            self._engine.kill_exec(self.container, exec_id)
            assert timeout is not None
            raise CommandTimeout(argv, timeout, stdout, stderr)
        code = _exit_code(api, exec_id)
        result = ExecResult(tuple(argv), code, stdout, stderr, time.monotonic() - started)
        self._remember(argv, code)
        limit = self.spec.limits.memory
        oom = False
        if code == 137 and limit:
            oom = self._engine.oom_events(self.container.id, wall_started, time.time()) > 0
        peak = self._engine.stats(self.container).peak_memory if oom else None
        if limit and peak and oom:
            raise ResourceLimitExceeded(
                "memory",
                f"{shlex.join(argv)!r} was killed by the out-of-memory killer: the memory "
                f"limit of {self.spec.limits.memory} bytes was reached (peak {peak} bytes)",
                measured=peak,
            )
        return result

    def write_file(self, rel: str, data: str | bytes) -> None:
        target = workspace_relative(rel, self.id)
        payload = data.encode() if isinstance(data, str) else data
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(str(target))
            info.size = len(payload)
            info.mtime = int(time.time())
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(payload))
        if not self.container.put_archive(WORKSPACE, buffer.getvalue()):
            raise IsolationError(f"writing {rel} into container {self.name} failed")

    def read_file(self, rel: str) -> bytes:
        target = PurePosixPath(WORKSPACE) / workspace_relative(rel, self.id)
        import docker.errors

        try:
            chunks, _ = self.container.get_archive(str(target))
        except docker.errors.NotFound:
            raise FileNotFoundError(f"{target} in container {self.name}") from None
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            member = archive.extractfile(target.name)
            if member is None:
                raise IsADirectoryError(f"{target} in container {self.name} is not a file")
            return member.read()

    def logs(self) -> str:
        """The container's own output (of its main process)."""
        return bytes(self.container.logs()).decode("utf-8", "replace")

    def usage(self) -> Usage:
        usage = super().usage()
        stats = self._engine.stats(self.container)
        usage.peak_memory = stats.peak_memory
        usage.cpu_time = stats.cpu_time
        return usage

    def validate(self) -> list[str]:
        import docker.errors

        try:
            self.container.reload()
        except docker.errors.NotFound:
            return [f"container {self.name} is gone"]
        status = self.container.status
        return [] if status == "running" else [f"container {self.name} is {status}"]


@dataclass
class _Stats:
    peak_memory: int | None = None
    cpu_time: float | None = None


class _Pool:
    """Started containers of one spec, each handed out once."""

    def __init__(self, size: int):
        self.size = size
        self.ready: deque[ResourceRecord] = deque()
        self.pending: list[Future[None]] = []
        self.lock = threading.Lock()


class DockerEngine(Engine):
    """A container per environment, from a local or pulled image."""

    name = "docker"
    description = "a container per environment, through the docker SDK"
    options = DOCKER_OPTIONS
    supported_limits = frozenset({"memory", "cpus", "pids", "timeout", "network"})

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._shared = context.engine_resources(self.name, self.release)
        self._network: str | None = None
        self._lock = threading.RLock()
        self._pools: dict[str, _Pool] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._images: dict[str, str] = {}

    # --- connection ---

    @functools.cached_property
    def client(self) -> docker.DockerClient:
        import docker

        base_url = os.environ.get("DOCKER_HOST") or _context_host()
        return (
            docker.DockerClient(base_url=base_url, timeout=60)
            if base_url
            else (docker.from_env(timeout=60))
        )

    def availability(self) -> Availability:
        try:
            import docker  # noqa: F401
        except ImportError:
            return Availability(False, reason="the docker SDK is not installed", fix=_INSTALL_FIX)
        where = os.environ.get("DOCKER_HOST") or _context_host() or "unix:///var/run/docker.sock"
        try:
            self.client.ping()
            version = self.client.version().get("Version", "?")
        except Exception as exc:
            return Availability(
                False,
                reason=f"daemon not reachable at {where}: {_short(exc)}",
                fix="start it (dockerd, or systemctl start docker) or set DOCKER_HOST",
            )
        return Availability(True, detail=f"daemon {version} at {where}")

    # --- specs and images ---

    @classmethod
    def validate_spec(cls, spec: EnvSpec) -> None:
        options = DockerOptions.of(spec)
        if not options.image and not options.dockerfile:
            raise InvalidSpec(
                "the docker engine needs an image: image= in the marker, --isolation-image, "
                "ini isolation_docker_image, or dockerfile=",
                option="image",
            )
        if options.ports and spec.limits.network is not True:
            raise InvalidSpec("ports= publishes ports, which needs network=True", option="ports")

    def image_for(self, options: DockerOptions) -> str:
        """The image to start: built from a Dockerfile once per content, or ``image``."""
        if options.dockerfile:
            return self._build(options)
        assert options.image is not None
        with self._lock:
            if options.image in self._images:
                return self._images[options.image]
            self._images[options.image] = self._ensure(options.image, options.pull)
            return self._images[options.image]

    def _ensure(self, image: str, pull: str) -> str:
        import docker.errors

        present = True
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            present = False
        if pull == "always" or (pull == "missing" and not present):
            try:
                self.client.images.pull(image)
            except docker.errors.APIError as exc:
                if pull == "always" and present:
                    raise EnvironmentCreationError(
                        self.name, f"pulling {image} failed (pull='always'): {_short(exc)}"
                    ) from exc
                raise EnvironmentCreationError(
                    self.name,
                    f"image {image} is not on this machine and cannot be pulled: {_short(exc)}; "
                    "build or load it first (docker build/import/load)",
                ) from exc
        elif not present:
            raise EnvironmentCreationError(
                self.name,
                f"image {image} is not on this machine and pull='never'; build or load it first, "
                "or allow pull='missing'",
            )
        return image

    def _build(self, options: DockerOptions) -> str:
        import docker.errors

        assert options.dockerfile is not None
        dockerfile = Path(options.dockerfile)
        context = Path(options.build_context or dockerfile.parent)
        digest = _tree_digest(context, dockerfile)
        tag = f"pytest-isolation-build:{digest}"
        with self._lock:
            if tag in self._images:
                return tag
            try:
                self.client.images.get(tag)
            except docker.errors.ImageNotFound:
                try:
                    self.client.images.build(
                        path=str(context),
                        dockerfile=str(dockerfile.resolve().relative_to(context.resolve()))
                        if dockerfile.resolve().is_relative_to(context.resolve())
                        else str(dockerfile.resolve()),
                        tag=tag,
                        rm=True,
                        pull=False,
                        labels={"pytest-isolation.build": digest},
                    )
                except docker.errors.BuildError as exc:
                    log = "".join(
                        str(line.get("stream", line.get("error", ""))) for line in exc.build_log
                    )
                    raise EnvironmentCreationError(
                        self.name, f"building {dockerfile} failed: {exc.msg}", output=log
                    ) from exc
                except docker.errors.APIError as exc:
                    raise EnvironmentCreationError(
                        self.name, f"building {dockerfile} failed: {_short(exc)}"
                    ) from exc
            self._images[tag] = tag
            return tag

    # --- containers ---

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> DockerEnvironment:
        options = DockerOptions.of(spec)
        image = self.image_for(options)
        if spec.limits.network is True:
            # recorded before any container joins it, so it is released after them
            self._session_network()
        record = self._take_pooled(spec, resources) if options.pool else None
        if record is None:
            name = f"pytest-isolation-{self.context.session_id[:8]}-{env_id}"
            record = resources.add("container", name)
            container = self._start(spec, options, image, name)
        else:
            container = self.client.containers.get(record.identifier)
        if options.pool:
            self._refill(spec, options, image)
        return DockerEnvironment(
            env_id=env_id, spec=spec, resources=resources, engine=self, container=container
        )

    def _start(self, spec: EnvSpec, options: DockerOptions, image: str, name: str) -> Any:
        import docker.errors

        limits = spec.limits
        kwargs: dict[str, Any] = {
            "name": name,
            "command": ["sleep", "infinity"],
            "init": True,
            "detach": True,
            "working_dir": WORKSPACE,
            "labels": self._labels(),
            "cap_drop": ["ALL"],
            "cap_add": sorted({*DEFAULT_CAPS, *options.cap_add}),
            "security_opt": ["no-new-privileges"],
            "read_only": options.read_only,
            "environment": dict(spec.env),
            "network_mode": "none",
        }
        if options.read_only:
            from docker.types import Mount

            kwargs["tmpfs"] = {"/tmp": ""}
            kwargs["mounts"] = [Mount(WORKSPACE, None, type="volume")]
        if options.user:
            kwargs["user"] = options.user
        if limits.memory:
            kwargs["mem_limit"] = limits.memory
            kwargs["memswap_limit"] = limits.memory
        if limits.cpus:
            kwargs["nano_cpus"] = int(limits.cpus * 1e9)
        if limits.pids:
            kwargs["pids_limit"] = limits.pids
        if options.volumes:
            kwargs["volumes"] = {
                source: {"bind": target, "mode": mode} for source, target, mode in options.volumes
            }
        if limits.network is True:
            kwargs["network_mode"] = None
            kwargs["network"] = self._session_network()
            if options.ports:
                kwargs["ports"] = dict.fromkeys(options.ports, ("127.0.0.1", None))
        try:
            if not options.user:
                return self.client.containers.run(image, **kwargs)
            kwargs.pop("detach")
            # /workspace must belong to the user: made before the start, as the user's
            container = self.client.containers.create(image, **kwargs)
            uid, gid = _ids(container, options.user)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                info = tarfile.TarInfo(WORKSPACE.strip("/"))
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                info.uid, info.gid = uid, gid
                archive.addfile(info)
            container.put_archive("/", buffer.getvalue())
            container.start()
            return container
        except docker.errors.APIError as exc:
            raise EnvironmentCreationError(
                self.name, f"starting a container of {image} failed: {_short(exc)}"
            ) from exc

    def _labels(self) -> dict[str, str]:
        owner = self.context.owner
        return {
            SESSION_LABEL: owner.session,
            PID_LABEL: str(owner.pid),
            STARTED_LABEL: repr(owner.started),
            HOST_LABEL: owner.host,
            CREATED_LABEL: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def sweep_labelled(
        self, *, recorded: set[str], select: Callable[[Mapping[str, str]], bool]
    ) -> list[str]:
        if not _daemon_configured():
            return []  # no daemon to ask: nothing of ours can be there
        import docker

        base_url = os.environ.get("DOCKER_HOST") or _context_host()
        client = (
            docker.DockerClient(base_url=base_url, timeout=5)
            if base_url
            else docker.from_env(timeout=5)
        )
        removed: list[str] = []
        try:
            label: dict[str, str | list[str] | bool] = {"label": SESSION_LABEL}
            for container in client.containers.list(all=True, filters=label):
                if container.name not in recorded and select(_owner(container.labels)):
                    container.remove(v=True, force=True)
                    removed.append(str(container.name))
            for network in client.networks.list(filters=label):
                labels = network.attrs.get("Labels") or {}
                if network.name not in recorded and select(_owner(labels)):
                    network.remove()
                    removed.append(str(network.name))
        finally:
            client.close()
        return removed

    def _session_network(self) -> str:
        """This process's bridge network, made on first use and removed at the end."""
        with self._lock:
            if self._network is None:
                name = f"pytest-isolation-{self.context.session_id[:8]}-{os.getpid()}"
                self._shared.add("network", name)
                self.client.networks.create(name, driver="bridge", labels=self._labels())
                self._network = name
            return self._network

    # --- the pool ---

    def _take_pooled(self, spec: EnvSpec, resources: Resources) -> ResourceRecord | None:
        pool = self._pools.get(spec.key)
        if pool is None:
            return None
        with pool.lock:
            if not pool.ready:
                return None
            record = pool.ready.popleft()
        return self._shared.transfer(record, resources)

    def _refill(self, spec: EnvSpec, options: DockerOptions, image: str) -> None:
        with self._lock:
            pool = self._pools.setdefault(spec.key, _Pool(options.pool))
            if self._executor is None:
                self._executor = ThreadPoolExecutor(2, thread_name_prefix="pytest-isolation-pool")
            executor = self._executor
        with pool.lock:
            pool.pending = [f for f in pool.pending if not f.done()]
            missing = pool.size - len(pool.ready) - len(pool.pending)
            for _ in range(missing):
                pool.pending.append(executor.submit(self._add_to_pool, pool, spec, options, image))

    def _add_to_pool(self, pool: _Pool, spec: EnvSpec, options: DockerOptions, image: str) -> None:
        name = f"pytest-isolation-{self.context.session_id[:8]}-pool-{os.urandom(4).hex()}"
        record = self._shared.add("container", name)
        try:
            self._start(spec, options, image, name)
        except Exception:
            return  # the record stays on the shared stack and is released at close
        with pool.lock:
            pool.ready.append(record)

    # --- operations for environments ---

    def kill_exec(self, container: Any, exec_id: str) -> None:
        """Kill a timed-out exec and everything it started."""
        import psutil

        pid = self.client.api.exec_inspect(exec_id).get("Pid")
        try:
            process = psutil.Process(pid)
            for victim in [*process.children(recursive=True), process]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
            # a daemon on another machine: its pids mean nothing here; restart the container
            container.restart(timeout=0)

    def stats(self, container: Any) -> _Stats:
        try:
            raw = container.stats(stream=False, one_shot=True)
        except Exception:
            return _Stats()
        memory = raw.get("memory_stats") or {}
        cpu = ((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        peak = memory.get("max_usage") or (memory.get("stats") or {}).get("peak")
        return _Stats(peak_memory=peak, cpu_time=cpu / 1e9 if cpu else None)

    def oom_events(self, container_id: str, since: float, until: float) -> int:
        """How many times the OOM killer struck in the container between two moments.

        The daemon reports an ``oom`` event for a kill by the OOM killer, not for a
        ``kill -9``; fractional timestamps keep an earlier command's event out.  A
        bounded query (``until``) is read whole, so no streaming connection is left open.
        """
        api = self.client.api
        params = {
            "since": f"{since:.6f}",
            "until": f"{until:.6f}",
            "filters": json.dumps({"container": [container_id], "event": ["oom"]}),
        }
        with api.get(
            f"{api.base_url}/v{api.api_version}/events", params=params, timeout=10
        ) as response:
            response.raise_for_status()
            return sum(1 for line in response.text.splitlines() if line.strip())

    # --- teardown ---

    def release(self, record: ResourceRecord) -> None:
        import docker.errors

        if record.kind == "container":
            try:
                container = self.client.containers.get(record.identifier)
            except docker.errors.NotFound:
                return
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.stop(timeout=1)
            try:
                container.remove(v=True, force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                for _ in range(200):  # another reaper is removing it: wait until it is gone
                    try:
                        self.client.containers.get(record.identifier)
                    except docker.errors.NotFound:
                        return
                    time.sleep(0.05)
                raise
        elif record.kind == "network":
            try:
                self.client.networks.get(record.identifier).remove()
            except docker.errors.NotFound:
                return
        else:
            super().release(record)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        errors = self._shared.release_all()
        self._network = None
        if errors:
            raise errors[0]


def _exchange(
    sock: socket.socket, data: bytes | None, timeout: float | None
) -> tuple[str, str, bool]:
    """Send stdin, read the multiplexed stdout/stderr stream until EOF or the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if deadline is None:
        sock.settimeout(None)

    def feed() -> None:
        with contextlib.suppress(OSError):
            if data:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    if data is not None:
        threading.Thread(target=feed, daemon=True).start()
    out, err = bytearray(), bytearray()
    buffer = bytearray()
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return _decode(out), _decode(err), True
            sock.settimeout(left)
        try:
            block = sock.recv(65536)
        except TimeoutError:
            return _decode(out), _decode(err), True
        if not block:
            break
        buffer += block
        while len(buffer) >= 8:
            stream, size = struct.unpack(">BxxxL", bytes(buffer[:8]))
            if len(buffer) < 8 + size:
                break
            (err if stream == 2 else out).extend(buffer[8 : 8 + size])
            del buffer[: 8 + size]
    return _decode(out), _decode(err), False


def _decode(data: bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")


def _exit_code(api: Any, exec_id: str) -> int:
    for _ in range(200):  # the stream can end a moment before the exec is marked done
        info = api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        time.sleep(0.005)
    return int(api.exec_inspect(exec_id).get("ExitCode") or -1)


def _published(container: Any) -> dict[str, int]:
    container.reload()
    ports = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
    return {port: int(bindings[0]["HostPort"]) for port, bindings in ports.items() if bindings}


def _context_host() -> str | None:
    """The endpoint of the current Docker context, when not the default one."""
    with contextlib.suppress(Exception):
        from docker.context import ContextAPI

        context = ContextAPI.get_current_context()
        if context is not None and context.name != "default":
            host = context.Host
            return str(host) if host else None
    return None


def _tree_digest(context: Path, dockerfile: Path) -> str:
    digest = hashlib.sha256()
    digest.update(dockerfile.read_bytes())
    for file in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(context)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _owner(labels: Mapping[str, str]) -> dict[str, str]:
    names = {
        "session": SESSION_LABEL,
        "pid": PID_LABEL,
        "started": STARTED_LABEL,
        "host": HOST_LABEL,
    }
    return {key: labels[label] for key, label in names.items() if label in labels}


def _daemon_configured() -> bool:
    """Whether a daemon may be there to ask, without waiting on one that is not."""
    if os.environ.get("DOCKER_HOST") or _context_host():
        return True
    return os.path.exists("/var/run/docker.sock")


def _ids(container: Any, user: str) -> tuple[int, int]:
    """The uid and gid of ``user`` (``name``, ``uid``, ``name:group`` or ``uid:gid``) in the
    image of ``container``, from its /etc/passwd and /etc/group where names are given."""
    name, _, group = user.partition(":")

    def table(path: str) -> dict[str, list[str]]:
        try:
            chunks, _ = container.get_archive(path)
        except Exception:
            return {}
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            member = archive.extractfile(PurePosixPath(path).name)
            text = member.read().decode("utf-8", "replace") if member else ""
        return {line.split(":")[0]: line.split(":") for line in text.splitlines() if ":" in line}

    if name.isdigit():
        uid, default_gid = int(name), int(name)
    else:
        entry = table("/etc/passwd").get(name)
        if entry is None or len(entry) < 4:
            raise EnvironmentCreationError(
                "docker", f"user={user!r}: no user {name!r} in the image's /etc/passwd"
            )
        uid, default_gid = int(entry[2]), int(entry[3])
    if not group:
        return uid, default_gid
    if group.isdigit():
        return uid, int(group)
    found = table("/etc/group").get(group)
    if found is None or len(found) < 3:
        raise EnvironmentCreationError(
            "docker", f"user={user!r}: no group {group!r} in the image's /etc/group"
        )
    return uid, int(found[2])
