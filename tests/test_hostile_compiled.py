"""Attacks on this round's compiled code (supervisor/_hotloop.c) where C can differ from
the pure-Python reference, and on the memory reads beside it: lengths and addresses that
do not fit a C type, reference counts on the paths where the compiled loop hands a
failure to Python, signals while it RECVs and SENDs.

The hot-loop tests run with both loops (the ``hot_loop`` fixture): the pure-Python one
is the reference, the answer must be the same."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import accel
from supervisor.audit import audit_text
from supervisor.decide import Outcome
from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    TargetMemoryError,
    deny,
    returns,
)
from supervisor.session import SessionSettings

from .conftest import serve_target

WAIT = 20.0  # a hang guard


def proc_mem_fds() -> list[str]:
    """The /proc/<pid>/mem files this process has open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own fd, closed meanwhile)
            continue
        if target.startswith("/proc/") and target.endswith("/mem"):
            found.append(target)
    return found


def _answers(result: object) -> list[int]:
    """The errno of each call of a ``mkdir-repeat`` target (0: it succeeded)."""
    assert isinstance(result, dict)
    return [r["errno"] for r in result["results"]]


@pytest.mark.parametrize("use_proc_mem", [False, True], ids=["process_vm_readv", "proc"])
@pytest.mark.parametrize("limit", [2**40, 2**63, 2**64], ids=["1TiB", "2^63", "2^64"])
async def test_a_string_limit_past_the_address_space_reads_the_string(
        tmp_path: Path, limit: int, use_proc_mem: bool) -> None:
    """``read_cstring``'s limit is any positive int (the read stops at the NUL, or at
    unmapped memory long before a limit past the address space). The compiled core
    allocated the whole limit before reading (MemoryError for 1 TiB) and took it as a
    C ssize_t (OverflowError from 2^63), and that failed hand-over kept the session's one
    reading slot and the read's /proc/<pid>/mem fd for ever: every later read of the
    container waited for the slot until its deadline (on_error). The Python core read
    the string each time."""
    guarded = str(tmp_path / "guarded")
    policy = PolicySet("limit")
    before = proc_mem_fds()

    @policy.on("mkdir")
    async def guard(n: Notification) -> Decision | None:
        path = await n.read_cstring(n.pointer(0), limit=limit)
        return deny(errno.EACCES) if path == guarded.encode() else None

    async with serve_target(policy, ["mkdir"], "mkdir-repeat", guarded, "3",
                            settings=SessionSettings(deadline=1.0)) as served:
        served.session.memory._use_proc_mem = use_proc_mem
        with trio.fail_after(WAIT):
            got = _answers(await served.target.result())
    assert got == [errno.EACCES] * 3
    assert proc_mem_fds() == before  # each /proc/<pid>/mem fd closed by its read


@pytest.mark.parametrize("use_proc_mem", [False, True], ids=["process_vm_readv", "proc"])
async def test_a_pointer_into_the_kernel_half_faults_as_the_kernel_does(
        use_proc_mem: bool) -> None:
    """A path pointer from 2^63 up (kernel addresses on x86-64): the kernel answers
    EFAULT, and so must a policy that reads it (TargetMemoryError, the session denies
    with its errno). process_vm_readv says EFAULT; but an offset from 2^63 up is
    negative for pread(2) of /proc/<pid>/mem: the compiled core passed on its EINVAL,
    the Python core an OverflowError of os.pread, both a handler error (on_error,
    EPERM, logged with a traceback per call)."""
    policy = PolicySet("read")
    seen: list[bytes] = []

    @policy.on("mkdir")
    async def read(n: Notification) -> Decision | None:
        seen.append(await n.read_path(0))
        return None

    async with serve_target(policy, ["mkdir"], "mkdir-at", "0x8000000000001000") as served:
        served.session.memory._use_proc_mem = use_proc_mem
        with trio.fail_after(WAIT):
            result = await served.target.result()
    assert result == {"rc": -1, "errno": errno.EFAULT}, json.dumps(result)
    assert not seen


