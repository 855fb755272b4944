"""The public API for policy authors.

A policy is a :class:`PolicySet` whose handlers are registered per system call name::

    import errno
    from supervisor.policy import PolicySet, Notification, deny, allow

    policy = PolicySet("hardening")

    @policy.on("chmod", "fchmodat")
    def no_setuid(n: Notification):
        mode = n.mode(1) if n.syscall == "chmod" else n.mode(2)
        if mode & 0o6000:
            return deny(errno.EPERM, reason="setuid bit")
        return allow()          # decided on register values only: CONTINUE is safe

A handler is a plain function (decided inline, the fast path) or a coroutine function
(its first step inline; carried on under the deadline if it waits, e.g. for
``await n.read_path(i)``). It returns a :class:`Decision`, or ``None`` to let the next
policy of the chain decide. Paths a handler needs can be declared instead
(``@policy.on("mkdir", paths=(0,))``): they are read before it runs, without a task,
and it takes them with ``n.path(0)``.

Read arguments with the typed accessors of :class:`Notification` (``n.mode(1)``,
``n.flags(2)``, ``n.fd(0)``, ``n.pointer(0)``, ``await n.read_path(0)``), not from
``n.args``: those are raw registers, and the kernel uses only part of them (the low 32
bits of every argument of an i386 call, pointers included; the low 32 bits of an ``int``
and the low 16 of a ``umode_t`` in every ABI). A decision on bits the kernel ignores is
a decision on attacker-chosen garbage.
"""

from __future__ import annotations

import inspect
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

from . import abi, accel
from .errors import PolicyError, TargetMemoryError

if TYPE_CHECKING:
    from .memory import TargetMemory

__all__ = [
    "Container",
    "Decision",
    "Notification",
    "PolicyError",
    "PolicySet",
    "TargetMemoryError",
    "allow",
    "deny",
    "inject_fd",
    "normalised_path",
    "returns",
]

DecisionKind = Literal["deny", "returns", "allow", "inject_fd"]

CONTINUE_RESPONSE: Final = (0, 0, abi.USER_NOTIF_FLAG_CONTINUE)


class Decision:
    """What the kernel is told. Build it with :func:`deny`, :func:`returns`, :func:`allow`
    or :func:`inject_fd`; they validate their arguments.

    Immutable, compared and hashed by value (like a frozen dataclass). Not a dataclass:
    one is built or looked up per notification, and a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) costs several microseconds. The builders hand out
    one shared instance per distinct answer (see :data:`_CACHE_MAX`), which immutability
    makes safe.
    """

    __slots__ = ("_response", "cloexec", "errno", "fd", "kind", "reason", "unchecked",
                 "value")
    __match_args__ = ("kind", "errno", "value", "fd", "cloexec", "unchecked", "reason")

    kind: DecisionKind
    errno: int
    value: int
    fd: int
    cloexec: bool
    unchecked: bool
    reason: str
    # (val, error, flags) of the seccomp_notif_resp; None for inject_fd (answered by ADDFD).
    _response: tuple[int, int, int] | None

    def __init__(self, kind: DecisionKind, errno: int = 0, value: int = 0, fd: int = -1,
                 cloexec: bool = True, unchecked: bool = False, reason: str = "") -> None:
        # The builders' rules, for a Decision made directly too: a handler returning
        # Decision("deny", errno=512) handed the task a kernel-internal restart code
        # (ERESTARTSYS, which a task must never see: seen as errno 512), and one that does
        # not fit the response ended the session. Raised in the handler: its call gets
        # on_error.
        problem = _decision_problem(kind, errno, value, fd)
        if problem is not None:
            raise ValueError(problem)
        # Slot descriptors write past the __setattr__ that keeps instances immutable.
        _set_kind(self, kind)
        _set_errno(self, errno)
        _set_value(self, value)
        _set_fd(self, fd)
        _set_cloexec(self, cloexec)
        _set_unchecked(self, unchecked)
        _set_reason(self, reason)
        _set_response(self, (0, -errno, 0) if kind == "deny" else (value, 0, 0)
                      if kind == "returns" else CONTINUE_RESPONSE if kind == "allow" else None)

    def _fields(self) -> tuple[object, ...]:
        return (self.kind, self.errno, self.value, self.fd, self.cloexec, self.unchecked,
                self.reason)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Decision)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __reduce__(self) -> tuple[type[Decision], tuple[object, ...]]:
        return (Decision, self._fields())

    def __repr__(self) -> str:
        return (f"Decision(kind={self.kind!r}, errno={self.errno!r}, value={self.value!r}, "
                f"fd={self.fd!r}, cloexec={self.cloexec!r}, unchecked={self.unchecked!r}, "
                f"reason={self.reason!r})")

    def __str__(self) -> str:
        if self.kind == "deny":
            return f"deny:{_errno_name(self.errno)}"
        if self.kind == "returns":
            return f"returns:{self.value}"
        if self.kind == "inject_fd":
            return "inject_fd"
        return "allow"


