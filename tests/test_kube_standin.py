"""The Kubernetes API stand-in (tests/kube_standin.py), driven through the OFFICIAL client.

Everything here goes through ``kubernetes.client`` and ``kubernetes.stream`` with the
kubeconfig the stand-in writes, as the ``kubernetes`` engine does; a few checks of the
WebSocket layer use ``websocket-client`` (the library under ``kubernetes.stream``) or a raw
socket on 127.0.0.1.  Pods are real containers of ``TEST_IMAGE``; every test asks
``need_engine("docker")`` first and is checked for containers it leaves.

One thing the engine has to do too: after an exec ends, the server's close frame makes
websocket-client mark itself disconnected without closing its socket, so ``WSClient.close()``
leaves the socket open (a ResourceWarning under ``-W error``); ``finish`` closes it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import socket
import ssl
import struct
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import docker
import pytest
import websocket
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from tests.conftest import TEST_IMAGE, need_engine, wait_for
from tests.kube_standin import STANDIN_LABEL, KubeStandIn

T = TypeVar("T")


class ExecStream(Protocol):
    """What the tests use of ``kubernetes.stream``'s WSClient (an untyped module)."""

    subprotocol: str | None
    sock: Any

    @property
    def returncode(self) -> int | None: ...
    def run_forever(self, timeout: float | None = None) -> None: ...
    def read_stdout(self, timeout: float | None = None) -> Any: ...
    def read_stderr(self, timeout: float | None = None) -> Any: ...
    def read_channel(self, channel: int, timeout: float = 0) -> Any: ...
    def write_stdin(self, data: str | bytes) -> None: ...
    def close_channel(self, channel: int) -> None: ...
    def close(self) -> None: ...


#: The untyped parts of the official client, typed as the tests use them.
load_kube_config: Callable[..., None] = config.load_kube_config
list_kube_config_contexts: Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]] = (
    config.list_kube_config_contexts
)
new_watch: Callable[[], Any] = watch.Watch

#: Seconds to wait for something a pod or a container does.
PATIENCE = 20.0
#: Lists the command lines of a container's processes (the image has no ps).
PROCESSES = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"


# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def raises_api(status: int) -> Iterator[pytest.ExceptionInfo[ApiException]]:
    """``pytest.raises`` for an API error of one status (the client's subclasses per status
    are newer than the oldest client supported)."""
    with pytest.raises(ApiException) as caught:
        yield caught
    assert caught.value.status == status, caught.value


def status_of(error: ApiException) -> dict[str, Any]:
    """The ``metav1.Status`` body of an API error."""
    body = json.loads(error.body or "{}")
    assert body["kind"] == "Status", body
    assert body["apiVersion"] == "v1", body
    assert body["status"] == "Failure", body
    assert body["code"] == error.status, body
    return dict(body)


def new_namespace(core: client.CoreV1Api, labels: dict[str, str] | None = None) -> str:
    made = core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(generate_name="piso-", labels=labels))
    )
    assert made.metadata is not None and made.metadata.name is not None
    return str(made.metadata.name)


def pod_manifest(name: str, *, command: list[str] | None = None, **fields: Any) -> client.V1Pod:
    """A one-container pod of TEST_IMAGE that sleeps unless told otherwise."""
    container = client.V1Container(
        name="main",
        image=fields.pop("image", TEST_IMAGE),
        command=command or ["sleep", "300"],
        **fields.pop("container", {}),
    )
    spec = client.V1PodSpec(
        containers=[container], restart_policy="Never", termination_grace_period_seconds=0, **fields
    )
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name), spec=spec)


def start_pod(core: client.CoreV1Api, namespace: str, name: str, **fields: Any) -> client.V1Pod:
    core.create_namespaced_pod(namespace, pod_manifest(name, **fields))

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        assert pod.status is not None
        return pod if pod.status.phase == "Running" else None

    return wait_for(running, f"pod {namespace}/{name} running")


def open_exec(
    core: client.CoreV1Api,
    namespace: str,
    pod: str,
    command: list[str],
    *,
    binary: bool = False,
    stdin: bool = False,
) -> ExecStream:
    ws: ExecStream = stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        namespace,
        command=command,
        stdin=stdin,
        stdout=True,
        stderr=True,
        tty=False,
        binary=binary,
        _preload_content=False,
    )
    return ws