@pytest.mark.usefixtures("hot_loop")
async def test_the_hot_loops_error_paths_leave_no_objects_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    """Reference counts on the paths where the compiled loop hands a handler's failure
    to Python: a raised exception (its traceback and frame kept by the log record and
    dropped), garbage returned, a new Decision object per call (a new Outcome each
    time), a value at the top of the 64-bit range. A leak of one object per call would
    be thousands of blocks."""
    caplog.set_level("ERROR", logger="supervisor.session")  # not 5,000 tracebacks
    policy = PolicySet("errors")
    calls = [0]
    blocks: list[int] = []
    total = 6_000

    @policy.on("getppid")
    def misbehave(n: Notification) -> object:
        calls[0] += 1
        if calls[0] in (1_000, total):
            gc.collect()  # (a raised exception's traceback and frame make a cycle)
            blocks.append(sys.getallocatedblocks())
        step = calls[0] % 4
        if step == 0:
            raise ValueError(f"boom {calls[0]}")
        if step == 1:
            return [calls[0]]  # garbage: refused
        if step == 2:
            # A new Decision each time (deny() would cache the first 4,096 of them).
            return Decision("deny", errno=errno.EACCES, reason=f"call {calls[0]}")
        return returns(2**63 - 1)

    async with serve_target(policy, ["getppid"], "getppid", str(total)) as served:
        with trio.fail_after(120):
            got = await served.target.result()
    assert isinstance(got, dict) and len(got["results"]) == total  # type: ignore[arg-type]
    grown = blocks[1] - blocks[0]
    assert grown < 1_000, f"{grown} blocks more after {total - 1_000} notifications"


class Unprintable(Exception):
    """A policy's exception whose __str__ is broken."""

    def __str__(self) -> str:
        return 5  # type: ignore[return-value]


@pytest.mark.usefixtures("hot_loop")
@pytest.mark.parametrize("raised", [
    Unprintable(),
    TargetMemoryError(0, "no errno"),
    TargetMemoryError(600, "past the errnos"),
    TargetMemoryError("EFAULT", "not a number"),  # type: ignore[arg-type]
], ids=["unprintable", "errno-0", "errno-600", "errno-str"])
async def test_an_odd_exception_from_a_handler_is_that_calls_error(
        raised: Exception) -> None:
    """What a handler raises is its call's on_error answer, whatever the exception: one
    whose str() fails, a TargetMemoryError the policy made with an errno no deny()
    takes. Session._failure raised turning them into the call's Outcome (str(), or
    deny(errno)): out of on_ready, which ended the session with its call unanswered
    (both loops)."""
    policy = PolicySet("odd")

    @policy.on("mkdir")
    def fail(n: Notification) -> object:
        raise raised

    async with serve_target(policy, ["mkdir"], "mkdir-repeat", "/x/y", "5") as served:
        with trio.fail_after(WAIT):
            got = await served.target.result()
    assert got == {"results": [{"rc": -1, "errno": errno.EPERM}] * 5}  # on_error
    assert served.session.stats.decisions == {"deny": 5}


@pytest.mark.usefixtures("hot_loop")
async def test_a_signal_storm_while_threads_call_at_once_loses_no_answer() -> None:
    """Signals at the loop's thread while it RECVs and SENDs in C (EINTR is the RECV
    watchdog's verdict on a RECV; a SEND that waits for the listener's lock while a
    container's threads hold it could see one too) and eight threads of the container
    call at once: every call is answered, the session does not fail."""
    policy = PolicySet("p")

    @policy.on("getppid")
    def refuse(n: Notification) -> Decision:
        return deny(errno.EACCES)

    main_thread = threading.get_ident()
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            signal.pthread_kill(main_thread, signal.SIGUSR1)
            time.sleep(0.00005)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    stormer = threading.Thread(target=storm)
    try:
        async with serve_target(policy, ["getppid"], "getppid-threads", "8", "2000") \
                as served:
            stormer.start()
            with trio.fail_after(WAIT):
                out = await served.target.result()
            assert served.session._failed is None
    finally:
        stop.set()
        if stormer.is_alive():
            stormer.join()
        signal.signal(signal.SIGUSR1, previous)
    assert out == {"errnos": {str(errno.EACCES): 16_000}}
    assert served.session.stats.answered >= 16_000  # (python3 may call getppid itself)


