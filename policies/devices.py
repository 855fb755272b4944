"""devices: create harmless character devices for containers that may not (mknod).

A container without CAP_MKNOD, or in a user namespace (where CAP_MKNOD does not count),
cannot create device nodes, yet system containers and image builds expect to create
``/dev/null`` and friends. For ``mknod``/``mknodat``:

* a character device on the allowlist (option ``allow``, default ``null 1:3``,
  ``zero 1:5``, ``full 1:7``, ``random 1:8``, ``urandom 1:9``, ``tty 5:0`` and the
  overlayfs whiteout ``0:0``) is **created by the supervisor on the container's behalf**
  (:func:`supervisor.caller.mknod`): in the caller's mount namespace, under its
  root, relative to its working directory or dirfd, with its fsuid/fsgid, groups and
  umask, its own effective capabilities (none if it is in another user namespace) plus
  CAP_MKNOD and nothing else, and without following a symlink (or a ``/proc`` magic
  link) out of its root.
  The caller gets 0 or the errno the creation failed with (EEXIST, EACCES, ENOENT...);
* every other character device, and every block device → EPERM;
* FIFOs, sockets and regular files need no privilege: they are decided on the mode
  register alone and left to the kernel (CONTINUE, exact: nothing was read).

The path is read race-checked and the node is made from that copy, so a thread that
swaps the path after the check changes nothing (no CONTINUE after the read).

Options: ``allow`` (list of ``"MAJOR:MINOR"`` strings), ``require_cap_mknod`` (bool,
default false: when true, only callers whose effective capabilities include CAP_MKNOD,
e.g. root in a user-namespaced container, get nodes; others get EPERM);
``emulation_rate`` (nodes per second per container, default 100; 0: no limit) and
``emulation_burst`` (default 100): over them a call waits for its turn if that comes
before its deadline, else gets EAGAIN without being tried, so one container cannot keep
the emulation helper from the others.

Limits: a node on a ``nodev`` mount is created but cannot be opened (as for the
container's own nodes); if the call is interrupted and restarted by a signal after the
node was made, the restarted call sees EEXIST.
"""

from __future__ import annotations

import errno
import re
import stat
from collections.abc import Mapping
from typing import Any

from supervisor import caller
from supervisor.emulate import decode_dev
from supervisor.policy import Decision, Notification, PolicySet, allow, deny

DEFAULT_ALLOW = ["1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "0:0"]

policy = PolicySet(
    "devices",
    defaults={"allow": list(DEFAULT_ALLOW), "require_cap_mknod": False,
              "emulation_rate": 100.0, "emulation_burst": 100},
    description="create allowlisted character devices on the container's behalf",
)

_DEV_RE = re.compile(r"([0-9]{1,4}):([0-9]{1,7})")
_allowed: set[tuple[int, int]] = set()
_limits: list[caller.Limits] = [caller.Limits()]


def parse_devices(values: list[Any]) -> set[tuple[int, int]]:
    """``["1:3", ...]`` → {(1, 3), ...}. Raises ValueError naming the bad entry."""
    found: set[tuple[int, int]] = set()
    for i, value in enumerate(values):
        m = _DEV_RE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError(f"options.allow[{i}]: expected \"MAJOR:MINOR\" "
                             f"(e.g. \"1:3\" for /dev/null), got {value!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major >= 1 << 12 or minor >= 1 << 20:
            raise ValueError(f"options.allow[{i}]: {value!r} is out of range "
                             "(major < 4096, minor < 1048576)")
        found.add((major, minor))
    return found


@policy.configure
def _check_options(options: Mapping[str, Any]) -> None:
    devices = parse_devices(options["allow"])
    rate, burst = options["emulation_rate"], options["emulation_burst"]
    if not 0 <= rate < 1e6:
        raise ValueError(f"options.emulation_rate: must be >= 0 (0: no limit), got {rate!r}")
    if not 1 <= burst <= 1_000_000:
        raise ValueError(f"options.emulation_burst: must be in 1..1000000, got {burst!r}")
    _allowed.clear()
    _allowed.update(devices)
    _limits[0] = caller.Limits(rate=float(rate), burst=burst)


@policy.on("mknod", "mknodat")
async def make_device(n: Notification) -> Decision:
    at = n.syscall == "mknodat"
    mode = n.mode(2 if at else 1)
    kind = stat.S_IFMT(mode)
    if kind not in (stat.S_IFCHR, stat.S_IFBLK):
        return allow(reason="not a device node")  # decided on the mode register only
    major, minor = decode_dev(n.uint32(3 if at else 2))
    if kind == stat.S_IFBLK:
        return deny(errno.EPERM, reason=f"block device {major}:{minor}")
    if (major, minor) not in _allowed:
        return deny(errno.EPERM, reason=f"character device {major}:{minor} not allowed")
    path = await n.read_path(1 if at else 0)  # bytes, as passed
    dirfd = n.fd(0) if at else caller.AT_FDCWD
    if policy.options["require_cap_mknod"] and \
            not caller.credentials(n).has_capability(caller.CAP_MKNOD):
        return deny(errno.EPERM, reason="caller lacks CAP_MKNOD")
    where = path.decode("utf-8", "backslashreplace")
    # CAP_MKNOD is the one privilege added: the device was checked above.
    return await caller.mknod(n, path, mode, major, minor, dirfd=dirfd,
                              add_capabilities=1 << caller.CAP_MKNOD, limits=_limits[0],
                              reason=f"created {where} (char {major}:{minor}) for the caller")
