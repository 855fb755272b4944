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

import trio

from supervisor.errors import TargetMemoryError
from supervisor.memory import PAGE_SIZE, ReadPool, _Reader

WAIT = 10.0  # generous bound on anything that should take milliseconds (a hang guard)
REPO = Path(__file__).resolve().parent.parent

# One container after another: each asks for a read that sticks, a neighbour's read waits
# behind it (so the stuck one's thread retires), then the container's session ends.
# Prints what the neighbours' reads got and how many threads were started meanwhile.
ENDING_SESSIONS = """
import errno, json, sys, threading
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
