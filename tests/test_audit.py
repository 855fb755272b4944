"""The audit trail: one JSON line per decision, the per-container rate limit of identical
lines with the suppressed counts reported, and [audit] decisions = all | deny | none."""

from __future__ import annotations

import errno
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from supervisor import accel
from supervisor.audit import (
    WRITE_LINES_PER_TURN,
    RateLimiter,
    Recorder,
    _dumps,
    audit_line,
    audit_text,
)
from supervisor.decide import Chain, Outcome
from supervisor.metrics import Metrics
from supervisor.notifyfd import NotifyFd
from supervisor.policy import (
    Container,
    Decision,
    Notification,
    PolicySet,
    allow,
    deny,
    returns,
)
from supervisor.session import Session, SessionSettings

from .conftest import start_target
from .daemon_harness import running_daemon

DENY_MKDIR = """
[defaults]
policies = []
unhandled = "deny:EACCES"

[audit]
decisions = "deny"
rate_limit = 3
"""
MKDIR = ["--notify", "mkdir", "--notify", "mkdirat"]


def records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------- pure parts


def test_rate_limiter_windows_and_reports() -> None:
    limiter = RateLimiter(2, window=1.0)
    assert limiter.admit("k", 10.0, "s1") == (True, None)
    assert limiter.admit("k", 10.1, "s2") == (True, None)
    assert limiter.admit("k", 10.2, "s3") == (False, None)
    assert limiter.admit("k", 10.9, "s4") == (False, None)
    assert limiter.admit("other", 10.9) == (True, None)  # keys are independent
    # The next event after the window reports the held-back count of the old window.
    assert limiter.admit("k", 11.0, "s5") == (True, ("s1", 2))
    assert limiter.admit("k", 11.1) == (True, None)
    assert limiter.admit("k", 11.2) == (False, None)
    assert limiter.expire(11.5) == []          # both windows still open
    assert len(limiter) == 2
    assert limiter.expire(12.0) == [("s5", 1)]  # "other" ends without a report
    assert len(limiter) == 0
    unlimited = RateLimiter(0)
    assert all(unlimited.admit("k", 1.0)[0] for _ in range(100))


def _decide(recorder: Recorder, container: Container, outcome: Outcome,
            args: tuple[int, ...] = (0x7FFD0000, 0o755, 0, 0, 0, 0), tid: int = 7) -> None:
    recorder.decided(container, 0xABC, tid, "mkdir", args, outcome, 42e-6)


def test_line_fields_and_levels() -> None:
    ctr = Container(id="web-1", pid=4242)
    out = io.StringIO()
    rec = Recorder(Metrics(CollectorRegistry()), audit="deny", stream=out)
    _decide(rec, ctr, Outcome(deny(errno.EACCES, reason="no"), "p"))
    _decide(rec, ctr, Outcome(allow(), "p"))
    _decide(rec, ctr, Outcome(returns(5), "p"))
    _decide(rec, ctr, Outcome(deny(errno.EPERM), "p", "deadline", "deadline 2s"))
    lines = records(out.getvalue().splitlines())
    assert [r["decision"] for r in lines] == ["deny", "deny"]  # denies and errors only
    first = lines[0]
    assert first["container"] == "web-1" and first["runtime_pid"] == 4242
    assert first["tid"] == 7 and first["id"] == "0xabc"
    assert first["args"] == ["0x7ffd0000", "0x1ed", "0x0", "0x0", "0x0", "0x0"]
    assert first["errno"] == errno.EACCES and first["policy"] == "p"
    assert first["reason"] == "no" and first["latency_us"] == 42.0
    assert isinstance(first["time"], float) and "error" not in first
    assert lines[1]["error"] == "deadline" and lines[1]["reason"] == "deadline 2s"

    out = io.StringIO()
    rec = Recorder(None, audit="all", stream=out)
    _decide(rec, ctr, Outcome(allow(), "p"))
    _decide(rec, ctr, Outcome(returns(5), "p"))
    assert [(r["decision"], r.get("value")) for r in records(out.getvalue().splitlines())] \
        == [("allow", None), ("returns", 5)]

    out = io.StringIO()
    rec = Recorder(None, audit="none", stream=out)
    _decide(rec, ctr, Outcome(deny(1), "p"))
    assert out.getvalue() == ""


