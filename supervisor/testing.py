"""Test a policy against real system calls, without a daemon.

:func:`run_policy` forks a child, installs a filter in it that notifies the calls the
policy handles, runs your function there, and serves the child's notifications with the
same session code the daemon uses::

    import errno, os
    from supervisor.testing import load, run_policy

    def test_setuid_chmod_is_refused(tmp_path):
        policy = load("policies/hardening.py")          # fresh copy, options validated
        victim = tmp_path / "f"
        victim.touch()
        trial = run_policy(policy, lambda: os.chmod(victim, 0o4755))
        assert trial.errno == errno.EPERM
        assert trial.decided("chmod", "fchmodat") == ["deny"]

The function runs in the forked child: what it returns (if it pickles) is
:attr:`Trial.value`, the errno of an OSError it raises is :attr:`Trial.errno`. Needs
root or ``no_new_privs`` (set in the child) and a kernel with seccomp user notification.
The child is killed if it outlives ``timeout``.

``write`` is never notified (the child writes its listener's number to the parent right
after installing the filter); every other call the policy handles is, in each of the
three x86 ABIs (:data:`ARCHITECTURES`: x86_64, i386 through ``int $0x80``, x32), as
container profiles list them: a policy must be right for a call made in any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import select
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import trio

from . import abi, bpf
from .audit import Recorder
from .config import PolicyConfig
from .decide import Chain, Mode, Outcome
from .notifyfd import NotifyFd
from .policy import Container, Decision, PolicySet, deny
from .profile import build_program, notify_profile
from .session import Session, SessionSettings

__all__ = ["ARCHITECTURES", "Seen", "Trial", "arun_policy", "load", "run_policy"]

# The ABIs whose calls the child's filter notifies. Docker's and Podman's default
# profiles list these three, so a container can make its calls in any of them; a
# filter listing only x86_64 would kill the child at its first i386 call instead.
ARCHITECTURES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


@dataclass(frozen=True, slots=True)
class Seen:
    """One answered notification: the call, the decision the policy chain made (in
    shadow mode: would have made), the deciding policy (``-`` for the ``unhandled``
    answer) and the error kind when the answer is ``on_error``."""

    syscall: str
    decision: Decision
    policy: str
    error: str | None = None

    @property
    def kind(self) -> str:
        return self.decision.kind


@dataclass
class Trial:
    """What happened in the child."""

    value: Any = None
    errno: int = 0
    exception: str = ""
    decisions: list[Seen] = field(default_factory=list)
    exit_status: int = 0

    def decided(self, *syscalls: str) -> list[str]:
        """Decision kinds (``deny``, ``allow``, ``returns``, ``inject_fd``) for
        ``syscalls`` (all calls when none given), in order."""
        return [s.kind for s in self.decisions if not syscalls or s.syscall in syscalls]


class _Capture(Recorder):
    def __init__(self) -> None:
        super().__init__(None, audit="none")
        self.seen: list[Seen] = []

    def decided(self, container: Container, notif_id: int, tid: int, syscall: str,
                args: Sequence[int], outcome: Outcome, latency: float, *,
                shadow: bool = False) -> int:
        self.seen.append(Seen(syscall, outcome.decision, outcome.policy, outcome.error))
        return super().decided(container, notif_id, tid, syscall, args, outcome, latency,
                               shadow=shadow)


def load(path: str | os.PathLike[str], *, name: str | None = None,
         **options: Any) -> PolicySet:
    """A fresh copy of the policy file at ``path`` (as the daemon loads it), named
    ``name`` (default: the file's stem), with ``options`` validated and applied.

    Raises ConfigError (key ``policy[0].options.<key>`` for a refused option)."""
    from .plugins import load_policy

    resolved = Path(path).resolve()
    pc = PolicyConfig(name=name or resolved.stem, path=resolved, entry_point=None,
                      options=MappingProxyType(dict(options)), index=0)
    return load_policy(pc, "<supervisor.testing>")


def run_policy(policy: PolicySet | Sequence[PolicySet], func: Callable[[], Any], *,
               syscalls: Iterable[str] | None = None, timeout: float = 30.0,
               **settings: Any) -> Trial:
    """Run ``func()`` in a forked child whose ``syscalls`` (default: every call the
    policies handle) are notified and answered by ``policy`` (or a chain of them, asked
    in order). Other keyword arguments as :func:`arun_policy`. Starts its own trio loop:
    from async code, await :func:`arun_policy` instead.

    Raises TimeoutError if the child (or a process it started) still runs after
    ``timeout`` seconds; it is killed.
    """
    async def bounded() -> Trial:
        with trio.fail_after(timeout):
            return await arun_policy(policy, func, syscalls=syscalls, **settings)

    try:
        return trio.run(bounded)
    except trio.TooSlowError:
        raise TimeoutError(f"the child was still running after {timeout}s (killed)") from None


async def arun_policy(
    policy: PolicySet | Sequence[PolicySet],
    func: Callable[[], Any],
    *,
    syscalls: Iterable[str] | None = None,
    unhandled: Decision | None = None,
    on_error: Decision | None = None,
    deadline: float = 2.0,
    mode: Mode = "enforce",
    container: Container | None = None,
) -> Trial:
    """:func:`run_policy` inside a running trio loop.

    ``unhandled`` (default: the one the first policy declaring one declares, else
    ``deny(ENOSYS)``), ``on_error`` (default ``deny(EPERM)``),
    ``deadline`` and ``mode`` are the session settings the daemon takes from
    ``[defaults]`` and the route; ``container`` is what handlers see as
    ``n.container`` (default id ``"test"``).

    A :meth:`~supervisor.policy.PolicySet.fallback` handles whatever is notified and
    has no named handler: name those calls in ``syscalls``.

    Raises ValueError if there is nothing to notify or ``write`` is asked for. Bound it
    with ``trio.fail_after``: when cancelled, the child is killed and reaped.
    """
    policies = [policy] if isinstance(policy, PolicySet) else list(policy)
    names = sorted(set(syscalls) if syscalls is not None
                   else {n for p in policies for n in p.syscalls})
    if "write" in names:
        raise ValueError("write cannot be notified: the child writes its listener's "
                         "number to the parent after installing the filter")
    if not names:
        raise ValueError("no system call to notify: the policies handle none")
    program = build_program(dataclasses.replace(notify_profile(names),
                                                architectures=ARCHITECTURES))
    chain = Chain((p.name, p) for p in policies)
    settings = SessionSettings(
        unhandled=unhandled or chain.unhandled or deny(38, reason="unhandled"),
        on_error=on_error or deny(1, reason="handler error"),
        deadline=deadline, mode=mode)
    pid, listener, result_r = _fork_filtered(program, func)
    capture = _Capture()
    chunks: list[bytes] = []
    finished = False
    try:
        session = Session(NotifyFd(listener), container or Container(id="test", pid=pid),
                          chain, settings, capture)
        listener = -1  # the session owns it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, result_r, chunks)
            await session.run()  # until no process uses the filter
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        if listener >= 0:
            os.close(listener)
        os.close(result_r)
        with trio.CancelScope(shield=True):
            _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    trial = Trial(decisions=capture.seen, exit_status=os.waitstatus_to_exitcode(status))
    data = b"".join(chunks)
    if data:
        trial.value, trial.errno, trial.exception = pickle.loads(data)
    elif trial.exit_status:
        trial.exception = f"the child died with status {trial.exit_status}"
    return trial


async def _read_all(fd: int, chunks: list[bytes]) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, 65536)
        if not data:
            return
        chunks.append(data)


def _fork_filtered(program: bytes, func: Callable[[], Any]) -> tuple[int, int, int]:
    """Fork a child that installs ``program`` with a listener and then runs ``func``.
    Returns (pid, our copy of the listener, read end of the result pipe)."""
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only raw calls, then _exit
        status = 0
        try:
            os.close(report_r)
            os.close(ack_w)
            os.close(result_r)
            bpf.set_no_new_privs()
            fd = bpf.install_filter(program, abi.SECCOMP_FILTER_FLAG_NEW_LISTENER)
            os.write(report_w, f"{fd}\n".encode())
            os.read(ack_r, 1)  # the parent holds the listener: notified calls get answers
            os.close(fd)
            data = memoryview(_outcome(func))
            while data:
                data = data[os.write(result_w, data):]
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    os.close(report_w)
    os.close(ack_r)
    os.close(result_w)
    try:
        ready, _, _ = select.select([report_r], [], [], 10.0)
        text = os.read(report_r, 64).decode().strip() if ready else ""
        if not text.isdigit():
            raise OSError(f"the child could not install its filter ({text or 'no answer'})")
        pidfd = os.pidfd_open(pid)
        try:
            listener = bpf.pidfd_getfd(pidfd, int(text))
        finally:
            os.close(pidfd)
        os.write(ack_w, b"k")
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(result_r)
        raise
    finally:
        os.close(report_r)
        os.close(ack_w)
    return pid, listener, result_r


def _outcome(func: Callable[[], Any]) -> bytes:
    try:
        value: Any = func()
        result: tuple[Any, int, str] = (value, 0, "")
    except OSError as exc:
        result = (None, exc.errno or 0, repr(exc))
    except Exception as exc:
        result = (None, 0, repr(exc))
    try:
        return pickle.dumps(result)
    except Exception:
        return pickle.dumps((repr(result[0]), result[1], result[2]))
