"""Attacks on the ReadPool (supervisor/memory.py) that cost the daemon threads or CPU.

A read of memory a container made slow (a userfaultfd page, a FUSE mapping) can last as
long as whoever serves that memory wants: when that is a process outside the container
(its creator's, a sidecar's), the read outlives the container's session, and a reading
thread stays with it (the kernel's sleep there ends only when the daemon dies). Here such
a read is one that waits for a threading.Event, as in test_hostile_fairness.py; thread
creation failing is the real kernel's (RLIMIT_NPROC, in a child process).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from supervisor.errors import TargetMemoryError
from supervisor.memory import PAGE_SIZE, ReadPool, _Reader

NR_MKDIR = 83
WAIT = 10.0  # generous bound on anything that should take milliseconds (a hang guard)
REPO = Path(__file__).resolve().parent.parent

# One container after another: each asks for a read that sticks, a neighbour's read waits
# behind it (so the stuck one's thread retires), then the container's session ends.
# Prints what the neighbours' reads got and how many threads were started meanwhile.
ENDING_SESSIONS = """
import errno, json, sys, threading
import pytest
import trio
from supervisor.errors import TargetMemoryError
from supervisor.memory import ReadPool

def main(sessions: int, max_stuck: int) -> None:
    release = threading.Event()
    pool = ReadPool(slow_after=0.01, max_stuck=max_stuck)
    before = threading.active_count()
    got: list[str] = []

    def stuck() -> bytes:
        release.wait(60)
        return b"late"

    def quick() -> bytes:
        return b"ok"

    async def container() -> None:
        try:
            await pool.run(stuck, trio.CapacityLimiter(1))
        except TargetMemoryError:
            pass  # refused: its call is denied EAGAIN

    async def scenario() -> None:
        for _ in range(sessions):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(container)
                await trio.sleep(0.005)  # the reading thread is in it
                try:
                    got.append((await pool.run(quick, trio.CapacityLimiter(1))).decode())
                except TargetMemoryError as exc:
                    got.append(errno.errorcode[exc.errno])
                nursery.cancel_scope.cancel()  # the container is gone, its session ends
        threads = threading.active_count() - before
        release.set()
        with trio.fail_after(10):
            while pool.stuck:  # every stuck read that returned is accounted for
                await trio.sleep(0.01)
        print(json.dumps({"got": got, "threads": threads}), flush=True)

    trio.run(scenario)

