"""Everything a user can write, parsed and validated into frozen objects.

Settings come from four places with one precedence order, highest first:
marker arguments, the command line, environment variables, ini/pyproject
keys, then built-in defaults.  Each value remembers where it came from so that
an error can name the place to fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, get_args

from .errors import InvalidSpec

if TYPE_CHECKING:
    from .engines.base import Engine

Scope = Literal["function", "module", "session"]
KeepPolicy = Literal["none", "failed", "all"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEEP_POLICIES: tuple[KeepPolicy, ...] = get_args(KeepPolicy)
DEFAULT_ENGINE = "basic"
DEFAULT_KEEP_TTL = 24 * 3600.0

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|[smhd]?)\s*$", re.IGNORECASE)


# --- scalar parsers ---------------------------------------------------------------------------


def parse_size(value: object) -> int:
    """Bytes from a number or a string such as ``"256M"``, ``"1.5G"`` or ``"512KiB"``.

    Units are binary (K = 1024), as in Docker and cgroup files.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a size; write bytes as a number or a string like "
                "'256M', '1.5G' or '512K' (units K, M, G, T)"
            )
        number = float(match[1]) * _SIZE_UNITS[match[2].upper()]
    else:
        raise ValueError(f"expected a size such as '256M', got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return int(number)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"5m"``, ``"1h"`` or ``"2d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write seconds as a number or a string "
                "like '30s', '5m', '1h' or '2d'"
            )
        unit = match[2].lower()
        seconds = float(match[1]) * (0.001 if unit == "ms" else _DURATION_UNITS[unit])
    else:
        raise ValueError(f"expected a duration such as '30s', got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def parse_bool(value: object) -> bool:
    """A boolean from a bool or a word: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in {"1", "true", "yes", "on"}:
            return True
        if word in {"0", "false", "no", "off"}:
            return False
    raise ValueError(f"expected true or false, got {value!r}")


# --- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Resource limits for an environment; ``None`` means "not limited" (or, for
    ``network``, the engine's default).

    ``memory`` and ``disk`` are bytes, ``cpus`` a number of CPUs, ``pids`` the
    maximum number of processes, ``timeout`` the seconds any one command may run,
    ``io_weight`` a proportional share of block I/O from 100 to 1000 (the kernel's
    default is 100).
    """

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    timeout: float | None = None
    disk: int | None = None
    network: bool | None = None
    io_weight: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def parse(cls, value: object, *, source: str = "Limits") -> Limits:
        """Validate a mapping such as ``{"memory": "256M", "pids": 64}``."""
        if value is None:
            return cls()
        if isinstance(value, Limits):
            return value
        if not isinstance(value, Mapping):
            raise InvalidSpec(
                f"limits must be a mapping like {{'memory': '256M'}}, got {value!r}",
                source=source,
                option="limits",
            )
        unknown = sorted(set(map(str, value)) - set(cls.names()))
        if unknown:
            raise InvalidSpec(
                f"unknown limit {', '.join(map(repr, unknown))}; "
                f"allowed limits: {', '.join(cls.names())}",
                source=source,
                option="limits",
            )
        parsers: dict[str, Callable[[object], object]] = {
            "memory": parse_size,
            "disk": parse_size,
            "timeout": parse_duration,
            "cpus": _parse_cpus,
            "pids": _parse_pids,
            "network": parse_bool,
            "io_weight": _parse_io_weight,
        }
        parsed: dict[str, Any] = {}
        for name, raw in value.items():
            if raw is None:
                continue
            try:
                parsed[name] = parsers[name](raw)
            except ValueError as exc:
                raise InvalidSpec(f"limits.{name}: {exc}", source=source, option="limits") from None
        return cls(**parsed)

    def requested(self) -> dict[str, object]:
        """The limits that are set, by name."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def _parse_cpus(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number of CPUs such as 0.5 or 2, got {value!r}")
    try:
        cpus = float(value)
    except ValueError:
        raise ValueError(f"expected a number of CPUs such as 0.5 or 2, got {value!r}") from None
    if not math.isfinite(cpus) or cpus <= 0:
        raise ValueError(f"cpus must be positive, got {value!r}")
    return cpus


def _parse_pids(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number of processes, got {value!r}")
    try:
        pids = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number of processes, got {value!r}") from None
    if pids <= 0:
        raise ValueError(f"pids must be positive, got {value!r}")
    return pids


IO_WEIGHTS = range(100, 1001)


def _parse_io_weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number from 100 to 1000, got {value!r}")
    try:
        weight = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number from 100 to 1000, got {value!r}") from None
    if weight not in IO_WEIGHTS:
        raise ValueError(f"io_weight must be from 100 to 1000, got {value!r}")
    return weight


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option an engine accepts in the marker (``@pytest.mark.isolated(name=...)``).

    ``convert`` turns a raw value into the stored value or raises ``ValueError``
    saying what was expected; ``base_dir`` is where relative paths point.
    """

    name: str
    help: str
    convert: Callable[[object, Path], object]
    default: object = None


def string(value: object, base_dir: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def boolean(value: object, base_dir: Path) -> bool:
    return parse_bool(value)


def string_list(value: object, base_dir: Path) -> tuple[str, ...]:
    """A list of strings; a single string counts as a list of one."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def path(value: object, base_dir: Path) -> str:
    """A filesystem path; relative paths are taken from the directory of the setting's source."""
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError(f"expected a path, got {value!r}")
    return str((base_dir / Path(value).expanduser()).resolve())


def path_or_url_list(value: object, base_dir: Path) -> tuple[str, ...]:
    """Paths or URLs (``find_links``); relative paths are resolved like :func:`path`."""
    items = string_list(value, base_dir)
    return tuple(v if "://" in v else path(v, base_dir) for v in items)


def string_mapping(value: object, base_dir: Path) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"expected a mapping of strings to strings, got {value!r}")
    return MappingProxyType(dict(value))


def choice(*allowed: str) -> Callable[[object, Path], object]:
    def convert(value: object, base_dir: Path) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return convert


COMMON_OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "scope": Option(
            "scope",
            "function, module or session: how long the environment lives",
            choice(*SCOPES),
            "function",
        ),
        "keep": Option(
            "keep", "none, failed or all: keep environments for debugging", choice(*KEEP_POLICIES)
        ),
        "keep_ttl": Option(
            "keep_ttl",
            "how long a kept environment survives before a sweep removes it (e.g. '2h')",
            lambda v, _: parse_duration(v),
        ),
        "limits": Option(
            "limits", "resource limits, e.g. {'memory': '256M', 'timeout': 30}", lambda v, _: v
        ),
        "network": Option("network", "False cuts the environment off the network", boolean),
        "env": Option(
            "env",
            "environment variables set for every command",
            string_mapping,
            MappingProxyType({}),
        ),
    }
)


