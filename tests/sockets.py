"""Client side of the notify socket for tests: send messages with SCM_RIGHTS the way
runc does (or a hostile client would), and watch the server's end."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import trio

# ioctl(SIOCOUTQ) on a unix socket: bytes sent that the peer has not read yet.
SIOCOUTQ = 0x5411


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds`` (none for an empty list)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


async def drained(sock: trio.socket.SocketType) -> None:
    """Wait until the server has read everything sent so far."""
    with trio.fail_after(5):
        while struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]:
            await trio.sleep(0.002)


async def wait_closed(sock: trio.socket.SocketType, timeout: float = 10) -> None:
    """Wait until the server closed its end."""
    with trio.fail_after(timeout):
        try:
            while await sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


async def send(path: str, *parts: tuple[bytes, list[int]], shutdown: bool = True,
               drain: bool = False, pause: float = 0.0) -> None:
    """Connect, send each (data, fds) part in its own sendmsg, then wait until the server
    hangs up. With ``drain`` the server has read each part before the next is sent; with
    ``pause`` the parts go ``pause`` seconds apart."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(path)
        try:
            for i, (data, fds) in enumerate(parts):
                if i and pause:
                    await trio.sleep(pause)
                view = memoryview(data)
                sent = await sock.sendmsg([view], rights(fds))
                while sent < len(view):
                    sent += await sock.send(view[sent:])
                if drain:
                    await drained(sock)
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up on us: what several tests want
        await wait_closed(sock)
