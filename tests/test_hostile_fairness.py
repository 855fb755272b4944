"""One container's flood is its own problem: a neighbour stays served.

The attack (security issue, item 10): a container floods the daemon with calls that an
async policy decides by reading the caller's memory in a worker thread (path_guard's
mkdir). Before memory reads shared their worker threads fairly, each flooding session
had four threads of its own fighting the event loop for the GIL, and a quiet neighbour's
median latency went from ~60 us to 1.5-3 ms (p99 40-100 ms); bench/neighbour.py is the
measurement, with the 2x target. Now one thread reads for the whole daemon, taken in turn,
and it runs niced below the event loop (supervisor/memory.py, ReadPool). Here the bound
is generous (timing on a shared machine): the neighbour's median latency while flooded,
against its median in the same daemon just before the flood, over a few rounds.

The ReadPool's turn-taking and slow-read rule are checked on their own, with plain
functions as reads (no kernel).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from supervisor.memory import ReadPool

from .soak import NR_GETPGID, RunningTarget, daemon_process, start_filtered, wait_file

NR_MKDIR = 83
ROUNDS = 3
NEIGHBOUR_CALLS = 400
# Median flooded/quiet of the neighbour's p50 that fails the test. Measured here (2 vCPUs
# shared with other jobs), per round: 29-77 before the fix (medians 33-59 in 4 runs);
# 1.8-5.7 with the shared reading thread alone; 0.9-2.0 with it niced (a callgrind run
# beside it).
MAX_SLOWDOWN = 10.0

CONFIG = """\
[defaults]
policies = ["path_guard", "echo"]
deadline = "5s"

[[policy]]
name = "path_guard"
path = "{repo}/policies/path_guard.py"
options = {{ prefixes = ["/guarded"], errno = "EACCES" }}

[[policy]]
name = "echo"
path = "{tmp}/echo.py"

[audit]
decisions = "none"
"""

ECHO = '''\
from supervisor.policy import PolicySet, returns

policy = PolicySet("echo")


@policy.on("getpgid")
def echo(n):
    return returns(n.args[0] * 3 + 1)
'''

# The flooder: THREADS threads calling mkdir("/guarded/flood") (path_guard reads the
# path, then denies it: EACCES) whenever GO exists, until STOP does; READY after the first
# answer. Prints how many calls were made and how many got another answer.
FLOODER = f"""\
import ctypes, json, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_long]
go, stop, ready, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
counts = [[0, 0] for _ in range(threads)]

def call():
    rc = libc.syscall({NR_MKDIR}, b"/guarded/flood", 0o755)
    return rc == -1 and ctypes.get_errno() == 13

call()
open(ready, "w").close()

def flood(i):
    while not os.path.exists(stop):
        if not os.path.exists(go):
            time.sleep(0.002)
            continue
        counts[i][0] += 1
        counts[i][1] += not call()

workers = [threading.Thread(target=flood, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({{"calls": sum(c[0] for c in counts), "wrong": sum(c[1] for c in counts)}}))
"""

# The neighbour: CALLS getpgid calls (decided inline), PAUSE s apart, each timed; prints
# the latencies (seconds) and how many answers were wrong.
NEIGHBOUR = f"""\
import ctypes, json, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long]
calls, pause = int(sys.argv[1]), float(sys.argv[2])
libc.syscall({NR_GETPGID}, 1)
lat, wrong = [], 0
for i in range(calls):
    time.sleep(pause)
    t0 = time.perf_counter()
    rc = libc.syscall({NR_GETPGID}, i)
    lat.append(time.perf_counter() - t0)
    wrong += rc != 3 * i + 1
