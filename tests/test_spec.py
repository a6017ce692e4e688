"""Parsing and validation of what users write: sizes, durations, limits, settings, specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_isolation import InvalidSpec, Limits
from pytest_isolation.engines.basic import BasicEngine
from pytest_isolation.engines.virtualenv import VirtualenvEngine
from pytest_isolation.spec import (
    Layer,
    Settings,
    parse_bool,
    parse_duration,
    parse_size,
    resolve_spec,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256M", 256 * 1024**2),
        ("256m", 256 * 1024**2),
        ("1.5G", int(1.5 * 1024**3)),
        ("512KiB", 512 * 1024),
        ("100MB", 100 * 1024**2),
        ("4096", 4096),
        (4096, 4096),
        ("1T", 1024**4),
    ],
)
def test_sizes_parse_with_binary_units(text: object, expected: int) -> None:
    """Sizes accept bytes, K/M/G/T (binary) with optional B/iB suffixes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "M", "-1M", "0", 0, True, None, "1.2.3G", [1]])
def test_bad_sizes_say_what_is_expected(text: object) -> None:
    """A malformed or non-positive size is rejected with a message that shows the format."""
    with pytest.raises(ValueError, match=r"size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", 30.0),
        (30, 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        (0.5, 0.5),
    ],
)
def test_durations_parse(text: object, expected: float) -> None:
    """Durations accept seconds and s/m/h/d/ms suffixes."""
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["soon", "-5", "0s", 0, "5 parsecs", False])
def test_bad_durations_are_rejected(text: object) -> None:
    """A malformed or non-positive duration is rejected."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("word", "value"), [("yes", True), ("Off", False), ("1", True), (False, False)]
)
def test_booleans_from_words(word: object, value: bool) -> None:
    """Booleans accept the usual words."""
    assert parse_bool(word) is value


def test_bool_rejects_other_words() -> None:
    """A word that is not a boolean is an error, not False."""
    with pytest.raises(ValueError, match="true or false"):
        parse_bool("maybe")


def test_limits_parse_every_field() -> None:
    """A limits mapping becomes typed values."""
    limits = Limits.parse(
        {
            "memory": "256M",
            "cpus": "0.5",
            "pids": 64,
            "timeout": "2m",
            "disk": "1G",
            "network": "false",
        }
    )
    assert limits == Limits(
        memory=256 * 1024**2, cpus=0.5, pids=64, timeout=120.0, disk=1024**3, network=False
    )
    assert limits.requested()["pids"] == 64


def test_unknown_limit_names_the_allowed_ones() -> None:
    """An unknown limit key lists the allowed keys and where it came from."""
    with pytest.raises(InvalidSpec, match=r"unknown limit 'memroy'.*memory, cpus") as info:
        Limits.parse({"memroy": "1G"}, source="marker on t.py::test_x")
    assert "marker on t.py::test_x" in str(info.value)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"memory": "12XB"}, "limits.memory"),
        ({"pids": -3}, "limits.pids"),
        ({"cpus": "lots"}, "limits.cpus"),
        ({"pids": 2.5}, "limits.pids"),
        ("256M", "mapping"),
    ],
)
def test_bad_limit_values_name_the_limit(limits: object, message: str) -> None:
    """A bad limit value names which limit was wrong."""
    with pytest.raises(InvalidSpec, match=message):
        Limits.parse(limits, source="here")


def test_spec_takes_engine_defaults_and_sources(tmp_path: Path) -> None:
    """Resolution fills engine defaults and records where each given option came from."""
    spec = resolve_spec(
        VirtualenvEngine,
        {"packages": "attrs", "scope": "module"},
        where="marker on t.py::test_a",
        base_dir=tmp_path,
    )
    assert spec.engine == "virtualenv"
    assert spec.scope == "module"
    assert spec.options["packages"] == ("attrs",)
    assert spec.options["creator"] == "auto"
    assert spec.sources["packages"] == "marker on t.py::test_a"


def test_relative_paths_resolve_from_the_source_directory(tmp_path: Path) -> None:
    """A relative requirements path is taken from the directory of the marker's file."""
    spec = resolve_spec(
        VirtualenvEngine, {"requirements": "reqs.txt"}, where="marker", base_dir=tmp_path
    )
    assert spec.options["requirements"] == str(tmp_path / "reqs.txt")


def test_unknown_option_lists_allowed_options(tmp_path: Path) -> None:
    """An option the engine does not take is named, with the allowed ones."""
    with pytest.raises(InvalidSpec) as info:
        resolve_spec(
            BasicEngine, {"packages": ["x"]}, where="marker on t.py::test_b", base_dir=tmp_path
        )
    message = str(info.value)
    assert "engine 'basic' does not accept option 'packages'" in message
    assert "inherit_env" in message and "scope" in message
    assert "marker on t.py::test_b" in message
    assert info.value.option == "packages"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"scope": "class"}, "expected one of function, module, session"),
        ({"keep": "sometimes"}, "expected one of none, failed, all"),
        ({"env": {"A": 1}}, "mapping of strings"),
        ({"network": "maybe"}, "true or false"),
    ],
)
def test_wrong_option_values_say_what_is_allowed(
    tmp_path: Path, options: dict[str, object], fragment: str
) -> None:
    """A wrong type or choice names the option and the allowed values."""
    with pytest.raises(InvalidSpec, match=fragment):
        resolve_spec(BasicEngine, options, where="marker", base_dir=tmp_path)


