"""No call stuck after a crash (issue 17): the in-flight journal and its recovery.

The kernel facts first (a notification whose receiver died can be answered by another
holder of the listener, exactly once), then the journal's own logic, then a real
receiver process SIGKILLed in the middle of a decision and a new session answering
what it left, then the daemon under a real ``systemd --user`` killed with calls in
flight (the chaos soak's short version; ``bench/crash_soak.py`` is the full one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from supervisor import spawn
from supervisor.audit import Recorder
from supervisor.decide import Chain
from supervisor.errors import NotificationGone
from supervisor.journal import (
    HEADER_SIZE,
    RING_SLOTS,
    SLOT_SIZE,
    Journal,
    JournalError,
    create_journal_fd,
    is_journal_fd,
    slots_for,
)
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd
from supervisor.policy import Container, PolicySet, returns
from supervisor.profile import build_program, notify_profile
from supervisor.session import Session, SessionSettings

from .soak import NR_GETPGID, NR_GETSID, expected, one_call_program

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- kernel facts


def _blocked_call(nr: int, arg: int) -> spawn.FilteredChild:
    return spawn.spawn_filtered(one_call_program(nr, arg),
                                build_program(notify_profile(["getpgid", "getsid"])),
                                stdout=subprocess.PIPE)


def _reap(child: spawn.FilteredChild) -> None:
    if child.process.poll() is None:
        child.process.kill()
    child.process.wait()
    if child.process.stdout is not None:
        child.process.stdout.close()
    child.close()


def _receive_and_die(listener: int) -> tuple[int, int]:
    """A forked process RECVs one notification on a copy of ``listener``, reports its
    id and tid, and is SIGKILLed: the crash of a daemon between RECV and SEND."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            notify = NotifyFd(os.dup(listener))
            select.select([listener], [], [])
            raw = notify.recv()
            assert raw is not None
            os.write(w, f"{raw[0]} {raw[1]}\n".encode())
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as pipe:
        notif_id, tid = (int(x) for x in pipe.readline().split())
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return notif_id, tid


def test_a_call_whose_receiver_died_is_answered_by_another_holder_once() -> None:
    """What recovery relies on (issue 17), on this kernel: after its receiver died, the
    call is not delivered again, its id stays valid and another process holding the
    listener answers it; a second answer is refused; once the target is killed the id is
    gone."""
    child = _blocked_call(NR_GETPGID, 7)
    listener = child.take_listener()
    notify = NotifyFd(listener)
    try:
        notif_id, tid = _receive_and_die(listener)
        assert tid == child.pid
        assert notify.id_valid(notif_id)
        assert notify.poll_now() == 0  # not pending again: no second RECV gets it
        notify.send(notif_id, 22, 0, 0)
        assert not notify.id_valid(notif_id)
        with pytest.raises((OSError, NotificationGone)):  # EINPROGRESS or ENOENT
            notify.send(notif_id, 23, 0, 0)
        out = json.loads(child.process.communicate(timeout=10)[0])
        assert (out["rc"], out["errno"]) == (22, 0)
        # The target killed while its receiver is dead: the id is gone, SEND says so.
        other = _blocked_call(NR_GETPGID, 8)
        listener2 = other.take_listener()
        notify2 = NotifyFd(listener2)
        try:
            notif_id, _ = _receive_and_die(listener2)
            other.process.kill()
            deadline = time.monotonic() + 5
            while notify2.id_valid(notif_id) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not notify2.id_valid(notif_id)
            with pytest.raises(NotificationGone):
                notify2.send(notif_id, 1, 0, 0)
        finally:
            os.close(listener2)
            _reap(other)
    finally:
        os.close(listener)
        _reap(child)


# --------------------------------------------------------------------------- the journal


