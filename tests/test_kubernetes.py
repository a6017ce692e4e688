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
import socket
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
    TeardownError,
)
from pytest_isolation.engines.kubernetes import (
    ExitStatusLost,
    KubernetesEnvironment,
    check_cluster,
    connect,
    pid_namespace,
)
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
        server.reset()
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
        assert labels["pytest-isolation/pidns"] == pid_namespace()
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert record.data["name"] == env.namespace  # known once the API server chose it
        pod = core.read_namespaced_pod(env.pod, env.namespace)
        security = pod.spec.containers[0].security_context
        assert security.allow_privilege_escalation is False
        assert security.capabilities.drop == ["ALL"]
        assert security.seccomp_profile.type == "RuntimeDefault"
        assert (security.run_as_non_root, security.run_as_user) == (True, 1000)
        assert pod.status.phase == "Running"
        assert env.run(["id", "-u"]).stdout == "1000\n"

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
    """write_file/read_file round-trip (binary, nested); install() of a wheel copied in, as
    the non-root user the pod runs as (into its HOME, an emptyDir)."""
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
        code = "import kubepkg, os; print(kubepkg.VERSION, os.getuid(), kubepkg.__file__)"
        version, uid, where = env.run(["python3", "-c", code]).check().stdout.split()
        assert (version, uid) == ("1.5", "1000")
        assert where.startswith("/isolation/home/.local/")


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


REACH_API_SERVER = (
    "import os, socket\n"
    "environ = os.environ\n"
    "address = (environ['KUBERNETES_SERVICE_HOST'], int(environ['KUBERNETES_SERVICE_PORT']))\n"
    "try:\n    socket.create_connection(address, 3).close()\n    print('open')\n"
    "except OSError as error:\n    print('closed', error)\n"
)


def test_network_false_denies_all_traffic_and_true_does_not(kube: Kube) -> None:
    """The default is a deny-all NetworkPolicy (ingress and egress) that cuts the pod off
    where the cluster enforces it, as the environment reports; network=True makes none."""
    from kubernetes import client

    with IsolationManager() as manager:
        closed = k8s_env(manager, kube)
        opened = k8s_env(manager, kube, network=True)
        assert opened.run(["python3", "-c", REACH_API_SERVER]).stdout == "open\n"
        reached = closed.run(["python3", "-c", REACH_API_SERVER]).stdout
        assert opened.network_policy == "none"
        if closed.network_policy == "enforced":
            assert reached.startswith("closed"), reached
        else:
            assert closed.network_policy.startswith("not enforced"), closed.network_policy
            assert reached == "open\n"
            assert kube.standin is None, "the stand-in enforces policies unless told not to"
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
        ({"image": "piso-no-such-image:1"}, ("cannot start", "ImagePullBackOff")),
        ({"image": "Not A Valid/Image"}, ("cannot start", "InvalidImageName")),
        ({"run_as_user": "image"}, ("cannot start", "CreateContainerConfigError", "as root")),
        (
            {"pod_template": {"spec": {"nodeSelector": {"standin/unschedulable": "yes"}}}},
            ("is not ready after 6s", "Unschedulable"),
        ),
    ],
)
def test_a_pod_that_cannot_start_says_why_and_leaves_nothing(
    kube: Kube, isolation_state: Ledger, options: dict[str, Any], expected: tuple[str, ...]
) -> None:
    """A pull that fails, an invalid image name, a root image under runAsNonRoot: an error
    at once, with container states and events; no node: not ready by the deadline."""
    if kube.standin is None and "pod_template" in options:
        pytest.skip("a node selector no node has is the stand-in's way to be unschedulable")
    options = {"image": kube.image, **options, "start_timeout": 6}
    hopeless = "pod_template" not in options
    if hopeless:
        options["start_timeout"] = 100  # the failure must come long before
    with IsolationManager() as manager, pytest.raises(EnvironmentCreationError) as info:
        manager.create("kubernetes", **options)
    for word in expected:
        assert word in str(info.value), str(info.value)
    assert ("is not ready after" in str(info.value)) is not hopeless
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
        ["*this user may not create namespaces in https://127.0.0.1*grant them (docs/engines.md*"]
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
    assert "has the rights it needs" in line


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
                        "pytest-isolation/pidns": pid_namespace(),
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
    with IsolationManager() as manager:
        assert manager.availability("kubernetes")  # at the run's rate (none set: 20)
        before = len(kube.standin.request_times)
        for _ in range(2):
            manager.create("kubernetes", image=kube.image, qps=4)
    times = kube.standin.request_times[before:]
    assert len(times) > 8
    for index, start in enumerate(times):
        within = [t for t in times[index:] if t - start < 1.0]
        assert len(within) <= 4 * 2 + 4 + 2, len(within)  # a burst, a second's worth, slack


