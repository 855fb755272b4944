"""Sessions against the real kernel: forked targets under NOTIFY filters, no mocked ioctls."""

from __future__ import annotations

import errno
import os
import resource
import signal
import tempfile
import threading
import time

import pytest
import trio

from supervisor import abi, bpfprog
from supervisor.bpfprog import ABS, JEQ, JGE, JMP, LD, RET, Insn, K, W
from supervisor.policy import Notification, PolicySet, allow, deny, inject_fd, returns
from supervisor.session import SessionSettings

from .conftest import serve_target

# Both hot loops: the compiled one and the pure-Python reference (conftest.hot_loop).
pytestmark = pytest.mark.usefixtures("hot_loop")


async def test_deny_answers_with_the_errno() -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    def no(n: Notification) -> object:
        return deny(errno.EACCES, reason="test")

    async with serve_target(policy, ["getppid"], "getppid", "3") as served:
        out = await served.target.result()
        await served.done.wait()
    assert out["results"] == [{"rc": -1, "errno": errno.EACCES}] * 3
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="getppid", policy="p", decision="deny") == 3
    assert served.session.notify.closed


async def test_returns_sets_the_return_value() -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    def value(n: Notification) -> object:
        return returns(4242)

    async with serve_target(policy, ["getppid"], "getppid") as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": 4242, "errno": 0}]


async def test_allow_lets_the_kernel_run_the_call(tmp_path: object) -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    def go(n: Notification) -> object:
        return allow()

    async with serve_target(policy, ["getppid"], "getppid") as served:
        out = await served.target.result()
    # The real parent of the target: the helper exec'd into it, so its parent is us.
    assert out["results"] == [{"rc": os.getpid(), "errno": 0}]


async def test_unhandled_gets_the_configured_answer() -> None:
    policy = PolicySet("p")  # handles nothing
    settings = SessionSettings(unhandled=deny(errno.ENOSYS))
    async with serve_target(policy, ["getppid"], "getppid", settings=settings) as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": -1, "errno": errno.ENOSYS}]
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="getppid", policy="-", decision="deny") == 1


async def test_none_passes_to_the_next_policy_in_the_chain() -> None:
    first, second = PolicySet("first"), PolicySet("second")

    @first.on("getppid")
    def pass_on(n: Notification) -> None:
        return None

    @second.on("getppid")
    async def decide(n: Notification) -> object:
        return returns(7)

    async with serve_target([first, second], ["getppid"], "getppid") as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": 7, "errno": 0}]
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="getppid", policy="second", decision="returns") == 1


async def test_chain_goes_on_after_coroutine_handlers_that_waited() -> None:
    """A coroutine handler that suspends is carried on by the poller; the chain then
    continues with the next policy, async or not."""
    first, second, third = PolicySet("first"), PolicySet("second"), PolicySet("third")

    @first.on("getppid")
    async def waits_then_passes(n: Notification) -> None:
        await trio.lowlevel.checkpoint()
        return None

    @second.on("getppid")
    async def passes_at_once(n: Notification) -> None:
        return None

    @third.on("getppid")
    def decides(n: Notification) -> object:
        return returns(11)

    async with serve_target([first, second, third], ["getppid"], "getppid", "3") as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": 11, "errno": 0}] * 3
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="getppid", policy="third", decision="returns") == 3


async def test_coroutine_handlers_mixing_inline_and_waiting_answers_are_counted() -> None:
    """Decisions of coroutine handlers that finish inline and of ones that wait, from two
    policies, each answered and counted as itself (the session reuses Outcomes)."""
    first, second = PolicySet("first"), PolicySet("second")
    seen = []

    @first.on("getppid")
    async def sometimes(n: Notification) -> object:
        seen.append(1)
        if len(seen) % 2:
            await trio.lowlevel.checkpoint()
        if len(seen) % 3 == 0:
            return None  # to the second policy
        return deny(errno.EPERM)

    @second.on("getppid")
    async def otherwise(n: Notification) -> object:
        return returns(7)

    async with serve_target([first, second], ["getppid"], "getppid", "30") as served:
        out = await served.target.result()
    results = out["results"]
    assert isinstance(results, list)
    loop = len(seen) - 30  # python3 itself may call getppid before the target's loop
    expected = [{"rc": 7, "errno": 0} if (loop + i + 1) % 3 == 0
                else {"rc": -1, "errno": errno.EPERM} for i in range(30)]
    assert results == expected
    assert served.metric("seccomp_supervisor_notifications_total", syscall="getppid",
                         policy="second", decision="returns") == len(seen) // 3
    assert served.metric("seccomp_supervisor_notifications_total", syscall="getppid",
                         policy="first", decision="deny") == len(seen) - len(seen) // 3


