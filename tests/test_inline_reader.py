"""The reads the event loop waits for inline go to a thread of their own that never takes
the GIL (``supervisor._hotloop.InlineReader``, memory.ReadPool._read_inline). It must
read exactly what a read batch reads, give a read up at the end of the loop's wait
without ever blocking the loop longer, stay out of the way (busy) while it is in a read
it gave up, and leave a forked child, signals and the scheduler alone."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio

from supervisor import accel, memory
from supervisor.memory import ReadPool, ReadSlot, _PyReadBatch

from .test_read_batch import (
    WAIT,
    Pages,
    SwappingTid,
    Userfault,
    layouts,
    run_pool,
    submitted,
    wait_until,
)

SPIN = 50e-6


def _reader_type() -> Any:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    return accel.HOTLOOP.InlineReader


@pytest.fixture
def reader() -> Iterator[Any]:
    made = _reader_type()(memory.READER_SPIN, 19)
    yield made
    made.close()


def batch_result(tid: int, addresses: tuple[int, ...], limit: int) -> Any:
    """What the reading thread's batch gives for the same request (the reference)."""
    batch = _PyReadBatch([(tid, addresses, limit)])
    assert batch.run() == 1
    return batch.take(0)


def test_it_reads_what_a_batch_reads(reader: Any, pages: Pages, edge: Pages) -> None:
    """Every end a string can come to, one by one and all in one request."""
    tid = os.getpid()
    cases = layouts(pages, edge)
    for name, address, limit in cases:
        got = reader.read(tid, (address,), limit, WAIT, SPIN)
        assert got == batch_result(tid, (address,), limit), name
    address = pages.put(0, b"/guarded/x\0")
    many = (address, 0, pages.end + 10, address)
    assert reader.read(tid, many, 4096, WAIT, SPIN) == batch_result(tid, many, 4096)
    assert reader.reads == len(cases) + 1 and reader.abandoned == 0 and not reader.busy


def test_a_thread_that_is_gone_fails_the_request_as_a_whole(reader: Any, pages: Pages) -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    address = pages.put(0, b"/x\0")
    assert reader.read(child, (address,), 64, WAIT, SPIN) == batch_result(child, (address,), 64)
    assert reader.read(child, (address,), 64, WAIT, SPIN) == -3  # ESRCH
    assert reader.read(os.getpid(), (address,), 64, WAIT, SPIN) == [b"/x"]


def test_it_refuses_what_it_does_not_take(reader: Any, pages: Pages) -> None:
    """Too many strings or too large a limit: False (the pool reads those); nonsense
    raises; once closed, False."""
    address = pages.put(0, b"/x\0")
    tid = os.getpid()
    assert reader.read(tid, (address,) * 9, 64, WAIT, SPIN) is False
    assert reader.read(tid, (address,), 65537, WAIT, SPIN) is False
    assert reader.read(tid, (address,) * 8, 65536, WAIT, SPIN) == [b"/x"] * 8
    with pytest.raises(ValueError):
        reader.read(0, (address,), 64, WAIT, SPIN)
    with pytest.raises(ValueError):
        reader.read(tid, (address,), 0, WAIT, SPIN)
    with pytest.raises(TypeError):
        reader.read(tid, [address], 64, WAIT, SPIN)
    with pytest.raises(OverflowError):
        reader.read(tid, (-1,), 64, WAIT, SPIN)
    for timeout, spin in ((0.0, SPIN), (float("nan"), SPIN), (-1.0, 0.0), (WAIT, -1.0),
                          (WAIT, float("nan")), (61.0, 0.0)):
        with pytest.raises(ValueError):
            reader.read(tid, (address,), 64, timeout, spin)
    assert not reader.busy  # (nothing was posted by the refused calls)
    with pytest.raises(ValueError):
        _reader_type()(2.0, 0)
    with pytest.raises(ValueError):
        _reader_type()(0.0, 20)
    reader.close()
    assert reader.read(tid, (address,), 64, WAIT, SPIN) is False


