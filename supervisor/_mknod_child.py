"""Child side of :func:`supervisor.emulate.mknod_as_caller` (runs in its own interpreter,
standard library only).

It enters the caller's mount namespace, takes the caller's root (chroot) and working
directory (or the directory fd the caller passed), becomes the caller for file-system
checks (fsuid, fsgid, groups) while keeping CAP_MKNOD, applies the caller's umask, and
makes the node. Path resolution is then the kernel's own, as the caller would get it:
``..`` and absolute symlinks stop at the caller's root, and permissions are checked as the
caller. On top of that, the parent directory is opened with ``openat2`` and
``RESOLVE_NO_MAGICLINKS``, so a ``/proc/PID/root/...``-style link cannot lead out.

Input: one JSON argument. Output: one line on stdout, ``0`` or the errno of the failure.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import sys

CLONE_NEWNS = 0x00020000
SYS_OPENAT2 = 437
SYS_CAPGET = 125
SYS_CAPSET = 126
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_MKNOD = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _raise_cap_mknod() -> None:
    # setfsuid() to a non-zero id drops the file-system capabilities, CAP_MKNOD among
    # them, from the effective set; they stay permitted, so they can be raised again.
    header = ctypes.create_string_buffer(struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable}
    _check(_libc.syscall(SYS_CAPGET, header, data), "capget")
    words = list(struct.unpack("<6I", data.raw))
    words[0] |= 1 << CAP_MKNOD
    data = ctypes.create_string_buffer(struct.pack("<6I", *words))
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset")


def _open_dir(path: bytes) -> int:
    how = struct.pack("<QQQ", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                      RESOLVE_NO_MAGICLINKS)
    return _check(_libc.syscall(SYS_OPENAT2, AT_FDCWD, ctypes.c_char_p(path),
                                ctypes.c_char_p(how), len(how)), "openat2")


def _int(spec: dict[str, object], key: str) -> int:
    value = spec[key]
    if not isinstance(value, int):
        raise ValueError(f"{key}: expected an int")
    return value


def make_node(spec: dict[str, object]) -> None:
    mnt, root, base = _int(spec, "mnt_fd"), _int(spec, "root_fd"), _int(spec, "base_fd")
    _check(_libc.setns(mnt, CLONE_NEWNS), "setns")
    os.fchdir(root)
    os.chroot(".")
    if base >= 0:
        os.fchdir(base)
    else:
        os.chdir("/")
    for fd in (mnt, root, base):
        if fd >= 0:
            os.close(fd)
    groups = spec["groups"]
    assert isinstance(groups, list)
    os.setgroups([int(g) for g in groups])
    _libc.setfsgid(_int(spec, "gid"))
    _libc.setfsuid(_int(spec, "uid"))
    _raise_cap_mknod()
    os.umask(_int(spec, "umask"))
    path = bytes.fromhex(str(spec["path"]))
    mode = _int(spec, "mode")
    dev = os.makedev(_int(spec, "major"), _int(spec, "minor"))
    head, slash, tail = path.rpartition(b"/")
    if not slash:
        head, tail = b".", path
    elif not head:
        head = b"/"
    if tail in (b"", b".", b".."):
        # Never a new name: the kernel refuses it (EEXIST, ENOENT...) without creating.
        os.mknod(path, mode, dev)
        return
    dirfd = _open_dir(head)
    try:
        os.mknod(tail, mode, dev, dir_fd=dirfd)
    finally:
        os.close(dirfd)


def main(argv: list[str]) -> None:
    try:
        make_node(json.loads(argv[0]))
    except OSError as exc:
        print(exc.errno or errno.EIO, flush=True)
        return
    print(0, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