@pytest.mark.parametrize("waits", [False, True], ids=["inline", "after-waiting"])
async def test_exception_becomes_on_error(waits: bool) -> None:
    """Raised in the handler's inline first step, or after it suspended (carried on by
    the poller)."""
    policy = PolicySet("p")

    @policy.on("getppid")
    async def boom(n: Notification) -> object:
        if waits:
            await trio.lowlevel.checkpoint()
        raise RuntimeError("policy bug")

    settings = SessionSettings(on_error=deny(errno.EPERM))
    async with serve_target(policy, ["getppid"], "getppid", settings=settings) as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": -1, "errno": errno.EPERM}]
    assert served.metric("seccomp_supervisor_handler_errors_total",
                         policy="p", kind="exception") == 1


async def test_bad_return_value_becomes_on_error() -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    def wrong(n: Notification) -> object:
        return "yes"

    async with serve_target(policy, ["getppid"], "getppid") as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": -1, "errno": errno.EPERM}]
    assert served.metric("seccomp_supervisor_handler_errors_total",
                         policy="p", kind="refused") == 1


async def test_deadline_becomes_on_error_in_time() -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    async def slow(n: Notification) -> object:
        await trio.sleep(30)
        return allow()

    settings = SessionSettings(deadline=0.3, on_error=deny(errno.EAGAIN))
    async with serve_target(policy, ["getppid"], "getppid", settings=settings) as served:
        start = trio.current_time()
        out = await served.target.result()
        elapsed = trio.current_time() - start
    assert out["results"] == [{"rc": -1, "errno": errno.EAGAIN}]
    assert elapsed < 5
    assert served.metric("seccomp_supervisor_handler_errors_total",
                         policy="p", kind="deadline") == 1


async def test_hup_ends_the_session_closes_the_fd_and_does_not_spin() -> None:
    policy = PolicySet("p")
    async with serve_target(policy, ["getppid"], "sleep", "0.2") as served:
        fd = served.session.notify.fileno()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        with trio.fail_after(5):
            await served.target.result()
            await served.done.wait()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    assert served.session.notify.closed
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
    else:  # the number was reused by something else: it must not be a listener
        assert os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:seccomp notify"
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    assert cpu < 1.0  # a spinning loop would burn the whole wait


async def test_target_killed_mid_handler_is_routine() -> None:
    policy = PolicySet("p")
    started = trio.Event()

    @policy.on("getppid")
    async def slow(n: Notification) -> object:
        started.set()
        await trio.sleep(1)
        return deny(errno.EPERM)

    settings = SessionSettings(deadline=5)
    async with serve_target(policy, ["getppid"], "getppid", settings=settings) as served:
        await started.wait()
        os.kill(served.target.pid, signal.SIGKILL)
        with trio.fail_after(5):
            await served.done.wait()  # HUP after the kill ends the session
    # The in-flight answer was either cancelled by the session end or hit ENOENT.
    assert served.session.stats.answered == 0
    assert served.session.notify.closed


async def test_restarted_syscall_is_answered_once_under_its_new_id() -> None:
    policy = PolicySet("p")
    seen: list[int] = []
    first_started = trio.Event()

    @policy.on("mkdir")
    async def slow_then_deny(n: Notification) -> object:
        seen.append(n.id)
        if len(seen) == 1:
            first_started.set()
            await trio.sleep(1.0)
            return deny(errno.EROFS)
        return deny(errno.EACCES)

    settings = SessionSettings(deadline=5)
    async with serve_target(policy, ["mkdir"], "restart", "/nonexistent/x", "1.5",
                            settings=settings) as served:
        await first_started.wait()
        os.kill(served.target.pid, signal.SIGUSR1)
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EACCES, "signals": 1}
    assert len(seen) == 2 and seen[1] != seen[0]
    assert served.metric("seccomp_supervisor_notifications_gone_total", stage="send") == 1
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="mkdir", policy="p", decision="deny") == 1


async def test_one_slow_thread_does_not_delay_the_others() -> None:
    policy = PolicySet("p")
    slow_tid: list[int] = []

    @policy.on("getppid")
    async def maybe_slow(n: Notification) -> object:
        if not slow_tid:
            slow_tid.append(n.pid)
        if n.pid == slow_tid[0]:
            await trio.sleep(2)
        return returns(1)

    settings = SessionSettings(deadline=10)
    async with serve_target(policy, ["getppid"], "threads", "8", settings=settings) as served:
        out = await served.target.result()
    results = out["results"]
    assert isinstance(results, list) and len(results) == 8
    assert all(r["rc"] == 1 for r in results)
    slow = [r for r in results if r["tid"] == slow_tid[0]]
    fast = [r for r in results if r["tid"] != slow_tid[0]]
    assert len(slow) == 1 and slow[0]["seconds"] >= 1.9
    assert len(fast) == 7 and max(r["seconds"] for r in fast) < 1.0