main(int(sys.argv[1]), int(sys.argv[2]))
"""


def ending_sessions(sessions: int, max_stuck: int, preexec: object = None
                    ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENDING_SESSIONS, str(sessions), str(max_stuck)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        preexec_fn=preexec)  # type: ignore[arg-type]


def test_sessions_that_end_with_stuck_reads_leave_a_bounded_number_of_threads() -> None:
    """Each ended session's stuck read kept a thread: 12 containers, 12 threads (and
    without end). At most max_stuck threads stay stuck; the reads that would need another
    fail at once with EAGAIN (their calls are denied EAGAIN), none waits for its deadline."""
    run = ending_sessions(12, 4)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["threads"] <= 4 + 1, result  # the stuck ones and the active one
    assert result["got"] == ["ok"] * 4 + ["EAGAIN"] * 8, result


def _unprivileged_with_few_threads() -> None:
    # RLIMIT_NPROC binds only without CAP_SYS_RESOURCE/CAP_SYS_ADMIN, and counts every
    # task of the real uid: a uid nothing else on the host runs as.
    import resource
    os.setgid(54321)
    os.setgroups([])
    os.setuid(54321)
    resource.setrlimit(resource.RLIMIT_NPROC, (4, 4))


def test_a_thread_that_cannot_start_fails_reads_not_the_daemon() -> None:
    """When no thread can be started (RLIMIT_NPROC, threads-max, memory), the pool's
    system task that retires slow threads raised, and trio ends the whole run with a
    TrioInternalError: the daemon died. Now the reads waiting get EAGAIN."""
    run = ending_sessions(8, 64, _unprivileged_with_few_threads)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)["got"]
    assert "EAGAIN" in got, got
    assert set(got) <= {"ok", "EAGAIN"}, got


def test_a_large_read_costs_linear_time() -> None:
    """read_bytes allows 16 MiB; read page by page into ``bytes +=``, that copied all it
    had read per page: 5 s of CPU (holding the GIL for the copies) for one read, 570
    times a 1 MiB read's. Compared in the same run, against a read 16 times smaller."""
    size = 16 * 1024 * 1024
    buffer = ctypes.create_string_buffer(bytes(range(256)) * (size // 256))
    address = ctypes.addressof(buffer)
    reader = _Reader(os.getpid(), -1)

    def cpu(length: int) -> float:
        t0 = time.process_time()
        data = reader.read_exact(address, length)
        spent = time.process_time() - t0
        assert data == buffer.raw[:length]
        return spent

    small = min(cpu(size // 16) for _ in range(3))
    large = min(cpu(size) for _ in range(2))
    # Linear: ~16x (timer resolution aside); quadratic: ~250x and more.
    assert large < max(64 * small, 0.5), (small, large)
    with_nul = reader.read_cstring(address + 1, PAGE_SIZE * 3)  # byte 0 comes at 255
    assert with_nul == bytes(range(1, 256))


def test_a_read_refused_for_want_of_threads_gives_its_slot_back() -> None:
    """A pool at its bound refuses the waiting reads; the sessions' slots come back, so
    a read asked for once the stuck one returned is served."""
    release = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=0.01, max_stuck=0)
        own = trio.CapacityLimiter(1)

        def stuck() -> bytes:
            release.wait(WAIT)
            return b"late"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, stuck, trio.CapacityLimiter(1))
            await trio.sleep(0.005)
            with trio.fail_after(WAIT):
                try:
                    await pool.run(lambda: b"never", own)
                except TargetMemoryError as exc:
                    assert exc.errno == errno.EAGAIN
                else:
                    raise AssertionError("not refused")
            assert own.borrowed_tokens == 0
            release.set()
        with trio.fail_after(WAIT):
            assert await pool.run(lambda: b"served", own) == b"served"
        assert pool.refused == 1 and pool.stuck == 0

    trio.run(scenario)


# A lone container (the daemon waits for its reads inline, memory.INLINE_WAIT) whose
# memory is slow to read, but not quite slow enough to be given up on: the path of its
# mkdir is on a page registered with a userfaultfd that its own thread serves after
# DELAY, then drops again (MADV_DONTNEED) for the next call. It calls mkdir until the
# file argv[1] exists, and prints how many calls it made.
SLOW_PAGE = f"""
import ctypes, fcntl, os, struct, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
DELAY = float(sys.argv[2])
THREADS = 8
uffd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd
assert uffd >= 0, ctypes.get_errno()
fcntl.ioctl(uffd, 0xc018aa3f, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))  # UFFDIO_API
pages = libc.mmap(None, 4096 * THREADS, 3, 0x22, -1, 0)  # READ|WRITE, PRIVATE|ANONYMOUS
fcntl.ioctl(uffd, 0xc020aa00,
            bytearray(struct.pack("QQQQ", pages, 4096 * THREADS, 1, 0)))  # REGISTER
source = ctypes.create_string_buffer(b"/guarded/slow".ljust(4096, b"\\0"))

def serve():
    while True:
        msg = os.read(uffd, 32)  # a fault (struct uffd_msg): the daemon reads a page
        page = struct.unpack_from("Q", msg, 16)[0] & ~4095
        time.sleep(DELAY)
        copy = bytearray(struct.pack("QQQQq", page, ctypes.addressof(source), 4096, 0, 0))
        try:
            fcntl.ioctl(uffd, 0xc028aa03, copy)  # UFFDIO_COPY: the read goes on
        except OSError:
            pass  # EEXIST: populated meanwhile

calls = [0] * THREADS

def call(i):
    page = pages + 4096 * i
    while not os.path.exists(sys.argv[1]):
        libc.syscall({NR_MKDIR}, ctypes.c_void_p(page), ctypes.c_long(0o755))
        calls[i] += 1
        libc.madvise(page, 4096, 4)  # MADV_DONTNEED: the next read faults again

threading.Thread(target=serve, daemon=True).start()
callers = [threading.Thread(target=call, args=(i,)) for i in range(THREADS)]
for t in callers:
    t.start()
for t in callers:
    t.join()
print(sum(calls), flush=True)
"""

SLOW_PAGE_CONFIG = """\
[defaults]
policies = ["path_guard"]
deadline = "5s"

[[policy]]
name = "path_guard"
path = "{repo}/policies/path_guard.py"
options = {{ prefixes = ["/guarded"], errno = "EACCES" }}

[audit]
decisions = "none"
"""


@pytest.mark.parametrize("delay", [
    "0.001",  # alone: each read waited for inline (INLINE_WAIT), up to INLINE_BUDGET
    "0.00008",  # with a neighbour: each read takes about INLINE_WAIT_SHARED
], ids=["alone", "with-a-neighbour"])
def test_a_containers_slow_reads_do_not_hold_the_loop(tmp_path: Path, delay: str) -> None:
    """Reads a little faster than INLINE_WAIT were each waited for inline, and the
    poller only lets the rest of the daemon run every EVENTS_PER_YIELD (256)
    notifications: 256 reads of 3 ms held the control socket (and /metrics, the
    handover of the next container, signals) for most of a second, round after round.
    Now inline waits stop once they took INLINE_BUDGET without a checkpoint; with an idle
    neighbour attached (2 fds), the same budget, each wait at most INLINE_WAIT_SHARED."""
    from .soak import daemon_process, start_filtered

    stop = tmp_path / "stop"
    neighbour = delay != "0.001"
    with daemon_process(tmp_path, SLOW_PAGE_CONFIG.format(repo=REPO)) as d:
        d.start()
        quiet = []
        for _ in range(5):
            t0 = time.perf_counter()
            d.status()
            quiet.append(time.perf_counter() - t0)
        idle = None
        if neighbour:
            idle = start_filtered(d.socket_path, [sys.executable, "-c",
                                                  "import time; time.sleep(60)"],
                                  notify=("mkdir",), container_id="idle")
        target = start_filtered(d.socket_path, [sys.executable, "-c", SLOW_PAGE,
                                                str(stop), delay],
                                notify=("mkdir",), container_id="slow-page")
        try:
            d.wait_sessions(2 if neighbour else 1)
            time.sleep(0.5)  # the container is calling
            flooded = []
            for _ in range(40):
                t0 = time.perf_counter()
                d.status()
                flooded.append(time.perf_counter() - t0)
                time.sleep(0.05)
            stop.touch()
            calls = int(target.process.communicate(timeout=30)[0])
        finally:
            target.kill()
            if idle is not None:
                idle.kill()
    assert calls > 100, calls  # the attack ran: each call's read took DELAY or more
    # Generous: a control request takes ~1 ms quiet, 1-10 ms now; held, 0.2-3.4 s.
    assert max(flooded) < 0.2, (sorted(flooded), quiet)


def test_a_read_given_up_before_it_ran_closes_its_proc_mem_fd() -> None:
    """With process_vm_readv refused, a read opens /proc/<tid>/mem before it waits for
    its session's slot and a thread; its thread closes it. A read given up before a thread
    took it (its deadline while the session's slot was taken by a slow read, its session
    ending while it was queued) left that fd open: a container that keeps one read stuck
    and calls on leaked one fd per call until the daemon ran out of them."""
    from supervisor.memory import TargetMemory
    from supervisor.notifyfd import NotifyFd

    from .conftest import open_fds, start_target

    target = start_target(["mkdir"], "mkdir", "/nonexistent/leak")
    notify = NotifyFd(target.child.take_listener())
    release = threading.Event()

    async def scenario() -> None:
        try:
            await attack()
        finally:
            notify.close()

    async def attack() -> None:
        await trio.lowlevel.wait_readable(notify.fileno())
        received = notify.recv()
        assert received is not None
        notif_id, tid, _nr, _arch, args = received
        # Never slow: the stuck read keeps its thread, and the read queued behind it is
        # still queued when it is given up. (With 10 ms, a loaded machine let the watch
        # retire the stuck read's thread before that: the read ran in a new thread and
        # either finished within its 5 ms, or was still running, its fd not closed yet,
        # when the test looked: 2 failures in 50 runs beside two CPU hogs.)
        pool = ReadPool(slow_after=WAIT)
        memory = TargetMemory(notify, use_proc_mem=True, pool=pool, inline_wait=0)
        own = memory._slot  # (taken from here below: a stuck read holds it)
        await pool.run(lambda: b"", trio.CapacityLimiter(1))  # its eventfd, its thread
        before = open_fds()

        def fd_baseline() -> set[int]:
            return open_fds() - before

        # Its session's slot is taken (an earlier read of the container, stuck).
        await own.acquire_on_behalf_of("stuck read")
        with trio.move_on_after(0.05):
            await memory.read_cstring(notif_id, tid, args[0], 4096)
            raise AssertionError("read without the slot")
        own.release_on_behalf_of("stuck read")
        assert fd_baseline() == set(), "an fd left by the read cancelled at its slot"

        def stuck() -> bytes:
            release.wait(WAIT)
            return b""

        async with trio.open_nursery() as nursery:
            # The reading thread is busy with another container's read.
            nursery.start_soon(pool.run, stuck, trio.CapacityLimiter(1))
            await trio.sleep(0.005)
            with trio.move_on_after(0.05):
                await memory.read_cstring(notif_id, tid, args[0], 4096)
                raise AssertionError("read behind a stuck one")
            assert not pool.retired
            leaked = fd_baseline()
            release.set()
        assert leaked == set(), "an fd left by the read cancelled in the queue"
        # The read itself works, and closes its fd.
        assert await memory.read_cstring(notif_id, tid, args[0], 4096) == \
            b"/nonexistent/leak"
        assert fd_baseline() == set()

    try:
        trio.run(scenario)
    finally:
        target.child.process.kill()
        target.child.process.communicate()
        target.child.close()
