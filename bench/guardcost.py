#!/usr/bin/env python3
"""The Python cost of one guarded decision, piece by piece, without the kernel and
without the reading thread: where a ``guard CALL/LEN`` row's daemon CPU goes once the
path is read.

    .venv/bin/python bench/guardcost.py                 # this tree
    .venv/bin/python bench/guardcost.py --tree /tmp/old # another copy of the package

Rows (µs per call, CPU time, best of ``--repeat``), for the calls and paths of
``bench/run.py``'s memory-reading rows (``mkdirat`` and a writing ``openat`` of an
absolute LEN-byte path under ``/guarded``, denied EACCES; path_guard in advisory mode,
as there):

* ``guard()``: path_guard's handler alone, called as the session calls a coroutine
  handler (``first_step``), its path already read;
* ``session, read at once``: ``Session.on_ready`` with a stand-in notify fd (RECV hands
  out the same notification, SEND drops the answer) and a stand-in for the target's
  memory that returns the path at once (as a read within the inline wait does): route,
  the paths function, ``_prefetch``, ``guard()``, the answer, counters and audit;
* ``session, read delivered``: the same, but the read is "delivered" later, as the read
  pool's delivery task does at K > 1 (``_prefetch`` leaves the decision waiting with a
  slot and a deadline, ``_prefetched`` resumes it).

Audit is ``deny`` with the default rate limit (10 lines a second per container: nearly
every line is held back, as in the bench row) or ``none`` (``--audit``). What is not
here: RECV, ID_VALID and SEND (system calls), the reading thread, the read pool's
queueing and delivery, trio's scheduler. ``bench/run.py --profile`` and
``bench/instructions.py`` measure those with the rest. The decision is the pure-Python
one throughout: where the compiled loop takes it over once the paths are read
(``_hotloop.resume``, from the handler to the answer), it SENDs on a real listener.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import runpy
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
X86_64: int = 0xC000003E
NR = {"mkdirat": 258, "openat": 257}
AT_FDCWD_REG = 0xFFFF_FFFF_FFFF_FF9C
ADDRESS = 0x7F00_0000_1000


def bench_path(length: int) -> bytes:
    """bench/target.c's path of ``length`` bytes: "/guarded/aaa.../aaa..."."""
    path = bytearray(b"a" * length)
    path[:8] = b"/guarded"
    for i in range(8, length - 1, 201):
        path[i] = ord("/")
    return bytes(path)


def registers(call: str) -> tuple[int, ...]:
    if call == "mkdirat":
        return (AT_FDCWD_REG, ADDRESS, 0o755, 0, 0, 0)
    return (AT_FDCWD_REG, ADDRESS, 0o101, 0o644, 0, 0)  # O_WRONLY|O_CREAT


class _FakeNotify:
    """RECV returns the same notification (but for its id); SEND drops the answer
    (and counts it)."""

    def __init__(self, raw: tuple[int, int, int, int, tuple[int, ...]]) -> None:
        self.raw = raw
        self.next_id = 0
        self.sent = 0
        self.errors: dict[int, int] = {}

    def fileno(self) -> int:
        return 1000

    @property
    def closed(self) -> bool:
        return False

    def recv(self) -> tuple[int, int, int, int, tuple[int, ...]]:
        self.next_id += 1  # distinct: decisions waiting for their paths are keyed by it
        return (self.next_id, *self.raw[1:])

    def send(self, notif_id: int, val: int, error: int, flags: int) -> None:
        self.sent += 1
        self.errors[error] = self.errors.get(error, 0) + 1

    def id_valid(self, notif_id: int) -> bool:
        return True

    def close(self) -> None:
        pass


class _FakeMemory:
    """The target's memory: every string read is ``path``, at once (``delivered``
    False) or handed to the caller's ``deliver`` by :meth:`deliver_all` (True)."""

    def __init__(self, path: bytes, delivered: bool) -> None:
        from supervisor.memory import PendingReads

        self.path = path
        self.delivered = delivered
        self.waiting: list[tuple[Callable[[list[Any]], Any], int]] = []
        self._pending = PendingReads

    def id_valid(self, notif_id: int) -> bool:
        return True

    def read_cstrings_soon(self, notif_id: int, tid: int, addresses: Any, limit: int,
                           deliver: Callable[[list[Any]], Any], *, inline: bool = True,
                           values: Any = None) -> Any:
        if not self.delivered:
            return [self.path] * len(addresses)
        self.waiting.append((deliver, len(addresses)))
        return self._pending()

    def deliver_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for deliver, count in waiting:
            assert deliver([self.path] * count) is None


def load_guard() -> Any:
    """path_guard's PolicySet, configured as bench/run.py's guard rows configure it."""
    policy = runpy.run_path(str(BENCH_TREE[0] / "policies" / "path_guard.py"),
                            run_name="bench_path_guard")["policy"]
    policy.apply_options({"prefixes": ["/guarded"], "errno": "EACCES"})
    return policy


