"""The operator's TOML configuration, parsed into frozen dataclasses.

Pure: :func:`parse_config` works on the dict that :mod:`tomllib` returns and does no I/O;
:func:`load_config` and :func:`default_config` only read the file first. Every problem is a
:class:`~supervisor.errors.ConfigError` that names the file, the dotted key (``defaults.deadline``,
``policy[1].path``, ``route[0].match.container``) and the reason. Unknown keys are refused
everywhere (a typo must not silently fall back to a default), and nothing invalid is ever
replaced by a default or by zero.

The annotated reference for every key is ``supervisor/default.toml``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast

from .errors import ConfigError
from .policy import Decision, parse_decision

__all__ = [
    "AuditConfig",
    "Config",
    "Defaults",
    "ListenConfig",
    "MetricsConfig",
    "PolicyConfig",
    "Route",
    "RouteMatch",
    "TraceAnnotationConfig",
    "add_policy_files",
    "control_socket_for",
    "default_config",
    "load_config",
    "parse_config",
    "parse_duration",
    "read_toml",
    "validate_config",
    "with_control_socket",
    "with_metrics",
    "with_socket",
]

RouteMode = Literal["enforce", "shadow"]
AuditDecisions = Literal["all", "deny", "none"]

DEFAULT_SOCKET: Final = "/run/seccomp-supervisor/notify.sock"
DEFAULT_CONTROL_SOCKET: Final = "/run/seccomp-supervisor/control.sock"
DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9469"
MAX_DURATION: Final = 3600.0
# sockaddr_un.sun_path is 108 bytes, NUL included.
MAX_SOCKET_PATH: Final = 107
MIN_MESSAGE: Final = 1024
MAX_MESSAGE: Final = 64 * 1024 * 1024
# uid_t is 32 bits and (uid_t)-1 means "no uid".
MAX_UID: Final = 2**32 - 2
# [defaults] rate / rate_burst: far above what one process can answer.
MAX_RATE: Final = 10_000_000

POLICY_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRY_POINT_RE: Final = re.compile(rf"{_IDENT}(?:\.{_IDENT})*(?::{_IDENT}(?:\.{_IDENT})*)?")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """``[listen]``: the notify socket the runtimes connect to, and its limits."""

    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o600
    allowed_uids: tuple[int, ...] = (0,)
    max_handoffs: int = 64
    handoff_timeout: float = 5.0
    max_message: int = 65536
    control_socket: str = DEFAULT_CONTROL_SOCKET
    max_sessions: int = 16384
    max_sessions_per_uid: int = 1024


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: where ``/metrics`` is served. ``listen == ""`` disables it; otherwise
    ``host`` (IPv6 without brackets) and ``port`` are the parsed parts of ``listen``."""

    listen: str = DEFAULT_METRICS_LISTEN
    host: str = "127.0.0.1"
    port: int = 9469

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


