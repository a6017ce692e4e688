"""The kubernetes engine against an API server: the stand-in here, a real cluster where one is.

Every scenario that can run on a real cluster runs twice: against the stand-in API
server of tests/kube_standin.py (pods are Docker containers), and — marked
``kubernetes_cluster`` — against the cluster of ``PYTEST_ISOLATION_KUBECONFIG`` (or
``KUBECONFIG``) when it answers, for example a kind cluster on a laptop; without one
those are skipped.  The engine cannot tell the two apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_isolation import (
    CommandTimeout,
    EnvironmentCreationError,
    IsolationManager,
    Ledger,
)
from pytest_isolation.engines.kubernetes import KubernetesEnvironment, check_cluster, connect
from tests.conftest import TEST_IMAGE, build_wheel, cli, need_engine, wait_for
from tests.kube_standin import KubeStandIn

CLUSTER_IMAGE = os.environ.get("PYTEST_ISOLATION_KUBE_IMAGE", "python:3.12-slim")


@dataclass
class Kube:
    """Where the tests send the engine: a kubeconfig, an image it can run, the stand-in."""

    kubeconfig: str
    image: str
    standin: KubeStandIn | None

    def core(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        load: Any = config.load_kube_config  # untyped in the client
        load(config_file=self.kubeconfig, client_configuration=configuration)
        return client.CoreV1Api(client.ApiClient(configuration))


@pytest.fixture(scope="session")
def standin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeStandIn]:
    with KubeStandIn(tmp_path_factory.mktemp("kube-standin")) as server:
        yield server


@pytest.fixture(params=["standin", pytest.param("cluster", marks=pytest.mark.kubernetes_cluster)])
def kube(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Kube:
    if request.param == "standin":
        need_engine("docker")  # the stand-in's pods are containers
        server: KubeStandIn = request.getfixturevalue("standin_server")
        server.allow = {}
        server.token_valid = True
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig))
        return Kube(str(server.kubeconfig), TEST_IMAGE, server)
    kubeconfig = os.environ.get("PYTEST_ISOLATION_KUBECONFIG") or os.environ.get("KUBECONFIG")
    if not kubeconfig:
        pytest.skip("no real cluster: set PYTEST_ISOLATION_KUBECONFIG to run against one")
    availability = check_cluster(connect(kubeconfig, None))
    if not availability:
        pytest.skip(f"no usable real cluster: {availability.reason}")
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    return Kube(kubeconfig, CLUSTER_IMAGE, None)


def gone_or_terminating(kube: Kube, namespace: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        found = kube.core().read_namespace(namespace)
    except ApiException as exc:
        return bool(exc.status == 404)
    return found.status.phase == "Terminating" or found.metadata.deletion_timestamp is not None


def k8s_env(manager: IsolationManager, kube: Kube, **options: Any) -> KubernetesEnvironment:
    env = manager.create("kubernetes", image=kube.image, **options)
    assert isinstance(env, KubernetesEnvironment)
    return env


# --- an environment -----------------------------------------------------------------------------


def test_an_environment_is_a_labelled_namespace_with_a_restricted_ready_pod(
    kube: Kube, isolation_state: Ledger
) -> None:
    """Namespace from generateName with the run's labels, a ready pod with a restricted
    security context, commands with separate streams and exit codes; deleted at teardown."""
    with IsolationManager() as manager:
        env = k8s_env(manager, kube, env={"GREETING": "hello"})
        core = kube.core()
        namespace = core.read_namespace(env.namespace)
        labels = namespace.metadata.labels
        assert env.namespace.startswith("pytest-iso-")
        assert labels["pytest-isolation/session"] == manager.session_id
        assert labels["pytest-isolation/pid"] == str(os.getpid())
        assert labels["pytest-isolation/env"] == env.id
        assert "pytest-isolation/created" in namespace.metadata.annotations
        [record] = isolation_state.records()
        assert (record.kind, record.identifier) == ("namespace", f"pytest-isolation/env={env.id}")
        pod = core.read_namespaced_pod(env.pod, env.namespace)
        security = pod.spec.containers[0].security_context
        assert security.allow_privilege_escalation is False
        assert security.capabilities.drop == ["ALL"]
        assert security.seccomp_profile.type == "RuntimeDefault"
        assert pod.status.phase == "Running"

        result = env.run(["sh", "-c", "echo out; echo err >&2; echo $GREETING; pwd; exit 3"])
        assert (result.returncode, result.stdout, result.stderr) == (
            3,
            "out\nhello\n/workspace\n",
            "err\n",
        )
        assert env.run(["sh", "-c", "echo $EXTRA"], env={"EXTRA": "x y"}).stdout == "x y\n"
        assert (
            env.run(
                ["python3", "-c", "import sys; print(sys.stdin.read()[::-1])"], input="abc"
            ).stdout
            == "cba\n"
        )
        env.run(["mkdir", "sub"]).check()
        assert env.run(["pwd"], cwd="sub").stdout == "/workspace/sub\n"
        name = env.namespace
    wait_for(lambda: gone_or_terminating(kube, name), "the namespace to be deleted")
    assert isolation_state.records() == []


def test_files_travel_as_tar_and_packages_install_in_the_pod(kube: Kube, tmp_path: Path) -> None:
    """write_file/read_file round-trip (binary, nested); install() of a wheel copied in."""
    wheel = build_wheel(tmp_path, "kubepkg", "1.5")
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        payload = bytes(range(256)) * 300
        env.write_file("deep/dir/data.bin", payload)
        assert env.read_file("deep/dir/data.bin") == payload
        assert env.run(["cat", "deep/dir/data.bin"]).returncode == 0
        with pytest.raises(FileNotFoundError):
            env.read_file("missing.txt")
        env.write_file(wheel.name, wheel.read_bytes())
        env.install([f"/workspace/{wheel.name}"])
        check = env.run(["python3", "-c", "import kubepkg; print(kubepkg.VERSION)"]).check()
        assert check.stdout == "1.5\n"


def test_a_timeout_kills_the_command_and_what_it_started(kube: Kube) -> None:
    """A command past its timeout raises CommandTimeout, and its processes are gone."""
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        started = time.monotonic()
        with pytest.raises(CommandTimeout):
            env.run(["sh", "-c", "sleep 301 & sleep 302"], timeout=1)
        assert time.monotonic() - started < 20
        left = env.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).stdout
        assert "sleep 301" not in left
        assert "sleep 302" not in left


def test_limits_become_a_quota_and_a_limit_range(kube: Kube) -> None:
    """memory/cpus limits: a ResourceQuota, a LimitRange, and the pod's own limits."""
    with IsolationManager() as manager:
        env = k8s_env(manager, kube, limits={"memory": "256M", "cpus": 0.5})
        core = kube.core()
        quota = core.read_namespaced_resource_quota("pytest-isolation", env.namespace)
        assert quota.spec.hard == {"limits.memory": str(256 * 1024**2), "limits.cpu": "500m"}
        limit_range = core.read_namespaced_limit_range("pytest-isolation", env.namespace)
        assert limit_range.spec.limits[0].default == {"memory": str(256 * 1024**2), "cpu": "500m"}
        pod = core.read_namespaced_pod(env.pod, env.namespace)
        assert pod.spec.containers[0].resources.limits["cpu"] == "500m"


