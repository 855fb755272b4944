"""hardening: refuse a few things containers rarely need and attackers like.

**No set-uid or set-gid files** (option ``allow_setid_bits``, default false), refused with
EPERM. Every call that gives a file a mode, in the x86_64, i386 and x32 ABIs:

* ``chmod``, ``fchmod``, ``fchmodat``, ``fchmodat2`` with S_ISUID or S_ISGID in the mode;
* ``open``, ``openat`` with ``O_CREAT`` or ``O_TMPFILE`` in the flags, and ``creat``,
  with S_ISUID or S_ISGID in the mode. Without those flags the kernel ignores the mode
  (and the call creates nothing), so it is allowed. The umask does not help: it only
  ever masks the 0777 bits. The kernel clears a new file's S_ISGID when the creator is
  not in its group and lacks CAP_FSETID, but never its S_ISUID;
* ``mknod``, ``mknodat`` of any node type with S_ISUID or S_ISGID (a regular file made
  by ``mknod`` keeps them);
* ``openat2``: see below.

``mkdir``/``mkdirat`` are not watched: the kernel keeps only the permission and sticky
bits of their mode (a new directory's S_ISGID comes from its parent, which a refused
``chmod`` or the image set). These decisions read only register values, decoded as the
kernel decodes them (``umode_t`` mode, ``int`` flags; an i386 call's registers cut to 32
bits), so ``allow()`` (CONTINUE) is exact: the kernel cannot see another mode than the
one checked.

**openat2** (option ``openat2``). Its flags and mode are in a ``struct open_how`` in the
caller's memory, and the kernel reads that struct again after CONTINUE: another thread
of the caller can rewrite it between our read and the kernel's (flags without
``O_CREAT`` when read, ``O_CREAT`` and mode 04755 when run). No read can make an allow
safe, so:

* ``"enosys"`` (the default): every ``openat2`` fails with ENOSYS, decided on nothing
  the caller can change. Programs treat that as a kernel older than 5.6 and fall back to
  ``openat``, which is checked exactly. (Programs that use ``openat2`` for
  ``RESOLVE_*`` path scoping fall back to resolving in user space, as they do on older
  kernels.)
* ``"check"``: read ``open_how`` (race-checked); a create with S_ISUID/S_ISGID → EPERM
  (a refusal holds: the call does not run), anything else → ``allow(unchecked=True)``.
  This stops ordinary programs but **not** a caller that races the check.

**Block devices**: ``mknod``/``mknodat`` of one → EPERM. Other nodes without set-id bits
are passed to the next policy of the chain (``devices`` creates character devices).

**The kernel keyring** (``add_key``, ``request_key``, ``keyctl``), which is not
namespaced → ENOSYS, so programs fall back as on a kernel without keys (option
``allow_keyring``).

**Chains.** Every policy of a chain that handles a call is asked, and an ``allow()``
does not end the chain (:mod:`supervisor.decide`): hardening's refusals hold wherever it
stands, and a policy after it still sees the calls hardening has no objection to.

**Notify these calls.** The policy only sees what the container's seccomp profile
notifies. ``open``/``openat`` are frequent: notify them only when they create, with two
conditions on the flags argument in one rule (``SCMP_CMP_MASKED_EQ`` of ``O_CREAT`` =
64, and of ``__O_TMPFILE`` = 0o20000000; the same index twice becomes two rules, OR).
List ``SCMP_ARCH_X86`` and ``SCMP_ARCH_X32`` in the profile's ``architectures``, or the
i386 and x32 variants of these calls get KILL (not notified, not run).

Not covered: ``io_uring`` (its ``IORING_OP_OPENAT`` runs without seccomp: deny
``io_uring_setup`` in the profile); file capabilities (``setxattr`` of
``security.capability``); set-id files that already exist (in the image, or made before
the policy applied) and hard links to them.
"""

from __future__ import annotations

import errno
import stat
import struct
from collections.abc import Mapping
from typing import Any

from supervisor.policy import Decision, Notification, PolicySet, allow, deny

policy = PolicySet(
    "hardening",
    defaults={"allow_setid_bits": False, "allow_keyring": False, "openat2": "enosys"},
    description="no setuid/setgid files, no block devices, no kernel keyring",
)

