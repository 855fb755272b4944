"""podman as root, end to end: ``podman run --security-opt seccomp=PROFILE.json`` hands
the listener over through runc and crun; the daemon routes on ``listenerMetadata`` and
on the name the user gave the container, ``podman exec`` makes a second handoff, the
trace-syscall annotation writes a profile, and a daemon restart (``serve --takeover``)
under a running podman container loses no call.

One podman storage and one imported busybox image per module (``tests/podman.py``);
every container is removed by the test that made it, also when it fails.
"""

from __future__ import annotations

import errno
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.learn import known_syscalls
from supervisor.profile import Action, load_profile
from supervisor.router import CONTAINER_NAME_ANNOTATIONS, TRACE_ANNOTATION

from .daemon_harness import running_daemon
from .podman import PodmanSession, podman_session

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parent.parent
NAME_KEY = CONTAINER_NAME_ANNOTATIONS[0]
RUNTIMES = ["runc", "crun"]

# Three policies, each answering mkdir with its own errno, so a container's output says
# which chain served it; "by_name" also reads the container's name.
POLICIES = {
    "eperm": "deny(errno.EPERM)",
    "erofs": "deny(errno.EROFS)",
    "by_name": "deny(errno.EACCES) if n.container.name.startswith('web-') "
               "else deny(errno.EEXIST)",
}
MESSAGES = {errno.EPERM: "Operation not permitted", errno.EROFS: "Read-only file system",
            errno.EACCES: "Permission denied"}


def write_policies(directory: Path) -> str:
    text = ""
    for name, answer in POLICIES.items():
        (directory / f"{name}.py").write_text(
            "import errno\nfrom supervisor.policy import PolicySet, deny\n"
            f"policy = PolicySet({name!r})\n\n"
            f"@policy.on('mkdir', 'mkdirat')\ndef answer(n):\n    return {answer}\n")
        text += f'[[policy]]\nname = "{name}"\npath = "{directory}/{name}.py"\n'
    return text


def routing_config(directory: Path) -> str:
    return (f'[defaults]\npolicies = ["eperm"]\n{write_policies(directory)}'
            '[[route]]\nmatch = { container_name = "web-*" }\npolicies = ["by_name"]\n'
            '[[route]]\nmatch = { labels = { team = "blue" } }\npolicies = ["erofs"]\n')