def test_another_user_sending_the_same_id_and_pid_has_its_own_budget() -> None:
    """A rootless runtime's user chooses its container id and pid: flooding with another
    user's must not use up that container's lines, and every line says whose it is."""
    out = io.StringIO()
    rec = Recorder(Metrics(CollectorRegistry()), audit="deny", stream=out, rate_limit=2)
    victim = Container(id="web", pid=42, peer_uid=0)
    forger = Container(id="web", pid=42, peer_uid=2950)
    for _ in range(5):
        _decide(rec, forger, Outcome(deny(13), "p"))
    _decide(rec, victim, Outcome(deny(13), "p"))
    lines = records(out.getvalue().splitlines())
    assert [r["peer_uid"] for r in lines] == [2950, 2950, 0]


def test_identical_means_same_event_per_container() -> None:
    """Args, thread and errno differ between repeats; other containers have their own
    budget; another policy is another key."""
    out = io.StringIO()
    metrics = Metrics(CollectorRegistry())
    rec = Recorder(metrics, audit="deny", stream=out, rate_limit=2)
    a, b = Container(id="a", pid=1), Container(id="b", pid=2)
    for i in range(5):
        _decide(rec, a, Outcome(deny(13), "p"), args=(0x1000 + i, 0, 0, 0, 0, 0), tid=i)
    for _ in range(2):
        _decide(rec, b, Outcome(deny(13), "p"))
    _decide(rec, a, Outcome(deny(1), "p"))  # another errno: the same key, held back
    _decide(rec, a, Outcome(deny(1), "q"))  # another policy: another line
    lines = records(out.getvalue().splitlines())
    assert [r["container"] for r in lines] == ["a", "a", "b", "b", "a"]
    assert metrics.registry.get_sample_value(
        "seccomp_supervisor_audit_lines_suppressed_total") == 4


def test_suppressed_lines_found_by_their_outcome_stay_with_their_container() -> None:
    """A held-back line is found by its Outcome's identity (no key built). Two containers
    answered with one shared Outcome object must still spend and count their own
    windows, and a flush of the windows must not leave a remembered one in use (its
    suppressed count would never be reported)."""
    registry = CollectorRegistry()
    out = io.StringIO()
    recorder = Recorder(Metrics(registry), audit="deny", stream=out, rate_limit=2)
    shared = Outcome(deny(errno.EPERM), "p")
    a, b = Container("a", pid=1), Container("b", pid=2)
    for container, calls in ((a, 5), (b, 4), (a, 5)):
        for i in range(calls):
            recorder.decided(container, i, 1, "getppid", (0,) * 6, shared, 1e-5)
    assert [json.loads(line)["container"] for line in out.getvalue().splitlines()] == [
        "a", "a", "b", "b"]
    reports = {sample[1].id: count for sample, count in recorder.limiter.flush()}
    assert reports == {"a": 8, "b": 2}
    for i in range(3):  # new windows after the flush: 2 written, 1 held back and reported
        recorder.decided(a, i, 1, "getppid", (0,) * 6, shared, 1e-5)
    assert len(out.getvalue().splitlines()) == 6
    assert [(s[1].id, n) for s, n in recorder.limiter.flush()] == [("a", 1)]
    assert registry.get_sample_value(
        "seccomp_supervisor_audit_lines_suppressed_total") == 8 + 2 + 1


_ints = st.integers(0, 2**64 - 1)


