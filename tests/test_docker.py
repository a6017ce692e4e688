"""The docker engine against a real daemon: images, commands, files, limits, teardown.

Nothing here is mocked.  Containers are started from the local image
``TEST_IMAGE`` (built offline, see ``.ci/run``); nothing is pulled and no test
sends traffic anywhere but to loopback or to containers of its own (a pull that
must fail names a registry on 127.0.0.1).  Every test first asks
``need_engine("docker")``, so a missing daemon skips here and fails in CI, and
every test is checked for what it leaves: a container or network labelled
``pytest-isolation.session`` that was not there before fails it.

Tests that need no environment of their own share one, made through an
``IsolationManager`` for the module.  A few tests shorten the engine client's
read timeout: what they show would otherwise take the client's full minute.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import psutil
import pytest

from pytest_isolation import (
    CommandTimeout,
    EnvironmentCreationError,
    InvalidSpec,
    IsolationManager,
    Ledger,
    ResourceLimitExceeded,
)
from pytest_isolation.engines.docker import (
    CREATED_LABEL,
    DEFAULT_CAPS,
    HOST_LABEL,
    PID_LABEL,
    SESSION_LABEL,
    STARTED_LABEL,
    WORKSPACE,
    DockerEnvironment,
)
from tests.conftest import TEST_IMAGE, build_wheel, cli, need_engine, wait_for

T = TypeVar("T")

#: Seconds to wait for something a container or a child process does.
PATIENCE = 30.0
#: Capability numbers (linux/capability.h) of the engine's minimal set.
CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7}
#: Lists every process of a container by pid and command line (the image has no ps).
PROCESSES = (
    "for p in /proc/[0-9]*; do printf '%s ' \"${p#/proc/}\"; "
    "tr '\\0' ' ' < \"$p/cmdline\" 2>/dev/null; echo; done"
)


# --- helpers ----------------------------------------------------------------------------------


def docker_env(manager: IsolationManager, **options: object) -> DockerEnvironment:
    """A docker environment of ``TEST_IMAGE``, unless ``options`` name an image or a
    Dockerfile."""
    if "dockerfile" not in options:
        options.setdefault("image", TEST_IMAGE)
    env = manager.create(manager.spec("docker", **options))
    assert isinstance(env, DockerEnvironment), env
    return env


def processes(env: DockerEnvironment) -> list[str]:
    """The command lines of the processes running in ``env``'s container."""
    listing = env.run(["sh", "-c", PROCESSES], timeout=PATIENCE).check().stdout
    return [line.split(" ", 1)[1].strip() for line in listing.splitlines() if " " in line]


def inspect(env: DockerEnvironment) -> dict[str, Any]:
    env.container.reload()
    attrs: dict[str, Any] = env.container.attrs
    return attrs


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def http_get(port: int, path: str) -> bytes | None:
    """The body of ``GET path`` on 127.0.0.1:``port``, or None while nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.read() if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


Filters = dict[str, str | list[str] | bool]


def container_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


def of_session(client: docker.DockerClient, session: str) -> list[str]:
    """Names of the containers and networks labelled with run ``session``."""
    label: Filters = {"label": f"{SESSION_LABEL}={session}"}
    containers = client.containers.list(all=True, filters=label, ignore_removed=True)
    networks = client.networks.list(filters=label)
    return [f"container {c.name}" for c in containers] + [f"network {n.name}" for n in networks]


# --- what a test leaves -----------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """A container or network carrying the session label."""

    kind: str
    name: str
    session: str
    pid: int | None

    def foreign(self) -> bool:
        """Made by a live process that is neither this one nor one of its children: another
        run using the same daemon, not something a test here left."""
        if self.pid is None or self.pid == os.getpid() or not psutil.pid_exists(self.pid):
            return False
        with contextlib.suppress(psutil.Error):
            if any(p.pid == os.getpid() for p in psutil.Process(self.pid).parents()):
                return False
        return True


def labelled(client: docker.DockerClient) -> dict[str, Labelled]:
    """Every container and network labelled ``pytest-isolation.session``, by id."""
    found: dict[str, Labelled] = {}
    label: Filters = {"label": SESSION_LABEL}
    for container in client.containers.list(all=True, filters=label, ignore_removed=True):
        labels = container.labels
        pid = labels.get(PID_LABEL, "")
        found[str(container.id)] = Labelled(
            "container",
            container.name or str(container.id),
            labels.get(SESSION_LABEL, ""),
            int(pid) if pid.isdigit() else None,
        )
    for network in client.networks.list(filters=label):
        labels = network.attrs.get("Labels") or {}
        pid = labels.get(PID_LABEL, "")
        found[str(network.id)] = Labelled(
            "network",
            network.name or str(network.id),
            labels.get(SESSION_LABEL, ""),
            int(pid) if pid.isdigit() else None,
        )
    return found


def remove(client: docker.DockerClient, item: Labelled) -> None:
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        if item.kind == "container":
            client.containers.get(item.name).remove(force=True, v=True)
        else:
            client.networks.get(item.name).remove()


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    """A client of the daemon the engine uses; skips (or fails in CI) without one."""
    need_engine("docker")
    made = docker.from_env()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(autouse=True)
def leaves_nothing(client: docker.DockerClient) -> Iterator[None]:
    """Needs the engine; fails a test that leaves a labelled container or network (and
    removes what it left, so that one leak does not fail the tests after it)."""
    need_engine("docker")
    before = labelled(client)
    yield
    left = [
        item for key, item in labelled(client).items() if key not in before and not item.foreign()
    ]
    for item in left:
        remove(client, item)
    if left:
        pytest.fail(
            "test leaked: " + ", ".join(f"{item.kind} {item.name}" for item in left),
            pytrace=False,
        )


@pytest.fixture
def manager() -> Iterator[IsolationManager]:
    """A manager with this test's private ledger (set by the conftest)."""
    with IsolationManager() as made:
        yield made


