"""OCI seccomp profiles: parse, validate, build into a BPF program, write back.

The model is the ``linux.seccomp`` object of the OCI runtime-spec (``config-linux.md``):
``defaultAction``, ``defaultErrnoRet``, ``architectures``, ``flags``, ``listenerPath``,
``listenerMetadata`` and ``syscalls[{names, action, errnoRet, args[{index, value,
valueTwo, op}]}]``. :func:`parse_profile` is strict: an unknown key, a wrong JSON type, an
unknown action, operator, architecture or flag, or a value out of range is a
:class:`~supervisor.errors.ProfileError` naming the source and the JSON location, e.g.
``profile.json: syscalls[3].args[0].op: unknown operator 'SCMP_CMP_FOO'``.

Building follows runc (and youki), so a profile means here what it means to them:

* a system call name libseccomp does not know is skipped with a warning (an older
  libseccomp or kernel than the profile's author had), never an error;
* a rule whose action (errno included) equals the default action is skipped: libseccomp
  refuses it and it would change nothing;
* conditions on distinct argument indices are one rule (AND). libseccomp cannot compare
  one argument twice in a rule, so when an index appears more than once *every* condition
  of that entry becomes a rule of its own (OR), exactly as runc does;
* ``SCMP_CMP_MASKED_EQ`` matches ``(arg & value) == valueTwo``: ``value`` is the mask
  (runc's order, which Docker's default profile relies on);
* ``errnoRet`` defaults to EPERM for ``SCMP_ACT_ERRNO`` and ``SCMP_ACT_TRACE``; on any other
  action it is an error (the runtime-spec says the runtime MUST fail);
* ``SCMP_ACT_NOTIFY`` is refused as the default action and for ``write``.

Choices of our own:

* **Bad architecture action: KILL_PROCESS.** libseccomp's default, which runc and youki
  keep, is KILL_THREAD. A call from an architecture the profile does not list (an ``int
  0x80`` call under an x86_64-only profile, say) then kills the whole process instead of
  silently removing one thread from a multithreaded one that may hold locks.
* **Other machines' architectures are kept and skipped.** The x86 family
  (``SCMP_ARCH_X86_64``, ``SCMP_ARCH_X86``, ``SCMP_ARCH_X32``, plus ``SCMP_ARCH_NATIVE``)
  is built. The other names the runtime-spec and libseccomp define (ARM, AARCH64, MIPS*,
  PPC*, S390*, PARISC*, RISCV64, ...) parse, stay in the model (so :func:`dump_profile`
  writes them back) and are skipped with a warning when building: an x86_64 kernel never
  reports those audit architectures, and portable profiles list them. A name outside both
  lists is a ProfileError.
* The native architecture is always in the filter (libseccomp puts it there); the listed
  ones are added.
* Filter attributes that only change how libseccomp would *load* the filter (NNP, TSYNC,
  LOG, SSB) are not set: the program is exported and loaded by
  :func:`supervisor.bpf.install_filter` with the bits of :func:`filter_flags`, which adds
  ``NEW_LISTENER`` for notify rules and ``WAIT_KILLABLE_RECV`` where the kernel has it.
* A whole OCI ``config.json`` is accepted too: its ``linux.seccomp`` object is read.
  Docker's own profile format (``archMap``, ``includes``/``excludes``) is refused with a
  message saying so: ignoring those keys would change what the profile allows.
* ``listenerPath`` is not required when there are notify rules: ``seccomp-supervisor run``
  hands the listener over itself.

runc's ``-ENOSYS`` stub is built (:func:`compile_profile`): when the default action is
not allow-like, a call numbered above every call the filter knows in its architecture gets
ENOSYS instead of the default errno, so libc falls back to an older call. The whole
program is checked against the kernel's 4096-instruction limit before anything loads it.
"""

from __future__ import annotations

import difflib
import enum
import errno
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pyseccomp

from . import abi, bpf, bpfprog
from .errors import ProfileError
from .jsontypes import json_type, unique_keys

__all__ = [
    "ALLOW_LIKE_ACTIONS",
    "Action",
    "ArgRule",
    "BuiltProgram",
    "Finding",
    "Operator",
    "Profile",
    "SyscallRule",
    "build_filter",
    "build_program",
    "check_profile",
    "compile_profile",
    "describe_action",
    "describe_conditions",
    "dump_profile",
    "filter_architectures",
    "filter_flags",
    "load_profile",
    "notify_profile",
    "parse_profile",
    "stub_limits",
]

logger = logging.getLogger(__name__)

Warn = Callable[[str], None]


class Action(enum.StrEnum):
    """``defaultAction`` / ``syscalls[].action`` values of the runtime-spec."""

    KILL = "SCMP_ACT_KILL"  # = KILL_THREAD
    KILL_PROCESS = "SCMP_ACT_KILL_PROCESS"
    KILL_THREAD = "SCMP_ACT_KILL_THREAD"
    TRAP = "SCMP_ACT_TRAP"
    ERRNO = "SCMP_ACT_ERRNO"
    TRACE = "SCMP_ACT_TRACE"
    ALLOW = "SCMP_ACT_ALLOW"
    LOG = "SCMP_ACT_LOG"
    NOTIFY = "SCMP_ACT_NOTIFY"


class Operator(enum.StrEnum):
    """``syscalls[].args[].op`` values of the runtime-spec."""

    NE = "SCMP_CMP_NE"
    LT = "SCMP_CMP_LT"
    LE = "SCMP_CMP_LE"
    EQ = "SCMP_CMP_EQ"
    GE = "SCMP_CMP_GE"
    GT = "SCMP_CMP_GT"
    MASKED_EQ = "SCMP_CMP_MASKED_EQ"


_OPERATOR_CODES: Final[Mapping[str, int]] = {
    Operator.NE: pyseccomp.NE,
    Operator.LT: pyseccomp.LT,
    Operator.LE: pyseccomp.LE,
    Operator.EQ: pyseccomp.EQ,
    Operator.GE: pyseccomp.GE,
    Operator.GT: pyseccomp.GT,
    Operator.MASKED_EQ: pyseccomp.MASKED_EQ,
}