_LINE_FIELDS: dict[str, Any] = dict(
    container=st.text(), pid=st.integers(0, 2**31), peer_uid=st.none() | _ints,
    tid=_ints, notif_id=_ints, syscall=st.text(), args=st.lists(_ints, max_size=6),
    kind=st.sampled_from(["deny", "returns", "allow"]), policy=st.text(),
    reason=st.text(), detail=st.text(max_size=3),
    error=st.sampled_from([None, "exception", "deadline", "memory"]),
    shadow=st.booleans(), when=st.floats(1e9, 4e9) | st.floats(0, 1e10),
    latency=st.floats(0, 1e-3) | st.floats(0, 1e7),
    max_line=st.sampled_from([0, 300, 4096]))


@pytest.mark.usefixtures("hot_loop")
@given(**_LINE_FIELDS)
@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_audit_text_is_the_json_of_audit_line(container: str, pid: int,
                                              peer_uid: int | None, tid: int,
                                              notif_id: int, syscall: str, args: list[int],
                                              kind: str, policy: str, reason: str,
                                              detail: str, error: Any, shadow: bool,
                                              when: float, latency: float,
                                              max_line: int) -> None:
    """The writer's direct formatting gives the very text of ``json.dumps`` of the line's
    dict, for any strings (control characters, non-ASCII, lone surrogates), numbers and
    lengths (lines cut at ``max_line``)."""
    decision = (deny(errno.EPERM, reason=reason) if kind == "deny"
                else returns(7, reason=reason) if kind == "returns" else allow())
    entry = (when, Container(container, pid, peer_uid=peer_uid), tid, notif_id, syscall,
             tuple(args), Outcome(decision, policy, error, detail), latency, shadow)
    assert audit_text(entry, max_line) == _dumps(audit_line(entry), max_line)


def _compiled_formatter() -> Any:
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    return accel.HOTLOOP.format_audit_line


# Strings with every kind of character json escapes differently: printable ASCII, the
# quote and backslash, the short escapes, other control characters, DEL, non-ASCII below
# the surrogates, the surrogates themselves, and above U+FFFF (a surrogate pair).
_hostile = st.text(st.sampled_from('a"\\/\n\r\t\b\f\x00\x1f\x7f\xe9\u2028\ucfff\ud000'
                                   '\ud800\udfff\ue000\uffff\U0001f600u') | st.characters())


@given(**(_LINE_FIELDS | dict(container=_hostile, syscall=_hostile, policy=_hostile,
                              reason=_hostile, detail=st.sampled_from(["", "\ud800", "x\n"]))))
@settings(max_examples=1000, deadline=None)
def test_compiled_formatter_writes_audit_texts_text_or_declines(
        container: str, pid: int, peer_uid: int | None, tid: int, notif_id: int,
        syscall: str, args: list[int], kind: str, policy: str, reason: str, detail: str,
        error: Any, shadow: bool, when: float, latency: float, max_line: int) -> None:
    """format_audit_line (supervisor/_hotloop.c) returns the very text of the reference
    (json.dumps of the line's dict, surrogates replaced, cut at max_line) for hostile
    strings, or None exactly where audit_text leaves its direct formatting (a float out
    of its ranges, a surrogate escape): a twin that declined everything would fail
    here. A line to cut is cut in C too (below)."""
    decision = (deny(errno.EPERM, reason=reason) if kind == "deny"
                else returns(7, reason=reason) if kind == "returns" else allow())
    entry = (when, Container(container, pid, peer_uid=peer_uid), tid, notif_id, syscall,
             tuple(args), Outcome(decision, policy, error, detail), latency, shadow)
    text = _compiled_formatter()(entry, max_line)
    raw = json.dumps(audit_line(entry), separators=(",", ":")) + "\n"
    direct = 1e9 <= when < 4e9 and 0 <= latency * 1e6 < 1e12 and "\\ud" not in raw
    assert (text is not None) == direct
    if text is not None:
        assert text == _dumps(audit_line(entry), max_line)
        assert text == raw or len(raw) > max_line > 0