def finish(ws: ExecStream) -> None:
    """Close an exec's WebSocket, socket included (see the module's docstring)."""
    ws.close()
    if ws.sock is not None:
        ws.sock.shutdown()


def run_exec(
    core: client.CoreV1Api, namespace: str, pod: str, command: list[str]
) -> tuple[str, str, int]:
    ws = open_exec(core, namespace, pod, command)
    try:
        ws.run_forever(timeout=PATIENCE)
        code = ws.returncode
        assert code is not None
        return ws.read_stdout(), ws.read_stderr(), code
    finally:
        finish(ws)


def processes(core: client.CoreV1Api, namespace: str, pod: str) -> str:
    return run_exec(core, namespace, pod, ["sh", "-c", PROCESSES])[0]


def events_of(core: client.CoreV1Api, namespace: str, name: str) -> list[client.CoreV1Event]:
    listed = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return list(listed.items)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[KubeStandIn]:
    """A started stand-in; checks at the end that it left no container and failed nowhere.

    Every container a stand-in makes carries its server id in ``STANDIN_LABEL``, so the check
    is exact also while other runs (or xdist workers) have stand-ins of their own.
    """
    need_engine("docker")
    docker_client = docker.from_env()
    try:
        made = KubeStandIn(tmp_path)
        try:
            yield made
        finally:
            made.stop()
        mine = docker_client.api.containers(
            all=True, filters={"label": f"{STANDIN_LABEL}={made.server_id}"}
        )
        for container in mine:  # so that one leak does not fail the tests after it
            docker_client.api.remove_container(container["Id"], force=True, v=True)
        assert not mine, f"stand-in left containers: {[c['Names'] for c in mine]}"
        assert made.errors == [], "\n".join(made.errors)
    finally:
        docker_client.close()


@pytest.fixture
def api(standin: KubeStandIn) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    load_kube_config(config_file=str(standin.kubeconfig), client_configuration=configuration)
    with client.ApiClient(configuration) as made:
        yield made


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def docker_client() -> Iterator[docker.DockerClient]:
    need_engine("docker")
    made = docker.from_env()
    yield made
    made.close()


# --- kubeconfig, discovery, raw protocol ------------------------------------------------------


def test_kubeconfig_and_discovery(standin: KubeStandIn, api: client.ApiClient) -> None:
    need_engine("docker")
    contexts, current = list_kube_config_contexts(config_file=str(standin.kubeconfig))
    assert current["name"] == "standin"
    assert [c["name"] for c in contexts] == ["standin"]
    assert api.configuration.host == standin.url == f"https://127.0.0.1:{standin.port}"

    version = client.VersionApi(api).get_code()
    assert version.major == "1" and version.git_version.startswith("v1.")
    core_versions = client.CoreApi(api).get_api_versions()
    assert core_versions.versions == ["v1"]
    groups = client.ApisApi(api).get_api_versions()
    assert {"networking.k8s.io", "authorization.k8s.io"} <= {g.name for g in groups.groups}
    resources = client.CoreV1Api(api).get_api_resources()
    names = {r.name for r in resources.resources}
    assert {"namespaces", "pods", "pods/exec", "pods/log", "events", "resourcequotas"} <= names
    assert ("GET", "/version/") in standin.request_log  # the client adds the slash
    assert len(standin.request_times) == len(standin.request_log)


def tls_context(standin: KubeStandIn) -> ssl.SSLContext:
    """A client TLS context that trusts the stand-in's CA."""
    return ssl.create_default_context(cafile=str(standin.ca_file))


def raw_request(
    standin: KubeStandIn, method: str, path: str, *, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", standin.port, timeout=PATIENCE, context=tls_context(standin)
    )
    try:
        headers = {"Authorization": f"Bearer {token or standin.token}"}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_unknown_paths_unsupported_methods_and_bad_tokens_get_status_bodies(
    standin: KubeStandIn,
) -> None:
    need_engine("docker")
    code, body = raw_request(standin, "GET", "/api/v1/widgets")
    assert (code, body["kind"], body["reason"], body["code"]) == (404, "Status", "NotFound", 404)
    code, body = raw_request(standin, "GET", "/no/such/path")
    assert (code, body["reason"]) == (404, "NotFound")
    code, body = raw_request(standin, "PATCH", "/api/v1/namespaces/default")
    assert (code, body["reason"]) == (405, "MethodNotAllowed")
    code, body = raw_request(standin, "GET", "/api/v1/namespaces", token="wrong")
    assert (code, body["reason"], body["message"]) == (401, "Unauthorized", "Unauthorized")
    code, body = raw_request(
        standin, "GET", "/api/v1/namespaces/default/pods/nope/exec?command=ls&stdout=true"
    )
    assert (code, body["reason"]) == (404, "NotFound")