@dataclass(frozen=True, slots=True)
class Defaults:
    """``[defaults]``: the chain for containers no route matches, and the fallbacks.

    ``deadline`` is in seconds.
    """

    policies: tuple[str, ...]
    unhandled: Decision
    on_error: Decision
    deadline: float
    max_inflight: int
    # True when the file sets `unhandled` itself: it then wins over the `unhandled` a
    # policy of the chain declares (PolicySet(unhandled=...)). The embedded default
    # config counts as not setting it.
    unhandled_set: bool = False
    # Back-pressure (supervisor/ratelimit.py): notifications per second per container
    # (0 = no limit), how many may be saved up, and the answer when the bucket is empty.
    rate: float = 0.0
    rate_burst: int = 0
    rate_exceeded: Decision = dataclasses.field(
        default_factory=lambda: parse_decision("deny:EAGAIN"))

    @property
    def burst(self) -> int:
        """``rate_burst``, or one second's worth of ``rate`` (at least 1) when it is 0."""
        return self.rate_burst or max(1, math.ceil(self.rate))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """One ``[[policy]]`` entry (``index`` is its position in the array).

    Exactly one of ``path`` (absolute: relative paths were resolved against the config
    file's directory) and ``entry_point`` is set. ``from_command_line`` marks policies added
    with ``serve --policy FILE`` (see :func:`add_policy_files`); errors about them name the
    command line instead of the config file.
    """

    name: str
    path: Path | None
    entry_point: str | None
    options: Mapping[str, Any]
    index: int
    from_command_line: bool = False

    def location(self, config_file: str, field: str) -> tuple[str, str]:
        """``(file, key)`` for a :class:`ConfigError` about ``field`` of this entry, e.g.
        ``("/etc/x.toml", "policy[2].options.limit")``."""
        if self.from_command_line:
            suffix = "" if field in ("path", "") else f" ({field})"
            return "<command line>", f"--policy {self.path}{suffix}"
        return config_file, f"policy[{self.index}].{field}" if field else f"policy[{self.index}]"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """``match`` of a ``[[route]]``. Every condition present must hold (AND); ``None`` / an
    empty mapping means "not tested". Values are :func:`fnmatch.fnmatchcase` globs, but
    ``peer_uid``: the uids (from ``SO_PEERCRED``) of which one must have handed the
    listener over."""

    metadata: str | None = None
    labels: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    container: str | None = None
    annotations: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    container_name: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    peer_uid: tuple[int, ...] | None = None

    @property
    def creator_controlled_only(self) -> bool:
        """True if every condition is on something the container's creator writes
        (metadata, labels, container id and name, pod namespace and name, annotations):
        nothing the kernel
        vouches for."""
        return self.peer_uid is None


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[route]]`` (``index`` is its position in the array)."""

    index: int
    match: RouteMatch
    policies: tuple[str, ...]
    mode: RouteMode = "enforce"


@dataclass(frozen=True, slots=True)
class TraceAnnotationConfig:
    """``[trace_annotation]``: learn mode by the ``io.containers.trace-syscall``
    annotation (off unless ``enabled``; also needs a ``[[policy]]`` named ``learn``),
    for containers whose listener a process of one of the ``peer_uid`` handed over."""

    enabled: bool = False
    peer_uid: tuple[int, ...] = (0,)


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """``[audit]``: which decisions get an audit line; at most ``rate_limit`` lines per
    second per container, system call, decision and policy (0 = no limit), at most
    ``container_bytes`` bytes per second per container (0 = no limit), and at most
    ``max_line`` bytes per line (see supervisor/audit.py)."""

    decisions: AuditDecisions = "deny"
    rate_limit: int = 10
    container_bytes: int = 65536
    max_line: int = 4096


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``file`` is the file it came from (for messages)."""

    file: str
    listen: ListenConfig
    metrics: MetricsConfig
    defaults: Defaults
    policies: tuple[PolicyConfig, ...]
    routes: tuple[Route, ...]
    audit: AuditConfig
    trace_annotation: TraceAnnotationConfig = TraceAnnotationConfig()

    def policy_config(self, name: str) -> PolicyConfig:
        """The ``[[policy]]`` named ``name``. Raises KeyError."""
        for pc in self.policies:
            if pc.name == name:
                return pc
        raise KeyError(name)


# --------------------------------------------------------------------------- entry points