# Architectures this machine runs (x86_64 kernel): name -> libseccomp token.
# SCMP_ARCH_NATIVE is libseccomp's own spelling; the native arch is always in a filter.
BUILT_ARCHITECTURES: Final[Mapping[str, int]] = {
    "SCMP_ARCH_NATIVE": pyseccomp.Arch.NATIVE,
    "SCMP_ARCH_X86_64": pyseccomp.Arch.X86_64,
    "SCMP_ARCH_X86": pyseccomp.Arch.X86,
    "SCMP_ARCH_X32": pyseccomp.Arch.X32,
}
# Valid names for other machines: parsed and kept, skipped with a warning when building.
FOREIGN_ARCHITECTURES: Final[frozenset[str]] = frozenset(
    f"SCMP_ARCH_{name}"
    for name in (
        "ARM", "AARCH64", "LOONGARCH64", "M68K", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL",
        "MIPSEL64", "MIPSEL64N32", "PARISC", "PARISC64", "PPC", "PPC64", "PPC64LE",
        "RISCV64", "S390", "S390X", "SH", "SHEB",
    )
)

# ``flags`` names of the runtime-spec -> seccomp(2) filter flag bits.
FILTER_FLAGS: Final[Mapping[str, int]] = {
    "SECCOMP_FILTER_FLAG_TSYNC": abi.SECCOMP_FILTER_FLAG_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": abi.SECCOMP_FILTER_FLAG_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": abi.SECCOMP_FILTER_FLAG_SPEC_ALLOW,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
}

# Highest argument index (seccomp_data.args has 6 entries) and the range of a value.
_MAX_ARG_INDEX: Final = 5
_U64_MAX: Final = 2**64 - 1
# SECCOMP_RET_DATA is 16 bits: the TRACE message a tracer gets.
_TRACE_DATA_MAX: Final = 0xFFFF
# libseccomp's answer for a name it does not know (__NR_SCMP_ERROR).
_NR_UNKNOWN: Final = -1
_SYSCALL_NAME: Final = re.compile(r"[A-Za-z0-9_]+")

_WRITE_REASON: Final = (
    "SCMP_ACT_NOTIFY cannot be used for 'write': the process that installs the filter must "
    "write to hand the listener over before any supervisor can answer it, so it would hang "
    "forever (runc refuses it for the same reason)"
)
_DEFAULT_NOTIFY_REASON: Final = (
    "SCMP_ACT_NOTIFY cannot be the default action: the process that installs the filter "
    "must still write, read, close and execve before any supervisor holds the listener, so "
    "it would hang forever (runc refuses it for the same reason)"
)


@dataclass(frozen=True)
class ArgRule:
    """One condition on a system call argument (``syscalls[].args[]``).

    ``value_two`` only matters for ``SCMP_CMP_MASKED_EQ``, where the condition is
    ``(arg & value) == value_two``.
    """

    index: int
    value: int
    op: Operator
    value_two: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The runtime-spec JSON object, keys in the spec's order."""
        return {"index": self.index, "value": self.value, "valueTwo": self.value_two,
                "op": str(self.op)}


