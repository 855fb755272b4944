"""The flag between the event loop and the reading thread (supervisor/memory.py): the
compiled ``Signal``, which spins before it sleeps, and its pure-Python twin. Both must
never lose a wake-up, and the compiled one must not hold the GIL while it waits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import trio

from supervisor import accel, memory


def _compiled() -> Any:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    return accel.HOTLOOP.Signal


@pytest.fixture(params=["c", "python"])
def signal(request: pytest.FixtureRequest) -> Any:
    return _compiled() if request.param == "c" else memory._PySignal


def test_a_set_flag_is_taken_once(signal: Any) -> None:
    flag = signal()
    flag.set()
    flag.set()  # two sets before a wait count once
    assert flag.wait(0.0, 0.0) is True
    assert flag.wait(0.01, 0.0) is False


def test_a_wait_times_out_after_its_timeout_spin_or_not(signal: Any) -> None:
    for spin in (0.0, 0.002, 1.0):  # the spin never outlasts the timeout
        flag = signal()
        started = time.monotonic()
        assert flag.wait(0.02, spin) is False
        took = time.monotonic() - started
        assert 0.02 <= took < 0.5, (spin, took)
    flag = signal()
    flag.set()  # a flag set after a timed-out wait is still seen
    assert flag.wait(0.01, 0.0) is True


@pytest.mark.parametrize("spin", [0.0, 1e-6, 200e-6])
def test_ping_pong_loses_no_wake_up(signal: Any, spin: float) -> None:
    """Thousands of round trips through a flag each way, the waits spinning for various
    times, so that both the spinning and the sleeping waits meet sets at every point.
    A wake-up lost shows as a wait that ends only at its timeout (a flag set while its
    waiter slept and not woken is only seen then)."""
    ping, pong = signal(), signal()
    # (Long spins on both sides are slow when both threads share a CPU: fewer rounds.)
    rounds = 20_000 if spin < 1e-4 else 4_000
    late: list[str] = []

    def waited(flag: Any, who: str, i: int) -> bool:
        started = time.monotonic()
        got = flag.wait(1.0, spin)
        if not got or time.monotonic() - started > 0.5:
            late.append(f"{who} {i}: {'late' if got else 'timed out'}")
            return False
        return True

    def partner() -> None:
        for i in range(rounds):
            if not waited(ping, "partner", i):
                return
            pong.set()

    thread = threading.Thread(target=partner)
    thread.start()
    try:
        for i in range(rounds):
            ping.set()
            if not waited(pong, "main", i):
                break
    finally:
        ping.set()
        thread.join(10)
    assert not late and not thread.is_alive()


def test_set_then_wait_sets_one_flag_and_waits_for_the_other(signal: Any) -> None:
    mine, theirs = signal(), signal()
    seen: list[bool] = []

    def partner() -> None:
        seen.append(mine.wait(5.0, 0.0))
        theirs.set()

    thread = threading.Thread(target=partner)
    thread.start()
    assert mine.set_then_wait(theirs, 5.0, 100e-6) is True
    thread.join(5)
    assert seen == [True]


def test_the_compiled_wait_lets_other_python_threads_run() -> None:
    """The loop waits for a read in the reading thread, which runs Python (its job):
    a wait that kept the GIL, spinning or sleeping, would wait for itself."""
    flag = _compiled()()
    counted: list[int] = []

    def worker() -> None:
        total = 0
        for i in range(200_000):  # Python bytecode: needs the GIL throughout
            total += i
        counted.append(total)
        flag.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert flag.wait(10.0, 1.0) is True  # spins for as long as the worker takes
    thread.join(5)
    assert counted == [sum(range(200_000))]


def test_the_compiled_signal_refuses_what_it_cannot_use() -> None:
    compiled = _compiled()
    with pytest.raises(TypeError):
        compiled(1)
    with pytest.raises(TypeError):
        compiled().set_then_wait(memory._PySignal(), 1.0)
    with pytest.raises(TypeError):
        compiled().wait(1.0, 0.0, 3)
    with pytest.raises(TypeError):
        compiled().wait("soon")


@pytest.mark.parametrize("hot_loop_kind", ["c", "python"])
def test_a_read_pool_takes_the_signal_of_the_hot_loop_chosen(
        hot_loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if hot_loop_kind == "python":
        monkeypatch.setattr(accel, "HOTLOOP", None)
        assert memory.ReadPool().signal is memory._PySignal
    else:
        assert memory.ReadPool().signal is _compiled()


def test_the_reading_thread_spins_only_after_a_short_wait() -> None:
    assert memory.next_spin(0.0, memory.READER_SPIN) == memory.READER_SPIN
    assert memory.next_spin(memory.READER_SPIN, memory.READER_SPIN) == memory.READER_SPIN
    assert memory.next_spin(memory.READER_SPIN * 1.01, memory.READER_SPIN) == 0.0
    assert memory.next_spin(5.0, memory.READER_SPIN) == 0.0


def test_spinning_elsewhere_tells_where_the_waiter_spins() -> None:
    """The loop spins for a read only while the reading thread spins on another CPU: on
    the loop's own CPU the loop would hold the CPU the reader needs."""
    compiled = _compiled()
    assert memory._PySignal().spinning_elsewhere() is False
    flag = compiled()
    assert flag.spinning_elsewhere() is False  # nobody waits
    cpus = sorted(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    spinner_cpu = cpus[0]
    started = threading.Event()

    def spinner() -> None:
        os.sched_setaffinity(0, {spinner_cpu})  # (this thread only)
        started.set()
        flag.wait(10.0, 10.0)

    thread = threading.Thread(target=spinner)
    thread.start()
    try:
        started.wait(5)
        seen: set[bool] = set()
        deadline = time.monotonic() + 0.5
        os.sched_setaffinity(0, {spinner_cpu})
        while time.monotonic() < deadline and True not in seen:
            seen.add(flag.spinning_elsewhere())
            time.sleep(0.001)
        assert True not in seen  # on its CPU: never "elsewhere"
        if len(cpus) > 1:  # (with one CPU there is no elsewhere)
            os.sched_setaffinity(0, {cpus[1]})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not flag.spinning_elsewhere():
                time.sleep(0.001)
            assert flag.spinning_elsewhere() is True
    finally:
        os.sched_setaffinity(0, mine)
        flag.set()
        thread.join(5)
    assert flag.spinning_elsewhere() is False  # done waiting


def test_a_sleeping_waiter_is_not_spinning() -> None:
    flag = _compiled()()
    thread = threading.Thread(target=flag.wait, args=(10.0, 0.0))
    thread.start()
    try:
        time.sleep(0.05)
        assert flag.spinning_elsewhere() is False
    finally:
        flag.set()
        thread.join(5)


_SPIN_PROBE = ("import supervisor.memory as m; p = m.ReadPool(); "
               "print(m.spinning()); print(p.reader_spin, p.inline_spin)")


def _spin_probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in (memory.NO_SPIN_ENV, accel.NO_EXTENSIONS_ENV)}
    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env={**clean, **env},
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def test_the_spin_is_on_by_default_and_can_be_switched_off() -> None:
    """Under a CPU quota the spin would count against the daemon's share: the operator
    can switch it off alone, and it is off with the pure-Python loop (which cannot
    spin without the GIL)."""
    spins = f"{memory.READER_SPIN} {memory.INLINE_SPIN}"
    assert _spin_probe() == ["spins before it sleeps", spins]
    assert _spin_probe(**{memory.NO_SPIN_ENV: "0"}) == ["spins before it sleeps", spins]
    assert _spin_probe(**{memory.NO_SPIN_ENV: "1"}) == [
        f"sleeps ({memory.NO_SPIN_ENV} is set)", "0.0 0.0"]
    assert _spin_probe(**{accel.NO_EXTENSIONS_ENV: "1"}) == [
        "sleeps (pure Python)", "0.0 0.0"]


