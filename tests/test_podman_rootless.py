"""Rootless podman against the root daemon: a non-root user (``seccomp-rootless``, uid
2950, created by ``./dev.sh`` setup) runs ``podman run --security-opt seccomp=...`` with
runc and crun. The handoff comes from that user's uid (``SO_PEERCRED`` sees through the
user namespace): ``allowed_uids`` admits it, ``peer_uid`` routes give it its own chain,
and nothing it hands over reaches another user's chain, learned profiles or audit lines.

The notify socket is reached the way docs/runtimes.md tells operators: a setgid
directory (mode 2750) of the group ``seccomp-handoff``, which the socket inherits, and
``socket_mode = "0660"``.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisor.router import CONTAINER_NAME_ANNOTATIONS, TRACE_ANNOTATION

from .daemon_harness import CLI, running_daemon
from .podman import HANDOFF_GROUP, ROOTLESS_USER, PodmanSession, podman_session
from .test_podman import MESSAGES, RUNTIMES, mkdir_line, profile, write_policies

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


@pytest.fixture(scope="module")
def rootless() -> Iterator[PodmanSession]:
    with podman_session(ROOTLESS_USER) as session:
        yield session


@pytest.fixture(scope="module")
def rootful() -> Iterator[PodmanSession]:
    with podman_session("root") as session:
        yield session


@pytest.fixture
def public() -> Iterator[Path]:
    """A 0755 directory under /tmp for the socket and the profiles (pytest's are 0700),
    with ``sock/``: root:seccomp-handoff, mode 2750 (setgid: the socket gets the group)."""
    base = Path(tempfile.mkdtemp(prefix="sup-rootless-", dir="/tmp"))
    try:
        base.chmod(0o755)
        sock = base / "sock"
        sock.mkdir()
        os.chown(sock, 0, grp.getgrnam(HANDOFF_GROUP).gr_gid)
        sock.chmod(0o2750)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def config(public: Path, tmp: Path, body: str, uids: str = "[0, UID]") -> str:
    uid = ROOTLESS_UID()
    return (f'[listen]\nsocket = "{public}/sock/notify.sock"\nsocket_mode = "0660"\n'
            f'allowed_uids = {uids.replace("UID", str(uid))}\n'
            f'control_socket = "{tmp}/ctl/control.sock"\n' + body.replace("UID", str(uid)))


def ROOTLESS_UID() -> int:
    import pwd

    return pwd.getpwnam(ROOTLESS_USER).pw_uid


def public_profile(public: Path, name: str, socket: str, **kw: object) -> Path:
    path = profile(public / name, socket, **kw)  # type: ignore[arg-type]
    path.chmod(0o644)
    return path


ROUTES = """
[defaults]
policies = ["eperm"]
{policies}
[[route]]                      # root's route: a label alone must not open it to others
match = {{ peer_uid = [0], labels = {{ team = "blue" }} }}
policies = ["by_name"]
[[route]]                      # the rootless user's containers get the user's chain
match = {{ peer_uid = [UID] }}
policies = ["erofs"]
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_rootless_podman_hands_over_as_its_user(
        tmp_path: Path, public: Path, rootless: PodmanSession, rootful: PodmanSession,
        runtime: str) -> None:
    body = ROUTES.format(policies=write_policies(tmp_path))
    async with running_daemon(tmp_path, config(public, tmp_path, body)) as d:
        st = os.stat(d.socket_path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam(HANDOFF_GROUP).gr_gid
        blue = public_profile(public, "blue.json", d.socket_path, metadata="team=blue")
        name = rootless.name("web")
        async with rootless.container(name):
            # team=blue and a web-* name: root's route would answer EACCES; the user's
            # own route answers EROFS.
            done = await rootless.run(runtime, name, ["sleep", "120"], profile=blue,
                                      detach=True,
                                      annotations={CONTAINER_NAME_ANNOTATIONS[0]: name})
            assert done.returncode == 0, done.stderr
            out = await rootless.exec(name, mkdir_line("/tmp/a"))  # a second handoff
            assert MESSAGES[errno.EROFS] in out.stderr, out
            [session] = d.daemon.sessions
            assert session.container.peer_uid == ROOTLESS_UID()
            assert session.chain.names == ("erofs",)
        # The same profile from root's podman gets root's route.
        name = rootful.name("web")
        async with rootful.container(name):
            out = await rootful.run(runtime, name, mkdir_line("/tmp/b"), profile=blue,
                                    annotations={CONTAINER_NAME_ANNOTATIONS[0]: name})
            assert MESSAGES[errno.EACCES] in out.stderr, out
        assert d.metric("seccomp_supervisor_handoffs_total", result="accepted") == 3
        lines = [json.loads(line) for line in d.audit_lines()]
        assert {(line["peer_uid"], line["errno"]) for line in lines} == {
            (ROOTLESS_UID(), errno.EROFS), (0, errno.EACCES)}


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_uid_not_in_allowed_uids_starts_no_container(
        tmp_path: Path, public: Path, rootless: PodmanSession, runtime: str) -> None:
    body = '[defaults]\npolicies = []\n'
    async with running_daemon(tmp_path, config(public, tmp_path, body, uids="[0]")) as d:
        prof = public_profile(public, "p.json", d.socket_path)
        name = rootless.name("refused")
        async with rootless.container(name):
            out = await rootless.run(runtime, name, mkdir_line("/tmp/x"), profile=prof)
        # The daemon hangs up without reading: the runtime fails (broken pipe), or its
        # message was already sent, the container starts and its notified calls get
        # ENOSYS. Either way mkdir never ran unchecked.
        assert out.returncode != 0 or (
            "Function not implemented" in out.stderr and "rc=1" in out.stdout), out
        assert d.metric("seccomp_supervisor_handoffs_total", result="forbidden") == 1
        assert not d.daemon.sessions


def _connect_as(uid: int, gid: int, path: str) -> int:
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(2)\n")
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "/usr/bin/python3", "-c", code, path], timeout=30).returncode


