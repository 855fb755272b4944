"""path_guard: refuse changes under configured directories (advisory, or enforced).

Denied with ``errno`` (default EACCES) when the path (or either path of a rename) is one
of ``prefixes`` or below it:

* ``mkdir``, ``mkdirat``, ``rmdir``, ``unlink``, ``unlinkat``, ``rename``, ``renameat``,
  ``renameat2``;
* ``open``, ``openat``, ``creat`` that may write: ``O_WRONLY``, ``O_RDWR``, ``O_CREAT``,
  ``O_TRUNC`` or ``O_TMPFILE`` (``creat`` always). A read-only open is allowed on the
  flags register alone, without reading the path.

Paths are read race-checked (the bytes are those the call passed while it waited), and
before the handler runs (``PolicySet.on(..., paths=...)``: no task per guarded call):
every path argument of a guarded call, none of a read-only open or when no prefix is
configured.
Relative paths are resolved against the caller's working directory or dirfd, read from
``/proc/<tid>/cwd`` / ``/proc/<tid>/fd/N`` and expressed in the caller's root, then
normalised lexically (``..`` and ``.`` folded, symlinks **not** followed).

**Why an allow here is only ``allow(unchecked=True)``.** After CONTINUE the kernel reads
the path from the caller's memory again and resolves it again. Between our check and
that, another thread of the caller can rewrite the string, and anybody can replace a
directory on the way with a symlink. So the guard stops honest mistakes and ordinary
programs, not an adversary that races it: it is not a security boundary. A decision
that must hold needs **emulation**: the supervisor does the call itself from its own copy
of the arguments, resolving the path in the caller's root without following symlinks out
of it (``openat2`` with ``RESOLVE_IN_ROOT``/``RESOLVE_NO_SYMLINKS``), and answers with
the result -- ``inject_fd`` for an open, ``returns(0)`` for a mkdir -- so the kernel never
re-reads anything. ``policies/devices.py`` is such an emulation for ``mknod``. For
write-protecting directories in containers, read-only mounts remain the tool.

Not covered: ``link``/``symlink``, ``truncate``, ``chmod``/``chown``, ``openat2`` (its
flags are in memory), and calls that reach a guarded file through an fd opened before.

**Enforcing mode** (``mode = "enforce"``) is that emulation. The guarded calls above are
carried out by the emulation helper as the caller (:func:`supervisor.caller.run`:
its mount namespace, root, cwd/dirfd, fsuid/fsgid, groups, umask and capabilities) from
the supervisor's one copy of the path, and the caller gets the result (``inject_fd`` for
an open, ``returns(0)`` otherwise); nothing is CONTINUEd, so nothing is read twice. The
check is made on what the path *resolves to*, in the caller's root: the directory the
name is created, removed, renamed or opened in is opened first (``openat2`` with
``RESOLVE_NO_MAGICLINKS``; symlinks followed, ``/proc`` magic links refused with ELOOP,
``..`` stopping at the caller's root), then judged by its kernel path and by the
(device, inode) of every directory from it up to the root against the guarded
directories; the call is done on that directory fd, so no rename or symlink swap after
the check changes where it lands. A symlink as the last component of an open is followed
one step at a time, each step checked the same way. A writing open of a regular file with
more than one hard link is refused (another name of it may be under a guarded directory),
``O_TRUNC`` is applied only after that check, and ``O_RDONLY|O_TRUNC`` is refused.
``openat2`` gets ENOSYS in this mode (its flags are in memory: callers such as glibc fall
back to ``openat``). Costs: one emulation (~3-5 ms) per guarded call, read-only opens
excepted (decided on the flags register).

Options: ``prefixes`` (list of absolute paths, required to be non-empty for the guard to
do anything), ``errno`` (an errno name, default ``"EACCES"``), ``mode`` (``"advisory"``,
the default, or ``"enforce"``), ``emulation_rate``/``emulation_burst`` (enforce: guarded
calls emulated per second per container, default 100 and 100; over them a call waits
for its turn within its deadline, else gets EAGAIN).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from supervisor import caller
from supervisor.caller import AT_FDCWD, AT_REMOVEDIR, EmulationBusy, Limits
from supervisor.errors import NotificationGone
from supervisor.policy import (
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
    normalised_path,
)

policy = PolicySet(
    "path_guard",
    defaults={"prefixes": [], "errno": "EACCES", "mode": "advisory",
              "emulation_rate": 100.0, "emulation_burst": 100},
    description="deny mkdir/unlink/rename/writing opens under configured directories",
)

_state: dict[str, Any] = {"prefixes": (), "errno": errno.EACCES, "enforce": False,
                          "limits": Limits(), "below": ()}
MODES = ("advisory", "enforce")

O_ACCMODE = 0o3
O_CREAT = 0o100
O_TRUNC = 0o1000
O_TMPFILE = 0o20000000  # includes O_DIRECTORY
_WRITE_FLAGS = O_CREAT | O_TRUNC | O_TMPFILE

# syscall -> ((dirfd arg or None, path arg), ...)
_PATHS: dict[str, tuple[tuple[int | None, int], ...]] = {
    "mkdir": ((None, 0),),
    "mkdirat": ((0, 1),),
    "rmdir": ((None, 0),),
    "unlink": ((None, 0),),
    "unlinkat": ((0, 1),),
    "rename": ((None, 0), (None, 1)),
    "renameat": ((0, 1), (2, 3)),
    "renameat2": ((0, 1), (2, 3)),
    "open": ((None, 0),),
    "openat": ((0, 1),),
    "creat": ((None, 0),),
}
_FLAGS_ARG = {"open": 1, "openat": 2}


@policy.configure
def _check_options(options: Mapping[str, Any]) -> None:
    prefixes = []
    for i, prefix in enumerate(options["prefixes"]):
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"options.prefixes[{i}]: must be an absolute path, "
                             f"got {prefix!r}")
        prefixes.append(normalised_path(os.fsencode(prefix)))  # paths are bytes, as checked
    name = options["errno"]
    number = getattr(errno, name, None) if isinstance(name, str) and name.isupper() else None
    if not isinstance(number, int) or not 0 < number < 512:
        raise ValueError(f"options.errno: {name!r} is not an errno name such as \"EACCES\"")
    mode = options["mode"]
    if mode not in MODES:
        raise ValueError(f"options.mode: expected \"advisory\" or \"enforce\", got {mode!r}")
    rate, burst = options["emulation_rate"], options["emulation_burst"]
    if not 0 <= rate < 1e6:
        raise ValueError(f"options.emulation_rate: must be >= 0 (0: no limit), got {rate!r}")
    if not 1 <= burst <= 1_000_000:
        raise ValueError(f"options.emulation_burst: must be in 1..1000000, got {burst!r}")
    _state["prefixes"] = tuple(prefixes)
    _state["below"] = _below(_state["prefixes"])
    _state["errno"] = number
    _denied.clear()
    _state["enforce"] = mode == "enforce"
    _state["limits"] = Limits(rate=float(rate), burst=burst)


def _text(path: bytes) -> str:
    """A path for a reason: what is not UTF-8 shown as ``\\xNN``."""
    return path.decode("utf-8", "backslashreplace")


def is_guarded(path: bytes, prefixes: tuple[bytes, ...]) -> bool:
    """True if the normalised absolute ``path`` is one of ``prefixes`` or below one."""
    return path in prefixes or path.startswith(_below(prefixes))


def _below(prefixes: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """What a path below one of ``prefixes`` starts with: each prefix and a ``/`` (the
    configured ones made once, when the options are applied)."""
    return tuple(p.rstrip(b"/") + b"/" for p in prefixes)


def _resolve(n: Notification, path: bytes, dirfd: int) -> bytes:
    """``path`` as an absolute, lexically normalised path in the caller's root."""
    if not path.startswith(b"/"):
        where = "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}"
        try:
            base = os.readlink(os.fsencode(f"/proc/{n.pid}/{where}"))
            root = os.readlink(os.fsencode(f"/proc/{n.pid}/root"))
        except OSError:
            base = root = b""
        if not n.still_valid():  # the links read above were the caller's
            raise NotificationGone("id_valid")
        if not base.startswith(b"/"):
            # The fd is not open or not a path (a socket...), or the caller is not visible
            # here: refuse rather than guess (the kernel refuses the first two anyway).
            raise LookupError(f"cannot resolve the base of {path!r} ({where})")
        if root != b"/" and (base == root or base.startswith(root + b"/")):
            base = base[len(root):] or b"/"
        path = base + b"/" + path
    return normalised_path(path)


