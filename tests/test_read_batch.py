"""The reading thread reads queued declared paths in batches (supervisor/memory.py,
BATCH_READS): the compiled ``ReadBatch``, which lets go of the GIL once per batch, and
its pure-Python twin. A batch must read exactly what a read one by one reads, hand every
result out once, and never let one container's stuck read hold another's result."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import outcome
import pytest
import trio

from supervisor import accel, memory, spawn
from supervisor.errors import NotificationGone, TargetMemoryError
from supervisor.memory import ReadPool, ReadSlot, _Job, _PyReadBatch, _Reader, batch_outcome

from .conftest import notify_program

PAGE = memory.PAGE_SIZE
WAIT = 10.0  # a hang guard for what takes milliseconds

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE_ANONYMOUS = 0x22
NR_USERFAULTFD = 323  # x86_64
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_COPY = 0xC018AA3F, 0xC020AA00, 0xC028AA03


def _compiled() -> Any:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    return accel.HOTLOOP.ReadBatch


@pytest.fixture(params=["c", "python"])
def batch_type(request: pytest.FixtureRequest) -> Any:
    return _compiled() if request.param == "c" else _PyReadBatch


class Pages:
    """``count`` readable pages followed by a PROT_NONE one, in this process."""

    def __init__(self, count: int) -> None:
        self.size = (count + 1) * PAGE
        base = libc.mmap(None, self.size, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0)
        assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        self.base: int = base
        self.end = base + count * PAGE  # the first unreadable byte
        assert libc.mprotect(self.end, PAGE, PROT_NONE) == 0, ctypes.get_errno()

    def put(self, offset: int, data: bytes) -> int:
        address = self.base + offset if offset >= 0 else self.end + offset
        ctypes.memmove(address, data, len(data))
        return address

    def close(self) -> None:
        libc.munmap(self.base, self.size)


def reference(tid: int, address: int, limit: int) -> bytes | Exception:
    """What a read one by one gives (the job read_cstrings_soon runs without a batch)."""
    if address == 0:
        return TargetMemoryError(errno.EFAULT, "NULL pointer")
    try:
        return _Reader(tid, -1).read_cstring(address, limit)
    except TargetMemoryError as exc:
        return exc


def same(got: object, want: object) -> bool:
    if isinstance(want, Exception):
        return (type(got) is type(want) and str(got) == str(want)
                and getattr(got, "errno", None) == getattr(want, "errno", None))
    return got == want


def layouts(area: Pages, edge: Pages) -> list[tuple[str, int, int]]:
    """(name, address, limit): the ends a string can come to."""
    return [
        ("plain", area.put(0, b"/guarded/x\0"), 4096),
        ("empty", area.put(100, b"\0"), 4096),
        ("across a page", area.put(PAGE - 5, b"/across/a/page\0"), 4096),
        ("NUL on the last readable byte", area.put(-6, b"/last\0"), 4096),
        ("into unmapped memory", edge.put(-6, b"abcdef"), 4096),
        ("exactly the limit", area.put(200, b"a" * 15 + b"\0"), 16),
        ("one over the limit", area.put(300, b"a" * 16 + b"\0"), 16),
        ("the unreadable page", area.end + 10, 4096),
        ("NULL", 0, 4096),
        ("the top of the address space", 2**64 - 8, 4096),
        ("a kernel address", 0xFFFF_FFFF_8100_0000, 64),
    ]


def test_a_batch_reads_what_one_by_one_reads(batch_type: Any, pages: Pages,
                                             edge: Pages) -> None:
    """Every layout, each its own job, and the first five in one job, against
    _Reader's read one by one."""
    tid = os.getpid()
    cases = layouts(pages, edge)
    jobs: list[tuple[list[str], tuple[int, tuple[int, ...], int]]] = [
        ([name], (tid, (address,), limit)) for name, address, limit in cases]
    jobs.append(([name for name, _, _ in cases[:5]],
                 (tid, tuple(address for _, address, _ in cases[:5]), 4096)))
    batch = batch_type([request for _, request in jobs])
    assert len(batch) == len(jobs)
    assert batch.run() == len(jobs)
    for i, (names, request) in enumerate(jobs):
        result = batch.take(i)
        assert result is not None
        got = batch_outcome(request, result)
        assert isinstance(got, outcome.Value)
        want = [reference(tid, address, request[2]) for address in request[1]]
        assert len(got.value) == len(want) == len(names)
        for name, value, expected in zip(names, got.value, want, strict=True):
            assert same(value, expected), (name, value, expected)
        assert batch.take(i) is None  # once


