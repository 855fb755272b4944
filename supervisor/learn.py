"""Learn mode: record the system calls a program makes and write an OCI profile for them.

The pure part (:class:`Recording`, :func:`merge_profile`, :func:`learning_profile`,
:func:`profile_file_name`) does no I/O; :func:`write_profile` and :func:`record` (the
``seccomp-supervisor record`` command) are the thin shell around it. The ``learn`` policy
(``policies/learn.py``) uses the same pieces inside the daemon.

How calls are observed: the program runs under a filter that notifies every system call
libseccomp has a name for (:func:`learning_profile`), and every notification is answered
CONTINUE after its (arch, name) was counted. No memory is read, so CONTINUE is exact.

What cannot be recorded, and is therefore always allowed in a written profile
(:data:`HANDOFF_SYSCALLS`):

* ``write`` is never notified. The process that installs a filter must hand the listener
  over before anyone can answer it: our spawn helper writes the listener's number to its
  parent right after ``seccomp()``, and runc refuses to notify ``write`` for the same
  reason. A notify filter that only starts at ``execve`` does not exist (a filter applies
  from the moment it is installed), so the filter has to be there before the handoff.
* The launcher's own calls between installing the filter and ``execve`` -- for
  :mod:`supervisor._filtered_exec` exactly ``write``, ``read``, ``close`` and ``execve``
  (``exit_group`` when the exec fails); ``tests/test_learn.py`` pins this with strace.
  They are notified and recorded like the command's own calls (they happen in the same
  process), but the launcher that later *enforces* the profile makes them again before
  the command runs, so they must be allowed whatever the command did.
* Calls libseccomp has no name for: a profile can only name calls, so they cannot be
  written down; the learning filter does not notify them (they run unrecorded).

Under runc, the calls runc's own init makes after installing the filter (before it
executes the container's process) are notified and recorded like the launcher's, so a
learned profile also covers them -- all but those of its Go runtime, which come and go
with timing. runc's init is a Go program (``GOMAXPROCS=1``, its goroutine locked to the
thread that installs the filter, without TSYNC), and on that thread, between the filter
and ``execve``, the runtime may or may not make (:data:`GO_RUNTIME_SYSCALLS`, always
allowed in a profile the daemon learns, :func:`learned_names`):

* ``futex``: when the init leaves a blocking call (the sync pipe's ``read``, the exec
  fifo's ``open``, which blocks until ``runc start``) after sysmon retook its P and
  parked, it wakes sysmon (``FUTEX_WAKE`` on ``sched.sysmonnote``); it waits on its own
  ``m.park`` (``FUTEX_WAIT``) when it has to wait for the P, and wakes another thread's
  when it hands work over. The runtime treats a failed wake as fatal:
  ``futexwakeup addr=0x... returned -1``, SIGSEGV, and the container does not start.
* ``rt_sigreturn``: a signal delivered to that thread (sysmon's or the GC's preemption
  SIGURG, any process-directed signal) runs a Go handler that returns with it; denied,
  the init dies.

Observed with runc 1.1.5 (go1.19) over more than 100 runs, idle and with two CPU hogs,
both by the learn policy's own notifications and by ``strace -f``: the init's thread
made ``futex`` in all but one learning run, ``rt_sigreturn`` in about two thirds, and
nothing else of the runtime (no ``nanosleep``, ``sched_yield``, ``mmap``, ``munmap``,
``madvise``, ``tgkill``, ``rt_sigprocmask``, ``sigaltstack``, ``clone``,
``epoll_pwait``); denying each of these alone, runc started ``true`` 20 times out of 20,
while denying ``futex`` failed 9 starts in 20 and ``rt_sigreturn`` 2 in 20. The runtime
ignores a failed ``nanosleep``/``sched_yield`` or futex wait (it spins instead), so those
need no rule. crun (C) makes the same calls in the same order every time
(``wait4 kill wait4 close munmap close close``), all recorded. (The address in the crash
reported, 0xc5dd38 in Debian's runc binary, is ``sched.sysmonnote``: only
``runtime.sysmon``, ``entersyscall_sysmon``, ``exitsyscallfast_pidle``, ``exitsyscall0``
and ``startTheWorldWithSema`` refer to it.) ``tests/test_learn.py`` makes both calls
certain: ``runc create`` leaves the init blocked in the fifo's ``open`` (sysmon parks),
a SIGURG sent meanwhile runs a handler, ``runc start`` wakes it.

``record`` does not add them: its launcher is not runc, and a profile it writes is for
``seccomp-supervisor run`` (runc's own calls after the filter are missing from it too).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyseccomp

from .errors import ProfileError
from .profile import Action, Profile, SyscallRule, load_profile, parse_profile
from .safefile import MAX_PROFILE_BYTES, read_file

__all__ = [
    "ARCH_PROFILE_NAMES",
    "GO_RUNTIME_SYSCALLS",
    "HANDOFF_SYSCALLS",
    "TRACE_SUBDIRECTORY",
    "UNRECORDABLE",
    "RecordResult",
    "Recording",
    "check_base",
    "known_syscalls",
    "learn_directories",
    "learned_names",
    "learning_profile",
    "load_base",
    "merge_profile",
    "owner_directory",
    "profile_file_name",
    "read_profile_in",
    "record",
    "write_profile",
]

log = logging.getLogger("supervisor.learn")

# Never notified by a learning filter (see the module docstring).
UNRECORDABLE: Final = ("write",)
# Always allowed in a learned profile: what the launcher does after installing the filter
# (write the listener's number, read the ack, close three fds, execve; exit_group if the
# exec fails). runc's init makes more, recorded by the learning filter, some of them only
# now and then: GO_RUNTIME_SYSCALLS.
HANDOFF_SYSCALLS: Final = ("close", "execve", "exit_group", "read", "write")
# What runc's init's Go runtime may call between installing the filter and execve, on
# some runs only, and dies when denied (see the module docstring): allowed in every
# profile the daemon learns (learned_names), whatever was recorded.
GO_RUNTIME_SYSCALLS: Final = ("futex", "rt_sigreturn")

# Architecture names of notifications (supervisor.syscalls.arch_name) → profile names.
ARCH_PROFILE_NAMES: Final[Mapping[str, str]] = {
    "x86_64": "SCMP_ARCH_X86_64",
    "x86": "SCMP_ARCH_X86",
    "x32": "SCMP_ARCH_X32",
}

_ARCH_SCAN: Final = (
    (pyseccomp.Arch.X86_64, 0),
    (pyseccomp.Arch.X86, 0),
    (pyseccomp.Arch.X32, 0x40000000),
)
# Highest system call number scanned per architecture (x86_64 ends in the 460s).
_SCAN_LIMIT: Final = 1024


@functools.cache
def known_syscalls() -> frozenset[str]:
    """Every system call name libseccomp knows on x86_64, x86 or x32."""
    names: set[str] = set()
    for token, base in _ARCH_SCAN:
        for nr in range(base, base + _SCAN_LIMIT):
            try:
                name = pyseccomp.resolve_syscall(token, nr)
            except (OSError, ValueError):
                continue
            if name:
                names.add(name.decode() if isinstance(name, bytes) else str(name))
    return frozenset(names)


def learning_profile(exclude: Iterable[str] = UNRECORDABLE) -> Profile:
    """A profile that notifies every known system call except ``exclude`` (``write``, which
    cannot be notified) on x86_64, x86 and x32, and allows the rest.

    Give it to ``seccomp-supervisor run --profile`` (or to runc as ``linux.seccomp`` with
    ``listenerPath`` set) to have a ``learn`` policy see a program's calls.
    """
    skip = set(exclude)
    names = tuple(sorted(known_syscalls() - skip))
    return Profile(
        default_action=Action.ALLOW,
        architectures=tuple(ARCH_PROFILE_NAMES.values()),
        syscalls=(SyscallRule(names=names, action=Action.NOTIFY),),
        source="learning profile",
    )


@dataclass
class Recording:
    """Counts of observed calls, per (arch, name). ``arch`` is ``x86_64``, ``x86``,
    ``x32`` (or ``0x…`` for an audit arch we do not know, which is not written out)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, arch: str, name: str, count: int = 1) -> None:
        key = (arch, name)
        self.counts[key] = self.counts.get(key, 0) + count

    def update(self, other: Recording) -> None:
        for (arch, name), count in other.counts.items():
            self.add(arch, name, count)

    @property
    def total(self) -> int:
        """Number of notifications recorded."""
        return sum(self.counts.values())

    def names(self) -> frozenset[str]:
        return frozenset(name for _arch, name in self.counts)

    def architectures(self) -> tuple[str, ...]:
        """Profile names of the architectures seen, in a fixed order."""
        seen = {arch for arch, _name in self.counts}
        return tuple(prof for arch, prof in ARCH_PROFILE_NAMES.items() if arch in seen)


