"""What an operator meets writing and running a policy as an agent (issue 16, items 1,
4 and 5): a fallback handler and a policy-declared ``unhandled``; several daemons on one
host; listening before loading, and readiness without systemd."""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from supervisor._start import _serve_socket, prebind
from supervisor.abi import AUDIT_ARCH_X86_64
from supervisor.config import control_socket_for
from supervisor.decide import Chain
from supervisor.errors import PolicyError
from supervisor.policy import Notification, PolicySet, allow, deny, returns
from supervisor.testing import run_policy

from .daemon_harness import CLI, running_daemon
from .runtime import container, make_bundle, unique_id

RUNC_AGENT = Path(__file__).resolve().parent.parent / "examples" / "runc_agent" / "agent.py"

# --------------------------------------------------------------------------- item 1


def _agent() -> PolicySet:
    """The runc test agent's answers that need no emulation: chmod family ENOMEDIUM,
    everything else continues, said by the policy itself."""
    policy = PolicySet("agent", unhandled=allow())

    @policy.on("chmod", "fchmod", "fchmodat")
    def no_chmod(n: Notification) -> object:
        return deny(errno.ENOMEDIUM)

    return policy


def test_declared_unhandled_lets_every_other_notified_call_continue(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.touch()

    def calls() -> tuple[int, bool]:
        os.mkdir(tmp_path / "d")  # notified, no handler: continues
        try:
            os.chmod(target, 0o600)
        except OSError as exc:
            return exc.errno or 0, (tmp_path / "d").is_dir()
        return 0, (tmp_path / "d").is_dir()

    trial = run_policy(_agent(), calls, syscalls=["mkdir", "mkdirat", "chmod", "fchmodat"])
    assert trial.value == (errno.ENOMEDIUM, True)
    assert [(s.syscall, s.kind, s.policy) for s in trial.decisions] == [
        ("mkdir", "allow", "-"), ("chmod", "deny", "agent")]
    assert trial.decisions[0].decision.reason == "unhandled: policy agent's default"


def test_fallback_decides_every_call_without_a_named_handler(tmp_path: Path) -> None:
    seen: list[str] = []
    policy = PolicySet("observer")

    @policy.on("rmdir")
    def keep(n: Notification) -> object:
        return deny(errno.EBUSY)

    @policy.fallback
    def everything_else(n: Notification) -> object:
        seen.append(n.syscall)  # in the parent: the session runs here
        return returns(0) if n.syscall == "getppid" else allow()

    def calls() -> tuple[int, bool, int]:
        os.mkdir(tmp_path / "d")
        try:
            os.rmdir(tmp_path / "d")
        except OSError as exc:
            return os.getppid(), (tmp_path / "d").is_dir(), exc.errno or 0
        return os.getppid(), False, 0

    trial = run_policy(policy, calls, syscalls=["mkdir", "rmdir", "getppid"])
    assert trial.value == (0, True, errno.EBUSY)
    assert trial.decided() == ["allow", "deny", "returns"]
    assert seen == ["mkdir", "getppid"]


def test_a_fallback_never_takes_a_call_from_a_named_handler_later_in_the_chain(
        tmp_path: Path) -> None:
    catch_all = PolicySet("catch_all")

    @catch_all.fallback
    def allow_all(n: Notification) -> object:
        return allow()

    strict = PolicySet("strict")

    @strict.on("mkdir")
    def no_mkdir(n: Notification) -> object:
        return deny(errno.EROFS)

    trial = run_policy([catch_all, strict], lambda: os.mkdir(tmp_path / "d"))
    assert trial.errno == errno.EROFS
    assert [(s.kind, s.policy) for s in trial.decisions] == [("deny", "strict")]


def test_a_fallback_that_returns_none_passes_on_to_unhandled(tmp_path: Path) -> None:
    policy = PolicySet("undecided")

    @policy.fallback
    async def no_opinion(n: Notification) -> object:  # a coroutine fallback works too
        return None

    trial = run_policy(policy, lambda: os.mkdir(tmp_path / "d"), syscalls=["mkdir"])
    assert trial.errno == errno.ENOSYS and trial.decisions[0].policy == "-"


def test_the_fallback_is_folded_into_the_cached_route() -> None:
    policy = PolicySet("p")

    @policy.on("mkdir")
    def named(n: Notification) -> object:
        return None

    @policy.fallback
    def rest(n: Notification) -> object:
        return None

    chain = Chain([("p", policy)])
    nr_mkdir = 83  # x86_64
    name, _arch, links = chain.route(AUDIT_ARCH_X86_64, nr_mkdir)
    assert name == "mkdir" and [link.func for link in links] == [named, rest]
    assert chain.routes[AUDIT_ARCH_X86_64][nr_mkdir] is chain.route(AUDIT_ARCH_X86_64,
                                                                    nr_mkdir)
    assert [link.func for link in chain.links("getppid")] == [rest]


def test_policy_api_refuses_what_cannot_work() -> None:
    with pytest.raises(PolicyError, match="unhandled"):
        PolicySet("p", unhandled="deny:NOSUCH")
    with pytest.raises(PolicyError, match="unhandled"):
        PolicySet("p", unhandled=3)  # type: ignore[arg-type]
    policy = PolicySet("p", unhandled="deny:EACCES")
    assert policy.unhandled == deny(errno.EACCES, reason="configured")

    @policy.fallback
    def first(n: Notification) -> object:
        return None

    with pytest.raises(PolicyError, match="already registered"):
        policy.fallback(first)


AGENT_FILE = """\
import errno

from supervisor.policy import PolicySet, allow, deny

policy = PolicySet("agent", unhandled=allow())


@policy.on("chmod", "fchmod", "fchmodat")
def no_chmod(n):
    return deny(errno.ENOMEDIUM)
"""


def test_serve_policy_honours_the_policys_unhandled(tmp_path: Path) -> None:
    """`serve --socket S --policy FILE`: no TOML file, and the call the agent has no
    handler for continues (it got ENOSYS before)."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT_FILE)
    victim = tmp_path / "victim"
    victim.touch()
    sock = str(tmp_path / "agent.sock")
    with serving(tmp_path, "--socket", sock, "--policy", str(agent)):
        done = run_cli("run", "--socket", sock, "--notify", "mkdir", "--notify", "chmod",
                       "--notify", "fchmodat", "--", "sh", "-c",
                       f"mkdir {tmp_path}/made && chmod 600 {victim}")
    assert (tmp_path / "made").is_dir()
    assert done.returncode == 1 and b"No medium found" in done.stderr


async def test_a_config_that_sets_unhandled_wins_over_the_policys(tmp_path: Path) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT_FILE)
    chain = f'[[policy]]\nname = "agent"\npath = "{agent}"\n'
    for defaults, made in (('[defaults]\npolicies = ["agent"]\n', True),
                           ('[defaults]\npolicies = ["agent"]\nunhandled = "deny:EPERM"\n',
                            False)):
        async with running_daemon(tmp_path, defaults + chain) as d:
            done = await d.run(["--notify", "mkdir", "--", "mkdir", f"{tmp_path}/m"])
        assert (tmp_path / "m").is_dir() is made, defaults
        if made:
            os.rmdir(tmp_path / "m")
        else:
            assert b"Operation not permitted" in done.stderr


# --------------------------------------------------------------------------- item 4


def test_control_socket_derived_from_socket() -> None:
    assert control_socket_for("/run/a/agent.sock") == "/run/a/agent.control.sock"
    assert control_socket_for("/run/a/agent") == "/run/a/agent.control"


def test_two_daemons_given_only_socket_run_side_by_side(tmp_path: Path) -> None:
    """Before: the second one failed on the default metrics port and control socket."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT_FILE)
    first, second = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with serving(tmp_path, "--socket", first, "--policy", str(agent)), \
            serving(tmp_path, "--socket", second, "--policy", str(agent)):
        for notify in (first, second):
            status = run_cli("status", "--json", "--control", control_socket_for(notify))
            assert status.returncode == 0, status.stderr
            assert f'"notify_socket": "{notify}"' in status.stdout.decode()
            assert '"metrics": ""' in status.stdout.decode()
        victim = tmp_path / "v"
        victim.touch()
        done = run_cli("run", "--socket", second, "--notify", "chmod", "--notify",
                       "fchmodat", "--", "chmod", "600", str(victim))
        assert b"No medium found" in done.stderr


def test_a_metrics_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        sock = tmp_path / "n.sock"
        done = run_cli("serve", "--socket", str(sock), "--metrics", f"127.0.0.1:{port}")
    # The daemon's own log lines (the fd budget...) may come first; the error is one
    # line, with no traceback.
    lines = [line for line in done.stderr.decode().splitlines()
             if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", line)]
    assert done.returncode == 1
    assert lines == [f"seccomp-supervisor: [Errno 98] [metrics] listen 127.0.0.1:{port}: "
                     f"Address already in use"]
    assert not sock.exists()  # the socket bound before loading is removed again


def test_a_socket_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    first = str(tmp_path / "a.sock")
    with serving(tmp_path, "--socket", first):
        same_socket = run_cli("serve", "--socket", first, "--control-socket",
                              str(tmp_path / "other.control.sock"))
        same_control = run_cli("serve", "--socket", str(tmp_path / "b.sock"),
                               "--control-socket", control_socket_for(first))
        # The first one serves on, its files untouched.
        assert run_cli("status", "--control", control_socket_for(first)).returncode == 0
        assert os.path.exists(first)
    assert same_socket.returncode == 1
    assert same_socket.stderr.decode().splitlines() == [
        f"seccomp-supervisor: [Errno 98] another process is listening on this socket: "
        f"'{first}'"]
    assert same_control.returncode == 1
    assert same_control.stderr.decode().splitlines() == [
        f"seccomp-supervisor: control socket {control_socket_for(first)}: another process "
        f"is listening on it (give this daemon its own with --control-socket or [listen] "
        f"control_socket)"]
    assert not (tmp_path / "b.sock").exists()


# --------------------------------------------------------------------------- item 5


def test_a_runtime_connecting_while_the_daemon_loads_is_served(tmp_path: Path) -> None:
    """The policy's import blocks on a FIFO: the daemon is still loading. The socket
    already listens (before: no socket until everything was loaded), a runtime's
    handoff waits in the backlog and is served once loading finishes."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    slow = tmp_path / "slow.py"
    slow.write_text(f"open({str(fifo)!r}).read()  # blocks until the test writes\n"
                    + AGENT_FILE)
    sock = str(tmp_path / "slow.sock")
    victim = tmp_path / "v"
    victim.touch()
    ready_r, ready_w = os.pipe()
    daemon = subprocess.Popen([*CLI, "serve", "--socket", sock, "--policy", str(slow),
                               "--ready-fd", str(ready_w)], pass_fds=(ready_w,),
                              stderr=subprocess.PIPE)
    os.close(ready_w)
    try:
        wait_connectable(sock, daemon)
        launcher = subprocess.Popen([*CLI, "run", "--socket", sock, "--notify", "chmod",
                                     "--notify", "fchmodat", "--", "chmod", "600",
                                     str(victim)],
                                    stderr=subprocess.PIPE)
        time.sleep(0.5)  # the launcher's handoff waits in the backlog meanwhile
        assert launcher.poll() is None and not select.select([ready_r], [], [], 0)[0]
        with open(fifo, "w") as go:
            go.write("go")
        _, stderr = launcher.communicate(timeout=30)
        assert launcher.returncode == 1 and b"No medium found" in stderr
        assert os.read(ready_r, 1) == b"\n"
    finally:
        os.close(ready_r)
        stop(daemon)


@pytest.mark.runtime
async def test_runc_started_while_the_agent_loads_is_served(tmp_path: Path) -> None:
    """runc's test helpers start their agent in the background and use it at once: a
    container started while the agent example still loads (its import blocks on a FIFO)
    hands its listener over and is served once loading is done."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    slow = tmp_path / "agent.py"
    slow.write_text(f"open({str(fifo)!r}).read()  # blocks until the test writes\n"
                    + RUNC_AGENT.read_text())
    sock = str(tmp_path / "seccomp-agent.socket")
    daemon = await trio.lowlevel.open_process(
        [*CLI, "serve", "--socket", sock, "--policy", str(slow)], stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(_connectable, sock):
                assert daemon.poll() is None, "the daemon exited"
                await trio.sleep(0.005)
        bundle = make_bundle(
            tmp_path / "bundle",
            ["sh", "-c", "touch /tmp/f; chmod 777 /tmp/f; echo chmod=$?; "
                         "mkdir /tmp/d && echo mkdir=ok"],
            notify=["chmod", "fchmod", "fchmodat", "mkdir", "mkdirat"],
            listener_path=sock, metadata="bar")
        results: list[subprocess.CompletedProcess[bytes]] = []
        async with container("runc", bundle, unique_id("opapi")) as ctr:
            async def run() -> None:
                results.append(await ctr.run(timeout=60))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await trio.sleep(0.5)  # runc has connected and waits: nothing answers yet
                assert not results and daemon.poll() is None
                fifo.write_text("go")
        done = results[0]
        out = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, out
        assert "No medium found" in out and "chmod=1" in out and "mkdir=ok" in out
    finally:
        with trio.CancelScope(shield=True):
            daemon.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await daemon.wait()
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()


def _connectable(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    finally:
        probe.close()


def test_a_config_error_leaves_no_socket_behind(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    done = run_cli("serve", "--socket", str(sock), "--policy", str(tmp_path / "none.py"))
    assert done.returncode == 2 and b"cannot load" in done.stderr
    assert not sock.exists()


def test_pid_file_and_ready_fd(tmp_path: Path) -> None:
    pid_file = tmp_path / "run" / "agent.pid"
    pid_file.parent.mkdir()
    ready_r, ready_w = os.pipe()
    sock = str(tmp_path / "p.sock")
    daemon = subprocess.Popen([*CLI, "serve", "--socket", sock, "--pid-file", str(pid_file),
                               "--ready-fd", str(ready_w)], pass_fds=(ready_w,),
                              stderr=subprocess.PIPE)
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 30)[0], "no readiness within 30 s"
        assert os.read(ready_r, 64) == b"\n"
        assert os.read(ready_r, 64) == b""  # closed after the newline
        assert pid_file.read_text() == f"{daemon.pid}\n"
        assert [p.name for p in pid_file.parent.iterdir()] == ["agent.pid"]  # no temp
        # The ready fd is not inherited by what the daemon runs (it is close-on-exec).
        fds = os.listdir(f"/proc/{daemon.pid}/fd")
        assert all(not os.readlink(f"/proc/{daemon.pid}/fd/{fd}").startswith("pipe:")
                   or fd in ("0", "1", "2") for fd in fds)
    finally:
        os.close(ready_r)
        stop(daemon)
    assert daemon.returncode == 0
    assert not pid_file.exists()


def test_a_stale_pid_file_is_removed_at_start_not_a_live_ones(tmp_path: Path) -> None:
    """A daemon SIGKILLed in a pod leaves its pid file in the emptyDir: the restarted
    container's readiness probe (`cat` of it) must not pass before the new daemon serves.
    A file naming a live process, a FIFO or a symlink is left alone (and not blocked on)."""
    from supervisor.readiness import ReadinessNotifier

    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file = tmp_path / "daemon.pid"
    pid_file.write_text(f"{dead.pid}\n")
    ReadinessNotifier.from_environ({}, pid_file=str(pid_file))
    assert not pid_file.exists()
    pid_file.write_text(f"{os.getpid()}\n")  # alive
    ReadinessNotifier.from_environ({}, pid_file=str(pid_file))
    assert pid_file.read_text() == f"{os.getpid()}\n"
    pid_file.unlink()
    os.mkfifo(pid_file)  # a FIFO with no writer: opening it to read must not block
    ReadinessNotifier.from_environ({}, pid_file=str(pid_file))
    assert pid_file.exists()
    pid_file.unlink()
    other = tmp_path / "other"
    other.write_text(f"{dead.pid}\n")
    pid_file.symlink_to(other)  # not followed
    ReadinessNotifier.from_environ({}, pid_file=str(pid_file))
    assert pid_file.is_symlink() and other.exists()


def test_readiness_options_are_checked_at_start(tmp_path: Path) -> None:
    done = run_cli("serve", "--socket", str(tmp_path / "s.sock"), "--ready-fd", "987")
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "seccomp-supervisor: --ready-fd 987: Bad file descriptor"]
    done = run_cli("serve", "--socket", str(tmp_path / "s.sock"), "--pid-file",
                   str(tmp_path / "nodir" / "x.pid"))
    assert done.returncode == 2 and b"does not exist" in done.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["serve", "--socket", "/r/a.sock"], {}, ("/r/a.sock", 0o600)),
    (["--log-level", "debug", "serve", "--socket=/r/a.sock", "--policy", "p.py"], {},
     ("/r/a.sock", 0o600)),
    (["serve"], {}, ("/run/seccomp-supervisor/notify.sock", 0o600)),
    (["serve", "--socket", "/r/a.sock", "--takeover"], {}, None),
    (["serve", "--sock", "/r/a.sock"], {}, None),  # argparse abbreviation: not guessed
    (["serve", "--socket"], {}, None),
    (["status"], {}, None),
    (["--version"], {}, None),
    (["serve", "--socket", "/r/a.sock"], {"LISTEN_FDS": "1", "LISTEN_PID": "SELF"}, None),
])
def test_what_is_bound_before_loading(args: list[str], env: dict[str, str],
                                      expected: tuple[str, int] | None) -> None:
    env = {k: str(os.getpid()) if v == "SELF" else v for k, v in env.items()}
    assert _serve_socket(args, env) == expected


