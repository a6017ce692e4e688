"""The ``kubernetes`` engine: a namespace with one pod per environment, in a real cluster.

Each environment is a namespace made from ``generateName`` (``pytest-iso-``),
labelled ``pytest-isolation/session``, ``/pid``, ``/started``, ``/host``, ``/pidns``
and ``/env``, labelled to enforce Pod Security ``restricted`` and annotated with its
creation time and TTL; limits become a ResourceQuota and a LimitRange;
``network=False`` (the default) a deny-all NetworkPolicy for ingress and egress.  In
it runs one pod (``image``, a long-lived command) that meets the ``restricted``
profile (a non-root uid, no privilege escalation, no capabilities, the runtime's
seccomp profile), watched until it is ready.  Commands run through the ``exec``
subresource over a WebSocket of their own (``v5``/``v4.channel.k8s.io``), never
through the REST client; files travel as tar over exec.

The ledger records each namespace, before it exists, by its ``pytest-isolation/env``
label, with the kubeconfig and context it lives in, and adds its name as soon as the
API server has chosen it, so it can be deleted without the runner, and without the
right to list namespaces.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import secrets
import select
import shlex
import ssl
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode, urlsplit

from ..errors import (
    CommandTimeout,
    EngineUnavailable,
    EnvironmentCreationError,
    InvalidSpec,
    IsolationError,
)
from ..execution import ExecResult, Usage
from ..spec import (
    EnvSpec,
    Option,
    boolean,
    choice,
    parse_duration,
    path,
    resolve_spec,
    string,
    string_list,
)
from .base import (
    Availability,
    Engine,
    EngineContext,
    RemoteEnvironment,
    Resources,
    workspace_relative,
)

if TYPE_CHECKING:
    from ..ledger import ResourceRecord

LABEL = "pytest-isolation"
SESSION_LABEL = f"{LABEL}/session"
PIDNS_LABEL = f"{LABEL}/pidns"
PREFIX = "pytest-iso-"
WORKSPACE = "/workspace"
#: HOME and TMPDIR of the pod's user, emptyDirs beside the workspace: a non-root user can
#: write there (pip's user installs go to HOME).
HOME = "/isolation/home"
TMPDIR = "/isolation/tmp"
#: The uid pods run as unless ``run_as_user`` says otherwise (Pod Security ``restricted``
#: forbids root).
DEFAULT_UID = 1000
#: Seconds ``wait_deleted=True`` waits for a namespace to go.
WAIT_DELETED = 120.0
_INSTALL_FIX = "pip install 'pytest-isolation[kubernetes]'"
_V5, _V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"
_STDIN, _STDOUT, _STDERR, _STATUS, _CLOSE = 0, 1, 2, 3, 255
#: Waiting reasons of a container that will not start without a change by someone.
_HOPELESS = ("CreateContainerConfigError", "InvalidImageName", "ImagePullBackOff")
#: What the engine asks the API server for: (verb, resource, subresource, group, needed).
#: ``needed`` is True where the engine cannot work without it, else what is lost.
RIGHTS: tuple[tuple[str, str, str, str, bool | str], ...] = (
    ("create", "namespaces", "", "", True),
    ("get", "namespaces", "", "", True),
    ("delete", "namespaces", "", "", True),
    ("list", "namespaces", "", "", "label sweeps cannot find namespaces no ledger lists"),
    ("watch", "namespaces", "", "", "wait_deleted polls instead of watching"),
    ("create", "pods", "", "", True),
    ("get", "pods", "", "", True),
    ("list", "pods", "", "", True),
    ("watch", "pods", "", "", True),
    ("get", "pods", "exec", "", True),
    ("create", "pods", "exec", "", "exec on Kubernetes 1.35 and later (kubernetes#134577)"),
    ("get", "pods", "log", "", "a failing test's report lacks the pod's log"),
    ("list", "events", "", "", "a pod that does not start is reported without its events"),
    ("create", "networkpolicies", "", "networking.k8s.io", True),
    ("create", "resourcequotas", "", "", "limits= (memory, cpus) cannot be set"),
    ("create", "limitranges", "", "", "limits= (memory, cpus) cannot be set"),
    ("get", "pods", "", "metrics.k8s.io", "usage() has no memory and CPU figures"),
)


def _template(value: object, base_dir: Path) -> Mapping[str, Any]:
    """A pod template override: a mapping, or YAML text of one."""
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"pod_template is not valid YAML: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping (or YAML of one) for the pod, got {value!r}")
    return MappingProxyType(dict(value))


def _wait_deleted(value: object, base_dir: Path) -> float:
    """Seconds to wait for a namespace's deletion: true is WAIT_DELETED, false none."""
    with contextlib.suppress(ValueError):
        return WAIT_DELETED if boolean(value, base_dir) else 0.0
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"expected true, false or a duration, got {value!r}") from None


def _positive(value: object, base_dir: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a positive number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a positive number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def _uid(value: object, base_dir: Path) -> int | str:
    if value == "image":
        return "image"
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ValueError(f"expected a numeric user id or 'image', got {value!r}")
    if int(value) == 0:
        raise ValueError(
            "root (0) is refused: Pod Security 'restricted' forbids it; "
            f"use a non-root uid (the default is {DEFAULT_UID})"
        )
    return int(value)


KUBERNETES_OPTIONS = MappingProxyType(
    {
        "image": Option("image", "the pod's image", string),
        "context": Option(
            "context", "the kubeconfig context (also --isolation-kube-context)", string
        ),
        "kubeconfig": Option(
            "kubeconfig",
            "the kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster)",
            path,
        ),
        "pod_template": Option(
            "pod_template",
            "YAML or a mapping merged into the generated "
            "pod (metadata, spec; containers merged by name)",
            _template,
        ),
        "command": Option(
            "command", "the pod's long-lived command", string_list, ("sleep", "infinity")
        ),
        "run_as_user": Option(
            "run_as_user",
            f"the non-root uid to run as (default {DEFAULT_UID}; 'image': the image's own "
            "user, which must be a numeric non-root uid); root is refused",
            _uid,
            DEFAULT_UID,
        ),
        "pod_security": Option(
            "pod_security",
            "the Pod Security level the namespace enforces: restricted, baseline, privileged, "
            "or none (the cluster's default)",
            choice("restricted", "baseline", "privileged", "none"),
            "restricted",
        ),
        "start_timeout": Option(
            "start_timeout",
            "how long to wait for the pod to be ready",
            lambda v, _: parse_duration(v),
            120.0,
        ),
        "wait_deleted": Option(
            "wait_deleted",
            "wait at teardown until the namespace is gone: true (up to "
            f"{WAIT_DELETED:g}s), false, or how long",
            _wait_deleted,
            0.0,
        ),
        "qps": Option(
            "qps", "requests per second this process sends to the API server", _positive, 20.0
        ),
    }
)


@dataclass(frozen=True)
class KubeOptions:
    image: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    pod_template: Mapping[str, Any] | None = None
    command: tuple[str, ...] = ("sleep", "infinity")
    run_as_user: int | str = DEFAULT_UID
    pod_security: str = "restricted"
    start_timeout: float = 120.0
    wait_deleted: float = 0.0
    qps: float = 20.0

    @classmethod
    def of(cls, spec: EnvSpec) -> KubeOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.options.items() if k in names})  # type: ignore[arg-type]