# Long strings of every kind of character json escapes differently, but no surrogate
# escape (those lines go to audit_text's general path, above): what a container chooses,
# such as a path, named in a reason.
_long = st.text(st.sampled_from('a"\\/\n\r\t\b\f\x00\x7f\xe9\u2028\uffff'),
                max_size=3000)


@given(container=_long, syscall=_long, policy=_long, reason=_long, notif_id=_ints,
       error=st.sampled_from([None, "exception", "", "x" * 500]), peer_uid=st.none() | _ints,
       args=st.lists(_ints, max_size=6), kind=st.sampled_from(["deny", "returns", "allow"]),
       max_line=st.sampled_from([1, 40, 150, 250, 300, 301, 400, 1000, 4096])
       | st.integers(1, 9000))
@settings(max_examples=1500, deadline=None)
def test_compiled_formatter_cuts_long_lines_as_dumps_does(
        container: str, syscall: str, policy: str, reason: str, notif_id: int,
        error: str | None, peer_uid: int | None, args: list[int], kind: str,
        max_line: int) -> None:
    """A line over max_line (a reason naming a 4,000-byte path: ~50 µs in Python) is cut
    in C with _dumps's own steps, so to the same text: the same rounds, water level,
    prefixes and markers, down to its last resort (every string a bare marker) for a
    max_line that no cut can reach. A twin that cut the longest string only, or
    measured characters instead of escaped bytes, would fail here."""
    decision = (deny(errno.EPERM, reason=reason) if kind == "deny"
                else returns(7, reason=reason) if kind == "returns" else allow())
    entry = (1765000000.125, Container(container, 4242, peer_uid=peer_uid), 17, notif_id,
             syscall, tuple(args), Outcome(decision, policy, error, ""), 2.5e-5, False)
    text = _compiled_formatter()(entry, max_line)
    assert text == _dumps(audit_line(entry), max_line)
    if len(_dumps(audit_line(entry))) > max_line:
        assert "more]" in text


@pytest.mark.parametrize("special", ['"', "\\", "\x00", "\n", "\r", "\t", "\b", "\f",
                                     "\x1f", "\x7f", "\xe9", "\u2028"])
def test_compiled_formatter_escapes_a_byte_wherever_it_is_in_a_word(special: str) -> None:
    """The compiled writer skips eight plain bytes at a time: a byte to escape at every
    place in a word, alone among plain ones, is still escaped (and measured, in a line
    to cut) as json does."""
    for offset in range(17):
        reason = "a" * offset + special + "/" * (40 - offset)
        entry = (1765000000.125, Container("web", 1), 2, 3, "openat", (0,),
                 Outcome(deny(errno.EACCES, reason=reason * 20), "p"), 1e-6, False)
        for max_line in (0, 400):
            assert (_compiled_formatter()(entry, max_line)
                    == _dumps(audit_line(entry), max_line)), (offset, max_line)


@pytest.mark.parametrize(("when", "latency"), [
    (1000000000.0078125, 0.25e-6),  # ties at the 6th and the 1st decimal: to even
    (1000000000.0234375, 0.75e-6), (1765000000.0, 0.0), (1765000000.5, -0.0),
    (3999999999.9999995, 5e-324), (1e9, 999999.99999995), (2**31 + 0.1, 1.05e-6),
    (1765000000.0000005, 1e-7), (1765000000.9999995, 0.15e-6),
])
def test_compiled_formatter_rounds_floats_as_format_does(when: float, latency: float
                                                          ) -> None:
    """The time and latency, written from the binary value in integers, have the digits
    of f"{x:.6f}" and f"{x:.1f}" (exact ties round to even) and audit_line's round()."""
    entry = (when, Container("c", 1), 2, 3, "getppid", (), Outcome(deny(errno.EPERM), "p"),
             latency, False)
    assert _compiled_formatter()(entry, 0) == _dumps(audit_line(entry))


class _Str(str):
    pass


class _Int(int):
    pass


