"""The exec allowlist against real execve calls, per container label."""

import errno
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest

from supervisor.errors import ConfigError
from supervisor.policy import Container
from supervisor.testing import load, run_policy

ALLOWLIST = Path(__file__).with_name("allowlist.py")
OPTIONS = {"allowed": {"web": ["/bin/true"], "*": ["/bin/false"]}}


def container(**labels):
    return Container(id="c", labels=MappingProxyType(labels))


def start(program):
    return lambda: subprocess.run([program], check=False).returncode


def test_each_container_runs_its_own_list():
    policy = load(ALLOWLIST, **OPTIONS)
    web = run_policy(policy, start("/bin/true"), container=container(app="web"))
    assert web.value == 0 and web.decided() == ["allow"]
    refused = run_policy(policy, start("/bin/false"), container=container(app="web"))
    assert refused.errno == errno.EACCES and refused.decided() == ["deny"]
    assert "not in the allowlist: '/bin/false'" in refused.decisions[0].decision.reason
    # No label, or a label without a list: the "*" list.
    other = run_policy(policy, start("/bin/false"), container=container(app="batch"))
    assert other.value == 1 and other.decided() == ["allow"]


def test_relative_paths_are_refused(tmp_path):
    def relative():
        return subprocess.run(["./true"], cwd="/bin", check=False).returncode

    trial = run_policy(load(ALLOWLIST, **OPTIONS), relative, container=container(app="web"))
    assert trial.errno == errno.EACCES


def test_options_are_checked():
    with pytest.raises(ConfigError, match="not absolute"):
        load(ALLOWLIST, allowed={"*": ["sh"]})
