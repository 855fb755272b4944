"""50 runc containers started at once against one daemon: every notified call answered."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import trio

from supervisor.decide import UNHANDLED_POLICY

from .daemon_harness import running_daemon
from .runtime import container, make_bundle, unique_id

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
CONTAINERS = 50
ROUNDS = 5
CONFIG = f"""
[defaults]
policies = ["containers"]
unhandled = "deny:EXDEV"

[[policy]]
name = "containers"
path = "{POLICY}"
"""
# Per round: a deny, a returns, an allow; then the injected line.
SCRIPT = f"""
i=0
while [ $i -lt {ROUNDS} ]; do
    mkdir /tmp/deny-$i 2>/dev/null; d=$?
    mkdir /tmp/ret-$i; r=$?
    mkdir /tmp/allow-$i; a=$?
    [ -d /tmp/ret-$i ] && r=exists
    [ -d /tmp/allow-$i ] || a=missing
    echo "round $i deny=$d ret=$r allow=$a"
    i=$((i+1))
done
cat /inject
"""
EXPECTED = [f"round {i} deny=1 ret=0 allow=0" for i in range(ROUNDS)]


async def test_fifty_containers_at_once(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CONFIG) as d:
        outputs: dict[str, subprocess.CompletedProcess[bytes]] = {}
        failures: list[str] = []

        async def one(i: int) -> None:
            bundle = make_bundle(tmp_path / f"b{i}", ["sh", "-c", SCRIPT],
                                 notify=("mkdir", "mkdirat", "openat"),
                                 listener_path=d.socket_path, metadata=f"n={i}")
            async with container("runc", bundle, unique_id("scale")) as ctr:
                done = await ctr.run(timeout=90)
                if done.returncode != 0:
                    failures.append(f"{ctr.id}: rc {done.returncode}: {done.stderr!r}")
                outputs[ctr.id] = done

        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(d.daemon.sessions))
                await trio.sleep(0.005)

        start = time.monotonic()
        async with trio.open_nursery() as outer:
            outer.start_soon(watch)
            async with trio.open_nursery() as nursery:
                for i in range(CONTAINERS):
                    nursery.start_soon(one, i)
            outer.cancel_scope.cancel()
        elapsed = time.monotonic() - start
        print(f"{CONTAINERS} runc containers, {3 * ROUNDS + 1} checked notified calls each: "
              f"{elapsed:.1f} s, at most {peak} sessions at once")

        assert not failures, failures
        assert peak >= 2  # they really overlapped
        assert len(outputs) == CONTAINERS
        for cid, done in outputs.items():
            lines = done.stdout.decode().splitlines()
            assert lines[:ROUNDS] == EXPECTED, (cid, lines, done.stderr)
            # A missing line with exit 0 means cat's openat returned 0 (read stdin) instead
            # of the injected fd: an ADDFD|SEND interrupted by a signal in the daemon
            # (NotifyFd.send_fd blocks signals for that; see test_session's storm test).
            assert len(lines) == ROUNDS + 1, ("inject answered with 0?", cid, lines,
                                              done.stderr)
            assert lines[ROUNDS].startswith("tag=containers ") and f"id={cid} " in lines[ROUNDS]
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == CONTAINERS

        def total(decision: str, syscalls: tuple[str, ...] = ("mkdir", "mkdirat")) -> float:
            return sum(d.metric("seccomp_supervisor_notifications_total", syscall=s,
                                policy=p, decision=decision)
                       for s in syscalls for p in ("containers", UNHANDLED_POLICY))

        n = CONTAINERS * ROUNDS
        assert (total("deny"), total("returns"), total("allow")) == (n, n, n)
        assert total("inject_fd", ("openat",)) == CONTAINERS
        with trio.fail_after(10):
            while d.daemon.sessions:
                await trio.sleep(0.05)
        assert elapsed < 60