@dataclass(frozen=True)
class Shared:
    """The module's environment and the manager that made it."""

    manager: IsolationManager
    env: DockerEnvironment


#: Environment variables of the shared environment's spec.
SPEC_ENV = {"PISO_SPEC": "from-spec", "PISO_BOTH": "spec"}


@pytest.fixture(scope="module")
def shared(
    client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shared]:
    """One environment for the tests that only run commands and move files: a manager of its
    own, with a ledger of its own (the per-test ledgers come and go under it)."""
    ledger = Ledger(tmp_path_factory.mktemp("docker-shared-state"))
    with IsolationManager(ledger=ledger) as made:
        env = docker_env(made, env=SPEC_ENV)
        yield Shared(made, env)
    assert of_session(client, made.session_id) == []
    assert ledger.records() == []


# --- images -----------------------------------------------------------------------------------


#: Makes an inner test write the name of its container to names.txt beside its file.
REMEMBER = '''
from pathlib import Path

def remember(env):
    """Append the name of ``env``'s container to names.txt beside this file."""
    with open(Path(__file__).with_name("names.txt"), "a") as out:
        out.write(env.name + "\\n")
'''

#: Lets an inner run tell the outer test its run id.
NOTE_SESSION_ID = """
import pytest

@pytest.fixture(autouse=True, scope="session")
def _note_session_id(isolation_manager):
    with open("session-id", "w") as note:
        note.write(isolation_manager.session_id)
"""


def names(pytester: pytest.Pytester) -> list[str]:
    """The container names the inner tests reported, complete lines only."""
    listing = pytester.path / "names.txt"
    if not listing.exists():
        return []
    return [line for line in listing.read_text().split("\n")[:-1] if line]


def session_of(pytester: pytest.Pytester) -> str:
    return (pytester.path / "session-id").read_text()


def assert_gone(client: docker.DockerClient, pytester: pytest.Pytester, count: int) -> None:
    """The inner run reported ``count`` containers; neither they nor anything else of its run
    (its networks, pooled containers) exists any more."""
    made = names(pytester)
    assert len(made) == count, made
    assert [name for name in made if container_exists(client, name)] == []
    assert of_session(client, session_of(pytester)) == []


IMAGE_CHECK = """
def test_it(isolated_env):
    remember(isolated_env)
    assert isolated_env.engine == "docker"
    assert {image!r} in isolated_env.container.image.tags
    version = isolated_env.run(["cat", "/etc/debian_version"]).check().stdout
    assert version.startswith("12."), version
"""


def test_marker_image_starts_a_container_of_that_image(
    pytester: pytest.Pytester, client: docker.DockerClient
) -> None:
    """image= in the marker: the test's container runs that image, and goes with the test."""
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + "import pytest\n\n"
        + f"@pytest.mark.isolated('docker', image={TEST_IMAGE!r})"
        + IMAGE_CHECK.format(image=TEST_IMAGE)
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 environment(s) (docker: 1)*"])
    assert_gone(client, pytester, 1)


@pytest.mark.parametrize("how", ["command line", "ini"])
def test_image_from_the_command_line_or_the_ini_file(
    pytester: pytest.Pytester, client: docker.DockerClient, how: str
) -> None:
    """--isolation-image and ini isolation_docker_image give a marker without image= its image,
    and a plain isolated_env too when docker is the default engine."""
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + "import pytest\n\n@pytest.mark.isolated('docker')"
        + IMAGE_CHECK.format(image=TEST_IMAGE)
        + IMAGE_CHECK.format(image=TEST_IMAGE).replace("test_it", "test_default_engine")
    )
    if how == "ini":
        pytester.makeini(f"[pytest]\nisolation = docker\nisolation_docker_image = {TEST_IMAGE}\n")
        result = pytester.runpytest()
    else:
        result = pytester.runpytest("--isolation=docker", f"--isolation-image={TEST_IMAGE}")
    result.assert_outcomes(passed=2)
    assert_gone(client, pytester, 2)


def test_missing_image_with_pull_never_is_a_setup_error_naming_image_and_fix(
    pytester: pytest.Pytester,
) -> None:
    """pull='never' and an image that is not here: the test errors in set-up, saying which
    image and what to do; nothing is left (the ledger check of the conftest)."""
    image = f"piso-missing-{uuid.uuid4().hex[:12]}:none"
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("docker", image={image!r}, pull="never")
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*EnvironmentCreationError: docker: image {image} is not on this machine and "
            "pull='never'; build or load it first, or allow pull='missing'*"
        ]
    )


