"""Shadow mode end to end: a route with `mode = "shadow"` consults its policies, logs and
counts their decisions, and tells the kernel CONTINUE."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from supervisor.testing import load, run_policy

from .daemon_harness import running_daemon

# Both hot loops: the compiled one and the pure-Python reference (conftest.hot_loop).
pytestmark = pytest.mark.usefixtures("hot_loop")

ROOT = Path(__file__).resolve().parent.parent

CONFIG = f"""
[defaults]
policies = ["hardening", "path_guard"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"

[[policy]]
name = "path_guard"
path = "{ROOT}/policies/path_guard.py"
options = {{ prefixes = ["{{tmp}}/guarded"] }}

[[route]]
match = {{ container = "trial-*" }}
policies = ["hardening", "path_guard"]
mode = "shadow"
"""

NOTIFY = ["--notify", "chmod", "--notify", "fchmodat", "--notify", "fchmodat2",
          "--notify", "mkdir", "--notify", "mkdirat"]


async def test_shadow_route_logs_and_counts_denials_but_the_kernel_runs_the_calls(
        tmp_path: Path) -> None:
    (tmp_path / "guarded").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("")
    victim.chmod(0o644)
    script = f"chmod u+s {victim} && mkdir {tmp_path}/guarded/new"
    async with running_daemon(tmp_path, CONFIG) as d:
        shadow = await d.run([*NOTIFY, "--id", "trial-1", "--", "sh", "-c", script])
        assert shadow.returncode == 0, shadow.stderr
        assert victim.stat().st_mode & 0o4000
        assert (tmp_path / "guarded" / "new").is_dir()
        counted = {name: d.metric("seccomp_supervisor_notifications_total", syscall=name,
                                  policy=policy, decision="deny")
                   for name, policy in [("fchmodat", "hardening"), ("fchmodat2", "hardening"),
                                        ("chmod", "hardening"), ("mkdir", "path_guard"),
                                        ("mkdirat", "path_guard")]}
        assert sum(counted.values()) == 2, counted
        records = [json.loads(line) for line in d.audit_lines()]
        assert len(records) == 2
        assert all(r["shadow"] is True and r["decision"] == "deny" for r in records)
        assert {r["policy"] for r in records} == {"hardening", "path_guard"}
        assert all(r["container"] == "trial-1" for r in records)

        # The same policies on an enforcing route (the defaults) refuse the same calls.
        victim.chmod(0o644)
        script = f"chmod u+s {victim}; mkdir {tmp_path}/guarded/other"
        enforced = await d.run([*NOTIFY, "--id", "prod-1", "--", "sh", "-c", script])
        assert b"Operation not permitted" in enforced.stderr
        assert b"Permission denied" in enforced.stderr
        assert not victim.stat().st_mode & 0o4000
        assert not (tmp_path / "guarded" / "other").exists()
        enforced_records = [json.loads(line) for line in d.audit_lines()][2:]
        assert len(enforced_records) == 2
        assert not any(r.get("shadow") for r in enforced_records)


def test_shadow_mode_in_the_testing_kit(tmp_path: Path) -> None:
    guard = load(ROOT / "policies" / "path_guard.py", prefixes=[str(tmp_path)])
    trial = run_policy(guard, lambda: os.mkdir(tmp_path / "x"), mode="shadow")
    assert trial.errno == 0 and (tmp_path / "x").is_dir()
    assert trial.decided("mkdir", "mkdirat") == ["deny"]
    assert trial.decisions[0].decision.errno == errno.EACCES