def learned_names(recorded: Iterable[str], always_allow: Iterable[str]) -> frozenset[str]:
    """The names a profile the daemon learns for a container allows: the ``recorded``
    ones, ``always_allow`` (the learn policy's option) and :data:`GO_RUNTIME_SYSCALLS`,
    whatever the other two say: the daemon cannot tell whether runc or crun handed the
    listener over, and a runc whose learning run happened not to make them would
    otherwise be refused them when it starts the container under the profile. Pure."""
    return frozenset(recorded) | frozenset(always_allow) | frozenset(GO_RUNTIME_SYSCALLS)


def check_base(base: Profile) -> None:
    """Raise ProfileError unless ``base`` can be merged into: its default must be
    ``SCMP_ACT_ERRNO`` (a learned profile is an allowlist; adding allowed calls to a
    profile whose default already allows, kills or traps would change its meaning)."""
    if base.default_action != Action.ERRNO:
        raise ProfileError(
            f"{base.source}: defaultAction: a base for learn mode must deny by default "
            f"with SCMP_ACT_ERRNO, not {base.default_action}")


def load_base(path: str | os.PathLike[str]) -> Profile:
    """Read a base profile and :func:`check_base` it. Raises ProfileError.

    For an operator's file (``record --base``, the learn policy's ``base`` option); a
    file a container's creator names is read with :func:`read_profile_in`."""
    base = load_profile(path)
    check_base(base)
    return base


