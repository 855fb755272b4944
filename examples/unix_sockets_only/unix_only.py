"""No network sockets: a container may create unix sockets (and the families listed in
option ``domains``), nothing else.

``socket(domain, type, protocol)`` is decided on its ``domain`` register alone: an
``int``, decoded as the kernel does (the low 32 bits). The kernel cannot see another
domain than the one checked, so ``allow()`` (CONTINUE) is exact and the refusal
cannot be raced. A refused family fails with EAFNOSUPPORT, what a kernel built without
that family answers: programs already handle it (IPv6 missing, for instance) and carry
on without the socket.

i386 programs may instead go through ``socketcall(SYS_SOCKET, args)``, whose domain is
in the caller's *memory*: a check there could be raced, so ``socketcall(SYS_SOCKET)`` is
refused with ENOSYS whatever the domain (a libc that calls ``socket`` directly is
decided as above); the other ``socketcall`` operations go on. Notify ``socketcall``
only if 32-bit programs run in the container.

Options::

    options = { domains = ["AF_UNIX", "AF_NETLINK"] }   # default ["AF_UNIX"]

Run it::

    seccomp-supervisor serve --socket /run/unix-only.sock --policy unix_only.py

with ``SCMP_ACT_NOTIFY`` for ``socket`` (and ``socketcall``) in the container's profile.
Sockets a container already has, or gets passed, are not affected.
"""

import errno
import socket

from supervisor.policy import Notification, PolicySet, allow, deny

policy = PolicySet("unix-sockets-only", defaults={"domains": ["AF_UNIX"]})
_allowed: set[int] = set()
SYS_SOCKET = 1  # socketcall's call number for socket(2) (linux/net.h)


@policy.configure
def check(options):
    numbers = set()
    for name in options["domains"]:
        is_name = isinstance(name, str) and name.startswith("AF_")
        family = getattr(socket, name, None) if is_name else None
        if not isinstance(family, int):
            raise ValueError(f"options.domains: unknown address family {name!r}")
        numbers.add(int(family))
    _allowed.clear()
    _allowed.update(numbers)


@policy.on("socket")
def only_allowed_families(n: Notification):
    domain = n.int32(0)
    if domain in _allowed:
        return allow()
    try:
        name = socket.AddressFamily(domain).name
    except ValueError:
        name = str(domain)
    return deny(errno.EAFNOSUPPORT, reason=f"socket domain {name}")


@policy.on("socketcall")
def no_socket_through_socketcall(n: Notification):
    if n.int32(0) == SYS_SOCKET:
        return deny(errno.ENOSYS, reason="socketcall(SYS_SOCKET): domain in memory")
    return allow()