@dataclass(frozen=True)
class SyscallRule:
    """One ``syscalls[]`` entry: ``action`` for ``names`` when every ``args`` matches.

    ``errno_ret`` None means EPERM for ERRNO and TRACE (and nothing for other actions).
    """

    names: tuple[str, ...]
    action: Action
    errno_ret: int | None = None
    args: tuple[ArgRule, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The runtime-spec JSON object, keys in the spec's order, unset keys left out."""
        out: dict[str, Any] = {"names": list(self.names), "action": str(self.action)}
        if self.errno_ret is not None:
            out["errnoRet"] = self.errno_ret
        if self.args:
            out["args"] = [arg.to_dict() for arg in self.args]
        return out


@dataclass(frozen=True)
class Profile:
    """An OCI ``linux.seccomp`` object, validated.

    Constructing one checks every value (the JSON types are the parser's job) and raises
    :class:`ProfileError` naming ``source`` and the JSON location of the first problem.
    ``source`` (a file name, usually) only labels messages: it is not compared.
    """

    default_action: Action
    default_errno_ret: int | None = None
    architectures: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    listener_path: str | None = None
    listener_metadata: str | None = None
    syscalls: tuple[SyscallRule, ...] = ()
    source: str = field(default="<profile>", compare=False, repr=False)

    def __post_init__(self) -> None:
        for location, reason in _problems(self):
            raise ProfileError(f"{self.source}: {location}: {reason}")

    @property
    def has_notify(self) -> bool:
        """True if some rule notifies: the filter then needs ``NEW_LISTENER``."""
        return any(rule.action == Action.NOTIFY for rule in self.syscalls)

    def to_dict(self) -> dict[str, Any]:
        """The runtime-spec JSON object, keys in the spec's order, unset keys left out.

        ``parse_profile(profile.to_dict()) == profile``.
        """
        out: dict[str, Any] = {"defaultAction": str(self.default_action)}
        if self.default_errno_ret is not None:
            out["defaultErrnoRet"] = self.default_errno_ret
        if self.architectures:
            out["architectures"] = list(self.architectures)
        if self.flags:
            out["flags"] = list(self.flags)
        if self.listener_path is not None:
            out["listenerPath"] = self.listener_path
        if self.listener_metadata is not None:
            out["listenerMetadata"] = self.listener_metadata
        if self.syscalls:
            out["syscalls"] = [rule.to_dict() for rule in self.syscalls]
        return out


# ---------------------------------------------------------------------------------------
# Validation of values (Profile.__post_init__)


def _problems(profile: Profile) -> Iterator[tuple[str, str]]:
    """(location, reason) for every invalid value, in document order."""
    yield from _top_problems(profile)
    for i, rule in enumerate(profile.syscalls):
        yield from _rule_problems(f"syscalls[{i}]", rule)


def _top_problems(profile: Profile | _Draft) -> Iterator[tuple[str, str]]:
    """The problems of the values outside ``syscalls``."""
    if profile.default_action is not None:  # None: already reported by the parser
        yield from _action_problems("defaultAction", profile.default_action)
        if profile.default_action == Action.NOTIFY:
            yield "defaultAction", _DEFAULT_NOTIFY_REASON
        yield from _errno_problems(
            "defaultErrnoRet", profile.default_action, profile.default_errno_ret
        )
    for i, arch in enumerate(profile.architectures):
        if arch not in BUILT_ARCHITECTURES and arch not in FOREIGN_ARCHITECTURES:
            yield f"architectures[{i}]", (
                f"unknown architecture {arch!r}; expected one of "
                f"{_choices([*BUILT_ARCHITECTURES, *sorted(FOREIGN_ARCHITECTURES)])}"
            )
    for i, flag in enumerate(profile.flags):
        if flag not in FILTER_FLAGS:
            yield f"flags[{i}]", (
                f"unknown filter flag {flag!r}; expected one of {_choices(FILTER_FLAGS)}"
            )
    if profile.listener_metadata is not None and not profile.listener_path:
        yield "listenerMetadata", "must not be set without listenerPath (runtime-spec)"


def _rule_problems(loc: str, rule: SyscallRule) -> Iterator[tuple[str, str]]:
    if not rule.names:
        yield f"{loc}.names", "must name at least one system call"
    for j, name in enumerate(rule.names):
        if not isinstance(name, str) or not _SYSCALL_NAME.fullmatch(name):
            yield f"{loc}.names[{j}]", f"{name!r} is not a system call name"
        elif name == "write" and rule.action == Action.NOTIFY:
            yield f"{loc}.names[{j}]", _WRITE_REASON
    yield from _action_problems(f"{loc}.action", rule.action)
    yield from _errno_problems(f"{loc}.errnoRet", rule.action, rule.errno_ret)
    for k, arg in enumerate(rule.args):
        aloc = f"{loc}.args[{k}]"
        if not _is_int(arg.index) or not 0 <= arg.index <= _MAX_ARG_INDEX:
            yield f"{aloc}.index", (
                f"must be an argument index 0..{_MAX_ARG_INDEX}, not {arg.index!r}"
            )
        for key, value in (("value", arg.value), ("valueTwo", arg.value_two)):
            if not _is_int(value) or not 0 <= value <= _U64_MAX:
                yield f"{aloc}.{key}", f"must be an unsigned 64-bit integer, not {value!r}"
        if arg.op not in _OPERATOR_CODES:
            yield f"{aloc}.op", _unknown_operator(arg.op)


def _action_problems(loc: str, action: object) -> Iterator[tuple[str, str]]:
    if action not in _ACTION_NAMES:
        yield loc, f"unknown action {action!r}; expected one of {_choices(Action)}"


def _errno_problems(loc: str, action: Action, value: int | None) -> Iterator[tuple[str, str]]:
    if value is None:
        return
    if action not in (Action.ERRNO, Action.TRACE):
        yield loc, (
            f"only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take a return code, not {action}"
        )
    elif not _is_int(value) or value < 0:
        yield loc, f"must be a non-negative integer, not {value!r}"
    elif action == Action.ERRNO and value >= abi.MAX_ERRNO_EXCLUSIVE:
        yield loc, (
            f"errno {value} is out of range 0..{abi.MAX_ERRNO_EXCLUSIVE - 1}: values from "
            f"{abi.MAX_ERRNO_EXCLUSIVE} up are kernel-internal (ERESTARTSYS...) and must "
            "never reach a process"
        )
    elif action == Action.TRACE and value > _TRACE_DATA_MAX:
        yield loc, f"the SCMP_ACT_TRACE message {value} does not fit in 16 bits"


_ACTION_NAMES: Final[frozenset[str]] = frozenset(a.value for a in Action)


def _unknown_operator(op: object) -> str:
    return f"unknown operator {op!r}; expected one of {_choices(Operator)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choices(names: Iterable[str]) -> str:
    return ", ".join(str(n) for n in names)


# ---------------------------------------------------------------------------------------
# Parsing (JSON shape and types)


class _Invalid(Exception):
    """A shape or type problem found while parsing, at ``location``."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(location, reason)
        self.location = location
        self.reason = reason


_PROFILE_KEYS: Final = (
    "defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath",
    "listenerMetadata", "syscalls",
)
_RULE_KEYS: Final = ("names", "action", "errnoRet", "args")
_ARG_KEYS: Final = ("index", "value", "valueTwo", "op")
_DOCKER_HINT: Final = (
    "; this reads the OCI runtime-spec linux.seccomp object, not Docker's profile format "
    "(archMap, includes/excludes, comment)"
)


def parse_profile(data: Mapping[str, Any] | str | bytes, source: str = "<profile>") -> Profile:
    """Parse and validate an OCI ``linux.seccomp`` object.

    ``data`` is the object itself or its JSON text. A whole OCI ``config.json`` (with
    ``ociVersion`` or ``linux`` at the top) is accepted too: its ``linux.seccomp`` is read
    and messages name ``SOURCE (linux.seccomp)``. ``null`` stands for an absent optional
    key (Go marshals nil slices so).

    Raises :class:`ProfileError` (``"SOURCE: LOCATION: reason"``) for invalid JSON, a
    duplicate key, an unknown or missing key, a wrong JSON type, or an invalid value.
    Unknown system call names are not errors here (see :func:`build_filter`).
    """
    obj: object = data
    if isinstance(data, str | bytes | bytearray):
        obj = _decode_json(data, source)
    try:
        if isinstance(obj, Mapping) and ("ociVersion" in obj or "linux" in obj):
            linux = _mapping(obj.get("linux"), "linux")
            obj = linux.get("seccomp")
            if obj is None:
                raise _Invalid("linux.seccomp", "missing: this config has no seccomp profile")
            source = f"{source} (linux.seccomp)"
        fields = _parse_fields(obj)
    except _Invalid as exc:
        raise ProfileError(f"{source}: {exc.location}: {exc.reason}") from None
    return Profile(**fields, source=source)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and parse the profile (or OCI ``config.json``) at ``path``.

    Raises :class:`ProfileError` if the file cannot be read or is not a valid profile; the
    message names the file.
    """
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ProfileError(f"{source}: cannot read the profile: {exc.strerror}") from exc
    return parse_profile(text, source)


def _decode_json(text: str | bytes | bytearray, source: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # bad encoding, duplicate key, deep nesting
        raise ProfileError(f"{source}: invalid JSON: {exc}") from None


def _parse_fields(obj: object) -> dict[str, Any]:
    top = _mapping(obj, "(top level)")
    _check_keys(top, "", _PROFILE_KEYS)
    if "defaultAction" not in top:
        raise _Invalid("defaultAction", "missing (required)")
    return {
        "default_action": _action(top["defaultAction"], "defaultAction"),
        "default_errno_ret": _optional_int(top.get("defaultErrnoRet"), "defaultErrnoRet"),
        "architectures": tuple(_strings(top.get("architectures"), "architectures")),
        "flags": tuple(_strings(top.get("flags"), "flags")),
        "listener_path": _optional_str(top.get("listenerPath"), "listenerPath"),
        "listener_metadata": _optional_str(top.get("listenerMetadata"), "listenerMetadata"),
        "syscalls": tuple(
            _parse_rule(item, f"syscalls[{i}]")
            for i, item in enumerate(_sequence(top.get("syscalls"), "syscalls"))
        ),
    }


def _parse_rule(obj: object, loc: str) -> SyscallRule:
    rule = _mapping(obj, loc)
    _check_keys(rule, f"{loc}.", _RULE_KEYS)
    for key in ("names", "action"):
        if key not in rule:
            raise _Invalid(f"{loc}.{key}", "missing (required)")
    if rule["names"] is None:
        raise _Invalid(f"{loc}.names", "must be an array of strings, not null")
    return SyscallRule(
        names=tuple(_strings(rule["names"], f"{loc}.names")),
        action=_action(rule["action"], f"{loc}.action"),
        errno_ret=_optional_int(rule.get("errnoRet"), f"{loc}.errnoRet"),
        args=tuple(
            _parse_arg(item, f"{loc}.args[{k}]")
            for k, item in enumerate(_sequence(rule.get("args"), f"{loc}.args"))
        ),
    )


def _parse_arg(obj: object, loc: str) -> ArgRule:
    arg = _mapping(obj, loc)
    _check_keys(arg, f"{loc}.", _ARG_KEYS)
    for key in ("index", "value", "op"):
        if key not in arg:
            raise _Invalid(f"{loc}.{key}", "missing (required)")
    op = _string(arg["op"], f"{loc}.op")
    if op not in _OPERATOR_CODES:
        raise _Invalid(f"{loc}.op", _unknown_operator(op))
    value_two = _optional_int(arg.get("valueTwo"), f"{loc}.valueTwo")
    return ArgRule(
        index=_int(arg["index"], f"{loc}.index"),
        value=_int(arg["value"], f"{loc}.value"),
        op=Operator(op),
        value_two=0 if value_two is None else value_two,
    )


def _check_keys(obj: Mapping[Any, Any], prefix: str, known: Sequence[str]) -> None:
    for key in obj:
        if key not in known:
            hint = _DOCKER_HINT if key in ("archMap", "includes", "excludes", "comment") else ""
            if key == "name":
                hint = "; use 'names' (an array)"
            raise _Invalid(
                f"{prefix}{key}", f"unknown key; expected one of {_choices(known)}{hint}"
            )


def _action(value: object, loc: str) -> Action:
    name = _string(value, loc)
    if name not in _ACTION_NAMES:
        raise _Invalid(loc, f"unknown action {name!r}; expected one of {_choices(Action)}")
    return Action(name)


def _mapping(value: object, loc: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(loc, f"must be an object, not {json_type(value)}")
    return value


def _sequence(value: object, loc: str) -> Sequence[object]:
    """An optional array: null or absent is empty."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _Invalid(loc, f"must be an array, not {json_type(value)}")
    return value


def _strings(value: object, loc: str) -> list[str]:
    return [_string(item, f"{loc}[{i}]") for i, item in enumerate(_sequence(value, loc))]


def _string(value: object, loc: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(loc, f"must be a string, not {json_type(value)}")
    return value


def _optional_str(value: object, loc: str) -> str | None:
    return None if value is None else _string(value, loc)


def _int(value: object, loc: str) -> int:
    if not _is_int(value):
        raise _Invalid(loc, f"must be an integer, not {json_type(value)}")
    assert isinstance(value, int)
    return value


def _optional_int(value: object, loc: str) -> int | None:
    return None if value is None else _int(value, loc)


# ---------------------------------------------------------------------------------------
# Writing


def dump_profile(profile: Profile) -> str:
    """The profile as JSON text: keys in the runtime-spec's order, 2-space indent, a final
    newline. The same profile always gives the same text."""
    return json.dumps(profile.to_dict(), indent=2) + "\n"


def notify_profile(
    names: Iterable[str], default_action: Action | str = Action.ALLOW
) -> Profile:
    """A profile that notifies ``names`` and gives every other call ``default_action``.

    This is what ``seccomp-supervisor run --notify mkdir --notify getppid`` uses. Duplicate
    names are dropped (first one kept). Unlike a profile file, the names come from the
    operator's command line, so one libseccomp does not know is an error, not a warning.

    Raises :class:`ProfileError` if ``names`` is empty, names an unknown system call or
    ``write``, or ``default_action`` is unknown or ``SCMP_ACT_NOTIFY``.
    """
    source = "notify profile"
    wanted = [names] if isinstance(names, str) else list(names)
    unique = tuple(dict.fromkeys(wanted))
    if not unique:
        raise ProfileError(f"{source}: no system call to notify")
    for name in unique:
        if not isinstance(name, str) or not _SYSCALL_NAME.fullmatch(name):
            raise ProfileError(f"{source}: {name!r} is not a system call name")
        if _resolve(name) == _NR_UNKNOWN:
            raise ProfileError(f"{source}: unknown system call {name!r}")
    if default_action not in _ACTION_NAMES:
        raise ProfileError(
            f"{source}: unknown default action {default_action!r}; expected one of "
            f"{_choices(Action)}"
        )
    return Profile(
        default_action=Action(default_action),
        syscalls=(SyscallRule(names=unique, action=Action.NOTIFY),),
        source=source,
    )


# ---------------------------------------------------------------------------------------
# Building


def _log_warning(message: str) -> None:
    logger.warning("%s", message)


def _resolve(name: str) -> int:
    # Negative numbers other than -1 are libseccomp pseudo-syscalls: names of calls the
    # native arch lacks but another does (socketcall, _llseek...). add_rule takes them and
    # rewrites them per arch in the filter.
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def _action_code(action: Action, errno_ret: int | None) -> int:
    data = errno.EPERM if errno_ret is None else errno_ret
    codes: dict[str, int] = {
        Action.KILL: pyseccomp.KILL_THREAD,
        Action.KILL_THREAD: pyseccomp.KILL_THREAD,
        Action.KILL_PROCESS: pyseccomp.KILL_PROCESS,
        Action.TRAP: pyseccomp.TRAP,
        Action.ERRNO: pyseccomp.ERRNO(data),
        Action.TRACE: pyseccomp.TRACE(data),
        Action.ALLOW: pyseccomp.ALLOW,
        Action.LOG: pyseccomp.LOG,
        Action.NOTIFY: pyseccomp.NOTIFY,
    }
    return codes[action]


def build_filter(profile: Profile, *, warn: Warn = _log_warning) -> Any:
    """A ``pyseccomp.SyscallFilter`` with ``profile``'s rules, following runc.

    ``warn(message)`` is called for each skipped system call name libseccomp does not
    know, each skipped architecture of another machine, and each entry whose conditions
    had to be split into separate rules while some of them test other arguments (see the
    module docstring); by default it logs at WARNING. Rules equal to the default action
    are skipped silently (debug log), as runc does.

    Raises :class:`ProfileError` if libseccomp refuses a rule or an architecture (the
    message names the location and libseccomp's reason).
    """
    source = profile.source
    default = _action_code(profile.default_action, profile.default_errno_ret)
    flt = pyseccomp.SyscallFilter(default)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for i, arch in enumerate(profile.architectures):
        token = BUILT_ARCHITECTURES.get(arch)
        if token is None:
            warn(f"{source}: architectures[{i}]: {arch} skipped: this machine runs x86_64, "
                 "x86 and x32 code only")
            continue
        if token == pyseccomp.Arch.NATIVE or flt.exist_arch(token):
            continue
        try:
            flt.add_arch(token)
        except OSError as exc:
            raise ProfileError(
                f"{source}: architectures[{i}]: libseccomp refused {arch}: {exc.strerror}"
            ) from exc
    for i, rule in enumerate(profile.syscalls):
        _add_rule(flt, rule, f"{source}: syscalls[{i}]", default, warn)
    return flt


def _add_rule(flt: Any, rule: SyscallRule, where: str, default: int, warn: Warn) -> None:
    action = _action_code(rule.action, rule.errno_ret)
    if action == default:
        # libseccomp refuses (EACCES) a rule that repeats the default action; runc skips it.
        logger.debug("%s: same action as the default, skipped", where)
        return
    conditions = [
        pyseccomp.Arg(arg.index, _OPERATOR_CODES[arg.op], arg.value,
                      arg.value_two if arg.op == Operator.MASKED_EQ else 0)
        for arg in rule.args
    ]
    indices = [arg.index for arg in rule.args]
    split = len(set(indices)) != len(indices)
    if split and len(set(indices)) > 1:
        warn(f"{where}.args: an argument index appears more than once, so every condition "
             "becomes a rule of its own (OR), including those on other indices (as runc)")
    # One rule per condition when an index repeats (libseccomp compares an argument at
    # most once per rule: EINVAL), else one rule with all of them.
    groups = [[c] for c in conditions] if split else [conditions]
    for j, name in enumerate(rule.names):
        nr = _resolve(name)
        if nr == _NR_UNKNOWN:
            warn(f"{where}.names[{j}]: unknown system call {name!r} skipped (this "
                 "libseccomp does not know it)")
            continue
        for group in groups:
            try:
                # add_rule, not add_rule_exactly: libseccomp rewrites the call per arch
                # (socketcall multiplexing on x86, pseudo numbers where an arch lacks it).
                flt.add_rule(action, nr, *group)
            except OSError as exc:
                raise ProfileError(
                    f"{where}.names[{j}]: libseccomp refused the rule for {name!r}: "
                    f"{exc.strerror}"
                ) from exc


# Default actions after which runc adds no -ENOSYS stub: a call the profile does not name
# already runs (or is logged, or a tracer decides), so libc never needs a fallback.
ALLOW_LIKE_ACTIONS: Final[frozenset[Action]] = frozenset({Action.ALLOW, Action.LOG,
                                                          Action.TRACE})
_ARCH_X86_64_TOKEN: Final = pyseccomp.Arch.X86_64


@dataclass(frozen=True)
class BuiltProgram:
    """The program :func:`compile_profile` made: ``stub_length`` instructions of the
    ``-ENOSYS`` stub (0: none), then ``filter_length`` of libseccomp's program.
    ``limits`` is what the stub was made from (None when the default action is allow-like).
    """

    program: bytes
    stub_length: int
    filter_length: int
    limits: bpfprog.StubLimits | None

    @property
    def length(self) -> int:
        """Instructions in the whole program."""
        return self.stub_length + self.filter_length

    @property
    def instructions(self) -> list[bpfprog.Insn]:
        return bpfprog.decode(self.program)


def stub_limits(profile: Profile, filter_program: bytes) -> bpfprog.StubLimits:
    """The largest system call number per architecture of ``profile``'s filter.

    For each architecture in the filter (x86_64, the native one, always; x86 and x32 when
    the profile lists them), the largest of: the numbers of every name the profile gives
    (any action, as runc counts them), and every number libseccomp's ``filter_program``
    tests (:func:`supervisor.bpfprog.nr_comparisons`: this catches the numbers libseccomp
    rewrites a name to, such as the direct ``socket`` call on x86 that runc's name-only
    count misses). So a call above the limit is one the filter gives its default action to.
    """
    tested = bpfprog.nr_comparisons(bpfprog.decode(filter_program))
    in_64 = tested.get(abi.AUDIT_ARCH_X86_64, set())
    numbers: dict[str, set[int]] = {
        "x86_64": {k for k in in_64 if k < abi.X32_SYSCALL_BIT},
        "x32": {k for k in in_64 if abi.X32_SYSCALL_BIT <= k < 2 * abi.X32_SYSCALL_BIT},
        "x86": {k for k in tested.get(abi.AUDIT_ARCH_I386, set()) if k < 0x80000000},
    }
    tokens = {"x86_64": _ARCH_X86_64_TOKEN, "x86": pyseccomp.Arch.X86,
              "x32": pyseccomp.Arch.X32}
    for rule in profile.syscalls:
        for name in rule.names:
            for arch, token in tokens.items():
                nr = _resolve_in(token, name)
                if nr is not None:
                    numbers[arch].add(nr)
    return bpfprog.StubLimits(
        x86_64=max(numbers["x86_64"], default=None),
        x86=max(numbers["x86"], default=None),
        x32=max(numbers["x32"], default=None),
        has_x86="SCMP_ARCH_X86" in profile.architectures,
        has_x32="SCMP_ARCH_X32" in profile.architectures,
    )


def _resolve_in(token: int, name: str) -> int | None:
    """``name``'s number in one architecture; None if unknown there or only a libseccomp
    pseudo number (negative)."""
    try:
        nr = int(pyseccomp.resolve_syscall(token, name))
    except (OSError, ValueError):
        return None
    return nr if nr >= 0 else None


def compile_profile(profile: Profile, *, warn: Warn = _log_warning) -> BuiltProgram:
    """The whole program for ``profile``: libseccomp's filter (:func:`build_filter`)
    exported as BPF, behind runc's ``-ENOSYS`` stub when the default action is not
    allow-like (allow, log, trace), checked against the kernel's size limit.

    The stub answers a call numbered above every call the filter knows in its architecture
    (:func:`stub_limits`; x32 apart from x86_64) with ENOSYS instead of the default action,
    so libc falls back to an older call (``clone3`` → ``clone``, ``faccessat2`` →
    ``faccessat``...) instead of failing with the default errno.

    Raises :class:`ProfileError` as :func:`build_filter` does, and if the program is
    longer than the kernel's 4096 instructions (the message gives the count and names the
    profile): the kernel would refuse it with a bare EINVAL.
    """
    filter_program = bpf.export_program(build_filter(profile, warn=warn))
    filter_length = len(filter_program) // bpfprog.INSN.size
    stub: list[bpfprog.Insn] = []
    limits = None
    if profile.default_action not in ALLOW_LIKE_ACTIONS:
        limits = stub_limits(profile, filter_program)
        stub = bpfprog.enosys_stub(limits)
    total = len(stub) + filter_length
    if total > bpfprog.BPF_MAXINSNS:
        stub_part = f" and {len(stub)} of the -ENOSYS stub" if stub else ""
        raise ProfileError(
            f"{profile.source}: the filter is {total} BPF instructions long "
            f"({filter_length} from libseccomp{stub_part}); the kernel accepts at most "
            f"{bpfprog.BPF_MAXINSNS}: use fewer argument conditions or split the rules")
    return BuiltProgram(bpfprog.encode(stub) + filter_program, len(stub), filter_length,
                        limits)


def build_program(profile: Profile, *, warn: Warn = _log_warning) -> bytes:
    """The raw BPF program (struct sock_filter[]) of :func:`compile_profile`; load it with
    :func:`supervisor.bpf.install_filter` and the bits of :func:`filter_flags`.

    Raises :class:`ProfileError` as :func:`compile_profile` does (size limit included).
    """
    return compile_profile(profile, warn=warn).program


def filter_flags(profile: Profile, *, supported: int | None = None,
                 wait_killable: bool = True) -> int:
    """The seccomp(2) flag bits to install ``profile``'s program with.

    The profile's ``flags``, plus ``NEW_LISTENER`` when it has notify rules, and then
    ``WAIT_KILLABLE_RECV`` too when ``wait_killable`` and the kernel has it (Linux 5.19):
    a non-fatal signal to the target after the supervisor received its call no longer
    withdraws the notification and restarts the call under a new id, so a decision with
    side effects is not made twice. Kernel rules applied here (both checked on this
    kernel, where breaking them is EINVAL): ``TSYNC`` with ``NEW_LISTENER`` needs
    ``TSYNC_ESRCH`` (added, as libseccomp does); ``WAIT_KILLABLE_RECV`` needs
    ``NEW_LISTENER`` (dropped when there is no notify rule, where it would mean nothing;
    libseccomp does the same).

    ``supported`` is the flag bits the kernel accepts (default: probed once with
    :func:`supervisor.bpf.supported_filter_flags`). Raises :class:`ProfileError` naming
    each flag the kernel does not support.
    """
    if supported is None:
        supported = bpf.supported_filter_flags()
    bits = 0
    for flag in profile.flags:
        bits |= FILTER_FLAGS[flag]
    if profile.has_notify:
        bits |= abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
        if wait_killable and supported & abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV:
            bits |= abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        if bits & abi.SECCOMP_FILTER_FLAG_TSYNC:
            bits |= abi.SECCOMP_FILTER_FLAG_TSYNC_ESRCH
    else:
        bits &= ~abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    problems = bpf.flag_problems(bits, supported)
    if problems:
        raise ProfileError(f"{profile.source}: flags: {'; '.join(problems)}")
    return bits


# ---------------------------------------------------------------------------------------
# Checking (``seccomp-supervisor profile check``)

Severity = Literal["error", "warning", "note"]
_SEVERITY_ORDER: Final[Mapping[str, int]] = {"error": 0, "warning": 1, "note": 2}
# Architectures whose names libseccomp can resolve: to tell "a typo" from "another
# machine's call".
_ALL_LIBSECCOMP_ARCHES: Final = tuple(
    token for name, token in vars(pyseccomp.Arch).items()
    if name.isupper() and name != "NATIVE" and isinstance(token, int)
)
_FILTER_ARCH_TOKENS: Final[Mapping[str, int]] = {
    "x86_64": pyseccomp.Arch.X86_64, "x86": pyseccomp.Arch.X86, "x32": pyseccomp.Arch.X32,
}
_ARCH_OF_NAME: Final[Mapping[str, str]] = {
    "SCMP_ARCH_NATIVE": "x86_64", "SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X86": "x86",
    "SCMP_ARCH_X32": "x32",
}
_RANGE_OPS: Final = frozenset({Operator.LT, Operator.LE, Operator.GT, Operator.GE,
                               Operator.NE})


@dataclass(frozen=True)
class _Draft:
    """The top-level values of a profile that failed to parse as a whole."""

    default_action: Action | None
    default_errno_ret: int | None
    architectures: tuple[str, ...]
    flags: tuple[str, ...]
    listener_path: str | None
    listener_metadata: str | None


@dataclass(frozen=True)
class Finding:
    """One problem :func:`check_profile` found. ``location`` is a JSON path in the profile
    (empty for the whole program)."""

    severity: Severity
    location: str
    message: str
    source: str = "<profile>"

    def __str__(self) -> str:
        where = f"{self.source}: {self.location}" if self.location else self.source
        return f"{where}: {self.severity}: {self.message}"


def filter_architectures(architectures: Iterable[str]) -> tuple[str, ...]:
    """The architectures of the x86 family a filter for ``architectures`` holds, in
    ``x86_64, x86, x32`` order: x86_64 (native) always, the others when listed."""
    listed = {_ARCH_OF_NAME[a] for a in architectures if a in _ARCH_OF_NAME}
    return tuple(a for a in ("x86_64", "x86", "x32") if a == "x86_64" or a in listed)


@functools.cache
def known_syscall_names() -> frozenset[str]:
    """Every system call name libseccomp knows on x86_64, x86 or x32."""
    names: set[str] = set()
    for arch, token in _FILTER_ARCH_TOKENS.items():
        base = abi.X32_SYSCALL_BIT if arch == "x32" else 0
        for nr in range(1024):
            try:
                name = pyseccomp.resolve_syscall(token, base + nr)
            except (OSError, ValueError):
                continue
            if name:
                names.add(name.decode() if isinstance(name, bytes) else str(name))
    return frozenset(names)


def _known_on_some_arch(name: str) -> bool:
    for token in _ALL_LIBSECCOMP_ARCHES:
        try:
            if int(pyseccomp.resolve_syscall(token, name)) >= 0:
                return True
        except (OSError, ValueError):
            continue
    return False


def check_profile(data: Mapping[str, Any] | str | bytes, source: str = "<profile>", *,
                  supported: int | None = None) -> list[Finding]:
    """Every problem of a profile (or OCI ``config.json``), most serious first, then in
    document order. Unlike :func:`parse_profile` it does not stop at the first one.

    errors (the runtime, libseccomp or the kernel would refuse the profile): invalid
    JSON, unknown keys, wrong types, unknown actions, operators, architectures or flags,
    errno values out of range or on actions that take none, ``SCMP_ACT_NOTIFY`` on
    ``write`` or as the default action, rules libseccomp refuses, a program over the
    kernel's 4096 instructions, flags this kernel lacks (``supported``: the kernel's flag
    bits, probed when None).

    warnings (accepted, but probably not what the author meant): a system call name
    libseccomp knows on no architecture (skipped when building; a close name is
    suggested), or on none of this profile's architectures; an argument index compared
    more than once in an entry (the conditions are then ORed, explained); the same call
    in several entries with different actions (the one the program applies is named);
    ``SCMP_ACT_ERRNO`` with ``errnoRet`` 0 (the call "succeeds" without running).

    notes: a name that exists on only some of the profile's architectures; an entry whose
    action equals the default (it changes nothing and is skipped).

    Never raises for a bad profile.
    """
    found: list[Finding] = []

    def add(severity: Severity, location: str, message: str) -> None:
        found.append(Finding(severity, location, message, source))

    def done() -> list[Finding]:
        return sorted(found, key=lambda f: (_SEVERITY_ORDER[f.severity],
                                            _document_order(f.location)))

    obj: object = data
    if isinstance(data, str | bytes | bytearray):
        try:
            obj = _decode_json(data, source)
        except ProfileError as exc:
            add("error", "", str(exc).removeprefix(f"{source}: "))
            return done()
    try:
        if isinstance(obj, Mapping) and ("ociVersion" in obj or "linux" in obj):
            obj = _mapping(obj.get("linux"), "linux").get("seccomp")
            if obj is None:
                raise _Invalid("linux.seccomp", "missing: this config has no seccomp profile")
            source = f"{source} (linux.seccomp)"
        top = _mapping(obj, "(top level)")
    except _Invalid as exc:
        add("error", exc.location, exc.reason)
        return done()

    for key in top:
        try:
            _check_keys({key: None}, "", _PROFILE_KEYS)
        except _Invalid as exc:
            add("error", exc.location, exc.reason)

    def field_value(key: str, parse: Callable[[object, str], Any], empty: Any) -> Any:
        try:
            return parse(top.get(key), key)
        except _Invalid as exc:
            add("error", exc.location, exc.reason)
            return empty

    default_action: Action | None = None
    if "defaultAction" not in top:
        add("error", "defaultAction", "missing (required)")
    else:
        default_action = field_value("defaultAction", _action, None)
    draft = _Draft(
        default_action=default_action,
        default_errno_ret=field_value("defaultErrnoRet", _optional_int, None),
        architectures=tuple(field_value("architectures", _strings, [])),
        flags=tuple(field_value("flags", _strings, [])),
        listener_path=field_value("listenerPath", _optional_str, None),
        listener_metadata=field_value("listenerMetadata", _optional_str, None),
    )
    rules: list[tuple[int, SyscallRule]] = []
    for i, item in enumerate(field_value("syscalls", _sequence, ())):
        try:
            rules.append((i, _parse_rule(item, f"syscalls[{i}]")))
        except _Invalid as exc:
            add("error", exc.location, exc.reason)
    for location, reason in _top_problems(draft):
        add("error", location, reason)
    for i, rule in rules:
        for location, reason in _rule_problems(f"syscalls[{i}]", rule):
            add("error", location, reason)
    if any(f.severity == "error" for f in found) or default_action is None:
        return done()

    profile = Profile(
        default_action=default_action, default_errno_ret=draft.default_errno_ret,
        architectures=draft.architectures, flags=draft.flags,
        listener_path=draft.listener_path, listener_metadata=draft.listener_metadata,
        syscalls=tuple(rule for _, rule in rules), source=source)
    built: BuiltProgram | None = None
    try:
        built = compile_profile(profile, warn=lambda _message: None)
    except ProfileError as exc:
        add("error", "", str(exc).removeprefix(f"{source}: "))
    try:
        filter_flags(profile, supported=supported)
    except ProfileError as exc:
        add("error", "", str(exc).removeprefix(f"{source}: "))
    _check_names(profile, add)
    _check_rules(profile, built, add)
    return done()


def _document_order(location: str) -> tuple[int, tuple[int, ...]]:
    """Sort key: top-level keys in the runtime-spec's order, then array indices."""
    head = re.split(r"[.\[]", location, maxsplit=1)[0]
    rank = _PROFILE_KEYS.index(head) if head in _PROFILE_KEYS else -1
    return rank, tuple(int(n) for n in re.findall(r"\[(\d+)\]", location))


def _check_names(profile: Profile, add: Callable[[Severity, str, str], None]) -> None:
    arches = filter_architectures(profile.architectures)
    for i, rule in enumerate(profile.syscalls):
        for j, name in enumerate(rule.names):
            loc = f"syscalls[{i}].names[{j}]"
            present = [a for a in arches
                       if _resolve_in(_FILTER_ARCH_TOKENS[a], name) is not None]
            if present == list(arches):
                continue
            if not present:
                if _known_on_some_arch(name):
                    add("warning", loc, f"{name!r} exists on none of this profile's "
                        f"architectures ({', '.join(arches)}): the entry does nothing "
                        "for it here")
                    continue
                close = difflib.get_close_matches(name, known_syscall_names(), n=1,
                                                  cutoff=0.75)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                add("warning", loc, f"unknown system call {name!r}: libseccomp knows it "
                    "on no architecture, so the filter skips it (as runc does)" + hint)
                continue
            missing = [a for a in arches if a not in present]
            add("note", loc, f"{name!r} exists on {', '.join(present)} but not on "
                f"{', '.join(missing)}")


def _check_rules(profile: Profile, built: BuiltProgram | None,
                 add: Callable[[Severity, str, str], None]) -> None:
    default = _action_code(profile.default_action, profile.default_errno_ret)
    entries: dict[str, list[tuple[int, SyscallRule]]] = {}
    for i, rule in enumerate(profile.syscalls):
        loc = f"syscalls[{i}]"
        code = _action_code(rule.action, rule.errno_ret)
        if code == default:
            add("note", f"{loc}.action", f"{describe_action(rule.action, rule.errno_ret)} "
                "is the default action: this entry changes nothing and is skipped")
        if rule.action == Action.ERRNO and rule.errno_ret == 0:
            add("warning", f"{loc}.errnoRet", "SCMP_ACT_ERRNO with errnoRet 0 makes the "
                "call return 0 without running: callers will think it succeeded")
        indices = [arg.index for arg in rule.args]
        repeated = sorted({k for k in indices if indices.count(k) > 1})
        if repeated:
            conditions = " OR ".join(_describe_condition(a) for a in rule.args)
            ranges = any(a.op in _RANGE_OPS for a in rule.args if a.index in repeated)
            others = sorted(set(indices) - set(repeated))
            why = (f"argument {', '.join(map(str, repeated))} is compared more than once; "
                   "libseccomp compares an argument at most once per rule, so each "
                   f"condition becomes a rule of its own (as runc does) and "
                   f"{describe_action(rule.action, rule.errno_ret)} applies when ANY "
                   f"holds: {conditions}")
            if others:
                why += (f"; the conditions on argument {', '.join(map(str, others))} are "
                        "no longer required together with them")
            if ranges:
                why += ("; ORed bounds match almost every value: an entry cannot hold a "
                        "range (list the values, or use SCMP_CMP_MASKED_EQ)")
            add("warning", f"{loc}.args", why)
        if code != default:
            for name in rule.names:
                entries.setdefault(name, []).append((i, rule))
    if built is None:
        return
    insns = built.instructions
    for name, uses in entries.items():
        actions = {(r.action, r.errno_ret if r.action in (Action.ERRNO, Action.TRACE)
                    else None) for _, r in uses}
        if len(actions) < 2:
            continue
        nr = _resolve_in(_ARCH_X86_64_TOKEN, name)
        effective = ""
        if nr is not None:
            result = bpfprog.run(insns, bpfprog.pack_data(nr, abi.AUDIT_ARCH_X86_64))
            effective = (f"; on x86_64 the filter gives {bpfprog.action_name(result.value)}"
                         + (" with zero arguments" if result.reads_args else ""))
        where = ", ".join(f"syscalls[{i}] ({describe_action(r.action, r.errno_ret)}"
                          f"{' with conditions' if r.args else ''})" for i, r in uses)
        add("warning", f"syscalls[{uses[-1][0]}].names", f"{name!r} has different actions "
            f"in {where}: the filter applies one of them (libseccomp keeps the first "
            f"unconditional rule of a call and drops later ones){effective}")


def describe_action(action: Action, errno_ret: int | None = None) -> str:
    """``SCMP_ACT_ERRNO(EPERM)``, ``SCMP_ACT_TRACE(1)``, ``SCMP_ACT_ALLOW``..."""
    if action in (Action.ERRNO, Action.TRACE):
        data = errno.EPERM if errno_ret is None else errno_ret
        text = errno.errorcode.get(data, str(data)) if action == Action.ERRNO else str(data)
        return f"{action}({text})"
    return str(action)


_OP_SYMBOLS: Final[Mapping[Operator, str]] = {
    Operator.NE: "!=", Operator.LT: "<", Operator.LE: "<=", Operator.EQ: "==",
    Operator.GE: ">=", Operator.GT: ">",
}


def _describe_condition(arg: ArgRule) -> str:
    if arg.op == Operator.MASKED_EQ:
        return f"(args[{arg.index}] & {arg.value:#x}) == {arg.value_two:#x}"
    return f"args[{arg.index}] {_OP_SYMBOLS[arg.op]} {arg.value}"


def describe_conditions(rule: SyscallRule) -> str:
    """The conditions of an entry as text: ``args[0] == 1 AND args[1] > 2`` (OR when an
    index repeats, as built); empty when there are none."""
    indices = [arg.index for arg in rule.args]
    joiner = " OR " if len(set(indices)) != len(indices) else " AND "
    return joiner.join(_describe_condition(arg) for arg in rule.args)
