"""path_guard: refuse changes under configured directories (an advisory guard).

Denied with ``errno`` (default EACCES) when the path (or either path of a rename) is one
of ``prefixes`` or below it:

* ``mkdir``, ``mkdirat``, ``rmdir``, ``unlink``, ``unlinkat``, ``rename``, ``renameat``,
  ``renameat2``;
* ``open``, ``openat``, ``creat`` that may write: ``O_WRONLY``, ``O_RDWR``, ``O_CREAT``,
  ``O_TRUNC`` or ``O_TMPFILE`` (``creat`` always). A read-only open is allowed on the
  flags register alone, without reading the path.

Paths are read race-checked (the bytes are those the call passed while it waited).
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

Options: ``prefixes`` (list of absolute paths, required to be non-empty for the guard to
do anything), ``errno`` (an errno name, default ``"EACCES"``).
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from supervisor.emulate import AT_FDCWD
from supervisor.errors import NotificationGone
from supervisor.policy import Decision, Notification, PolicySet, allow, deny

policy = PolicySet(
    "path_guard",
    defaults={"prefixes": [], "errno": "EACCES"},
    description="deny mkdir/unlink/rename/writing opens under configured directories",
)

_state: dict[str, Any] = {"prefixes": (), "errno": errno.EACCES}

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
        prefixes.append(posixpath.normpath(prefix))
    name = options["errno"]
    number = getattr(errno, name, None) if isinstance(name, str) and name.isupper() else None
    if not isinstance(number, int) or not 0 < number < 512:
        raise ValueError(f"options.errno: {name!r} is not an errno name such as \"EACCES\"")
    _state["prefixes"] = tuple(prefixes)
    _state["errno"] = number


def is_guarded(path: str, prefixes: tuple[str, ...]) -> bool:
    """True if the normalised absolute ``path`` is one of ``prefixes`` or below one."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _resolve(n: Notification, path: str, dirfd: int) -> str:
    """``path`` as an absolute, lexically normalised path in the caller's root."""
    if not path.startswith("/"):
        where = "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}"
        try:
            base = os.readlink(f"/proc/{n.pid}/{where}")
            root = os.readlink(f"/proc/{n.pid}/root")
        except OSError:
            base = root = ""
        if not n.still_valid():  # the links read above were the caller's
            raise NotificationGone("id_valid")
        if not base.startswith("/"):
            # The fd is not open or not a path (a socket...), or the caller is not visible
            # here: refuse rather than guess (the kernel refuses the first two anyway).
            raise LookupError(f"cannot resolve the base of {path!r} ({where})")
        if root != "/" and (base == root or base.startswith(root + "/")):
            base = base[len(root):] or "/"
        path = base + "/" + path
    # normpath keeps a leading "//"; the kernel treats it as "/".
    return "/" + posixpath.normpath(path).lstrip("/")


@policy.on(*_PATHS)
async def guard(n: Notification) -> Decision:
    prefixes: tuple[str, ...] = _state["prefixes"]
    flags_arg = _FLAGS_ARG.get(n.syscall)
    if flags_arg is not None:
        flags = n.flags(flags_arg)
        if flags & O_ACCMODE == os.O_RDONLY and not flags & _WRITE_FLAGS:
            return allow(reason="read-only open")  # decided on the flags register only
    if not prefixes:
        return allow(reason="no guarded prefix")
    for dirfd_arg, path_arg in _PATHS[n.syscall]:
        raw = await n.read_path(path_arg)
        dirfd = AT_FDCWD if dirfd_arg is None else n.fd(dirfd_arg)
        try:
            path = _resolve(n, raw, dirfd)
        except LookupError as exc:
            return deny(_state["errno"], reason=str(exc))
        if is_guarded(path, prefixes):
            return deny(_state["errno"], reason=f"{n.syscall} {path} is under a guarded "
                                                "prefix")
    return allow(unchecked=True, reason="path not guarded (advisory check)")
