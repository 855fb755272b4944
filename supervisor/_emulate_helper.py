"""The emulation helper: a small fork server that does file-system calls as a caller.

Standard library only, single-threaded. The daemon starts it once (``python -I -S -c``,
before it drops the capabilities only this process needs; the helper itself keeps only
:data:`HELPER_CAPABILITIES`) with one end of a ``SOCK_SEQPACKET`` socketpair (its number
on the command line), and sends it one message per call to carry out: a JSON
:class:`Request` plus, in ``SCM_RIGHTS``, the fds ``[reply, mnt, root, *bases]``
(``reply``: one end of a fresh socketpair for the answer; ``mnt``, ``root``: the
caller's ``/proc/<tid>/ns/mnt`` and ``/proc/<tid>/root``; ``bases``: the directories its
relative paths start from, its cwd or dirfd). Each request is handed to one child,
forked for it (a *spare* is forked ahead of time, so the request does not wait for the
fork), that

1. enters the caller's mount namespace and chroots to its root (``..`` and
   absolute symlinks then stop there, as for the caller);
2. becomes the caller for the file system: its groups, fsgid and fsuid, then exactly
   :attr:`Identity.capabilities` in its effective *and* permitted sets (nothing else
   survives, whatever the fsuid: the caller's own permission checks apply), its umask;
3. resolves the parent directory of every path with ``openat2(RESOLVE_NO_MAGICLINKS)``
   (a ``/proc/PID/root`` or ``/proc/PID/fd/N`` link cannot lead out of the caller's
   root; the last component is never followed by the resolution), checks it against
   the guarded directories if the request has any (:class:`Guard`), and does the call
   on that directory fd. An open follows a symlink in the last component itself, one
   step at a time; it refuses procfs and cgroupfs files (they would be this child's,
   which is in the supervisor's other namespaces) and hands a path that names one of
   the caller's own fds back to the daemon (:attr:`Reply.reopen`);
4. sends ``{"errno": N}`` (0: done), plus the opened fd for an ``open``, on ``reply``
   and exits.

The server itself does nothing but fork, reap and kill: at most ``max_children`` at a
time (it stops reading requests meanwhile); a request whose ``reply`` peer was closed
before it started (the daemon gave up on it) is dropped, and a child whose peer closes
is killed; when the daemon's end closes, every child is killed and the server exits.
Every fd it receives is closed by it on every path (the child has its own copies).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import os
import posixpath
import re
import select
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "OPS",
    "Guard",
    "Identity",
    "Reply",
    "Request",
    "Target",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "serve",
    "split_last",
]

OPS: Final = ("mknod", "mkdir", "unlink", "rename", "open", "reopen", "chown")
MAX_FDS: Final = 8            # reply, mnt, root and at most 5 bases
MAX_MESSAGE: Final = 65536
MAX_SYMLINKS: Final = 40      # the kernel's limit (ELOOP)
MAX_DEPTH: Final = 4096       # directory levels walked up by the guard

# linux/capability.h
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
CAP_SETGID, CAP_SETUID, CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_MKNOD = 6, 7, 18, 21, 27
HELPER_CAPABILITIES: Final = sum(1 << c for c in (
    CAP_SETGID, CAP_SETUID, CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_MKNOD, CAP_CHOWN,
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID))
CLONE_NEWNS: Final = 0x00020000
SYS_CAPGET: Final = 125
SYS_CAPSET: Final = 126
SYS_RENAMEAT2: Final = 316
SYS_OPENAT2: Final = 437
SYS_PIDFD_SEND_SIGNAL: Final = 424
AT_FDCWD: Final = -100
AT_REMOVEDIR: Final = 0x200
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_EMPTY_PATH: Final = 0x1000
NO_ID: Final = 0xFFFFFFFF  # (uid_t)-1: chown leaves that id as it is
RESOLVE_NO_MAGICLINKS: Final = 0x02
LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
O_TMPFILE: Final = 0o20200000  # with O_DIRECTORY, as the kernel defines it
O_TMPFILE_BIT: Final = 0o20000000


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True, slots=True)
class Target:
    """A path as the caller passed it (bytes, any encoding), and where it starts:
    ``base`` indexes the request's base directories; -1 for an absolute path."""

    path: bytes
    base: int = -1


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the child becomes: file-system ids as seen from the helper's user namespace,
    supplementary groups, umask, and the capabilities it keeps (a bit mask; the only
    ones in its effective and permitted sets)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    capabilities: int