async def test_inject_fd_emulates_openat(tmp_path: object) -> None:
    policy = PolicySet("p")
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("emulated content")
        source = f.name

    @policy.on("openat")
    async def emulate(n: Notification) -> object:
        path = await n.read_path(1)
        if path == b"/does/not/exist/emulated":
            return inject_fd(os.open(source, os.O_RDONLY), reason="emulated open")
        return allow(unchecked=True)

    try:
        async with serve_target(policy, ["openat"], "open-read",
                                "/does/not/exist/emulated") as served:
            out = await served.target.result()
    finally:
        os.unlink(source)
    assert out["data"] == "emulated content"
    assert out["cloexec"] is True
    assert isinstance(out["fd"], int) and out["fd"] > 2
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="openat", policy="p", decision="inject_fd") == 1


async def test_inject_fd_survives_a_signal_storm_at_the_supervisor() -> None:
    """ADDFD|SEND counts as the answer before the kernel waits for the target; a signal
    to the supervisor in that wait used to lose the fd, and the target's open() returned
    0 (its stdin) while the session died on EINPROGRESS. Verified on 6.18: without the
    signal mask in NotifyFd.send_fd this loses hundreds of 3,000 opens."""
    policy = PolicySet("p")
    source = os.open("/proc/self/exe", os.O_RDONLY)

    @policy.on("open")
    def emulate(n: Notification) -> object:
        return inject_fd(os.dup(source))

    main_thread = threading.get_ident()
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            signal.pthread_kill(main_thread, signal.SIGUSR1)
            time.sleep(0.0001)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    stormer = threading.Thread(target=storm)
    try:
        async with serve_target(policy, ["open"], "open-raw", "/nonexistent", "3000") as served:
            stormer.start()
            out = await served.target.result()
    finally:
        stop.set()
        if stormer.is_alive():
            stormer.join()
        signal.signal(signal.SIGUSR1, previous)
        os.close(source)
    assert out["bad"] == []
    assert served.metric("seccomp_supervisor_notifications_total", syscall="open",
                         policy="p", decision="inject_fd") == 3000


async def test_alternating_decisions_are_each_counted_as_themselves() -> None:
    """The session reuses its last Outcome and the recorder its last metric children
    while decisions repeat; alternating ones must not be counted under the other."""
    policy = PolicySet("p")
    seen = []

    @policy.on("getppid")
    def alternate(n: Notification) -> object:
        seen.append(1)
        return deny(errno.EPERM) if len(seen) % 3 else returns(7)

    async with serve_target(policy, ["getppid"], "getppid", "30") as served:
        out = await served.target.result()
    results = out["results"]
    assert isinstance(results, list)
    # python3 itself may call getppid before the target's loop: only count the loop.
    loop = len(seen) - 30
    expected = [((loop + i + 1) % 3 != 0) for i in range(30)]
    assert [r["rc"] == -1 and r["errno"] == errno.EPERM for r in results] == expected
    assert [r["rc"] == 7 for r in results] == [not e for e in expected]
    denies = served.metric("seccomp_supervisor_notifications_total", syscall="getppid",
                           policy="p", decision="deny")
    returned = served.metric("seccomp_supervisor_notifications_total", syscall="getppid",
                             policy="p", decision="returns")
    assert (denies, returned) == (sum(1 for i in range(len(seen)) if (i + 1) % 3),
                                  sum(1 for i in range(len(seen)) if (i + 1) % 3 == 0))


async def test_allow_after_memory_read_is_refused_unless_unchecked() -> None:
    policy = PolicySet("p")

    @policy.on("mkdir")
    async def checked_allow(n: Notification) -> object:
        await n.read_path(0)
        return allow()  # refused: the path may change before the kernel reads it again

    async with serve_target(policy, ["mkdir"], "mkdir", "/nonexistent/dir") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EPERM}
    assert served.metric("seccomp_supervisor_handler_errors_total",
                         policy="p", kind="refused") == 1


async def test_unchecked_allow_after_memory_read_continues() -> None:
    policy = PolicySet("p")
    paths: list[str] = []

    @policy.on("mkdir")
    async def unchecked(n: Notification) -> object:
        paths.append(await n.read_path(0))
        return allow(unchecked=True)

    async with serve_target(policy, ["mkdir"], "mkdir", "/nonexistent/dir") as served:
        out = await served.target.result()
    assert paths == [b"/nonexistent/dir"]
    assert out == {"rc": -1, "errno": errno.ENOENT}  # the kernel ran it: no parent dir