def test_an_invalid_token_gets_401(standin: KubeStandIn, core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    standin.token_valid = False
    with raises_api(401) as caught:
        core.list_namespace()
    assert status_of(caught.value)["reason"] == "Unauthorized"
    with pytest.raises(ApiException) as refused:
        open_exec(core, namespace, "box", ["true"])
    assert "401" in str(refused.value.reason)
    standin.token_valid = True
    assert namespace in {n.metadata.name for n in core.list_namespace().items if n.metadata}


# --- namespaces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("team=a", {"first"}),
        ("team==a", {"first"}),
        ("team in (a,b)", {"first", "second"}),
        ("team in (a, b),tier", {"first"}),
        ("tier", {"first"}),
        ("!tier,team", {"second"}),
        ("team notin (a)", {"second"}),
        ("team,team!=a", {"second"}),
    ],
)
def test_namespaces_are_listed_by_label_selector(
    core: client.CoreV1Api, selector: str, expected: set[str]
) -> None:
    need_engine("docker")
    made = {
        "first": new_namespace(core, {"team": "a", "tier": "x"}),
        "second": new_namespace(core, {"team": "b"}),
    }
    listed = core.list_namespace(label_selector=selector)
    names = {n.metadata.name for n in listed.items if n.metadata}
    assert {key for key, name in made.items() if name in names} == expected


