"""The shipped `hardening` policy against real calls in forked children."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import pytest

from supervisor.errors import ConfigError
from supervisor.testing import load, run_policy

ROOT = Path(__file__).resolve().parent.parent
HARDENING = ROOT / "policies" / "hardening.py"
DEVICES = ROOT / "policies" / "devices.py"


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6700])
def test_setuid_and_setgid_bits_are_refused(tmp_path: Path, mode: int) -> None:
    victim = tmp_path / "f"
    victim.write_text("")
    victim.chmod(0o644)
    trial = run_policy(load(HARDENING), lambda: os.chmod(victim, mode))
    assert trial.errno == errno.EPERM
    assert trial.decided() == ["deny"]
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_plain_modes_and_fchmod_are_allowed(tmp_path: Path) -> None:
    victim = tmp_path / "f"
    victim.write_text("")

    def both() -> None:
        os.chmod(victim, 0o600)
        fd = os.open(victim, os.O_RDONLY)
        os.fchmod(fd, 0o640)
        try:
            os.fchmod(fd, 0o4640)
        finally:
            os.close(fd)

    trial = run_policy(load(HARDENING), both)
    assert trial.errno == errno.EPERM  # the last fchmod
    assert trial.decided("chmod", "fchmod") == ["allow", "allow", "deny"]
    assert trial.decided("openat") == ["allow"]  # O_RDONLY: the mode is not used
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640


def test_allow_setid_bits_option(tmp_path: Path) -> None:
    victim = tmp_path / "f"
    victim.write_text("")
    trial = run_policy(load(HARDENING, allow_setid_bits=True),
                       lambda: os.chmod(victim, 0o4755))
    assert trial.errno == 0
    assert victim.stat().st_mode & 0o4000


def test_block_devices_are_refused_and_other_nodes_pass_down_the_chain(
        tmp_path: Path) -> None:
    blk = run_policy(load(HARDENING), lambda: os.mknod(tmp_path / "sda",
                                                       stat.S_IFBLK | 0o600,
                                                       os.makedev(8, 0)))
    assert blk.errno == errno.EPERM and not (tmp_path / "sda").exists()
    # A character device is not hardening's business: alone, `unhandled` (ENOSYS) answers;
    # chained before `devices`, devices creates it.
    null = lambda: os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666,  # noqa: E731
                            os.makedev(1, 3))
    alone = run_policy(load(HARDENING), null)
    assert alone.errno == errno.ENOSYS and alone.decisions[0].policy == "-"
    chained = run_policy([load(HARDENING), load(DEVICES)], null)
    assert chained.errno == 0 and chained.decisions[0].policy == "devices"
    assert (tmp_path / "null").lstat().st_rdev == os.makedev(1, 3)


def keyctl_get_keyring_id() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): 250 on x86_64
    rc = libc.syscall(250, 0, -3, 0)
    if rc < 0:
        raise OSError(ctypes.get_errno(), "keyctl")
    return int(rc)


def test_the_keyring_is_refused_unless_allowed() -> None:
    refused = run_policy(load(HARDENING), keyctl_get_keyring_id)
    assert refused.errno == errno.ENOSYS and refused.decided() == ["deny"]
    allowed = run_policy(load(HARDENING, allow_keyring=True), keyctl_get_keyring_id)
    assert allowed.decided() == ["allow"]
    assert allowed.errno == 0 and allowed.value > 0  # the kernel ran it


def test_options_are_typed() -> None:
    with pytest.raises(ConfigError) as info:
        load(HARDENING, allow_keyring="yes")
    assert info.value.key == "policy[0].options.allow_keyring"


@pytest.mark.parametrize("key, value", [("openat2", "allow")])
def test_choice_options_are_checked(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(HARDENING, **{key: value})
    assert info.value.key == f"policy[0].options.{key}"