@pytest.mark.parametrize("change", [
    {"container": Container(_Str("web"), 1)}, {"container": Container("web", True)},
    {"tid": _Int(5)}, {"args": (0, _Int(1))}, {"args": (0, -1)}, {"args": iter((0,))},
    {"notif_id": -1}, {"notif_id": 2**64}, {"tid": 2**64}, {"syscall": _Str("getppid")},
    {"shadow": 1}, {"when": 1}, {"when": float("nan")}, {"latency": float("inf")},
    {"latency": -1e-9}, {"outcome": Outcome(deny(errno.EPERM), "p", None, _Str("d"))},
    {"outcome": Outcome(deny(errno.EPERM), _Str("p"))},
    {"outcome": Outcome(deny(errno.EPERM), "p", _Str("memory"))},
])
def test_compiled_formatter_declines_what_is_not_exactly_its_type(change: dict[str, Any]
                                                                   ) -> None:
    """Subclasses (whose __str__, __format__ or __index__ may do anything), numbers it
    does not format as audit_text's % does, and other sequences are left to audit_text,
    which writes them as json.dumps does."""
    fields: dict[str, Any] = dict(
        when=1765000000.25, container=Container("web", 1, peer_uid=0), tid=2, notif_id=3,
        syscall="getppid", args=(0, 1), outcome=Outcome(deny(errno.EPERM), "p"),
        latency=1e-6, shadow=False)
    entry = tuple(fields.values())
    assert _compiled_formatter()(entry, 4096) == _dumps(audit_line(entry), 4096)  # type: ignore[arg-type]
    fields |= change
    entry = tuple(fields.values())
    assert _compiled_formatter()(entry, 4096) is None
    if not isinstance(fields["args"], tuple):
        return  # audit_line would iterate it a second time
    assert audit_text(entry, 4096) == _dumps(audit_line(entry), 4096)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the daemon


def test_interleaved_sessions_are_counted_under_their_own_labels() -> None:
    """The recorder reuses the metric children of the last (syscall, policy, kind); with
    many sessions interleaved (each with its own Outcomes, all sharing call names) every
    decision must still land under its own labels."""
    registry = CollectorRegistry()
    recorder = Recorder(Metrics(registry), audit="none")
    syscall = "getppid"
    outcomes = {
        "a-deny": Outcome(deny(errno.EPERM), "a"), "a-deny-2": Outcome(deny(errno.EPERM), "a"),
        "b-deny": Outcome(deny(errno.EPERM), "b"), "a-returns": Outcome(returns(1), "a"),
    }
    order = ["a-deny", "a-deny-2", "b-deny", "a-deny", "a-returns", "a-returns", "b-deny",
             "a-deny-2", "a-returns", "b-deny"] * 3
    container = Container("c")
    for i, key in enumerate(order):
        recorder.decided(container, i, 1, syscall, (0,) * 6, outcomes[key], 1e-5)
    recorder.decided(container, 99, 1, "nr_123456", (0,) * 6, outcomes["b-deny"], 1e-5)

    def count(syscall: str, policy: str, decision: str) -> float:
        value = registry.get_sample_value("seccomp_supervisor_notifications_total", {
            "syscall": syscall, "policy": policy, "decision": decision})
        return value or 0.0

    assert count("getppid", "a", "deny") == 12
    assert count("getppid", "b", "deny") == 9
    assert count("getppid", "a", "returns") == 9
    assert count("unknown", "b", "deny") == 1
    assert registry.get_sample_value("seccomp_supervisor_decision_seconds_count",
                                     {"syscall": "getppid"}) == 30


