"""Unix sockets pass, network sockets fail with EAFNOSUPPORT, on real socket calls."""

import errno
import socket
from pathlib import Path

import pytest

from supervisor.errors import ConfigError
from supervisor.testing import load, run_policy

UNIX_ONLY = Path(__file__).with_name("unix_only.py")


def make(family, kind=socket.SOCK_STREAM):
    def create():
        with socket.socket(family, kind):
            return True
    return create


def test_unix_sockets_are_made_network_sockets_are_not():
    policy = load(UNIX_ONLY)
    assert run_policy(policy, make(socket.AF_UNIX)).value is True
    for family, kind in ((socket.AF_INET, socket.SOCK_STREAM),
                         (socket.AF_INET6, socket.SOCK_DGRAM)):
        trial = run_policy(policy, make(family, kind), syscalls=["socket"])
        assert trial.errno == errno.EAFNOSUPPORT
        assert trial.decisions[0].decision.reason == f"socket domain {family.name}"


def test_more_families_by_option():
    policy = load(UNIX_ONLY, domains=["AF_UNIX", "AF_NETLINK"])
    netlink = make(socket.AF_NETLINK, socket.SOCK_RAW)
    assert run_policy(policy, netlink, syscalls=["socket"]).value is True


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown address family"):
        load(UNIX_ONLY, domains=["AF_NOPE"])
