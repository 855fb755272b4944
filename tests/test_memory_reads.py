"""The reads themselves, as each reading core does them (supervisor/memory.py: the
compiled ``supervisor._memread`` and its pure-Python twin): memory content is hostile
(no NUL, a mapping that ends mid-string, 16 MiB), the kernel's faults are reproduced
(EFAULT at an unreadable page, a short read at a mapping's end), the fds and buffers a
read takes are given back, and a long run of reads does not grow the daemon.

The memory read is this process's own (process_vm_readv of our pid, /proc/self/mem):
the same system calls as for a target, with pages we lay out ourselves."""

from __future__ import annotations

import ctypes
import errno
import gc
import math
import mmap
import os
import sys

import outcome
import pytest
import trio

from supervisor.errors import TargetMemoryError
from supervisor.memory import PAGE_SIZE, ReadPool, ReadSlot, _Job, _Reader

from .conftest import open_fds

pytestmark = pytest.mark.usefixtures("read_core")

WAIT = 10.0  # a hang guard


async def read(pool: ReadPool, address: int, length: int, *, cstring: bool,
               mem_fd: int = -1, tid: int | None = None, wait: float = 0.0,
               hang: float | None = WAIT) -> bytes:
    """A read as TargetMemory hands it to the pool (without the ID checks); it fails
    after ``hang`` seconds (None: the caller bounds it)."""
    reader = _Reader(os.getpid() if tid is None else tid, mem_fd)

    def work() -> bytes:
        try:
            if cstring:
                return reader.read_cstring(address, length)
            return reader.read_exact(address, length)
        finally:
            reader.close()

    with trio.fail_after(math.inf if hang is None else hang):
        return await pool.run(work, trio.CapacityLimiter(1), wait, -1, reader.close,
                              (reader.tid, reader.mem_fd, address, length, cstring))


async def read_strings(pool: ReadPool, addresses: list[int], limit: int, *,
                       mem_fd: int = -1, tid: int | None = None, wait: float = 0.0,
                       hang: float | None = WAIT) -> list[bytes | Exception]:
    """Several strings in one job, as TargetMemory.read_cstrings_soon hands them to the
    pool (submitted without a task; the results delivered, or read inline); ``hang``: see
    :func:`read`."""
    reader = _Reader(os.getpid() if tid is None else tid, mem_fd)

    def work() -> list[bytes | Exception]:
        try:
            got: list[bytes | Exception] = []
            for address in addresses:
                if address == 0:
                    got.append(TargetMemoryError(errno.EFAULT, "NULL pointer"))
                    continue
                try:
                    got.append(reader.read_cstring(address, limit))
                except TargetMemoryError as exc:
                    got.append(exc)
            return got
        finally:
            reader.close()

    delivered: list[outcome.Outcome[list[bytes | Exception]]] = []
    arrived = trio.Event()

    def deliver(result: outcome.Outcome[list[bytes | Exception]]) -> None:
        delivered.append(result)
        arrived.set()

    job = _Job(work, ReadSlot(trio.CapacityLimiter(1)), reader.close, deliver,
               (reader.tid, reader.mem_fd, tuple(addresses), limit, True))
    with trio.fail_after(math.inf if hang is None else hang):
        if not pool.submit(job, wait):
            await arrived.wait()
            [job.outcome] = delivered
    assert job.outcome is not None
    return job.outcome.unwrap()  # type: ignore[no-any-return]


def described(values: list[bytes | Exception]) -> list[object]:
    """Results as comparable values: bytes, or (errno, message) of an error."""
    return [v if isinstance(v, bytes) else (getattr(v, "errno", None), str(v))
            for v in values]