_set_kind: Callable[[Decision, Any], None] = vars(Decision)["kind"].__set__
_set_errno: Callable[[Decision, Any], None] = vars(Decision)["errno"].__set__
_set_value: Callable[[Decision, Any], None] = vars(Decision)["value"].__set__
_set_fd: Callable[[Decision, Any], None] = vars(Decision)["fd"].__set__
_set_cloexec: Callable[[Decision, Any], None] = vars(Decision)["cloexec"].__set__
_set_unchecked: Callable[[Decision, Any], None] = vars(Decision)["unchecked"].__set__
_set_reason: Callable[[Decision, Any], None] = vars(Decision)["reason"].__set__
_set_response: Callable[[Decision, Any], None] = vars(Decision)["_response"].__set__

# The builders below hand out one shared Decision per (number, reason): policies build
# the same few answers over and over, and a dict lookup costs a tenth of building one.
# Only plain ints/bools and str reasons are cached (True == 1 must not find deny(1)), and
# only the first _CACHE_MAX distinct answers of each kind (reasons can be f-strings).
_CACHE_MAX: Final = 4096
# And only reasons up to this long: a longer one may name what a container chose (a path:
# 4 KiB, 16 KiB escaped), and 4,096 of them would be kept for the daemon's whole life.
_CACHE_REASON_MAX: Final = 256
_DENY: dict[tuple[int, str], Decision] = {}
_RETURNS: dict[tuple[int, str], Decision] = {}
_ALLOW: dict[tuple[str, bool], Decision] = {}


def _decision_problem(kind: object, errno: object, value: object, fd: object) -> str | None:
    """Why ``Decision(kind, errno=, value=, fd=)`` must not be made (None: it may)."""
    if kind == "deny":
        if (not isinstance(errno, int) or isinstance(errno, bool)
                or not 0 < errno < abi.MAX_ERRNO_EXCLUSIVE):
            return (f"a deny needs an errno in 1..{abi.MAX_ERRNO_EXCLUSIVE - 1}, "
                    f"got {errno!r}")
    elif kind == "returns":
        if (not isinstance(value, int) or isinstance(value, bool)
                or not -(2**63) <= value < 2**63):
            return f"returns needs a value that fits a 64-bit register, got {value!r}"
        if -abi.MAX_ERRNO_RANGE <= value <= -1:
            return f"returns({value}) is an error return; use deny({-value}) instead"
    elif kind == "inject_fd":
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            return f"inject_fd needs an open fd number, got {fd!r}"
    elif kind != "allow":
        return f"unknown decision kind {kind!r}"
    return None


def deny(errno: int, *, reason: str = "") -> Decision:
    """Fail the call with ``errno`` (a positive number such as ``errno.EPERM``).

    Raises ValueError for errno <= 0 or >= 512 (kernel-internal values a task must
    never see).
    """
    if errno.__class__ is int and reason.__class__ is str:
        cached = _DENY.get((errno, reason))
        if cached is not None:
            return cached
    if not isinstance(errno, int) or isinstance(errno, bool):
        raise ValueError(f"deny() needs an int errno, got {errno!r}")
    if not 0 < errno < abi.MAX_ERRNO_EXCLUSIVE:
        raise ValueError(f"deny() errno must be in 1..{abi.MAX_ERRNO_EXCLUSIVE - 1}, got {errno}")
    decision = Decision("deny", errno=errno, reason=reason)
    if (errno.__class__ is int and reason.__class__ is str and len(_DENY) < _CACHE_MAX
            and len(reason) <= _CACHE_REASON_MAX):
        _DENY[(errno, reason)] = decision
    return decision