class ExitStatusLost(IsolationError):
    """An exec ended without its status message: whether the command succeeded is unknown."""

    def __init__(self, command: Sequence[str], where: str, stdout: str, stderr: str):
        self.command = tuple(command)
        self.stdout = stdout
        self.stderr = stderr
        message = (
            f"the exit status of {shlex.join(command)} in pod {where} was lost: the exec "
            "connection closed without the status message (a kubelet ends exec sessions "
            "that stay quiet longer than its streaming idle timeout); the command was killed"
        )
        for name, text in (("stdout", stdout), ("stderr", stderr)):
            if text:
                message += f"\n--- {name} ---\n{text.rstrip()}"
        super().__init__(message)


class _Throttle:
    """A token bucket: at most ``qps`` requests a second from this process, bursts of 2 x qps."""

    def __init__(self, qps: float) -> None:
        self.qps = qps
        self.tokens = qps * 2
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.qps * 2, self.tokens + (now - self.stamp) * self.qps)
            self.stamp = now
            wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.qps
            self.tokens -= 1
        if wait:
            time.sleep(wait)


#: Retries of a request answered 429, and the longest Retry-After honoured (seconds).
THROTTLED_RETRIES, LONGEST_RETRY_AFTER = 6, 10.0
#: How long a pod's creation is retried while its namespace's ``default`` ServiceAccount
#: does not exist yet (made asynchronously by a controller: kubernetes#66689).
SERVICE_ACCOUNT_WAIT = 15.0


