"""How a chain of policies decides one call, on real system calls (run_policy serves them
with the daemon's own session code): an allow() does not end the chain, the first
refusal or answer of its own wins, and the memory-read rule is per handler."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import trio

from supervisor.policy import Notification, PolicySet, allow, deny
from supervisor.testing import run_policy


def permissive() -> PolicySet:
    policy = PolicySet("permissive")

    @policy.on("mkdir", "mkdirat")
    def everything(n: Notification):
        return allow(reason="no objection")

    return policy


def strict(*, wait: bool) -> PolicySet:
    policy = PolicySet("strict")

    @policy.on("mkdir", "mkdirat")
    async def no_dirs(n: Notification):
        if wait:
            await trio.sleep(0.01)  # carried on by the poller, under the deadline
        return deny(errno.EPERM, reason="no directories")

    return policy


def test_a_permissive_policy_first_does_not_switch_off_the_next(tmp_path: Path) -> None:
    for wait in (False, True):
        target = tmp_path / f"d{wait}"
        trial = run_policy([permissive(), strict(wait=wait)], lambda t=target: os.mkdir(t))
        assert trial.errno == errno.EPERM, (wait, trial)
        assert not target.exists()
        assert [s.policy for s in trial.decisions] == ["strict"]


def test_an_allow_is_the_answer_when_nobody_decides_otherwise(tmp_path: Path) -> None:
    passing = PolicySet("passing")

    @passing.on("mkdir", "mkdirat")
    def no_opinion(n: Notification):
        return None

    trial = run_policy([permissive(), passing], lambda: os.mkdir(tmp_path / "d"))
    assert trial.errno == 0 and (tmp_path / "d").is_dir()
    assert [(s.decision.kind, s.policy) for s in trial.decisions] == [("allow", "permissive")]


def test_the_memory_read_rule_is_per_handler(tmp_path: Path) -> None:
    """A policy that read the path and had no opinion does not make the next policy's
    allow() (decided on registers) a refused unchecked allow; a policy that reads and
    allows must still say unchecked=True."""
    reader = PolicySet("reader")

    @reader.on("mkdir", "mkdirat")
    async def look(n: Notification):
        await n.read_path(1 if n.syscall == "mkdirat" else 0)
        return None

    trial = run_policy([reader, permissive()], lambda: os.mkdir(tmp_path / "ok"))
    assert trial.errno == 0 and (tmp_path / "ok").is_dir()

    careless = PolicySet("careless")

    @careless.on("mkdir", "mkdirat")
    async def read_then_allow(n: Notification):
        await n.read_path(1 if n.syscall == "mkdirat" else 0)
        return allow()

    trial = run_policy([careless, permissive()], lambda: os.mkdir(tmp_path / "no"))
    assert trial.errno == errno.EPERM and not (tmp_path / "no").exists()  # on_error
    assert [s.error for s in trial.decisions] == ["refused"]
