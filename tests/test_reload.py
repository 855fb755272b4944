"""Reload on SIGHUP with `seccomp-supervisor serve` as a real process: atomic, applied to
running containers too, and a broken config or policy refused, logged and counted."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .soak import (
    NR_GETPGID,
    DaemonProcess,
    RunningTarget,
    daemon_process,
    loop_program,
    one_call_program,
    start_filtered,
    wait_file,
)


def versioned(version: int, name: str = "v") -> str:
    """A policy answering getpgid(a) with VERSION * 1000 + a."""
    return (f"from supervisor.policy import PolicySet, returns\n"
            f"policy = PolicySet({name!r})\n\n"
            f"@policy.on('getpgid')\n"
            f"def answer(n):\n"
            f"    return returns({version} * 1000 + n.args[0])\n")


def setup(tmp: Path, *, extra: str = "") -> str:
    (tmp / "v.py").write_text(versioned(1))
    return (f'[defaults]\npolicies = ["v"]\n'
            f'[[policy]]\nname = "v"\npath = "{tmp}/v.py"\n{extra}')


def start_loop(d: DaemonProcess, tmp: Path, name: str) -> tuple[RunningTarget, Path]:
    ready, stop = tmp / f"{name}.ready", tmp / f"{name}.stop"
    target = start_filtered(d.socket_path, loop_program(NR_GETPGID, 1, stop, ready=ready),
                            container_id=name)
    wait_file(ready)
    return target, stop


def one_call(d: DaemonProcess, container_id: str = "new") -> int:
    result = start_filtered(d.socket_path, one_call_program(NR_GETPGID, 1),
                            container_id=container_id).result(20)
    rc: int = result["rc"] if result["rc"] != -1 else -result["errno"]
    return rc


def reload(d: DaemonProcess, *, expect: str) -> None:
    """SIGHUP, then wait for the daemon's verdict (``reloaded`` or ``reload refused``)."""
    before = d.log_text().count(expect)
    d.signal(signal.SIGHUP)
    d.wait_log(expect, count=before + 1)


def finish(target: RunningTarget, stop: Path) -> list[list[int]]:
    stop.touch()
    values: list[list[int]] = target.result(20)["values"]
    return values


def test_reload_applies_to_running_and_new_containers(tmp_path: Path) -> None:
    with daemon_process(tmp_path, setup(tmp_path)) as d:
        d.start()
        running, stop = start_loop(d, tmp_path, "running")
        try:
            (tmp_path / "v.py").write_text(versioned(2))
            reload(d, expect="reloaded")
            assert one_call(d) == 2001
            time.sleep(0.1)  # a few more calls of the running container
            values = finish(running, stop)
        finally:
            running.kill()
        # Every answer came from a policy: first the old one, then the new one; nothing
        # else (no ENOSYS, no EPERM) in between, and no going back.
        assert [v for v, _count in values] == [1001, 2001], values
        assert d.metric("seccomp_supervisor_reloads_total", result="ok") == 1
        assert d.metric("seccomp_supervisor_reloads_total", result="failed") == 0
        assert "1 running sessions routed again" in d.log_text()


def test_a_broken_policy_is_refused_logged_and_counted(tmp_path: Path) -> None:
    with daemon_process(tmp_path, setup(tmp_path)) as d:
        d.start()
        running, stop = start_loop(d, tmp_path, "running")
        try:
            (tmp_path / "v.py").write_text("def broken(:\n")
            reload(d, expect="reload refused")
            assert one_call(d) == 1001           # new containers: the old policy
            (tmp_path / "v.py").write_text(versioned(3))
            reload(d, expect="reloaded")
            assert one_call(d) == 3001
            time.sleep(0.1)
            values = finish(running, stop)
        finally:
            running.kill()
        assert [v for v, _count in values] == [1001, 3001], values
        log = d.log_text()
        assert "reload refused, keeping the running config" in log
        assert "SyntaxError" in log and "policy[0].path" in log
        assert d.metric("seccomp_supervisor_reloads_total", result="failed") == 1
        assert d.metric("seccomp_supervisor_reloads_total", result="ok") == 1


def test_reload_is_all_or_nothing(tmp_path: Path) -> None:
    """A new version of one policy is not applied when another policy of the same reload
    is broken."""
    with daemon_process(tmp_path, setup(tmp_path)) as d:
        d.start()
        running, stop = start_loop(d, tmp_path, "running")
        try:
            (tmp_path / "v.py").write_text(versioned(2))
            (tmp_path / "w.py").write_text("raise ImportError('w is broken')\n")
            d.config.write_text(d.config.read_text()
                                + f'[[policy]]\nname = "w"\npath = "{tmp_path}/w.py"\n')
            reload(d, expect="reload refused")
            assert one_call(d) == 1001
            values = finish(running, stop)
        finally:
            running.kill()
        assert [v for v, _count in values] == [1001], values
        assert "w is broken" in d.log_text()


def test_a_broken_config_is_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    with daemon_process(tmp_path, setup(tmp_path)) as d:
        d.start()
        good = d.config.read_text()
        d.config.write_text(good.replace("[defaults]\n", '[defaults]\ndeadline = "soon"\n'))
        reload(d, expect="reload refused")
        assert "defaults.deadline" in d.log_text()
        assert one_call(d) == 1001
        d.config.write_text("[[[not toml\n")
        reload(d, expect="reload refused")
        assert one_call(d) == 1001
        assert d.metric("seccomp_supervisor_reloads_total", result="failed") == 2
        assert d.process.poll() is None


def test_reload_routes_running_containers_again(tmp_path: Path) -> None:
    (tmp_path / "other.py").write_text(versioned(7, "other"))
    extra = f'[[policy]]\nname = "other"\npath = "{tmp_path}/other.py"\n'
    with daemon_process(tmp_path, setup(tmp_path, extra=extra)) as d:
        d.start()
        special, stop_special = start_loop(d, tmp_path, "special-1")
        plain, stop_plain = start_loop(d, tmp_path, "plain-1")
        try:
            d.config.write_text(d.config.read_text() + '[[route]]\nmatch = { container = '
                                '"special-*" }\npolicies = ["other"]\n')
            reload(d, expect="reloaded")
            time.sleep(0.1)
            sessions = {s["container"]: s["policies"] for s in d.status()["sessions"]}
            assert sessions == {"special-1": ["other"], "plain-1": ["v"]}
            special_values = finish(special, stop_special)
            plain_values = finish(plain, stop_plain)
        finally:
            special.kill()
            plain.kill()
        assert [v for v, _ in special_values] == [1001, 7001], special_values
        assert [v for v, _ in plain_values] == [1001], plain_values
        assert "container special-1: policies [v] -> [other]" in d.log_text()


def test_reload_changes_the_rate_limit_of_running_containers(tmp_path: Path) -> None:
    with daemon_process(tmp_path, setup(tmp_path)) as d:
        d.start()
        running, stop = start_loop(d, tmp_path, "running")
        try:
            d.config.write_text(d.config.read_text().replace(
                "[defaults]\n", '[defaults]\nrate = 1\nrate_burst = 1\n'
                                'rate_exceeded = "returns:99"\n'))
            reload(d, expect="reloaded")
            time.sleep(0.3)   # ~60 calls at 5 ms: one token, the rest over the limit
            values = finish(running, stop)
        finally:
            running.kill()
        answers = [v for v, _ in values]
        assert answers[0] == 1001 and 99 in answers, values
        assert sum(c for v, c in values if v == 99) > 20, values
