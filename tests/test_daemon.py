"""The daemon end to end: config → socket → `seccomp-supervisor run` → policy → answer."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import trio

from supervisor import accel, memory

from .daemon_harness import CLI, running_daemon

ROOT = Path(__file__).resolve().parent.parent
HARDENING = f"""
[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"
"""


async def test_hardening_denies_setuid_chmod_and_allows_a_plain_one(tmp_path: Path) -> None:
    victim = tmp_path / "file"
    victim.write_text("")
    victim.chmod(0o600)
    async with running_daemon(tmp_path, HARDENING) as d:
        notify = ["--notify", "chmod", "--notify", "fchmodat", "--notify", "fchmodat2", "--"]
        denied = await d.run([*notify, "chmod", "u+s", str(victim)])
        assert denied.returncode == 1
        assert b"Operation not permitted" in denied.stderr
        assert victim.stat().st_mode & 0o7777 == 0o600
        allowed = await d.run([*notify, "chmod", "640", str(victim)])
        assert allowed.returncode == 0, allowed.stderr
        assert victim.stat().st_mode & 0o7777 == 0o640
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == 2
        denies = sum(d.metric("seccomp_supervisor_notifications_total", syscall=name,
                              policy="hardening", decision="deny")
                     for name in ("fchmodat", "fchmodat2", "chmod"))
        assert denies == 1
        [line] = d.audit_lines()  # audit = "deny" by default
        record = json.loads(line)
        assert record["decision"] == "deny" and record["errno"] == 1
        assert record["policy"] == "hardening"


async def test_unhandled_syscall_gets_the_configured_answer(tmp_path: Path) -> None:
    config = HARDENING + '\n'
    config = config.replace('policies = ["hardening"]',
                            'policies = ["hardening"]\nunhandled = "deny:EACCES"')
    async with running_daemon(tmp_path, config) as d:
        result = await d.run(["--notify", "mkdirat", "--notify", "mkdir", "--",
                              "mkdir", str(tmp_path / "newdir")])
        assert result.returncode == 1
        assert b"Permission denied" in result.stderr
        assert not (tmp_path / "newdir").exists()


async def test_the_target_exiting_ends_its_session(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, HARDENING) as d:
        assert (await d.run(["--notify", "chmod", "--", "true"])).returncode == 0
        with trio.fail_after(10):
            while d.daemon.sessions:
                await trio.sleep(0.01)
        assert d.metric("seccomp_supervisor_sessions") == 0


async def test_reload_keeps_the_old_config_when_the_new_one_is_broken(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, HARDENING) as d:
        d.config_path.write_text(d.config_path.read_text() + "\n[defaults]\nbogus = 1\n")
        assert not d.daemon.reload()
        assert list(d.daemon.state.policies) == ["hardening"]
        d.config_path.write_text(d.config_path.read_text().replace("\n[defaults]\nbogus = 1\n",
                                                                   ""))
        assert d.daemon.reload()


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_check_accepts_the_example_config() -> None:
    result = cli("check", "--config", "systemd/seccomp-supervisor.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_check_names_file_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\ndeadline = "soon"\n')
    result = cli("check", "--config", str(bad))
    assert result.returncode != 0
    assert str(bad) in result.stdout and "defaults.deadline" in result.stdout


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[policy]]\nname = 'x'\npath = '/nonexistent/policy.py'\n")
    result = cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "policy" in result.stderr


def test_run_without_a_daemon_fails_and_leaves_no_child(tmp_path: Path) -> None:
    result = cli("run", "--socket", str(tmp_path / "nobody.sock"), "--notify", "chmod", "--",
                 "sleep", "30", timeout=20)
    assert result.returncode == 126
    assert "not reachable" in result.stderr


def test_serve_as_a_process_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "s" / "notify.sock"
    config = tmp_path / "c.toml"
    config.write_text(f'[listen]\nsocket = "{sock}"\ncontrol_socket = "{tmp_path}/s/c.sock"\n'
                      '[metrics]\nlisten = ""\n')
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "serving on" in line:
                break
        # What serves: the hot loop and how memory reads are handed over (docs/performance.md).
        assert f"hot loop: {accel.WHY}; memory reads' hand-over {memory.spinning()}" in line
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        assert (sock.parent.stat().st_mode & 0o777) == 0o700
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