_SETID_BITS = stat.S_ISUID | stat.S_ISGID
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE (O_TMPFILE is this | O_DIRECTORY)
# build_open_how(): the mode is used only with one of these.
_USES_MODE = O_CREAT | O_TMPFILE_BIT
# struct open_how { u64 flags; u64 mode; u64 resolve; }: OPEN_HOW_SIZE_VER0.
_OPEN_HOW = struct.Struct("<QQQ")

# Argument positions, the same in the x86_64, i386 and x32 ABIs.
# chmod(path, mode), fchmod(fd, mode), fchmodat(dfd, path, mode), fchmodat2(dfd, path,
# mode, flags)
_CHMOD_MODE = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2}
# (flags, mode): open(path, flags, mode), openat(dfd, path, flags, mode); creat(path,
# mode) always creates.
_OPEN_ARGS: dict[str, tuple[int | None, int]] = {
    "open": (1, 2), "openat": (2, 3), "creat": (None, 1)}
_MKNOD_MODE = {"mknod": 1, "mknodat": 2}


# From the options, set by _check_options (every loaded copy of this file has its own):
# the mode bits refused. A module global, not a policy.options lookup: it is read per call.
_refused_bits = _SETID_BITS
_no_setid = allow(reason="no setuid/setgid bits")
_creates_nothing = allow(reason="creates nothing: the mode is not used")


@policy.configure
def _check_options(options: Mapping[str, Any]) -> None:
    global _refused_bits
    if options["openat2"] not in ("enosys", "check"):
        raise ValueError(f"options.openat2: expected \"enosys\" or \"check\", "
                         f"got {options['openat2']!r}")
    _refused_bits = 0 if options["allow_setid_bits"] else _SETID_BITS


def _refuse(n: Notification, mode: int) -> Decision:
    return deny(errno.EPERM, reason=f"{n.syscall} sets setuid/setgid bits "
                                    f"({mode & 0o7777:04o})")


@policy.on(*_CHMOD_MODE)
def no_setid_chmod(n: Notification) -> Decision | None:
    mode = n.mode(_CHMOD_MODE[n.syscall])
    return _refuse(n, mode) if mode & _refused_bits else _no_setid


@policy.on(*_OPEN_ARGS)
def no_setid_create(n: Notification) -> Decision | None:
    flags_arg, mode_arg = _OPEN_ARGS[n.syscall]
    if flags_arg is not None and not n.flags(flags_arg) & _USES_MODE:
        return _creates_nothing
    mode = n.mode(mode_arg)
    return _refuse(n, mode) if mode & _refused_bits else _no_setid


@policy.on("openat2")
async def no_setid_openat2(n: Notification) -> Decision | None:
    if policy.options["allow_setid_bits"]:
        return allow(reason="setuid/setgid bits allowed by option")
    if policy.options["openat2"] == "enosys":
        return deny(errno.ENOSYS, reason="openat2: its mode is in memory, where it can "
                                         "change after a check; use openat")
    if n.ulong(3) < _OPEN_HOW.size:
        return allow(reason="openat2 with a short open_how fails with EINVAL")
    flags, mode, _resolve = _OPEN_HOW.unpack(await n.read_bytes(n.pointer(2),
                                                                _OPEN_HOW.size))
    # The kernel refuses (EINVAL) an open_how mode with bits outside S_IALLUGO, and any
    # mode without O_CREAT/O_TMPFILE: no truncation to decode here.
    if flags & _USES_MODE and mode & _SETID_BITS:
        return deny(errno.EPERM, reason=f"openat2 creates with setuid/setgid bits "
                                        f"({mode & 0o7777:04o})")
    return allow(reason="openat2: no setuid/setgid bits when read (advisory)",
                 unchecked=True)


@policy.on(*_MKNOD_MODE)
def no_block_devices_or_setid_nodes(n: Notification) -> Decision | None:
    mode = n.mode(_MKNOD_MODE[n.syscall])
    if stat.S_ISBLK(mode):
        return deny(errno.EPERM, reason="block device node")
    if mode & _refused_bits:
        return _refuse(n, mode)
    return None  # not hardening's business: the next policy of the chain decides


@policy.on("add_key", "request_key", "keyctl")
def no_keyring(n: Notification) -> Decision | None:
    if policy.options["allow_keyring"]:
        return allow(reason="keyring allowed by option")
    return deny(errno.ENOSYS, reason="kernel keyring is not namespaced")