def test_missing_image_that_cannot_be_pulled_is_a_clear_creation_error(
    manager: IsolationManager, client: docker.DockerClient
) -> None:
    """pull='missing' (the default) and a pull that fails (a registry on a closed loopback
    port): EnvironmentCreationError naming the image, the pull's failure and the fix."""
    image = f"127.0.0.1:{closed_port()}/piso-missing-{uuid.uuid4().hex[:12]}:none"
    with pytest.raises(EnvironmentCreationError) as caught:
        docker_env(manager, image=image)
    message = str(caught.value)
    assert caught.value.engine == "docker"
    assert message.startswith(f"docker: image {image} is not on this machine and cannot be pulled")
    assert "connection refused" in message
    assert message.endswith("build or load it first (docker build/import/load)")
    assert manager.list() == []
    assert manager.ledger.records() == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            "",
            "*the docker engine needs an image: image= in the marker, --isolation-image, "
            "ini isolation_docker_image, or dockerfile=*",
            id="no-image",
        ),
        pytest.param(
            f", image={TEST_IMAGE!r}, ports=[8000]",
            "*ports= publishes ports, which needs network=True*",
            id="ports-without-network",
        ),
    ],
)
def test_bad_docker_specs_are_collection_errors(
    pytester: pytest.Pytester, arguments: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("docker"{arguments})
        def test_it(isolated_env):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting*", message])


def image_tags(client: docker.DockerClient, tag: str, since: float) -> int:
    """How often the daemon tagged an image ``tag`` since ``since``: once per build."""
    # the API takes fractional seconds, which the stubs do not know
    start: Any = f"{since:.6f}"
    end: Any = f"{time.time():.6f}"
    events = client.events(
        since=start, until=end, filters={"type": "image", "event": "tag"}, decode=True
    )
    return sum(1 for event in events if event["Actor"]["Attributes"].get("name") == tag)


def test_dockerfile_is_built_once_per_content(tmp_path: Path, client: docker.DockerClient) -> None:
    """dockerfile= builds an image tagged by the content's hash: the second environment and
    a later run reuse the tag without building, a changed Dockerfile builds a new tag."""
    token = uuid.uuid4().hex  # new content: a real build, whatever earlier runs left
    context = tmp_path / "image"
    context.mkdir()
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(f"FROM {TEST_IMAGE}\nRUN echo hi-{token} > /built\n")
    started = time.time()
    built: list[str] = []
    try:
        with IsolationManager() as manager:
            first = docker_env(manager, dockerfile=str(dockerfile))
            tag = inspect(first)["Config"]["Image"]
            built.append(tag)
            assert tag.startswith("pytest-isolation-build:"), tag
            second = docker_env(manager, dockerfile=str(dockerfile))
            assert inspect(second)["Config"]["Image"] == tag
            assert first.container.image.id == second.container.image.id
            assert second.run(["cat", "/built"]).check().stdout == f"hi-{token}\n"
        image = client.images.get(tag)
        assert image.labels.get("pytest-isolation.build") == tag.split(":")[1]
        with IsolationManager() as manager:  # a new run: the tag is found, not rebuilt
            third = docker_env(manager, dockerfile=str(dockerfile))
            assert inspect(third)["Config"]["Image"] == tag
        assert image_tags(client, tag, started) == 1

        dockerfile.write_text(f"FROM {TEST_IMAGE}\nRUN echo bye-{token} > /built\n")
        changed_at = time.time()
        with IsolationManager() as manager:
            changed = docker_env(manager, dockerfile=str(dockerfile))
            new_tag = inspect(changed)["Config"]["Image"]
            built.append(new_tag)
            assert new_tag.startswith("pytest-isolation-build:") and new_tag != tag
            assert changed.run(["cat", "/built"]).check().stdout == f"bye-{token}\n"
        assert image_tags(client, new_tag, changed_at) == 1
    finally:
        for made in built:
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(made)


# --- commands ---------------------------------------------------------------------------------


INTERLEAVED = """
import sys
for i in range(200):
    sys.stdout.write(f"o{i:04d}" * 250 + "\\n")
    sys.stdout.flush()
    sys.stderr.write(f"e{i:04d}" * 250 + "\\n")
    sys.stderr.flush()
"""


def test_run_separates_stdout_and_stderr_and_returns_the_exit_code(shared: Shared) -> None:
    env = shared.env
    result = env.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert env.run(["true"]).returncode == 0
    assert env.run(["sh", "-c", "kill -9 $$"]).returncode == 137
    # hundreds of kilobytes, interleaved in small writes: every frame lands in its stream
    big = env.run(["python3", "-c", INTERLEAVED]).check()
    assert big.stdout == "".join(f"o{i:04d}" * 250 + "\n" for i in range(200))
    assert big.stderr == "".join(f"e{i:04d}" * 250 + "\n" for i in range(200))


def test_run_closes_its_connection_to_the_daemon(shared: Shared) -> None:
    """A command's exec connection is closed when run() returns, not left to the garbage
    collector: under ``-W error`` (this project's ``filterwarnings = error``) the warning of an
    unclosed socket turns into an error of whatever test runs at the time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        shared.env.run(["true"]).check()
        shared.env.run(["cat"], input="x").check()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


def test_run_feeds_stdin(shared: Shared) -> None:
    """input= reaches the command's stdin, text or bytes; without it stdin is at its end."""
    env = shared.env
    assert env.run(["cat"], input="hello\nworld\n").check().stdout == "hello\nworld\n"
    echoed = env.run(["sh", "-c", "read line; echo got $line"], input=b"bytes\n").check()
    assert echoed.stdout == "got bytes\n"
    assert env.run(["wc", "-c"], input=b"\x00" * 100_000).check().stdout.strip() == "100000"
    assert env.run(["cat"], timeout=PATIENCE).check().stdout == ""
    assert env.run(["cat"], input="", timeout=PATIENCE).check().stdout == ""


@contextlib.contextmanager
def read_timeout(env: DockerEnvironment, seconds: int) -> Iterator[None]:
    """Shorten the read timeout of the engine's docker client for the block."""
    api = env.client.api
    saved = api.timeout
    api.timeout = seconds
    try:
        yield
    finally:
        api.timeout = saved


def outcome(run: Callable[[], T]) -> T | str:
    """The result of ``run``, or the exception it raised as text; the exception itself (and
    with it its traceback, which may hold a connection to the daemon) is dropped."""
    try:
        return run()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()


def test_run_feeds_large_stdin_to_a_command_that_writes_as_it_reads(
    manager: IsolationManager,
) -> None:
    """16 MB through ``cat`` come back whole.  The client's read timeout is shortened to 5s:
    a run that deadlocks (stdin sent in full before any output is read, while ``cat`` waits
    for its output to be read) then fails in seconds instead of a minute."""
    env = docker_env(manager)
    data = b"0123456789abcdef" * (1 << 20)
    started = time.monotonic()
    with read_timeout(env, 5):
        result = outcome(lambda: env.run(["cat"], input=data, timeout=60))
    assert not isinstance(result, str), result
    assert result.returncode == 0
    assert result.stdout.encode() == data
    assert time.monotonic() - started < 30


def test_run_without_a_timeout_outlives_the_clients_read_timeout(
    manager: IsolationManager,
) -> None:
    """A command without a timeout runs until it ends, even when it prints nothing for longer
    than the docker client's read timeout (60s in the engine; 2s here, to be quick)."""
    env = docker_env(manager)
    with read_timeout(env, 2):
        result = outcome(lambda: env.run(["sh", "-c", "sleep 4; echo done"]))
    assert not isinstance(result, str), result
    assert (result.returncode, result.stdout) == (0, "done\n")


def test_run_in_a_working_directory_with_environment_variables(
    shared: Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cwd is relative to /workspace; the spec's env= and the command's env= are set (the
    command's wins, and lasts for that command); the host's variables are not passed."""
    env = shared.env
    monkeypatch.setenv("PISO_HOST_ONLY", "secret")
    assert env.run(["pwd"]).check().stdout == f"{WORKSPACE}\n"
    env.run(["mkdir", "-p", "sub/dir"]).check()
    env.write_file("sub/dir/here.txt", "here\n")
    assert env.run(["pwd"], cwd="sub/dir").check().stdout == f"{WORKSPACE}/sub/dir\n"
    assert env.run(["cat", "here.txt"], cwd="sub/dir").check().stdout == "here\n"

    def variables(**extra: str) -> dict[str, str]:
        out = env.run(["env"], env=extra).check().stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    seen = variables(PISO_CMD="from-command", PISO_BOTH="command")
    assert seen["PISO_SPEC"] == "from-spec"
    assert seen["PISO_CMD"] == "from-command"
    assert seen["PISO_BOTH"] == "command"
    leaked = {"PISO_HOST_ONLY", "PYTEST_ISOLATION_STATE_DIR", "TMPDIR", "PYTEST_CURRENT_TEST"}
    assert leaked & set(seen) == set()
    again = variables()
    assert again["PISO_BOTH"] == "spec"
    assert "PISO_CMD" not in again


def test_timeout_raises_in_time_and_kills_the_commands_children(
    manager: IsolationManager,
) -> None:
    """A command past its timeout raises CommandTimeout within a second of it, with the output
    so far, and the processes it started in the background are gone."""
    env = docker_env(manager)
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as caught:
        env.run(["sh", "-c", "sleep 1001 & sleep 1002 & echo started; sleep 1003"], timeout=2)
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 3.0, elapsed
    assert caught.value.timeout == 2
    assert caught.value.stdout == "started\n"
    wait_for(
        lambda: not [p for p in processes(env) if p.startswith("sleep 100")],
        "the command's processes to be gone",
        timeout=5,
    )
    assert env.run(["echo", "usable"]).check().stdout == "usable\n"


def test_timeout_kills_background_processes_that_left_the_commands_tree(
    manager: IsolationManager,
) -> None:
    """A background process the command started from a subshell (so that it is reparented to
    the container's init, as daemons are) dies with the command too."""
    env = docker_env(manager)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        env.run(["sh", "-c", "(sleep 1004 &); echo started; sleep 1005"], timeout=2)
    assert time.monotonic() - started < 3.0
    deadline = time.monotonic() + 3
    while (left := [p for p in processes(env) if p.startswith("sleep 100")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert left == [], f"still running in the container after the timeout: {left}"


# --- files ------------------------------------------------------------------------------------


def test_write_file_and_read_file_round_trip(shared: Shared) -> None:
    """Text and binary data, in new sub-folders, reach commands unchanged and come back
    unchanged; a command's file can be read; bad paths are refused."""
    env = shared.env
    binary = bytes(range(256)) * 4096  # 1 MiB, every byte value
    env.write_file("files/deep/er/data.bin", binary)
    env.write_file("files/text.txt", "héllo\nwörld\n")
    assert env.read_file("files/deep/er/data.bin") == binary
    assert env.read_file("files/text.txt") == "héllo\nwörld\n".encode()
    digest = env.run(["sha256sum", "files/deep/er/data.bin"]).check().stdout.split()[0]
    assert digest == hashlib.sha256(binary).hexdigest()
    assert env.run(["cat", f"{WORKSPACE}/files/text.txt"]).check().stdout == "héllo\nwörld\n"
    env.write_file("files/text.txt", b"replaced")
    assert env.run(["cat", "files/text.txt"]).check().stdout == "replaced"
    code = "import sys; sys.stdout.buffer.write(bytes(range(255, -1, -1)))"
    env.run(["sh", "-c", f"python3 -c '{code}' > files/made.bin"]).check()
    assert env.read_file("files/made.bin") == bytes(range(255, -1, -1))
    with pytest.raises(FileNotFoundError):
        env.read_file("files/missing.txt")
    with pytest.raises(IsADirectoryError):
        env.read_file("files/deep")
    for bad in ("../escape.txt", "/etc/passwd", ""):
        with pytest.raises(InvalidSpec):
            env.write_file(bad, "x")


def test_install_a_local_wheel_without_network(shared: Shared, tmp_path: Path) -> None:
    """install() of a wheel copied in with write_file works in a container without network."""
    env = shared.env
    assert inspect(env)["HostConfig"]["NetworkMode"] == "none"
    wheel = build_wheel(tmp_path, "tinypkg", "1.0")
    env.write_file(f"wheels/{wheel.name}", wheel.read_bytes())
    installed = env.install([f"./wheels/{wheel.name}"])
    assert installed.ok, installed
    code = "import tinypkg; print(tinypkg.VERSION)"
    assert env.run(["python3", "-c", code]).check().stdout == "1.0\n"


# --- the container ----------------------------------------------------------------------------


def test_labels_name_and_working_directory(shared: Shared) -> None:
    """The container carries the run id, its owner (pid, start time, host) and its creation
    time as labels, is named after the run, and works in /workspace."""
    env, session = shared.env, shared.manager.session_id
    attrs = inspect(env)
    labels = attrs["Config"]["Labels"]
    assert labels[SESSION_LABEL] == session
    assert labels[PID_LABEL] == str(os.getpid())
    assert labels[STARTED_LABEL] == repr(shared.manager.owner.started)
    assert labels[HOST_LABEL] == socket.gethostname()
    created = datetime.fromisoformat(labels[CREATED_LABEL])
    assert created.tzinfo is not None
    assert timedelta(0) <= datetime.now(timezone.utc) - created < timedelta(hours=1)
    assert env.name.startswith(f"pytest-isolation-{session[:8]}-")
    assert attrs["Config"]["WorkingDir"] == WORKSPACE
    assert attrs["HostConfig"]["Init"] is True
    assert env.run(["pwd"]).check().stdout == f"{WORKSPACE}\n"
    assert env.validate() == []


def test_no_network_by_default(shared: Shared) -> None:
    """Without network=True the container has loopback only and no route anywhere."""
    env = shared.env
    attrs = inspect(env)
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert list(attrs["NetworkSettings"]["Networks"]) == ["none"]
    devices = env.run(["cat", "/proc/net/dev"]).check().stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    routes = env.run(["cat", "/proc/net/route"]).check().stdout.splitlines()
    assert routes[1:] == [], routes


CONNECT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
except OSError as exc:
    print(errno.errorcode.get(exc.errno, repr(exc)))
else:
    print("connected")
"""

FETCH = """
import http.client, sys
connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
connection.request("GET", "/index.html")
sys.stdout.write(connection.getresponse().read().decode())
"""


def test_network_true_joins_a_run_bridge_and_publishes_ports_on_loopback_only(
    client: docker.DockerClient, shared: Shared
) -> None:
    """network=True: the container joins the run's bridge network (labelled with the run,
    removed at the end); ports=[8000] publishes on 127.0.0.1 only, and a server inside
    answers the host there.  Another network=True container reaches the server on the
    bridge; the container without network cannot."""
    token = uuid.uuid4().hex
    with IsolationManager() as manager:
        server = docker_env(manager, network=True, ports=[8000])
        attrs = inspect(server)
        bindings = attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert [binding["HostIp"] for binding in bindings] == ["127.0.0.1"]
        assert server.ports == {"8000/tcp": int(bindings[0]["HostPort"])}
        (network_name,) = attrs["NetworkSettings"]["Networks"]
        assert network_name.startswith(f"pytest-isolation-{manager.session_id[:8]}-")
        network = client.networks.get(network_name)
        labels = network.attrs["Labels"]
        assert labels[SESSION_LABEL] == manager.session_id
        assert labels[PID_LABEL] == str(os.getpid())
        assert CREATED_LABEL in labels
        assert network.attrs["Driver"] == "bridge"

        server.write_file("www/index.html", token)
        start = "cd www && nohup python3 -m http.server 8000 > /tmp/http.log 2>&1 &"
        server.run(["sh", "-c", start]).check()
        port = server.ports["8000/tcp"]
        body = wait_for(lambda: http_get(port, "/index.html"), "the server to answer the host")
        assert body == token.encode()

        address = attrs["NetworkSettings"]["Networks"][network_name]["IPAddress"]
        neighbour = docker_env(manager, network=True)
        assert list(inspect(neighbour)["NetworkSettings"]["Networks"]) == [network_name]
        fetched = neighbour.run(["python3", "-c", FETCH, address, "8000"], timeout=PATIENCE)
        assert fetched.check().stdout == token
        cut_off = shared.env.run(["python3", "-c", CONNECT, address, "8000"], timeout=PATIENCE)
        assert cut_off.check().stdout == "ENETUNREACH\n"
    with pytest.raises(docker.errors.NotFound):
        client.networks.get(network_name)


def test_limits_are_set_in_the_container(manager: IsolationManager) -> None:
    """memory, cpus and pids reach the container's HostConfig and its cgroups."""
    env = docker_env(manager, limits={"memory": "64M", "cpus": 0.5, "pids": 32})
    host = inspect(env)["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["MemorySwap"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 32
    inside = env.run(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
    if inside.ok:  # cgroup v1; v2 names it memory.max
        assert int(inside.stdout) == 64 * 1024 * 1024
    else:
        assert env.run(["cat", "/sys/fs/cgroup/memory.max"]).check().stdout.strip() == str(
            64 * 1024 * 1024
        )


MEMORY_BOMB = """
blocks = []
for _ in range(512):  # 512M at most, should the limit be gone
    blocks.append(b"x" * (1 << 20))
print("survived")
"""


def test_memory_bomb_is_reported_as_the_memory_limit(manager: IsolationManager) -> None:
    """A command past limits.memory is killed and raises ResourceLimitExceeded("memory") with
    its measured peak; smaller commands still run."""
    limit = 64 * 1024 * 1024
    env = docker_env(manager, limits={"memory": "64M"})
    env.run(["python3", "-c", "b = b'x' * (16 << 20)"]).check()
    with pytest.raises(ResourceLimitExceeded) as caught:
        env.run(["python3", "-c", MEMORY_BOMB], timeout=PATIENCE)
    assert caught.value.limit == "memory"
    measured = caught.value.measured
    assert isinstance(measured, int) and limit // 2 < measured <= limit, measured
    assert "out-of-memory killer" in str(caught.value)
    assert env.run(["echo", "still usable"]).check().stdout == "still usable\n"


def test_a_sigkill_after_an_out_of_memory_kill_is_not_blamed_on_memory(
    manager: IsolationManager,
) -> None:
    """Once a command was killed for memory, a later command killed by SIGKILL for another
    reason returns its status 137: it used no memory to speak of."""
    env = docker_env(manager, limits={"memory": "64M"})
    with pytest.raises(ResourceLimitExceeded):
        env.run(["python3", "-c", MEMORY_BOMB], timeout=PATIENCE)
    result = env.run(["sh", "-c", "kill -9 $$"])
    assert result.returncode == 137


FORK_BOMB = """
import os, time
made = 0
try:
    for _ in range(200):  # bounded, should the limit be gone
        if os.fork() == 0:
            quiet = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(quiet, fd)  # the exec's output ends when the parent does
            time.sleep(20)
            os._exit(0)
        made += 1
except OSError as exc:
    error = exc.errno
else:
    error = 0
with open("forked.json", "w") as out:
    out.write('{"made": %d, "errno": %d}' % (made, error))
"""


def test_pids_limit_contains_a_fork_bomb(manager: IsolationManager) -> None:
    """A fork bomb under limits.pids gets fewer processes than the limit, fork fails with
    EAGAIN, the container never holds more than the limit, and the host still forks."""
    env = docker_env(manager, limits={"pids": 32})
    env.write_file("bomb.py", FORK_BOMB)
    env.run(["python3", "bomb.py"], timeout=PATIENCE).check()
    outcome = json.loads(env.read_file("forked.json"))
    assert 0 < outcome["made"] < 32, outcome
    assert outcome["errno"] == 11, outcome  # EAGAIN
    stats = env.container.stats(stream=False)["pids_stats"]
    assert stats.get("limit", 32) == 32
    assert 0 < stats["current"] <= 32, stats
    subprocess.run(["true"], check=True)


def test_security_defaults(shared: Shared) -> None:
    """Every capability dropped but a minimal set, no-new-privileges, not privileged."""
    env = shared.env
    host = inspect(env)["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert sorted(cap.removeprefix("CAP_") for cap in host["CapAdd"]) == sorted(DEFAULT_CAPS)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    status = env.run(["cat", "/proc/self/status"]).check().stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    expected = sum(1 << bit for bit in CAPABILITY_BITS.values())
    assert int(fields["CapEff"].strip(), 16) == expected
    assert int(fields["CapBnd"].strip(), 16) == expected
    assert fields["NoNewPrivs"].strip() == "1"
    denied = env.run(["mknod", "/tmp/null", "c", "1", "3"])  # needs CAP_MKNOD
    assert denied.returncode != 0 and "Operation not permitted" in denied.stderr


def test_read_only_root_with_writable_tmp_and_workspace(manager: IsolationManager) -> None:
    env = docker_env(manager, read_only=True)
    assert inspect(env)["HostConfig"]["ReadonlyRootfs"] is True
    denied = env.run(["touch", "/root-file"])
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    env.run(["sh", "-c", "echo a > /tmp/a && echo b > b && cat /tmp/a b"]).check()
    assert env.run(["cat", f"{WORKSPACE}/b"]).check().stdout == "b\n"


def test_write_file_into_a_read_only_container(manager: IsolationManager) -> None:
    """read_only=True keeps /workspace writable, so write_file and read_file work there."""
    env = docker_env(manager, read_only=True)
    env.write_file("given.txt", "given\n")
    assert env.run(["cat", "given.txt"]).check().stdout == "given\n"
    assert env.read_file("given.txt") == b"given\n"


def test_user_option_runs_commands_as_that_uid(manager: IsolationManager) -> None:
    env = docker_env(manager, user="65534")
    assert inspect(env)["Config"]["User"] == "65534"
    assert env.run(["id", "-u"]).check().stdout == "65534\n"
    assert env.run(["sh", "-c", "id -u"], cwd=".").check().stdout == "65534\n"


def test_user_option_can_write_its_working_directory(manager: IsolationManager) -> None:
    """Commands run as user= can create files in their working directory, /workspace."""
    env = docker_env(manager, user="65534")
    made = env.run(["sh", "-c", "echo mine > mine.txt && cat mine.txt"])
    assert (made.returncode, made.stdout, made.stderr) == (0, "mine\n", "")


def test_volumes_bind_host_folders_read_write_and_read_only(
    manager: IsolationManager, tmp_path: Path
) -> None:
    writable, readable = tmp_path / "rw", tmp_path / "ro"
    writable.mkdir()
    readable.mkdir()
    (readable / "in.txt").write_text("from the host\n")
    env = docker_env(manager, volumes=[f"{writable}:/data/rw", f"{readable}:/data/ro:ro"])
    mounts = {(m["Source"], m["Destination"], m["RW"]) for m in inspect(env)["Mounts"]}
    assert mounts == {(str(writable), "/data/rw", True), (str(readable), "/data/ro", False)}
    assert env.run(["cat", "/data/ro/in.txt"]).check().stdout == "from the host\n"
    env.run(["sh", "-c", "echo from the container > /data/rw/out.txt"]).check()
    assert (writable / "out.txt").read_text() == "from the container\n"
    denied = env.run(["sh", "-c", "echo x > /data/ro/new.txt"])
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert not (readable / "new.txt").exists()


# --- the pool ---------------------------------------------------------------------------------


def ready_in_pool(client: docker.DockerClient, manager: IsolationManager) -> set[str]:
    """Started pool containers of ``manager``'s run not handed to an environment."""
    label: Filters = {"label": f"{SESSION_LABEL}={manager.session_id}", "status": "running"}
    running = {c.name for c in client.containers.list(filters=label, ignore_removed=True)}
    handed = {env.name for env in manager.list() if isinstance(env, DockerEnvironment)}
    return {name for name in running if name and "-pool-" in name} - handed


def test_pool_hands_out_started_containers_once_each_and_removes_leftovers(
    client: docker.DockerClient, manager: IsolationManager
) -> None:
    """pool=2: once the pool is full, an environment is a started container taken from it,
    much faster than starting one; no container is handed out twice, also to concurrent
    creators; when the run ends, the containers left in the pool are removed."""
    unpooled = []
    for _ in range(3):
        started = time.perf_counter()
        plain = docker_env(manager)
        unpooled.append(time.perf_counter() - started)
        assert "-pool-" not in plain.name
        manager.destroy(plain)

    first = docker_env(manager, pool=2)
    assert "-pool-" not in first.name  # the pool starts filling now
    pooled = []
    envs = [first]
    for _ in range(3):
        wait_for(lambda: len(ready_in_pool(client, manager)) >= 2, "the pool to fill")
        time.sleep(0.1)  # the container runs a moment before the pool lists it
        started = time.perf_counter()
        env = docker_env(manager, pool=2)
        pooled.append(time.perf_counter() - started)
        assert "-pool-" in env.name, env.name
        assert env.run(["echo", "pooled"]).check().stdout == "pooled\n"
        envs.append(env)
    assert statistics.median(pooled) * 3 < statistics.median(unpooled), (pooled, unpooled)

    made: list[DockerEnvironment] = []
    errors: list[BaseException] = []

    def create() -> None:
        for _ in range(3):
            try:
                made.append(docker_env(manager, pool=2))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE * 2)
    assert errors == []
    envs += made
    assert len({env.container.id for env in envs}) == len(envs) == 10
    assert len({env.name for env in envs}) == len(envs)

    def refilled() -> set[str] | None:
        ready = ready_in_pool(client, manager)
        return ready if len(ready) == 2 else None

    pool = wait_for(refilled, "the pool to refill")
    assert pool.isdisjoint(env.name for env in envs)
    session = manager.session_id
    manager.close()
    assert of_session(client, session) == []
    assert manager.ledger.records() == []


def test_pool_leftovers_are_removed_at_the_end_of_a_pytest_run(
    pytester: pytest.Pytester, client: docker.DockerClient
) -> None:
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + f"""
import time
import pytest

@pytest.mark.parametrize("n", range(3))
@pytest.mark.isolated("docker", image={TEST_IMAGE!r}, pool=2)
def test_it(isolated_env, n):
    remember(isolated_env)
    assert isolated_env.run(["true"]).ok
    time.sleep(0.8)  # time for the pool to fill
"""
    )
    pytester.runpytest().assert_outcomes(passed=3)
    made = names(pytester)
    assert "-pool-" not in made[0]
    assert all("-pool-" in name for name in made[1:]), made
    assert_gone(client, pytester, 3)


# --- teardown ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        pytest.param(
            "def test_it(isolated_env):\n    remember(isolated_env)\n",
            {"passed": 1},
            id="passing",
        ),
        pytest.param(
            "def test_it(isolated_env):\n    remember(isolated_env)\n    assert False\n",
            {"failed": 1},
            id="failing",
        ),
        pytest.param(
            "@pytest.fixture\n"
            "def broken(isolated_env):\n"
            "    remember(isolated_env)\n"
            "    raise RuntimeError('another fixture broke')\n\n"
            "def test_it(isolated_env, broken):\n    pass\n",
            {"errors": 1},
            id="setup-error-after-env",
        ),
    ],
)
def test_container_and_network_are_removed_whatever_the_outcome(
    pytester: pytest.Pytester, client: docker.DockerClient, body: str, outcome: dict[str, int]
) -> None:
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + "import pytest\n\n"
        + f"pytestmark = pytest.mark.isolated('docker', image={TEST_IMAGE!r}, network=True)\n\n"
        + body
    )
    pytester.runpytest().assert_outcomes(**outcome)
    assert_gone(client, pytester, 1)


def test_container_removed_from_outside_does_not_break_teardown(
    pytester: pytest.Pytester, client: docker.DockerClient
) -> None:
    """`docker rm -f` of a test's container while it runs: validate() says it is gone, and
    teardown goes through without an error."""
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + f"""
import subprocess
import pytest

@pytest.mark.isolated("docker", image={TEST_IMAGE!r})
def test_it(isolated_env):
    remember(isolated_env)
    assert isolated_env.validate() == []
    subprocess.run(["docker", "rm", "-f", isolated_env.name], check=True, capture_output=True)
    assert isolated_env.validate() == [f"container {{isolated_env.name}} is gone"]
"""
    )
    pytester.runpytest().assert_outcomes(passed=1)
    assert_gone(client, pytester, 1)


def test_concurrent_releases_of_one_container_all_succeed(
    client: docker.DockerClient, manager: IsolationManager
) -> None:
    """Two reapers at once (a killed run's watchdog and the next run's sweep, or cleanup):
    release() of a container whose removal is already under way succeeds, as it does for one
    that is gone, so that no reaper hands its record back to the ledger."""
    env = docker_env(manager)
    (record,) = [r for r in manager.ledger.records() if r.kind == "container"]
    engine = manager.engine("docker")
    errors: list[str] = []

    def release() -> None:
        try:
            engine.release(record)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=release) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    assert errors == []
    assert not container_exists(client, env.name)


