"""hardening: refuse a few things containers rarely need and attackers like.

Every decision here is made on register values only, so ``allow()`` (CONTINUE) is safe:
the kernel cannot be made to see a different mode or device number than we checked.

* ``chmod``/``fchmod``/``fchmodat``/``fchmodat2`` that set the setuid or setgid bit
  → EPERM (option ``allow_setid_bits``);
* ``mknod``/``mknodat`` of a block device → EPERM; other node types pass to the next
  policy of the chain;
* the kernel keyring (``add_key``, ``request_key``, ``keyctl``), which is not namespaced
  → ENOSYS, so programs fall back as on a kernel without keys (option ``allow_keyring``).
"""

from __future__ import annotations

import errno
import stat

from supervisor.policy import Decision, Notification, PolicySet, allow, deny

policy = PolicySet(
    "hardening",
    defaults={"allow_setid_bits": False, "allow_keyring": False},
    description="no setuid/setgid chmod, no block devices, no kernel keyring",
)

# Where the mode is, per call: chmod(path, mode), fchmod(fd, mode), fchmodat(dfd, path,
# mode), fchmodat2(dfd, path, mode, flags).
_MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2}
_SETID_BITS = stat.S_ISUID | stat.S_ISGID


@policy.on("chmod", "fchmod", "fchmodat", "fchmodat2")
def no_setid_bits(n: Notification) -> Decision:
    mode = n.args[_MODE_ARG[n.syscall]] & 0o7777
    if mode & _SETID_BITS and not policy.options["allow_setid_bits"]:
        return deny(errno.EPERM, reason=f"{n.syscall} sets setuid/setgid bits ({mode:04o})")
    return allow(reason="no setuid/setgid bits")


@policy.on("mknod", "mknodat")
def no_block_devices(n: Notification) -> Decision | None:
    mode = n.args[1] if n.syscall == "mknod" else n.args[2]
    if stat.S_ISBLK(mode):
        return deny(errno.EPERM, reason="block device node")
    return None


@policy.on("add_key", "request_key", "keyctl")
def no_keyring(n: Notification) -> Decision:
    if policy.options["allow_keyring"]:
        return allow(reason="keyring allowed by option")
    return deny(errno.ENOSYS, reason="kernel keyring is not namespaced")