def read_profile_in(directory: str, name: str) -> Profile:
    """Parse the profile file ``name`` directly in ``directory``, read with
    :func:`supervisor.safefile.read_file` (a regular file, no symlink, at most
    :data:`~supervisor.safefile.MAX_PROFILE_BYTES`). Blocking: for a worker thread.

    Raises FileNotFoundError, :class:`~supervisor.safefile.FileRefused`, ProfileError
    or OSError; a ProfileError's message says where the file is wrong but quotes
    nothing from it (whoever named the file may not read it)."""
    data = read_file(directory, name, MAX_PROFILE_BYTES)
    try:
        return parse_profile(data, os.path.join(directory, name))
    except ProfileError as exc:
        raise ProfileError(_without_quotes(str(exc))) from None


def _without_quotes(message: str) -> str:
    """``message`` cut before its first quoted value (profile errors quote what they
    found with repr or JSON quotes)."""
    cut = min((i for i in (message.find("'"), message.find('"')) if i >= 0), default=-1)
    if cut < 0:
        return message
    return f"{message[:cut].rstrip()} (the file's values not shown)"


TRACE_SUBDIRECTORY: Final = "traced"


def learn_directories(options: Mapping[str, object]) -> tuple[str, str, str]:
    """``(directory, trace_directory, base_directory)`` of the learn policy's options:
    where it writes ``<container id>.json``, where ``io.containers.trace-syscall``
    outputs may be (``trace_directory``, default ``DIRECTORY/traced``), and where their
    ``if:`` bases may be (``base_directory``, "" when none may be). Pure."""
    directory = str(options["directory"])
    trace = str(options.get("trace_directory") or "") or os.path.join(directory,
                                                                      TRACE_SUBDIRECTORY)
    return directory, trace, str(options.get("base_directory") or "")


def _unconditional_allow(rule: SyscallRule) -> bool:
    return rule.action == Action.ALLOW and not rule.args and rule.errno_ret is None


def merge_profile(base: Profile | None, names: Iterable[str],
                  architectures: Iterable[str] = ()) -> Profile:
    """The profile that allows ``names`` on top of ``base``.

    * default action ``SCMP_ACT_ERRNO`` (``base``'s ``defaultErrnoRet`` kept; EPERM without
      a base);
    * ``base``'s unconditional ``SCMP_ACT_ALLOW`` rules and ``names`` become one sorted
      ``SCMP_ACT_ALLOW`` rule, first;
    * every other rule of ``base`` (conditions, errno, notify...) is kept in order, and a
      name it mentions is **not** added unconditionally: the base's rule for it wins;
    * architectures: ``base``'s, then the new ones; flags, listenerPath and
      listenerMetadata come from ``base``.

    Merging is idempotent: ``merge_profile(merge_profile(b, n), n) == merge_profile(b, n)``.
    Raises ProfileError if ``base`` does not deny by default (:func:`check_base`).
    """
    if base is not None:
        check_base(base)
    kept = tuple(rule for rule in (base.syscalls if base else ())
                 if not _unconditional_allow(rule))
    governed = {name for rule in kept for name in rule.names}
    allowed = set(names)
    for rule in base.syscalls if base else ():
        if _unconditional_allow(rule):
            allowed.update(rule.names)
    allowed -= governed
    arches = list(base.architectures if base else ())
    for arch in architectures:
        if arch not in arches:
            arches.append(arch)
    rules = ((SyscallRule(names=tuple(sorted(allowed)), action=Action.ALLOW),)
             if allowed else ()) + kept
    return Profile(
        default_action=Action.ERRNO,
        default_errno_ret=base.default_errno_ret if base else None,
        architectures=tuple(arches),
        flags=base.flags if base else (),
        listener_path=base.listener_path if base else None,
        listener_metadata=base.listener_metadata if base else None,
        syscalls=rules,
        source="learned profile",
    )