# --- settings from the command line, environment and ini ----------------------------------------


@dataclass(frozen=True)
class Sourced(Generic[T]):
    """A value and the place it came from, for error messages."""

    value: T
    source: str
    base_dir: Path = field(default_factory=Path.cwd)


@dataclass(frozen=True)
class Layer:
    """The raw settings of one source (the CLI, the environment, an ini file)."""

    source: str
    values: Mapping[str, object]
    base_dir: Path = field(default_factory=Path.cwd)
    names: Mapping[str, str] = field(default_factory=dict)

    def describe(self, key: str) -> str:
        return f"{self.names.get(key, key)} in {self.source}" if self.names else self.source


@dataclass(frozen=True)
class Settings:
    """Run-wide settings resolved once from the CLI, the environment and ini files."""

    engine: Sourced[str] = Sourced(DEFAULT_ENGINE, "the default")
    keep: Sourced[KeepPolicy] = Sourced("none", "the default")
    keep_ttl: Sourced[float] = Sourced(DEFAULT_KEEP_TTL, "the default")
    require: Sourced[frozenset[str]] = Sourced(frozenset(), "the default")
    options: Mapping[str, Mapping[str, Sourced[object]]] = field(default_factory=dict)
    durations: int = 5
    inside: bool = False
    recreate: bool = False

    @classmethod
    def resolve(cls, layers: Sequence[Layer]) -> Settings:
        """Take each setting from the first layer (highest precedence first) that sets it."""

        def first(key: str) -> tuple[object, str, Path] | None:
            for layer in layers:
                raw = layer.values.get(key)
                if raw not in (None, "", [], ()):
                    return raw, layer.describe(key), layer.base_dir
            return None

        kwargs: dict[str, Any] = {}
        if found := first("engine"):
            raw, source, base = found
            if not isinstance(raw, str) or not raw.strip():
                raise InvalidSpec(f"expected an engine name, got {raw!r}", source=source)
            kwargs["engine"] = Sourced(raw.strip(), source, base)
        if found := first("keep"):
            raw, source, base = found
            if raw not in KEEP_POLICIES:
                raise InvalidSpec(
                    f"invalid keep policy {raw!r}; expected one of {', '.join(KEEP_POLICIES)}",
                    source=source,
                )
            kwargs["keep"] = Sourced(raw, source, base)
        if found := first("keep_ttl"):
            raw, source, base = found
            try:
                kwargs["keep_ttl"] = Sourced(parse_duration(raw), source, base)
            except ValueError as exc:
                raise InvalidSpec(f"invalid keep TTL: {exc}", source=source) from None
        if found := first("require"):
            raw, source, base = found
            names = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            kwargs["require"] = Sourced(
                frozenset(n.strip() for item in names for n in str(item).split(",") if n.strip()),
                source,
                base,
            )
        if found := first("durations"):
            raw, source, _ = found
            try:
                kwargs["durations"] = int(cast("Any", raw))
            except (TypeError, ValueError):
                raise InvalidSpec(f"expected a number, got {raw!r}", source=source) from None
        for flag in ("inside", "recreate"):
            if found := first(flag):
                raw, source, _ = found
                try:
                    kwargs[flag] = parse_bool(raw)
                except ValueError as exc:
                    raise InvalidSpec(str(exc), source=source) from None
        kwargs["options"] = _layer_options(layers)
        return cls(**kwargs)

    def requires(self, engine: str) -> bool:
        """Whether an unavailable ``engine`` must fail instead of skip."""
        return engine in self.require.value or "all" in self.require.value