def returns(value: int, *, reason: str = "") -> Decision:
    """Make the call return ``value`` without running it.

    Raises ValueError for values in -4095..-1: libc reads those as errors; use
    :func:`deny` to fail a call.
    """
    if value.__class__ is int and reason.__class__ is str:
        cached = _RETURNS.get((value, reason))
        if cached is not None:
            return cached
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"returns() needs an int, got {value!r}")
    if -abi.MAX_ERRNO_RANGE <= value <= -1:
        raise ValueError(f"returns({value}) is an error return; use deny({-value}) instead")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"returns({value}) does not fit in a 64-bit register")
    decision = Decision("returns", value=value, reason=reason)
    if (value.__class__ is int and reason.__class__ is str and len(_RETURNS) < _CACHE_MAX
            and len(reason) <= _CACHE_REASON_MAX):
        _RETURNS[(value, reason)] = decision
    return decision


def allow(*, reason: str = "", unchecked: bool = False) -> Decision:
    """Let the kernel run the call (CONTINUE).

    After a handler has read the target's memory, the kernel will read the pointers
    again when it runs the call, and another thread may have changed them in between.
    So an ``allow()`` after a memory read is refused unless ``unchecked=True`` says the
    author knows the check was advisory.
    """
    if unchecked.__class__ is bool and reason.__class__ is str:
        cached = _ALLOW.get((reason, unchecked))
        if cached is not None:
            return cached
        decision = Decision("allow", unchecked=unchecked, reason=reason)
        if len(_ALLOW) < _CACHE_MAX and len(reason) <= _CACHE_REASON_MAX:
            _ALLOW[(reason, unchecked)] = decision
        return decision
    return Decision("allow", unchecked=unchecked, reason=reason)