@dataclass(frozen=True, slots=True)
class Request:
    """One call to carry out. ``op`` is one of :data:`OPS`; ``targets`` one path (two
    for ``rename``: old, new); ``mode``/``dev`` for mknod, mkdir and a creating open;
    ``flags`` the open flags, AT_REMOVEDIR for unlink, the renameat2 flags for rename,
    AT_SYMLINK_NOFOLLOW for chown; ``owner`` the (uid, gid) of a chown, as seen from the
    helper's user namespace (:data:`NO_ID`: unchanged);
    ``guard``: absolute, normalised directory paths in the caller's root under which
    nothing may be created, removed, renamed or opened for writing (empty: no check)."""

    op: str
    targets: tuple[Target, ...]
    identity: Identity
    mode: int = 0
    dev: int = 0
    flags: int = 0
    guard: tuple[bytes, ...] = ()
    owner: tuple[int, int] = (NO_ID, NO_ID)


@dataclass(frozen=True, slots=True)
class Reply:
    """The child's answer: ``errno`` 0 when the call was done, else what the caller
    gets; ``guarded`` the resolved path that a guard refused (``errno`` then is EACCES
    and the policy picks its own); ``error`` a failure of the helper itself (not the
    call's: the daemon answers ``on_error``)."""

    errno: int = 0
    guarded: bytes | None = None
    error: str = ""
    has_fd: bool = False
    # The open named one of the caller's own fds (/proc/self/fd/N, /dev/stdout...): the
    # daemon opens it from /proc/<tid>/fd/N and asks again with op "reopen".
    reopen: int = -1


