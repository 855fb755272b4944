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


def test_mkdir_makes_path_metadata_as_the_container_would(tmp_path):
    """mkdir PATH creates PATH-<metadata> as the caller: relative to its cwd, owned by
    its fsuid/fsgid, its umask applied; a call the agent has no handler for continues
    (the policy's own unhandled=allow(), no config file needed)."""
    os.chmod(tmp_path, 0o777)

    def as_user():
        os.chdir(tmp_path)
        os.setgroups([])
        os.setresgid(1234, 1234, 1234)
        os.setresuid(1234, 1234, 1234)
        os.umask(0o027)
        os.mkdir(b"d\xff", 0o777)   # not UTF-8: a path is bytes
        os.rmdir(b"d\xff")

    trial = run_policy(load(AGENT), as_user, syscalls=["mkdir", "rmdir"],
                       container=Container(id="c1", metadata="bar"))
    assert trial.errno == errno.ENOENT  # rmdir of the name asked for: it was not made
    assert [(s.syscall, s.kind) for s in trial.decisions] == [("mkdir", "returns"),
                                                             ("rmdir", "allow")]
    assert trial.decisions[0].decision.reason == "created PATH-bar"
    made = os.stat(os.fsencode(tmp_path) + b"/d\xff-bar")
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (1234, 1234, 0o750)
    assert not os.path.exists(os.fsencode(tmp_path) + b"/d\xff")


def test_mkdir_follows_the_callers_permissions_and_root(tmp_path):
    """The caller's own permission checks apply (EACCES in a directory it may not
    write), and a symlink to / in a chroot lands in the caller's root, not the host's."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    root = tmp_path / "root"
    root.mkdir()
    (root / "up").symlink_to("/")

    def in_chroot():
        os.chroot(root)
        os.chdir("/")
        os.mkdir("/up/escaped")

    def as_user():
        os.setresuid(1234, 1234, 1234)
        os.mkdir(locked / "x")

    assert run_policy(load(AGENT), as_user).errno == errno.EACCES
    assert not (locked / "x-agent-generated-suffix").exists()
    assert run_policy(load(AGENT), in_chroot,
                      container=Container(id="c1", metadata="m")).errno == 0
    assert (root / "escaped-m").is_dir() and not os.path.exists("/escaped-m")


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
    assert (tmp_path / "dir-bar").is_dir() and not (tmp_path / "dir").exists()
    assert done.returncode == 1 and b"No medium found" in done.stderr
    assert daemon.returncode == 0
