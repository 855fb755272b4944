"""The notify poller on its own, with plain fds that stay readable (no kernel filter):
what it promises the rest of the daemon while fds are busy."""

from __future__ import annotations

import os
import select

import pytest
import trio

from supervisor import accel
from supervisor.notifyfd import Poller, Suspended, carry_on, current_poller, first_step


class _AlwaysReady:
    """A reader of a pipe nobody drains (level-triggered: ready every round). Gives up
    after ``limit`` calls, so a poller that never yields still lets the test end."""

    def __init__(self, poller: Poller, fd: int, limit: int) -> None:
        self.poller, self.fd, self.limit = poller, fd, limit
        self.calls = 0

    def on_ready(self, events: int) -> Suspended | None:
        self.calls += 1
        if self.calls >= self.limit:
            self.poller.unregister(self.fd)
        return None

    def on_failure(self, exc: Exception) -> None:
        raise AssertionError(f"on_ready raised {exc!r}")


@pytest.mark.usefixtures("hot_loop")
async def test_busy_fds_leave_room_for_the_rest_of_the_daemon() -> None:
    """A busy fd is served without sleeping, but every EVENTS_PER_YIELD events or so the
    poller lets other tasks run (accepting containers, the control socket)."""
    poller = current_poller()
    pipes = [os.pipe() for _ in range(3)]
    limit = 20_000
    readers = []
    try:
        for r, w in pipes:
            os.write(w, b"x")
            readers.append(_AlwaysReady(poller, r, limit))
            poller.register(r, readers[-1])
        served = []
        while any(reader.calls < limit for reader in readers):
            await trio.lowlevel.checkpoint()
            served.append(sum(reader.calls for reader in readers))
    finally:
        for r, w in pipes:
            poller.unregister(r)
            os.close(r)
            os.close(w)
    # Events served between two runs of this task. Without the poller's checkpoints it
    # would run once, after all 60,000.
    between = [b - a for a, b in zip([0, *served[:-1]], served, strict=True)]
    # At most a few ms of work in between (~10 us an event): a round of three fds may
    # overshoot EVENTS_PER_YIELD (256) by two, and trio's scheduler may run the poller
    # twice between two runs of this task (it shuffles each batch).
    assert max(between) <= 1024, between


async def test_first_step_then_carry_on_run_a_coroutine_as_await_would() -> None:
    """first_step runs a coroutine up to its first wait (or to its end); carry_on, in the
    same task, takes it from that wait to its return value, exceptions included."""

    async def finishes_at_once() -> str:
        return "done"

    async def waits(ticks: int) -> int:
        for _ in range(ticks):
            await trio.lowlevel.checkpoint()
        return ticks

    async def waits_then_fails() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("late")

    assert first_step(finishes_at_once()) == (True, "done")

    coro = waits(3)
    finished, trap = first_step(coro)
    assert not finished
    assert await carry_on(coro, trap) == 3

    failing = waits_then_fails()
    finished, trap = first_step(failing)
    assert not finished
    try:
        await carry_on(failing, trap)
    except KeyError as exc:
        assert exc.args == ("late",)
    else:
        raise AssertionError("carry_on lost the coroutine's exception")


class _Draining:
    """A reader that empties its pipe and counts its calls."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.calls = 0

    def on_ready(self, events: int) -> Suspended | None:
        self.calls += 1
        os.read(self.fd, 64)
        return None

    def on_failure(self, exc: Exception) -> None:
        raise AssertionError(f"on_ready raised {exc!r}")


@pytest.mark.usefixtures("hot_loop")
async def test_a_reused_fd_number_reaches_its_new_reader() -> None:
    """An fd unregistered and closed, its number reused by the next session: the next
    events of that number go to the new reader. (The compiled round keeps fd -> reader
    between rounds; a cache that outlived the unregister called the old reader.)"""
    poller = current_poller()

    async def served(reader: _Draining, w: int) -> None:
        before = reader.calls
        os.write(w, b"x")
        with trio.fail_after(5):
            while reader.calls == before:
                await trio.sleep(0.001)

    r, w = os.pipe()
    old = _Draining(r)
    poller.register(r, old)
    try:
        await served(old, w)
        await served(old, w)  # a second round: the number is known to the round
    finally:
        poller.unregister(r)
        os.close(w)
    r2, w2 = os.pipe()
    os.dup2(r2, r)  # the same number, another file
    os.close(r2)
    new = _Draining(r)
    poller.register(r, new)
    try:
        await served(new, w2)
    finally:
        poller.unregister(r)
        os.close(r)
        os.close(w2)
    assert (old.calls, new.calls) == (2, 1)


class _OneByte:
    """A reader that takes one byte of its pipe per call (ready while bytes are left);
    its ``stop_at``-th call returns ``stop`` (a stand-in for a Suspended)."""

    def __init__(self, fd: int, stop_at: int = 0, stop: object = None) -> None:
        self.fd, self.stop_at, self.stop = fd, stop_at, stop
        self.calls = 0

    def on_ready(self, events: int) -> object:
        self.calls += 1
        os.read(self.fd, 1)
        return self.stop if self.calls == self.stop_at else None

    def on_failure(self, exc: Exception) -> None:
        raise AssertionError(f"on_ready raised {exc!r}")


def test_the_compiled_rounds_stop_at_an_empty_round_a_suspended_or_the_budget() -> None:
    """poll_round with a budget runs the poller's rounds itself: until a round finds
    nothing ready (the poller then sleeps), one ends with a Suspended (carried on by the
    poller's task), or `budget` events were served (the task then checkpoints); without
    one, a single round, as before."""
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    poll_round = accel.HOTLOOP.poll_round
    r, w = os.pipe()
    epoll = select.epoll()
    poller = Poller()
    try:
        epoll.register(r, select.EPOLLIN)
        reader = _OneByte(r)
        os.write(w, b"x" * 5)
        assert poll_round(poller, epoll.fileno(), {r: reader}, 32) == (1, None)
        assert poll_round(poller, epoll.fileno(), {r: reader}, 32, 256) == (4, None)
        assert reader.calls == 5  # and the last round found nothing: the pipe is empty
        os.write(w, b"x" * 10)
        assert poll_round(poller, epoll.fileno(), {r: reader}, 32, 3) == (3, None)
        assert reader.calls == 8
        marker = object()
        stopping = _OneByte(r, stop_at=2, stop=marker)
        count, suspended = poll_round(poller, epoll.fileno(), {r: stopping}, 32, 256)
        assert (count, suspended, stopping.calls) == (2, marker, 2)
    finally:
        poller._epoll.close()
        epoll.close()
        os.close(r)
        os.close(w)