@pytest.mark.parametrize("spin", [SPIN, 0.0], ids=["spinning", "sleeping"])
def test_a_read_not_done_in_time_is_given_up_and_the_reader_is_busy_until_it_ends(
        reader: Any, pages: Pages, userfault: Userfault, spin: float) -> None:
    """The loop waits no longer than its timeout for a page nobody serves (None); the
    thread stays in that read, and the reader answers False meanwhile (it never blocks
    a second time on it); once the page is served it reads again."""
    tid = os.getpid()
    address = pages.put(0, b"/x\0")
    assert reader.read(tid, (address,), 64, WAIT, SPIN) == [b"/x"]  # the thread spins
    start = time.monotonic()
    assert reader.read(tid, (userfault.page,), 64, 0.02, spin) is None
    waited = time.monotonic() - start
    assert 0.02 <= waited < 1.0, waited
    assert reader.busy and reader.abandoned == 1
    start = time.monotonic()
    assert reader.read(tid, (address,), 64, WAIT, SPIN) is False
    assert time.monotonic() - start < 0.01
    userfault.serve(b"/late")  # the abandoned read's result is nobody's
    wait_until(lambda: not reader.busy)
    assert reader.read(tid, (address,), 64, WAIT, SPIN) == [b"/x"]
    assert reader.abandoned == 1 and reader.reads == 3


@pytest.mark.parametrize("warm", [False, True], ids=["starting", "asleep"])
def test_a_read_given_up_before_the_thread_saw_it_leaves_the_reader_free(
        pages: Pages, warm: bool) -> None:
    """A wait that ends before the thread even saw the request (it was still starting,
    or not yet woken: a thread at nice 19 on a busy machine): the thread, once it runs,
    gives the request up too and the reader is free again. It slept on for good there,
    and the reader stayed busy: the pool counted it against MAX_STUCK_READS and started
    another, which the next short wait lost as well."""
    tid = os.getpid()
    address = pages.put(0, b"/x\0")
    cpus = os.sched_getaffinity(0)
    # One CPU for this thread and the reader's (started on it): the thread cannot run
    # before the wait has ended (at once: 1 ns), so it comes late every time.
    os.sched_setaffinity(0, {min(cpus)})
    reader = _reader_type()(0.0, 19)
    try:
        if warm:
            assert reader.read(tid, (address,), 64, WAIT, 0.0) == [b"/x"]
            time.sleep(0.002)  # (asleep by now)
        assert reader.read(tid, (address,), 64, 1e-9, 0.0) in (None, [b"/x"])
        wait_until(lambda: not reader.busy)
        assert reader.read(tid, (address,), 64, WAIT, 0.0) == [b"/x"]
    finally:
        os.sched_setaffinity(0, cpus)
        reader.close()


def test_a_request_is_read_as_it_was_checked(reader: Any, pages: Pages) -> None:
    """A tid is an int: a non-int's __index__ (Python code) ran between the checks of
    read_many's requests and their writes into the thread's memory, and could close the
    reader there (its memory freed under the writes) or swap in a request of more
    strings or a larger limit than the fixed arrays hold."""
    tid = os.getpid()
    address = pages.put(0, b"/x\0")
    requests: list[Any] = [(tid, (address,), 64)] * 2
    swapping = SwappingTid(requests)
    requests[0] = (swapping, (address,), 64)
    with pytest.raises(TypeError):
        reader.read_many(requests, WAIT, SPIN)
    with pytest.raises(TypeError):
        reader.read(swapping, (address,), 64, WAIT, SPIN)
    assert swapping.calls == 0 and not reader.busy
    assert reader.read_many(requests[1:], WAIT, SPIN) == [[b"/x"]]


def test_closed_while_in_a_read_the_thread_ends_when_the_read_does(
        pages: Pages, userfault: Userfault) -> None:
    reader = _reader_type()(0.0, 19)
    tid = os.getpid()
    before = set(os.listdir("/proc/self/task"))
    assert reader.read(tid, (userfault.page,), 64, 0.01, 0.0) is None
    (thread,) = set(os.listdir("/proc/self/task")) - before
    reader.close()
    del reader
    assert os.path.exists(f"/proc/self/task/{thread}")  # still in the read
    userfault.serve(b"/late")
    wait_until(lambda: not os.path.exists(f"/proc/self/task/{thread}"))