print(json.dumps({{"latencies": lat, "wrong": wrong}}))
"""


def neighbour_p50(socket_path: str, name: str) -> float:
    target = start_filtered(
        socket_path, [sys.executable, "-c", NEIGHBOUR, str(NEIGHBOUR_CALLS), "0.001"],
        notify=("getpgid",), container_id=name)
    try:
        result = target.result(120)
    finally:
        target.kill()
    assert result["wrong"] == 0, result
    return float(statistics.median(result["latencies"]))


@pytest.mark.usefixtures("hot_loop")
def test_a_memory_reading_flood_does_not_slow_a_neighbour(tmp_path: Path) -> None:
    (tmp_path / "echo.py").write_text(ECHO)
    repo = Path(__file__).resolve().parent.parent
    text = CONFIG.format(repo=repo, tmp=tmp_path)
    go, stop, ready = tmp_path / "go", tmp_path / "stop", tmp_path / "ready"
    with daemon_process(tmp_path, text) as d:
        d.start()
        flooder: RunningTarget | None = None
        try:
            flooder = start_filtered(
                d.socket_path, [sys.executable, "-c", FLOODER, str(go), str(stop),
                                str(ready), "8"],
                notify=("mkdir",), container_id="flooder")
            wait_file(ready)
            ratios = []
            for i in range(ROUNDS):
                go.unlink(missing_ok=True)
                quiet = neighbour_p50(d.socket_path, f"quiet-{i}")
                go.touch()
                flooded = neighbour_p50(d.socket_path, f"flooded-{i}")
                ratios.append(flooded / quiet)
            stop.touch()
            flood = flooder.result(60)
        finally:
            stop.touch()
            if flooder is not None:
                flooder.kill()
        # The flood was real (it ran for about a second per round) and fully answered.
        assert flood["wrong"] == 0, flood
        assert flood["calls"] > 100, flood  # 900-2,600 seen
        assert statistics.median(ratios) < MAX_SLOWDOWN, \
            f"neighbour p50 flooded/quiet per round: {[round(r, 1) for r in ratios]}"


# The stuck reader: a lone container (so the daemon would wait for its reads inline,
# memory.INLINE_WAIT) calls mkdir with its path on a page registered with a userfaultfd
# it never serves: reading it blocks until the target exits. Meanwhile its main thread
# makes CALLS getpgid calls (decided inline) and reports their latencies, and the
# mkdir's answer once it came (at the deadline).
STUCK = f"""\
import ctypes, fcntl, json, os, struct, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
uffd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd
assert uffd >= 0, ctypes.get_errno()
fcntl.ioctl(uffd, 0xc018aa3f, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))  # UFFDIO_API
page = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|ANON
fcntl.ioctl(uffd, 0xc020aa00, bytearray(struct.pack("QQQQ", page, 4096, 1, 0)))  # REGISTER
libc.syscall({NR_GETPGID}, ctypes.c_long(1))  # served: the session is up
mkdir = {{}}

def stuck():
    t0 = time.perf_counter()
    rc = libc.syscall({NR_MKDIR}, ctypes.c_void_p(page), ctypes.c_long(0o755))
    mkdir.update(rc=rc, errno=ctypes.get_errno(), seconds=time.perf_counter() - t0)

threading.Thread(target=stuck, daemon=True).start()
time.sleep(0.3)  # the daemon is reading the page now
lat, wrong = [], 0
for i in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    rc = libc.syscall({NR_GETPGID}, ctypes.c_long(i))
    lat.append(time.perf_counter() - t0)
    wrong += rc != 3 * i + 1
    time.sleep(0.001)
while not mkdir:
    time.sleep(0.01)