def guard_alone(call: str, length: int, calls: int) -> float:
    """µs per call of path_guard's handler alone (its path read already)."""
    import trio

    from supervisor.notifyfd import first_step
    from supervisor.policy import Container, make_notification

    policy = load_guard()
    entry = policy.handler_for(call)
    func = entry.func
    path = bench_path(length)
    memory = _FakeMemory(path, False)
    container = Container("bench")
    args = registers(call)
    result: list[float] = []

    async def main() -> None:
        ns = []
        for i in range(64):
            n = make_notification(i, 1234, NR[call], "x86_64", call, args, container,
                                  memory)  # type: ignore[arg-type]
            n._paths = {1: path}
            ns.append(n)
        rounds = max(1, calls // len(ns))
        gc.collect()
        t0 = time.process_time()
        for _ in range(rounds):
            for n in ns:
                finished, decision = first_step(func(n))
        result.append((time.process_time() - t0) / (rounds * len(ns)))
        assert finished and decision.kind == "deny" and decision.errno == 13, decision

    trio.run(main)
    return result[0]


def session_row(call: str, length: int, calls: int, audit: str, delivered: bool) -> float:
    """µs per call of the session's whole decision (see the module docstring)."""
    import trio
    from prometheus_client import CollectorRegistry

    from supervisor.audit import Recorder
    from supervisor.decide import Chain
    from supervisor.metrics import Metrics
    from supervisor.policy import Container
    from supervisor.session import Session, SessionSettings

    policy = load_guard()
    path = bench_path(length)
    result: list[float] = []

    async def main() -> None:
        recorder = Recorder(Metrics(CollectorRegistry()), audit=audit,  # type: ignore[arg-type]
                            stream=io.StringIO(), rate_limit=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run_writer)
            chain = Chain([("path_guard", policy)])
            fake = _FakeNotify((1, 1234, NR[call], X86_64, registers(call)))
            session = Session(fake, Container("bench"),  # type: ignore[arg-type]
                              chain, SessionSettings(), recorder)
            memory = session.memory = _FakeMemory(path, delivered)  # type: ignore[assignment]
            if hasattr(session, "_resume"):
                # The Python decision throughout: the compiled loop's resume() SENDs on
                # the real fd, which this stand-in has not (run.py measures it).
                session._resume = None
            on_ready = session.on_ready

            def one_batch(count: int) -> None:
                if delivered:
                    # Up to max_inflight decisions wait at a time, then are delivered
                    # in one batch, as the pool's delivery task does.
                    for _ in range(count):
                        on_ready(1)
                    memory.deliver_all()
                else:
                    for _ in range(count):
                        on_ready(1)

            batch = 32
            for _ in range(2000 // batch):  # warm up
                one_batch(batch)
            gc.collect()
            t0 = time.process_time()
            for _ in range(calls // batch):
                one_batch(batch)
            result.append((time.process_time() - t0) / (calls // batch * batch))
            assert fake.sent == (2000 // batch + calls // batch) * batch, fake.sent
            assert set(fake.errors) == {-13}, fake.errors
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", help="directory holding the supervisor package to measure")
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5, help="best of N")
    ap.add_argument("--rows", default="mkdirat/256,openat/16",
                    help="CALL/LEN, comma separated")
    ap.add_argument("--audit", default="deny", choices=("deny", "none"))
    ap.add_argument("--only", choices=("guard", "once", "delivered"),
                    help="only this row (e.g. under callgrind: the difference of two --calls)")
    args = ap.parse_args()
    tree = Path(args.tree).resolve() if args.tree else BENCH.parent
    sys.path.insert(0, str(tree))
    BENCH_TREE[0] = tree
    importlib.import_module("supervisor")
    print(f"supervisor from {sys.modules['supervisor'].__file__}, audit={args.audit}")
    for row in args.rows.split(","):
        call, _, length_text = row.partition("/")
        length = int(length_text)
        rows: dict[str, tuple[str, Callable[[], float]]] = {
            "guard": ("guard()", partial(guard_alone, call, length, args.calls)),
            "once": ("session, read at once",
                     partial(session_row, call, length, args.calls, args.audit, False)),
            "delivered": ("session, read delivered",
                          partial(session_row, call, length, args.calls, args.audit, True)),
        }
        got = {what: min(measure() for _ in range(args.repeat))
               for key, (what, measure) in rows.items() if args.only in (None, key)}
        for what, seconds in got.items():
            print(f"{row:<14} {what:<26} {seconds * 1e6:6.2f} us per call")
    return 0


BENCH_TREE: list[Path] = [BENCH.parent]

if __name__ == "__main__":
    sys.exit(main())