_UNSAFE_CHARS: Final = re.compile(r"[^A-Za-z0-9_.+-]")
_MAX_NAME: Final = 200


def owner_directory(directory: str, peer_uid: int | None) -> str:
    """Where the profiles of containers handed over by ``peer_uid`` go under the learn
    ``directory``: ``directory`` itself for root (uid 0; None, a session restored from an
    older version, counts as root's), ``directory/uid-UID`` for any other uid. A rootless
    runtime's user chooses its container ids (and annotations) freely: its own
    subdirectory keeps it from writing, or merging into, another user's profiles. Pure."""
    if peer_uid in (0, None):
        return directory
    return os.path.join(directory, f"uid-{peer_uid}")


def profile_file_name(container_id: str) -> str:
    """A file name for ``container_id``'s profile, never a path elsewhere.

    ``ID.json`` when the id is at most 200 characters of letters, digits and ``_ . + -``
    (what runc accepts) and does not start with a dot. Any other id has its unsafe
    characters replaced by ``_``, is cut to 200 characters and gets ``~`` and a hash of
    the real id appended: ``~`` never occurs in a kept id, so two distinct ids never
    share a file (short of a 64-bit hash collision between two mangled ids).
    """
    if (container_id and len(container_id) <= _MAX_NAME and not container_id.startswith(".")
            and not _UNSAFE_CHARS.search(container_id)):
        return f"{container_id}.json"
    safe = _UNSAFE_CHARS.sub("_", container_id)[:_MAX_NAME]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    digest = hashlib.sha256(container_id.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{safe}~{digest[:16]}.json"


def write_profile(path: str | os.PathLike[str], profile: Profile) -> None:
    """Write ``profile`` as JSON to ``path`` atomically (a temporary file in the same
    directory, fsync, rename); the directory is created if missing. Raises OSError."""
    from .profile import dump_profile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dump_profile(profile))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- record


@dataclass
class RecordResult:
    """What :func:`record` did: the command's exit status (128 + N for signal N), what
    it saw, and the profile it wrote."""

    status: int
    recording: Recording
    profile: Profile


def record(argv: Sequence[str], out: str | os.PathLike[str], *,
           base: Profile | None = None,
           always_allow: Iterable[str] = HANDOFF_SYSCALLS) -> RecordResult:
    """Run ``argv`` under a learning filter, answer every notified call CONTINUE while
    counting it, and when every process of the command has exited write the merged
    profile (:func:`merge_profile` of ``base``, the recorded calls and ``always_allow``)
    to ``out``. SIGINT and SIGTERM sent to this process are passed on to the command.

    Runs its own trio loop: call it from synchronous code. Raises SpawnError if the
    command cannot be started, OSError if the profile cannot be written.
    """
    import trio

    from . import abi
    from .audit import Recorder
    from .decide import Chain
    from .notifyfd import NotifyFd
    from .policy import Container, Decision, Notification, PolicySet, allow
    from .profile import build_program
    from .session import Session, SessionSettings
    from .spawn import spawn_filtered

    recording = Recording()
    recorder_policy = PolicySet("record")

    @recorder_policy.on(*sorted(known_syscalls() - set(UNRECORDABLE)))
    def _count(n: Notification) -> Decision:
        recording.add(n.arch, n.syscall)
        return allow(reason="recording")

    program = build_program(learning_profile())
    child = spawn_filtered(list(argv), program, flags=abi.SECCOMP_FILTER_FLAG_NEW_LISTENER)
    container = Container(id=f"record-{child.pid}", pid=child.pid)

    async def serve() -> None:
        # The session owns the listener from here on and closes it when it ends.
        notify = NotifyFd(child.take_listener())
        session = Session(notify, container, Chain([("record", recorder_policy)]),
                          SessionSettings(unhandled=allow(reason="unrecorded")),
                          Recorder(None, audit="none"))
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(forward_signals)
            await session.run()  # until no process uses the filter any more
            nursery.cancel_scope.cancel()

    async def forward_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                with contextlib.suppress(OSError):
                    os.kill(child.pid, signum)

    try:
        trio.run(serve)
    finally:
        child.close()  # only if serve() never took the listener
        # The session closed the listener: if it failed, the command's pending and later
        # notified calls fail with ENOSYS, so it cannot hang here.
        returncode = child.process.wait()
    status = 128 - returncode if returncode < 0 else returncode
    profile = merge_profile(base, recording.names() | set(always_allow),
                            recording.architectures())
    write_profile(out, profile)
    return RecordResult(status, recording, profile)
