"""The `devices` policy: allowlisted character devices are created on the caller's behalf
(its root, cwd/dirfd, fsuid/fsgid, umask), the rest is refused. Real calls in forked
children (supervisor.testing), then in a real runc container."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.emulate import decode_dev, encode_dev, parse_status, signed_fd, stop_helper
from supervisor.errors import ConfigError
from supervisor.testing import Trial, load, run_policy

from .daemon_harness import running_daemon
from .runtime import container, oci_config, unique_id

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ROOT / "policies" / "devices.py"
CHR = stat.S_IFCHR


def mknod(path: Path | str, kind: int, major: int, minor: int, mode: int = 0o666,
          dir_fd: int | None = None) -> Callable[[], None]:
    return lambda: os.mknod(path, kind | mode, os.makedev(major, minor), dir_fd=dir_fd)


def test_an_allowlisted_device_is_created_with_the_callers_umask_and_gid(
        tmp_path: Path, fd_baseline: Callable[[], set[int]]) -> None:
    node = tmp_path / "null"

    def as_caller() -> None:
        os.umask(0o077)
        os.setgroups([])
        os.setresgid(4321, 4321, 4321)
        mknod(node, CHR, 1, 3)()

    trial = run_policy(load(DEVICES), as_caller)
    assert trial.errno == 0, trial
    assert trial.decided() == ["returns"]
    st = node.lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o600  # 0666 & ~umask 077
    assert (st.st_uid, st.st_gid) == (0, 4321)
    with open(node, "w") as f:  # usable: it is /dev/null
        f.write("discarded")
    stop_helper()  # started on first use; its socket is the one fd it keeps
    assert fd_baseline() == set()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="h5-devices-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_caller_without_privileges_creates_as_itself_and_dac_applies(
        public_dir: Path) -> None:
    tmp_path = public_dir
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    closed_dir = tmp_path / "closed"
    closed_dir.mkdir(mode=0o755)

    def as_user(target: Path) -> Callable[[], None]:
        def run() -> None:
            os.setgroups([])
            os.setresgid(1000, 1000, 1000)
            os.setresuid(1000, 1000, 1000)
            mknod(target, CHR, 1, 5)()
        return run

    made = run_policy(load(DEVICES), as_user(open_dir / "zero"))
    assert made.errno == 0, made
    st = (open_dir / "zero").lstat()
    assert (st.st_uid, st.st_gid, st.st_rdev) == (1000, 1000, os.makedev(1, 5))
    refused = run_policy(load(DEVICES), as_user(closed_dir / "zero"))
    assert refused.errno == errno.EACCES  # the directory is checked as the caller
    assert not (closed_dir / "zero").exists()
    strict = run_policy(load(DEVICES, require_cap_mknod=True), as_user(open_dir / "z2"))
    assert strict.errno == errno.EPERM
    assert not (open_dir / "z2").exists()


@pytest.mark.parametrize("kind, major, minor", [
    (stat.S_IFBLK, 8, 0),     # a disk
    (stat.S_IFBLK, 1, 3),     # block, even with an allowed number
    (CHR, 1, 1),              # /dev/mem
    (CHR, 10, 200),           # /dev/net/tun
])
def test_other_devices_are_refused_and_nothing_is_created(
        tmp_path: Path, kind: int, major: int, minor: int) -> None:
    trial = run_policy(load(DEVICES), mknod(tmp_path / "dev", kind, major, minor))
    assert trial.errno == errno.EPERM
    assert trial.decided() == ["deny"]
    assert not (tmp_path / "dev").exists()


def test_fifos_are_left_to_the_kernel(tmp_path: Path) -> None:
    trial = run_policy(load(DEVICES), mknod(tmp_path / "fifo", stat.S_IFIFO, 0, 0))
    assert trial.errno == 0 and trial.decided() == ["allow"]
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)


def test_relative_paths_use_the_callers_cwd_and_dirfd(tmp_path: Path) -> None:
    (tmp_path / "cwd").mkdir()
    (tmp_path / "dirfd").mkdir()

    def relative() -> None:
        os.chdir(tmp_path / "cwd")
        mknod("urandom", CHR, 1, 9)()
        fd = os.open(tmp_path / "dirfd", os.O_RDONLY | os.O_DIRECTORY)
        mknod("full", CHR, 1, 7, dir_fd=fd)()

    trial = run_policy(load(DEVICES), relative)
    assert trial.errno == 0, trial
    assert (tmp_path / "cwd" / "urandom").lstat().st_rdev == os.makedev(1, 9)
    assert (tmp_path / "dirfd" / "full").lstat().st_rdev == os.makedev(1, 7)


def test_a_dirfd_that_is_a_file_gives_enotdir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    def bad_dirfd() -> None:
        fd = os.open(tmp_path / "file", os.O_RDONLY)
        mknod("x", CHR, 1, 3, dir_fd=fd)()

    assert run_policy(load(DEVICES), bad_dirfd).errno == errno.ENOTDIR


def test_existing_names_give_eexist(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    trial = run_policy(load(DEVICES), mknod(tmp_path / "taken", CHR, 1, 3))
    assert trial.errno == errno.EEXIST
    assert (tmp_path / "taken").read_text() == ""


def test_symlinks_cannot_lead_out_of_the_callers_root(tmp_path: Path) -> None:
    """The caller is chrooted into `root`; symlinks there name host paths. Resolved in
    the caller's root, they lead nowhere, and nothing appears outside."""
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "tmp" / "abs").symlink_to(outside)
    (root / "tmp" / "rel").symlink_to("../" * 12 + str(outside).lstrip("/"))
    (root / "tmp" / "proc").symlink_to(f"/proc/{os.getpid()}/root{outside}")

    def escape() -> list[int]:
        os.chroot(root)
        os.chdir("/")
        results = []
        for path in ("/tmp/abs/null", "/tmp/rel/null", "tmp/rel/null", "/tmp/proc/null"):
            try:
                mknod(path, CHR, 1, 3)()
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        mknod("/tmp/inside", CHR, 1, 3)()
        return results

    trial = run_policy(load(DEVICES), escape)
    assert trial.exception == "", trial
    assert trial.value == [errno.ENOENT] * 4
    assert list(outside.iterdir()) == []
    assert (root / "tmp" / "inside").lstat().st_rdev == os.makedev(1, 3)


