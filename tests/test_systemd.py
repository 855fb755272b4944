"""systemd: sd_notify, socket activation and the unit files.

The daemon runs as a real ``python -m supervisor serve`` process with ``NOTIFY_SOCKET``
pointing at a datagram socket bound here, and (for socket activation) a socket bound here
passed as fd 3 with ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, exactly as systemd
does. The units are checked with ``systemd-analyze verify`` (Debian package ``systemd``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from supervisor import systemd
from supervisor.systemd import ListenFd

from .daemon_harness import CLI, write_config

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
DENY_MKDIR = """
[defaults]
policies = []
unhandled = "deny:EACCES"
"""
# What systemd does between fork and exec for socket activation: the socket at fd 3,
# LISTEN_PID = the pid that will exec the daemon.
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.set_inheritable(3, True)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1',\n"
    "                  LISTEN_FDNAMES=sys.argv[2])\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'supervisor', *sys.argv[3:]])\n"
)


# --------------------------------------------------------------------------- pure parts


def test_notify_address_paths_and_abstract() -> None:
    assert systemd.notify_address(None) is None
    assert systemd.notify_address("") is None
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@abc") == b"\0abc"
    with pytest.raises(ValueError):
        systemd.notify_address("relative/path")


def test_format_message_refuses_newlines_and_bad_keys() -> None:
    assert systemd.format_message({"READY": 1, "STATUS": "ok: 2"}) == b"READY=1\nSTATUS=ok: 2"
    with pytest.raises(ValueError):
        systemd.format_message({"STATUS": "two\nlines"})
    with pytest.raises(ValueError):
        systemd.format_message({"ready": 1})
    with pytest.raises(ValueError):
        systemd.format_message({"": 1})


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    assert systemd.watchdog_interval({}, 10) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 10) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "10"},
                                     10) == 0.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "11"},
                                     10) is None
    for bad in ("0", "-5", "x", ""):
        assert systemd.watchdog_interval({"WATCHDOG_USEC": bad}, 10) is None


def test_listen_fds_only_for_our_pid_with_names() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "notify:ctr-1:"}
    assert systemd.listen_fds(env, 42) == [
        ListenFd(3, "notify"), ListenFd(4, "ctr-1"), ListenFd(5, "unknown")]
    assert systemd.listen_fds(env, 43) == []
    assert systemd.listen_fds({"LISTEN_FDS": "1"}, 42) == []
    assert systemd.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [
        ListenFd(3, "unknown"), ListenFd(4, "unknown")]
    with pytest.raises(ValueError):
        systemd.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2",
                            "LISTEN_FDNAMES": "a"}, 42)
    with pytest.raises(ValueError):
        systemd.listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "two"}, 42)


def test_take_listen_fds_unsets_the_variables() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "",
           "OTHER": "x"}
    assert systemd.take_listen_fds(env) == []
    assert env == {"OTHER": "x"}
    foreign = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.take_listen_fds(foreign) == [] and foreign == {}


def test_pick_listen_fd_by_name_or_the_only_unnamed_socket() -> None:
    stored = [ListenFd(3, "ctr-a"), ListenFd(4, "notify"), ListenFd(5, "ctr-b")]
    assert systemd.pick_listen_fd(stored, "notify") == ListenFd(4, "notify")
    assert systemd.pick_listen_fd([ListenFd(3, "seccomp-supervisor.socket")],
                                  "notify") == ListenFd(3, "seccomp-supervisor.socket")
    assert systemd.pick_listen_fd([ListenFd(3, "unknown"), ListenFd(4, "unknown")],
                                  "notify") is None
    assert systemd.pick_listen_fd([ListenFd(3, "ctr-a")], "notify") is None


def test_fdname_rules() -> None:
    assert systemd.check_fdname("ctr-1.seccomp") == "ctr-1.seccomp"
    for bad in ("", "a:b", "x" * 256, "tab\there", "é"):
        with pytest.raises(ValueError):
            systemd.check_fdname(bad)


# --------------------------------------------------------------------------- Notifier


def _dgram_socket(path: Path | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path) if isinstance(path, Path) else path)
    sock.settimeout(5)
    return sock


def test_notifier_sends_fields_and_stores_fds(tmp_path: Path) -> None:
    with _dgram_socket(tmp_path / "n.sock") as receiver:
        notifier = systemd.Notifier.from_environ(
            {"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "2000000"})
        assert notifier.enabled and notifier.watchdog_interval == 2.0
        assert notifier.ready("serving 0 containers")
        data = receiver.recv(4096).decode().split("\n")
        assert data[:2] == ["READY=1", "STATUS=serving 0 containers"]
        assert data[2] == f"MAINPID={os.getpid()}"
        r, w = os.pipe()
        try:
            assert notifier.store_fds("ctr-1", [r])
            msg, fds, _flags, _addr = socket.recv_fds(receiver, 4096, 4)
            assert msg == b"FDSTORE=1\nFDNAME=ctr-1"
            [copy] = fds
            try:
                # systemd gets a real copy of the pipe: same inode.
                assert os.fstat(copy).st_ino == os.fstat(r).st_ino
            finally:
                os.close(copy)
        finally:
            os.close(r)
            os.close(w)
        assert notifier.remove_fds("ctr-1")
        assert receiver.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=ctr-1"
        with pytest.raises(ValueError):
            notifier.store_fds("bad:name", [0])
        notifier.close()


def test_notifier_abstract_socket_and_no_socket() -> None:
    name = f"seccomp-supervisor-test-{os.getpid()}"
    with _dgram_socket(b"\0" + name.encode()) as receiver:
        notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.stopping("bye")
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()
    quiet = systemd.Notifier.from_environ({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_interval is None
    gone = systemd.Notifier("/nonexistent/notify.sock")
    assert not gone.watchdog() and isinstance(gone.last_error, OSError)
    gone.close()


def test_a_manager_that_does_not_read_cannot_block_the_notifier(tmp_path: Path) -> None:
    """A notify socket whose reader has stopped (its queue full): WATCHDOG and STATUS,
    sent from the event loop every few seconds, are dropped at once, and the messages
    that matter (READY, FDSTORE...) give up after a bounded wait; nothing blocks for
    good. A manager that comes back (a new socket at the same path) is reached again."""
    path = tmp_path / "n.sock"
    with _dgram_socket(path) as stalled:
        notifier = systemd.Notifier(str(path))
        started = time.monotonic()
        sent = [notifier.watchdog() for _ in range(200)]
        assert time.monotonic() - started < 1.0
        assert sent[0] and not sent[-1]  # the queue filled up; the rest were dropped
        started = time.monotonic()
        assert not notifier.ready("serving")
        assert time.monotonic() - started < systemd.SEND_TIMEOUT + 1.0
        assert stalled.recv(4096) == b"WATCHDOG=1"
    path.unlink()
    with _dgram_socket(path) as again:
        assert notifier.status("back")
        assert again.recv(4096) == b"STATUS=back"
    notifier.close()


# --------------------------------------------------------------------------- the daemon


class NotifyReceiver:
    """The test's NOTIFY_SOCKET: collects the daemon's datagrams as they come (see
    :meth:`drain`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []
        self._seen = 0  # messages expect() has looked at
        self._arrived = trio.Event()

    async def __aenter__(self) -> NotifyReceiver:
        await self.sock.bind(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def drain(self) -> None:
        """Read every datagram as it arrives. Like systemd: a receiver that reads only
        while a test waits in expect() lets the queue fill (net.unix.max_dgram_qlen, 10:
        one second of WATCHDOG=1 at WATCHDOG_USEC=200000), and then the daemon's next
        sd_notify blocks -- it hung the test while the daemon had a call to answer."""
        try:
            while True:
                raw = await self.sock.recv(65536)
                self.messages.append(
                    dict(line.split("=", 1) for line in raw.decode().split("\n")))
                self._arrived.set()
        except (trio.ClosedResourceError, OSError):
            return

    async def expect(self, key: str, value: str | None = None, *,
                     timeout: float = 15) -> dict[str, str]:
        """The next message with ``key`` (= ``value``); earlier ones are kept too."""
        with trio.fail_after(timeout):
            while True:
                while self._seen < len(self.messages):
                    fields = self.messages[self._seen]
                    self._seen += 1
                    if key in fields and (value is None or fields[key] == value):
                        return fields
                self._arrived = trio.Event()
                await self._arrived.wait()


@pytest.fixture
async def receiver(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[NotifyReceiver]:
    async with NotifyReceiver(tmp_path / "systemd-notify.sock") as r:
        nursery.start_soon(r.drain)
        yield r


@asynccontextmanager
async def serve_process(tmp_path: Path, argv: Sequence[str], env: Mapping[str, str], *,
                        pass_fds: Sequence[int] = ()) -> AsyncIterator[trio.Process]:
    """A daemon process; killed (if still running) and reaped on exit."""
    log = (tmp_path / "daemon.log").open("wb")
    proc = await trio.lowlevel.open_process(
        list(argv), env={**os.environ, **env}, cwd=ROOT, stdout=log, stderr=log,
        stdin=subprocess.DEVNULL, pass_fds=pass_fds)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
        log.close()


def _log(tmp_path: Path) -> str:
    return (tmp_path / "daemon.log").read_text(errors="replace")


async def test_daemon_speaks_sd_notify(tmp_path: Path, receiver: NotifyReceiver) -> None:
    """READY only once the notify and control sockets listen; STATUS per container;
    WATCHDOG at half of WATCHDOG_USEC; RELOADING/READY on SIGHUP; STOPPING on SIGTERM."""
    config = write_config(tmp_path, DENY_MKDIR)
    notify_sock = tmp_path / "sock" / "notify.sock"
    control_sock = tmp_path / "sock" / "control.sock"
    env = {"NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": "200000"}
    async with serve_process(tmp_path, [*CLI, "serve", "--config", str(config)], env) as proc:
        ready = await receiver.expect("READY", "1")
        # Readiness means: a runtime can connect now.
        for path in (notify_sock, control_sock):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(path))
            probe.close()
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == f"serving 0 containers on {notify_sock}"
        with trio.fail_after(5):
            pings = 0
            start = trio.current_time()
            while pings < 3:
                await receiver.expect("WATCHDOG", "1")
                pings += 1
            # 3 pings at 0.1 s intervals: well under the 0.2 s watchdog each.
            assert trio.current_time() - start < 2
        with trio.fail_after(30):  # a call the daemon never answers fails, not hangs
            result = await trio.run_process(
                [*CLI, "run", "--socket", str(notify_sock), "--notify", "mkdir", "--notify",
                 "mkdirat", "--", "mkdir", str(tmp_path / "nope")],
                capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 1 and b"Permission denied" in result.stderr
        await receiver.expect("STATUS", f"serving 1 container on {notify_sock}")
        await receiver.expect("STATUS", f"serving 0 containers on {notify_sock}")
        proc.send_signal(signal.SIGHUP)
        reloading = await receiver.expect("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        await receiver.expect("READY", "1")
        proc.send_signal(signal.SIGTERM)
        stopping = await receiver.expect("STOPPING", "1")
        assert stopping["STATUS"] == "stopping: 0 containers"
        with trio.fail_after(20):
            assert await proc.wait() == 0, _log(tmp_path)
    assert not (tmp_path / "nope").exists()


def _bound_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


async def test_socket_activation_serves_a_notified_process(tmp_path: Path,
                                                          receiver: NotifyReceiver) -> None:
    """A socket bound here, passed as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=notify): the
    daemon serves on it and not on its configured path, and leaves the file alone."""
    config = write_config(tmp_path, DENY_MKDIR)
    configured = tmp_path / "sock" / "notify.sock"
    activated = tmp_path / "activated.sock"
    listener = _bound_listener(activated)
    argv = [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "notify", "serve",
            "--config", str(config)]
    try:
        async with serve_process(tmp_path, argv, {"NOTIFY_SOCKET": str(receiver.path)},
                                 pass_fds=[listener.fileno()]) as proc:
            listener.close()  # the daemon holds the only copy now, as under systemd
            ready = await receiver.expect("READY", "1")
            assert ready["STATUS"] == f"serving 0 containers on {activated}"
            assert not configured.exists()
            result = await trio.run_process(
                [*CLI, "run", "--socket", str(activated), "--notify", "mkdir", "--notify",
                 "mkdirat", "--id", "activated-1", "--", "mkdir", str(tmp_path / "nope")],
                capture_stdout=True, capture_stderr=True, check=False)
            assert result.returncode == 1, result.stderr
            assert b"Permission denied" in result.stderr
            assert not (tmp_path / "nope").exists()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0, _log(tmp_path)
        assert "socket passed by systemd (fd 3, notify)" in _log(tmp_path)
        # A passed-in socket belongs to the socket unit: the file stays.
        assert activated.exists()
    finally:
        listener.close()


@pytest.mark.runtime
async def test_socket_activation_serves_a_runc_container(tmp_path: Path,
                                                        receiver: NotifyReceiver) -> None:
    from .runtime import container, make_bundle, unique_id

    config = write_config(tmp_path, DENY_MKDIR)
    activated = tmp_path / "activated.sock"
    listener = _bound_listener(activated)
    argv = [sys.executable, "-c", ACTIVATE, str(listener.fileno()),
            "seccomp-supervisor.socket", "serve", "--config", str(config)]
    try:
        async with serve_process(tmp_path, argv, {"NOTIFY_SOCKET": str(receiver.path)},
                                 pass_fds=[listener.fileno()]) as proc:
            listener.close()
            await receiver.expect("READY", "1")
            bundle = make_bundle(tmp_path / "bundle",
                                 ["sh", "-c", "mkdir /tmp/x; echo rc=$?"],
                                 notify=["mkdir", "mkdirat"], listener_path=str(activated))
            async with container("runc", bundle, unique_id("sysd")) as ctr:
                done = await ctr.run()
            assert done.returncode == 0, done.stderr
            assert b"rc=1" in done.stdout
            assert b"Permission denied" in done.stderr
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0, _log(tmp_path)
        # No FileDescriptorName=: systemd names the fd after the socket unit.
        assert "(fd 3, seccomp-supervisor.socket)" in _log(tmp_path)
    finally:
        listener.close()


# --------------------------------------------------------------------------- unit files


def _verify(directory: Path, *units: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the Debian package systemd (dev.sh)"
    return subprocess.run([tool, "verify", "--man=no", *(str(directory / u) for u in units)],
                          capture_output=True, text=True, timeout=60)


def _installed_units(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart pointing at this checkout's installed
    entry point (verify checks that the binary exists and is executable)."""
    entry = Path(sys.executable).parent / "seccomp-supervisor"
    assert os.access(entry, os.X_OK), entry
    out = tmp_path / "units"
    out.mkdir()
    service = (UNITS / "seccomp-supervisor.service").read_text()
    assert "ExecStart=/usr/local/bin/seccomp-supervisor serve" in service
    (out / "seccomp-supervisor.service").write_text(
        service.replace("/usr/local/bin/seccomp-supervisor", str(entry)))
    shutil.copy(UNITS / "seccomp-supervisor.socket", out)
    return out


def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path) -> None:
    units = _installed_units(tmp_path)
    result = _verify(units, "seccomp-supervisor.service", "seccomp-supervisor.socket")
    # verify exits 0 even for unknown keys: any output is a finding.
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout + result.stderr)


def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    units = _installed_units(tmp_path)
    service = units / "seccomp-supervisor.service"
    service.write_text(service.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = _verify(units, "seccomp-supervisor.service", "seccomp-supervisor.socket")
    assert "Unknown key 'WatchdogSecs'" in result.stderr


# `systemd-analyze security` rates the shipped service at most this ("exposure", 0 to 10).
MAX_EXPOSURE = 3.5


def _exposure(unit: Path) -> tuple[float, list[str]]:
    """`systemd-analyze security --offline=yes` of the unit file: the overall exposure
    and the lines of the checks it fails (each with its share of the exposure)."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the Debian package systemd (dev.sh)"
    result = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d)\b",
                      result.stdout)
    assert found, result.stdout + result.stderr
    failed = [line.strip() for line in result.stdout.splitlines()
              if line.lstrip().startswith("\u2717")]  # ✗
    return float(found.group(1)), failed


def test_systemd_analyze_security_rates_the_service_at_most_3_5() -> None:
    exposure, failed = _exposure(UNITS / "seccomp-supervisor.service")
    assert exposure <= MAX_EXPOSURE, "\n".join([f"exposure {exposure}:", *failed])


def test_the_exposure_check_can_fail(tmp_path: Path) -> None:
    """Without the namespace and IP restrictions the unit is rated above the bound."""
    service = (UNITS / "seccomp-supervisor.service").read_text()
    loose = "".join(line for line in service.splitlines(keepends=True)
                    if not line.startswith(("RestrictNamespaces=", "IPAddress")))
    assert loose != service
    (tmp_path / "seccomp-supervisor.service").write_text(loose)
    exposure, failed = _exposure(tmp_path / "seccomp-supervisor.service")
    assert exposure > MAX_EXPOSURE
    assert any(line.startswith("\u2717 RestrictNamespaces=~user") for line in failed), failed


def test_units_say_what_the_daemon_relies_on() -> None:
    service = (UNITS / "seccomp-supervisor.service").read_text()
    sock = (UNITS / "seccomp-supervisor.socket").read_text()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1]
                for line in service.splitlines() if "=" in line and not line.startswith("#")}
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert int(settings["FileDescriptorStoreMax"]) >= 1024
    assert "WatchdogSec" in settings
    caps = set(settings["CapabilityBoundingSet"].split())
    # CAP_SETGID/CAP_SETUID: the mknod helper takes the caller's groups and fsuid/fsgid
    # (tests/test_unit_hardening.py runs the daemon under the unit).
    assert caps == {"CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT",
                    "CAP_SETGID", "CAP_SETUID"}
    # Settings that would break reading target memory, mknod emulation or process_*
    # metrics (the reasons are in the unit).
    for forbidden in ("ProcSubset", "PrivateDevices", "PrivateUsers", "RestrictSUIDSGID"):
        assert forbidden not in settings
    # setns() into the caller's mount namespace (mknod emulation), nothing else.
    assert settings["RestrictNamespaces"] == "mnt"
    # The devices policy's default allowlist is what DevicePolicy=closed allows.
    assert settings["DevicePolicy"] == "closed"
    assert "FileDescriptorName=notify" in sock
    assert "SocketMode=0600" in sock