def test_closed_by_another_thread_while_a_read_waits(userfault: Userfault) -> None:
    """close() while read() waits (the GIL released): the waiting call still returns
    (its result, or None at its timeout), and nothing it uses is freed under it."""
    reader = _reader_type()(0.0, 19)
    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.append(
        reader.read(os.getpid(), (userfault.page,), 64, 0.3, 0.0)))
    waiting.start()
    wait_until(lambda: reader.busy)
    reader.close()
    userfault.serve(b"/late")
    waiting.join(WAIT)
    assert got in ([[b"/late"]], [None])
    assert reader.read(os.getpid(), (userfault.page,), 64, WAIT, 0.0) is False


def test_its_thread_runs_nicer_than_the_loop_and_takes_no_signal(pages: Pages) -> None:
    """Niced as the pool's reading threads (memory.READER_NICE), and every signal
    blocked: a signal for the process goes to a thread that runs the handlers."""
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + memory.READER_NICE)
    reader = _reader_type()(0.0, nice)
    before = set(os.listdir("/proc/self/task"))
    try:
        assert reader.read(os.getpid(), (pages.put(0, b"/x\0"),), 64, WAIT, 0.0) == [b"/x"]
        (thread,) = set(os.listdir("/proc/self/task")) - before
        stat = Path(f"/proc/self/task/{thread}/stat").read_text()
        assert int(stat.rsplit(")", 1)[1].split()[16]) == nice  # field 19: nice
        status = Path(f"/proc/self/task/{thread}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("SigBlk:")), 16)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGURG):
            assert blocked & (1 << (number - 1)), number
    finally:
        reader.close()


def test_in_a_forked_child_a_started_reader_refuses(reader: Any, pages: Pages) -> None:
    """The child has no copy of the thread: the reader must not wait for it there."""
    address = pages.put(0, b"/x\0")
    assert reader.read(os.getpid(), (address,), 64, WAIT, SPIN) == [b"/x"]
    child = os.fork()
    if child == 0:
        try:
            code = 0 if reader.read(os.getpid(), (address,), 64, WAIT, SPIN) is False else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------- in the pool

@pytest.mark.usefixtures("patient")  # (the second read inline too: within the budget)
def test_a_read_waited_for_inline_goes_to_the_inline_reader(pages: Pages) -> None:
    """With the compiled module, a submitted read with a wait is read by the pool's
    InlineReader: done at once (not delivered), its place given back, no job queued for
    the reading thread; an awaited one too (ReadPool.run), without a checkpoint."""
    address = pages.put(0, b"/inline\0")
    delivered: dict[str, Any] = {}

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        assert pool.inline is not None
        job = submitted(delivered, "a", address)
        assert pool.submit(job, wait=WAIT)
        assert job.outcome == outcome.Value([b"/inline"])
        assert job.slot.borrowed_tokens == 0  # type: ignore[attr-defined]
        assert pool.inline.reads == 1 and pool._active is None and not pool.pending
        own = trio.CapacityLimiter(1)
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint would raise Cancelled
            got = await pool.run(lambda: pytest.fail("read one by one"), own, wait=WAIT,
                                 request=(os.getpid(), (address,), 64))
        assert got == b"/inline" and not scope.cancelled_caught
        assert own.borrowed_tokens == 0 and pool.inline.reads == 2

    run_pool(scenario)
    assert delivered == {}


@pytest.mark.parametrize("room", [True, False], ids=["room", "max-stuck"])
@pytest.mark.parametrize("awaited", [False, True], ids=["declared", "awaited"])
def test_a_stuck_inline_read_is_handed_to_the_pool_and_a_new_reader_takes_the_next(
        pages: Pages, userfault: Userfault, awaited: bool, room: bool) -> None:
    """A read on a page nobody serves: the loop waits ``wait``, then the pool reads it
    again (its thread gets stuck as well, and is handled as any slow read). The next
    read waited for inline, another container's, goes to a new inline reader; with no
    room left under max_stuck (0 here), the pool's own path refuses it (EAGAIN) as it
    refuses any read behind a stuck one then. The reader left in the read ends with it."""
    address = pages.put(0, b"/x\0")
    delivered: dict[str, Any] = {}

    async def scenario() -> None:
        pool = ReadPool(slow_after=0.02, max_stuck=64 if room else 0)
        first = pool.inline
        assert first is not None
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            if awaited:
                async def await_read() -> None:
                    delivered["stuck"] = await outcome.acapture(
                        pool.run, lambda: pytest.fail("read one by one"), ReadSlot(1),
                        wait=0.01, request=(os.getpid(), (userfault.page,), 64))

                nursery.start_soon(await_read)
                with trio.fail_after(WAIT):
                    while first.abandoned == 0:
                        await trio.sleep(0.001)
            else:
                job = submitted(delivered, "stuck", userfault.page)
                # not read in time: the pool's now
                assert not pool.submit(job, wait=0.01, turn=1)
            assert first.abandoned == 1 and first.busy
            assert trio.current_time() - start < 1.0
            assert (pool.inline is not first) == room
            assert pool.inline_left == ([first] if room else [])
            await next_read(pool, first)
            assert "stuck" not in delivered
            userfault.serve(b"/late")
            with trio.fail_after(WAIT):
                while "stuck" not in delivered or first.busy:
                    await trio.sleep(0.001)

    async def next_read(pool: ReadPool, first: Any) -> None:
        reads = first.reads
        other = submitted(delivered, "next", address)
        if room:  # a new inline reader: read at once
            assert pool.submit(other, wait=0.005, turn=2)
            assert other.outcome == outcome.Value([b"/x"])
            assert pool.inline.reads == 1
        else:  # its place behind the pool's stuck thread, refused as any such read
            assert not pool.submit(other, wait=0.005, turn=2)
            with trio.fail_after(WAIT):
                while "next" not in delivered:
                    await trio.sleep(0.001)
            refused = delivered["next"]
            assert isinstance(refused, outcome.Error)
            assert getattr(refused.error, "errno", None) == errno.EAGAIN
        assert first.reads == reads  # never the busy reader

    run_pool(scenario)
    want = outcome.Value(b"/late") if awaited else outcome.Value([b"/late"])
    assert delivered["stuck"] == want


def test_reads_a_little_slower_than_the_wait_do_not_start_a_thread_each(
        pages: Pages) -> None:
    """A container whose every read takes longer than the loop's wait, but ends: each
    is given up and read by the pool, and the inline readers take turns (two threads),
    not one new thread per read."""
    delivered: dict[str, Any] = {}
    readers: list[Any] = []  # (held: no two of them can share an id)

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        for i in range(6):
            slow = Userfault()
            try:
                readers.append(pool.inline)
                assert not pool.submit(submitted(delivered, f"r{i}", slow.page),
                                       wait=0.002, turn=i)
                slow.serve(b"/late")
                with trio.fail_after(WAIT):
                    while f"r{i}" not in delivered or any(r.busy for r in pool.inline_left):
                        await trio.sleep(0.001)
            finally:
                slow.close()
        assert sum(r.abandoned for r in (pool.inline, *pool.inline_left)) == 6

    run_pool(scenario)
    assert all(delivered[f"r{i}"] == outcome.Value([b"/late"]) for i in range(6))
    assert len({id(reader) for reader in readers}) == 2


def test_the_pure_python_loop_has_no_inline_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "HOTLOOP", None)
    assert ReadPool().inline is None


def test_an_inline_read_does_not_hold_the_gil(reader: Any, userfault: Userfault) -> None:
    """While the loop waits for its inline reader, other Python threads run."""
    ran = threading.Event()
    thread = threading.Thread(target=ran.set)

    def start_soon() -> None:
        time.sleep(0.01)
        thread.start()

    starter = threading.Thread(target=start_soon)
    starter.start()
    assert reader.read(os.getpid(), (userfault.page,), 64, 0.2, 0.0) is None
    assert ran.is_set()
    starter.join(WAIT)
    thread.join(WAIT)
    userfault.serve(b"/x")
    wait_until(lambda: not reader.busy)