def load_config(path: str | Path) -> Config:
    """Read and parse the TOML file at ``path``.

    Raises ConfigError: key ``(file)`` if it cannot be read, ``(syntax)`` with tomllib's
    message (which has the line and column) if it is not valid TOML, else as
    :func:`parse_config`.
    """
    return parse_config(read_toml(path), str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML document at ``path`` as a dict.

    Raises ConfigError: key ``(file)`` if it cannot be read, ``(syntax)`` with tomllib's
    message (which has the line and column) if it is not UTF-8 TOML.
    """
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(file, "(file)", f"cannot read: {exc.strerror or exc}") from None
    return _parse_toml(raw, file)


def default_config() -> Config:
    """The configuration embedded in the package (``supervisor/default.toml``), used by
    ``serve`` without ``--config``. Raises ConfigError only if the package is broken."""
    resource = importlib.resources.files(__package__ or "supervisor").joinpath("default.toml")
    file = str(resource)
    config = parse_config(_parse_toml(resource.read_bytes(), file), file)
    # It shows every key with its default value; none of them is the operator's choice.
    return dataclasses.replace(
        config, defaults=dataclasses.replace(config.defaults, unhandled_set=False))


def parse_config(data: Mapping[str, Any], file: str) -> Config:
    """Build a :class:`Config` from the dict :func:`tomllib.loads` returned for ``file``.

    Relative policy paths are resolved against the directory of ``file``. Raises
    ConfigError for the first problem found (see :func:`validate_config` for all of them);
    never any other exception, whatever ``data`` holds.
    """
    result = _parse(data, file)
    if result.errors:
        raise result.errors[0]
    assert result.config is not None
    return result.config


def validate_config(data: Mapping[str, Any], file: str) -> tuple[
        list[ConfigError], tuple[PolicyConfig, ...]]:
    """Every problem :func:`parse_config` would find in ``data``, as far as they are
    independent (each section, each ``[[policy]]`` and each ``[[route]]`` is checked on
    its own), and the ``[[policy]]`` entries that are valid by themselves, so that
    ``check`` can still try to load them. Never raises."""
    result = _parse(data, file)
    if result.config is not None:
        return [], result.config.policies
    p = _Parser(file)
    policies: list[PolicyConfig] = []
    raw = data.get("policy", []) if isinstance(data, Mapping) else []
    if isinstance(raw, list):
        names: dict[str, int] = {}
        for i, entry in enumerate(raw):
            with p.collect():
                policies.append(p.policy(i, entry, names))
    return result.errors, tuple(policies)


def parse_duration(value: object, *, file: str, key: str,
                   maximum: float = MAX_DURATION) -> float:
    """A positive duration in seconds, from a number of seconds (``3``, ``0.5``) or a string
    of number+unit parts (``"250ms"``, ``"1.5s"``, ``"1m30s"``; units ``ns us µs ms s m h``).

    Raises ConfigError(file, key, reason) for anything else, for zero or negative values and
    for values above ``maximum`` seconds: a bad duration never becomes 0.
    """
    example = "write e.g. \"2s\", \"250ms\" or \"1m30s\""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(file, key,
                          f"expected a duration string or a number of seconds, "
                          f"got {_describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigError(file, key, f"empty duration; {example}")
        sign = 1
        body = text
        if body[0] in "+-":
            sign = -1 if body[0] == "-" else 1
            body = body[1:]
        if not body:
            raise ConfigError(file, key, f"{value!r} is not a duration; {example}")
        total = Fraction(0)
        pos = 0
        while pos < len(body):
            m = _DURATION_PART_RE.match(body, pos)
            if m is None:
                hint = " (missing unit)" if _NUMBER_RE.fullmatch(body) else ""
                raise ConfigError(file, key, f"{value!r} is not a duration{hint}; {example}")
            total += Fraction(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        seconds = float(sign * total)
    else:
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ConfigError(file, key, f"duration must be finite, got {value!r}")
    if seconds <= 0:
        raise ConfigError(file, key, f"duration must be > 0, got {value!r}")
    if seconds > maximum:
        raise ConfigError(file, key,
                          f"duration must be at most {_format_seconds(maximum)}, got {value!r}")
    return seconds


def add_policy_files(config: Config, paths: Iterable[str | Path]) -> Config:
    """A copy of ``config`` with one ``[[policy]]`` per file (named after the file's stem,
    path made absolute against the current directory, no options) appended to
    ``defaults.policies``: what ``serve --policy FILE`` does. Does not read the files.

    Raises ConfigError (file ``<command line>``) if a stem is not a valid policy name or is
    already the name of another policy.
    """
    policies = list(config.policies)
    chain = list(config.defaults.policies)
    for raw in paths:
        path = Path(raw).absolute()
        name = path.stem
        key = f"--policy {raw}"
        if not POLICY_NAME_RE.fullmatch(name):
            raise ConfigError("<command line>", key,
                              f"the file name gives the policy name {name!r}, which is not "
                              f"made of letters, digits, '_', '.', '-' only")
        for other in policies:
            if other.name == name:
                where = ("the command line" if other.from_command_line
                         else f"{config.file} (policy[{other.index}])")
                raise ConfigError("<command line>", key,
                                  f"policy name {name!r} is already defined in {where}")
        policies.append(PolicyConfig(name=name, path=path, entry_point=None,
                                     options=MappingProxyType({}), index=len(policies),
                                     from_command_line=True))
        chain.append(name)
    return dataclasses.replace(
        config, policies=tuple(policies),
        defaults=dataclasses.replace(config.defaults, policies=tuple(chain)))


def with_socket(config: Config, socket: str) -> Config:
    """A copy of ``config`` listening on ``socket`` (``serve --socket PATH``).

    Raises ConfigError (file ``<command line>``, key ``--socket``) for an unusable path.
    """
    checked = _socket_path("<command line>", "--socket", socket)
    return dataclasses.replace(config, listen=dataclasses.replace(config.listen, socket=checked))


def control_socket_for(socket: str) -> str:
    """The control socket of a daemon given only ``serve --socket SOCKET``: beside it,
    ``NAME.sock`` → ``NAME.control.sock``, any other name gets ``.control`` appended.
    Pure; the length is checked by :func:`with_control_socket`."""
    base = socket[:-len(".sock")] if socket.endswith(".sock") else socket
    return f"{base}.control.sock" if base != socket else f"{socket}.control"


def with_control_socket(config: Config, path: str, *,
                        key: str = "--control-socket") -> Config:
    """A copy of ``config`` with ``path`` as its control socket (``serve
    --control-socket PATH``). Raises ConfigError (file ``<command line>``, ``key``) for
    an unusable path, or one equal to the notify socket."""
    checked = _socket_path("<command line>", key, path)
    if checked == config.listen.socket:
        raise ConfigError("<command line>", key,
                          f"{checked} is the notify socket; the control socket needs "
                          f"its own path")
    return dataclasses.replace(config, listen=dataclasses.replace(
        config.listen, control_socket=checked))


def with_metrics(config: Config, listen: str) -> Config:
    """A copy of ``config`` serving ``/metrics`` on ``listen`` (``HOST:PORT``,
    ``[IPv6]:PORT``), or not at all for ``off`` (``serve --metrics``). Raises ConfigError
    (file ``<command line>``, key ``--metrics``)."""
    if listen in ("off", ""):
        return dataclasses.replace(config, metrics=MetricsConfig(listen="", host="", port=0))
    host, port = _host_port("<command line>", "--metrics", listen)
    return dataclasses.replace(config, metrics=MetricsConfig(listen=listen, host=host,
                                                              port=port))


# --------------------------------------------------------------------------- the parser

_DURATION_UNITS: Final[dict[str, Fraction]] = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),  # U+00B5 MICRO SIGN
    "μs": Fraction(1, 10**6),  # U+03BC GREEK SMALL LETTER MU
    "ms": Fraction(1, 10**3),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
# "ms" is tried before "m", "µs" before "s": alternatives are tried in order.
_DURATION_PART_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_OCTAL_MODE_RE: Final = re.compile(r"(?:0o|0)?([0-7]{1,4})")

_TOP_KEYS: Final = ("listen", "metrics", "defaults", "policy", "route", "audit",
                    "trace_annotation")
_LISTEN_KEYS: Final = ("socket", "socket_mode", "allowed_uids", "max_handoffs",
                       "handoff_timeout", "max_message", "max_sessions",
                       "max_sessions_per_uid", "control_socket")
_METRICS_KEYS: Final = ("listen",)
_DEFAULTS_KEYS: Final = ("policies", "unhandled", "on_error", "deadline", "max_inflight",
                          "rate", "rate_burst", "rate_exceeded")
_POLICY_KEYS: Final = ("name", "path", "entry_point", "options")
_ROUTE_KEYS: Final = ("match", "policies", "mode")
_MATCH_KEYS: Final = ("metadata", "labels", "container", "annotations", "peer_uid",
                      "container_name", "pod_namespace", "pod_name")
_TRACE_KEYS: Final = ("enabled", "peer_uid")
_AUDIT_KEYS: Final = ("decisions", "rate_limit", "container_bytes", "max_line")

_MISSING: Final = object()
T = TypeVar("T")


def _parse_toml(raw: bytes, file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "(syntax)",
                          f"not UTF-8: invalid byte at offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", str(exc)) from None


@dataclass
class _Result:
    config: Config | None
    errors: list[ConfigError]


class _Parser:
    """Parses one document, collecting one ConfigError per independent part."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.base = Path(file).absolute().parent
        self.errors: list[ConfigError] = []

    @contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.errors.append(exc)

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, key, reason)

    # -- generic helpers ------------------------------------------------------------------

    def table(self, key: str, value: object) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a table, got {_describe(value)}")
        return value

    def check_keys(self, key: str, table: Mapping[Any, Any], allowed: Sequence[str]) -> None:
        for name in table:
            if name not in allowed:
                raise self.fail(_join(key, name),
                                f"unknown key (known: {', '.join(allowed)})")

    def get(self, table: Mapping[Any, Any], key: str, name: str, default: T,
            convert: Callable[[str, object], T]) -> T:
        value = table.get(name, _MISSING)
        if value is _MISSING:
            return default
        return convert(_join(key, name), value)

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_describe(value)}")
        return value

    def integer(self, key: str, value: object, *, minimum: int,
                maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_describe(value)}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {value}")
        return value

    def string_list(self, key: str, value: object) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array of strings, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{key}[{i}]", f"expected a string, got {_describe(item)}")
        return cast(list[str], value)

    def glob_table(self, key: str, value: object) -> Mapping[str, str]:
        table = self.table(key, value)
        out: dict[str, str] = {}
        for name, glob in table.items():
            sub = _join(key, name)
            if not isinstance(name, str) or not name:
                raise self.fail(sub, "keys must be non-empty strings")
            out[name] = self.string(sub, glob)
        return MappingProxyType(out)

    def policy_names(self, key: str, value: object) -> tuple[str, ...]:
        names = self.string_list(key, value)
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                raise self.fail(f"{key}[{i}]",
                                f"policy {name!r} is listed twice (also {key}[{seen[name]}])")
            seen[name] = i
        return tuple(names)

    def decision(self, key: str, value: object) -> Decision:
        text = self.string(key, value)
        try:
            return parse_decision(text)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def duration(self, key: str, value: object) -> float:
        return parse_duration(value, file=self.file, key=key)

    # -- sections -------------------------------------------------------------------------

    def listen(self, value: object) -> ListenConfig:
        t = self.table("listen", value)
        self.check_keys("listen", t, _LISTEN_KEYS)
        d = ListenConfig()
        return ListenConfig(
            socket=self.get(t, "listen", "socket", d.socket, self.socket),
            socket_mode=self.get(t, "listen", "socket_mode", d.socket_mode, self.socket_mode),
            allowed_uids=self.get(t, "listen", "allowed_uids", d.allowed_uids, self.uids),
            max_handoffs=self.get(t, "listen", "max_handoffs", d.max_handoffs,
                                  lambda k, v: self.integer(k, v, minimum=1)),
            handoff_timeout=self.get(t, "listen", "handoff_timeout", d.handoff_timeout,
                                     self.duration),
            max_message=self.get(t, "listen", "max_message", d.max_message,
                                 lambda k, v: self.integer(k, v, minimum=MIN_MESSAGE,
                                                           maximum=MAX_MESSAGE)),
            control_socket=self.get(t, "listen", "control_socket", d.control_socket,
                                    self.socket),
            max_sessions=self.get(t, "listen", "max_sessions", d.max_sessions,
                                  lambda k, v: self.integer(k, v, minimum=1)),
            max_sessions_per_uid=self.get(t, "listen", "max_sessions_per_uid",
                                          d.max_sessions_per_uid,
                                          lambda k, v: self.integer(k, v, minimum=1)),
        )

    def socket(self, key: str, value: object) -> str:
        return _socket_path(self.file, key, self.string(key, value))

    def socket_mode(self, key: str, value: object) -> int:
        if isinstance(value, str):
            m = _OCTAL_MODE_RE.fullmatch(value)
            if m is None:
                raise self.fail(key, f"{value!r} is not an octal mode; write e.g. \"0600\"")
            mode = int(m.group(1), 8)
        elif isinstance(value, int) and not isinstance(value, bool):
            mode = value
        else:
            raise self.fail(key, f"expected an octal mode (0o600 or \"0600\"), "
                                 f"got {_describe(value)}")
        if not 0 <= mode <= 0o777:
            hint = (f" ({value} is {mode:#o}: write 0o{value} or \"0{value}\" for octal)"
                    if isinstance(value, int) and mode > 0 and set(str(value)) <= set("01234567")
                    else "")
            raise self.fail(key, f"mode must be within 0o000..0o777{hint}")
        return mode

    def uids(self, key: str, value: object) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array of uids, got {_describe(value)}")
        if not value:
            raise self.fail(key, "empty: no process could hand over a notify fd")
        return tuple(self.integer(f"{key}[{i}]", uid, minimum=0, maximum=MAX_UID)
                     for i, uid in enumerate(value))

    def peer_uids(self, key: str, value: object) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array of uids (integers), got "
                                 f"{_describe(value)}")
        if not value:
            raise self.fail(key, "empty: no handoff could match; remove the key to match "
                                 "any uid")
        uids = tuple(self.integer(f"{key}[{i}]", uid, minimum=0, maximum=MAX_UID)
                     for i, uid in enumerate(value))
        for i, uid in enumerate(uids):
            if uid in uids[:i]:
                raise self.fail(f"{key}[{i}]", f"uid {uid} is listed twice")
        return uids

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def trace_annotation(self, value: object) -> TraceAnnotationConfig:
        t = self.table("trace_annotation", value)
        self.check_keys("trace_annotation", t, _TRACE_KEYS)
        return TraceAnnotationConfig(
            enabled=self.get(t, "trace_annotation", "enabled", False, self.boolean),
            peer_uid=self.get(t, "trace_annotation", "peer_uid", (0,), self.peer_uids))

    def check_peer_uids(self, key: str, uids: tuple[int, ...] | None,
                        allowed: tuple[int, ...]) -> None:
        for i, uid in enumerate(uids or ()):
            if uid not in allowed:
                raise self.fail(f"{key}[{i}]",
                                f"uid {uid} is not in listen.allowed_uids "
                                f"({', '.join(map(str, allowed))}): it can never hand a "
                                f"listener over")

    def metrics(self, value: object) -> MetricsConfig:
        t = self.table("metrics", value)
        self.check_keys("metrics", t, _METRICS_KEYS)
        listen = self.get(t, "metrics", "listen", DEFAULT_METRICS_LISTEN, self.string)
        if listen == "":
            return MetricsConfig(listen="", host="", port=0)
        host, port = _host_port(self.file, "metrics.listen", listen)
        return MetricsConfig(listen=listen, host=host, port=port)

    def defaults(self, value: object) -> Defaults:
        t = self.table("defaults", value)
        self.check_keys("defaults", t, _DEFAULTS_KEYS)
        return Defaults(
            policies=self.get(t, "defaults", "policies", (), self.policy_names),
            unhandled=self.get(t, "defaults", "unhandled", parse_decision("deny:ENOSYS"),
                               self.decision),
            on_error=self.get(t, "defaults", "on_error", parse_decision("deny:EPERM"),
                              self.decision),
            deadline=self.get(t, "defaults", "deadline", 2.0, self.duration),
            max_inflight=self.get(t, "defaults", "max_inflight", 64,
                                  lambda k, v: self.integer(k, v, minimum=1)),
            rate=self.get(t, "defaults", "rate", 0.0, self.rate),
            rate_burst=self.get(t, "defaults", "rate_burst", 0,
                                lambda k, v: self.integer(k, v, minimum=0,
                                                          maximum=MAX_RATE)),
            rate_exceeded=self.get(t, "defaults", "rate_exceeded",
                                   parse_decision("deny:EAGAIN"), self.decision),
            unhandled_set="unhandled" in t,
        )

    def rate(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected notifications per second (a number, 0 = no "
                                 f"limit), got {_describe(value)}")
        if not (math.isfinite(value) and 0 <= value <= MAX_RATE):
            raise self.fail(key, f"must be within 0..{MAX_RATE} (0 = no limit), got {value!r}")
        return float(value)

    def policy(self, index: int, value: object, names: dict[str, int]) -> PolicyConfig:
        key = f"policy[{index}]"
        t = self.table(key, value)
        self.check_keys(key, t, _POLICY_KEYS)
        if "name" not in t:
            raise self.fail(f"{key}.name", "missing: every [[policy]] needs a name")
        name = self.string(f"{key}.name", t["name"])
        if not POLICY_NAME_RE.fullmatch(name):
            raise self.fail(f"{key}.name", f"{name!r}: use only letters, digits, '_', '.', '-'")
        if name in names:
            raise self.fail(f"{key}.name",
                            f"duplicate policy name {name!r} (also policy[{names[name]}])")
        names[name] = index
        has_path, has_entry = "path" in t, "entry_point" in t
        if has_path == has_entry:
            raise self.fail(key, "needs exactly one of 'path' and 'entry_point'"
                            if not has_path else "has both 'path' and 'entry_point'; keep one")
        path: Path | None = None
        entry_point: str | None = None
        if has_path:
            text = self.string(f"{key}.path", t["path"])
            if not text or "\0" in text:
                raise self.fail(f"{key}.path", "expected a file path")
            path = self.base / Path(text)
        else:
            entry_point = self.string(f"{key}.entry_point", t["entry_point"])
            if not ENTRY_POINT_RE.fullmatch(entry_point):
                raise self.fail(f"{key}.entry_point",
                                f"{entry_point!r}: expected \"package.module\" or "
                                f"\"package.module:attribute\"")
        options = self.table(f"{key}.options", t.get("options", {}))
        for opt in options:
            if not isinstance(opt, str):
                raise self.fail(_join(f"{key}.options", opt), "option names must be strings")
        return PolicyConfig(name=name, path=path, entry_point=entry_point,
                            options=MappingProxyType(copy.deepcopy(dict(options))),
                            index=index)

    def route(self, index: int, value: object) -> Route:
        key = f"route[{index}]"
        t = self.table(key, value)
        self.check_keys(key, t, _ROUTE_KEYS)
        if "match" not in t:
            raise self.fail(f"{key}.match", "missing: every [[route]] needs a match table")
        if "policies" not in t:
            raise self.fail(f"{key}.policies",
                            "missing: list the chain (policies = [] for defaults.unhandled only)")
        match = self.route_match(f"{key}.match", t["match"])
        policies = self.policy_names(f"{key}.policies", t["policies"])
        default_mode: RouteMode = "enforce"
        mode = self.get(t, key, "mode", default_mode, self.mode)
        return Route(index=index, match=match, policies=policies, mode=mode)

    def route_match(self, key: str, value: object) -> RouteMatch:
        t = self.table(key, value)
        self.check_keys(key, t, _MATCH_KEYS)
        if not t:
            raise self.fail(key, f"empty: needs at least one of {', '.join(_MATCH_KEYS)} "
                                 f"(a route for every container is [defaults])")
        empty: Mapping[str, str] = MappingProxyType({})
        labels = self.get(t, key, "labels", empty, self.glob_table)
        annotations = self.get(t, key, "annotations", empty, self.glob_table)
        if not labels and "labels" in t:
            raise self.fail(f"{key}.labels", "empty table: remove it or add a label glob")
        if not annotations and "annotations" in t:
            raise self.fail(f"{key}.annotations",
                            "empty table: remove it or add an annotation glob")
        return RouteMatch(
            metadata=self.get(t, key, "metadata", None, self.string),
            labels=labels,
            container=self.get(t, key, "container", None, self.string),
            annotations=annotations,
            container_name=self.get(t, key, "container_name", None, self.string),
            pod_namespace=self.get(t, key, "pod_namespace", None, self.string),
            pod_name=self.get(t, key, "pod_name", None, self.string),
            peer_uid=self.get(t, key, "peer_uid", None, self.peer_uids),
        )

    def mode(self, key: str, value: object) -> RouteMode:
        if value == "enforce":
            return "enforce"
        if value == "shadow":
            return "shadow"
        raise self.fail(key, f"expected \"enforce\" or \"shadow\", got {_describe(value)}")

    def audit(self, value: object) -> AuditConfig:
        t = self.table("audit", value)
        self.check_keys("audit", t, _AUDIT_KEYS)
        default_decisions: AuditDecisions = "deny"
        return AuditConfig(
            decisions=self.get(t, "audit", "decisions", default_decisions,
                               self.audit_decisions),
            rate_limit=self.get(t, "audit", "rate_limit", 10,
                                lambda k, v: self.integer(k, v, minimum=0)),
            container_bytes=self.get(t, "audit", "container_bytes", 65536,
                                     self.audit_bytes),
            # A line's fixed fields (numbers, arguments) take about 400 bytes.
            max_line=self.get(t, "audit", "max_line", 4096,
                              lambda k, v: self.integer(k, v, minimum=1024,
                                                        maximum=1 << 20)),
        )

    def audit_bytes(self, key: str, value: object) -> int:
        """0 (no budget), or enough for a few lines."""
        n = self.integer(key, value, minimum=0)
        if 0 < n < 4096:
            raise self.fail(key, f"must be 0 (no limit) or >= 4096, got {n}")
        return n

    def audit_decisions(self, key: str, value: object) -> AuditDecisions:
        if value == "all":
            return "all"
        if value == "deny":
            return "deny"
        if value == "none":
            return "none"
        raise self.fail(key, f"expected \"all\", \"deny\" or \"none\", got {_describe(value)}")

    def array_of_tables(self, key: str, value: object) -> list[object]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array of tables ([[{key}]]), "
                                 f"got {_describe(value)}")
        return value

    def check_references(self, key: str, names: Sequence[str], known: Mapping[str, int]) -> None:
        for i, name in enumerate(names):
            if name not in known:
                defined = ", ".join(sorted(known)) or "none"
                raise self.fail(f"{key}[{i}]",
                                f"unknown policy {name!r}: no [[policy]] has that name "
                                f"(defined: {defined})")