def test_the_layouts_end_where_they_should(pages: Pages, edge: Pages) -> None:
    """The reference itself, so the comparison above compares something."""
    tid = os.getpid()
    got = {name: reference(tid, address, limit)
           for name, address, limit in layouts(pages, edge)}
    assert got["plain"] == b"/guarded/x" and got["empty"] == b""
    assert got["across a page"] == b"/across/a/page"
    assert got["NUL on the last readable byte"] == b"/last"
    assert got["exactly the limit"] == b"a" * 15
    assert isinstance(got["one over the limit"], TargetMemoryError)
    assert got["one over the limit"].errno == errno.ENAMETOOLONG
    for name in ("into unmapped memory", "the unreadable page", "NULL",
                 "the top of the address space", "a kernel address"):
        value = got[name]
        assert isinstance(value, TargetMemoryError) and value.errno == errno.EFAULT, name


def test_a_job_of_a_thread_that_is_gone_fails_alone(batch_type: Any, pages: Pages) -> None:
    """ESRCH fails that job as a whole (as _Reader.read raises it), not its neighbours."""
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names nobody (until reused, which takes a while)
    address = pages.put(0, b"/x\0")
    requests = [(os.getpid(), (address,), 64), (child.pid, (address, address), 64),
                (os.getpid(), (address,), 64)]
    batch = batch_type(requests)
    assert batch.run() == 3
    results = [batch_outcome(request, batch.take(i)) for i, request in enumerate(requests)]
    assert results[0] == outcome.Value([b"/x"]) and results[2] == outcome.Value([b"/x"])
    assert isinstance(results[1], outcome.Error)
    assert isinstance(results[1].error, OSError) and results[1].error.errno == errno.ESRCH


def test_a_batch_runs_once_and_refuses_nonsense(batch_type: Any) -> None:
    batch = batch_type([])
    assert batch.run() == 0
    with pytest.raises(RuntimeError):
        batch.run()
    for bad in ([(0, (1,), 16)], [(1, (1,), 0)], [(1, (1,), (1 << 20) + 1)]):
        with pytest.raises(ValueError):
            batch_type(bad)
    with pytest.raises(TypeError):
        batch_type([(1, [1], 16)])  # addresses must be a tuple


class SwappingTid:
    """A tid that is not an int: its ``__index__`` (Python code, which a C conversion of
    it runs) puts an unchecked request (a NULL path) in place of ``requests[1]``."""

    def __init__(self, requests: list[Any]) -> None:
        self.requests = requests
        self.calls = 0

    def __index__(self) -> int:
        self.calls += 1
        self.requests[1] = (os.getpid(), (0,), 64)  # (was: read, unchecked)
        return os.getpid()


def test_a_batch_reads_its_requests_as_they_were_checked(batch_type: Any,
                                                        pages: Pages) -> None:
    """A tid is an int: the compiled batch counted the strings first and then called a
    non-int's __index__ (Python code) while it wrote them, which could swap in a request
    of more strings than it had room for."""
    tid = os.getpid()
    address = pages.put(0, b"/x\0")
    requests: list[Any] = [(tid, (address,), 64)] * 2
    swapping = SwappingTid(requests)
    requests[0] = (swapping, (address,), 64)
    with pytest.raises(TypeError):
        batch_type(requests)
    assert swapping.calls == 0
    batch = batch_type(requests[1:])
    assert batch.run() == 1 and batch.take(0) == [b"/x"]


def test_a_batch_stopped_before_it_runs_reads_nothing(batch_type: Any, pages: Pages) -> None:
    address = pages.put(0, b"/x\0")
    batch = batch_type([(os.getpid(), (address,), 64)] * 3)
    assert batch.stop() == 0
    assert batch.run() == 0
    assert [batch.take(i) for i in range(3)] == [None] * 3
    assert not any(batch.busy(i) for i in range(3))