def _layer_options(layers: Sequence[Layer]) -> Mapping[str, Mapping[str, Sourced[object]]]:
    """Merge ``ENGINE.NAME=VALUE`` options; a higher layer wins per option."""
    import yaml

    merged: dict[str, dict[str, Sourced[object]]] = {}
    for layer in reversed(layers):
        raw = layer.values.get("options") or ()
        items = [raw] if isinstance(raw, str) else list(cast("Iterable[str]", raw))
        for item in items:
            key, sep, text = str(item).partition("=")
            engine, dot, name = key.strip().partition(".")
            if not sep or not dot or not engine or not name:
                raise InvalidSpec(
                    f"expected ENGINE.OPTION=VALUE (e.g. virtualenv.python=3.12), got {item!r}",
                    source=layer.describe("options"),
                )
            text = text.strip()
            try:
                # Only lists and mappings are parsed: a scalar stays text, so that
                # python=3.10 is not the number 3.1; converters parse words and numbers.
                value = yaml.safe_load(text) if text[:1] in ("[", "{") else text
            except yaml.YAMLError as exc:
                raise InvalidSpec(
                    f"cannot parse the value of {key!r}: {exc}", source=layer.describe("options")
                ) from None
            merged.setdefault(engine, {})[name] = Sourced(
                value, layer.describe("options"), layer.base_dir
            )
    return {engine: MappingProxyType(opts) for engine, opts in merged.items()}


# --- the environment spec ---------------------------------------------------------------------