# ---------------------------------------------------------------- the audit-line formatter
# format_audit_line (supervisor/_hotloop.c) is called with hand-made entries, without
# pyseccomp, so that these tests also run under a preloaded ASan (see the C rules).

def _python_audit_text(entry: Any, max_line: Any) -> str:
    """audit_text's pure-Python path, the reference."""
    saved = accel.HOTLOOP
    accel.HOTLOOP = None
    try:
        return audit_text(entry, max_line)
    finally:
        accel.HOTLOOP = saved


def _formatter() -> Any:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    return accel.HOTLOOP.format_audit_line


def _plain_entry(**change: Any) -> tuple[Any, ...]:
    fields: dict[str, Any] = dict(
        when=1765000000.25, container=Container("web", 1, peer_uid=0), tid=2, notif_id=3,
        syscall="getppid", args=(0, 1), outcome=Outcome(deny(errno.EPERM), "p"),
        latency=1e-6, shadow=False)
    return tuple((fields | change).values())


# Every character class json writes at a different length: 1 byte (printable ASCII),
# 2 (the short escapes), 6 (other control characters, DEL, latin-1, BMP), 12 (above
# U+FFFF), in 1-, 2- and 4-byte PEP 393 strings.
_CHARS = 'a"\\\n\x00\x1f\x7f\xe9\xff\u0100\u2028\uffff\U00010000\U0001f600\U0010ffff'
# Runs of one character (long runs of the widest escapes are what a bound gets wrong):
_WIDE = st.lists(st.tuples(st.sampled_from(_CHARS), st.integers(1, 120))
                 .map(lambda run: run[0] * run[1]), max_size=4).map("".join)
_EXTREME_INTS = st.sampled_from([0, 2**63 - 1, -2**63, 2**64 - 1, -1, 10**19])


@given(container=_WIDE, syscall=_WIDE, policy=_WIDE, reason=_WIDE, error=_WIDE,
       kind=st.sampled_from(["deny", "returns", "allow", "deny\n\U0001f600"]),
       pid=_EXTREME_INTS, peer_uid=_EXTREME_INTS, tid=_EXTREME_INTS,
       notif_id=_EXTREME_INTS, number=_EXTREME_INTS,
       args=st.lists(st.sampled_from([0, 2**64 - 1, 2**63]), max_size=40),
       when=st.sampled_from([1e9, 3999999999.9999995, 2**31 + 0.1]),
       latency=st.sampled_from([0.0, -0.0, 999999.99999995, 5e-324]),
       max_line=st.sampled_from([0, 1024, 4096]))
@settings(max_examples=1000, deadline=None)
def test_the_compiled_formatter_at_its_size_bound(
        container: str, syscall: str, policy: str, reason: str, error: str, kind: str,
        pid: int, peer_uid: int, tid: int, notif_id: int, number: int, args: list[int],
        when: float, latency: float, max_line: int) -> None:
    """The output buffer is sized by a bound, not measured: every field at its longest
    (20-digit and negative numbers, 40 arguments of 0xffff..., the widest floats, the
    peer uid, the error, the shadow flag) with strings made of the escapes that write the
    most bytes per character, in every PEP 393 kind. Under ASan a write past the bound
    aborts; without it the text must still be the reference's, or None."""
    class _Decision:  # any errno/value: the builders would refuse the extremes
        def __init__(self) -> None:
            self.kind, self.errno, self.value, self.reason = kind, number, number, reason

    entry = (when, Container(container, pid, peer_uid=peer_uid), tid, notif_id, syscall,
             args, Outcome(_Decision(), policy, error, ""), latency, True)  # type: ignore[arg-type]
    text = _formatter()(entry, max_line)
    if text is not None:
        assert text == _python_audit_text(entry, max_line)
        json.loads(text)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("widest", ["\x00", "\x7f\xff", "\uffff\u0100", "\U0010ffff",
                                    "\U0001f600\x1f", '"\\'],
                         ids=["control", "latin-1", "BMP", "astral", "astral+control",
                              "short escapes"])