async def test_null_pointer_becomes_efault() -> None:
    policy = PolicySet("p")

    @policy.on("mkdir")
    async def reads(n: Notification) -> object:
        await n.read_path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-null") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EFAULT}


async def test_unmapped_pointer_becomes_efault() -> None:
    policy = PolicySet("p")

    @policy.on("mkdir")
    async def reads(n: Notification) -> object:
        await n.read_path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-unmapped") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EFAULT}


async def test_unterminated_path_becomes_enametoolong() -> None:
    policy = PolicySet("p")

    @policy.on("mkdir")
    async def reads(n: Notification) -> object:
        await n.read_path(0)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-long") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.ENAMETOOLONG}


async def test_handler_may_catch_a_memory_error() -> None:
    from supervisor.policy import TargetMemoryError

    policy = PolicySet("p")

    @policy.on("mkdir")
    async def reads(n: Notification) -> object:
        try:
            await n.read_path(0)
        except TargetMemoryError as exc:
            assert exc.errno == errno.EFAULT
            return deny(errno.EINVAL)
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir-null") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EINVAL}


async def test_read_memory_and_still_valid() -> None:
    policy = PolicySet("p")
    seen: list[tuple[str, bool, bytes]] = []

    @policy.on("mkdir")
    async def reads(n: Notification) -> object:
        path = await n.read_path(0)
        raw = await n.read_bytes(n.args[0], 4)
        seen.append((path, n.still_valid(), raw))
        return deny(errno.EACCES)

    async with serve_target(policy, ["mkdir"], "mkdir", "/abc/def") as served:
        out = await served.target.result()
    assert out == {"rc": -1, "errno": errno.EACCES}
    assert seen == [(b"/abc/def", True, b"/abc")]


async def test_max_inflight_bounds_async_tasks() -> None:
    policy = PolicySet("p")
    peak = [0]

    @policy.on("getppid")
    async def slow(n: Notification) -> object:
        await trio.sleep(0.3)
        return returns(5)

    settings = SessionSettings(max_inflight=2, deadline=10)
    async with serve_target(policy, ["getppid"], "threads", "6", settings=settings) as served:
        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], served.session.inflight)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            out = await served.target.result()
            nursery.cancel_scope.cancel()
    assert [r["rc"] for r in out["results"]] == [5] * 6
    assert peak[0] == 2


async def test_shadow_mode_logs_but_continues() -> None:
    policy = PolicySet("p")

    @policy.on("getppid")
    def no(n: Notification) -> object:
        return deny(errno.EPERM)

    async with serve_target(policy, ["getppid"], "getppid",
                            settings=SessionSettings(mode="shadow")) as served:
        out = await served.target.result()
    assert out["results"] == [{"rc": os.getpid(), "errno": 0}]
    assert served.metric("seccomp_supervisor_notifications_total",
                         syscall="getppid", policy="p", decision="deny") == 1


def _notify_numbers_from(first: int) -> bytes:
    """BPF: notify every x86_64 call numbered ``first`` or more, allow the rest."""
    return bpfprog.encode([
        Insn(LD | W | ABS, 0, 0, bpfprog.OFF_ARCH),
        Insn(JMP | JEQ | K, 1, 0, abi.AUDIT_ARCH_X86_64),
        Insn(RET | K, 0, 0, bpfprog.RET_ALLOW),
        Insn(LD | W | ABS, 0, 0, bpfprog.OFF_NR),
        Insn(JMP | JGE | K, 0, 1, first),
        Insn(RET | K, 0, 0, bpfprog.RET_USER_NOTIF),
        Insn(RET | K, 0, 0, bpfprog.RET_ALLOW),
    ])


async def test_numbers_no_kernel_knows_cannot_grow_the_daemon() -> None:
    """A container whose filter notifies arbitrary numbers (crun accepts NOTIFY as the
    default action) may call thousands of them: each is answered, but the route cache
    and the metric labels stay bounded."""
    policy = PolicySet("p")
    count = 3000
    async with serve_target(policy, [], "numbers", "100000", str(count),
                            program=_notify_numbers_from(100000)) as served:
        out = await served.target.result()
        routes = sum(len(by_nr) for by_nr in served.session.chain.routes.values())
    assert out["errnos"] == [errno.ENOSYS]  # the unhandled answer, every time
    assert served.metric("seccomp_supervisor_notifications_total", syscall="unknown",
                         policy="-", decision="deny") == count
    labels = {sample.labels.get("syscall")
              for family in served.registry.collect() for sample in family.samples}
    assert len(labels) < 10, sorted(filter(None, labels))[:20]
    assert routes < 10