@pytest.mark.usefixtures("hot_loop")
async def test_deny_lines_of_a_real_process_are_rate_limited(tmp_path: Path) -> None:
    target = tmp_path / "nope"
    script = f"for i in $(seq 20); do mkdir {target} 2>/dev/null; done; echo done"
    async with running_daemon(tmp_path, DENY_MKDIR) as d:
        result = await d.run([*MKDIR, "--id", "noisy-1", "--", "sh", "-c", script])
        assert result.returncode == 0 and result.stdout == b"done\n", result.stderr
        assert not target.exists()
        # The summary comes from the writer when the window ends, without new lines.
        with trio.fail_after(5):
            while not any("suppressed" in r for r in records(d.audit_lines())):
                await trio.sleep(0.05)
        lines = records(d.audit_lines())
        suppressed_metric = d.metric("seccomp_supervisor_audit_lines_suppressed_total")

    denies = [r for r in lines if "suppressed" not in r]
    summaries = [r for r in lines if "suppressed" in r]
    for r in denies:
        assert r["container"] == "noisy-1" and r["syscall"] in ("mkdir", "mkdirat")
        assert r["decision"] == "deny" and r["errno"] == errno.EACCES
        assert r["policy"] == "-" and r["runtime_pid"] > 0 and r["tid"] > 0
        assert all(a.startswith("0x") for a in r["args"]) and len(r["args"]) == 6
        assert r["latency_us"] > 0
    # 20 identical denies: at most 3 lines per second, the rest counted and reported.
    assert 3 <= len(denies) < 20
    assert len(denies) + sum(s["suppressed"] for s in summaries) == 20
    assert sum(s["suppressed"] for s in summaries) == suppressed_metric
    summary = summaries[0]
    assert summary["container"] == "noisy-1" and summary["errno"] == errno.EACCES
    assert summary["window_seconds"] == 1.0 and summary["decision"] == "deny"


@pytest.mark.usefixtures("hot_loop")
async def test_decisions_all_and_none(tmp_path: Path) -> None:
    allow_all = """
[defaults]
policies = []
unhandled = "allow"

[audit]
decisions = "{level}"
"""
    for level, expected in (("all", 1), ("none", 0)):
        (tmp_path / level).mkdir()
        async with running_daemon(tmp_path / level, allow_all.format(level=level)) as d:
            made = tmp_path / level / "made"
            result = await d.run([*MKDIR, "--", "mkdir", str(made)])
            assert result.returncode == 0 and made.is_dir()
            lines = records(d.audit_lines())
        assert len(lines) == expected
        if expected:
            assert lines[0]["decision"] == "allow" and lines[0]["syscall"] in ("mkdir",
                                                                                "mkdirat")


def test_a_wall_clock_stepped_back_does_not_keep_a_full_window_closed() -> None:
    """The windows run on the wall clock (the lines' time). A clock stepped back (NTP,
    an operator's `date`) put every window's start in the future: `now - start` stayed
    below the window for as long as the step, and a container whose window was full had
    every line held back that long (an hour's step: an hour with no audit line). A
    window that starts after `now` has ended."""
    limiter = RateLimiter(2, window=1.0)
    for _ in range(3):
        limiter.admit("k", 1000.0)
    assert limiter.admit("k", 1000.5) == (False, None)  # full, and held back
    stepped_back = 1000.5 - 3600
    admitted, report = limiter.admit("k", stepped_back)
    assert admitted and report is not None and report[1] == 2
    # expire() likewise reports and forgets a window from the future.
    limiter.admit("k", 5000.0)
    assert limiter.expire(5000.0 - 3600) == [] and len(limiter) == 0