class _Buf:
    """Stands for the RECV buffer: a seccomp_notif with the fields we choose."""

    def __init__(self) -> None:
        self.buf = bytearray(80)

    def fill(self, notif_id: int, pid: int = 5, nr: int = NR_GETPGID,
             arch: int = 0xC000003E, args: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> int:
        from supervisor import abi

        abi.NOTIF_HEAD.pack_into(self.buf, 0, notif_id, pid, nr, arch)
        abi.NOTIF_ARGS.pack_into(self.buf, abi.NOTIF_ARGS_OFFSET, *args)
        return notif_id


@dataclasses.dataclass
class Crashed:
    """A target blocked in one notified call that a crashed daemon received, journaled
    whole and never answered: what the next daemon finds (see :func:`crashed_daemon`)."""

    child: spawn.FilteredChild
    listener: int
    journal_fd: int

    def serve_again(self, chain: Chain, settings: SessionSettings,
                    recorder: Recorder) -> Session:
        """A new session of a copy of the listener, with the journal handed back."""
        notify = NotifyFd(os.dup(self.listener))
        session = Session(notify, Container(id="t"), chain, settings, recorder)
        session.attach_journal(Journal(self.journal_fd, notify.recv_buffer))
        return session

    async def result(self) -> dict[str, int]:
        """What the target's call returned (a hang fails here)."""
        with trio.fail_after(30):
            out = await trio.to_thread.run_sync(
                lambda: self.child.process.communicate(timeout=30)[0])
        result: dict[str, int] = json.loads(out)
        return result


@contextlib.asynccontextmanager
async def crashed_daemon(nr: int, arg: int) -> AsyncIterator[Crashed]:
    """:class:`Crashed` for a call ``nr(arg)``; the target is reaped and the fds closed
    at the end."""
    child = _blocked_call(nr, arg)
    listener = child.take_listener()
    journal_fd = create_journal_fd(16)
    try:
        notif_id, _tid = await trio.to_thread.run_sync(_receive_and_die, listener)
        buf = _Buf()
        writer = Journal(journal_fd, buf.buf)
        writer.record(buf.fill(notif_id, pid=child.pid, nr=nr))
        writer.close()
        yield Crashed(child, listener, journal_fd)
    finally:
        os.close(journal_fd)
        os.close(listener)
        _reap(child)


def _journal(slots: int = 16) -> tuple[int, Journal, _Buf]:
    buf = _Buf()
    fd = create_journal_fd(slots)
    return fd, Journal(fd, buf.buf), buf


def test_journal_reads_back_only_ids_the_kernel_still_holds() -> None:
    """Inline decisions leave their entries in the ring (the kernel knows they were
    answered); a waiting one is pinned. A read-back keeps the ids ID_VALID accepts, once
    each (a pinned entry is in the ring too), and wipes the others."""
    fd, journal, buf = _journal()
    try:
        base = 0xFFFF_FFFF_FFFF_FFF0  # ids are random u64s counting up: wraps, too
        for i in range(5):
            journal.record(buf.fill((base + i) % 2**64, pid=100 + i, args=(i,) * 6))
            if i == 2:
                journal.pin((base + i) % 2**64)  # its coroutine handler suspended
        # A new process maps the same memfd. The kernel holds base+2 (waiting) and
        # base+4 (being decided inline at the crash); base+0's slot was reused by base+4.
        pending = {(base + i) % 2**64 for i in (0, 2, 4)}
        again = Journal(fd, bytearray(80))
        complete, torn = again.take_entries(lambda i: i in pending)
        assert torn == []
        assert sorted((e.id, e.pid, e.args) for e in complete) == sorted(
            ((base + i) % 2**64, 100 + i, (i,) * 6) for i in (2, 4))
        assert all(e.nr == NR_GETPGID and e.arch == 0xC000003E for e in complete)
        assert again.pinned == 2  # their decisions are about to wait
        for e in complete:
            again.unpin(e.id)
        # The ring still has entries (never cleared): ID_VALID is the judge.
        assert again.unanswered(lambda i: False) == 0
        assert again.unanswered(lambda i: i == (base + 4) % 2**64) == 1  # in the ring
        again.close()
    finally:
        journal.close()
        os.close(fd)


def test_a_torn_slot_is_never_decided_from_its_content() -> None:
    """A crash between copying the notification and committing the slot: the id may be
    new, the arguments half written. It is reported torn (answered on_error), and only
    while its id is pending."""
    fd, journal, buf = _journal()
    try:
        journal.record(buf.fill(40))
        journal.record(buf.fill(41, args=(9,) * 6))
        words = memoryview(journal._mm).cast("Q")
        slot41 = (HEADER_SIZE + (41 % RING_SLOTS) * SLOT_SIZE) // 8
        words[slot41 + 10] = 0                  # the commit never happened
        words[slot41 + 4] = 0xDEAD              # and the arguments are half old
        words.release()
        again = Journal(fd, bytearray(80))
        complete, torn = again.take_entries(lambda i: i in (40, 41))
        assert [e.id for e in complete] == [40] and [e.id for e in torn] == [41]
        again.close()
        again2 = Journal(fd, bytearray(80))
        complete, torn = again2.take_entries(lambda i: i == 41)
        assert complete == [] and [e.id for e in torn] == [41]
        again2.close()
    finally:
        journal.close()
        os.close(fd)


def test_a_waiting_decision_survives_its_ring_slot_being_reused() -> None:
    """The ring slot of id X is reused by id X + slots; a decision that waits was pinned
    before that, so its entry is still there; a full pinned area only counts."""
    fd, journal, buf = _journal(16)
    try:
        journal.record(buf.fill(100, args=(7,) * 6))
        journal.pin(100)                       # a coroutine handler suspended
        for i in range(101, 140):              # 39 inline decisions reuse the ring
            journal.record(buf.fill(i))
        again = Journal(fd, bytearray(80))
        complete, _ = again.take_entries(lambda i: i == 100)
        assert [(e.id, e.args) for e in complete] == [(100, (7,) * 6)]
        again.close()
        journal.unpin(100)
        assert journal.pinned == 0
        for i in range(200, 217):
            journal.record(buf.fill(i))
            journal.pin(i)
        assert journal.pinned == 16 and journal.unjournaled == 1
    finally:
        journal.close()
        os.close(fd)


def test_a_journal_moved_to_a_new_memfd_keeps_its_entries_and_writes_there() -> None:
    """A keeper that died took the old memfd with it: the session copies its journal to
    a new one (stored again) and records there from then on, pinned entries included."""
    fd, journal, buf = _journal(16)
    new_fd = -1
    try:
        journal.record(buf.fill(100, args=(7,) * 6))
        journal.pin(100)                       # waits across the move
        journal.record(buf.fill(101, args=(8,) * 6))
        new_fd = journal.move_to_new_memfd()
        journal.record(buf.fill(102, args=(9,) * 6))  # after the move
        moved = Journal(new_fd, bytearray(80))
        complete, torn = moved.take_entries(lambda i: True)
        assert sorted((e.id, e.args) for e in complete) == \
            [(100, (7,) * 6), (101, (8,) * 6), (102, (9,) * 6)] and not torn
        moved.close()
        old = Journal(fd, bytearray(80))       # the old memfd no longer changes
        assert 102 not in {e.id for e in old.entries()}
        old.close()
        journal.unpin(100)
        assert journal.pinned == 0
    finally:
        journal.close()
        os.close(fd)
        if new_fd >= 0:
            os.close(new_fd)


def test_only_a_journal_of_this_layout_is_read_back() -> None:
    assert slots_for(64) == 128 and slots_for(1) == 16 and slots_for(126) == 128
    with pytest.raises(ValueError):
        create_journal_fd(12)
    fd = os.memfd_create("not-a-journal")
    try:
        os.write(fd, b'{"version": 1}' + bytes(200))
        assert not is_journal_fd(fd)
        with pytest.raises(JournalError):
            Journal(fd, bytearray(80))
    finally:
        os.close(fd)
    fd = create_journal_fd(16)
    try:
        assert is_journal_fd(fd)
        os.pwrite(fd, (1 << 40).to_bytes(8, "little"), 32)  # a slot count too large
        with pytest.raises(JournalError):
            Journal(fd, bytearray(80))
        with pytest.raises(OSError):
            os.ftruncate(fd, 10 ** 6)  # sealed: it cannot grow (or shrink) under us
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- a real crash

# The "old daemon": serves the listener (fd argv[1]) with the journal (argv[2]); its
# getpgid handler SIGKILLs its own process in the middle of the decision, after RECV
# and before SEND: the crash issue 17 is about.
CRASHING_RECEIVER = textwrap.dedent("""
    import os, signal, sys, trio
    from prometheus_client import CollectorRegistry
    from supervisor.audit import Recorder
    from supervisor.decide import Chain
    from supervisor.journal import Journal
    from supervisor.metrics import Metrics
    from supervisor.notifyfd import NotifyFd
    from supervisor.policy import Container, PolicySet
    from supervisor.session import Session, SessionSettings

    policy = PolicySet("crash")

    @policy.on("getpgid")
    def die(n):
        os.kill(os.getpid(), signal.SIGKILL)

    @policy.on("getsid")
    async def die_later(n):
        await trio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        notify = NotifyFd(int(sys.argv[1]))
        session = Session(notify, Container(id="t"), Chain([("crash", policy)]),
                          SessionSettings(), Recorder(Metrics(CollectorRegistry()),
                                                      audit="none"))
        session.attach_journal(Journal(int(sys.argv[2]), notify.recv_buffer))
        await session.run()

    trio.run(main)
""")


def _echo_chain() -> Chain:
    policy = PolicySet("echo")

    @policy.on("getpgid")
    def sync_echo(n):  # type: ignore[no-untyped-def]
        return returns(n.args[0] * 3 + 1)

    @policy.on("getsid")
    async def async_echo(n):  # type: ignore[no-untyped-def]
        await trio.lowlevel.checkpoint()
        return returns(n.args[0] * 5 + 2)

    return Chain([("echo", policy)])


def _crash_receiver(listener: int, journal_fd: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_RECEIVER, str(listener),
                             str(journal_fd)], cwd=ROOT, pass_fds=(listener, journal_fd))
    assert proc.wait(30) == -signal.SIGKILL


