"""One container's flood is its own problem: a neighbour stays served.

The attack (security issue, item 10): a container floods the daemon with calls that an
async policy decides by reading the caller's memory in a worker thread (path_guard's
mkdir). Before memory reads shared their worker threads fairly, each flooding session
had four threads of its own fighting the event loop for the GIL, and a quiet neighbour's
median latency went from ~60 us to 1.5-3 ms (p99 40-100 ms); bench/neighbour.py is the
measurement, with the 2x target. Now one thread reads for the whole daemon, taken in turn,
and it runs niced below the event loop (supervisor/memory.py, ReadGate). Here the bound
is generous (timing on a shared machine): the neighbour's median latency while flooded,
against its median in the same daemon just before the flood, over a few rounds.

The ReadGate's turn-taking and slow-read rule are checked on their own with trio's
autojump clock (pure logic, no kernel).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from supervisor.memory import ReadGate

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


# --------------------------------------------------------------------------- the gate


def run_gate(scenario: object) -> None:
    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def test_gate_takes_sessions_in_turn() -> None:
    """With one thread, reads get it in the order they asked: each session has at most
    one read waiting (its own limiter holds the rest), so that order is round-robin."""
    order: list[str] = []

    async def scenario() -> None:
        gate = ReadGate(active=1, slow_after=10)

        async def read(name: str, hold: float) -> None:
            await gate.acquire(name)
            order.append(name)
            await trio.sleep(hold)
            gate.release(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a1", 1)
            await trio.sleep(0.1)
            for name in ("b1", "c1"):
                nursery.start_soon(read, name, 1)
                await trio.sleep(0.1)
            nursery.start_soon(read, "a2", 1)  # a's next read comes after b's and c's
        assert gate.running == 0 and gate.waiting == 0

    run_gate(scenario)
    assert order == ["a1", "b1", "c1", "a2"]


def test_a_slow_read_stops_counting_and_a_cancelled_wait_leaves_no_trace() -> None:
    events: list[tuple[str, float]] = []

    async def scenario() -> None:
        gate = ReadGate(active=1, slow_after=0.005)

        async def slow() -> None:
            await gate.acquire("slow")
            await trio.sleep(60)  # a read stuck on a userfaultfd page
            gate.release("slow")

        async def quick(name: str) -> None:
            await gate.acquire(name)
            events.append((name, trio.current_time()))
            gate.release(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.001)
            with trio.move_on_after(0.001):  # gives up before the slow one turns slow
                await gate.acquire("gave-up")
            assert gate.waiting == 0
            nursery.start_soon(quick, "next")
            await trio.sleep(1)
            assert gate.running == 0  # the slow read no longer counts
            nursery.cancel_scope.cancel()

    run_gate(scenario)
    assert [name for name, _ in events] == ["next"]
    assert events[0][1] == pytest.approx(0.005, abs=1e-6)  # when "slow" turned slow


def test_only_the_first_in_line_watches_for_a_slow_read() -> None:
    """Many sessions waiting behind reads that turn slow: each slow turn wakes one waiter
    (the first in line), not all of them. Woken all, 100 waiting sessions took the event
    loop to 100% CPU at ~15 ms per read (bench/run.py, guard rows at K=100)."""
    retired: list[float] = []
    order: list[int] = []

    class CountingGate(ReadGate):
        def _retire_slow(self, now: float) -> None:
            retired.append(now)
            super()._retire_slow(now)

    async def scenario() -> None:
        gate = CountingGate(active=1, slow_after=0.005)

        async def read(i: int) -> None:
            await gate.acquire(i)
            order.append(i)
            await trio.sleep(0.02)  # every read turns slow
            gate.release(i)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(read, i)
                await trio.lowlevel.checkpoint()
        assert gate.running == 0 and gate.waiting == 0

    run_gate(scenario)
    assert order == list(range(50))  # still in turn
    assert len(retired) <= 50  # one per slow read, not one per waiter and slow read


def test_a_cancelled_first_in_line_hands_the_watch_on() -> None:
    """The first in line gives up: the next one watches for the slow read instead."""
    got: list[tuple[str, float]] = []

    async def scenario() -> None:
        gate = ReadGate(active=1, slow_after=0.005)

        async def stuck() -> None:
            await gate.acquire("stuck")
            await trio.sleep(60)  # a read stuck on a userfaultfd page

        async def first() -> None:
            with trio.move_on_after(0.001):  # gives up before "stuck" turns slow
                await gate.acquire("first")

        async def second() -> None:
            await gate.acquire("second")
            got.append(("second", trio.current_time()))
            gate.release("second")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck)
            await trio.sleep(0.0001)
            nursery.start_soon(first)
            await trio.sleep(0.0001)
            nursery.start_soon(second)
            await trio.sleep(1)
            assert gate.waiting == 0
            nursery.cancel_scope.cancel()

    run_gate(scenario)
    assert [name for name, _ in got] == ["second"]
    assert got[0][1] == pytest.approx(0.005, abs=1e-6)  # when "stuck" turned slow


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ReadGate(active=0)
    with pytest.raises(ValueError):
        ReadGate(slow_after=0)



def test_reading_threads_run_nicer_than_the_loop() -> None:
    """The thread a read runs in gives way to the event loop's (see memory.py)."""
    from supervisor import memory

    base = os.getpriority(os.PRIO_PROCESS, 0)

    def in_worker() -> int:
        memory._lower_thread_priority()
        return os.getpriority(os.PRIO_PROCESS, 0)

    async def scenario() -> int:
        return await trio.to_thread.run_sync(in_worker)

    assert trio.run(scenario) == min(19, base + memory.READER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread is left alone