@pytest.mark.usefixtures("hot_loop")
async def test_a_stepped_back_clock_lets_the_next_line_through_in_either_loop() -> None:
    """The same through a real session: the held-back check the compiled loop makes on
    the Outcome's window, and the Python one, must both take a window whose start is in
    the future (what a clock stepped back an hour leaves) as ended."""
    out = io.StringIO()
    recorder = Recorder(Metrics(CollectorRegistry()), audit="deny", stream=out,
                        rate_limit=2)
    policy = PolicySet("p")
    calls = [0]

    @policy.on("getppid")
    def refuse(n: Notification) -> Decision:
        calls[0] += 1
        if calls[0] == 5:  # two lines written, two held back: now the clock steps back
            for w in recorder.limiter._windows.values():
                w.start += 3600
        return deny(errno.EACCES)

    target = await trio.to_thread.run_sync(lambda: start_target(["getppid"], "getppid", "5"))
    session = Session(NotifyFd(target.child.take_listener()),
                      Container(id="clock", pid=target.pid), Chain([("p", policy)]),
                      SessionSettings(), recorder)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            with trio.fail_after(20):
                result = await target.result()
            nursery.cancel_scope.cancel()
    finally:
        if target.child.process.poll() is None:
            target.child.process.kill()
        await trio.to_thread.run_sync(target.child.process.wait)
        target.child.close()
    assert isinstance(result, dict) and len(result["results"]) == 5
    lines = [r for r in records(out.getvalue().splitlines()) if "suppressed" not in r]
    assert len(lines) == 3, lines  # the 1st, the 2nd, and the 5th after the step


def test_a_byte_budget_from_the_future_has_ended() -> None:
    """The same for a container's byte budget: spent, then the clock steps back an hour;
    the next line is written (and the dropped one reported), not dropped for an hour."""
    out = io.StringIO()
    ctr = Container(id="web-1", pid=4242)
    rec = Recorder(Metrics(CollectorRegistry()), audit="all", stream=out,
                   container_bytes=400)
    _decide(rec, ctr, Outcome(deny(errno.EACCES), "p"))
    _decide(rec, ctr, Outcome(deny(errno.EACCES), "p"))  # over the 400 bytes: dropped
    assert len(out.getvalue().splitlines()) == 1
    for budget in rec._budgets.values():
        budget.start += 3600
    _decide(rec, ctr, Outcome(deny(errno.EACCES), "p"))
    written = records(out.getvalue().splitlines())
    assert len(written) == 3 and written[1]["suppressed"] == 1, written


@pytest.mark.parametrize("name", [
    "/guarded/" + "a" * 5000,
    # A container's hostile path: escapes that take 6 bytes each, a bidi override, a lone
    # surrogate (written as U+FFFD), line breaks.
    "/guarded/" + "\x1b[2J\u202e\ud800\n\x00" * 1000,
], ids=["plain", "hostile"])
async def test_the_writer_lets_the_sessions_run_between_turns(name: str) -> None:
    """A burst of lines to cut (a second's first denials of many containers, each naming
    a path longer than max_line: ~50 µs a line) is written a turn of the event loop at a
    time: another task runs after at most WRITE_LINES_PER_TURN lines, and every line is
    written, in order."""
    out = io.StringIO()
    rec = Recorder(None, audit="deny", stream=out, container_bytes=0)
    outcome = Outcome(deny(errno.EACCES, reason=name), "path_guard")
    # Enough turns that the watcher sees two of them pass whatever turn it starts after:
    # a busy machine ends turns early (their ~1 ms), and two turns may come between two
    # of its runs (below). With 3 turns' worth, it once saw [0, 128] under load.
    count = 6 * WRITE_LINES_PER_TURN + 5
    written: list[int] = []  # lines written so far, each time the watcher runs

    async def watch() -> None:
        while True:
            written.append(out.getvalue().count("\n"))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run_writer)
        for i in range(count):
            rec.decided(Container(id=f"c-{i}", pid=1000 + i), i, 7, "openat",
                        (0xFFFFFF9C, 0x7FFD0000, 0x241, 0o644, 0, 0), outcome, 1e-6)
        nursery.start_soon(watch)
        with trio.fail_after(20):
            while out.getvalue().count("\n") < count:
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    steps = [later - earlier for earlier, later in itertools.pairwise(written)]
    # Trio runs half its batches of ready tasks in reverse order, so two of the writer's
    # turns can come between two runs of the watcher.
    assert 0 < max(steps) <= 2 * WRITE_LINES_PER_TURN, steps
    assert len([step for step in steps if step > 0]) >= 2, steps
    lines = records(out.getvalue().splitlines())
    assert [int(r["id"], 16) for r in lines] == list(range(count))
    assert all(len(text) < 4096 and r["reason"].endswith("more]")
               for text, r in zip(out.getvalue().splitlines(), lines, strict=True))
    assert out.getvalue().isascii() and out.getvalue().count("\n") == count