def test_network_false_denies_all_traffic_and_true_does_not(kube: Kube) -> None:
    """The default is a deny-all NetworkPolicy (ingress and egress); network=True makes none."""
    from kubernetes import client

    with IsolationManager() as manager:
        closed = k8s_env(manager, kube)
        opened = k8s_env(manager, kube, network=True)
        networking = client.NetworkingV1Api(kube.core().api_client)
        policy: Any
        [policy] = networking.list_namespaced_network_policy(closed.namespace).items
        assert policy.spec.pod_selector.to_dict() in (
            {},
            {"match_labels": None, "match_expressions": None},
        )
        assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
        assert not policy.spec.ingress and not policy.spec.egress
        assert networking.list_namespaced_network_policy(opened.namespace).items == []


def test_pod_template_is_merged_into_the_pod(kube: Kube) -> None:
    """A YAML pod_template adds labels and variables to the generated pod."""
    template = """
metadata:
  labels: {team: storage}
spec:
  containers:
  - name: env
    env: [{name: FROM_TEMPLATE, value: "yes"}]
"""
    with IsolationManager() as manager:
        env = k8s_env(manager, kube, pod_template=template)
        pod = kube.core().read_namespaced_pod(env.pod, env.namespace)
        assert pod.metadata.labels["team"] == "storage"
        assert env.run(["sh", "-c", "echo $FROM_TEMPLATE"]).stdout == "yes\n"
        assert pod.spec.containers[0].security_context.allow_privilege_escalation is False