def test_namespace_lifecycle(standin: KubeStandIn, core: client.CoreV1Api) -> None:
    need_engine("docker")
    name = new_namespace(core, {"pytest-isolation.test": "yes"})
    assert re.fullmatch(r"piso-[a-z0-9]{5}", name)
    read = core.read_namespace(name)
    assert read.status is not None and read.status.phase == "Active"
    assert read.metadata is not None and read.metadata.labels is not None
    assert read.metadata.labels["pytest-isolation.test"] == "yes"
    assert read.metadata.uid and read.metadata.creation_timestamp and read.metadata.resource_version

    with raises_api(409) as clash:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    body = status_of(clash.value)
    assert (body["reason"], body["details"]["name"]) == ("AlreadyExists", name)
    with pytest.raises(ApiException) as invalid:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="Not_Valid")))
    assert invalid.value.status == 422 and status_of(invalid.value)["reason"] == "Invalid"

    start_pod(core, name, "box")
    assert len(standin.container_ids()) == 1
    core.delete_namespace(name, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    terminating = core.read_namespace(name)
    assert terminating.status is not None and terminating.status.phase == "Terminating"
    assert terminating.metadata is not None and terminating.metadata.deletion_timestamp
    with raises_api(403) as refused:
        core.create_namespaced_pod(name, pod_manifest("late"))
    assert "being terminated" in status_of(refused.value)["message"]

    def gone() -> dict[str, Any] | None:
        try:
            core.read_namespace(name)
        except ApiException as error:
            if error.status != 404:
                raise
            return status_of(error)
        return None

    body = wait_for(gone, "the namespace to disappear")
    assert (body["reason"], body["details"]) == ("NotFound", {"name": name, "kind": "namespaces"})
    assert standin.container_ids() == []
    assert name not in standin.namespaces
    assert ("DELETE", f"/api/v1/namespaces/{name}") in standin.request_log


def test_creating_namespaces_can_be_forbidden(standin: KubeStandIn, api: client.ApiClient) -> None:
    need_engine("docker")
    core = client.CoreV1Api(api)
    authorization = client.AuthorizationV1Api(api)

    def review(verb: str, resource: str, subresource: str | None = None) -> bool:
        attributes = client.V1ResourceAttributes(
            verb=verb, resource=resource, subresource=subresource, namespace="default"
        )
        body = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
        made = authorization.create_self_subject_access_review(body)
        assert made.status is not None
        return bool(made.status.allowed)

    assert review("create", "namespaces")
    standin.allow = {("create", "namespaces"): False}
    assert not review("create", "namespaces")
    assert review("delete", "namespaces")
    with raises_api(403) as caught:
        new_namespace(core)
    body = status_of(caught.value)
    assert body["reason"] == "Forbidden"
    assert 'cannot create resource "namespaces"' in body["message"]

    standin.allow = lambda verb, resource: resource != "pods/exec"
    assert review("create", "namespaces")
    assert not review("create", "pods", "exec")
    assert standin.access_reviews[-1]["resourceAttributes"]["subresource"] == "exec"
    new_namespace(core)


# --- pods -------------------------------------------------------------------------------------


def test_a_pod_runs_as_a_docker_container(
    standin: KubeStandIn, core: client.CoreV1Api, docker_client: docker.DockerClient
) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    security = client.V1SecurityContext(
        run_as_user=1000,
        run_as_group=1000,
        allow_privilege_escalation=False,
        capabilities=client.V1Capabilities(drop=["ALL"], add=["CHOWN"]),
        read_only_root_filesystem=True,
    )
    env = [
        client.V1EnvVar(name="GREETING", value="hi"),
        client.V1EnvVar(name="REF", value="$(GREETING)-there"),
    ]
    created = core.create_namespaced_pod(
        namespace,
        pod_manifest(
            "box",
            command=["sh", "-c"],
            container={
                "args": ["echo started as `id -u` in `pwd` with $GREETING $REF; exec sleep 300"],
                "working_dir": "/tmp",
                "env": env,
                "security_context": security,
            },
        ),
    )
    assert created.status is not None and created.status.phase == "Pending"

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("box", namespace)
        return pod if pod.status is not None and pod.status.phase == "Running" else None

    pod = wait_for(running, "the pod to run")
    assert pod.status is not None and pod.status.container_statuses is not None
    status = pod.status.container_statuses[0]
    assert status.ready and status.state is not None and status.state.running is not None
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    assert conditions["Ready"] == conditions["PodScheduled"] == "True"
    assert pod.spec is not None and pod.spec.node_name

    container_id = standin.container_of(namespace, "box")
    assert container_id and status.container_id == f"docker://{container_id}"
    attrs = docker_client.api.inspect_container(container_id)
    assert attrs["Config"]["Labels"][STANDIN_LABEL] == standin.server_id
    assert "pytest-isolation.session" not in attrs["Config"]["Labels"]
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "host"  # no NetworkPolicy: the pod network, here the host's
    assert attrs["Config"]["User"] == "1000:1000"
    assert attrs["Config"]["WorkingDir"] == "/tmp"
    assert "no-new-privileges" in host["SecurityOpt"]
    assert (host["CapDrop"], host["CapAdd"], host["ReadonlyRootfs"]) == (["ALL"], ["CHOWN"], True)

    def logged() -> str | None:
        text = core.read_namespaced_pod_log("box", namespace)
        return text if text else None

    assert wait_for(logged, "the pod's log") == "started as 1000 in /tmp with hi hi-there\n"
    reasons = [e.reason for e in events_of(core, namespace, "box")]
    assert reasons == ["Scheduled", "Pulled", "Created", "Started"]  # listed by name: by time

    core.delete_namespaced_pod(
        "box", namespace, body=client.V1DeleteOptions(grace_period_seconds=0)
    )
    with raises_api(404):
        core.read_namespaced_pod("box", namespace)
    wait_for(lambda: not standin.container_ids(), "the container's removal")


def test_pods_are_watched_to_running(core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    listed = core.list_namespaced_pod(namespace)
    assert listed.metadata is not None and listed.items == []
    core.create_namespaced_pod(namespace, pod_manifest("box"))
    watcher = new_watch()
    phases = []
    for event in watcher.stream(
        core.list_namespaced_pod,
        namespace,
        field_selector="metadata.name=box",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=20,
    ):
        pod = event["object"]
        assert isinstance(pod, client.V1Pod) and pod.status is not None
        phases.append((event["type"], pod.status.phase))
        if pod.status.phase == "Running":
            watcher.stop()
    assert phases[0] == ("ADDED", "Pending")
    assert phases[-1] == ("MODIFIED", "Running")


def test_a_missing_image_leaves_the_pod_pending_with_events(
    standin: KubeStandIn, core: client.CoreV1Api
) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    image = "piso-standin-absent-image:never"
    core.create_namespaced_pod(namespace, pod_manifest("nopull", image=image))

    def waiting_reason() -> str | None:
        pod = core.read_namespaced_pod("nopull", namespace)
        assert pod.status is not None
        statuses = pod.status.container_statuses or []
        if not statuses or statuses[0].state is None or statuses[0].state.waiting is None:
            return None
        assert pod.status.phase == "Pending"
        return str(statuses[0].state.waiting.reason)

    assert wait_for(waiting_reason, "the pull failure") in {"ErrImagePull", "ImagePullBackOff"}
    failed = [e for e in events_of(core, namespace, "nopull") if e.reason == "Failed"]
    assert any(image in (e.message or "") and e.type == "Warning" for e in failed)
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod_log("nopull", namespace)
    assert caught.value.status == 400 and "waiting to start" in status_of(caught.value)["message"]
    assert wait_for(lambda: waiting_reason() == "ImagePullBackOff", "the back-off")
    assert standin.container_of(namespace, "nopull") is None


def test_an_unschedulable_pod_stays_pending(standin: KubeStandIn, core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    core.create_namespaced_pod(
        namespace, pod_manifest("stuck", node_selector={"standin/unschedulable": "yes"})
    )

    def unscheduled() -> client.V1PodCondition | None:
        pod = core.read_namespaced_pod("stuck", namespace)
        assert pod.status is not None and pod.status.phase == "Pending"
        found = [c for c in pod.status.conditions or [] if c.type == "PodScheduled"]
        return found[0] if found else None

    condition = wait_for(unscheduled, "the scheduling verdict")
    assert (condition.status, condition.reason) == ("False", "Unschedulable")
    events = events_of(core, namespace, "stuck")
    assert [e.reason for e in events] == ["FailedScheduling"]
    assert standin.container_of(namespace, "stuck") is None


def test_quotas_limit_ranges_and_network_policies(
    standin: KubeStandIn, api: client.ApiClient, docker_client: docker.DockerClient
) -> None:
    need_engine("docker")
    core = client.CoreV1Api(api)
    namespace = new_namespace(core)
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="quota"),
        spec=client.V1ResourceQuotaSpec(hard={"limits.memory": "256Mi", "limits.cpu": "1"}),
    )
    core.create_namespaced_resource_quota(namespace, quota)
    greedy = client.V1ResourceRequirements(limits={"memory": "512Mi", "cpu": "500m"})
    with raises_api(403) as caught:
        core.create_namespaced_pod(
            namespace, pod_manifest("greedy", container={"resources": greedy})
        )
    body = status_of(caught.value)
    assert body["reason"] == "Forbidden" and "exceeded quota: quota" in body["message"]
    assert "limits.memory=512Mi" in body["message"]
    with raises_api(403) as unstated:
        core.create_namespaced_pod(namespace, pod_manifest("unstated"))
    assert "must specify limits.cpu,limits.memory" in status_of(unstated.value)["message"]

    limits = client.V1LimitRange(
        metadata=client.V1ObjectMeta(name="defaults"),
        spec=client.V1LimitRangeSpec(
            limits=[
                client.V1LimitRangeItem(
                    type="Container", default={"memory": "128Mi", "cpu": "250m"}
                )
            ]
        ),
    )
    core.create_namespaced_limit_range(namespace, limits)
    pod = start_pod(core, namespace, "modest")
    assert pod.spec is not None and pod.spec.containers[0].resources is not None
    assert pod.spec.containers[0].resources.limits == {"memory": "128Mi", "cpu": "250m"}
    container_id = standin.container_of(namespace, "modest")
    assert container_id is not None
    host = docker_client.api.inspect_container(container_id)["HostConfig"]
    assert (host["Memory"], host["NanoCpus"]) == (128 * 2**20, 250_000_000)
    used = core.read_namespaced_resource_quota("quota", namespace)
    assert used.status is not None and used.status.used == {
        "limits.memory": "128Mi",
        "limits.cpu": "250m",
    }
    listed = core.list_namespaced_limit_range(namespace).items
    assert [item.metadata.name for item in listed if item.metadata] == ["defaults"]

    networking = client.NetworkingV1Api(api)
    policy = client.V1NetworkPolicy(
        metadata=client.V1ObjectMeta(name="deny-all"),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(), policy_types=["Ingress", "Egress"]
        ),
    )
    networking.create_namespaced_network_policy(namespace, policy)
    stored = networking.list_namespaced_network_policy(namespace).items
    assert len(stored) == 1 and stored[0].metadata is not None and stored[0].spec is not None
    assert stored[0].metadata.name == "deny-all" and stored[0].metadata.uid
    assert stored[0].metadata.creation_timestamp and stored[0].metadata.resource_version
    assert stored[0].spec.policy_types == ["Ingress", "Egress"]