def inject_fd(fd: int, *, cloexec: bool = True, reason: str = "") -> Decision:
    """Install ``fd`` (an fd of this process) in the target and make the call return its
    number there, atomically. The supervisor closes its own ``fd`` after answering."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise ValueError(f"inject_fd() needs an open fd number, got {fd!r}")
    return Decision("inject_fd", fd=fd, cloexec=cloexec, reason=reason)


def parse_decision(text: str) -> Decision:
    """Parse a configured answer: ``deny:EPERM``, ``deny:13``, ``returns:0`` or ``allow``.

    Raises ValueError with a readable message.
    """
    import errno as errno_module

    kind, _, arg = text.partition(":")
    kind = kind.strip()
    arg = arg.strip()
    if kind == "allow" and not arg:
        return allow(reason="configured")
    if kind == "deny":
        if arg.isdigit():
            return deny(int(arg), reason="configured")
        number = getattr(errno_module, arg.upper(), None) if arg else None
        if not isinstance(number, int):
            raise ValueError(f"{text!r}: unknown errno name {arg!r}")
        return deny(number, reason="configured")
    if kind == "returns":
        try:
            return returns(int(arg, 0), reason="configured")
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    raise ValueError(f"{text!r}: expected 'deny:ERRNO', 'returns:VALUE' or 'allow'")


def _plain_path(path: bytes) -> bool:
    """True if lexical normalisation leaves ``path`` as it is: no ``//``, no ``/.`` and
    no trailing ``/`` (a component that only starts with a dot, ``/.config``, is
    normalised too, which leaves it). The compiled twin is ``_hotloop.plain_path``."""
    return b"//" not in path and b"/." not in path and path[-1:] != b"/"


_plain: Final = accel.HOTLOOP.plain_path if accel.HOTLOOP is not None else _plain_path


def normalised_path(path: bytes) -> bytes:
    """The absolute ``path`` lexically normalised: ``.`` and ``..`` components folded
    (``..`` stops at ``/``), ``//`` made ``/`` (a leading ``//`` too, as the kernel reads
    it), a trailing ``/`` dropped. Symlinks are **not** followed: this is what the path
    says, not where it leads. ``path`` itself when it is normal already, as most are.

    Raises ValueError for a path that is not absolute (resolve it against the caller's
    working directory or dirfd first: see ``policies/path_guard.py``), TypeError for
    anything but bytes (paths are bytes everywhere in this API)."""
    if not isinstance(path, bytes):
        raise TypeError(f"normalised_path() needs bytes, not {type(path).__name__}")
    if path[:1] != b"/":
        raise ValueError(f"not an absolute path: {path[:64]!r}")
    if _plain(path):
        return path
    # normpath keeps a leading "//"; the kernel treats it as "/".
    return b"/" + posixpath.normpath(path).lstrip(b"/")


def _errno_name(number: int) -> str:
    import errno as errno_module

    return errno_module.errorcode.get(number, str(number))


@dataclass(frozen=True, slots=True)
class Container:
    """The container (or launched command) a notification comes from.

    ``pid`` is the process the runtime named in its message (in the supervisor's pid
    namespace); ``metadata`` is the raw ``listenerMetadata`` string and ``labels`` its
    ``KEY=VALUE`` lines. Everything but ``peer_uid`` is written by whoever creates the
    container. ``peer_uid`` is the uid of the process that handed the listener over,
    from the kernel (``SO_PEERCRED``): the one field the creator cannot choose (None
    when unknown, e.g. a session stored by an older version). ``name`` is the name the
    user gave the container, from its annotations
    (:func:`supervisor.router.container_name`; ``""`` when it has none).
    ``pod_namespace`` and ``pod_name`` are those of its Kubernetes pod, from the CRI
    runtime's annotations, the same for containerd and CRI-O
    (:func:`supervisor.router.pod_namespace`, :func:`supervisor.router.pod_name`; ``""``
    outside Kubernetes).
    """

    id: str
    pid: int = 0
    metadata: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    bundle: str = ""
    status: str = ""
    runtime_version: str = ""
    peer_uid: int | None = None
    name: str = ""
    pod_namespace: str = ""
    pod_name: str = ""


class Notification:
    """One notified system call, as a handler sees it.

    ``pid`` is the calling thread's TID in the supervisor's pid namespace (0 when that
    thread is not visible from here). ``arch`` is the ABI the call was made in:
    ``"x86_64"``, ``"x86"`` (i386: a 32-bit program, or a 64-bit one using ``int
    $0x80``) or ``"x32"``; ``syscall`` is its name in that ABI.

    ``args`` are the six raw register values, as the kernel reports them: **not** the
    arguments. Decode argument ``i`` (0-based) with the accessor of its C type, as the
    kernel does before using it:

    * ``pointer(i)``: a ``T *`` (32 bits in an i386 call, 64 otherwise);
    * ``ulong(i)``: an ``unsigned long`` or ``size_t`` (as wide as a pointer);
    * ``int32(i)`` / ``uint32(i)``: an ``int`` / ``unsigned int`` (low 32 bits);
    * ``fd(i)``: an fd or dirfd (an ``int``; ``AT_FDCWD`` is -100);
    * ``flags(i)``: ``int`` or ``unsigned int`` flags (``open``'s ``O_*``...);
    * ``mode(i)``: a ``umode_t`` (low 16 bits: file type and permission bits).

    The argument *positions* are the handler's business: they are the same in the
    three ABIs for most calls, but not all (i386 ``clone`` swaps ``tls`` and
    ``child_tid``; ``socketcall`` and ``ipc`` multiplex).

    Memory reads (:meth:`read_path`, :meth:`read_bytes`, :meth:`read_cstring`) take the
    decoded pointer; an i386 call's kernel never starts a read at 4 GiB or above, so such
    a read is refused (EFAULT).
    """

    __slots__ = ("_memory", "_paths", "_read_memory", "arch", "args", "container", "id",
                 "nr", "pid", "syscall")

    def __init__(
        self,
        *,
        id: int,
        pid: int,
        nr: int,
        arch: str,
        syscall: str,
        args: tuple[int, ...],
        container: Container,
        memory: TargetMemory | None = None,
    ) -> None:
        self.id = id
        self.pid = pid
        self.nr = nr
        self.arch = arch
        self.syscall = syscall
        self.args = args
        self.container = container
        self._memory = memory
        self._read_memory = False
        self._paths: dict[int, bytes | Exception] | None = None

    def __repr__(self) -> str:
        return (f"<Notification {self.syscall} id={self.id:#x} tid={self.pid} "
                f"container={self.container.id!r}>")

    @property
    def read_memory(self) -> bool:
        """True once a handler read the target's memory for this notification."""
        return self._read_memory

    def _require_memory(self) -> TargetMemory:
        if self._memory is None:
            raise TargetMemoryError(14, "this notification has no access to target memory")
        self._read_memory = True
        return self._memory

    # Typed argument accessors, decoding as abi.arg_* do (inlined: a function call per
    # argument costs twice the decoding). Decoded on demand, not per notification: most
    # handlers look at one or two arguments, many at none.

    def pointer(self, i: int) -> int:
        """Argument ``i`` (0..5) as an address the kernel uses: the low 32 bits for an
        i386 call, the whole register for x86_64 and x32. Raises ValueError for a bad
        index, or an arch whose width is unknown (a filter never notifies one)."""
        if 0 <= i < 6:
            mask = _POINTER_MASKS.get(self.arch)
            if mask is not None:
                return self.args[i] & mask
            raise ValueError(f"cannot decode the arguments of a call in arch {self.arch}")
        raise _bad_index(i)

    def ulong(self, i: int) -> int:
        """Argument ``i`` as an ``unsigned long`` or ``size_t`` (``mount``'s flags, a
        length): as wide as :meth:`pointer`."""
        return self.pointer(i)

    def int32(self, i: int) -> int:
        """Argument ``i`` (0..5) as an ``int``: the low 32 bits, signed."""
        if 0 <= i < 6:
            value: int = self.args[i] & _U32
            return value - 0x1_0000_0000 if value & 0x8000_0000 else value
        raise _bad_index(i)

    def uint32(self, i: int) -> int:
        """Argument ``i`` (0..5) as an ``unsigned int``: the low 32 bits."""
        if 0 <= i < 6:
            return self.args[i] & _U32
        raise _bad_index(i)

    def fd(self, i: int) -> int:
        """Argument ``i`` (0..5) as an fd or dirfd (an ``int``): ``AT_FDCWD`` is -100."""
        if 0 <= i < 6:
            value: int = self.args[i] & _U32
            return value - 0x1_0000_0000 if value & 0x8000_0000 else value
        raise _bad_index(i)

    def flags(self, i: int) -> int:
        """Argument ``i`` (0..5) as ``int`` or ``unsigned int`` flags (``open``'s
        ``O_*``, ``fchmodat2``'s ``AT_*``), unsigned: the low 32 bits."""
        if 0 <= i < 6:
            return self.args[i] & _U32
        raise _bad_index(i)

    def mode(self, i: int) -> int:
        """Argument ``i`` (0..5) as a ``umode_t`` (``open``, ``creat``, ``chmod``,
        ``mknod``, ``mkdir``...): the low 16 bits, file type and permission bits."""
        if 0 <= i < 6:
            return self.args[i] & _UMODE
        raise _bad_index(i)

    def _address(self, address: int) -> int:
        # Registers hold 64 bits: a policy's address arithmetic past them (a pointer plus
        # an offset the target also controls) names no memory. The read takes 64 bits and
        # would silently read at the wrapped address.
        if not 0 <= address <= abi.U64_MASK:
            raise TargetMemoryError(
                14, f"address {address:#x} is outside the 64-bit address space")
        # A compat (i386) call reaches user memory only through 32-bit values (registers
        # cut to 32 bits, compat_ptr() of 32-bit struct fields): an address from 4 GiB up
        # is not one its kernel reads, it is an undecoded register.
        if address > abi.U32_MASK and self.arch == "x86":
            raise TargetMemoryError(
                14, f"address {address:#x} is beyond 4 GiB: not one an i386 call's "
                    "kernel reads (decode pointer arguments with pointer(i))")
        return address

    async def read_bytes(self, address: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``address`` of the target.

        Race-checked: the notification is still pending after the read, so the bytes are
        the ones this call passed. Raises :class:`TargetMemoryError` (errno EFAULT) for an
        unmapped address, one outside 64 bits (negative, or from 2^64 up: no register
        holds it), or an address from 4 GiB up in an i386 call, and
        ``NotificationGone`` if the call was abandoned.
        """
        return await self._require_memory().read_bytes(self.id, self.pid,
                                                       self._address(address), length)

    async def read_cstring(self, address: int, *, limit: int = 4096) -> bytes:
        """Read a NUL-terminated string at ``address`` (without the NUL), page by page.

        Raises :class:`TargetMemoryError` with EFAULT (NULL, unmapped, from 4 GiB up in
        an i386 call) or ENAMETOOLONG (no NUL within ``limit`` bytes).
        """
        return await self._require_memory().read_cstring(self.id, self.pid,
                                                         self._address(address), limit)

    async def read_path(self, arg: int) -> bytes:
        """Read the path passed in argument number ``arg`` (0-based) at the address the
        kernel uses (:meth:`pointer`), at most 4096 bytes with its NUL, as the kernel's
        getname() would. ``bytes``, as the kernel has it (every path of the API is: a
        name that is not UTF-8 must still work); ``os.fsdecode(path)`` for text, e.g. in
        a reason.

        Read once per notification: a path read already (declared with
        ``PolicySet.on(..., paths=...)``, or read by an earlier handler) is returned, or
        its read's error raised again, without reading it a second time."""
        address = self.pointer(arg)
        paths = self._read_paths()
        got = paths.get(arg)
        if got is None:
            try:
                got = await self.read_cstring(address, limit=PATH_MAX)
            except TargetMemoryError as exc:
                paths[arg] = exc
                raise
            paths[arg] = got
            return got
        self._require_memory()  # marks the read, as reading it did
        if isinstance(got, bytes):
            return got
        raise got.with_traceback(None)

    def path(self, arg: int) -> bytes:
        """The path argument number ``arg`` (0-based) passed, read before the handler
        ran because its ``PolicySet.on(..., paths=...)`` declared it: the bytes
        :meth:`read_path` would return, read the same way (race-checked, at most 4096
        bytes with its NUL), or the same error raised (:class:`TargetMemoryError` with
        EFAULT or ENAMETOOLONG, ``NotificationGone``). Counts as a memory read (an
        ``allow()`` after it must be ``allow(unchecked=True)``).

        Raises ValueError for an argument that was not read."""
        got = self._read_paths().get(arg)
        if got is None:
            raise ValueError(
                f"argument {arg!r} of {self.syscall} was not read before the handler: "
                "declare it in PolicySet.on(..., paths=...), or await read_path()")
        self._require_memory()
        if isinstance(got, bytes):
            return got
        raise got.with_traceback(None)

    def _read_paths(self) -> dict[int, bytes | Exception]:
        """The paths read for this notification so far, by argument index (bytes, or
        the error their read raised)."""
        try:
            paths = self._paths
        except AttributeError:  # made by the compiled loop, which does not set it
            paths = None
        if paths is None:
            paths = self._paths = {}
        return paths

    def still_valid(self) -> bool:
        """True if the kernel still waits for an answer to this notification."""
        if self._memory is None:
            return False
        return self._memory.id_valid(self.id)

    def pidfd(self) -> int:
        """A pidfd for the calling thread, opened race-free (checked with ID_VALID after
        opening). The caller owns and closes it. Raises ``NotificationGone``."""
        return self._require_memory_no_mark().pidfd(self.id, self.pid)

    def _require_memory_no_mark(self) -> TargetMemory:
        if self._memory is None:
            raise TargetMemoryError(3, "this notification has no live target")
        return self._memory



#: The longest path the kernel takes, its NUL included (getname()).
PATH_MAX: Final = 4096
_U32: Final = abi.U32_MASK
_UMODE: Final = abi.UMODE_MASK
_POINTER_MASKS: Final = abi.POINTER_MASKS


def _bad_index(i: object) -> ValueError:
    return ValueError(f"argument index {i!r} is not in 0..5")


_new_object = object.__new__


def make_notification(id: int, pid: int, nr: int, arch: str, syscall: str,
                      args: tuple[int, ...], container: Container,
                      memory: TargetMemory | None) -> Notification:
    """``Notification(...)`` for the session's hot loop: positional, and without the
    keyword matching of the public constructor (a third of its cost)."""
    n: Notification = _new_object(Notification)
    n.id = id
    n.pid = pid
    n.nr = nr
    n.arch = arch
    n.syscall = syscall
    n.args = args
    n.container = container
    n._memory = memory
    n._read_memory = False
    n._paths = None
    return n

#: What ``PolicySet.on(paths=...)`` takes: the argument indexes whose registers point at
#: NUL-terminated paths, or a function of the notification returning them.
PathArgs = tuple[int, ...] | Callable[[Notification], tuple[int, ...]]

SyncHandler = Callable[[Notification], Decision | None]
AsyncHandler = Callable[[Notification], Awaitable[Decision | None]]
Handler = SyncHandler | AsyncHandler
H = TypeVar("H", bound=Handler)


class _SyscallValidator(Protocol):
    def __call__(self, name: str) -> bool: ...


def _default_syscall_validator(name: str) -> bool:
    from .syscalls import is_known

    return is_known(name)


@dataclass(frozen=True, slots=True)
class HandlerEntry:
    """A registered handler, with what the dispatcher needs to know about it. (The policy
    name is not stored here: the operator's name for the policy comes from the config.)"""

    syscall: str
    func: Handler
    is_async: bool
    #: The path arguments read before the handler runs (see :meth:`PolicySet.on`).
    paths: PathArgs | None = None


def path_indexes(value: object, where: str) -> tuple[int, ...]:
    """``value`` checked as a tuple of path argument indexes (0..5, each once), as a
    plain tuple: a subclass (a NamedTuple...) is copied first, and the copy checked and
    returned (what it iterates to later may differ). Raises PolicyError naming
    ``where``."""
    if isinstance(value, tuple) and value.__class__ is not tuple:
        value = tuple(value)
    if not isinstance(value, tuple) or not all(
            i.__class__ is int and 0 <= i < 6 for i in value):
        raise PolicyError(f"{where}: paths must be a tuple of argument indexes in 0..5, "
                          f"got {value!r}")
    if len(set(value)) != len(value):
        raise PolicyError(f"{where}: paths names an argument twice: {value!r}")
    return value


class PolicySet:
    """A named set of handlers, keyed by system call name.

    ``defaults`` declares the options the policy accepts and their default values; the
    operator's ``options`` table is checked against it when the policy loads (unknown
    keys and wrong types are refused), and the result is in :attr:`options`.

    ``unhandled`` is the answer this policy wants for a call that no handler of the
    chain decides (``allow()`` for "everything else continues"; a Decision, or a
    config-style string such as ``"allow"`` or ``"deny:ENOSYS"``). It replaces
    ``[defaults] unhandled`` for every chain this policy is in, unless the config file
    sets that key itself: the operator's word wins. Raises PolicyError for an
    ``inject_fd`` or anything that is not a decision.
    """

    def __init__(self, name: str, *, defaults: Mapping[str, Any] | None = None,
                 description: str = "", unhandled: Decision | str | None = None) -> None:
        if not name or not isinstance(name, str):
            raise PolicyError("a PolicySet needs a non-empty name")
        self.name = name
        self.description = description
        self.defaults: Mapping[str, Any] = MappingProxyType(dict(defaults or {}))
        self.options: Mapping[str, Any] = self.defaults
        self.unhandled: Decision | None = _unhandled_decision(name, unhandled)
        self._handlers: dict[str, HandlerEntry] = {}
        self._fallback: HandlerEntry | None = None
        self._on_configure: list[Callable[[Mapping[str, Any]], None]] = []
        self._on_session_end: list[Callable[[Container], None]] = []

    def __repr__(self) -> str:
        return f"<PolicySet {self.name!r} syscalls={sorted(self._handlers)}>"

    @property
    def syscalls(self) -> frozenset[str]:
        """Names of the system calls this policy has handlers for."""
        return frozenset(self._handlers)

    def handler_for(self, syscall: str) -> HandlerEntry | None:
        return self._handlers.get(syscall)

    @property
    def fallback_handler(self) -> HandlerEntry | None:
        """The :meth:`fallback` handler, or None."""
        return self._fallback

    def fallback(self, func: H) -> H:
        """Register the decorated function for every notified call this set has no
        :meth:`on` handler for (``n.syscall`` says which; ``nr_<n>`` for a number
        without a name). A chain asks the fallbacks after every handler registered for
        the call by name, its other policies' included: a catch-all never takes a call
        from a policy that handles it by name, wherever it stands in the chain.

        Raises PolicyError for a second fallback or a non-callable.
        """
        if self._fallback is not None:
            other = self._fallback.func
            raise PolicyError(f"policy {self.name!r}: a fallback is already registered "
                              f"({getattr(other, '__name__', other)})")
        is_async = inspect.iscoroutinefunction(func)
        if not is_async and not callable(func):
            raise PolicyError(f"policy {self.name!r}: fallback {func!r} is not callable")
        self._fallback = HandlerEntry("*", func, is_async)
        return func

    def on(self, *syscalls: str, paths: PathArgs | None = None) -> Callable[[H], H]:
        """Register the decorated function for ``syscalls`` (names, as in ``man 2``).

        ``paths``: the arguments (indexes 0..5) whose registers point at NUL-terminated
        paths the handler needs, read race-checked **before** it runs; the handler (a
        plain function or ``async def``) gets them from ``n.path(i)``. A tuple, or a
        function ``(Notification) -> tuple`` deciding from the registers (``()``: read
        nothing); that function is policy code (what it raises is a handler error) and
        runs before any read. Reading them this way costs no task per call.

        Raises PolicyError for an unknown name, a second handler for the same call or
        ``paths`` that are not argument indexes.
        """
        if not syscalls:
            raise PolicyError(f"policy {self.name!r}: on() needs at least one syscall name")
        if paths is not None and not callable(paths):
            paths = path_indexes(paths, f"policy {self.name!r}: on{syscalls!r}")

        def register(func: H) -> H:
            is_async = inspect.iscoroutinefunction(func)
            if not is_async and not callable(func):
                raise PolicyError(f"policy {self.name!r}: handler {func!r} is not callable")
            for name in syscalls:
                if not _default_syscall_validator(name):
                    raise PolicyError(
                        f"policy {self.name!r}: {getattr(func, '__name__', func)}: "
                        f"unknown system call {name!r}")
                if name in self._handlers:
                    other = self._handlers[name].func
                    raise PolicyError(
                        f"policy {self.name!r}: {name!r} already handled by "
                        f"{getattr(other, '__name__', other)}")
                self._handlers[name] = HandlerEntry(name, func, is_async, paths)
            return func

        return register

    def configure(self, func: Callable[[Mapping[str, Any]], None]) -> Callable[
            [Mapping[str, Any]], None]:
        """Register a function called with the validated options when the policy loads;
        a ValueError it raises is reported as a config error on this policy's options."""
        self._on_configure.append(func)
        return func

    def on_session_end(self, func: Callable[[Container], None]) -> Callable[[Container], None]:
        """Register a function called when a container's session ends."""
        self._on_session_end.append(func)
        return func

    def apply_options(self, options: Mapping[str, Any]) -> None:
        """Validate ``options`` against :attr:`defaults` and store them.

        Raises ValueError naming the offending key.
        """
        merged = dict(self.defaults)
        for key, value in options.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise ValueError(f"options.{key}: unknown option (known: {known})")
            default = self.defaults[key]
            if default is not None and not _same_kind(default, value):
                raise ValueError(
                    f"options.{key}: expected {type(default).__name__}, "
                    f"got {type(value).__name__}")
            merged[key] = value
        self.options = MappingProxyType(merged)
        for hook in self._on_configure:
            hook(self.options)

    def session_ended(self, container: Container) -> None:
        for hook in self._on_session_end:
            hook(container)


def _unhandled_decision(policy: str, value: Decision | str | None) -> Decision | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_decision(value)
        except ValueError as exc:
            raise PolicyError(f"policy {policy!r}: unhandled={exc}") from None
    if not isinstance(value, Decision) or value.kind == "inject_fd":
        raise PolicyError(f"policy {policy!r}: unhandled must be allow(), deny(...) or "
                          f"returns(...), not {value!r}")
    return value


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float) and isinstance(value, int):
        return True
    return isinstance(value, type(default))


def response_fields(decision: Decision) -> tuple[int, int, int]:
    """(val, error, flags) of the seccomp_notif_resp for a deny/returns/allow decision.

    ``error`` is the negative errno: a positive one would become a positive return value.
    """
    response = decision._response
    if response is None:
        raise ValueError("inject_fd is answered with ADDFD, not SEND")
    return response