# --- what goes wrong -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"image": "piso-no-such-image:1"}, ("ErrImagePull", "ImagePullBackOff")),
        (
            {"pod_template": {"spec": {"nodeSelector": {"standin/unschedulable": "yes"}}}},
            ("Unschedulable",),
        ),
    ],
)
def test_a_pod_that_cannot_start_says_why_and_leaves_nothing(
    kube: Kube, isolation_state: Ledger, options: dict[str, Any], expected: tuple[str, ...]
) -> None:
    """Image pull failure or no node: the error carries container states and events."""
    options = {"image": kube.image, **options, "start_timeout": 6}
    with IsolationManager() as manager, pytest.raises(EnvironmentCreationError) as info:
        manager.create("kubernetes", **options)
    assert any(word in str(info.value) for word in expected), str(info.value)
    assert "is not ready after 6s" in str(info.value)
    assert isolation_state.records() == []


def test_a_quota_violation_is_refused_with_the_reason(kube: Kube, isolation_state: Ledger) -> None:
    """A pod asking for more than the environment's quota: forbidden, named, nothing left."""
    template = {
        "spec": {
            "containers": [
                {
                    "name": "env",
                    "resources": {"limits": {"memory": "1Gi"}, "requests": {"memory": "1Gi"}},
                }
            ]
        }
    }
    with IsolationManager() as manager, pytest.raises(EnvironmentCreationError) as info:
        manager.create(
            "kubernetes", image=kube.image, limits={"memory": "64M"}, pod_template=template
        )
    assert "forbidden" in str(info.value)
    assert "quota" in str(info.value)
    assert isolation_state.records() == []


def test_bad_pod_template_is_a_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated("kubernetes", image="x", pod_template="spec: [unclosed")
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_it*pod_template is not valid YAML*"])


def test_forbidden_namespace_creation_skips_or_fails_when_required(
    kube: Kube, pytester: pytest.Pytester
) -> None:
    """A user without create on namespaces: the SelfSubjectAccessReview says so."""
    if kube.standin is None:
        pytest.skip("the stand-in decides permissions; a real cluster's RBAC is not ours")
    kube.standin.allow = {("create", "namespaces"): False}
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("kubernetes", image={kube.image!r})
        def test_it(isolated_env):
            pass
        """
    )
    skipped = pytester.runpytest_subprocess("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(
        ["*this user may not create namespaces in http://127.0.0.1*grant create on namespaces*"]
    )
    failed = pytester.runpytest_subprocess("--isolation-require=kubernetes")
    failed.assert_outcomes(errors=1)


def test_expired_credentials_and_an_unreachable_server_are_explained(
    kube: Kube, tmp_path: Path
) -> None:
    """401: log in again. No server: start it or point the kubeconfig elsewhere."""
    if kube.standin is None:
        pytest.skip("credentials of a real cluster are not ours to expire")
    kube.standin.token_valid = False
    refused = check_cluster(connect(kube.kubeconfig, None))
    assert not refused
    assert "refused the credentials" in refused.reason
    kube.standin.token_valid = True
    dead = tmp_path / "kubeconfig"
    dead.write_text(
        Path(kube.kubeconfig).read_text().replace(kube.standin.url, "http://127.0.0.1:9")
    )
    unreachable = check_cluster(connect(str(dead), None))
    assert not unreachable
    assert "API server not reachable at http://127.0.0.1:9" in unreachable.reason
    assert "start the cluster" in unreachable.fix


def test_doctor_reports_context_server_and_permission(kube: Kube) -> None:
    doctor = cli("doctor", module=True)
    assert doctor.returncode == 0, doctor.stderr
    line = next(line for line in doctor.stdout.splitlines() if "kubernetes" in line)
    assert "[ok] kubernetes: available" in line
    assert "may create namespaces" in line


# --- the plugin, scopes, xdist, killed runs --------------------------------------------------


def test_marker_and_kube_context_option(kube: Kube, pytester: pytest.Pytester) -> None:
    """The marker, --isolation-kube-context, and scope="session" sharing one namespace."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("kubernetes", image={kube.image!r}, scope="session")
        def test_one(isolated_env):
            isolated_env.write_file("shared.txt", "from one")

        @pytest.mark.isolated("kubernetes", image={kube.image!r}, scope="session")
        def test_two(isolated_env):
            assert isolated_env.read_file("shared.txt") == b"from one"
        """
    )
    from kubernetes import config

    contexts: Any = config.list_kube_config_contexts  # untyped in the client
    _, current = contexts(config_file=kube.kubeconfig)
    result = pytester.runpytest("--isolation-kube-context", current["name"])
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*1 environment(s) (kubernetes: 1)*"])


def test_xdist_workers_each_make_their_own_namespaces(
    kube: Kube, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.isolated("kubernetes", image={kube.image!r})
        def test_it(isolated_env, n):
            assert isolated_env.namespace.startswith("pytest-iso-")
            assert isolated_env.run(["true"]).ok
        """
    )
    result = pytester.runpytest("-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 environment(s) (kubernetes: 4)*"])