@dataclass(frozen=True)
class EnvSpec:
    """Everything an engine needs to create one environment; immutable and hashable by ``key``.

    ``options`` holds the engine's own options after validation; ``sources``
    maps each option that did not take its default to where it came from.
    """

    engine: str
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits = Limits()
    scope: Scope = "function"
    keep: KeepPolicy = "none"
    keep_ttl: float | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @functools.cached_property
    def key(self) -> str:
        """A canonical text form: two specs with the same key make equivalent environments
        (made once per spec: the spec is immutable)."""
        return json.dumps(
            {
                "engine": self.engine,
                "options": _jsonable(self.options),
                "limits": self.limits.requested(),
                "scope": self.scope,
                "env": dict(self.env),
            },
            sort_keys=True,
        )

    def describe(self) -> str:
        """A short one-line summary for reports."""
        parts = [f"{k}={_jsonable(v)!r}" for k, v in sorted(self.options.items())]
        parts += [f"{k}={v!r}" for k, v in self.limits.requested().items()]
        return f"{self.engine}({', '.join(parts)})"


def _jsonable(value: object) -> object:
    """``value`` as JSON can carry it: options parsed into dataclasses (a sandbox's
    ``Mount``) become mappings, paths strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def resolve_spec(
    schema: type[Engine],
    marker_options: Mapping[str, object],
    *,
    where: str,
    base_dir: Path,
    settings: Settings | None = None,
    complete: bool = True,
) -> EnvSpec:
    """Build the :class:`EnvSpec` for ``schema`` from marker options layered over ``settings``.

    ``complete=False`` checks the options alone, not whether they suffice for an
    environment (run-wide defaults need not name an image; the marker may).

    Raises :class:`InvalidSpec` naming ``where`` (or the settings' source), the
    option, what was wrong and the allowed values.
    """
    settings = settings or Settings()
    layered: dict[str, Sourced[object]] = dict(settings.options.get(schema.name, {}))
    for name, value in marker_options.items():
        layered[name] = Sourced(value, where, base_dir)
    if "keep" not in layered:
        layered["keep"] = cast("Sourced[object]", settings.keep)

    allowed = {**COMMON_OPTIONS, **schema.options}
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, item in layered.items():
        option = allowed.get(name)
        if option is None:
            raise InvalidSpec(
                f"engine {schema.name!r} does not accept option {name!r}; "
                f"allowed options: {', '.join(sorted(allowed))}",
                source=item.source,
                option=name,
            )
        try:
            values[name] = option.convert(item.value, item.base_dir)
        except ValueError as exc:
            raise InvalidSpec(
                f"invalid value for option {name!r} of engine {schema.name!r}: {exc}",
                source=item.source,
                option=name,
            ) from None
        sources[name] = item.source

    limits_source = sources.get("limits", where)
    limits = Limits.parse(values.pop("limits", None), source=limits_source)
    if "network" in values:
        network = cast("bool", values.pop("network"))
        if limits.network is not None and limits.network != network:
            raise InvalidSpec(
                "network= and limits['network'] disagree; set only one of them",
                source=where,
                option="network",
            )
        limits = dataclasses.replace(limits, network=network)
    # Sharing the host's network needs no enforcement, so network=True suits every engine.
    wanted = {k for k, v in limits.requested().items() if not (k == "network" and v is True)}
    unsupported = sorted(wanted - schema.supported_limits)
    if unsupported:
        raise InvalidSpec(
            f"engine {schema.name!r} cannot enforce "
            f"{', '.join(f'{n}={limits.requested()[n]!r}' for n in unsupported)}; it enforces "
            f"{', '.join(sorted(schema.supported_limits)) or 'no limits'} "
            "(the sandbox and docker engines enforce memory, cpus, pids and network)",
            source=limits_source,
            option="limits",
        )

    scope = cast("Scope", values.pop("scope", "function"))
    keep = cast("KeepPolicy", values.pop("keep", "none"))
    keep_ttl = cast("float | None", values.pop("keep_ttl", None))
    env = cast("Mapping[str, str]", values.pop("env", MappingProxyType({})))
    for name, option in schema.options.items():
        if name not in values and option.default is not None:
            values[name] = option.default
    spec = EnvSpec(
        engine=schema.name,
        options=MappingProxyType(values),
        limits=limits,
        scope=scope,
        keep=keep,
        keep_ttl=keep_ttl,
        env=env,
        sources=MappingProxyType(sources),
    )
    if complete:
        try:
            schema.validate_spec(spec)
        except InvalidSpec as exc:
            raise InvalidSpec(str(exc), source=where) from None
    return spec