# --- exec -------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_exec_separates_stdout_and_stderr_and_reports_the_exit_code(
    core: client.CoreV1Api, binary: bool
) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    script = "printf 'out 1\\n'; printf 'err 1\\n' >&2; printf 'out 2\\n'; exit 3"
    ws = open_exec(core, namespace, "box", ["sh", "-c", script], binary=binary)
    try:
        ws.run_forever(timeout=PATIENCE)
        out, err = ws.read_stdout(), ws.read_stderr()
        assert ws.returncode == 3
    finally:
        finish(ws)
    expected_out, expected_err = "out 1\nout 2\n", "err 1\n"
    if binary:
        assert (out, err) == (expected_out.encode(), expected_err.encode())
    else:
        assert (out, err) == (expected_out, expected_err)
    assert run_exec(core, namespace, "box", ["true"]) == ("", "", 0)


def test_exec_status_on_channel_3_is_the_kubelets(core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    for command, expected in [
        (["true"], {"metadata": {}, "status": "Success"}),
        (
            ["sh", "-c", "exit 7"],
            {
                "metadata": {},
                "status": "Failure",
                "message": "command terminated with non-zero exit code: "
                "error executing command [sh -c exit 7], exit code 7",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "7"}]},
            },
        ),
    ]:
        ws = open_exec(core, namespace, "box", command, binary=True)
        try:
            ws.run_forever(timeout=PATIENCE)
            assert json.loads(ws.read_channel(3)) == expected
        finally:
            finish(ws)
    # A command that cannot start is an InternalError, as with containerd; the client's
    # ``returncode`` cannot turn that into a number.
    ws = open_exec(core, namespace, "box", ["no-such-command"])
    try:
        ws.run_forever(timeout=PATIENCE)
        status = json.loads(ws.read_channel(3))
        assert (status["reason"], status["code"]) == ("InternalError", 500)
        assert "executable file not found" in status["message"]
        assert ws.read_stdout() == ""
    finally:
        finish(ws)


