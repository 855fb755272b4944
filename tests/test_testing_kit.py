"""supervisor.testing, the "Writing a policy" walkthrough of docs/policies/writing.md, and
`check` over a config that uses every shipped policy."""

from __future__ import annotations

import errno
import os
import re
import runpy
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from supervisor.policy import Notification, PolicySet, allow, deny, returns
from supervisor.testing import arun_policy, run_policy

from .daemon_harness import CLI

ROOT = Path(__file__).resolve().parent.parent


WALKTHROUGH = ROOT / "docs" / "policies" / "writing.md"


def readme_block(first_line: str) -> str:
    """The fenced python block of the walkthrough that starts with ``first_line``."""
    text = WALKTHROUGH.read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if block.startswith(first_line + "\n"):
            return str(block)
    raise AssertionError(f"{WALKTHROUGH} has no python block starting with {first_line!r}")


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "no_world_writable.py").write_text(readme_block("# no_world_writable.py"))
    test_file = tmp_path / "test_no_world_writable.py"
    test_file.write_text(readme_block("# test_no_world_writable.py"))
    monkeypatch.chdir(tmp_path)  # the walkthrough loads the policy by a relative path
    tests = runpy.run_path(str(test_file))
    names = [name for name in tests if name.startswith("test_")]
    assert names == ["test_world_writable_dirs_need_the_sticky_bit", "test_lock_files_stay"]
    for i, name in enumerate(names):
        work = tmp_path / f"work{i}"
        work.mkdir()
        tests[name](work)


def counting_policy() -> PolicySet:
    policy = PolicySet("kit")

    @policy.on("getppid")
    def fixed(n: Notification) -> object:
        return returns(4242)

    @policy.on("mkdir", "mkdirat")
    async def by_name(n: Notification) -> object:
        path = await n.read_path(0 if n.syscall == "mkdir" else 1)
        if path.endswith(b"/boom"):
            raise RuntimeError("handler bug")
        if path.endswith(b"/slow"):
            await trio.sleep(5)
        if path.endswith(b"/bare"):
            return allow()  # refused: memory was read
        return deny(errno.EROFS, reason=os.fsdecode(path))

    return policy


def test_values_errnos_and_decisions_come_back(tmp_path: Path,
                                               fd_baseline: Callable[[], set[int]]) -> None:
    policy = counting_policy()
    trial = run_policy(policy, lambda: (os.getppid(), os.getppid()))
    assert trial.value == (4242, 4242)
    assert trial.decided() == ["returns", "returns"]
    assert {s.policy for s in trial.decisions} == {"kit"}
    denied = run_policy(policy, lambda: os.mkdir(tmp_path / "x"))
    assert denied.errno == errno.EROFS and "Read-only" in denied.exception
    assert denied.decisions[0].decision.reason == str(tmp_path / "x")
    assert fd_baseline() == set()


def test_errors_deadlines_and_refused_allows_become_on_error(tmp_path: Path) -> None:
    policy = counting_policy()
    boom = run_policy(policy, lambda: os.mkdir(tmp_path / "boom"),
                      on_error=deny(errno.EIO))
    assert boom.errno == errno.EIO and boom.decisions[0].error == "exception"
    started = time.monotonic()
    slow = run_policy(policy, lambda: os.mkdir(tmp_path / "slow"), deadline=0.2)
    assert slow.errno == errno.EPERM and slow.decisions[0].error == "deadline"
    assert time.monotonic() - started < 4
    bare = run_policy(policy, lambda: os.mkdir(tmp_path / "bare"))
    assert bare.errno == errno.EPERM and bare.decisions[0].error == "refused"
    assert not (tmp_path / "bare").exists()


def test_a_chain_is_asked_in_order_and_unhandled_is_configurable(tmp_path: Path) -> None:
    first = PolicySet("first")

    @first.on("getppid")
    def pass_on(n: Notification) -> None:
        return None

    second = PolicySet("second")

    @second.on("getppid")
    def answer(n: Notification) -> object:
        return returns(7)

    assert run_policy([first, second], os.getppid).value == 7
    alone = run_policy(first, os.getppid, unhandled=returns(9))
    assert alone.value == 9 and alone.decisions[0].policy == "-"


def test_child_failures_are_reported() -> None:
    policy = counting_policy()
    odd = run_policy(policy, lambda: (lambda: None))  # not picklable: its repr comes back
    assert isinstance(odd.value, str) and "lambda" in odd.value
    died = run_policy(policy, lambda: os._exit(3))
    assert died.exit_status == 3 and "status 3" in died.exception
    crashed = run_policy(policy, lambda: 1 / 0)
    assert "ZeroDivisionError" in crashed.exception


def test_a_child_that_outlives_the_timeout_is_killed() -> None:
    with pytest.raises(TimeoutError):
        run_policy(counting_policy(), lambda: time.sleep(30), timeout=0.5)


def test_write_cannot_be_notified() -> None:
    with pytest.raises(ValueError, match="write"):
        run_policy(counting_policy(), lambda: None, syscalls=["write", "getppid"])


async def test_arun_policy_in_a_trio_test(tmp_path: Path) -> None:
    trial = await arun_policy(counting_policy(), os.getppid)
    assert trial.value == 4242


# --------------------------------------------------------------------------- check


def test_check_validates_the_config_with_every_shipped_policy() -> None:
    shipped = sorted(p.stem for p in (ROOT / "policies").glob("*.py"))
    text = (ROOT / "policies" / "all.toml").read_text()
    configured = sorted(set(re.findall(r'^path = "([a-z_]+)\.py"', text, re.M)))
    assert configured == shipped
    done = subprocess.run([*CLI, "check", "--config", str(ROOT / "policies" / "all.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(": OK")


def test_check_names_file_and_key_of_bad_options(tmp_path: Path) -> None:
    text = (ROOT / "policies" / "all.toml").read_text()
    for name in ("hardening", "learn", "devices", "path_guard"):
        text = text.replace(f'path = "{name}.py"', f'path = "{ROOT}/policies/{name}.py"')
    text = text.replace('prefixes = ["/etc", "/usr"]', 'prefixes = ["/etc", "usr"]')
    text = text.replace('"1:9", "5:0"', '"1:9", "tty"')
    text = text.replace('answer = "allow"', 'answer = "maybe"')
    text = text.replace("allow_keyring = false", "allow_keyring = 0")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    done = subprocess.run([*CLI, "check", "--config", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{bad}: policy[") for line in lines)
    keys = [line.split(": ")[1] for line in lines]
    assert keys == ["policy[0].options.allow_keyring", "policy[1].options.answer",
                    "policy[2].options.allow[5]", "policy[3].options.prefixes[1]"]