@dataclass
class _Cluster:
    """A connection to one cluster: the REST client, where it came from, and its throttle.

    ``api`` serves REST calls only (it is thread-safe for them); exec opens WebSockets of
    its own from ``configuration`` and never touches ``api``.
    """

    api: Any
    configuration: Any
    kubeconfig: str | None
    context: str | None
    server: str
    throttle: _Throttle
    #: The exec subprotocol the server spoke last (None: not asked yet).
    protocol: str | None = None
    #: Whether a deny-all NetworkPolicy cuts a pod off here (None: not probed yet).
    policy_enforced: bool | None = None
    probe_lock: threading.Lock = field(default_factory=threading.Lock)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` within the throttle; a 429 is retried after its
        Retry-After, a pod refused because its namespace has no ServiceAccount yet until it
        has one, both a bounded number of times."""
        from kubernetes.client.exceptions import ApiException

        kwargs.setdefault("_request_timeout", 30)
        throttled = 0
        deadline = time.monotonic() + SERVICE_ACCOUNT_WAIT
        pause = 0.1
        while True:
            self.throttle()
            try:
                return method(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 429 and throttled < THROTTLED_RETRIES:
                    throttled += 1
                    time.sleep(_retry_after(exc, throttled))
                    continue
                if _service_account_missing(exc) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                raise


def _retry_after(exc: Any, attempt: int) -> float:
    """Seconds to wait before retrying a 429: its Retry-After, else a growing pause."""
    headers = getattr(exc, "headers", None) or {}
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(str(headers.get("Retry-After")))
        return min(LONGEST_RETRY_AFTER, max(0.0, seconds))
    return min(LONGEST_RETRY_AFTER, 0.5 * 2.0**attempt)


def _service_account_missing(exc: Any) -> bool:
    return bool(exc.status == 403 and "error looking up service account" in str(exc.body or ""))


def connect(kubeconfig: str | None, context: str | None, qps: float = 20.0) -> _Cluster:
    """A client for ``context`` of ``kubeconfig`` (default: KUBECONFIG, ~/.kube/config, or
    the in-cluster service account)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    load: Any = config.load_kube_config  # the client is untyped
    # the client reads KUBECONFIG once, when it is imported: read it now instead
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        load(config_file=config_file, context=context, client_configuration=configuration)
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise EnvironmentCreationError(
                "kubernetes",
                f"no usable kubeconfig ({where}{', context ' + context if context else ''}): {exc}",
            ) from exc
        in_cluster: Any = config.load_incluster_config
        in_cluster(client_configuration=configuration)
    return _Cluster(
        client.ApiClient(configuration),
        configuration,
        kubeconfig,
        context,
        configuration.host,
        _Throttle(qps),
    )


class _ExecSocket:
    """One exec over a WebSocket of its own (websocket-client), read and written by one
    thread: input goes out while output comes in, so a filter that writes as it reads
    cannot deadlock; TLS records already decrypted are read before waiting on the socket.
    """

    def __init__(self, cluster: _Cluster, namespace: str, pod: str, argv: Sequence[str]):
        self.cluster = cluster
        self.where = f"{namespace}/{pod}"
        self.path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec"
        self.argv = list(argv)
        self.ws: Any = None

    def open(self, stdin: bool, timeout: float) -> str:
        """Connect and upgrade within ``timeout`` seconds; the subprotocol spoken."""
        import websocket

        configuration = self.cluster.configuration
        query = [("command", part) for part in self.argv]
        query += [("stdin", str(stdin).lower()), ("stdout", "true"), ("stderr", "true")]
        parts = urlsplit(configuration.host)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{self.path}?{urlencode(query)}"
        headers = [f"{k}: {v}" for k, v in _auth_headers(configuration).items()]
        options: dict[str, Any] = {
            "header": headers,
            "subprotocols": [_V5, _V4],
            "timeout": max(0.05, timeout),
        }
        if configuration.proxy:
            proxy = urlsplit(configuration.proxy)
            options.update(http_proxy_host=proxy.hostname, http_proxy_port=proxy.port)
        self.ws = websocket.WebSocket(sslopt=_ssl_options(configuration, scheme))
        try:
            self.ws.connect(url, **options)
        except websocket.WebSocketBadStatusException as exc:
            self.close()
            raise IsolationError(_upgrade_refused(exc, self.where)) from None
        except BaseException:
            self.close()
            raise
        return str(self.ws.getsubprotocol() or _V4)

    def exchange(
        self, data: bytes | None, deadline: float | None, close_stdin: bool
    ) -> tuple[bytes, bytes, bytes | None, bool]:
        """Send ``data`` (then, with ``close_stdin``, the v5 CLOSE of stdin) while reading
        output; (stdout, stderr, status message or None, timed out)."""
        from websocket import ABNF, WebSocketConnectionClosedException, WebSocketTimeoutException

        sock = self.ws.sock
        sock.settimeout(0.05)
        outgoing = bytearray()
        if data is not None:
            for start in range(0, len(data), 1 << 16):
                frame = bytes([_STDIN]) + data[start : start + (1 << 16)]
                outgoing += ABNF.create_frame(frame, ABNF.OPCODE_BINARY).format()
            if close_stdin:
                frame = bytes([_CLOSE, _STDIN])
                outgoing += ABNF.create_frame(frame, ABNF.OPCODE_BINARY).format()
        streams: dict[int, bytearray] = {_STDOUT: bytearray(), _STDERR: bytearray()}
        status: bytes | None = None
        message = bytearray()
        while True:
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                return bytes(streams[_STDOUT]), bytes(streams[_STDERR]), status, True
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            readable, writable, _ = select.select(
                [sock], [sock] if outgoing else [], [], 0 if pending else wait
            )
            if writable and outgoing:
                with contextlib.suppress(
                    TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError
                ):
                    del outgoing[: sock.send(outgoing)]
            if not (pending or readable):
                continue
            try:
                frame = self.ws.recv_frame()
            except WebSocketTimeoutException:
                continue
            except (WebSocketConnectionClosedException, ConnectionError):
                break
            if frame.opcode == ABNF.OPCODE_PING:
                outgoing += ABNF.create_frame(frame.data, ABNF.OPCODE_PONG).format()
            elif frame.opcode == ABNF.OPCODE_CLOSE:
                break
            elif frame.opcode in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT, ABNF.OPCODE_CONT):
                message += frame.data
                if frame.fin:
                    channel, payload = (message[0], bytes(message[1:])) if message else (-1, b"")
                    message = bytearray()
                    if channel in streams:
                        streams[channel] += payload
                    elif channel == _STATUS:
                        status = (status or b"") + payload
        return bytes(streams[_STDOUT]), bytes(streams[_STDERR]), status, False

    def close(self) -> None:
        if self.ws is None:
            return
        with contextlib.suppress(Exception):
            self.ws.sock.settimeout(1.0)
            self.ws.send_close()
        with contextlib.suppress(Exception):
            self.ws.shutdown()


def _auth_headers(configuration: Any) -> dict[str, str]:
    """The Authorization header the REST client would send (bearer tokens refreshed by the
    configuration's hook, basic auth)."""
    headers: dict[str, str] = {}
    for setting in configuration.auth_settings().values():
        if setting.get("in") == "header" and setting.get("value"):
            headers[setting["key"]] = setting["value"]
    return headers


def _ssl_options(configuration: Any, scheme: str) -> dict[str, Any]:
    """websocket-client's TLS options from the client configuration, as the REST client
    verifies (CA, client certificate, server name)."""
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_NONE}
    if scheme == "wss" and configuration.verify_ssl:
        import certifi

        options = {
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": configuration.ssl_ca_cert or certifi.where(),
        }
        if configuration.assert_hostname is not None:
            options["check_hostname"] = configuration.assert_hostname
    if configuration.cert_file:
        options["certfile"] = configuration.cert_file
    if configuration.key_file:
        options["keyfile"] = configuration.key_file
    if getattr(configuration, "tls_server_name", None):
        options["server_hostname"] = configuration.tls_server_name
    return options


def _upgrade_refused(exc: Any, where: str) -> str:
    """What an exec refused before the upgrade means, with the fix."""
    body = getattr(exc, "resp_body", None) or b""
    message = ""
    with contextlib.suppress(Exception):
        message = json.loads(body).get("message", "")
    message = message or (body.decode("utf-8", "replace") if isinstance(body, bytes) else "")
    code = getattr(exc, "status_code", None)
    if code == 403:
        return (
            f"exec in pod {where} is forbidden: {message}; the user needs get (and, from "
            "Kubernetes 1.35, create) on pods/exec"
        )
    if code == 401:
        return f"exec in pod {where}: the API server refused the credentials ({message})"
    return f"exec in pod {where} failed with status {code}: {message or exc}"


class KubernetesEnvironment(RemoteEnvironment):
    """A namespace with one pod; commands run through ``exec``.

    ``network_policy`` says whether the cluster enforces the deny-all NetworkPolicy of a
    ``network=False`` environment: ``"enforced"``, ``"not enforced"`` (the pod reached the
    API server's Service: its CNI ignores NetworkPolicy), ``"not probed"`` with why, or
    ``"none"`` (``network=True``).
    """

    def __init__(
        self,
        *,
        env_id: str,
        spec: EnvSpec,
        resources: Resources,
        cluster: _Cluster,
        namespace: str,
        pod: str,
    ) -> None:
        super().__init__(env_id=env_id, spec=spec, resources=resources, label=f"{namespace}/{pod}")
        self.cluster = cluster
        self.namespace = namespace
        self.pod = pod
        self.name = namespace
        self.network_policy = "none"

    def _exec(
        self, argv: Sequence[str], data: bytes | None, timeout: float | None
    ) -> tuple[bytes, bytes, int | None, bool]:
        """Run ``argv`` in the pod; (stdout, stderr, exit status, timed out).

        The status is None when the exec ended without its status message.  An exec not
        even upgraded by its deadline started nothing: that raises CommandTimeout.  Where the
        server is known to speak ``v5``, the end of ``data`` is its CLOSE signal; otherwise
        the command reads exactly ``len(data)`` bytes (``head -c``), as ``v4`` cannot close
        stdin.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        counted = data is not None and self.cluster.protocol != _V5
        if counted:
            assert data is not None
            argv = ["sh", "-c", f'head -c {len(data)} | "$@"', "sh", *argv]
        self.cluster.throttle()
        channel = _ExecSocket(self.cluster, self.namespace, self.pod, argv)
        try:
            try:
                protocol = channel.open(data is not None, 30.0 if timeout is None else timeout)
            except IsolationError:
                raise
            except Exception as exc:
                if deadline is not None and time.monotonic() >= deadline - 0.05:
                    assert timeout is not None
                    raise CommandTimeout(argv, timeout, "", "") from None
                raise IsolationError(
                    f"exec in pod {self.namespace}/{self.pod}: no WebSocket upgrade from "
                    f"{self.cluster.server}: {exc}"
                ) from exc
            self.cluster.protocol = protocol
            out, err, raw, timed_out = channel.exchange(
                data, deadline, close_stdin=protocol == _V5 and not counted
            )
        finally:
            channel.close()
        if timed_out or raw is None:
            return out, err, None, timed_out
        code, problem = _exit_status(raw)
        return out, err + problem.encode(), code, False

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
        marker = f"{TMPDIR}/.pytest-isolation-{secrets.token_hex(6)}"
        # exec has no cwd or environment of its own, and a kubelet kills nothing when the
        # client goes: a small shell records the command's pid, moves to the directory,
        # sets the variables
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**self.spec.env, **env}.items())
        script = (
            f"echo $$ > {marker}; cd {shlex.quote(workdir)} || exit 126; "
            f'{"export " + exports + "; " if exports else ""}exec "$@"'
        )
        data = input.encode() if isinstance(input, str) else input
        started = time.monotonic()
        try:
            stdout, stderr, code, timed_out = self._exec(
                ["sh", "-c", script, "sh", *argv], data, timeout
            )
        except CommandTimeout:  # not even upgraded: nothing started, nothing to kill
            assert timeout is not None
            self._remember(argv, None)
            raise CommandTimeout(argv, timeout, "", "") from None
        text_out, text_err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
        if timed_out or code is None:
            self._kill_tree(marker)
            self._remember(argv, None)
            if timed_out:
                assert timeout is not None
                raise CommandTimeout(argv, timeout, text_out, text_err)
            raise ExitStatusLost(argv, f"{self.namespace}/{self.pod}", text_out, text_err)
        with contextlib.suppress(Exception):
            self._exec(["rm", "-f", marker], None, 10)
        self._remember(argv, code)
        return ExecResult(tuple(argv), code, text_out, text_err, time.monotonic() - started)

    def _kill_tree(self, marker: str) -> None:
        script = (
            "kill_tree() { for child in $(cat /proc/$1/task/*/children 2>/dev/null); do "
            "kill_tree $child; done; kill -9 $1 2>/dev/null; }; "
            f"[ -f {marker} ] && kill_tree $(cat {marker}); rm -f {marker}"
        )
        with contextlib.suppress(Exception):
            self._exec(["sh", "-c", script], None, 30)

    def write_file(self, rel: str, data: str | bytes) -> None:
        target = workspace_relative(rel, self.id)
        payload = data.encode() if isinstance(data, str) else data
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(str(target))
            info.size, info.mode, info.mtime = len(payload), 0o644, int(time.time())
            archive.addfile(info, io.BytesIO(payload))
        _, err, code, _ = self._exec(["tar", "xf", "-", "-C", WORKSPACE], buffer.getvalue(), 60)
        if code != 0:
            raise IsolationError(
                f"writing {rel} into pod {self.namespace}/{self.pod} failed: "
                f"{err.decode('utf-8', 'replace').strip()}"
            )

    def read_file(self, rel: str) -> bytes:
        target = workspace_relative(rel, self.id)
        out, err, code, _ = self._exec(["tar", "cf", "-", "-C", WORKSPACE, str(target)], None, 60)
        if code != 0:
            raise FileNotFoundError(
                f"{target} in pod {self.namespace}/{self.pod}: "
                f"{err.decode('utf-8', 'replace').strip()}"
            )
        with tarfile.open(fileobj=io.BytesIO(out)) as archive:
            member = archive.extractfile(str(target))
            if member is None:
                raise IsADirectoryError(f"{target} in pod {self.namespace}/{self.pod}")
            return member.read()

    def logs(self) -> str:
        """The pod's own output (its main process)."""
        core = self.cluster.core()
        return str(self.cluster.call(core.read_namespaced_pod_log, self.pod, self.namespace))

    def usage(self) -> Usage:
        """Set-up time and commands, with memory and CPU from metrics-server where it answers."""
        usage = super().usage()
        from kubernetes import client

        with contextlib.suppress(Exception):
            metrics = self.cluster.call(
                client.CustomObjectsApi(self.cluster.api).get_namespaced_custom_object,
                "metrics.k8s.io",
                "v1beta1",
                self.namespace,
                "pods",
                self.pod,
            )
            containers = metrics.get("containers") or []
            usage.extra["memory"] = sum(_quantity(c["usage"]["memory"]) for c in containers)
            usage.extra["cpu"] = sum(_quantity(c["usage"]["cpu"]) for c in containers)
        return usage

    def validate(self) -> list[str]:
        core = self.cluster.core()
        try:
            pod = self.cluster.call(core.read_namespaced_pod, self.pod, self.namespace)
        except Exception as exc:
            return [f"pod {self.namespace}/{self.pod}: {exc}"]
        phase = pod.status.phase if pod.status else None
        return [] if phase == "Running" else [f"pod {self.namespace}/{self.pod} is {phase}"]

    def report_sections(self) -> list[tuple[str, str]]:
        sections = super().report_sections()
        if self.network_policy.startswith("not"):
            sections.append(
                (f"network of {self.label}", f"the deny-all NetworkPolicy is {self.network_policy}")
            )
        return sections


class KubernetesEngine(Engine):
    """A namespace with one pod per environment."""

    name = "kubernetes"
    description = "a namespace with a pod in a cluster, through the kubernetes client"
    options = KUBERNETES_OPTIONS
    supported_limits = frozenset({"memory", "cpus", "timeout", "network"})

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._clusters: dict[tuple[str | None, str | None], _Cluster] = {}
        self._checked: dict[tuple[str | None, str | None], Availability] = {}
        self._lock = threading.Lock()

    def cluster(self, kubeconfig: str | None, context: str | None, qps: float = 20.0) -> _Cluster:
        with self._lock:
            key = (kubeconfig, context)
            if key not in self._clusters:
                self._clusters[key] = connect(kubeconfig, context, qps)
            cluster = self._clusters[key]
            cluster.throttle.qps = min(cluster.throttle.qps, qps)
            return cluster

    def configured(self) -> KubeOptions:
        """The run's defaults for this engine (``--isolation-kube-context``,
        ``--isolation-option kubernetes.X=...``, ini, environment): which cluster to check."""
        try:
            spec = resolve_spec(
                type(self),
                {},
                where="the run's settings",
                base_dir=Path.cwd(),
                settings=self.context.settings,
                complete=False,
            )
        except InvalidSpec:
            return KubeOptions()  # reported where the settings are used
        return KubeOptions.of(spec)

    def availability(self) -> Availability:
        try:
            import kubernetes  # noqa: F401
            import websocket  # noqa: F401
        except ImportError:
            return Availability(
                False, reason="the kubernetes client is not installed", fix=_INSTALL_FIX
            )
        options = self.configured()
        return self._check(options.kubeconfig, options.context, options.qps)

    def _check(
        self, kubeconfig: str | None, context: str | None, qps: float = 20.0
    ) -> Availability:
        """Whether the cluster of (kubeconfig, context) answers and grants every right the
        engine cannot do without (asked once per cluster)."""
        key = (kubeconfig, context)
        if key not in self._checked:
            try:
                cluster = self.cluster(kubeconfig, context, qps)
            except EnvironmentCreationError as exc:
                self._checked[key] = Availability(
                    False,
                    reason=str(exc).removeprefix("kubernetes: "),
                    fix="set KUBECONFIG or --isolation-kube-context, or run in a cluster",
                )
            else:
                self._checked[key] = check_cluster(cluster)
        return self._checked[key]

    def doctor(self) -> list[str]:
        """Each right the engine uses, granted or not (for the configured context), and
        whether a deny-all NetworkPolicy is enforced there (probed with ``image``)."""
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            return []
        options = self.configured()
        try:
            cluster = self.cluster(options.kubeconfig, options.context)
            rights = check_rights(cluster)
        except Exception as exc:
            return [f"rights: not checked: {exc}"]
        lines = [
            f"{'ok' if allowed else '--'} {verb} {_resource_name(resource, sub, group)}"
            + ("" if allowed or needed is True else f" (optional: without it {needed})")
            for (verb, resource, sub, group, needed), allowed in rights
        ]
        if not check_cluster(cluster):
            return lines
        if not options.image:
            lines.append(
                "NetworkPolicy: not probed (set an image to probe: "
                "--isolation-option kubernetes.image=IMAGE, or PYTEST_ISOLATION_OPTIONS)"
            )
            return lines
        resources = self.context.engine_resources(self.name, self.release)
        try:
            spec = resolve_spec(
                type(self),
                {"network": False},
                where="pytest-isolation doctor",
                base_dir=Path.cwd(),
                settings=self.context.settings,
            )
            env = self.create(spec, f"doctor{secrets.token_hex(4)}", resources)
            lines.append(f"NetworkPolicy: {env.network_policy}")
        except Exception as exc:
            lines.append(f"NetworkPolicy: not probed: {exc}")
        finally:
            resources.release_all()
        return lines

    @classmethod
    def validate_spec(cls, spec: EnvSpec) -> None:
        options = KubeOptions.of(spec)
        if not options.image and not _template_image(options.pod_template):
            raise InvalidSpec(
                "the kubernetes engine needs image= (or a pod_template with one)", option="image"
            )

    def create(self, spec: EnvSpec, env_id: str, resources: Resources) -> KubernetesEnvironment:
        from kubernetes.client.exceptions import ApiException

        options = KubeOptions.of(spec)
        availability = self._check(options.kubeconfig, options.context, options.qps)
        if not availability:  # a cluster other than the run's, named by the marker
            raise EngineUnavailable(self.name, availability.reason, availability.fix)
        cluster = self.cluster(options.kubeconfig, options.context, options.qps)
        core = cluster.core()
        selector = f"{LABEL}/env={env_id}"
        record = resources.add(
            "namespace",
            selector,
            kubeconfig=options.kubeconfig,
            context=options.context,
            wait=options.wait_deleted,
        )
        try:
            namespace = cluster.call(
                core.create_namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "generateName": PREFIX,
                        "labels": {**self._labels(env_id), **_pod_security(options)},
                        "annotations": self._annotations(spec),
                    },
                },
            ).metadata.name
            resources.update(record, name=namespace)
            self._limit(cluster, namespace, spec)
            if spec.limits.network is not True:
                self._deny_network(cluster, namespace)
            pod = self._pod(options, spec)
            cluster.call(core.create_namespaced_pod, namespace, pod)
        except ApiException as exc:
            raise EnvironmentCreationError(self.name, _api_error(exc, cluster)) from exc
        try:
            self._wait_ready(cluster, namespace, pod["metadata"]["name"], options.start_timeout)
        except ApiException as exc:  # watching the pod was refused
            raise EnvironmentCreationError(self.name, _api_error(exc, cluster)) from exc
        env = KubernetesEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            cluster=cluster,
            namespace=namespace,
            pod=pod["metadata"]["name"],
        )
        if spec.limits.network is not True:
            env.network_policy = _probe_policy(env)
        return env

    def _labels(self, env_id: str) -> dict[str, str]:
        owner = self.context.owner
        return {
            SESSION_LABEL: owner.session,
            f"{LABEL}/pid": str(owner.pid),
            f"{LABEL}/started": f"{owner.started:.2f}",
            f"{LABEL}/host": _label_value(owner.host),
            PIDNS_LABEL: pid_namespace(),
            f"{LABEL}/env": env_id,
        }

    def _annotations(self, spec: EnvSpec) -> dict[str, str]:
        created = datetime.now(timezone.utc)
        notes = {f"{LABEL}/created": created.isoformat(timespec="seconds")}
        if spec.keep_ttl:
            notes[f"{LABEL}/ttl"] = f"{int(spec.keep_ttl)}s"
        return notes

    def _limit(self, cluster: _Cluster, namespace: str, spec: EnvSpec) -> None:
        limits: dict[str, str] = {}
        if spec.limits.memory:
            limits["memory"] = str(spec.limits.memory)
        if spec.limits.cpus:
            limits["cpu"] = f"{int(spec.limits.cpus * 1000)}m"
        if not limits:
            return
        core = cluster.core()
        cluster.call(
            core.create_namespaced_resource_quota,
            namespace,
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "pytest-isolation"},
                "spec": {"hard": {f"limits.{k}": v for k, v in limits.items()}},
            },
        )
        cluster.call(
            core.create_namespaced_limit_range,
            namespace,
            {
                "apiVersion": "v1",
                "kind": "LimitRange",
                "metadata": {"name": "pytest-isolation"},
                "spec": {
                    "limits": [{"type": "Container", "default": limits, "defaultRequest": limits}]
                },
            },
        )

    def _deny_network(self, cluster: _Cluster, namespace: str) -> None:
        from kubernetes import client

        networking = client.NetworkingV1Api(cluster.api)
        cluster.call(
            networking.create_namespaced_network_policy,
            namespace,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "pytest-isolation-deny-all"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
            },
        )

    def _pod(self, options: KubeOptions, spec: EnvSpec) -> dict[str, Any]:
        # what Pod Security "restricted" asks of every container
        security: dict[str, Any] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        if isinstance(options.run_as_user, int):
            security["runAsUser"] = options.run_as_user
        resources: dict[str, Any] = {}
        if spec.limits.memory or spec.limits.cpus:
            limits = {}
            if spec.limits.memory:
                limits["memory"] = str(spec.limits.memory)
            if spec.limits.cpus:
                limits["cpu"] = f"{int(spec.limits.cpus * 1000)}m"
            resources = {"limits": limits, "requests": limits}
        variables = {"HOME": HOME, "TMPDIR": TMPDIR, **spec.env}
        container = {
            "name": "env",
            "image": options.image,
            "command": list(options.command),
            "workingDir": WORKSPACE,
            "env": [{"name": k, "value": v} for k, v in variables.items()],
            "securityContext": security,
            "resources": resources,
            "volumeMounts": [
                {"name": "workspace", "mountPath": WORKSPACE},
                {"name": "home", "mountPath": HOME},
                {"name": "tmp", "mountPath": TMPDIR},
            ],
        }
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "env", "labels": {f"{LABEL}/env": "pod"}},
            "spec": {
                "containers": [container],
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 1,
                "volumes": [
                    {"name": "workspace", "emptyDir": {}},
                    {"name": "home", "emptyDir": {}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        }
        return merge(pod, dict(options.pod_template or {}))

    def _wait_ready(self, cluster: _Cluster, namespace: str, pod: str, timeout: float) -> None:
        """Watch the pod until it is ready; fail at once where it cannot become ready."""
        core = cluster.core()
        deadline = time.monotonic() + timeout
        state: Any = None
        for state in _watch(cluster, core.list_namespaced_pod, pod, deadline, namespace):
            verdict = _pod_verdict(state)
            if verdict == "ready":
                return
            if verdict:
                raise EnvironmentCreationError(
                    self.name,
                    f"pod {namespace}/{pod} {verdict}",
                    output=_diagnose(cluster, namespace, pod, state),
                )
        if state is None:
            with contextlib.suppress(Exception):
                state = cluster.call(core.read_namespaced_pod, pod, namespace)
        phase = state.status.phase if state is not None and state.status else None
        raise EnvironmentCreationError(
            self.name,
            f"pod {namespace}/{pod} is not ready after {timeout:g}s (phase {phase})",
            output=_diagnose(cluster, namespace, pod, state) if state is not None else "",
        )

    # --- teardown and sweeps ---

    def release(self, record: ResourceRecord) -> None:
        if record.kind != "namespace":
            super().release(record)
            return
        from kubernetes.client.exceptions import ApiException

        cluster = self.cluster(record.data.get("kubeconfig"), record.data.get("context"))
        core = cluster.core()
        names = [record.data["name"]] if record.data.get("name") else []
        if not names:  # made, perhaps, but its name never reached the ledger
            try:
                found = cluster.call(core.list_namespace, label_selector=record.identifier)
            except ApiException as exc:
                raise IsolationError(
                    f"cannot find the namespace labelled {record.identifier} to delete it: "
                    f"{_api_error(exc, cluster)}"
                ) from exc
            names = [namespace.metadata.name for namespace in found.items]
        for name in names:
            try:
                cluster.call(core.delete_namespace, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise IsolationError(
                        f"deleting namespace {name}: {_api_error(exc, cluster)}"
                    ) from exc
            wait = record.data.get("wait")
            if wait:
                _wait_gone(cluster, name, WAIT_DELETED if wait is True else float(wait))

    def sweep_labelled(
        self, *, recorded: set[str], select: Callable[[Mapping[str, str]], bool]
    ) -> list[str]:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            return []
        options = self.configured()
        keys = {(None, None), (options.kubeconfig, options.context), *self._clusters}
        removed: list[str] = []
        servers: set[str] = set()
        for kubeconfig, context in sorted(keys, key=lambda key: tuple(k or "" for k in key)):
            try:
                cluster = self.cluster(kubeconfig, context)
            except Exception:
                continue
            if cluster.server in servers:
                continue
            servers.add(cluster.server)
            removed += self._sweep(cluster, recorded, select)
        return removed

    def _sweep(
        self,
        cluster: _Cluster,
        recorded: set[str],
        select: Callable[[Mapping[str, str]], bool],
    ) -> list[str]:
        core = cluster.core()
        try:
            found = cluster.call(
                core.list_namespace, label_selector=SESSION_LABEL, _request_timeout=5
            )
        except Exception:
            return []  # no cluster to ask, or no right to list
        removed = []
        here = pid_namespace()
        for namespace in found.items:
            labels = namespace.metadata.labels or {}
            if f"{LABEL}/env={labels.get(f'{LABEL}/env')}" in recorded:
                continue
            if labels.get(PIDNS_LABEL) != here:
                continue  # made where its owner's pid means nothing to us
            owner = {
                key: labels[f"{LABEL}/{key}"]
                for key in ("session", "pid", "started", "host")
                if f"{LABEL}/{key}" in labels
            }
            if select(owner):
                with contextlib.suppress(Exception):
                    cluster.call(core.delete_namespace, namespace.metadata.name)
                    removed.append(str(namespace.metadata.name))
        return removed

    def close(self) -> None:
        with self._lock:
            for cluster in self._clusters.values():
                with contextlib.suppress(Exception):
                    cluster.api.close()
            self._clusters.clear()


def _resource_name(resource: str, sub: str, group: str) -> str:
    name = f"{resource}/{sub}" if sub else resource
    return f"{name}.{group}" if group else name


def _pod_security(options: KubeOptions) -> dict[str, str]:
    if options.pod_security == "none":
        return {}
    return {
        "pod-security.kubernetes.io/enforce": options.pod_security,
        "pod-security.kubernetes.io/enforce-version": "latest",
    }


def check_rights(cluster: _Cluster) -> list[tuple[tuple[str, str, str, str, bool | str], bool]]:
    """Each right in :data:`RIGHTS` and whether the API server grants it to this user, in
    every namespace (a SelfSubjectAccessReview each)."""
    from kubernetes import client

    authorization = client.AuthorizationV1Api(cluster.api)
    answers = []
    for right in RIGHTS:
        verb, resource, sub, group, _ = right
        attributes = {"verb": verb, "resource": resource, "group": group}
        if sub:
            attributes["subresource"] = sub
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        answer = cluster.call(authorization.create_self_subject_access_review, review)
        answers.append((right, bool(answer.status.allowed)))
    return answers


def check_cluster(cluster: _Cluster) -> Availability:
    """Reachable, and does this user have every right the engine needs? The answer with the
    fix when not."""
    from kubernetes import client

    where = f"{cluster.server} (context {cluster.context or 'current'})"
    try:
        version = cluster.call(client.VersionApi(cluster.api).get_code, _request_timeout=5)
    except Exception as exc:
        if getattr(exc, "status", None) in (401, 403):
            return Availability(
                False,
                reason=_api_error(exc, cluster),
                fix="log in again or refresh the kubeconfig's credentials",
            )
        reason = getattr(exc, "reason", None) or str(exc).splitlines()[0][:200]
        return Availability(
            False,
            reason=f"API server not reachable at {where}: {reason}",
            fix="start the cluster, or point KUBECONFIG / "
            "--isolation-kube-context at one that runs",
        )
    try:
        rights = check_rights(cluster)
    except Exception as exc:
        return Availability(
            False,
            reason=f"asking {where} for permissions failed: {_api_error(exc, cluster)}",
            fix="check the credentials",
        )
    minor = int(re.sub(r"\D.*", "", str(version.minor)) or 0)
    missing = [
        f"{verb} {_resource_name(resource, sub, group)}"
        for (verb, resource, sub, group, needed), allowed in rights
        if not allowed and (needed is True or (sub == "exec" and minor >= 35))
    ]
    if missing:
        return Availability(
            False,
            reason=f"this user may not {', '.join(missing)} in {where}",
            fix="grant them (docs/engines.md has a ClusterRole with every rule the engine "
            "uses) or use a context that has them",
        )
    lacking = [
        f"{verb} {_resource_name(resource, sub, group)}"
        for (verb, resource, sub, group, _), allowed in rights
        if not allowed
    ]
    detail = f"{where}, Kubernetes {version.git_version}, has the rights it needs"
    if lacking:
        detail += f" (not: {', '.join(lacking)})"
    return Availability(True, detail=detail)


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings deeply, containers by name,
    other lists and values replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            merged[key] = merge(current, value)
        elif (
            key in ("containers", "initContainers")
            and isinstance(current, list)
            and isinstance(value, list)
        ):
            by_name = {c.get("name"): c for c in current}
            for item in value:
                name = item.get("name", current[0].get("name") if current else None)
                by_name[name] = merge(by_name.get(name, {}), item)
            merged[key] = list(by_name.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _exit_status(raw: bytes | str) -> tuple[int | None, str]:
    """The command's exit status from the status message on channel 3, and what went wrong
    when the command did not run at all (the kubelet then sends no exit code).  No message,
    or one that cannot be read, is no status (None)."""
    try:
        status = json.loads(raw)
    except ValueError:
        return None, f"pytest-isolation: unreadable exec status: {raw!r}\n"
    if not isinstance(status, dict) or not status:
        return None, f"pytest-isolation: unreadable exec status: {raw!r}\n"
    if status.get("status") == "Success":
        return 0, ""
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return int(cause.get("message")), ""
    return 126, f"pytest-isolation: the command could not run: {status.get('message', status)}\n"


def _template_image(template: Mapping[str, Any] | None) -> str | None:
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        return cast("str", template["spec"]["containers"][0]["image"])  # type: ignore[index]
    return None


def _diagnose(cluster: _Cluster, namespace: str, pod: str, state: Any) -> str:
    """The pod's container states and events: why it is not running."""
    lines = []
    for status in (state.status.container_statuses or []) if state.status else []:
        waiting = status.state.waiting if status.state else None
        if waiting is not None:
            lines.append(f"container {status.name}: {waiting.reason}: {waiting.message or ''}")
    for condition in (state.status.conditions or []) if state.status else []:
        if condition.status != "True":
            lines.append(
                f"condition {condition.type}: {condition.reason}: {condition.message or ''}"
            )
    with contextlib.suppress(Exception):
        events = cluster.call(
            cluster.core().list_namespaced_event,
            namespace,
            field_selector=f"involvedObject.name={pod}",
        )
        for event in events.items:
            lines.append(f"event {event.type} {event.reason}: {event.message}")
    return "\n".join(lines)


def _api_error(exc: BaseException, cluster: _Cluster) -> str:
    """What an API error means, with the fix."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    message = ""
    with contextlib.suppress(Exception):
        message = json.loads(body or "{}").get("message", "")
    message = message or getattr(exc, "reason", None) or str(exc)
    if status == 401:
        return (
            f"the API server at {cluster.server} refused the credentials ({message}); "
            "log in again or refresh the kubeconfig"
        )
    if status == 403:
        return f"forbidden: {message}; check the user's RBAC permissions and the quotas"
    return f"{status}: {message}" if status else str(message)


def _watch(
    cluster: _Cluster,
    lister: Callable[..., Any],
    name: str,
    deadline: float,
    *args: Any,
) -> Iterator[Any]:
    """The object ``name`` each time it changes (first as it is), by a watch (list + watch
    of one name) renewed until ``deadline``; ends when the deadline passes or the object is
    deleted."""
    from kubernetes import watch

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        new_watch: Any = watch.Watch  # untyped in the client
        watcher = new_watch()
        cluster.throttle()
        try:
            for event in watcher.stream(
                lister,
                *args,
                field_selector=f"metadata.name={name}",
                timeout_seconds=max(1, int(remaining)),
                _request_timeout=remaining + 10,
            ):
                if event["type"] == "DELETED":
                    return
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield event["object"]
                if time.monotonic() >= deadline:
                    return
        except Exception as exc:  # an expired resource version, a broken stream: watch again
            if getattr(exc, "status", None) in (401, 403, 404):
                raise
            time.sleep(0.2)
        finally:
            watcher.stop()


def _pod_verdict(pod: Any) -> str:
    """ "ready", what makes the pod hopeless, or "" (not ready yet)."""
    status = pod.status
    phase = status.phase if status else None
    statuses = (status.container_statuses or []) if status else []
    if phase == "Running" and statuses and all(s.ready for s in statuses):
        return "ready"
    if phase in ("Failed", "Succeeded"):
        return f"ended (phase {phase})"
    for container in statuses:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in _HOPELESS:
            why = f"cannot start: container {container.name}: {waiting.reason}"
            if "runAsNonRoot" in (waiting.message or "") and "root" in (waiting.message or ""):
                why += (
                    " (the image runs as root, which runAsNonRoot forbids: set run_as_user= "
                    "to a non-root uid, or use an image whose USER is a numeric non-root uid)"
                )
            return why
    return ""


def _wait_gone(cluster: _Cluster, name: str, timeout: float) -> None:
    """Wait until namespace ``name`` is gone (watched; polled where watching is forbidden);
    one still Terminating at ``timeout`` is reported with its conditions."""
    from kubernetes.client.exceptions import ApiException

    core = cluster.core()
    deadline = time.monotonic() + timeout
    try:
        for _ in _watch(cluster, core.list_namespace, name, deadline):
            pass
    except ApiException as exc:
        if exc.status != 403:
            raise
        while time.monotonic() < deadline:
            try:
                cluster.call(core.read_namespace, name)
            except ApiException as gone:
                if gone.status == 404:
                    return
                raise
            time.sleep(1.0)
    try:
        namespace = cluster.call(core.read_namespace, name)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    conditions = [
        f"{c.type}={c.status}: {c.reason}: {c.message}"
        for c in (namespace.status.conditions or [] if namespace.status else [])
        if c.status == "True"
    ]
    phase = namespace.status.phase if namespace.status else None
    raise IsolationError(
        f"namespace {name} is still {phase} {timeout:g}s after its deletion"
        + ("; " + "; ".join(conditions) if conditions else "")
        + " (an aggregated API that does not answer blocks the deletion of every namespace: "
        "see `kubectl get apiservices`)"
    )


def pid_namespace() -> str:
    """This machine's boot and this process's PID namespace, as a label value: a runner's
    pid means something only where both are the same."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        return f"{boot}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"


_PROBE = (
    "import os, socket\n"
    "host, port = os.environ.get('KUBERNETES_SERVICE_HOST'), "
    "os.environ.get('KUBERNETES_SERVICE_PORT')\n"
    "if not host or not port:\n    print('noservice')\nelse:\n"
    "    try:\n        socket.create_connection((host, int(port)), 2).close()\n"
    "        print('open')\n"
    "    except OSError:\n        print('closed')\n"
)


def _probe_policy(env: KubernetesEnvironment) -> str:
    """Whether the deny-all NetworkPolicy cuts ``env``'s pod off: it tries to reach the API
    server's Service, which only a policy can forbid.  Once per cluster and run."""
    cluster = env.cluster
    with cluster.probe_lock:
        if cluster.policy_enforced is None:
            try:
                out, err, code, _ = env._exec(["python3", "-c", _PROBE], None, 10)
            except Exception as exc:
                return f"not probed: {exc}"
            answer = out.decode(errors="replace").strip()
            if code != 0 or answer not in ("open", "closed"):
                why = answer or err.decode(errors="replace").strip()[-200:]
                return f"not probed: the probe (python3 in the pod) did not run: {why}"
            cluster.policy_enforced = answer == "closed"
        if cluster.policy_enforced:
            return "enforced"
        return (
            "not enforced: a pod of a namespace that denies all egress reached the API "
            "server's Service; this cluster's network plugin ignores NetworkPolicy, so "
            "network=False does not cut the environment off"
        )


def _label_value(text: str) -> str:
    """A valid label value: 63 characters of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:63]
    return cleaned.strip("._-") or "unknown"


_UNITS = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "m": 0.001,
    "n": 1e-9,
    "u": 1e-6,
}


def _quantity(text: str) -> float:
    for unit, factor in sorted(_UNITS.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)