async def test_only_the_group_reaches_the_socket(tmp_path: Path, public: Path) -> None:
    body = '[defaults]\npolicies = []\n'
    async with running_daemon(tmp_path, config(public, tmp_path, body)) as d:
        # nobody, not in seccomp-handoff: the 2750 directory stops it at connect.
        assert await trio.to_thread.run_sync(_connect_as, NOBODY, NOBODY,
                                             d.socket_path) == 2
        assert d.metric("seccomp_supervisor_handoffs_total", result="forbidden") == 0


# --------------------------------------------------------------------------- other users


def _run_as(uid: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                  "--init-groups"]
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, timeout=60, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


LEARN = """
[trace_annotation]
enabled = true
peer_uid = [0, UID]

[defaults]
policies = ["learn"]

[[policy]]
name = "learn"
path = "ROOT/policies/learn.py"
options = { directory = "TMP/learned" }
""".replace("ROOT", str(ROOT))


async def test_a_user_cannot_reach_another_users_learned_profile(
        tmp_path: Path, public: Path) -> None:
    """Container ids are whatever the runtime's user sends: root's container `shared` and
    the rootless user's `shared` get distinct profiles, and the user's calls never merge
    into root's."""
    body = LEARN.replace("TMP", str(tmp_path))
    async with running_daemon(tmp_path, config(public, tmp_path, body)) as d:
        sock = d.socket_path

        def run(uid: int, syscall: str, cmd: list[str]) -> None:
            done = _run_as(uid, ["run", "--socket", sock, "--id", "shared", "--notify",
                                 syscall, "--", *cmd], public)
            assert done.returncode == 0, done.stderr

        learned = tmp_path / "learned"
        await trio.to_thread.run_sync(run, 0, "uname", ["uname"])
        with trio.fail_after(10):
            while not (learned / "shared.json").exists():
                await trio.sleep(0.02)
        roots = (learned / "shared.json").read_bytes()
        await trio.to_thread.run_sync(run, ROOTLESS_UID(), "getcwd", ["pwd"])
        mine = learned / f"uid-{ROOTLESS_UID()}" / "shared.json"
        with trio.fail_after(10):
            while not mine.exists():
                await trio.sleep(0.02)
        assert (learned / "shared.json").read_bytes() == roots
        assert "getcwd" in mine.read_text() and "getcwd" not in roots.decode()


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_users_trace_annotation_stays_in_its_directory(
        tmp_path: Path, public: Path, rootless: PodmanSession, runtime: str) -> None:
    body = LEARN.replace("TMP", str(tmp_path)).replace('policies = ["learn"]',
                                                        'policies = ["eperm"]')
    body += write_policies(tmp_path)
    learned = tmp_path / "learned"
    learned.mkdir()
    victim = learned / "victim.json"
    victim.write_text('{"defaultAction": "SCMP_ACT_ERRNO"}')
    own = learned / "traced" / f"uid-{ROOTLESS_UID()}" / "mine.json"  # trace_directory
    async with running_daemon(tmp_path, config(public, tmp_path, body)) as d:
        prof = public_profile(public, "p.json", d.socket_path,
                              names=["mkdir", "mkdirat"])
        # Outside the user's directory (root's file; a base it could not read itself):
        # ignored, routed as usual (eperm). Inside: learn mode, mkdir runs.
        for annotation, learning in ((f"of:{victim}", False),
                                     (f"of:{own};if:/etc/passwd", False),
                                     (f"of:{own}", True)):
            name = rootless.name("traced")
            async with rootless.container(name):
                out = await rootless.run(runtime, name, mkdir_line("/tmp/x"), profile=prof,
                                         annotations={TRACE_ANNOTATION: annotation})
            if learning:
                assert "rc=0" in out.stdout, out
            else:
                assert MESSAGES[errno.EPERM] in out.stderr, (annotation, out)
        with trio.fail_after(10):
            while not own.exists():
                await trio.sleep(0.02)
    assert victim.read_text() == '{"defaultAction": "SCMP_ACT_ERRNO"}'
    assert json.loads(own.read_text())["defaultAction"] == "SCMP_ACT_ERRNO"