class Userfault:
    """A page of this process registered with a userfaultfd that nobody serves until
    :meth:`serve`: process_vm_readv of it sleeps until then (supervisor/memory.py)."""

    def __init__(self) -> None:
        fd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC)
        if fd < 0 and ctypes.get_errno() == errno.ENOSYS:
            pytest.skip("the kernel has no userfaultfd (CONFIG_USERFAULTFD)")
        assert fd >= 0, os.strerror(ctypes.get_errno())
        self.fd = int(fd)
        fcntl.ioctl(self.fd, UFFDIO_API, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
        self.page = libc.mmap(None, PAGE, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0)
        fcntl.ioctl(self.fd, UFFDIO_REGISTER,
                    bytearray(struct.pack("QQQQ", self.page, PAGE, 1, 0)))  # MISSING
        self.source = ctypes.create_string_buffer(PAGE)

    def serve(self, text: bytes) -> None:
        ctypes.memmove(self.source, text + b"\0", len(text) + 1)
        fcntl.ioctl(self.fd, UFFDIO_COPY, bytearray(struct.pack(
            "QQQQq", self.page, ctypes.addressof(self.source), PAGE, 0, 0)))

    def close(self) -> None:
        os.close(self.fd)  # wakes a read still waiting (it fails)
        libc.munmap(self.page, PAGE)


def wait_until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_stop_hands_back_the_jobs_not_begun_and_the_one_read_stays(
        batch_type: Any, pages: Pages, userfault: Userfault) -> None:
    """Job 1 is stuck: stop() says two were claimed; job 0 is taken now, job 1 is busy
    and comes out of run() once its page is served, job 2 is never read."""
    address = pages.put(0, b"/x\0")
    tid = os.getpid()
    batch = batch_type([(tid, (address,), 64), (tid, (userfault.page,), 64),
                        (tid, (address,), 64)])
    claimed: list[int] = []
    thread = threading.Thread(target=lambda: claimed.append(batch.run()), daemon=True)
    thread.start()
    wait_until(lambda: batch.busy(1))
    time.sleep(0.02)
    assert batch.busy(1)  # stuck
    assert batch.stop() == 2
    assert batch.take(0) == [b"/x"]
    assert batch.take(1) is None and batch.take(2) is None and not batch.busy(2)
    userfault.serve(b"/served")
    thread.join(WAIT)
    assert claimed == [2]
    assert not batch.busy(1)
    assert batch.take(1) == [b"/served"]
    assert batch.take(2) is None  # never read


# --------------------------------------------------------------------- in the pool

def run_pool(scenario: Callable[[], Any]) -> None:
    trio.run(scenario)


def submitted(delivered: dict[str, Any], name: str, address: int,
              work: Callable[[], Any] | None = None) -> _Job:
    """A read submitted without a task (a declared path's), its outcome put in
    ``delivered[name]``: of the string at ``address``, or ``work``'s (no request)."""
    def deliver(result: outcome.Outcome[Any]) -> None:
        delivered[name] = result

    job = _Job(work or (lambda: pytest.fail("read one by one")),
               ReadSlot(1), None, deliver)
    if work is None:
        job.request = (os.getpid(), (address,), 64)
    return job


async def hold_the_thread(pool: ReadPool, gate: threading.Event) -> None:
    """Keep the reading thread busy until ``gate`` is set: reads submitted meanwhile
    wait in the queue, and the thread takes them as one batch."""
    holder = submitted({}, "holder", 0, lambda: gate.wait(WAIT))
    assert not pool.submit(holder)
    with trio.fail_after(WAIT):
        while pool._active is None or pool._active.current is not holder:
            await trio.sleep(0.001)


def test_an_awaited_read_in_a_batch_returns_or_raises_as_read_cstring(
        batch_type: Any, pages: Pages, edge: Pages) -> None:
    """A handler's ``await read_cstring`` (ReadPool.run with a request) read in a batch:
    the bytes, or the TargetMemoryError the read one by one raises."""
    tid = os.getpid()
    cases = [case for case in layouts(pages, edge) if case[1] != 0]  # (NULL: refused before)

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        pool.batch = batch_type
        slot = trio.CapacityLimiter(1)
        for name, address, limit in cases:
            want = reference(tid, address, limit)
            try:
                got: bytes | Exception = await pool.run(
                    lambda: pytest.fail("read one by one"), slot,
                    request=(tid, (address,), limit))
            except TargetMemoryError as exc:
                got = exc
            assert same(got, want), (name, got, want)

    run_pool(scenario)


@pytest.mark.parametrize("awaited", [False, True], ids=["declared", "awaited"])
@pytest.mark.parametrize("stuck_at", [0, 1, 2])
def test_a_stuck_read_in_a_batch_holds_no_other_containers_read(
        batch_type: Any, pages: Pages, userfault: Userfault, stuck_at: int,
        awaited: bool) -> None:
    """Three containers' reads are queued behind a busy thread, so it takes them as one
    batch; one is on a page nobody serves. The other two are delivered while it is stuck
    (wherever it is in the batch: read before it, they are handed over by the pool; not
    begun, they go to a new thread), and it is counted stuck until its page is served.
    ``awaited``: container b's read is a handler's ``await`` (ReadPool.run, in a task)
    instead of a declared path's (ReadPool.submit)."""
    address = pages.put(0, b"/x\0")
    delivered: dict[str, Any] = {}
    sizes: list[int] = []

    def recording_batch(requests: list[Any]) -> Any:
        sizes.append(len(requests))
        return batch_type(requests)

    async def scenario() -> None:
        pool = ReadPool(slow_after=0.02)
        pool.batch = recording_batch  # type: ignore[assignment]
        gate = threading.Event()
        await hold_the_thread(pool, gate)
        names = ["a", "b"]
        names.insert(stuck_at, "stuck")

        async def await_read(name: str) -> None:
            delivered[name] = await outcome.acapture(
                pool.run, lambda: pytest.fail("read one by one"),
                trio.CapacityLimiter(1), request=(os.getpid(), (address,), 64))

        async with trio.open_nursery() as nursery:
            for name in names:
                if awaited and name == "b":
                    nursery.start_soon(await_read, name)
                    with trio.fail_after(WAIT):
                        while len(pool.pending) < names.index(name) + 1:
                            await trio.sleep(0.001)
                else:
                    assert not pool.submit(submitted(
                        delivered, name, userfault.page if name == "stuck" else address))
            gate.set()
            with trio.fail_after(WAIT):
                while not {"a", "b"} <= delivered.keys():
                    await trio.sleep(0.001)
            assert "stuck" not in delivered
            assert pool.stuck == 1 and pool.retired == 1
            userfault.serve(b"/late")
            with trio.fail_after(WAIT):
                while "stuck" not in delivered:
                    await trio.sleep(0.001)
            assert pool.stuck == 0

    run_pool(scenario)
    assert sizes[0] == 3, sizes  # the three were one batch
    assert delivered["a"] == outcome.Value([b"/x"])
    # An awaited read gives its string itself, as read_cstring returns it.
    assert delivered["b"] == outcome.Value(b"/x" if awaited else [b"/x"])
    assert delivered["stuck"] == outcome.Value([b"/late"])


@pytest.mark.parametrize("failing", ["make", "take", "run"])
def test_a_batch_that_fails_fails_its_jobs_not_the_reading_thread(
        batch_type: Any, pages: Pages, failing: str) -> None:
    """Making a result's objects can fail (MemoryError in take()), and so can making the
    batch; run() could, by a bug. The jobs concerned get the error as their outcome; the
    reading thread lives on and reads the next batch (a dead thread would leave every
    later read unread)."""
    address = pages.put(0, b"/x\0")
    delivered: dict[str, Any] = {}

    class Failing:
        def __init__(self, requests: list[Any]) -> None:
            self.inner = batch_type(requests)
            self.armed = len(requests) == 3  # the batch of a, b and c only
            if failing == "make" and self.armed:
                raise MemoryError

        def __len__(self) -> int:
            return len(self.inner)

        def run(self) -> int:
            if failing == "run" and self.armed:
                raise RuntimeError("run failed")
            return int(self.inner.run())

        def stop(self) -> int:
            return int(self.inner.stop())

        def busy(self, i: int) -> bool:
            return bool(self.inner.busy(i))

        def take(self, i: int) -> Any:
            got = self.inner.take(i)
            if failing == "take" and self.armed and i == 1 and got is not None:
                raise MemoryError
            return got

    async def scenario() -> None:
        pool = ReadPool(slow_after=WAIT)
        pool.batch = Failing  # type: ignore[assignment]
        gate = threading.Event()
        await hold_the_thread(pool, gate)
        for name in "abc":
            assert not pool.submit(submitted(delivered, name, address))
        gate.set()
        with trio.fail_after(WAIT):
            while not set("abc") <= delivered.keys():
                await trio.sleep(0.001)
        assert not pool.submit(submitted(delivered, "d", address))  # the same thread
        with trio.fail_after(WAIT):
            while "d" not in delivered:
                await trio.sleep(0.001)
        assert pool.retired == 0

    run_pool(scenario)
    ok = outcome.Value([b"/x"])
    assert delivered["d"] == ok
    if failing == "take":
        assert delivered["a"] == delivered["c"] == ok
        assert isinstance(delivered["b"], outcome.Error)
        assert isinstance(delivered["b"].error, MemoryError)
    else:
        for name in "abc":
            assert isinstance(delivered[name], outcome.Error)
            if failing == "make":
                assert isinstance(delivered[name].error, MemoryError)
            else:
                assert str(delivered[name].error) == "run failed"


# swapon(path, 0) from a child whose filter notifies swapon: it waits for our answer, and
# after it sleeps, so its memory (the path) is still there to be read.
SWAPON_THEN_SLEEP = """\
import ctypes, time
path = ctypes.create_string_buffer(b"/guarded/x")
ctypes.CDLL(None, use_errno=True).syscall(167, path, 0)  # swapon (x86_64)
time.sleep(60)
"""


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("awaited", [False, True], ids=["declared", "awaited"])
def test_a_read_made_once_the_call_no_longer_waits_is_not_its_argument(
        awaited: bool) -> None:
    """The race the ID_VALID after a read closes (DESIGN.md section 4), through the
    batches: the read is queued behind a busy reading thread, the call is answered
    meanwhile (so the task may reuse that memory for anything), then the read is made.
    It reads the bytes, but they are no longer the call's argument: NotificationGone,
    for a declared path (read_cstrings_soon) and for an awaited one (read_cstring)."""
    from supervisor.memory import TargetMemory
    from supervisor.notifyfd import NotifyFd

    child = spawn.spawn_filtered([sys.executable, "-c", SWAPON_THEN_SLEEP],
                                 notify_program(["swapon"]))
    notify = NotifyFd(child.take_listener())
    got: list[Any] = []

    async def scenario() -> None:
        poll = select.poll()
        poll.register(notify.fileno(), select.POLLIN)
        assert poll.poll(WAIT * 1000), "no notification"
        received = notify.recv()
        assert received is not None
        notif_id, tid, _nr, _arch, args = received
        pool = ReadPool(slow_after=WAIT)
        sizes: list[int] = []
        batch_type = pool.batch

        def recording_batch(requests: list[Any]) -> Any:
            sizes.append(len(requests))
            return batch_type(requests)

        pool.batch = recording_batch  # type: ignore[assignment]
        memory = TargetMemory(notify, pool=pool, inline_wait=0)
        gate = threading.Event()
        await hold_the_thread(pool, gate)
        async with trio.open_nursery() as nursery:
            if awaited:
                async def read() -> None:
                    got.append(await outcome.acapture(
                        memory.read_cstring, notif_id, tid, args[0], 4096))

                nursery.start_soon(read)
                with trio.fail_after(WAIT):
                    while not pool.pending:
                        await trio.sleep(0.001)
            else:
                pending = memory.read_cstrings_soon(notif_id, tid, [args[0]], 4096,
                                                    lambda values: got.append(values))
                assert not isinstance(pending, list)  # queued behind the busy thread
            notify.send(notif_id, 0, -errno.EPERM, 0)  # the call no longer waits
            gate.set()
            with trio.fail_after(WAIT):
                while not got:
                    await trio.sleep(0.001)
        assert sizes == [1]  # it went through a batch
        notify.close()

    try:
        trio.run(scenario)
    finally:
        child.process.kill()
        child.process.wait()
        if not notify.closed:
            os.close(notify.fileno())
    if awaited:
        assert isinstance(got[0], outcome.Error), got
        assert isinstance(got[0].error, NotificationGone), got
    else:
        [values] = got
        assert [type(value) for value in values] == [NotificationGone], values