def _thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def test_a_burst_of_reads_leaves_no_thread_spinning() -> None:
    """A container controls when its calls come, so it controls when the reading thread
    spins; but the spin ends READER_SPIN after its last read, whatever came before: a
    burst of back-to-back reads (each read's gap short, so the thread spins between
    them), then silence, costs no CPU in the silence."""
    assert accel.HOTLOOP is not None, accel.WHY

    async def main() -> float:
        pool = memory.ReadPool()
        assert pool.reader_spin == memory.READER_SPIN
        slot = trio.CapacityLimiter(1)
        for _ in range(500):
            assert await pool.run(lambda: b"x", slot, 0.005, 0) == b"x"
        readers = [t for t in threading.enumerate() if t.name == "seccomp-supervisor reader"]
        assert readers and readers[-1].native_id is not None
        native_id = readers[-1].native_id
        await trio.sleep(0.01)  # its last spin ends
        before = _thread_cpu_seconds(native_id)
        await trio.sleep(0.3)
        return _thread_cpu_seconds(native_id) - before

    idle_cpu = trio.run(main)
    assert idle_cpu < 0.02, f"the reading thread used {idle_cpu * 1000:.1f} ms while idle"


@pytest.mark.parametrize("how", ["run", "submit"])
def test_an_inline_wait_wakes_the_reading_thread_once_it_lets_go_of_the_gil(
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A read waited for inline wakes the reading thread from the wait itself, after the
    event loop let go of the GIL (``kick_then_wait``: ``Signal.set_then_wait``), never
    with ``kick`` under the GIL before it: woken that way, the thread only woke to wait
    for the GIL, a sleep and a wake-up more per read (3.9 futex calls per guarded call
    at K=1). A read not waited for is kicked as before."""
    assert accel.HOTLOOP is not None, accel.WHY
    calls: list[str] = []
    kick, kick_then_wait = memory._ReaderThread.kick, memory._ReaderThread.kick_then_wait

    def kicked(self: Any) -> bool:
        calls.append("kick")
        return kick(self)

    def kicked_then_waited(self: Any, waiter: Any, timeout: float, spin: float) -> bool:
        calls.append("kick_then_wait" if self.idle else "wait")
        return kick_then_wait(self, waiter, timeout, spin)

    monkeypatch.setattr(memory._ReaderThread, "kick", kicked)
    monkeypatch.setattr(memory._ReaderThread, "kick_then_wait", kicked_then_waited)

    async def main() -> None:
        pool = memory.ReadPool()
        slot = memory.ReadSlot()
        got: list[object] = []

        async def one(wait: float) -> None:
            if how == "run":
                got.append(await pool.run(lambda: b"x", slot, wait, 0))
                return
            job = memory._Job(lambda: b"x", slot, None, lambda result: got.append(
                result.unwrap()))
            if pool.submit(job, wait, 0):
                assert job.outcome is not None
                got.append(job.outcome.unwrap())

        await one(0.5)  # starts the thread: nothing to wake
        for wait in (0.5, 0.5, 0.0):
            await trio.sleep(0.01)  # the thread is idle again (asleep or spinning)
            await one(wait)
        with trio.fail_after(5):
            while len(got) < 4:
                await trio.sleep(0.001)
        assert got == [b"x"] * 4

    trio.run(main)
    # (then the pool's end kicks the thread to retire it)
    assert calls[:3] == ["kick_then_wait", "kick_then_wait", "kick"], calls
    assert set(calls[3:]) <= {"kick"}, calls