class Pages:
    """``count`` readable pages followed by an unreadable one: memory whose end the
    target chose. The unreadable page is a page of an empty memfd mapped over the last
    page of our own mapping (MAP_FIXED: no moment it is free): reading it faults
    (process_vm_readv: EFAULT; /proc/<pid>/mem: EIO), PROT_NONE would not (the /proc
    file reads with FOLL_FORCE: zeros). Not a hole: an allocator (AddressSanitizer's)
    mapped its own page into a hole, and the mapping's unmap at the end took that page
    away with it."""

    def __init__(self, count: int) -> None:
        self.map = mmap.mmap(-1, (count + 1) * PAGE_SIZE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.end = self.address + count * PAGE_SIZE  # the unreadable page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        empty = os.memfd_create("unreadable")
        try:
            placed = libc.mmap(self.end, PAGE_SIZE, mmap.PROT_READ,
                               mmap.MAP_SHARED | 0x10, empty, 0)  # MAP_FIXED
        finally:
            os.close(empty)
        assert placed == self.end, ctypes.get_errno()

    def put(self, address: int, data: bytes) -> None:
        offset = address - self.address
        self.map[offset:offset + len(data)] = data


def run(scenario: object) -> None:
    trio.run(scenario)  # type: ignore[arg-type]


@pytest.mark.parametrize("wait", [0.0, WAIT], ids=["queued", "inline"])
def test_strings_are_read_to_their_nul_across_pages(wait: float) -> None:
    pages = Pages(3)
    start = pages.address + PAGE_SIZE - 100  # 100 bytes on one page, the rest on the next
    pages.put(start, b"/guarded/" + b"x" * 300 + b"\0after the NUL")

    async def scenario() -> None:
        pool = ReadPool()
        assert await read(pool, start, 4096, cstring=True, wait=wait) == \
            b"/guarded/" + b"x" * 300
        assert await read(pool, start, 5, cstring=False, wait=wait) == b"/guar"
        # A limit that ends exactly at the NUL's place: no NUL within it.
        with pytest.raises(TargetMemoryError) as no_nul:
            await read(pool, start, 309, cstring=True, wait=wait)
        assert no_nul.value.errno == errno.ENAMETOOLONG
        assert await read(pool, start, 310, cstring=True, wait=wait) == \
            b"/guarded/" + b"x" * 300

    run(scenario)


@pytest.mark.parametrize("use_proc_mem", [False, True], ids=["process_vm_readv", "proc"])
def test_memory_that_ends_mid_string_faults_as_the_kernel_does(use_proc_mem: bool) -> None:
    """A string without NUL up to an unreadable page: EFAULT (not a read past it, not
    what the buffer held before); bytes up to that page read whole, one more faults."""
    pages = Pages(2)
    pages.put(pages.address, b"a" * (2 * PAGE_SIZE))  # no NUL anywhere
    before = open_fds()

    async def scenario() -> None:
        pool = ReadPool()

        def fd() -> int:
            return os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC) \
                if use_proc_mem else -1

        near_end = pages.end - 10
        with pytest.raises(TargetMemoryError) as unmapped:
            await read(pool, near_end, 4096, cstring=True, mem_fd=fd())
        assert unmapped.value.errno == errno.EFAULT
        assert "unmapped" in str(unmapped.value)
        assert await read(pool, near_end, 10, cstring=False, mem_fd=fd()) == b"a" * 10
        with pytest.raises(TargetMemoryError) as short:
            await read(pool, near_end, 11, cstring=False, mem_fd=fd())
        assert short.value.errno == errno.EFAULT
        with pytest.raises(TargetMemoryError) as at_end:
            await read(pool, pages.end, 1, cstring=True, mem_fd=fd())
        assert at_end.value.errno == errno.EFAULT
        # A whole string of two pages right before the end: read, NUL found nowhere.
        with pytest.raises(TargetMemoryError) as whole:
            await read(pool, pages.address, 2 * PAGE_SIZE, cstring=True, mem_fd=fd())
        assert whole.value.errno == errno.ENAMETOOLONG

    run(scenario)
    assert open_fds() == before  # every /proc/self/mem fd was closed by its read