def test_failing_test_report_lists_the_commands_it_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("docker", image={TEST_IMAGE!r})
        def test_it(isolated_env):
            isolated_env.run(["echo", "hello"])
            isolated_env.run(["sh", "-c", "exit 3"])
            assert False, "the inner test fails"
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- isolation: commands in pytest-isolation-* -*",
            "$ echo hello  -> 0",
            "$ sh -c 'exit 3'  -> 3",
        ]
    )


# --- the daemon, the CLI, xdist, SIGKILL ------------------------------------------------------


# the docker SDK leaves the socket of a failed connect to the garbage collector
@pytest.mark.filterwarnings(r"ignore:unclosed <socket\.socket [^>]*proto=0>:ResourceWarning")
def test_unreachable_daemon_skips_or_fails_when_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated("docker", image={TEST_IMAGE!r})
        def test_it(isolated_env):
            pass
        """
    )
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    try:
        skipped = pytester.runpytest("-rs")
        required = pytester.runpytest("--isolation-require=docker")
    finally:
        gc.collect()  # the failed connects' sockets, while their warning is ignored
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(
        [
            "*isolation engine 'docker' is unavailable: daemon not reachable at "
            "unix:///nonexistent.sock: *; start it (dockerd, or systemctl start docker) "
            "or set DOCKER_HOST*"
        ]
    )
    required.assert_outcomes(errors=1)
    required.stdout.fnmatch_lines(
        [
            "*isolation engine 'docker' is unavailable: daemon not reachable at "
            "unix:///nonexistent.sock*(required by --isolation-require*"
        ]
    )


def test_doctor_shows_docker_available(client: docker.DockerClient) -> None:
    doctor = cli("doctor")
    assert doctor.returncode == 0, doctor.stderr
    version = client.version()["Version"]
    assert f"[ok] docker: available (daemon {version} at " in doctor.stdout


def test_xdist_workers_run_docker_tests_and_leave_nothing(
    pytester: pytest.Pytester, client: docker.DockerClient
) -> None:
    pytester.makeconftest(NOTE_SESSION_ID)
    pytester.makepyfile(
        REMEMBER
        + f"""
