"""Shared fixtures: real targets under real notify filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor import accel, memory, spawn
from supervisor.audit import Recorder
from supervisor.decide import Chain
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd
from supervisor.policy import Container, PolicySet
from supervisor.profile import build_program, notify_profile
from supervisor.session import Session, SessionSettings

TESTS = Path(__file__).resolve().parent
TARGET = str(TESTS / "target.py")


def notify_program(names: Iterable[str]) -> bytes:
    """BPF that notifies ``names`` and allows every other call."""
    return build_program(notify_profile(list(names)))


@contextmanager
def sleeping_target(seconds: int = 60) -> Iterator[spawn.FilteredChild]:
    """A real ``sleep`` under a filter that notifies a call it never makes (swapon): a
    real seccomp listener fd to hand over (``listener_fd``, or ``take_listener()`` to own
    it). Killed on exit."""
    child = spawn.spawn_filtered(["sleep", str(seconds)], notify_program(["swapon"]))
    try:
        yield child
    finally:
        child.close()
        child.process.kill()
        child.process.wait()


@pytest.fixture(params=["c", "python"])
def hot_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each hot loop: the compiled one (supervisor/_hotloop.c) and
    the pure-Python reference, in this process (the poller chooses when it starts) and
    in every daemon it starts (through the environment)."""
    if request.param == "python":
        monkeypatch.setattr(accel, "HOTLOOP", None)
        monkeypatch.setenv(accel.NO_EXTENSIONS_ENV, "1")
    else:
        assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
        monkeypatch.delenv(accel.NO_EXTENSIONS_ENV, raising=False)
    return str(request.param)


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads waited for inline, and a poll round's reads, are waited for up to a second
    (the sessions' own inline wait, ReadPool.round_wait, the loop's INLINE_BUDGET), not
    a few ms, in the sessions made from now on: for a test that counts which way each
    read went. With a few ms, a machine whose CPUs were busy elsewhere (two busy loops
    on two vCPUs) let a wait run out now and then: the reader's thread (nice 10) or the
    target's thread serving its page was not run in time, the read went to the pool, as
    it should, and the counts were off. A wait ends when its reads are done: only a
    stuck read makes it last."""
    defaults = memory.TargetMemory.__init__.__kwdefaults__
    assert defaults is not None and "inline_wait" in defaults
    monkeypatch.setitem(defaults, "inline_wait", 1.0)
    monkeypatch.setattr(memory.ReadPool, "round_wait", staticmethod(lambda reads, fds: 1.0))
    monkeypatch.setattr(memory, "INLINE_BUDGET", 1.0)


@pytest.fixture
def int80_library(tmp_path: Path) -> Path:
    """A shared library with ``int80(nr, ebx, ecx, edx)`` (tests/test_hostile_abi.py)."""
    from .test_hostile_abi import INT80_C

    (tmp_path / "int80.c").write_text(INT80_C)
    library = tmp_path / "int80.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(library),
                    str(tmp_path / "int80.c")], check=True, capture_output=True, timeout=60)
    return library


@pytest.fixture
def sleeper() -> Iterator[spawn.FilteredChild]:
    with sleeping_target() as child:
        yield child


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@dataclass
class Target:
    child: spawn.FilteredChild

    @property
    def pid(self) -> int:
        return self.child.pid

    async def result(self) -> dict[str, object]:
        """Wait for the target to exit and return its JSON output."""
        proc = self.child.process
        with trio.fail_after(20):
            out, _ = await trio.to_thread.run_sync(proc.communicate, abandon_on_cancel=True)
        assert proc.returncode == 0, f"target exited with {proc.returncode}"
        data: dict[str, object] = json.loads(out)
        return data


def start_target(syscalls: Iterable[str], *args: str, program: bytes | None = None) -> Target:
    """``target.py ARGS`` under a filter notifying ``syscalls`` (or under ``program``)."""
    child = spawn.spawn_filtered([sys.executable, TARGET, *args],
                                 program if program is not None else notify_program(syscalls),
                                 stdout=subprocess.PIPE)
    return Target(child)


@dataclass
class Served:
    target: Target
    session: Session
    registry: CollectorRegistry
    cancel_scope: trio.CancelScope
    done: trio.Event

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def serve_target(policy: PolicySet | list[PolicySet], syscalls: Iterable[str],
                       *args: str, settings: SessionSettings | None = None,
                       container: Container | None = None,
                       program: bytes | None = None) -> AsyncIterator[Served]:
    """Start ``target.py ARGS`` under a filter notifying ``syscalls`` (or under BPF
    ``program``) and serve it with a session running ``policy``. Kills the target and
    ends the session on exit."""
    policies = policy if isinstance(policy, list) else [policy]
    registry = CollectorRegistry()
    target = await trio.to_thread.run_sync(
        lambda: start_target(syscalls, *args, program=program))
    session = Session(
        NotifyFd(target.child.take_listener()),
        container or Container(id="test", pid=target.pid),
        Chain((p.name, p) for p in policies),
        settings or SessionSettings(),
        Recorder(Metrics(registry), audit="none"),
    )
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run() -> None:
                with scope:
                    await session.run()
                done.set()

            nursery.start_soon(run)
            try:
                yield Served(target, session, registry, scope, done)
            finally:
                scope.cancel()
    finally:
        await reap_target(target)
        target.child.close()


async def reap_target(target: Target) -> None:
    """Kill ``target`` if it still runs, wait for it and close its output pipe."""
    proc = target.child.process
    if proc.poll() is None:
        proc.kill()
    await trio.to_thread.run_sync(proc.wait)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def fd_baseline() -> Callable[[], set[int]]:
    before = open_fds()

    def leaked() -> set[int]:
        return open_fds() - before

    return leaked


# The memory these tests read, in this process (the classes: tests/test_read_batch.py;
# tests/test_inline_reader.py uses them too).

@pytest.fixture
def pages() -> Iterator[Any]:
    """Two readable pages followed by a PROT_NONE one."""
    from .test_read_batch import Pages

    area = Pages(2)
    yield area
    area.close()


@pytest.fixture
def edge() -> Iterator[Any]:
    """One readable page followed by a PROT_NONE one."""
    from .test_read_batch import Pages

    area = Pages(1)
    yield area
    area.close()


@pytest.fixture
def userfault() -> Iterator[Any]:
    """A page registered with a userfaultfd nobody serves until its serve()."""
    from .test_read_batch import Userfault

    page = Userfault()
    yield page
    page.close()
