"""Run as the ExecStart of a unit with the shipped unit's [Service] section
(tests/test_unit_hardening.py): tries what each sandboxing setting should forbid, and what
the daemon and its mknod helper need, and prints one JSON object: check name -> "ok" or
the error (strerror, or "timeout").

Standard library only; argv: a directory it may write to (the RuntimeDirectory), and an
IPv4 address of this host that is not loopback.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import sys
from collections.abc import Callable

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args: int) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_child(action: Callable[[], object]) -> str:
    """``action`` in a forked child (namespace changes stay there): "ok" or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            action()
            result = "ok"
        except OSError as exc:
            result = exc.strerror or str(exc)
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return exc.strerror or str(exc)
    return "ok"


def setns(path: str, nstype: int) -> Callable[[], None]:
    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _libc_call("setns", fd, nstype)
    return enter


def unshare(flags: int) -> Callable[[], None]:
    return lambda: _libc_call("unshare", flags)


def connect_to(host: str, port: int) -> Callable[[], None]:
    def connect() -> None:
        with socket.create_connection((host, port), timeout=2):
            pass
    return connect


def mknod(path: str, major: int, minor: int) -> Callable[[], None]:
    return lambda: os.mknod(path, 0o20600, os.makedev(major, minor))


def write_own_memory() -> None:
    """process_vm_writev of a buffer of ours into another of ours."""
    source, target = ctypes.create_string_buffer(b"probe"), ctypes.create_string_buffer(5)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(source), 5)
    remote = (ctypes.c_void_p * 2)(ctypes.addressof(target), 5)
    _libc.process_vm_writev.restype = ctypes.c_ssize_t
    if _libc.process_vm_writev(os.getpid(), local, 1, remote, 1, 0) != 5:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def wx_mapping() -> None:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()


def main(writable: str, other_address: str) -> None:
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    results = {
        # RestrictNamespaces=mnt
        "setns mnt CLONE_NEWNS": in_child(setns("/proc/self/ns/mnt", CLONE_NEWNS)),
        "setns mnt 0": in_child(setns("/proc/self/ns/mnt", 0)),
        "setns net CLONE_NEWNET": in_child(setns("/proc/self/ns/net", CLONE_NEWNET)),
        "unshare user": in_child(unshare(CLONE_NEWUSER)),
        "unshare net": in_child(unshare(CLONE_NEWNET)),
        # IPAddressDeny=any, IPAddressAllow=localhost
        "connect 127.0.0.1": attempt(connect_to("127.0.0.1", port)),
        f"connect {other_address}": attempt(connect_to(other_address, port)),
        # DevicePolicy=closed (the device cgroup checks mknod too)
        "mknod 1:3": attempt(mknod(f"{writable}/probe-null", 1, 3)),
        "mknod 0:0": attempt(mknod(f"{writable}/probe-whiteout", 0, 0)),
        "mknod 10:229": attempt(mknod(f"{writable}/probe-fuse", 10, 229)),
        "open /dev/null": attempt(lambda: open("/dev/null", "rb").close()),
        # ProtectHome=yes
        "list /root": attempt(lambda: os.listdir("/root")),
        "list /home": attempt(lambda: os.listdir("/home")),
        # MemoryDenyWriteExecute=yes
        "mmap W+X": attempt(wx_mapping),
        # SystemCallFilter=~@resources
        "sched_setaffinity": attempt(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
        "setpriority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)),
        # SystemCallFilter=~process_vm_writev
        "process_vm_writev": attempt(write_own_memory),
        # ProcSubset= not set: prometheus-client's process collector reads this.
        "read /proc/stat": attempt(lambda: open("/proc/stat", "rb").close()),
    }
    listener.close()
    for name in ("probe-null", "probe-whiteout", "probe-fuse"):
        if os.path.lexists(f"{writable}/{name}"):
            os.unlink(f"{writable}/{name}")
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