import pytest

@pytest.mark.parametrize("n", range(3))
@pytest.mark.isolated("docker", image={TEST_IMAGE!r})
def test_plain(isolated_env, n):
    remember(isolated_env)
    assert isolated_env.run(["echo", str(n)]).check().stdout == f"{{n}}\\n"

@pytest.mark.parametrize("n", range(3))
@pytest.mark.isolated("docker", image={TEST_IMAGE!r}, network=True)
def test_networked(isolated_env, n):
    remember(isolated_env)
    assert isolated_env.run(["true"]).ok
"""
    )
    result = pytester.runpytest("-n", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*6 environment(s) (docker: 6)*"])
    assert_gone(client, pytester, 6)


SLEEPING = f"""
import time
import pytest

@pytest.mark.isolated("docker", image={TEST_IMAGE!r})
def test_it(isolated_env):
    remember(isolated_env)
    time.sleep(120)
"""


@contextlib.contextmanager
def killed_run(
    pytester: pytest.Pytester, client: docker.DockerClient, *, reaped_after: float = 0.0
) -> Iterator[str]:
    """Start ``python -m pytest`` on SLEEPING, SIGKILL it once its container runs, reap it
    ``reaped_after`` seconds later (until then it is a zombie, as under a busy parent), and
    give the container's name; whatever happens, the container is gone after the block."""
    pytester.makepyfile(REMEMBER + SLEEPING)
    name = ""
    try:
        with (pytester.path / "output.txt").open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
                cwd=pytester.path,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            name = wait_for(lambda: next(iter(names(pytester)), None), "the inner test")
            assert client.containers.get(name).labels[PID_LABEL] == str(process.pid)
        finally:
            process.kill()
            time.sleep(reaped_after)
            process.wait(timeout=PATIENCE)
        yield name
    finally:
        if name:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(name).remove(force=True)