@pytest.mark.usefixtures("hot_loop")
async def _serve_until_reported(child: spawn.FilteredChild, listener: int, journal_fd: int,
                                chain: Chain) -> tuple[Session, bytes]:
    """Serve (a copy of) ``listener`` with the crashed receiver's journal until ``child``
    printed its result; the session and that output."""
    notify = NotifyFd(os.dup(listener))
    session = Session(notify, Container(id="t"), chain, SessionSettings(),
                      Recorder(Metrics(CollectorRegistry()), audit="none"))
    session.attach_journal(Journal(journal_fd, notify.recv_buffer))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        out = await trio.to_thread.run_sync(
            lambda: child.process.communicate(timeout=20)[0])
        nursery.cancel_scope.cancel()
    return session, out


async def test_a_session_answers_what_a_crashed_process_left_in_its_journal() -> None:
    """A receiver process is SIGKILLed inside two decisions (a sync handler and a
    coroutine one); a new session on the same listener and journal decides both again
    through its chain and answers them, each once, with the policy's answer."""
    children = [_blocked_call(NR_GETPGID, 11), _blocked_call(NR_GETSID, 12)]
    # One filter for both calls would be closer to a container; two targets under one
    # listener each keep the test simple: the receiver serves the first one's fd.
    listeners = [c.take_listener() for c in children]
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry), audit="none")
    try:
        for child, listener in zip(children, listeners, strict=True):
            journal_fd = create_journal_fd(16)
            try:
                _crash_receiver(listener, journal_fd)
                notify = NotifyFd(os.dup(listener))
                session = Session(notify, Container(id="t"), _echo_chain(),
                                  SessionSettings(), recorder)
                session.attach_journal(Journal(journal_fd, notify.recv_buffer))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.run)
                    out = await trio.to_thread.run_sync(
                        lambda c=child: c.process.communicate(timeout=20)[0])
                    nursery.cancel_scope.cancel()
                result = json.loads(out)
                assert session.stats.recovered == 1
                assert session.stats.answered == 1
                nr = NR_GETPGID if child is children[0] else NR_GETSID
                arg = 11 if nr == NR_GETPGID else 12
                assert (result["rc"], result["errno"]) == (expected(nr, arg), 0), result
                # Read back once more: the kernel holds none of its ids any more, so a
                # second recovery answers nothing.
                again = Journal(journal_fd, bytearray(80))
                checker = NotifyFd(os.dup(listener))
                try:
                    assert again.take_entries(checker.id_valid) == ([], [])
                finally:
                    os.close(checker.fileno())
                again.close()
            finally:
                os.close(journal_fd)
        assert registry.get_sample_value("seccomp_supervisor_notifications_recovered_total",
                                         {"entry": "complete"}) == 2
    finally:
        for child, listener in zip(children, listeners, strict=True):
            os.close(listener)
            _reap(child)


