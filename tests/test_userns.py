"""User-namespaced runc and crun containers (``linux.uidMappings``): the bundled policies
work there, with the chain of ``policies/all.toml``.

``devices`` is the case it exists for: in a user namespace CAP_MKNOD does not count, so
``mknod /var/null c 1 3`` fails in the kernel; the policy creates the node for the
caller, with its fsuid (the container's root, mapped to ``HOST_ID`` on the host), and
the container can use it. A block device is still refused (hardening). The node lives on
a bind mount of a host directory: a filesystem mounted inside a user namespace (the
container's own ``/dev`` or ``/tmp`` tmpfs) never opens device nodes (``SB_I_NODEV``),
whoever made them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.learn import known_syscalls
from supervisor.profile import Action, load_profile

from .daemon_harness import running_daemon
from .runtime import RUNTIMES, container, oci_config, unique_id

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parent.parent
HOST_ID = 300000  # the container's uid/gid 0 on the host
SIZE = 65536

CONFIG = f"""
[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"

[[policy]]
name = "hardening-first"
path = "{ROOT}/policies/hardening.py"
options = {{ openat2 = "enosys" }}

[[policy]]
name = "devices"
path = "{ROOT}/policies/devices.py"

[[policy]]
name = "path_guard"
path = "{ROOT}/policies/path_guard.py"
options = {{ prefixes = ["/etc", "/usr"], errno = "EACCES" }}

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{{tmp}}/learned" }}

[[route]]
match = {{ labels = {{ learn = "1" }} }}
policies = ["learn"]

[[route]]
match = {{ labels = {{ kind = "system" }} }}
policies = ["hardening-first", "devices", "path_guard", "hardening"]
"""

SYSTEM = """
echo "uid=$(id -u)"
echo "map=$(tr -s ' ' < /proc/self/uid_map)"
mknod /var/null c 1 3; echo "mknod=$?"
echo data > /var/null; echo "write=$?"
echo "read=$(wc -c < /var/null)"
stat -c "node=%F %t:%T %u:%g" /var/null
mknod /var/disk b 8 0; echo "block=$?"
ls /var/disk >/dev/null 2>&1; echo "block_exists=$?"
touch /var/f; chmod u+s /var/f; echo "setuid=$?"
chmod 640 /var/f; echo "chmod=$?"
mkdir /etc/x; echo "guard=$?"
mkdir /var/ok; echo "mkdir=$?"
"""


@pytest.fixture
def work() -> Iterator[Path]:
    """A host directory for the container's /var, owned by the container's root; under a
    0755 directory of /tmp (pytest's are 0700, and runc/crun reach the bind source as
    the container's root)."""
    base = Path(tempfile.mkdtemp(prefix="sup-userns-", dir="/tmp"))
    try:
        base.chmod(0o755)
        work = base / "work"
        work.mkdir()
        os.chown(work, HOST_ID, HOST_ID)
        yield work
    finally:
        shutil.rmtree(base, ignore_errors=True)


def userns_config(args: list[str], work: Path, **options: Any) -> dict[str, Any]:
    config = oci_config(args, **options)
    linux = config["linux"]
    linux["namespaces"].append({"type": "user"})
    linux["uidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": SIZE}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": HOST_ID, "size": SIZE}]
    config["mounts"].append({"destination": "/var", "type": "bind", "source": str(work),
                             "options": ["rbind", "rw"]})
    return config


def write_bundle(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir()
    directory.chmod(0o755)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_policies_in_a_user_namespaced_container(tmp_path: Path, work: Path,
                                                       runtime: Any) -> None:
    notify = ["mknod", "mknodat", "chmod", "fchmodat", "mkdir", "mkdirat"]
    async with running_daemon(tmp_path, CONFIG) as d:
        config = userns_config(["sh", "-c", SYSTEM], work, notify=notify,
                               listener_path=d.socket_path, metadata="kind=system")
        bundle = write_bundle(work.parent / "bundle", config)
        async with container(runtime, bundle, unique_id("userns")) as c:
            done = await c.run()
        out = done.stdout.decode()
        lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        assert lines["uid"] == "0", (out, done.stderr)
        assert lines["map"].split() == ["0", str(HOST_ID), str(SIZE)]  # really mapped
        # devices: a usable /dev/null-style node, owned by the container's root.
        assert lines["mknod"] == "0", (out, done.stderr)
        assert lines["write"] == "0" and lines["read"] == "0"
        assert lines["node"] == "character special file 1:3 0:0"
        node = os.stat(work / "null")
        assert stat.S_ISCHR(node.st_mode) and os.major(node.st_rdev) == 1
        assert (node.st_uid, node.st_gid) == (HOST_ID, HOST_ID)
        # hardening: no block device, no setuid bit; a plain chmod passes.
        assert lines["block"] == "1" and lines["block_exists"] != "0"
        assert not (work / "disk").exists()
        assert lines["setuid"] == "1" and lines["chmod"] == "0"
        assert stat.S_IMODE(os.stat(work / "f").st_mode) == 0o640
        # path_guard: EACCES under /etc (the read-only rootfs would say EROFS).
        assert lines["guard"] == "1" and "Permission denied" in done.stderr.decode()
        assert lines["mkdir"] == "0" and (work / "ok").is_dir()
        assert os.stat(work / "ok").st_uid == HOST_ID
        metric = "seccomp_supervisor_notifications_total"
        for policy, decision in (("devices", "returns"), ("hardening-first", "deny")):
            assert sum(d.metric(metric, syscall=name, policy=policy, decision=decision)
                       for name in ("mknod", "mknodat")) == 1
        assert sum(d.metric(metric, syscall=name, policy="path_guard", decision="deny")
                   for name in ("mkdir", "mkdirat")) == 1


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_learn_in_a_user_namespaced_container(tmp_path: Path, work: Path,
                                                    runtime: Any) -> None:
    names = sorted(known_syscalls() - {"write"})
    async with running_daemon(tmp_path, CONFIG) as d:
        config = userns_config(["sh", "-c", "ls -l / >/dev/null && echo listed"], work,
                               notify=names, listener_path=d.socket_path,
                               metadata="learn=1")
        bundle = write_bundle(work.parent / "bundle", config)
        cid = unique_id("userns-learn")
        async with container(runtime, bundle, cid) as c:
            done = await c.run()
        assert (done.returncode, done.stdout) == (0, b"listed\n"), done.stderr
        learned = tmp_path / "learned" / f"{cid}.json"
        with trio.fail_after(20):
            while not await trio.Path(learned).exists():
                await trio.sleep(0.05)
    profile = load_profile(learned)
    assert profile.default_action == Action.ERRNO
    allowed = {n for rule in profile.syscalls if rule.action == Action.ALLOW for n in rule.names}
    assert {"execve", "getdents64"} <= allowed