@policy.on("openat2")
def no_openat2(n: Notification) -> Decision | None:
    if _state["enforce"] and _state["prefixes"]:
        # Its flags are in memory (struct open_how): refused, so callers fall back to
        # openat, which is emulated.
        return deny(errno.ENOSYS, reason="openat2 is not emulated (enforcing path_guard)")
    return None


def _paths_to_read(n: Notification) -> tuple[int, ...]:
    """The path arguments :func:`guard` needs, read (race-checked) before it runs: none
    for a read-only open (decided on the flags register: the most common call there
    is) or without a guarded prefix; else every path of the call."""
    flags_arg = _FLAGS_ARG.get(n.syscall)
    if flags_arg is not None:
        flags = n.flags(flags_arg)
        if flags & O_ACCMODE == os.O_RDONLY and not flags & _WRITE_FLAGS:
            return ()
    if not _state["prefixes"]:
        return ()
    return _PATH_ARGS[n.syscall]


_PATH_ARGS = {name: tuple(arg for _, arg in pairs) for name, pairs in _PATHS.items()}


#: (call name, normalised path) -> its refusal, for the paths refused last: the reason
#: names the path, and building it per call (decoding, formatting, hashing the text for
#: deny()'s cache) cost more than the prefix check. Emptied when full. Made with
#: Decision(), not deny(): deny()'s cache is shared by every policy, and the paths a
#: container chooses would fill it (each reason up to 16 KiB).
_denied: dict[tuple[str, bytes], Decision] = {}
_DENIED_MAX = 64