async def test_the_summaries_of_windows_that_end_together_are_written_in_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When many containers' windows end together (their seconds started with the same
    burst), each one's summary repeats its denial's reason: with a path longer than
    max_line, a line to cut each. They are written a turn of the event loop at a time
    too, every one of them, in the order of the windows."""
    import supervisor.audit as audit_mod

    clock = [1_765_000_000.0]
    monkeypatch.setattr(audit_mod.time, "time", lambda: clock[0])
    out = io.StringIO()
    rec = Recorder(None, audit="deny", stream=out, container_bytes=0, rate_limit=1)
    outcome = Outcome(deny(errno.EACCES, reason="/guarded/" + "a" * 5000), "path_guard")
    # Enough turns that the watcher sees two of them pass whatever turn it starts after:
    # a busy machine ends turns early (their ~1 ms), and two turns may come between two
    # of its runs (below). With 3 turns' worth, it once saw [0, 128] under load.
    count = 6 * WRITE_LINES_PER_TURN + 5
    containers = [Container(id=f"c-{i}", pid=1000 + i) for i in range(count)]
    written: list[int] = []

    def lines() -> int:
        return out.getvalue().count("\n")

    async def watch() -> None:
        while True:
            written.append(lines())
            await trio.lowlevel.checkpoint()

    args = (0xFFFFFF9C, 0x7FFD0000, 0x241, 0o644, 0, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run_writer)
        for i, container in enumerate(containers):
            for _ in range(2):  # the second is held back: the window has a summary
                rec.decided(container, i, 7, "openat", args, outcome, 1e-6)
        with trio.fail_after(20):
            while lines() < count:
                await trio.lowlevel.checkpoint()
        clock[0] += 2.0  # every window ended; a new line wakes the writer
        nursery.start_soon(watch)
        rec.decided(Container(id="late", pid=1), 0, 7, "openat", args, outcome, 1e-6)
        with trio.fail_after(20):
            while lines() < 2 * count + 1:
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    steps = [later - earlier for earlier, later in itertools.pairwise(written)]
    assert 0 < max(steps) <= WRITE_LINES_PER_TURN, steps
    summaries = [r for r in records(out.getvalue().splitlines()) if "suppressed" in r]
    assert [r["container"] for r in summaries] == [c.id for c in containers]
    assert all(r["suppressed"] == 1 and r["reason"].endswith("more]") for r in summaries)


def test_a_huge_hostile_line_is_cut_in_c_to_max_line_as_dumps_cuts_it() -> None:
    """What a runtime's JSON and a container's paths can hand the formatter at once: a
    64 KiB container id of control characters (6 bytes each in JSON: 384 KiB), a
    16 KiB reason of quotes and backslashes, an error string: cut to max_line, the same
    text as the Python formatter's, every string marked with what it lost."""
    container = "\x01\x1b" * 32768
    reason = 'mkdirat /guarded/"\\' * 900
    entry = (1765000000.125, Container(container, 4242, peer_uid=2**32 - 1), 2**31 - 1,
             2**64 - 1, "mkdirat", (2**64 - 1,) * 6,
             Outcome(deny(errno.EACCES, reason=reason), "path_guard", "x" * 4000, ""),
             2.5e-5, True)
    for max_line in (4096, 600, 1):
        text = _compiled_formatter()(entry, max_line)
        assert text == _dumps(audit_line(entry), max_line)
        record = json.loads(text)
        assert record["container"].endswith("more]") and record["reason"].endswith("more]")
        assert len(text) <= max(max_line, len(_dumps(audit_line(entry), 1)))