def test_exec_stdin_is_streamed_and_closed_v5(standin: KubeStandIn, core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    blob = os.urandom(300_000)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in [("tree/greeting.txt", b"hello\n"), ("tree/blob.bin", blob)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = archive.getvalue()
    # through websocket-client itself: the official client speaks v5 only from 36.0
    query = "command=tar&command=xf&command=-&command=-C&command=/tmp&stdin=true&stdout=true"
    url = f"wss://127.0.0.1:{standin.port}/api/v1/namespaces/{namespace}/pods/box/exec?{query}"
    sock: Any = websocket.WebSocket(sslopt={"ca_certs": str(standin.ca_file)})
    sock.connect(
        url,
        header=[f"authorization: Bearer {standin.token}"],
        subprotocols=["v5.channel.k8s.io", "v4.channel.k8s.io"],
    )
    channels: dict[int, bytes] = {}
    try:
        assert sock.getsubprotocol() == "v5.channel.k8s.io"
        for start in range(0, len(payload), 100_000):
            sock.send_binary(b"\x00" + payload[start : start + 100_000])
        sock.send_binary(b"\xff\x00")  # v5: stdin is closed
        while True:
            opcode, frame = sock.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            channels[frame.data[0]] = channels.get(frame.data[0], b"") + frame.data[1:]
    finally:
        sock.shutdown()
    assert channels.get(2, b"") == b""
    assert json.loads(channels[3]) == {"metadata": {}, "status": "Success"}
    assert run_exec(core, namespace, "box", ["cat", "/tmp/tree/greeting.txt"]) == ("hello\n", "", 0)
    digest = run_exec(core, namespace, "box", ["sha256sum", "/tmp/tree/blob.bin"])[0]
    assert digest.split()[0] == hashlib.sha256(blob).hexdigest()


def test_exec_closed_early_by_the_client_leaves_the_process_running(
    core: client.CoreV1Api,
) -> None:
    """As a kubelet (kubernetes#89031): whoever wants the process gone must kill it."""
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    ws = open_exec(core, namespace, "box", ["sh", "-c", "sleep 301 & sleep 302; wait"])
    try:
        wait_for(lambda: "sleep 302" in processes(core, namespace, "box"), "the exec to start")
    finally:
        finish(ws)
    for _ in range(5):  # still there a while later
        listing = processes(core, namespace, "box")
        assert "sleep 301" in listing and "sleep 302" in listing


def test_websocket_layer_v4_fragments_ping(standin: KubeStandIn, core: client.CoreV1Api) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    query = "command=head&command=-c&command=10&stdin=true&stdout=true&stderr=true&tty=false"
    url = f"wss://127.0.0.1:{standin.port}/api/v1/namespaces/{namespace}/pods/box/exec?{query}"
    sock: Any = websocket.WebSocket(sslopt={"ca_certs": str(standin.ca_file)})
    sock.connect(
        url,
        header=[
            f"authorization: Bearer {standin.token}",
            "sec-websocket-protocol: v4.channel.k8s.io",
        ],
    )
    try:
        assert sock.getheaders()["sec-websocket-protocol"] == "v4.channel.k8s.io"
        sock.ping(b"are you there")
        sock.send_frame(websocket.ABNF.create_frame(b"\x00abc", websocket.ABNF.OPCODE_BINARY, 0))
        sock.send_frame(websocket.ABNF.create_frame(b"defg", websocket.ABNF.OPCODE_CONT, 0))
        sock.ping(b"between fragments")
        sock.send_frame(websocket.ABNF.create_frame(b"hijk", websocket.ABNF.OPCODE_CONT, 1))
        pongs: list[bytes] = []
        channels: dict[int, bytes] = {}
        while True:
            opcode, frame = sock.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                assert struct.unpack("!H", frame.data[:2])[0] == 1000
                break
            if opcode == websocket.ABNF.OPCODE_PONG:
                pongs.append(frame.data)
                continue
            assert opcode == websocket.ABNF.OPCODE_BINARY
            channels[frame.data[0]] = channels.get(frame.data[0], b"") + frame.data[1:]
    finally:
        sock.shutdown()
    assert pongs == [b"are you there", b"between fragments"]
    assert channels[1] == b"abcdefghij"
    assert json.loads(channels[3]) == {"metadata": {}, "status": "Success"}


def test_an_unmasked_client_frame_closes_with_1002(
    standin: KubeStandIn, core: client.CoreV1Api
) -> None:
    need_engine("docker")
    namespace = new_namespace(core)
    start_pod(core, namespace, "box")
    key = base64.b64encode(os.urandom(16)).decode()
    query = "command=sleep&command=303&stdin=true&stdout=true"
    path = f"/api/v1/namespaces/{namespace}/pods/box/exec?{query}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{standin.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n"
        f"Authorization: Bearer {standin.token}\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", standin.port), timeout=PATIENCE) as plain,
        tls_context(standin).wrap_socket(plain, server_hostname="127.0.0.1") as raw,
    ):
        raw.sendall(request.encode())
        reader = raw.makefile("rb")
        with contextlib.closing(reader):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += reader.read(1)
            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            )
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"Sec-WebSocket-Accept: " + accept in head
            assert reader.read(3) == b"\x82\x01\x01"  # the kubelet's empty "ready" frame, stdout
            wait_for(lambda: "sleep 303" in processes(core, namespace, "box"), "the exec")
            raw.sendall(b"\x82\x02\x00x")  # binary, unmasked: forbidden from a client
            first, length = reader.read(2)
            assert first == 0x88 and struct.unpack("!H", reader.read(length)[:2])[0] == 1002


# --- stop -------------------------------------------------------------------------------------


def test_stop_removes_every_container(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    need_engine("docker")
    standin = KubeStandIn(tmp_path)
    try:
        configuration = client.Configuration()
        load_kube_config(config_file=str(standin.kubeconfig), client_configuration=configuration)
        with client.ApiClient(configuration) as api:
            core = client.CoreV1Api(api)
            namespace = new_namespace(core)
            start_pod(core, namespace, "one")
            start_pod(core, namespace, "two")
            core.create_namespaced_pod(namespace, pod_manifest("three"))
        assert len(standin.container_ids()) >= 2
    finally:
        standin.stop()
    filters = {"label": f"{STANDIN_LABEL}={standin.server_id}"}
    assert docker_client.api.containers(all=True, filters=filters) == []
    assert standin.errors == []
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", standin.port), timeout=5),
    ):
        pass