def _parse(data: Mapping[str, Any], file: str) -> _Result:
    p = _Parser(file)
    if not isinstance(data, Mapping):
        return _Result(None, [p.fail("(document)", f"expected a table, got {_describe(data)}")])
    with p.collect():
        p.check_keys("", data, _TOP_KEYS)

    listen = metrics = defaults = audit = trace = None
    with p.collect():
        listen = p.listen(data.get("listen", {}))
    with p.collect():
        trace = p.trace_annotation(data.get("trace_annotation", {}))
        if listen is not None and trace.enabled:
            p.check_peer_uids("trace_annotation.peer_uid", trace.peer_uid,
                              listen.allowed_uids)
    with p.collect():
        metrics = p.metrics(data.get("metrics", {}))
    with p.collect():
        defaults = p.defaults(data.get("defaults", {}))
    with p.collect():
        audit = p.audit(data.get("audit", {}))

    policies: list[PolicyConfig] = []
    names: dict[str, int] = {}
    entries: list[object] = []
    with p.collect():
        entries = p.array_of_tables("policy", data.get("policy", []))
    for i, entry in enumerate(entries):
        with p.collect():
            policies.append(p.policy(i, entry, names))

    routes: list[Route] = []
    entries = []
    with p.collect():
        entries = p.array_of_tables("route", data.get("route", []))
    for i, entry in enumerate(entries):
        with p.collect():
            route = p.route(i, entry)
            routes.append(route)
            p.check_references(f"route[{i}].policies", route.policies, names)
            if listen is not None:
                p.check_peer_uids(f"route[{i}].match.peer_uid", route.match.peer_uid,
                                  listen.allowed_uids)
    if defaults is not None:
        with p.collect():
            p.check_references("defaults.policies", defaults.policies, names)

    if p.errors:
        return _Result(None, p.errors)
    assert listen is not None and metrics is not None
    assert defaults is not None and audit is not None and trace is not None
    config = Config(file=file, listen=listen, metrics=metrics, defaults=defaults,
                    policies=tuple(policies), routes=tuple(routes), audit=audit,
                    trace_annotation=trace)
    return _Result(config, [])