def test_a_killed_run_has_its_namespace_deleted_by_its_watchdog(
    kube: Kube, tmp_path: Path, isolation_state: Ledger
) -> None:
    """SIGKILL of the runner: within two seconds its namespace is deleted."""
    state = tmp_path / "namespace.txt"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_block.py").write_text(
        f"""
import time, pytest

@pytest.mark.isolated("kubernetes", image={kube.image!r})
def test_block(isolated_env):
    open({str(state)!r}, "w").write(isolated_env.namespace)
    time.sleep(300)
"""
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
        cwd=suite,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        namespace = wait_for(
            lambda: state.read_text() if state.exists() else None, "the namespace", 120
        )
        started = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        wait_for(lambda: gone_or_terminating(kube, namespace), "the namespace's deletion", 10)
        assert time.monotonic() - started <= 2.0
        wait_for(lambda: not isolation_state.records(), "the ledger to be empty", 10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_cleanup_finds_a_namespace_no_ledger_lists(kube: Kube) -> None:
    """A labelled namespace of an owner that no longer runs, and no ledger entry: cleanup
    deletes it by its labels; one of a live owner stays."""
    core = kube.core()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    def labelled(pid: int, started: str) -> str:
        created = core.create_namespace(
            {
                "metadata": {
                    "generateName": "pytest-iso-",
                    "labels": {
                        "pytest-isolation/session": "lostledger",
                        "pytest-isolation/pid": str(pid),
                        "pytest-isolation/started": started,
                        "pytest-isolation/host": socket.gethostname(),
                        "pytest-isolation/env": f"lost{pid}",
                    },
                }
            }
        )
        return str(created.metadata.name)

    import psutil

    orphan = labelled(dead.pid, "12345.00")
    alive = labelled(os.getpid(), f"{psutil.Process().create_time():.2f}")
    try:
        cleanup = cli("cleanup", module=True)
        assert cleanup.returncode == 0, cleanup.stderr
        assert f"removed {orphan}" in cleanup.stdout
        assert gone_or_terminating(kube, orphan)
        assert not gone_or_terminating(kube, alive)
    finally:
        core.delete_namespace(alive)


def test_the_client_side_rate_limit_holds(kube: Kube) -> None:
    """qps=4: the engine's requests never exceed the bucket (burst 2 x qps, then qps)."""
    if kube.standin is None:
        pytest.skip("counting requests needs the stand-in's log")
    before = len(kube.standin.request_times)
    with IsolationManager() as manager:
        for _ in range(2):
            manager.create("kubernetes", image=kube.image, qps=4)
    times = kube.standin.request_times[before:]
    assert len(times) > 8
    for index, start in enumerate(times):
        within = [t for t in times[index:] if t - start < 1.0]
        assert len(within) <= 4 * 2 + 4 + 2, len(within)  # a burst, a second's worth, slack