# --- issue 14: what real clusters do that a naive stand-in did not --------------------------


def standin_only(kube: Kube, why: str) -> KubeStandIn:
    if kube.standin is None:
        pytest.skip(f"{why}: only the stand-in can be made to do that")
    return kube.standin


def test_the_suite_runs_the_oldest_supported_client_over_tls(kube: Kube) -> None:
    """The dev extra pins the floor the kubernetes extra allows, so every test here checks
    that version; exec goes over TLS (the stand-in's relay puts several frames in one TLS
    record, as a proxy does), and many quick commands all finish."""
    from importlib.metadata import requires, version

    declared = {r.replace(" ", "").replace("'", '"') for r in requires("pytest-isolation") or []}
    [floor] = [
        r.split(">=")[1].split(";")[0]
        for r in declared
        if r.startswith("kubernetes>=") and r.endswith('extra=="kubernetes"')
    ]
    assert f'kubernetes=={floor};extra=="dev"' in declared
    assert version("kubernetes") == floor, "run the tests with the dev extra's client"
    if kube.standin is not None:
        assert kube.standin.url.startswith("https://")
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        for number in range(20):
            assert env.run(["echo", str(number)], timeout=10).stdout == f"{number}\n"
        big = env.run(["python3", "-c", "print('x' * 3_000_000)"], timeout=60)
        assert big.stdout == "x" * 3_000_000 + "\n"


def test_commands_and_validate_from_threads_share_nothing(kube: Kube) -> None:
    """Two threads running commands and one validating: every call is answered by the
    right transport, and teardown (which lists and deletes over REST) still works."""
    from concurrent.futures import ThreadPoolExecutor

    with IsolationManager() as manager:
        env = k8s_env(manager, kube)

        def commands(tag: str) -> list[str]:
            return [env.run(["echo", f"{tag}{n}"]).stdout for n in range(8)]

        def validations() -> list[list[str]]:
            return [env.validate() for _ in range(16)]

        with ThreadPoolExecutor(3) as pool:
            first, second = pool.submit(commands, "a"), pool.submit(commands, "b")
            checks = pool.submit(validations)
            assert first.result() == [f"a{n}\n" for n in range(8)]
            assert second.result() == [f"b{n}\n" for n in range(8)]
            assert checks.result() == [[]] * 16
        name = env.namespace
    wait_for(lambda: gone_or_terminating(kube, name), "the namespace's deletion")


def test_a_lost_exit_status_is_a_failure(kube: Kube) -> None:
    """An exec that ends without its status message (a kubelet's idle timeout) raises
    ExitStatusLost, and the command is killed."""
    standin = standin_only(kube, "a kubelet drops a status only after hours of quiet")
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        standin.drop_exec_status = True
        with pytest.raises(ExitStatusLost, match=r"exit status of echo hi .* was lost"):
            env.run(["echo", "hi"])
        standin.drop_exec_status = False
        assert env.run(["true"]).ok