def test_every_field_at_its_longest_at_once(widest: str, n: int) -> None:
    """The targeted case of the size bound: all six strings made only of the character
    that takes the most bytes in its PEP 393 kind (6 per latin-1 or BMP character, 12 per
    astral one), every number at its longest, 40 arguments, the optional fields present.
    (Under ASan with PYTHONMALLOC=malloc an overrun aborts; pymalloc's pools hide one.)"""
    class _Decision:
        kind, errno, value, reason = "deny", -2**63, 0, widest * n

    text = widest * n
    entry = (3999999999.9999995, Container(text, -2**63, peer_uid=2**64 - 1), -2**63,
             2**64 - 1, text, [2**64 - 1] * 40, Outcome(_Decision(), text, text, ""),  # type: ignore[arg-type]
             0.999999999, True)
    got = _formatter()(entry, 0)
    if max(widest) > "\uffff":  # surrogate escapes: audit_text's general path
        assert got is None
    else:
        assert got == _python_audit_text(entry, 0)


@pytest.mark.parametrize("max_line", [2**63, 2**64, -2**64, True, 4096.0],
                         ids=["2^63", "2^64", "-2^64", "True", "float"])
def test_a_max_line_the_formatter_does_not_take_is_left_to_python(max_line: Any) -> None:
    """audit_text(entry, max_line) takes any number Python compares with a length: the
    compiled twin raised OverflowError for an int past a C ssize_t and TypeError for a
    bool or float, where the Python path writes (or cuts) the line. An exception out of
    the writer's formatting loses the whole batch. The twin now declines (None)."""
    entry = _plain_entry()
    assert _formatter()(entry, max_line) is None
    assert audit_text(entry, max_line) == _python_audit_text(entry, max_line)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", ["list", "8-tuple", "10-tuple", "tuple subclass"])
def test_an_entry_of_another_shape_is_left_to_python(shape: str) -> None:
    """An entry is unpacked by audit_text as any 9-item iterable: a list works there, a
    tuple of another length raises ValueError. The compiled twin raised TypeError for
    all of them; it now declines and Python does what it does."""

    class _Tuple(tuple):  # type: ignore[type-arg]
        pass

    entry = _plain_entry()
    odd: Any = {"list": list(entry), "8-tuple": entry[:8], "10-tuple": (*entry, 1),
                "tuple subclass": _Tuple(entry)}[shape]
    assert _formatter()(odd, 4096) is None
    try:
        expected: Any = _python_audit_text(odd, 4096)
    except ValueError as e:
        expected = type(e)
    try:
        got: Any = audit_text(odd, 4096)
    except ValueError as e:
        got = type(e)
    assert got == expected


def test_properties_that_run_code_while_the_formatter_reads_them() -> None:
    """A Container, Outcome and Decision whose attributes are properties run Python code
    in the middle of format_audit_line: here the errno property empties the arguments
    list and the container's properties hand out fresh strings and ints each time. The
    formatter reads the list's length after the last attribute (no read past the list's
    new end, checked under ASan), holds its own references to what it read, and writes
    what it read, once."""
    args = [1, 2, 3, 2**64 - 1]

    class _Container:
        @property
        def id(self) -> str:
            return "".join(["we", "b\U0001f600"[:1]])

        @property
        def pid(self) -> int:
            return int("12345678901234")

        @property
        def peer_uid(self) -> int:
            return int("0")

    class _Decision:
        kind = "deny"
        reason = "r"

        @property
        def errno(self) -> int:
            args.clear()
            gc.collect()
            return 13

    class _Outcome:
        decision = _Decision()
        policy, detail, error = "p", "", None

    entry = (1765000000.25, _Container(), 2, 3, "getppid", args, _Outcome(), 1e-6, False)
    text = _formatter()(entry, 4096)
    assert text is not None and '"args":[]' in text and '"errno":13' in text
    args.extend([1, 2, 3])  # (the Python path reads errno after the args' types too)
    assert text == _python_audit_text(entry, 4096)
    assert json.loads(text)["container"] == "web"
