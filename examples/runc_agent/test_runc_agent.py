"""The runc agent example against real system calls, and as one ``serve`` command."""

import errno
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from agent import suffix

from supervisor.policy import Container
from supervisor.testing import load, run_policy

AGENT = Path(__file__).with_name("agent.py")


def test_the_chmod_family_gets_enomedium(tmp_path):
    victim = tmp_path / "f"
    victim.write_text("")
    policy = load(AGENT)
    for change in (lambda: os.chmod(victim, 0o600),
                   lambda: os.chmod(os.open(victim, os.O_RDONLY), 0o600),  # fchmod
                   lambda: os.chmod("f", 0o600, dir_fd=os.open(tmp_path, os.O_RDONLY))):
        trial = run_policy(policy, change)
        assert trial.errno == errno.ENOMEDIUM
        assert trial.decided() == ["deny"]


def test_everything_else_continues(tmp_path):
    """mkdir (not emulated yet) and a call the agent has no handler for continue: the
    policy's own unhandled=allow(), no config file needed."""
    trial = run_policy(load(AGENT), lambda: (os.mkdir(tmp_path / "d"), os.rmdir(tmp_path / "d")),
                       syscalls=["mkdir", "rmdir"],
                       container=Container(id="c1", metadata="bar"))
    assert trial.errno == 0 and trial.exception == ""
    assert [(s.syscall, s.kind) for s in trial.decisions] == [("mkdir", "allow"),
                                                             ("rmdir", "allow")]
    assert trial.decisions[0].decision.reason == "would create PATH-bar"


def test_metadata_cannot_leave_the_directory():
    assert suffix("bar") == "bar"
    assert suffix("/../p") == "p"
    assert suffix("..") == suffix("") == suffix("a/") == "agent-generated-suffix"


def test_one_serve_command(tmp_path):
    """``seccomp-supervisor serve --socket S --policy agent.py``, and a command handed
    to it the way runc hands over a container."""
    cli = [sys.executable, "-m", "supervisor"]
    sock = str(tmp_path / "seccomp-agent.socket")
    ready_r, ready_w = os.pipe()
    daemon = subprocess.Popen([*cli, "serve", "--socket", sock, "--policy", str(AGENT),
                               "--ready-fd", str(ready_w)], pass_fds=(ready_w,))
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 30)[0] and os.read(ready_r, 1) == b"\n"
        victim = tmp_path / "file"
        victim.write_text("")
        script = f"mkdir {tmp_path}/dir && chmod 777 {victim}"
        done = subprocess.run(
            [*cli, "run", "--socket", sock, "--metadata", "bar",
             *(f"--notify={name}" for name in ("chmod", "fchmod", "fchmodat", "mkdir")),
             "--", "sh", "-c", script], capture_output=True, timeout=60)
    finally:
        os.close(ready_r)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
    assert (tmp_path / "dir").is_dir()
    assert done.returncode == 1 and b"No medium found" in done.stderr
    assert daemon.returncode == 0