def test_exec_connect_and_upgrade_obey_the_timeout(kube: Kube) -> None:
    """A server that accepts and never upgrades, and one that never finishes TLS: run()
    raises CommandTimeout at its timeout instead of blocking."""
    standin = standin_only(kube, "a server that never upgrades")
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        standin.hold_exec_upgrade = True
        started = time.monotonic()
        with pytest.raises(CommandTimeout):
            env.run(["true"], timeout=2)
        assert time.monotonic() - started < 15
        standin.hold_exec_upgrade = False
        silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), says nothing
        configuration = env.cluster.configuration
        real = configuration.host
        try:
            configuration.host = f"https://127.0.0.1:{silent.getsockname()[1]}"
            started = time.monotonic()
            with pytest.raises(CommandTimeout):
                env._run(["true"], timeout=2, env={}, cwd=None, input=None)
            assert time.monotonic() - started < 15
        finally:
            configuration.host = real
            silent.close()
        assert env.run(["true"]).ok


@pytest.mark.parametrize("protocols", ["v5 and v4", "v4 only"])
def test_large_input_streams_through_a_filter(kube: Kube, protocols: str) -> None:
    """Input is written while output is read (no deadlock on a filter bigger than the pipes),
    and ends with the v5 CLOSE signal where the server speaks v5 (no `head -c`)."""
    if protocols == "v4 only":
        standin_only(kube, "a server without v5").protocols = ("v4.channel.k8s.io",)
    data = os.urandom(3 * 2**20).hex()  # 6 MiB of text, far beyond any pipe buffer
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        env.run(["true"])  # the server's protocol is known from here on
        result = env.run(["sh", "-c", "cat; echo end"], input=data, timeout=120)
        assert result.stdout == data + "end\n"
        read_to_end = env.run(
            ["python3", "-c", "import sys; print(len(sys.stdin.read()))"], input="abc"
        )
        assert read_to_end.stdout == "3\n"
    if kube.standin is not None:
        counted = [c for _, _, c in kube.standin.exec_log if "head -c" in " ".join(c)]
        assert bool(counted) is (protocols == "v4 only")


def test_pods_meet_pod_security_restricted(kube: Kube, pytester: pytest.Pytester) -> None:
    """The namespace enforces restricted: the default pod and one with run_as_user run;
    a template that breaks the profile is refused with the violations; root is refused
    before anything is made."""
    with IsolationManager() as manager:
        default = k8s_env(manager, kube)
        other = k8s_env(manager, kube, run_as_user=2000)
        assert default.run(["id", "-u"]).stdout == "1000\n"
        assert other.run(["id", "-u"]).stdout == "2000\n"
        assert other.run(["sh", "-c", "echo $HOME; touch $HOME/x $TMPDIR/y x"]).stdout == (
            "/isolation/home\n"
        )
        escalating = {
            "spec": {"containers": [{"name": "env", "securityContext": {"runAsNonRoot": False}}]}
        }
        with pytest.raises(EnvironmentCreationError, match="violates PodSecurity"):
            k8s_env(manager, kube, pod_template=escalating)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("kubernetes", image={kube.image!r}, run_as_user=0)
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*run_as_user*root (0) is refused*Pod Security*"])


def test_a_late_service_account_and_throttling_are_waited_out(kube: Kube) -> None:
    """A pod made before its namespace's default ServiceAccount exists (403 "error looking
    up service account") and requests answered 429 with Retry-After: retried, bounded."""
    standin = standin_only(kube, "the race and 429s on demand")
    standin.serviceaccount_delay = 1.5
    before = len(standin.request_log)
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        assert env.run(["true"]).ok
    pod_posts = [
        path
        for method, path in standin.request_log[before:]
        if method == "POST" and path.endswith("/pods")
    ]
    assert len(pod_posts) > 1
    standin.serviceaccount_delay = 0
    standin.throttle(4, retry_after=1)
    with IsolationManager() as manager:
        assert k8s_env(manager, kube).run(["true"]).ok
    assert standin._throttled == 0
    try:
        with IsolationManager() as manager:
            assert manager.availability("kubernetes")
            standin.throttle(1000, retry_after=1)  # never ends: the retries give up
            with pytest.raises(EnvironmentCreationError, match="429"):
                k8s_env(manager, kube)
            standin.throttle(0)
    finally:
        standin.throttle(0)
    with IsolationManager() as sweeper:  # the set-up's release was refused too: cleanup's turn
        report = sweeper.sweep(include_live=True)
    assert [r.kind for r in report.released] == ["namespace"]