# --------------------------------------------------------------------------- small helpers


def _socket_path(file: str, key: str, path: str) -> str:
    if not path:
        raise ConfigError(file, key, "empty socket path")
    if "\0" in path:
        raise ConfigError(file, key, "socket path contains a NUL byte")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(file, key, f"socket path is {size} bytes; unix sockets allow at "
                                     f"most {MAX_SOCKET_PATH}")
    return path


def _host_port(file: str, key: str, text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host without brackets, port)."""
    expected = "expected \"HOST:PORT\" (e.g. \"127.0.0.1:9469\", \"[::1]:9469\") or \"\""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ConfigError(file, key, f"{text!r}: {expected}")
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(file, key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(file, key, f"{text!r}: {expected}")
        if ":" in host:
            raise ConfigError(file, key,
                              f"{text!r}: put an IPv6 address in brackets, e.g. \"[::1]:9469\"")
        if not host:
            raise ConfigError(file, key, f"{text!r}: empty host (use 127.0.0.1 or 0.0.0.0)")
        if any(c.isspace() or not c.isprintable() for c in host):
            raise ConfigError(file, key, f"{text!r}: the host contains blanks or control "
                                         f"characters")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ConfigError(file, key, f"{text!r}: the port must be a number 0..65535")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(file, key, f"{text!r}: port {port} is above 65535")
    return host, port


def _join(key: str, name: object) -> str:
    if isinstance(name, str) and _BARE_KEY_RE.fullmatch(name):
        part = name
    elif isinstance(name, str):
        part = json.dumps(name, ensure_ascii=False)
    else:
        part = repr(name)
    return f"{key}.{part}" if key else part


def _describe(value: object) -> str:
    """``value`` with its TOML type name, short enough for a message."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list):
        return "an array"
    elif isinstance(value, Mapping):
        return "a table"
    else:
        kind = type(value).__name__
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _format_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
