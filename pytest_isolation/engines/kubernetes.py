"""The ``kubernetes`` engine: a namespace with one pod per environment, in a real cluster.

Each environment is a namespace made from ``generateName`` (``pytest-iso-``),
labelled ``pytest-isolation/session``, ``/pid``, ``/started``, ``/host`` and
``/env`` and annotated with its creation time and TTL; limits become a
ResourceQuota and a LimitRange; ``network=False`` (the default) a deny-all
NetworkPolicy for ingress and egress.  In it runs one pod (``image``, a
long-lived command) with a restricted security context, waited for until it is
ready.  Commands run through the ``exec`` subresource (a WebSocket speaking the
``v5``/``v4.channel.k8s.io`` protocol); files travel as tar over exec.

The ledger records each namespace, before it exists, by its ``pytest-isolation/env``
label, with the kubeconfig and context it lives in, so it can be deleted without
the runner.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import secrets
import shlex
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
)
from ..execution import ExecResult, Usage
from ..spec import EnvSpec, Option, boolean, parse_duration, path, string, string_list
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
PREFIX = "pytest-iso-"
WORKSPACE = "/workspace"
_INSTALL_FIX = "pip install 'pytest-isolation[kubernetes]'"


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


def _uid(value: object, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ValueError(f"expected a numeric user id, got {value!r}")
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
        "run_as_user": Option("run_as_user", "run as this uid (and refuse root)", _uid),
        "start_timeout": Option(
            "start_timeout",
            "how long to wait for the pod to be ready",
            lambda v, _: parse_duration(v),
            120.0,
        ),
        "wait_deleted": Option(
            "wait_deleted", "wait at teardown until the namespace is gone", boolean, False
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
    run_as_user: int | None = None
    start_timeout: float = 120.0
    wait_deleted: bool = False
    qps: float = 20.0

    @classmethod
    def of(cls, spec: EnvSpec) -> KubeOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.options.items() if k in names})  # type: ignore[arg-type]


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


@dataclass
class _Cluster:
    """A connection to one cluster: the API client, where it came from, and its throttle."""

    api: Any
    kubeconfig: str | None
    context: str | None
    server: str
    throttle: _Throttle

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.throttle()
        kwargs.setdefault("_request_timeout", 30)
        return method(*args, **kwargs)


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
        client.ApiClient(configuration), kubeconfig, context, configuration.host, _Throttle(qps)
    )


class KubernetesEnvironment(RemoteEnvironment):
    """A namespace with one pod; commands run through ``exec``."""

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

    def _exec(
        self, argv: Sequence[str], data: bytes | None, timeout: float | None
    ) -> tuple[bytes, bytes, int | None, bool]:
        """Run ``argv`` in the pod; (stdout, stderr, exit status, timed out).

        With ``data``, the command reads exactly that many bytes (``head -c``): the v4
        channel protocol has no way to close stdin, so the end of input is counted.
        """
        from kubernetes.stream import stream

        if data is not None:
            argv = ["sh", "-c", f'head -c {len(data)} | "$@"', "sh", *argv]
        self.cluster.throttle()
        client = self.cluster.core()
        ws = stream(
            client.connect_get_namespaced_pod_exec,
            self.pod,
            self.namespace,
            command=list(argv),
            stdin=data is not None,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
            binary=True,
        )
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if data:
                ws.write_stdin(data)
            while ws.is_open():
                if deadline is not None and time.monotonic() >= deadline:
                    return bytes(out), bytes(err), None, True
                ws.update(
                    timeout=0.1
                    if deadline is None
                    else max(0.0, min(0.1, deadline - time.monotonic()))
                )
                if ws.peek_stdout():
                    out += ws.read_stdout()
                if ws.peek_stderr():
                    err += ws.read_stderr()
            out += ws.read_stdout() or b""
            err += ws.read_stderr() or b""
            code, problem = _exit_status(ws.read_channel(3))
            if problem:
                err += problem.encode()
            return bytes(out), bytes(err), code, False
        finally:
            ws.close()
            # after the server's close frame the client leaves its socket open: close it
            raw = getattr(getattr(ws, "sock", None), "sock", None)
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.close()

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
        marker = f"/tmp/.pytest-isolation-{secrets.token_hex(6)}"
        # exec has no cwd or environment of its own, and no way to kill what it started:
        # a small shell records the command's pid, moves to the directory, sets the variables
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**self.spec.env, **env}.items())
        script = (
            f"echo $$ > {marker}; cd {shlex.quote(workdir)} || exit 126; "
            f'{"export " + exports + "; " if exports else ""}exec "$@"'
        )
        data = input.encode() if isinstance(input, str) else input
        started = time.monotonic()
        stdout, stderr, code, timed_out = self._exec(
            ["sh", "-c", script, "sh", *argv], data, timeout
        )
        text_out, text_err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
        if timed_out:
            self._kill_tree(marker)
            assert timeout is not None
            raise CommandTimeout(argv, timeout, text_out, text_err)
        with contextlib.suppress(Exception):
            self._exec(["rm", "-f", marker], None, 10)
        self._remember(argv, code)
        return ExecResult(
            tuple(argv),
            -1 if code is None else code,
            text_out,
            text_err,
            time.monotonic() - started,
        )

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


class KubernetesEngine(Engine):
    """A namespace with one pod per environment."""

    name = "kubernetes"
    description = "a namespace with a pod in a cluster, through the kubernetes client"
    options = KUBERNETES_OPTIONS
    supported_limits = frozenset({"memory", "cpus", "timeout", "network"})

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._clusters: dict[tuple[str | None, str | None], _Cluster] = {}
        self._lock = threading.Lock()

    def cluster(self, kubeconfig: str | None, context: str | None, qps: float = 20.0) -> _Cluster:
        with self._lock:
            key = (kubeconfig, context)
            if key not in self._clusters:
                self._clusters[key] = connect(kubeconfig, context, qps)
            cluster = self._clusters[key]
            cluster.throttle.qps = min(cluster.throttle.qps, qps)
            return cluster

    def availability(self) -> Availability:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            return Availability(
                False, reason="the kubernetes client is not installed", fix=_INSTALL_FIX
            )
        try:
            cluster = self.cluster(None, None)
        except EnvironmentCreationError as exc:
            return Availability(
                False,
                reason=str(exc).removeprefix("kubernetes: "),
                fix="set KUBECONFIG or --isolation-kube-context, or run in a cluster",
            )
        return check_cluster(cluster)

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
        cluster = self.cluster(options.kubeconfig, options.context, options.qps)
        core = cluster.core()
        selector = f"{LABEL}/env={env_id}"
        resources.add(
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
                        "labels": self._labels(env_id),
                        "annotations": self._annotations(spec),
                    },
                },
            ).metadata.name
            self._limit(cluster, namespace, spec)
            if spec.limits.network is not True:
                self._deny_network(cluster, namespace)
            pod = self._pod(options, spec)
            cluster.call(core.create_namespaced_pod, namespace, pod)
        except ApiException as exc:
            raise EnvironmentCreationError(self.name, _api_error(exc, cluster)) from exc
        self._wait_ready(cluster, namespace, pod["metadata"]["name"], options.start_timeout)
        return KubernetesEnvironment(
            env_id=env_id,
            spec=spec,
            resources=resources,
            cluster=cluster,
            namespace=namespace,
            pod=pod["metadata"]["name"],
        )

    def _labels(self, env_id: str) -> dict[str, str]:
        owner = self.context.owner
        return {
            SESSION_LABEL: owner.session,
            f"{LABEL}/pid": str(owner.pid),
            f"{LABEL}/started": f"{owner.started:.2f}",
            f"{LABEL}/host": _label_value(owner.host),
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
        security: dict[str, Any] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        if options.run_as_user is not None:
            security.update(runAsUser=options.run_as_user, runAsNonRoot=options.run_as_user != 0)
        resources: dict[str, Any] = {}
        if spec.limits.memory or spec.limits.cpus:
            limits = {}
            if spec.limits.memory:
                limits["memory"] = str(spec.limits.memory)
            if spec.limits.cpus:
                limits["cpu"] = f"{int(spec.limits.cpus * 1000)}m"
            resources = {"limits": limits, "requests": limits}
        container = {
            "name": "env",
            "image": options.image,
            "command": list(options.command),
            "workingDir": WORKSPACE,
            "env": [{"name": k, "value": v} for k, v in spec.env.items()],
            "securityContext": security,
            "resources": resources,
            "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE}],
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
                "volumes": [{"name": "workspace", "emptyDir": {}}],
            },
        }
        return merge(pod, dict(options.pod_template or {}))

    def _wait_ready(self, cluster: _Cluster, namespace: str, pod: str, timeout: float) -> None:
        core = cluster.core()
        deadline = time.monotonic() + timeout
        while True:
            state = cluster.call(core.read_namespaced_pod, pod, namespace)
            phase = state.status.phase if state.status else None
            statuses = (state.status.container_statuses or []) if state.status else []
            if phase == "Running" and statuses and all(s.ready for s in statuses):
                return
            if phase in ("Failed", "Succeeded") or time.monotonic() > deadline:
                why = (
                    "ended"
                    if phase in ("Failed", "Succeeded")
                    else f"is not ready after {timeout:g}s"
                )
                raise EnvironmentCreationError(
                    self.name,
                    f"pod {namespace}/{pod} {why} (phase {phase})",
                    output=_diagnose(cluster, namespace, pod, state),
                )
            time.sleep(0.2)

    # --- teardown and sweeps ---

    def release(self, record: ResourceRecord) -> None:
        if record.kind != "namespace":
            super().release(record)
            return
        from kubernetes.client.exceptions import ApiException

        cluster = self.cluster(record.data.get("kubeconfig"), record.data.get("context"))
        core = cluster.core()
        found = cluster.call(core.list_namespace, label_selector=record.identifier)
        for namespace in found.items:
            name = namespace.metadata.name
            with contextlib.suppress(ApiException):
                cluster.call(core.delete_namespace, name, body={"propagationPolicy": "Foreground"})
            if record.data.get("wait"):
                _wait_gone(cluster, name)

    def sweep_labelled(
        self, *, recorded: set[str], select: Callable[[Mapping[str, str]], bool]
    ) -> list[str]:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            return []
        try:
            cluster = self.cluster(None, None)
            core = cluster.core()
            found = cluster.call(
                core.list_namespace, label_selector=SESSION_LABEL, _request_timeout=5
            )
        except Exception:
            return []  # no cluster to ask
        removed = []
        for namespace in found.items:
            labels = namespace.metadata.labels or {}
            if f"{LABEL}/env={labels.get(f'{LABEL}/env')}" in recorded:
                continue
            owner = {
                key: labels[f"{LABEL}/{key}"]
                for key in ("session", "pid", "started", "host")
                if f"{LABEL}/{key}" in labels
            }
            if select(owner):
                with contextlib.suppress(Exception):
                    cluster.call(
                        core.delete_namespace,
                        namespace.metadata.name,
                        body={"propagationPolicy": "Foreground"},
                    )
                    removed.append(str(namespace.metadata.name))
        return removed

    def close(self) -> None:
        with self._lock:
            for cluster in self._clusters.values():
                with contextlib.suppress(Exception):
                    cluster.api.close()
            self._clusters.clear()


def check_cluster(cluster: _Cluster) -> Availability:
    """Reachable, and may we create namespaces? The answer with the fix when not."""
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
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "create", "resource": "namespaces"}},
    }
    try:
        answer = cluster.call(
            client.AuthorizationV1Api(cluster.api).create_self_subject_access_review, review
        )
    except Exception as exc:
        return Availability(
            False,
            reason=f"asking {where} for permissions failed: {_api_error(exc, cluster)}",
            fix="check the credentials",
        )
    if not answer.status.allowed:
        return Availability(
            False,
            reason=f"this user may not create namespaces in {where}",
            fix="grant create on namespaces (a ClusterRole bound to the user) "
            "or use a context that has it",
        )
    return Availability(
        True, detail=f"{where}, Kubernetes {version.git_version}, may create namespaces"
    )


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
    when the command did not run at all (the kubelet then sends no exit code)."""
    try:
        status = json.loads(raw or "{}")
    except ValueError:
        return None, f"unreadable exec status: {raw!r}"
    if not status or status.get("status") == "Success":
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


def _wait_gone(cluster: _Cluster, name: str, timeout: float = 120.0) -> None:
    from kubernetes.client.exceptions import ApiException

    core = cluster.core()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cluster.call(core.read_namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.2)
    raise IsolationError(f"namespace {name} still exists {timeout:g}s after its deletion")


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