def test_sigkill_leaves_a_labelled_container_that_cleanup_removes(
    pytester: pytest.Pytester,
    client: docker.DockerClient,
    isolation_state: Ledger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pytest run killed with SIGKILL (its watchdog too, as by the OOM killer taking both)
    leaves its running container, labelled with its run and pid; `pytest-isolation cleanup`
    (same state directory) removes it."""
    monkeypatch.setenv("PYTEST_ISOLATION_WATCHDOG", "0")
    with killed_run(pytester, client) as name:
        container = client.containers.get(name)
        assert container.status == "running"
        (record,) = isolation_state.records()
        assert (record.kind, record.identifier) == ("container", name)
        labels = container.labels
        assert labels[SESSION_LABEL] == record.owner.session
        assert labels[PID_LABEL] == str(record.owner.pid)
        assert labels[STARTED_LABEL] == repr(record.owner.started)
        assert labels[HOST_LABEL] == socket.gethostname()
        assert CREATED_LABEL in labels

        cleanup = cli("cleanup")
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        assert f"removed container {name}" in cleanup.stdout
        assert not container_exists(client, name)
        assert isolation_state.records() == []


def test_sigkill_with_the_watchdog_removes_the_container_at_once(
    pytester: pytest.Pytester, client: docker.DockerClient, isolation_state: Ledger
) -> None:
    """With its watchdog alive, a run killed with SIGKILL has its container removed within
    seconds, and its ledger record with it, also when the run's parent reaps the killed
    process a moment late (a zombie meanwhile, which has ended all the same)."""
    with killed_run(pytester, client, reaped_after=1.0) as name:
        wait_for(lambda: not container_exists(client, name), "the watchdog to remove it", 15)
        wait_for(lambda: isolation_state.records() == [], "the ledger to be empty", 5)