def test_options_are_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(DEVICES, allow=["1:3", "c 1 5"])
    assert info.value.key == "policy[0].options.allow[1]"
    with pytest.raises(ConfigError) as info:
        load(DEVICES, allow=["1:3", "5000:1"])
    assert info.value.key == "policy[0].options.allow[1]"
    with pytest.raises(ConfigError) as info:
        load(DEVICES, require_cap_mknod="yes")
    assert info.value.key == "policy[0].options.require_cap_mknod"
    narrowed = load(DEVICES, allow=["1:3"])
    assert run_policy(narrowed, mknod("/nonexistent/x", CHR, 1, 5)).errno == errno.EPERM


def test_pure_helpers() -> None:
    for major, minor in [(1, 3), (5, 0), (0, 0), (4095, 0xFFFFF), (259, 70000)]:
        assert decode_dev(encode_dev(major, minor)) == (major, minor)
        assert decode_dev(os.makedev(major, minor)) == (major, minor)
    assert signed_fd(0xFFFFFF9C) == -100 and signed_fd(0xFFFFFFFFFFFFFF9C) == -100
    assert signed_fd(3) == 3
    creds = parse_status("Name:\tx\nUmask:\t0027\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\n"
                         "Groups:\t10 11 \nCapEff:\t0000000008000000\n")
    assert (creds.uid, creds.gid, creds.groups, creds.umask) == (4, 8, (10, 11), 0o27)
    assert creds.has_capability(27) and not creds.has_capability(0)
    with pytest.raises(ValueError):
        parse_status("Uid:\t1\n")


def test_kit_reports_what_happened() -> None:
    trial = Trial()
    assert trial.decided() == []


# --------------------------------------------------------------------------- runc


DEVICES_TOML = f"""
[defaults]
policies = ["devices"]

[[policy]]
name = "devices"
path = "{DEVICES}"
"""

SCRIPT = """
mknod /tmp/null c 1 3; echo "mknod=$?"
echo data > /tmp/null; echo "write=$?"
echo "read=$(wc -c < /tmp/null)"
stat -c "node=%F %t:%T %u:%g %a" /tmp/null
mknod /tmp/disk b 8 0; echo "block=$?"
ls /tmp/disk >/dev/null 2>&1; echo "block_exists=$?"
ln -s {outside} /tmp/esc
mknod /tmp/esc/null c 1 3; echo "escape=$?"
"""


async def test_runc_container_gets_dev_null_but_no_block_device_or_escape(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    async with running_daemon(tmp_path, DEVICES_TOML) as d:
        config = oci_config(["sh", "-c", SCRIPT.format(outside=outside)],
                            notify=["mknod", "mknodat"], listener_path=d.socket_path)
        for mount in config["mounts"]:  # a /tmp where device nodes can be opened
            if mount["destination"] == "/tmp":
                mount["options"] = [o for o in mount["options"] if o != "nodev"]
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container("runc", bundle, unique_id("h5-devices")) as c:
            done = await c.run()
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr)
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines["mknod"] == "0"
    assert lines["write"] == "0" and lines["read"] == "0"
    assert lines["node"] == "character special file 1:3 0:0 644"
    assert lines["block"] == "1" and lines["block_exists"] != "0"
    assert lines["escape"] == "1"
    assert list(outside.iterdir()) == []
    assert d.metric("seccomp_supervisor_notifications_total", syscall="mknodat",
                    policy="devices", decision="returns") == 1
    # the block device (EPERM) and the escape (ENOENT, from the emulation)
    assert d.metric("seccomp_supervisor_notifications_total", syscall="mknodat",
                    policy="devices", decision="deny") == 2
    assert b"No such file or directory" in done.stderr
