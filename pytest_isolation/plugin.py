"""pytest hooks of pytest-isolation: options, marker, fixtures.  No engine logic here.

The per-run state lives in one :class:`~pytest_isolation.session.IsolationSession`
registered in ``pytest_configure`` and kept in ``config.stash``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .engines.base import IsolatedEnvironment
    from .manager import IsolationManager
    from .session import IsolationSession
    from .spec import Layer, Settings

SESSION_KEY: pytest.StashKey[IsolationSession] = pytest.StashKey()

#: Setting name -> (command line option dest, ini key, environment variable).
SETTINGS = {
    "engine": ("isolation", "isolation", "PYTEST_ISOLATION"),
    "keep": ("isolation_keep", "isolation_keep", "PYTEST_ISOLATION_KEEP"),
    "keep_ttl": ("isolation_keep_ttl", "isolation_keep_ttl", "PYTEST_ISOLATION_KEEP_TTL"),
    "require": ("isolation_require", "isolation_require", "PYTEST_ISOLATION_REQUIRE"),
    "options": ("isolation_options", "isolation_options", "PYTEST_ISOLATION_OPTIONS"),
    "durations": ("isolation_durations", "isolation_durations", "PYTEST_ISOLATION_DURATIONS"),
    "inside": ("isolation_inside", "isolation_inside", "PYTEST_ISOLATION_INSIDE"),
    "recreate": ("isolation_recreate", "isolation_recreate", "PYTEST_ISOLATION_RECREATE"),
}

MARKER = (
    "isolated(engine=None, **options): run the test with an isolated environment "
    "(the isolated_env fixture). engine: basic, virtualenv or a plugin's engine; options: "
    "scope='function'|'module'|'session', keep='none'|'failed'|'all', limits={...}, "
    "network=bool, env={...} and the engine's own (see `pytest-isolation doctor`)."
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolation", "isolated environments (pytest-isolation)")
    group.addoption(
        "--isolation",
        metavar="ENGINE",
        dest="isolation",
        default=None,
        help="engine for tests that ask for isolation (marker or isolated_env) without naming "
        "one: basic (default), virtualenv, or a plugin's. env: PYTEST_ISOLATION",
    )
    group.addoption(
        "--isolation-keep",
        metavar="none|failed|all",
        dest="isolation_keep",
        default=None,
        help="keep environments after their tests for debugging: none (default), those of "
        "failed tests, or all; their paths are printed at the end",
    )
    group.addoption(
        "--isolation-keep-ttl",
        metavar="DURATION",
        dest="isolation_keep_ttl",
        default=None,
        help="how long kept environments survive before a later run removes them "
        "(default 1d; e.g. 30m, 12h)",
    )
    group.addoption(
        "--isolation-require",
        metavar="ENGINE[,ENGINE...]",
        dest="isolation_require",
        default=None,
        help="fail, instead of skip, tests whose engine is unavailable here ('all' for every "
        "engine); for CI. env: PYTEST_ISOLATION_REQUIRE",
    )
    group.addoption(
        "--isolation-option",
        metavar="ENGINE.OPTION=VALUE",
        dest="isolation_options",
        action="append",
        default=None,
        help="default for an engine option, e.g. virtualenv.python=3.12 (repeatable; values "
        "are YAML: [a, b], true, 30)",
    )
    group.addoption(
        "--isolation-image",
        metavar="IMAGE",
        dest="isolation_docker_image",
        default=None,
        help="image for the docker engine (the same as --isolation-option docker.image=IMAGE)",
    )
    group.addoption(
        "--isolation-kube-context",
        metavar="CONTEXT",
        dest="isolation_kube_context",
        default=None,
        help="kubeconfig context for the kubernetes engine (the same as --isolation-option "
        "kubernetes.context=CONTEXT)",
    )
    group.addoption(
        "--isolation-inside",
        dest="isolation_inside",
        action="store_const",
        const="true",
        default=None,
        help="run every test's own body inside an environment of the default engine "
        "(sandbox), each in its own. env: PYTEST_ISOLATION_INSIDE",
    )
    group.addoption(
        "--isolation-recreate",
        dest="isolation_recreate",
        action="store_const",
        const="true",
        default=None,
        help="rebuild every cached template this run uses (virtualenv), once, instead of "
        "reusing it. env: PYTEST_ISOLATION_RECREATE",
    )
    group.addoption(
        "--isolation-durations",
        metavar="N",
        dest="isolation_durations",
        default=None,
        help="list the N slowest environment set-ups at the end (default 5, 0 for none)",
    )
    parser.addini("isolation", "default isolation engine (like --isolation)")
    parser.addini("isolation_keep", "keep environments: none, failed or all")
    parser.addini("isolation_keep_ttl", "how long kept environments survive (e.g. 1d)")
    parser.addini("isolation_require", "engines that must be available (comma separated)")
    parser.addini(
        "isolation_options", "engine option defaults, ENGINE.OPTION=VALUE per line", type="linelist"
    )
    parser.addini("isolation_durations", "how many of the slowest set-ups to list")
    parser.addini("isolation_inside", "run every test's body inside its environment (bool)")
    parser.addini("isolation_recreate", "rebuild every cached template the run uses (bool)")
    parser.addini("isolation_docker_image", "image for the docker engine")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    if config.pluginmanager.has_plugin("isolated"):
        raise pytest.UsageError(
            "pytest-isolated (a different plugin, from the PyPI project 'pytest-isolated') is "
            "also installed and claims the same @pytest.mark.isolated marker as "
            "pytest-isolation. Uninstall one of them, or disable it for this run with "
            "-p no:isolated (pytest-isolated) or -p no:isolation (pytest-isolation)."
        )
    from . import engines
    from .errors import InvalidSpec
    from .manager import new_session_id
    from .session import IsolationSession
    from .spec import Settings

    config.pluginmanager.register(engines, "isolation-engines")
    try:
        settings = Settings.resolve(_layers(config))
    except InvalidSpec as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    session_id = workerinput["isolation_session"] if workerinput else new_session_id()
    try:
        session = IsolationSession(config, settings, session_id, worker=workerinput is not None)
        session.validate_settings()
    except InvalidSpec as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "isolation-session")


def _layers(config: pytest.Config) -> list[Layer]:
    from .spec import Layer

    cli = {name: config.getoption(dest) for name, (dest, _, _) in SETTINGS.items()}
    if image := config.getoption("isolation_docker_image"):
        cli["options"] = [*(cli["options"] or []), f"docker.image={image}"]
    if context := config.getoption("isolation_kube_context"):
        cli["options"] = [*(cli["options"] or []), f"kubernetes.context={context}"]
    environ: dict[str, object] = {
        name: os.environ.get(var) for name, (_, _, var) in SETTINGS.items()
    }
    options = os.environ.get("PYTEST_ISOLATION_OPTIONS", "")
    environ["options"] = [item for item in options.split(";") if item.strip()]
    ini = {name: config.getini(key) for name, (_, key, _) in SETTINGS.items()}
    if image := config.getini("isolation_docker_image"):
        ini["options"] = [*ini["options"], f"docker.image={image}"]
    inifile = str(config.inipath) if config.inipath else "the ini file"
    return [
        Layer(
            "the command line",
            cli,
            Path(config.invocation_params.dir),
            {name: "--" + dest.replace("_", "-") for name, (dest, _, _) in SETTINGS.items()},
        ),
        Layer(
            "the environment",
            environ,
            Path(config.invocation_params.dir),
            {name: var for name, (_, _, var) in SETTINGS.items()},
        ),
        Layer(
            inifile,
            ini,
            Path(config.rootpath),
            {name: key for name, (_, key, _) in SETTINGS.items()},
        ),
    ]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """pytest-xdist: every worker joins the controller's run id."""
    config: pytest.Config = node.config  # type: ignore[attr-defined]
    node.workerinput["isolation_session"] = config.stash[SESSION_KEY].manager.session_id  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        del config.stash[SESSION_KEY]
        config.pluginmanager.unregister(session)
        session.close()


@pytest.fixture(scope="session")
def isolation_manager(pytestconfig: pytest.Config) -> IsolationManager:
    """The run's :class:`~pytest_isolation.IsolationManager`."""
    return pytestconfig.stash[SESSION_KEY].manager


@pytest.fixture
def isolated_env(request: pytest.FixtureRequest) -> IsolatedEnvironment:
    """The isolated environment of this test, as the ``isolated`` marker and settings ask.

    Its lifetime follows the marker's ``scope`` option: function (default),
    module or session.
    """
    return request.config.stash[SESSION_KEY].environment_for(request.node)


@pytest.fixture(autouse=True)
def _isolation_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """A test with the ``isolated`` marker gets its environment even if it does not ask."""
    if "isolated_env" not in request.fixturenames and request.node.get_closest_marker("isolated"):
        request.getfixturevalue("isolated_env")


def settings_of(config: pytest.Config) -> Settings:
    """The resolved settings of a run (for plugins)."""
    return config.stash[SESSION_KEY].settings