print(json.dumps({{"latencies": lat, "wrong": wrong, "mkdir": mkdir}}))
"""


@pytest.mark.parametrize("neighbour", [False, True], ids=["alone", "with-a-neighbour"])
def test_a_read_stuck_on_a_containers_memory_does_not_block_the_loop(
        tmp_path: Path, neighbour: bool, hot_loop: str) -> None:
    """process_vm_readv of an unserved userfaultfd page sleeps until the target exits
    (verified, supervisor/memory.py). With one container served, the loop waits for a
    read synchronously, but only INLINE_WAIT; with a few, only INLINE_WAIT_SHARED: then
    the read is the thread's alone, and the container's other calls are served
    meanwhile."""
    (tmp_path / "echo.py").write_text(ECHO)
    repo = Path(__file__).resolve().parent.parent
    text = CONFIG.format(repo=repo, tmp=tmp_path).replace('deadline = "5s"',
                                                           'deadline = "2s"')
    with daemon_process(tmp_path, text) as d:
        d.start()
        idle = None
        if neighbour:  # attached first and idle: two fds served from the start
            idle = start_filtered(d.socket_path, [sys.executable, "-c",
                                                  "import time; time.sleep(60)"],
                                  notify=("mkdir",), container_id="idle")
            d.wait_sessions(1)
        try:
            target = start_filtered(d.socket_path, [sys.executable, "-c", STUCK, "100"],
                                    notify=("mkdir", "getpgid"), container_id="stuck")
            try:
                # status counts the thread(s) the stuck read holds, while it lasts.
                deadline = time.monotonic() + 10
                while not d.status()["memory_reads"]["threads_in_slow_reads"]:
                    assert time.monotonic() < deadline, d.status()["memory_reads"]
                    time.sleep(0.01)
                reads = d.status()["memory_reads"]
                # ... and so does the gauge a scrape gets.
                slow = d.metric("seccomp_supervisor_memory_read_threads_slow")
                result = target.result(60)
            finally:
                target.kill()
        finally:
            if idle is not None:
                idle.kill()
    assert 1 <= reads["threads_in_slow_reads"] <= 2, reads  # the inline reader's, the pool's
    assert 1 <= slow <= 2, slow
    assert reads["refused"] == 0, reads
    if hot_loop == "c":  # (the pure-Python loop has no inline reader)
        assert reads["inline_given_up"] == 1, reads
    assert result["wrong"] == 0, result
    # Served while the read was stuck: not behind it (it lasted until the deadline).
    assert max(result["latencies"]) < 1.0, max(result["latencies"])
    assert result["mkdir"]["seconds"] > 1.5, result["mkdir"]  # it was stuck
    assert result["mkdir"]["rc"] == -1, result["mkdir"]  # on_error at the deadline


# --------------------------------------------------------------------------- the pool
# Real threads, plain functions for reads: a read "stuck on a userfaultfd page" is one
# that waits for a threading.Event.

WAIT = 10.0  # generous bound on anything that should take milliseconds (a hang guard)


def run_pool(scenario: object) -> None:
    trio.run(scenario)  # type: ignore[arg-type]


def test_pool_takes_sessions_in_turn() -> None:
    """One thread, reads in the order they asked: each session has at most one read
    queued (its own limiter holds the rest), so that order is round-robin."""
    order: list[str] = []
    hold = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        own = {name: trio.CapacityLimiter(1) for name in "abc"}

        def work(name: str) -> bytes:
            order.append(name)
            if name == "a1":
                assert hold.wait(WAIT)
            return name.encode()

        async def read(name: str) -> None:
            assert await pool.run(lambda: work(name), own[name[0]]) == name.encode()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a1")
            while not order:  # a1 is running and holds the thread
                await trio.sleep(0.001)
            for name in ("a2", "b1", "c1"):  # a2 waits for a's slot, b1 and c1 queue
                nursery.start_soon(read, name)
                await trio.sleep(0.01)
            hold.set()
        assert not pool.pending and not pool.done

    run_pool(scenario)
    assert order == ["a1", "b1", "c1", "a2"]


def test_one_thread_reads_at_a_time_and_bursts_share_wake_ups() -> None:
    running = [0, 0]  # now, most at once
    calls = [0]
    lock = threading.Lock()

    def work() -> bytes:
        with lock:
            running[0] += 1
            running[1] = max(running)
        calls[0] += 1
        with lock:
            running[0] -= 1
        return b"x"

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)

        async def session() -> None:
            own = trio.CapacityLimiter(1)
            for _ in range(20):
                assert await pool.run(work, own) == b"x"

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(session)
        assert pool.retired == 0

    run_pool(scenario)
    assert calls[0] == 1000
    assert running[1] == 1


def test_a_slow_read_retires_its_thread_and_keeps_its_slot() -> None:
    """A read stuck in the kernel: the reads queued behind it get a new thread after
    slow_after; the stuck container's own slot stays taken until the read returns."""
    stuck = threading.Event()
    got: list[tuple[str, float]] = []

    async def scenario() -> None:
        pool = ReadPool(slow_after=0.005)
        slow_own, quick_own = trio.CapacityLimiter(1), trio.CapacityLimiter(1)

        def slow_work() -> bytes:
            assert stuck.wait(WAIT)
            return b"slow"

        async def slow() -> None:
            got.append(("slow", len(await pool.run(slow_work, slow_own))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.001)
            start = trio.current_time()
            assert await pool.run(lambda: b"quick", quick_own) == b"quick"
            got.append(("quick", trio.current_time() - start))
            assert pool.retired == 1
            assert slow_own.borrowed_tokens == 1 and quick_own.borrowed_tokens == 0
            stuck.set()
        assert slow_own.borrowed_tokens == 0

    run_pool(scenario)
    assert [name for name, _ in got] == ["quick", "slow"]
    assert got[0][1] < WAIT / 2  # served while the slow read was still stuck


def test_a_cancelled_read_leaves_no_trace() -> None:
    """Cancelled while queued: out of the queue, its slot given back at once. Cancelled
    while running: its result is dropped, its slot given back when the thread returns."""
    hold = threading.Event()
    ran: list[str] = []

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        own_a, own_b = trio.CapacityLimiter(1), trio.CapacityLimiter(1)

        def work(name: str) -> bytes:
            ran.append(name)
            if name == "running":
                assert hold.wait(WAIT)
            return b""

        async with trio.open_nursery() as nursery:
            async def gives_up(name: str, own: trio.CapacityLimiter) -> None:
                with trio.move_on_after(0.05):
                    await pool.run(lambda: work(name), own)
                    raise AssertionError("not cancelled")

            nursery.start_soon(gives_up, "running", own_a)
            while not ran:
                await trio.sleep(0.001)
            nursery.start_soon(gives_up, "queued", own_b)
            await trio.sleep(0.2)  # both gave up
            assert not pool.pending
            assert own_b.borrowed_tokens == 0  # never ran: given back at once
            assert own_a.borrowed_tokens == 1  # still running
            hold.set()
            with trio.fail_after(WAIT):
                while own_a.borrowed_tokens:
                    await trio.sleep(0.001)
        assert not pool.done

    run_pool(scenario)
    assert ran == ["running"]


def test_waiting_inline_takes_no_checkpoint_and_falls_back_when_slow() -> None:
    """``wait``: with the slot free, the result comes back without a checkpoint (so a
    handler that reads once finishes in its first step); a read slower than ``wait``
    is waited for like any other; with the slot taken nothing is waited for inline."""
    release = threading.Event()

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        own = trio.CapacityLimiter(1)
        got = b""
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint would raise Cancelled
            got = await pool.run(lambda: b"inline", own, wait=WAIT)
        assert got == b"inline" and not scope.cancelled_caught
        assert own.borrowed_tokens == 0

        def slow() -> bytes:
            assert release.wait(WAIT)
            return b"slow"

        async def release_soon() -> None:
            await trio.sleep(0.05)
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_soon)
            start = trio.current_time()
            assert await pool.run(slow, own, wait=0.005) == b"slow"
            assert trio.current_time() - start >= 0.04  # waited for asynchronously
        assert own.borrowed_tokens == 0 and not pool.done

        other = object()
        await own.acquire_on_behalf_of(other)  # the session's slot is taken
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.run(lambda: b"never", own, wait=WAIT)
        assert scope.cancelled_caught  # went the checkpointing way
        own.release_on_behalf_of(other)

    run_pool(scenario)


def test_pool_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ReadPool(slow_after=0)


def test_reading_threads_run_nicer_than_the_loop() -> None:
    """The thread a read runs in gives way to the event loop's (see memory.py)."""
    from supervisor import memory

    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def scenario() -> bytes:
        pool = ReadPool()
        return await pool.run(
            lambda: str(os.getpriority(os.PRIO_PROCESS, 0)).encode(), trio.CapacityLimiter(1))

    assert int(trio.run(scenario)) == min(19, base + memory.READER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread is left alone