def test_a_large_read_is_whole_and_a_dead_task_is_an_error() -> None:
    size = 16 * 1024 * 1024
    buffer = ctypes.create_string_buffer(bytes(range(256)) * (size // 256))
    address = ctypes.addressof(buffer)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # (its pid is not reused within this test)

    async def scenario() -> None:
        pool = ReadPool()
        assert await read(pool, address, size, cstring=False) == buffer.raw[:size]
        with pytest.raises(ProcessLookupError):
            await read(pool, address, 16, cstring=True, tid=child)

    run(scenario)


def test_reads_do_not_grow_the_daemon() -> None:
    """Every result, buffer and job given back: 20,000 reads (a single string inline and
    queued, several strings inline and delivered) and neither Python's allocated blocks
    nor the resident size grow past the first 2,000 (a leaked result per read would be
    18,000 blocks; a leaked C job, ~200 bytes, 3.6 MiB). (A longer run of the compiled
    core alone, 10^6 reads: bench/README.md, "Session 8: the reading thread in C".)"""
    pages = Pages(1)
    pages.put(pages.address, b"/guarded/leak/x\0")

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE

    async def scenario() -> tuple[tuple[int, int], tuple[int, int]]:
        pool = ReadPool()

        async def reads(count: int) -> None:
            # One bound for all (hang=None): trio keeps the deadline of each exited
            # fail_after scope in its heap until it expires or the heap is compacted,
            # and on a loaded machine the count of those left moved the blocks by
            # ~2,400 (tracemalloc: trio's Deadlines.add), failing this test.
            with trio.fail_after(WAIT + count * 0.01):
                for i in range(count):
                    wait = 0.0 if i % 4 == 0 else WAIT  # (queued reads are slow here)
                    if i % 2:
                        got = await read(pool, pages.address, 64, cstring=True, wait=wait,
                                         hang=None)
                        assert got == b"/guarded/leak/x"
                    else:
                        strings = await read_strings(pool, [pages.address, 0], 64,
                                                     wait=wait, hang=None)
                        assert strings[0] == b"/guarded/leak/x"

        await reads(2_000)
        gc.collect()
        before = sys.getallocatedblocks(), rss()
        await reads(18_000)
        gc.collect()
        return before, (sys.getallocatedblocks(), rss())

    (blocks, before), (blocks_after, after) = trio.run(scenario)
    assert blocks_after - blocks < 1_000, (blocks, blocks_after)
    assert after - before < 1024 * 1024, (before, after)


@pytest.mark.parametrize("wait", [0.0, WAIT], ids=["delivered", "inline"])
@pytest.mark.parametrize("use_proc_mem", [False, True], ids=["process_vm_readv", "proc"])
def test_several_strings_of_one_job_each_get_their_own_result(
        wait: float, use_proc_mem: bool) -> None:
    """The paths a handler declared are read in one job: each string gets the bytes or
    the error read_cstring would give it (NULL, no NUL within the limit, unmapped memory
    before the NUL), in order, and the errors are the Python reader's, word for word."""
    pages = Pages(2)
    first = pages.address + PAGE_SIZE - 3  # across the page boundary
    pages.put(first, b"/guarded/a\0")
    long = pages.address + 100
    pages.put(long, b"L" * 50 + b"\0")
    tail = pages.end - 5
    pages.put(tail, b"zzzzz")  # to the unmapped page, no NUL
    addresses = [first, 0, long, tail, first]
    before = open_fds()

    async def scenario() -> None:
        pool = ReadPool()

        def fd() -> int:
            return os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC) \
                if use_proc_mem else -1

        got = await read_strings(pool, addresses, 40, mem_fd=fd(), wait=wait)
        assert described(got) == [
            b"/guarded/a",
            (errno.EFAULT, "NULL pointer"),
            (errno.ENAMETOOLONG, f"string at {long:#x} has no NUL in 40 bytes"),
            (errno.EFAULT, f"string at {tail:#x} runs into unmapped memory"),
            b"/guarded/a",
        ]
        assert await read_strings(pool, [long], 51, mem_fd=fd(), wait=wait) == [b"L" * 50]
        assert await read_strings(pool, [], 51, mem_fd=fd(), wait=wait) == []

    run(scenario)
    assert open_fds() == before  # every /proc/self/mem fd was closed by its read


def test_several_strings_of_a_dead_task_fail_as_one() -> None:
    """A read that fails for the task (ESRCH: it is gone) fails the whole job, as the
    Python reader's exception leaves its loop: the session then answers the call as
    gone, not each path as unreadable."""
    pages = Pages(1)
    pages.put(pages.address, b"/x\0")
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)

    async def scenario() -> None:
        pool = ReadPool()
        for wait in (0.0, WAIT):
            with pytest.raises(ProcessLookupError):
                await read_strings(pool, [pages.address, 0], 64, tid=child, wait=wait)

    run(scenario)


@pytest.mark.parametrize("address", [2**64, 2**70, -1], ids=["2^64", "2^70", "-1"])
def test_an_address_outside_the_address_space_is_efault(address: int) -> None:
    """A policy's own address that no register can hold: EFAULT before any read (the
    compiled core takes 64 bits; the Python reader cut 2^70 to 64 bits and pread(2)
    said EINVAL for -1)."""
    from supervisor.memory import TargetMemory

    class Never:
        closed = False

        def id_valid(self, notif_id: int) -> bool:
            raise AssertionError("not read: nothing to check")

    async def scenario() -> None:
        memory = TargetMemory(Never(), use_proc_mem=True)  # type: ignore[arg-type]
        with pytest.raises(TargetMemoryError) as outside:
            await memory.read_cstring(1, os.getpid(), address, 64)
        assert outside.value.errno == errno.EFAULT

    run(scenario)