def _refusal(syscall: str, path: bytes) -> Decision:
    """``deny(errno, reason=...)`` for ``syscall`` on the guarded ``path``."""
    key = (syscall, path)
    decision = _denied.get(key)
    if decision is None:
        if len(_denied) >= _DENIED_MAX:
            _denied.clear()
        decision = _denied[key] = _refused(
            f"{syscall} {_text(path)} is under a guarded prefix")
    return decision


def _refused(reason: str) -> Decision:
    """``deny(errno, reason=reason)`` for a reason that names what the caller chose (a
    path): made, not taken from or put in deny()'s shared cache (see _denied)."""
    return Decision("deny", errno=_state["errno"], reason=reason)


@policy.on(*_PATHS, paths=_paths_to_read)
async def guard(n: Notification) -> Decision:
    prefixes: tuple[bytes, ...] = _state["prefixes"]
    flags_arg = _FLAGS_ARG.get(n.syscall)
    if flags_arg is not None:
        flags = n.flags(flags_arg)
        if flags & O_ACCMODE == os.O_RDONLY and not flags & _WRITE_FLAGS:
            return allow(reason="read-only open")  # decided on the flags register only
    if not prefixes:
        return allow(reason="no guarded prefix")
    if _state["enforce"]:
        return await _enforce(n, prefixes)
    for dirfd_arg, path_arg in _PATHS[n.syscall]:
        raw = n.path(path_arg)  # read before guard() ran (_paths_to_read)
        dirfd = AT_FDCWD if dirfd_arg is None else n.fd(dirfd_arg)
        try:
            path = _resolve(n, raw, dirfd)
        except LookupError as exc:
            return _refused(str(exc))
        if path in prefixes or path.startswith(_state["below"]):  # is_guarded()
            return _refusal(n.syscall, path)
    return allow(unchecked=True, reason="path not guarded (advisory check)")


# syscall -> builds the operation from the registers and the paths read (bytes)
_CREAT_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_TRUNC


def _operation(n: Notification, paths: list[bytes]) -> caller.Operation | int:
    """The emulated operation for ``n``, or the errno the kernel gives for its
    arguments."""
    name = n.syscall
    if name == "open":
        return caller.Open(paths[0], n.flags(1), n.mode(2) & 0o7777)
    if name == "openat":
        return caller.Open(paths[0], n.flags(2), n.mode(3) & 0o7777, n.fd(0))
    if name == "creat":
        return caller.Open(paths[0], _CREAT_FLAGS, n.mode(1) & 0o7777)
    if name == "mkdir":
        return caller.Mkdir(paths[0], n.mode(1) & 0o7777)
    if name == "mkdirat":
        return caller.Mkdir(paths[0], n.mode(2) & 0o7777, n.fd(0))
    if name == "rmdir":
        return caller.Unlink(paths[0], flags=AT_REMOVEDIR)
    if name == "unlink":
        return caller.Unlink(paths[0])
    if name == "unlinkat":
        flags = n.flags(2)
        if flags & ~AT_REMOVEDIR:
            return errno.EINVAL
        return caller.Unlink(paths[0], n.fd(0), flags)
    if name == "rename":
        return caller.Rename(paths[0], paths[1])
    flags = n.flags(4) if name == "renameat2" else 0
    return caller.Rename(paths[0], paths[1], n.fd(0), n.fd(2), flags)


async def _enforce(n: Notification, prefixes: tuple[bytes, ...]) -> Decision:
    """Carry the call out as the caller, refusing it if it resolves under a prefix."""
    paths = [n.path(arg) for _, arg in _PATHS[n.syscall]]
    op = _operation(n, paths)
    if isinstance(op, int):
        return deny(op, reason=f"{n.syscall}: invalid flags")
    try:
        result = await caller.run(n, op, guard=prefixes, limits=_state["limits"])
    except EmulationBusy as busy:
        return deny(busy.errno, reason=f"{n.syscall}: {busy}")
    if result.guarded is not None:
        where = result.guarded.decode("utf-8", "backslashreplace")
        return _refused(f"{n.syscall} resolves to {where}, under a guarded prefix "
                        "(enforced)")
    return caller.decision(op, result, reason=f"emulated {n.syscall} (enforced guard)")