@pytest.mark.usefixtures("hot_loop")
async def test_a_torn_entry_of_a_pending_call_gets_on_error() -> None:
    """The crash cut the slot short (no commit): the call is answered on_error (EPERM by
    default), not decided from arguments that may be half written."""
    child = _blocked_call(NR_GETPGID, 13)
    listener = child.take_listener()
    journal_fd = create_journal_fd(16)
    try:
        notif_id, _ = _receive_and_die(listener)
        buf = _Buf()
        writer = Journal(journal_fd, buf.buf)
        writer.record(buf.fill(notif_id, pid=child.pid, args=(13, 0, 0, 0, 0, 0)))
        slot = notif_id & (RING_SLOTS - 1)
        words = memoryview(writer._mm).cast("Q")
        words[(HEADER_SIZE + slot * SLOT_SIZE) // 8 + 10] = 0  # never committed
        words.release()
        writer.close()
        session, out = await _serve_until_reported(child, listener, journal_fd,
                                                   _echo_chain())
        result = json.loads(out)
        assert (result["rc"], result["errno"]) == (-1, 1), result
        assert session.stats.decisions == {"deny": 1}
    finally:
        os.close(journal_fd)
        os.close(listener)
        _reap(child)


# --------------------------------------------------------------------------- chaos soak


@pytest.mark.usefixtures("hot_loop")
def test_chaos_soak_short_no_call_stuck_doubled_or_wrong(tmp_path: Path) -> None:
    """The daemon under a real systemd, SIGKILLed four times with decisions in flight
    (two plain crashes, the process taking over killed before its commit, the old one
    killed during the handover): every call returns with its policy's answer, none is
    answered twice, and every process after a crash serves with the same fd count."""
    from .crash_soak import run_chaos

    report = run_chaos(tmp_path, kills=4, targets=4, seed=17, gap=(0.3, 0.6))
    print("\n" + report.table())
    assert report.stuck == 0 and report.wrong == 0 and report.double == 0, report
    assert report.session_errors == 0
    assert sum(k.in_flight for k in report.kills) > 0, "no kill found a call in flight"
    assert report.flat, report.table()
    assert report.calls > 0


# --------------------------------------------------------------------------- handover


@pytest.mark.usefixtures("hot_loop")
async def test_the_journal_is_empty_when_a_session_is_handed_over(tmp_path: Path) -> None:
    """A takeover hands no journal: it stops reading and waits for every answer first,
    so nothing is left in the journal's memory at that moment (checked in the mapping,
    not in the session's bookkeeping), under load through both handler kinds."""
    from supervisor.config import parse_config
    from supervisor.plugins import load_policies

    from .soak import NOTIFIED, POLICY, SOAK

    (tmp_path / "echo.py").write_text(POLICY)
    config = parse_config({"policy": [{"name": "echo", "path": str(tmp_path / "echo.py")}]},
                          str(tmp_path / "c.toml"))
    chain = Chain(load_policies(config).items())
    recorder = Recorder(Metrics(CollectorRegistry()), audit="none")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    child = await trio.to_thread.run_sync(lambda: spawn.spawn_filtered(
        [sys.executable, SOAK, "target", "3", "0", "--until", str(stop),
         "--ready", str(ready)],
        build_program(notify_profile(list(NOTIFIED))), stdout=subprocess.PIPE))
    notify = NotifyFd(child.take_listener())
    journal_fd = create_journal_fd(slots_for(64))
    try:
        answered = 0
        for _ in range(3):
            session = Session(notify, Container(id="t"), chain, SessionSettings(), recorder)
            session.attach_journal(Journal(journal_fd, notify.recv_buffer))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                with trio.fail_after(20):
                    while not ready.exists():
                        await trio.sleep(0.005)
                await trio.sleep(0.2)
                session.stop_reading(keep_fd=True)
            assert session.journal is not None
            assert session.journal.unanswered(notify.id_valid) == 0
            assert session.journal.pinned == 0
            assert session.stats.answered > 0
            answered += session.stats.answered
            session.journal.close()
        stop.touch()
        last = Session(notify, Container(id="t"), chain, SessionSettings(), recorder)
        last.attach_journal(Journal(journal_fd, notify.recv_buffer))
        await last.run()
        out = await trio.to_thread.run_sync(lambda: child.process.communicate(timeout=60)[0])
    finally:
        os.close(journal_fd)
        notify.close()
        _reap(child)
    result = json.loads(out)
    assert result["ok"] == result["calls"] == answered + last.stats.answered
    assert last.stats.recovered == 0


def test_a_takeover_moves_the_fd_store_entry_to_the_new_name(tmp_path: Path) -> None:
    """Under an fd store (systemd's, or a keeper speaking its protocol), the process
    taking over stores each session under a name of its own, with its own journal, and
    only then removes the old daemon's name: the listener is never in the store twice
    (a second copy would come back after a crash with a stale journal next to it)."""
    import socket
    import threading

    from .soak import config_text, daemon_process, start_target

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    messages: list[dict[str, str]] = []

    def drain() -> None:  # recv(), not recvmsg(): fds passed along are closed
        while True:
            try:
                raw = sock.recv(65536)
            except OSError:
                return
            messages.append(dict(line.split("=", 1) for line in raw.decode().splitlines()
                                 if "=" in line))

    threading.Thread(target=drain, daemon=True).start()
    env = dict(os.environ, NOTIFY_SOCKET=str(path))
    stop = tmp_path / "stop"

    def stored() -> list[str]:
        return [m["FDNAME"] for m in list(messages) if m.get("FDSTORE") == "1"]

    def wait(check: object) -> None:
        deadline = time.monotonic() + 20
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, messages
            time.sleep(0.01)

    try:
        with daemon_process(tmp_path, config_text(tmp_path)) as d:
            d.start(env=env)
            target = start_target(d.socket_path, 0, 0, "--until", str(stop),
                                  "--ready", str(tmp_path / "ready"))
            try:
                wait(lambda: len(stored()) == 1)
                old_name = stored()[0]
                new = d.start("--takeover", env=env)
                assert d.processes[0].wait(20) == 0
                wait(lambda: any(m.get("FDSTOREREMOVE") == "1" for m in list(messages)))
                names = stored()
                assert len(names) == 2 and names[1] != old_name
                order = [(m.get("FDSTORE"), m.get("FDSTOREREMOVE"), m.get("FDNAME"))
                         for m in list(messages) if "FDNAME" in m]
                assert order.index(("1", None, names[1])) < order.index(
                    (None, "1", old_name)), order
                assert (None, "1", names[1]) not in order
                stop.touch()
                result = target.result(30)
                assert result["ok"] == result["calls"] > 0
                assert new.poll() is None
            finally:
                target.kill()
    finally:
        sock.close()


def test_restore_group_hands_back_the_journal_with_its_listener() -> None:
    """The fd store gives the three fds back in any order: the listener, the journal (by
    its magic) and the state are told apart; a journal without a listener is closed."""
    from supervisor.fdstore import (
        StoredGroup,
        encode_state,
        restore_group,
        session_state,
        write_state_memfd,
    )

    child = _blocked_call(NR_GETSID, 1)
    listener = child.take_listener()
    try:
        state = write_state_memfd(encode_state(session_state(Container(id="c1", pid=1))))
        journal_fd = create_journal_fd(16)
        restored = restore_group(StoredGroup("session-abc", [journal_fd, state, listener]))
        assert restored is not None and restored.error == ""
        assert (restored.notify_fd, restored.journal_fd) == (listener, journal_fd)
        assert restored.container.id == "c1"
        with pytest.raises(OSError):
            os.fstat(state)  # read and closed
        os.close(journal_fd)
        lonely = create_journal_fd(16)
        assert restore_group(StoredGroup("session-def", [lonely])) is None
        with pytest.raises(OSError):
            os.fstat(lonely)
    finally:
        os.close(listener)
        _reap(child)


async def test_a_session_stored_without_a_journal_gets_one_added_to_its_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restored from a group an older version stored (notify fd and state only): the
    daemon adds a journal to the same fd-store name, so the next crash is covered."""
    import array
    import socket

    from .daemon_harness import running_daemon
    from .soak import config_text

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("FDSTORE", raising=False)
    child = _blocked_call(NR_GETSID, 4)
    listener = child.take_listener()
    received: list[tuple[dict[str, str], list[int]]] = []
    try:
        async with running_daemon(tmp_path, config_text(tmp_path)) as d:
            session = d.daemon.start_session(NotifyFd(listener), Container(id="old"),
                                             stored_as="session-0123456789ab",
                                             source="from the fd store")
            listener = -1  # the session owns it
            assert session is not None and session.journal is not None
            with trio.fail_after(10):
                while not any(m.get("FDSTORE") == "1" for m, _ in received):
                    await trio.lowlevel.wait_readable(sock)
                    data, anc, _flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
                    fds = [fd for level, kind, payload in anc
                           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                           for fd in array.array("i", payload)]
                    received.append((dict(line.split("=", 1) for line in
                                          data.decode().splitlines() if "=" in line), fds))
            out = await trio.to_thread.run_sync(
                lambda: child.process.communicate(timeout=20)[0])
            assert json.loads(out)["rc"] == expected(NR_GETSID, 4)
        # The daemon closed its socket to our NOTIFY_SOCKET when it stopped.
        assert d.daemon.notifier._sock is None
        stores = [(m, fds) for m, fds in received if m.get("FDSTORE") == "1"]
        assert len(stores) == 1 and stores[0][0]["FDNAME"] == "session-0123456789ab"
        assert len(stores[0][1]) == 1 and is_journal_fd(stores[0][1][0])
    finally:
        for _m, fds in received:
            for fd in fds:
                os.close(fd)
        if listener >= 0:
            os.close(listener)
        sock.close()
        _reap(child)


@pytest.mark.usefixtures("hot_loop")
async def test_an_i386_call_is_recovered_with_its_arguments_decoded_as_the_kernel_does(
        int80_library: Path) -> None:
    """An i386 call (``int $0x80`` from a 64-bit process, garbage in the upper halves of
    its registers) whose receiver crashed: the journal keeps its arch, and the recovered
    decision reads the argument the kernel uses (the low 32 bits), not the register."""
    from supervisor.testing import ARCHITECTURES

    from .test_hostile_abi import i386

    library = int80_library
    program = [sys.executable, "-c", textwrap.dedent(f"""
        import ctypes, json
        f = ctypes.CDLL({str(library)!r}).int80
        f.restype = ctypes.c_long
        f.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if f({i386("getpid")}, 0, 0, 0) <= 0:
            print(json.dumps({{"skip": True}}))
        else:
            print(json.dumps({{"rc": f({i386("getpgid")}, 0xdeadbeef0000000b, 0, 0)}}))
    """)]
    profile = dataclasses.replace(notify_profile(["getpgid"]), architectures=ARCHITECTURES)
    child = spawn.spawn_filtered(program, build_program(profile), stdout=subprocess.PIPE)
    listener = child.take_listener()
    policy = PolicySet("decoded")

    @policy.on("getpgid")
    def decoded(n):  # type: ignore[no-untyped-def]
        return returns(n.int32(0) * 3 + 1)

    journal_fd = create_journal_fd(16)
    try:
        # Readable: the call is pending, or the child exited (POLLHUP) without making it.
        assert select.select([listener], [], [], 20)[0], "no notification within 20 s"
        if child.process.poll() is not None:
            out = child.process.communicate()[0]
            if json.loads(out).get("skip"):
                pytest.skip("this kernel runs no i386 code (CONFIG_IA32_EMULATION off)")
            raise AssertionError(f"the child exited without its call: {out!r}")
        _crash_receiver(listener, journal_fd)  # its getpgid handler SIGKILLs it
        session, out = await _serve_until_reported(child, listener, journal_fd,
                                                   Chain([("decoded", policy)]))
        assert session.stats.recovered == 1
        assert json.loads(out) == {"rc": 11 * 3 + 1}, out
    finally:
        os.close(journal_fd)
        os.close(listener)
        _reap(child)
