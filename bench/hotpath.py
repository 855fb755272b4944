#!/usr/bin/env python3
"""The Python cost of one notification, without the kernel: how long ``Session.on_ready``
takes when RECV and SEND cost nothing.

    .venv/bin/python bench/hotpath.py                 # this tree
    .venv/bin/python bench/hotpath.py --tree /tmp/old # another copy of the package

A stand-in for the notify fd hands out the same notification over and over and drops the
answers (this is a measuring tool, not a test: bench/run.py measures the real thing). The
rows run the bench policies (bench/policies/) with metrics on, audit off or on ``deny``
(rate-limited to 10 lines a second, so nearly every line is suppressed). ``--journal``
gives every session an in-flight journal (supervisor/journal.py), as the daemon does
under systemd's fd store: the difference is the journal's cost per notification.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import runpy
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


class _FakeNotify:
    """RECV returns the same getppid notification; SEND drops the answer."""

    def __init__(self, raw: tuple[int, int, int, int, tuple[int, ...]]) -> None:
        import struct

        self.raw = raw
        self.sent = 0
        # The struct seccomp_notif RECV would have filled (the journal copies it).
        notif_id, pid, nr, arch, args = raw
        self.recv_buffer = bytearray(struct.pack("<QI4xiIQ6Q", notif_id, pid, nr, arch, 0,
                                                 *args))

    def fileno(self) -> int:
        return 1000

    @property
    def closed(self) -> bool:
        return False

    def recv(self) -> tuple[int, int, int, int, tuple[int, ...]]:
        return self.raw

    def send(self, notif_id: int, val: int, error: int, flags: int) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


def measure(policy_file: str, audit: str, calls: int, sessions: int = 1,
            journal: bool = False) -> float:
    import trio
    from prometheus_client import CollectorRegistry

    from supervisor.audit import Recorder
    from supervisor.decide import Chain
    from supervisor.metrics import Metrics
    from supervisor.policy import Container
    from supervisor.session import Session, SessionSettings

    policy = runpy.run_path(str(BENCH / "policies" / policy_file))["policy"]
    result: list[float] = []

    async def main() -> None:
        recorder = Recorder(Metrics(CollectorRegistry()), audit=audit,  # type: ignore[arg-type]
                            stream=io.StringIO(), rate_limit=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run_writer)
            chain = Chain([("bench", policy)])
            fakes, ready = [], []
            for i in range(sessions):  # served round-robin, as K busy containers are
                # id, pid, nr (getppid on x86_64), arch (AUDIT_ARCH_X86_64), args
                fake = _FakeNotify((1, 2 + i, 110, 0xC000003E, (0, 0, 0, 0, 0, 0)))
                session = Session(fake, Container(f"bench-{i}"),  # type: ignore[arg-type]
                                  chain, SessionSettings(), recorder)
                if journal:
                    import os

                    from supervisor.journal import Journal, create_journal_fd, slots_for

                    fd = create_journal_fd(slots_for(SessionSettings().max_inflight))
                    session.attach_journal(Journal(fd, fake.recv_buffer))
                    os.close(fd)
                fakes.append(fake)
                ready.append(session.on_ready)
            rounds = max(1, calls // sessions)
            for _ in range(max(1, 2000 // sessions)):  # warm caches
                for on_ready in ready:
                    on_ready(1)
            gc.collect()
            t0 = time.process_time()
            for _ in range(rounds):
                for on_ready in ready:
                    on_ready(1)
            result.append((time.process_time() - t0) / (rounds * sessions))
            assert sum(f.sent for f in fakes) == (rounds + max(1, 2000 // sessions)) * sessions
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", help="directory holding the supervisor package to measure")
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5, help="best of N")
    ap.add_argument("--only", help="only this row, e.g. sync_deny.py/none")
    ap.add_argument("--sessions", type=int, default=1,
                    help="sessions served round-robin (K busy containers)")
    ap.add_argument("--journal", action="store_true",
                    help="give each session an in-flight journal (as under the fd store)")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    else:
        sys.path.insert(0, str(BENCH.parent))
    importlib.import_module("supervisor")
    print(f"supervisor from {sys.modules['supervisor'].__file__}")
    rows: list[tuple[str, str]] = [("sync_deny.py", "none"), ("sync_deny.py", "deny"),
                                   ("async_deny.py", "none")]
    for policy_file, audit in rows:
        if args.only and args.only != f"{policy_file}/{audit}":
            continue
        best = min(measure(policy_file, audit, args.calls, args.sessions, args.journal)
                   for _ in range(args.repeat))
        print(f"{policy_file:<14} audit={audit:<5} {best * 1e6:6.2f} us per notification")
    return 0


if __name__ == "__main__":
    sys.exit(main())