def _int(value: object, what: str, low: int = -(2**63), high: int = 2**64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise ValueError(f"{what}: expected an int in [{low}, {high})")
    return value


def encode_request(request: Request) -> bytes:
    ident = request.identity
    return json.dumps({
        "op": request.op,
        "targets": [[t.path.hex(), t.base] for t in request.targets],
        "identity": [ident.uid, ident.gid, list(ident.groups), ident.umask,
                     ident.capabilities],
        "mode": request.mode, "dev": request.dev, "flags": request.flags,
        "guard": [p.hex() for p in request.guard],
        "owner": list(request.owner),
    }, separators=(",", ":")).encode()


def decode_request(data: bytes, bases: int) -> Request:
    """The request in ``data``, checked: ``bases`` is the number of base fds that came
    with it. Raises ValueError."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    op = obj.get("op")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    raw_targets = obj.get("targets")
    if not isinstance(raw_targets, list) or len(raw_targets) != (2 if op == "rename" else 1):
        raise ValueError("targets")
    targets = []
    for item in raw_targets:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError("target")
        path = bytes.fromhex(item[0])
        if not path or b"\0" in path or len(path) >= 4096:
            raise ValueError("path")
        base = _int(item[1], "base", -1, bases)
        if (base < 0) != path.startswith(b"/"):
            raise ValueError("a relative path needs a base, an absolute one none")
        targets.append(Target(path, base))
    ident = obj.get("identity")
    if not (isinstance(ident, list) and len(ident) == 5 and isinstance(ident[2], list)):
        raise ValueError("identity")
    identity = Identity(_int(ident[0], "uid", 0, 2**32 - 1), _int(ident[1], "gid", 0, 2**32 - 1),
                        tuple(_int(g, "group", 0, 2**32 - 1) for g in ident[2][:65536]),
                        _int(ident[3], "umask", 0, 0o1000), _int(ident[4], "caps", 0, 2**64))
    guard = obj.get("guard", [])
    if not isinstance(guard, list) or not all(isinstance(p, str) for p in guard):
        raise ValueError("guard")
    owner = obj.get("owner", [NO_ID, NO_ID])
    if not (isinstance(owner, list) and len(owner) == 2):
        raise ValueError("owner")
    return Request(op, tuple(targets), identity, _int(obj.get("mode"), "mode", 0, 2**32),
                   _int(obj.get("dev"), "dev", 0, 2**64), _int(obj.get("flags"), "flags", 0,
                                                               2**32),
                   tuple(bytes.fromhex(p) for p in guard),
                   (_int(owner[0], "uid", 0, 2**32), _int(owner[1], "gid", 0, 2**32)))


def encode_reply(reply: Reply) -> bytes:
    return json.dumps({"errno": reply.errno, "error": reply.error, "fd": reply.has_fd,
                       "guarded": None if reply.guarded is None else reply.guarded.hex(),
                       "reopen": reply.reopen}, separators=(",", ":")).encode()


def decode_reply(data: bytes) -> Reply:
    """Raises ValueError for a malformed reply."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    guarded = obj.get("guarded")
    error = obj.get("error", "")
    if not isinstance(error, str) or not (guarded is None or isinstance(guarded, str)):
        raise ValueError("malformed reply")
    return Reply(_int(obj.get("errno"), "errno", 0, 4096),
                 None if guarded is None else bytes.fromhex(guarded), error,
                 bool(obj.get("fd")), _int(obj.get("reopen", -1), "reopen", -1, 2**31))


def split_last(path: bytes) -> tuple[bytes, bytes]:
    """(directory, last component) of a non-empty path, as the kernel splits it for a
    call that creates or removes a name: trailing slashes stay with the last component
    (the kernel then wants a directory); ``/`` alone is (``/``, ``.``)."""
    stripped = path.rstrip(b"/")
    if not stripped:
        return b"/", b"."
    head, sep, name = stripped.rpartition(b"/")
    if not sep:
        head = b"."
    elif not head.strip(b"/"):
        head = b"/"
    return head, name + path[len(stripped):]


# --------------------------------------------------------------------------- the child


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Looked up once here, not in every forked child: a first use costs a child ~0.3 ms of
# copy-on-write faults (measured).
_syscall = _libc.syscall
_setns = _libc.setns
_setfsuid = _libc.setfsuid
_setfsgid = _libc.setfsgid
_fstatfs = _libc.fstatfs
_fchownat = _libc.fchownat
_fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                      ctypes.c_int)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _capget() -> list[int]:
    header = ctypes.create_string_buffer(struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable}
    _check(_syscall(SYS_CAPGET, header, data), "capget")
    return list(struct.unpack("<6I", data.raw))


def capabilities() -> tuple[int, int]:
    """(effective, permitted) capability masks of this thread."""
    w = _capget()
    return w[0] | w[3] << 32, w[1] | w[4] << 32


def set_capabilities(mask: int) -> None:
    """Make ``mask`` both the effective and the permitted set (inheritable empty).
    Raises OSError (EPERM) if ``mask`` is not a subset of the permitted set."""
    header = ctypes.create_string_buffer(struct.pack("<Ii", LINUX_CAPABILITY_VERSION_3, 0))
    low, high = mask & 0xFFFFFFFF, mask >> 32 & 0xFFFFFFFF
    data = ctypes.create_string_buffer(struct.pack("<6I", low, low, 0, high, high, 0))
    _check(_syscall(SYS_CAPSET, header, data), "capset")


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int = RESOLVE_NO_MAGICLINKS) -> int:
    how = struct.pack("<QQQ", flags | os.O_CLOEXEC, 0, resolve)
    return _check(_syscall(SYS_OPENAT2, dirfd, ctypes.c_char_p(path),
                                ctypes.c_char_p(how), len(how)), "openat2")


def _open_dir(path: bytes, base: int) -> int:
    """``path`` (relative to ``base``, or absolute in our root) opened O_PATH as a
    directory, following symlinks but no magic link."""
    return _openat2(base if not path.startswith(b"/") else AT_FDCWD, path,
                    os.O_PATH | os.O_DIRECTORY)