def two_context_kubeconfig(kube: Kube, tmp_path: Path) -> tuple[Path, str]:
    """The kubeconfig with a dead cluster as the current context, and the working one's
    name."""
    import yaml

    config = yaml.safe_load(Path(kube.kubeconfig).read_text())
    [working] = [c for c in config["contexts"] if c["name"] == config["current-context"]]
    config["clusters"].append({"name": "dead", "cluster": {"server": "https://127.0.0.1:9"}})
    config["contexts"].append(
        {"name": "dead", "context": {**working["context"], "cluster": "dead"}}
    )
    config["current-context"] = "dead"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path, str(working["name"])


def test_doctor_checks_every_right_for_the_configured_context(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The current context is dead, the configured one works: doctor says so, lists each
    right (a missing optional one with what it costs) and probes the NetworkPolicy."""
    kubeconfig, context = two_context_kubeconfig(kube, tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    if kube.standin is not None:
        kube.standin.allow = {("list", "namespaces"): False}
    dead = cli("doctor", module=True)
    assert (
        "[--] kubernetes: unavailable: API server not reachable at https://127.0.0.1:9"
        in dead.stdout
    )
    doctor = cli(
        "doctor",
        "--isolation-kube-context",
        context,
        "--isolation-option",
        f"kubernetes.image={kube.image}",
        module=True,
    )
    assert doctor.returncode == 0, doctor.stderr
    lines = doctor.stdout.splitlines()
    [summary] = [line for line in lines if "kubernetes:" in line]
    assert "[ok] kubernetes: available" in summary
    assert f"(context {context})" in summary
    for right in ("create namespaces", "get pods/exec", "create networkpolicies.networking.k8s.io"):
        assert f"       ok {right}" in lines
    [probe] = [line for line in lines if line.startswith("       NetworkPolicy: ")]
    if kube.standin is None:
        assert probe.split(": ", 1)[1].startswith(("enforced", "not enforced"))
        return
    assert probe == "       NetworkPolicy: enforced"
    assert "not: list namespaces" in summary
    assert any(
        line.startswith("       -- list namespaces (optional: without it label sweeps")
        for line in lines
    )
    kube.standin.allow = {("get", "pods/exec"): False}
    refused = cli("doctor", "--isolation-kube-context", context, module=True)
    assert "unavailable: this user may not get pods/exec in https://127.0.0.1" in refused.stdout


def test_exec_is_authorised_as_get_and_from_1_35_also_as_create(kube: Kube) -> None:
    """A WebSocket exec needs get on pods/exec; Kubernetes 1.35 also asks for create."""
    standin = standin_only(kube, "the server's version and RBAC")
    standin.allow = {("create", "pods/exec"): False}
    with IsolationManager() as manager:
        assert k8s_env(manager, kube).run(["true"]).ok
    standin.minor = 35
    with IsolationManager() as manager:
        availability = manager.availability("kubernetes")
        assert not availability
        assert "may not create pods/exec" in availability.reason
    standin.allow = {("get", "pods/exec"): False}
    with IsolationManager() as manager:
        assert "may not get pods/exec" in manager.availability("kubernetes").reason


def test_a_namespace_is_deleted_by_name_without_the_right_to_list(
    kube: Kube, isolation_state: Ledger
) -> None:
    standin = standin_only(kube, "withholding list namespaces")
    standin.allow = {("list", "namespaces"): False, ("watch", "namespaces"): False}
    with IsolationManager() as manager:
        env = k8s_env(manager, kube, wait_deleted=True)
        name = env.namespace
        manager.destroy(env)
    assert name not in standin.namespaces
    assert isolation_state.records() == []


def test_a_namespace_stuck_terminating_is_reported_with_its_conditions(
    kube: Kube, isolation_state: Ledger
) -> None:
    standin = standin_only(kube, "an aggregated API that does not answer")
    why = "Discovery failed for some groups, 1 failing: metrics.k8s.io/v1beta1: unavailable"
    with IsolationManager() as manager:
        env = k8s_env(manager, kube, wait_deleted=2)
        name = env.namespace
        standin.deletion_blocked = why
        with pytest.raises(TeardownError) as info:
            manager.destroy(env)
    assert f"namespace {name} is still Terminating 2s after its deletion" in str(info.value)
    assert f"NamespaceDeletionDiscoveryFailure=True: DiscoveryFailed: {why}" in str(info.value)
    standin.deletion_blocked = None
    wait_for(lambda: name not in standin.namespaces, "the namespace to go once unblocked")
    with IsolationManager() as sweeper:
        sweeper.sweep(include_live=True)
    assert isolation_state.records() == []


def test_sweeps_ask_the_configured_context_and_judge_owners_by_pid_namespace(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cleanup with the configured context (the current one is dead) deletes a namespace
    of a dead runner of this PID namespace, and leaves one whose runner had the same host
    name and pid but another PID namespace."""
    core = kube.core()
    kubeconfig, context = two_context_kubeconfig(kube, tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("PYTEST_ISOLATION_OPTIONS", f"kubernetes.context={context}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def labelled(pidns: str) -> str:
        created = core.create_namespace(
            {
                "metadata": {
                    "generateName": "pytest-iso-",
                    "labels": {
                        "pytest-isolation/session": "lostledger",
                        "pytest-isolation/pid": str(dead.pid),
                        "pytest-isolation/started": "12345.00",
                        "pytest-isolation/host": socket.gethostname(),
                        "pytest-isolation/pidns": pidns,
                        "pytest-isolation/env": f"lost{pidns[-6:]}",
                    },
                }
            }
        )
        return str(created.metadata.name)

    ours = labelled(pid_namespace())
    elsewhere = labelled(pid_namespace().rsplit("-", 1)[0] + "-1")
    try:
        cleanup = cli("cleanup", module=True)
        assert cleanup.returncode == 0, cleanup.stderr
        assert f"removed {ours}" in cleanup.stdout
        assert gone_or_terminating(kube, ours)
        assert not gone_or_terminating(kube, elsewhere)
    finally:
        core.delete_namespace(elsewhere)


def test_a_cluster_that_ignores_network_policy_is_reported(kube: Kube) -> None:
    standin = standin_only(kube, "a CNI that ignores NetworkPolicy")
    standin.enforce_network_policy = False
    with IsolationManager() as manager:
        env = k8s_env(manager, kube)
        assert env.network_policy.startswith("not enforced: a pod of a namespace")
        assert env.run(["python3", "-c", REACH_API_SERVER]).stdout == "open\n"
        sections = dict(env.report_sections())
        assert "not enforced" in sections[f"network of {env.namespace}/{env.pod}"]


def test_the_documented_cluster_role_grants_exactly_the_rights_the_engine_uses() -> None:
    import yaml

    from pytest_isolation.engines.kubernetes import RIGHTS

    text = (Path(__file__).parents[1] / "docs" / "engines.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    role = next(doc for doc in yaml.safe_load_all(block) if doc["kind"] == "ClusterRole")
    granted = {
        (verb, resource, group)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    used = {
        (verb, f"{resource}/{sub}" if sub else resource, group)
        for verb, resource, sub, group, _ in RIGHTS
    }
    assert granted == used