def test_limits_the_engine_cannot_enforce_are_refused(tmp_path: Path) -> None:
    """basic cannot limit memory: saying so beats ignoring the limit silently."""
    with pytest.raises(InvalidSpec, match=r"cannot enforce memory=.*enforces timeout"):
        resolve_spec(BasicEngine, {"limits": {"memory": "1G"}}, where="m", base_dir=tmp_path)
    with pytest.raises(InvalidSpec, match="network=False"):
        resolve_spec(BasicEngine, {"network": False}, where="m", base_dir=tmp_path)


def test_network_true_and_timeout_suit_a_local_engine(tmp_path: Path) -> None:
    """Sharing the host network needs no enforcement; timeout is enforced by every engine."""
    spec = resolve_spec(
        BasicEngine, {"network": True, "limits": {"timeout": "5s"}}, where="m", base_dir=tmp_path
    )
    assert spec.limits == Limits(timeout=5.0, network=True)


def test_network_option_and_limit_must_agree(tmp_path: Path) -> None:
    """network= and limits['network'] cannot contradict each other."""
    with pytest.raises(InvalidSpec, match="disagree"):
        resolve_spec(
            BasicEngine,
            {"network": True, "limits": {"network": False}},
            where="m",
            base_dir=tmp_path,
        )


def test_spec_key_identifies_equivalent_specs(tmp_path: Path) -> None:
    """Equal options give equal keys; any difference changes the key."""
    one = resolve_spec(VirtualenvEngine, {"packages": ["a", "b"]}, where="x", base_dir=tmp_path)
    two = resolve_spec(VirtualenvEngine, {"packages": ["a", "b"]}, where="y", base_dir=tmp_path)
    three = resolve_spec(VirtualenvEngine, {"packages": ["a"]}, where="x", base_dir=tmp_path)
    assert one.key == two.key
    assert one.key != three.key
    assert hash(one.key)


def test_settings_take_the_first_layer_that_sets_a_value(tmp_path: Path) -> None:
    """CLI beats environment beats ini, per setting."""
    settings = Settings.resolve(
        [
            Layer("the command line", {"engine": "virtualenv"}, tmp_path),
            Layer("the environment", {"engine": "basic", "keep": "failed"}, tmp_path),
            Layer(
                "tox.ini",
                {"keep": "all", "keep_ttl": "1h", "require": "basic, virtualenv"},
                tmp_path,
            ),
        ]
    )
    assert settings.engine.value == "virtualenv"
    assert settings.engine.source == "the command line"
    assert settings.keep.value == "failed"
    assert settings.keep_ttl.value == 3600.0
    assert settings.require.value == frozenset({"basic", "virtualenv"})
    assert settings.requires("virtualenv")
    assert not settings.requires("docker")


def test_require_all_means_every_engine(tmp_path: Path) -> None:
    """'all' in the require list makes every engine required."""
    settings = Settings.resolve([Layer("env", {"require": "all"}, tmp_path)])
    assert settings.requires("docker")


def test_bad_settings_name_their_source(tmp_path: Path) -> None:
    """A bad keep policy names the option it came from."""
    layer = Layer(
        "the environment", {"keep": "forever"}, tmp_path, {"keep": "PYTEST_ISOLATION_KEEP"}
    )
    with pytest.raises(InvalidSpec, match=r"keep policy 'forever'.*PYTEST_ISOLATION_KEEP"):
        Settings.resolve([layer])


def test_engine_options_merge_per_option_across_layers(tmp_path: Path) -> None:
    """ENGINE.OPTION=VALUE defaults (lists in YAML); a higher layer wins per option."""
    settings = Settings.resolve(
        [
            Layer("cli", {"options": ["virtualenv.python=3.12"]}, tmp_path),
            Layer(
                "ini",
                {
                    "options": [
                        "virtualenv.python=3.10",
                        "virtualenv.packages=[a, b]",
                        "virtualenv.offline=true",
                    ]
                },
                tmp_path,
            ),
        ]
    )
    options = settings.options["virtualenv"]
    assert options["python"].value == "3.12"
    assert options["python"].source == "cli"
    assert options["packages"].value == ["a", "b"]
    assert options["offline"].value == "true"
    spec = resolve_spec(
        VirtualenvEngine, {"offline": False}, where="marker", base_dir=tmp_path, settings=settings
    )
    assert spec.options["offline"] is False  # the marker wins
    assert spec.options["packages"] == ("a", "b")


def test_malformed_engine_option_is_rejected(tmp_path: Path) -> None:
    """An option default without ENGINE. or = is refused with the expected form."""
    with pytest.raises(InvalidSpec, match=r"ENGINE.OPTION=VALUE"):
        Settings.resolve([Layer("cli", {"options": ["python=3.12"]}, tmp_path)])