def become(identity: Identity, permitted: int) -> None:
    """Take ``identity`` for file-system access (see the module docstring, step 2);
    ``permitted`` is our permitted set. Raises OSError if the kernel refused part of
    it."""
    os.setgroups(list(identity.groups))
    _setfsgid(identity.gid)
    _setfsuid(identity.uid)
    # setfsuid/setfsgid return the old id and never fail loudly: ask again (-1: no change).
    if _setfsuid(-1 & 0xFFFFFFFF) != identity.uid or \
            _setfsgid(-1 & 0xFFFFFFFF) != identity.gid:
        raise OSError(errno.EPERM, "the kernel refused the caller's fsuid/fsgid "
                                   "(CAP_SETUID/CAP_SETGID missing?)")
    set_capabilities(identity.capabilities & permitted)
    os.umask(identity.umask)


class Refused(Exception):
    """The guard refused: ``path`` is the resolved path under a guarded directory."""

    def __init__(self, path: bytes) -> None:
        super().__init__(path)
        self.path = path


def _under(path: bytes, prefixes: frozenset[bytes]) -> bool:
    return any(path == p or path.startswith(p.rstrip(b"/") + b"/") for p in prefixes)


@dataclass
class Guard:
    """The guarded directories of a request, as found in the caller's root: their
    normalised paths (as given and as resolved) and their (st_dev, st_ino)."""

    proc_fd: int
    paths: frozenset[bytes]
    inodes: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @classmethod
    def open(cls, prefixes: tuple[bytes, ...], proc_fd: int) -> Guard:
        """Call in the caller's root, before :func:`become` (the guarded directories are
        found whoever may search them)."""
        paths = set()
        inodes = set()
        for prefix in prefixes:
            paths.add(prefix)
            try:
                fd = _openat2(AT_FDCWD, prefix, os.O_PATH | os.O_DIRECTORY)
            except OSError:
                continue  # not there (yet): its path is still guarded
            try:
                st = os.fstat(fd)
                inodes.add((st.st_dev, st.st_ino))
                paths.add(posixpath.normpath(os.readlink(str(fd).encode(), dir_fd=proc_fd)))
            finally:
                os.close(fd)
        return cls(proc_fd, frozenset(paths), frozenset(inodes))

    def path_of(self, fd: int) -> bytes:
        """Where ``fd`` is, seen from our root (the kernel's d_path)."""
        return os.readlink(str(fd).encode(), dir_fd=self.proc_fd)

    def check(self, dirfd: int, name: bytes, *, moving: bool = False) -> bytes:
        """Raise :class:`Refused` if ``name`` in the directory ``dirfd`` is, or is under,
        a guarded directory; return its resolved path. The directory is judged by what
        it *is*: its path as the kernel knows it, and every directory from it up to our
        root compared by (device, inode) with the guarded ones (a bind mount or another
        name of a guarded directory is caught too). ``moving`` (a name to be renamed or
        removed): it may not be a parent of a guarded directory either, else the guarded
        directory would leave the guarded path (and the next request would not find it
        there to guard)."""
        full = posixpath.normpath(self.path_of(dirfd) + b"/" + name)
        if _under(full, self.paths):
            raise Refused(full)
        if moving and any(_under(p, frozenset([full])) for p in self.paths):
            raise Refused(full)
        current = dirfd
        st = os.fstat(dirfd)
        try:
            for _ in range(MAX_DEPTH):
                if (st.st_dev, st.st_ino) in self.inodes:
                    raise Refused(full)
                parent = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=current)
                if current != dirfd:
                    os.close(current)
                current = parent
                up = os.fstat(parent)
                if (up.st_dev, up.st_ino) == (st.st_dev, st.st_ino):
                    break  # our root: ".." stays there
                st = up
            else:
                raise Refused(full)  # deeper than any real tree: refuse
        finally:
            if current != dirfd:
                os.close(current)
        entry = name.rstrip(b"/")
        if entry not in (b"", b".", b".."):
            try:
                est = os.stat(entry, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                return full
            if (est.st_dev, est.st_ino) in self.inodes:
                raise Refused(full)
        return full


def _in_dir(target: Target, bases: list[int]) -> tuple[int, bytes]:
    """(fd of the directory the last component of ``target`` is in, that component)."""
    head, name = split_last(target.path)
    return _open_dir(head, bases[target.base] if target.base >= 0 else AT_FDCWD), name


class Reopen(Exception):
    """The path names the caller's own fd ``number``: see :attr:`Reply.reopen`."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


# How the caller names one of its own fds: /dev/stdout is a symlink to /proc/self/fd/1.
_OWN_FD: Final = re.compile(rb"/(?:proc/(?:self|thread-self)|dev)/fd/([0-9]{1,9})")
# File systems whose files answer for the namespaces of the process that opens them:
# procfs (/proc/self, /proc/sys/net: our pid and network namespaces), cgroup v1 and v2
# (an open file keeps its opener's cgroup namespace for later permission checks).
OPENER_RELATIVE_FS: Final = frozenset({0x9FA0, 0x27E0EB, 0x63677270})


def _on_procfs(fd: int) -> bool:
    """True if ``fd`` is on one of :data:`OPENER_RELATIVE_FS`."""
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type comes first
    _check(_fstatfs(fd, buf), "fstatfs")
    f_type: int = struct.unpack_from("<q", buf.raw)[0]
    return f_type in OPENER_RELATIVE_FS


def _open(request: Request, bases: list[int], guard: Guard | None) -> int:
    """The open of ``request`` as the kernel would do it for the caller, but with every
    symlink of the last component followed here, one step at a time, so the directory
    the file is finally opened in is the one checked. Returns the fd.

    Raises :class:`Reopen` for a path that names one of the caller's fds, and EACCES
    for anything else in a procfs or cgroupfs: their files answer for the process that
    opens them (this child, in the supervisor's pid, network and cgroup namespaces),
    not for the caller."""
    flags = request.flags & ~os.O_CLOEXEC
    target = request.targets[0]
    base = bases[target.base] if target.base >= 0 else AT_FDCWD
    if flags & O_TMPFILE_BIT:
        # An unnamed file in the directory ``path``: that directory is what is checked.
        dirfd = _open_dir(target.path, base)
        try:
            if _on_procfs(dirfd):
                raise OSError(errno.EACCES, "not emulated in /proc or a cgroupfs")
            if guard is not None:
                guard.check(dirfd, b".")
            return os.open(b".", flags | os.O_CLOEXEC | os.O_NOCTTY, request.mode,
                           dir_fd=dirfd)
        finally:
            os.close(dirfd)
    truncate = bool(flags & os.O_TRUNC) and guard is not None
    if truncate:
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EACCES, "O_RDONLY|O_TRUNC is not emulated")
        flags &= ~os.O_TRUNC  # done below, once the file is known not to be hard-linked
    path, hops = target.path, 0
    owned = -1  # the directory of the last relative symlink followed: ours to close
    try:
        while True:
            own = _OWN_FD.fullmatch(path)
            if own is not None:
                raise Reopen(int(own.group(1)))
            head, name = split_last(path)
            dirfd = _open_dir(head, base)
            try:
                if _on_procfs(dirfd):
                    raise OSError(errno.EACCES, "not emulated in /proc or a cgroupfs")
                if guard is not None:
                    guard.check(dirfd, name)
                if name.endswith(b"/") or name in (b".", b".."):
                    # Only ever a directory, which the kernel opens for writing nowhere.
                    fd = os.open(name, flags | os.O_CLOEXEC | os.O_NOCTTY, request.mode,
                                 dir_fd=dirfd)
                    break
                try:
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                                 request.mode, dir_fd=dirfd)
                    break
                except OSError as exc:
                    if exc.errno != errno.ELOOP or flags & os.O_NOFOLLOW:
                        raise
                    try:
                        link = os.readlink(name, dir_fd=dirfd)
                    except OSError:
                        raise exc from None
                hops += 1
                if hops > MAX_SYMLINKS or not link:
                    raise OSError(errno.ELOOP if link else errno.ENOENT, "symlink")
                # Go on with the link's target, from the directory the link is in.
                path = link
                if not link.startswith(b"/"):
                    if owned >= 0:
                        os.close(owned)
                    owned = base = os.dup(dirfd)
            finally:
                os.close(dirfd)
    finally:
        if owned >= 0:
            os.close(owned)
    try:
        if guard is not None:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (
                    flags & os.O_ACCMODE != os.O_RDONLY or truncate):
                # Another name of this file may be under a guarded directory.
                raise Refused(guard.path_of(fd) + b" (a hard-linked file)")
            if truncate and stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen(request: Request, fd: int, guard: Guard | None) -> int:
    """Open again, as the caller, the file its fd refers to (``fd``: an O_PATH fd of
    ours on it, from the daemon). Guarded, only what has no place in a directory tree
    (pipes, sockets, character devices) is reopened: a regular file's directory cannot
    be known from its fd."""
    st = os.fstat(fd)
    if guard is not None and not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)
                                  or stat.S_ISCHR(st.st_mode)):
        raise Refused(guard.path_of(fd) + b" (reopened through /proc/self/fd)")
    flags = request.flags & ~os.O_CLOEXEC | os.O_CLOEXEC | os.O_NOCTTY
    return os.open(str(fd).encode(), flags, request.mode, dir_fd=_PROC_FD[0])


_PROC_FD = [-1]  # the child's /proc/self/fd, opened before it leaves our mount namespace


def _act(request: Request, bases: list[int], guard: Guard | None) -> int:
    """Carry out ``request``; the opened fd for an open, else -1."""
    op = request.op
    if op == "open":
        return _open(request, bases, guard)
    if op == "reopen":
        return _reopen(request, bases[0], guard)
    if op == "rename":
        (old_dir, old_name), (new_dir, new_name) = (_in_dir(t, bases)
                                                    for t in request.targets)
        try:
            if guard is not None:
                guard.check(old_dir, old_name, moving=True)
                guard.check(new_dir, new_name, moving=True)  # RENAME_EXCHANGE moves it
            _check(_syscall(SYS_RENAMEAT2, old_dir, ctypes.c_char_p(old_name), new_dir,
                                 ctypes.c_char_p(new_name), request.flags), "renameat2")
        finally:
            os.close(old_dir)
            os.close(new_dir)
        return -1
    dirfd, name = _in_dir(request.targets[0], bases)
    try:
        if guard is not None:
            guard.check(dirfd, name, moving=op == "unlink")
        if op == "chown":
            _chown(request, dirfd, name, guard)
        elif op == "mknod":
            os.mknod(name, request.mode, request.dev, dir_fd=dirfd)
        elif op == "mkdir":
            os.mkdir(name, request.mode, dir_fd=dirfd)
        elif request.flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    return -1


def _chown(request: Request, dirfd: int, name: bytes, guard: Guard | None) -> None:
    """fchownat of ``name`` in ``dirfd``: the file is opened O_PATH first (a symlink in
    the last component followed unless AT_SYMLINK_NOFOLLOW, never a magic link), then
    changed through that fd, so what is changed is what was resolved here. Under a
    guard (which checked ``dirfd``) a symlink is not followed: it is refused."""
    follow = not request.flags & AT_SYMLINK_NOFOLLOW
    fd = _openat2(dirfd, name, os.O_PATH | (0 if follow and guard is None else os.O_NOFOLLOW))
    try:
        if guard is not None and follow and stat.S_ISLNK(os.fstat(fd).st_mode):
            raise Refused(guard.path_of(fd) + b" (a symlink: not followed under a guard)")
        if _on_procfs(fd):
            raise OSError(errno.EACCES, "not emulated in /proc or a cgroupfs")
        uid, gid = request.owner
        _check(_fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")
    finally:
        os.close(fd)


def _child(request: Request, fds: list[int], permitted: int) -> None:
    """The forked child: act as the caller and send the reply on ``fds[0]``."""
    reply_fd, mnt, root, bases = fds[0], fds[1], fds[2], fds[3:]
    fd = -1
    try:
        # Ours, before leaving our mount namespace: the caller's /proc is not trusted.
        proc_fd = _PROC_FD[0] = os.open("/proc/self/fd",
                                        os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _check(_setns(mnt, CLONE_NEWNS), "setns")
        os.fchdir(root)
        os.chroot(".")
        guard = Guard.open(request.guard, proc_fd) if request.guard else None
        become(request.identity, permitted)
        fd = _act(request, bases, guard)
        reply = Reply(has_fd=fd >= 0)
    except Refused as refused:
        reply = Reply(errno.EACCES, guarded=refused.path)
    except Reopen as reopen:
        reply = Reply(reopen=reopen.number)
    except OSError as exc:
        reply = Reply(exc.errno or errno.EIO)
    except Exception as exc:
        reply = Reply(error=f"{type(exc).__name__}: {exc}")
    data = encode_reply(reply)
    if fd >= 0:
        socket.send_fds(socket.socket(fileno=reply_fd), [data], [fd])
    else:
        os.write(reply_fd, data)


# --------------------------------------------------------------------------- the server


@dataclass
class _Child:
    pid: int
    pidfd: int
    channel: int = -1   # a spare's end of its request socket; -1 once it has its request
    reply_fd: int = -1  # the reply socket of its request (POLLHUP: the daemon gave up)


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _send_error(reply_fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(reply_fd, encode_reply(Reply(error=text)))


def _peer_closed(fd: int) -> bool:
    one = select.poll()
    one.register(fd, 0)
    return bool(one.poll(0))


def _kill(child: _Child) -> None:
    with contextlib.suppress(OSError):
        _check(_syscall(SYS_PIDFD_SEND_SIGNAL, child.pidfd, signal.SIGKILL, None, 0),
               "pidfd_send_signal")


class _Server:
    """The fork server's state. A *spare* child is forked ahead of time and waits for
    its request on a socket of its own, so a request costs no fork on its way: the
    next spare is forked after the request was handed on."""

    def __init__(self, sock: socket.socket, max_children: int) -> None:
        self.sock = sock
        self.max_children = max_children
        self.children: dict[int, _Child] = {}   # by pidfd: busy ones and the spare
        self.by_reply: dict[int, _Child] = {}
        self.spare: _Child | None = None
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.reading = True
        self.permitted = capabilities()[1]

    def busy(self) -> int:
        return len(self.children) - (self.spare is not None)

    def our_fds(self) -> list[int]:
        return [fd for c in self.children.values() for fd in (c.pidfd, c.channel,
                                                                c.reply_fd) if fd >= 0]

    def fork(self, request: tuple[bytes, list[int]] | None) -> _Child | None:
        """A child for ``request``, or a spare (None: it waits for one on its channel).
        None if fork failed (the request's reply got the error)."""
        inherited = self.our_fds()
        channel = peer = -1
        if request is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            channel, peer = ours.detach(), theirs.detach()
        try:
            pid = os.fork()
        except OSError as exc:
            if request is not None:
                _send_error(request[1][0], f"fork: {exc}")
            _close([channel, peer])
            return None
        if pid == 0:
            status = 1
            try:
                _close([*inherited, channel])
                self.sock.close()
                if request is None:
                    data, fds, flags, _ = socket.recv_fds(socket.socket(fileno=peer),
                                                         MAX_MESSAGE, MAX_FDS)
                    if not data or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                        os._exit(1)
                else:
                    data, fds = request
                _child(decode_request(data, len(fds) - 3), fds, self.permitted)
                status = 0
            finally:
                os._exit(status)
        _close([peer])
        child = _Child(pid, os.pidfd_open(pid), channel)
        self.children[child.pidfd] = child
        self.poller.register(child.pidfd, select.POLLIN)
        return child

    def assign(self, child: _Child, reply_fd: int) -> None:
        child.reply_fd = reply_fd
        self.by_reply[reply_fd] = child
        self.poller.register(reply_fd, 0)  # POLLHUP only: the daemon closed its end

    def receive(self) -> bool:
        """Take one request and hand it to a child. False when the daemon is gone."""
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            return False
        if not data and not fds:
            return False
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) < 3:
            if fds:
                _send_error(fds[0], "truncated request or missing fds")
            _close(fds)
            return True
        try:
            decode_request(data, len(fds) - 3)  # checked here, decoded again by the child
        except ValueError as exc:
            _send_error(fds[0], f"bad request: {exc}")
            _close(fds)
            return True
        if _peer_closed(fds[0]):
            _close(fds)  # the daemon gave up on it while it waited here
            return True
        spare = self.spare
        if spare is not None:
            self.spare = None
            try:
                with socket.socket(fileno=os.dup(spare.channel)) as channel:
                    socket.send_fds(channel, [data], fds)
            except OSError as exc:
                _send_error(fds[0], f"handing the request to a child: {exc}")
                _kill(spare)
                _close(fds)
                return True
            finally:
                _close([spare.channel])
                spare.channel = -1
            child: _Child | None = spare
        else:
            child = self.fork((data, fds))
        if child is not None:
            self.assign(child, fds[0])
            _close(fds[1:])  # the child has its own copies
        else:
            _close(fds)
        return True

    def reaped(self, pidfd: int) -> None:
        child = self.children.pop(pidfd)
        os.waitpid(child.pid, 0)
        self.poller.unregister(pidfd)
        if self.by_reply.pop(child.reply_fd, None) is not None:
            self.poller.unregister(child.reply_fd)
        if child is self.spare:
            self.spare = None
        _close([pidfd, child.reply_fd, child.channel])

    def run(self) -> None:
        while True:
            if self.spare is None and self.busy() < self.max_children:
                self.spare = self.fork(None)
            full = self.busy() >= self.max_children
            if full == self.reading:
                self.reading = not full
                self.poller.modify(self.sock, select.POLLIN if self.reading else 0)
            for fd, events in self.poller.poll():
                if fd == self.sock.fileno():
                    if events & select.POLLIN:
                        if not self.receive():
                            return self.stop()
                    elif events & (select.POLLHUP | select.POLLERR):
                        return self.stop()
                elif fd in self.children:  # a pidfd: the child exited
                    self.reaped(fd)
                elif fd in self.by_reply:  # the daemon closed its end: it gave up
                    child = self.by_reply.pop(fd)
                    self.poller.unregister(fd)
                    _kill(child)  # reply_fd stays open until the child is reaped

    def stop(self) -> None:
        for child in self.children.values():
            _kill(child)
        for child in self.children.values():
            with contextlib.suppress(OSError):
                os.waitpid(child.pid, 0)
            _close([child.pidfd, child.reply_fd, child.channel])
        self.children.clear()


def serve(sock: socket.socket, max_children: int) -> None:
    """Serve requests on ``sock`` until its peer closes it (see the module docstring)."""
    _Server(sock, max_children).run()


def main(argv: list[str]) -> None:
    """``fd max_children``: serve on the inherited socket ``fd``."""
    fd, max_children = int(argv[0]), int(argv[1])
    # Our parent's signals (a ^C in its terminal, its SIGHUP) are not ours: the daemon
    # ends us by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Nothing but what acting as a caller uses (see the module docstring): setns, chroot,
    # the caller's ids, CAP_MKNOD when a policy adds it, and the file-system capabilities
    # a caller of ours may itself have (they are given to a child only then).
    _effective, permitted = capabilities()
    set_capabilities(permitted & HELPER_CAPABILITIES)
    effective, permitted = capabilities()
    sock = socket.socket(fileno=fd)
    # Hello: the capabilities we hold, so the daemon can say what will fail.
    try:
        sock.send(json.dumps({"pid": os.getpid(), "effective": effective,
                              "permitted": permitted}).encode())
    except OSError:
        return  # the daemon is gone already (e.g. it could not bind its socket)
    # Forked children share our pages until they write them: what they all use is made
    # ready here (a first use in the child costs copy-on-write faults), and the collector
    # is left off.
    encode_reply(Reply())
    decode_request(encode_request(Request("mknod", (Target(b"/x"),),
                                          Identity(0, 0, (), 0, 0))), 0)
    gc.freeze()
    gc.disable()
    serve(sock, max_children)


if __name__ == "__main__":
    main(sys.argv[1:])
