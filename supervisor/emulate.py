"""Doing a call on a target's behalf: the caller's credentials, root, working directory
and mount namespace, opened race-free, and device-node creation as the caller.

Why emulate: after a handler read a pointer argument, CONTINUE lets the kernel read it
again, and another thread may have changed it in between (DESIGN.md §4.9). A decision that
must hold is carried out by the supervisor itself, with its own copy of the arguments, and
the target gets the result (``returns(0)`` or ``deny(errno)``); nothing is re-read.

Race checks: everything about the caller is opened through ``/proc/<tid>/...`` and then
the notification is checked to still be pending (ID_VALID). While it is pending the
calling thread is alive and blocked in the call, so ``<tid>`` still names it and the
files opened before the check are its own. The pure parts (:func:`parse_status`,
:func:`decode_dev`, :func:`signed_fd`) do no I/O.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from . import abi
from .errors import NotificationGone, TargetMemoryError
from .policy import Notification

__all__ = [
    "AT_FDCWD",
    "Caller",
    "Credentials",
    "EmulationError",
    "decode_dev",
    "encode_dev",
    "mknod_as_caller",
    "open_caller",
    "parse_status",
    "signed_fd",
]

AT_FDCWD: Final = -100
_PACKAGE_PARENT: Final = str(Path(__file__).resolve().parent.parent)
_BOOTSTRAP: Final = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from supervisor._mknod_child import main; main(sys.argv[1:])"
)
# A helper that has not answered by then is killed; the handler's deadline is shorter.
_HELPER_TIMEOUT: Final = 10.0


class EmulationError(Exception):
    """The supervisor could not do the call (not the call failing: that is an errno)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the kernel checks file-system access with, from ``/proc/<tid>/status``:
    ``uid``/``gid`` are the *file-system* ids, as seen from the supervisor's user
    namespace; ``cap_effective`` is the ``CapEff`` bit mask."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    cap_effective: int

    def has_capability(self, number: int) -> bool:
        return bool(self.cap_effective >> number & 1)


def parse_status(text: str) -> Credentials:
    """Credentials from the text of ``/proc/<tid>/status``. Raises ValueError if a
    field is missing or malformed."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    try:
        uids = fields["Uid"].split()
        gids = fields["Gid"].split()
        return Credentials(
            uid=int(uids[3]),
            gid=int(gids[3]),
            groups=tuple(int(g) for g in fields.get("Groups", "").split()),
            umask=int(fields["Umask"], 8),
            cap_effective=int(fields["CapEff"], 16),
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"malformed /proc status: {exc!r}") from None


def decode_dev(raw: int) -> tuple[int, int]:
    """(major, minor) of the ``dev`` argument of mknod/mknodat, as the kernel decodes it
    (``new_decode_dev`` of the ``unsigned int``, the low 32 bits in every ABI: 12-bit
    major, 20-bit minor). ``raw`` may be the register or ``n.uint32(i)``."""
    dev = abi.arg_u32(raw)
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def encode_dev(major: int, minor: int) -> int:
    """Inverse of :func:`decode_dev` (``new_encode_dev``)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def signed_fd(raw: int) -> int:
    """A dirfd argument (an ``int`` in a register) as the kernel reads it; the same as
    ``Notification.fd(i)``, which handlers should prefer."""
    return abi.arg_s32(raw)


@dataclass
class Caller:
    """Open handles on the calling thread's mount namespace, root and base directory
    (``base_fd`` -1: the path is absolute), and its credentials. Owns the fds."""

    mnt_fd: int
    root_fd: int
    base_fd: int
    credentials: Credentials

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.mnt_fd, self.root_fd, self.base_fd) if fd >= 0)

    def close(self) -> None:
        for name in ("mnt_fd", "root_fd", "base_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def open_caller(n: Notification, path: bytes, dirfd: int = AT_FDCWD) -> Caller:
    """Open what is needed to act as the caller of ``n`` on ``path`` (relative to
    ``dirfd`` when it is not absolute), race-checked.

    Raises TargetMemoryError with the errno the caller gets for a bad ``dirfd`` (EBADF,
    ENOTDIR) or EPERM when the caller is not visible here; NotificationGone if the call
    was abandoned.
    """
    tid = n.pid
    if tid <= 0:
        raise TargetMemoryError(errno.EPERM, "the caller is not visible in our pid namespace")
    proc = f"/proc/{tid}"
    opened: list[int] = []

    def open_(name: str, flags: int) -> int:
        try:
            fd = os.open(f"{proc}/{name}", flags | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            if not n.still_valid():
                raise NotificationGone("id_valid") from None
            if name.startswith("fd/"):
                raise TargetMemoryError(errno.EBADF, f"dirfd {name[3:]} is not open") from None
            raise
        opened.append(fd)
        return fd

    try:
        mnt_fd = open_("ns/mnt", os.O_RDONLY)
        root_fd = open_("root", os.O_PATH | os.O_DIRECTORY)
        base_fd = -1
        if not path.startswith(b"/"):
            where = "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}"
            if dirfd != AT_FDCWD and dirfd < 0:
                raise TargetMemoryError(errno.EBADF, f"dirfd {dirfd}")
            try:
                base_fd = open_(where, os.O_PATH | os.O_DIRECTORY)
            except NotADirectoryError:
                raise TargetMemoryError(errno.ENOTDIR, f"dirfd {dirfd} is not a "
                                                       "directory") from None
        status_fd = open_("status", os.O_RDONLY)
        try:
            text = os.read(status_fd, 65536).decode("ascii", "replace")
        finally:
            opened.remove(status_fd)
            os.close(status_fd)
        if not n.still_valid():  # the files opened above belong to the caller
            raise NotificationGone("id_valid")
        return Caller(mnt_fd, root_fd, base_fd, parse_status(text))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


async def mknod_as_caller(n: Notification, path: bytes, mode: int, major: int, minor: int,
                          dirfd: int = AT_FDCWD) -> int:
    """Create the node ``path`` (type and permissions in ``mode``, device
    ``major:minor``) as the caller of ``n`` would: in its mount namespace, under its root,
    relative to its working directory or ``dirfd``, with its fsuid, fsgid, groups and
    umask (CAP_MKNOD is the only privilege added). Returns 0 or the errno the caller
    should get.

    Raises NotificationGone, TargetMemoryError (see :func:`open_caller`) and
    EmulationError if the helper process fails.
    """
    if not path:
        return errno.ENOENT
    caller = open_caller(n, path, dirfd)
    try:
        creds = caller.credentials
        spec = {
            "mnt_fd": caller.mnt_fd, "root_fd": caller.root_fd, "base_fd": caller.base_fd,
            "path": path.hex(), "mode": mode & 0o177777, "major": major,
            "minor": minor, "uid": creds.uid, "gid": creds.gid, "groups": list(creds.groups),
            "umask": creds.umask,
        }
        with trio.fail_after(_HELPER_TIMEOUT):
            done = await trio.run_process(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, _PACKAGE_PARENT,
                 json.dumps(spec)],
                pass_fds=caller.fds(), capture_stdout=True, capture_stderr=True, check=False)
    except trio.TooSlowError:
        raise EmulationError("the mknod helper did not answer") from None
    finally:
        caller.close()
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0 or not out.isdigit():
        err = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise EmulationError(f"the mknod helper failed (status {done.returncode}): "
                             f"{err[0] if err else out!r}")
    return int(out)