def profile(path: Path, listener: str, metadata: str | None = None,
            names: list[str] | None = None) -> Path:
    data: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ALLOW", "listenerPath": listener,
        "syscalls": [{"names": names or ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}
    if metadata is not None:
        data["listenerMetadata"] = metadata
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def pm() -> Iterator[PodmanSession]:
    with podman_session("root") as session:
        yield session


def mkdir_line(path: str) -> list[str]:
    return ["sh", "-c", f"mkdir {path}; echo rc=$?"]


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_run_exec_and_routing(tmp_path: Path, pm: PodmanSession, runtime: str) -> None:
    """A named container (detached, then two `podman exec`) goes to the container_name
    route; an unnamed one whose profile says team=blue to the label route; one with
    neither to [defaults]. Every handoff is podman's own (uid 0, podman's 64-hex id)."""
    async with running_daemon(tmp_path, routing_config(tmp_path)) as d:
        web = pm.name("web")
        async with pm.container(web):
            done = await pm.run(runtime, web, ["sleep", "120"], detach=True,
                                profile=profile(tmp_path / "red.json", d.socket_path,
                                                "team=red"),
                                annotations={NAME_KEY: web})
            assert done.returncode == 0, done.stderr
            used = await pm.podman("inspect", "-f", "{{.OCIRuntime}}", web)
            assert used.stdout.strip() == pm.runtime_path(runtime)
            for attempt in ("/tmp/a", "/tmp/b"):
                out = await pm.exec(web, mkdir_line(attempt))
                assert MESSAGES[errno.EACCES] in out.stderr, out
                assert "rc=1" in out.stdout
            sessions = {s.container.id: s for s in d.daemon.sessions}
            [served] = [s.container for s in sessions.values()]
            assert served.name == web and served.peer_uid == 0
            assert len(served.id) == 64 and served.id != web
            assert served.labels == {"team": "red"}
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == 3

        blue = pm.name("blue")
        async with pm.container(blue):
            out = await pm.run(runtime, blue, mkdir_line("/tmp/c"),
                               profile=profile(tmp_path / "blue.json", d.socket_path,
                                               "team=blue"))
            assert MESSAGES[errno.EROFS] in out.stderr, out
        other = pm.name("db")
        async with pm.container(other):
            # A name that is not web-*, and no label route: the defaults.
            out = await pm.run(runtime, other, mkdir_line("/tmp/d"),
                               profile=profile(tmp_path / "none.json", d.socket_path),
                               annotations={NAME_KEY: other})
            assert MESSAGES[errno.EPERM] in out.stderr, out
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == 5
        decisions = [json.loads(line) for line in d.audit_lines()]
        assert decisions and all(rec.get("decision", "deny") == "deny" for rec in decisions)


TRACE_CONFIG = f"""
[trace_annotation]
enabled = true

[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{{tmp}}/learned" }}
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_trace_annotation_writes_a_profile_podman_then_enforces(
        tmp_path: Path, pm: PodmanSession, runtime: str) -> None:
    out = tmp_path / "learned" / "traced" / "web.json"  # the learn policy's trace_directory
    names = sorted(known_syscalls() - {"write"})
    script = "ls -l / >/dev/null && echo listed"
    async with running_daemon(tmp_path, TRACE_CONFIG) as d:
        learning = profile(tmp_path / "learning.json", d.socket_path, names=names)
        name = pm.name("traced")
        async with pm.container(name):
            done = await pm.run(runtime, name, ["sh", "-c", script], profile=learning,
                                annotations={TRACE_ANNOTATION: f"of:{out}"})
        assert done.returncode == 0, done.stderr
        assert done.stdout == "listed\n"
        with trio.fail_after(20):
            while not await trio.Path(out).exists():
                await trio.sleep(0.05)
    learned = load_profile(out)
    assert learned.default_action == Action.ERRNO
    # podman runs the same command under the learned profile; mkdir was never seen.
    for cmd, ok in ((["sh", "-c", script], True), (["mkdir", "/tmp/x"], False)):
        name = pm.name("enforced")
        async with pm.container(name):
            done = await pm.run(runtime, name, cmd, profile=out)
        if ok:
            assert (done.returncode, done.stdout) == (0, "listed\n"), done.stderr
        else:
            assert done.returncode != 0 and "Operation not permitted" in done.stderr, done


PROBE = """
import errno
from supervisor.policy import PolicySet, deny, returns

policy = PolicySet("probe")


@policy.on("kill")
def probe(n):
    if n.args[1] != 0:
        return None
    return returns(0) if n.args[0] % 2 == 0 else deny(errno.ESRCH)
"""

LOOP = """
i=0
while [ $i -lt {n} ]; do
  p=$((100000 + i))
  if kill -0 $p 2>/dev/null; then echo "ok $p"; else echo "no $p"; fi
  i=$((i + 1))
  usleep 2000
done
echo done
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_restarts_under_a_running_podman_container(tmp_path: Path, pm: PodmanSession,
                                                           runtime: str) -> None:
    """`serve --takeover` while a podman container calls in a loop: every call answered
    by the policy (even pids exist, odd ones do not), none lost, none answered twice."""
    from .test_restart import daemon_process, takeover

    n = 400
    (tmp_path / "probe.py").write_text(PROBE)
    text = (f'[defaults]\npolicies = ["probe"]\n[[policy]]\nname = "probe"\n'
            f'path = "{tmp_path}/probe.py"\n')
    with daemon_process(tmp_path, text) as d:
        d.start()
        name = pm.name("restart")
        with pm.sync_container(name):
            prof = profile(tmp_path / "kill.json", d.socket_path, names=["kill"])
            pm.sync(*pm.run_args(runtime, name, profile=prof, detach=True),
                    "localhost/seccomp-supervisor-busybox:test", "sh", "-c",
                    LOOP.format(n=n))
            deadline = time.monotonic() + 60

            def logs() -> str:
                return pm.sync("logs", name).stdout

            while logs().count("\n") < 50:
                assert time.monotonic() < deadline, logs()[-2000:]
                time.sleep(0.05)
            before = logs().count("\n")
            _took, new = takeover(d)
            while "done" not in logs():
                assert time.monotonic() < deadline + 60, logs()[-2000:]
                time.sleep(0.1)
            lines = logs().split("\n")
        seen: dict[int, str] = {}
        for line in lines:
            word, _, pid = line.partition(" ")
            if word in ("ok", "no"):
                assert int(pid) not in seen, f"{pid} twice"
                seen[int(pid)] = word
                assert word == ("ok" if int(pid) % 2 == 0 else "no"), line
        assert len(seen) == n
        assert before < n  # the loop ran across the restart
        new.send_signal(signal.SIGTERM)
        assert new.wait(20) == 0