def test_the_config_names_the_early_socket_and_its_mode(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[listen]\nsocket = "{tmp_path}/c.sock"\nsocket_mode = "0660"\n')
    assert _serve_socket(["serve", "--config", str(config)], {}) == (f"{tmp_path}/c.sock",
                                                                      0o660)
    bound = prebind(["serve", "--config", str(config)], {})
    assert bound is not None
    try:
        assert (os.stat(bound.path).st_mode & 0o7777) == 0o660
    finally:
        bound.discard()
    assert not os.path.exists(bound.path)
    config.write_text("[listen\n")  # unreadable: the daemon reports it, not the scan
    assert _serve_socket(["serve", "--config", str(config)], {}) is None


# --------------------------------------------------------------------------- helpers


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, check=False)


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``serve ARGS`` as a real process, ready (``--ready-fd``) when entered."""
    ready_r, ready_w = os.pipe()
    daemon = subprocess.Popen([*CLI, "serve", *args, "--ready-fd", str(ready_w)],
                              pass_fds=(ready_w,), stderr=subprocess.PIPE)
    os.close(ready_w)
    try:
        ready = select.select([ready_r], [], [], 30)[0] and os.read(ready_r, 1) == b"\n"
        if not ready:
            stop(daemon)
            raise AssertionError(f"the daemon did not get ready: {daemon.stderr.read()!r}"
                                 if daemon.stderr else "the daemon did not get ready")
        yield daemon
    finally:
        os.close(ready_r)
        stop(daemon)


def stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if daemon.stderr:
        daemon.stderr.close()


def wait_connectable(path: str, daemon: subprocess.Popen[bytes],
                     timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            assert daemon.poll() is None, "the daemon exited"
            time.sleep(0.005)
        finally:
            probe.close()
    raise AssertionError(f"{path} did not accept connections within {timeout} s")



@pytest.mark.parametrize("planted", ["fifo", "symlink to /dev/zero"])
def test_removing_the_pid_file_at_exit_neither_blocks_nor_follows_a_planted_file(
        tmp_path: Path, planted: str) -> None:
    """At exit the daemon reads its pid file back to remove it only if it is still
    ours. Whoever may write to its directory can replace it meanwhile: a FIFO with no
    writer (an open to read blocks for ever, and the daemon never exits) or a symlink to
    /dev/zero (a read that never ends, memory without bound). Neither is ours: left."""
    import threading

    from supervisor.readiness import ReadinessNotifier

    pid_file = tmp_path / "daemon.pid"
    notifier = ReadinessNotifier.from_environ({}, pid_file=str(pid_file))
    notifier.ready()
    assert pid_file.read_text() == f"{os.getpid()}\n"
    pid_file.unlink()
    if planted == "fifo":
        os.mkfifo(pid_file)
    else:
        pid_file.symlink_to("/dev/zero")
    worker = threading.Thread(target=notifier.cleanup, daemon=True)
    worker.start()
    worker.join(10)  # generous: catches a hang only
    if worker.is_alive() and planted == "fifo":
        with open(pid_file, "wb"):  # let the blocked open go, or the thread leaks
            pass
    assert not worker.is_alive(), "cleanup() blocked on the planted pid file"
    assert os.path.lexists(pid_file)  # not ours: left alone
