"""The public policy API and the pure decision rules (no kernel needed)."""

from __future__ import annotations

import errno
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import supervisor.policy
from supervisor import abi, accel, bpf
from supervisor.decide import Chain, check_result
from supervisor.policy import (
    Decision,
    PolicyError,
    PolicySet,
    allow,
    deny,
    inject_fd,
    normalised_path,
    parse_decision,
    response_fields,
    returns,
)


def test_exported_names_are_pinned() -> None:
    assert sorted(supervisor.policy.__all__) == [
        "Container", "Decision", "Notification", "PolicyError", "PolicySet",
        "TargetMemoryError", "allow", "deny", "inject_fd", "normalised_path", "returns",
    ]
    for name in supervisor.policy.__all__:
        assert hasattr(supervisor.policy, name)


@pytest.mark.parametrize("bad", [0, -1, -13, 512, 4095, True, 1.0, "EPERM"])
def test_deny_refuses_errno_outside_1_to_511(bad: object) -> None:
    with pytest.raises(ValueError):
        deny(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", [1, errno.EPERM, errno.ENOSYS, 511])
def test_deny_accepts_real_errnos(good: int) -> None:
    assert deny(good).errno == good


@pytest.mark.parametrize("bad", [-1, -4095, -22, 2**63, -(2**63) - 1, False])
def test_returns_refuses_error_range_and_overflow(bad: int) -> None:
    with pytest.raises(ValueError):
        returns(bad)


@pytest.mark.parametrize("good", [0, 1, -4096, 2**63 - 1, -(2**63)])
def test_returns_accepts_values(good: int) -> None:
    assert returns(good).value == good


def test_inject_fd_refuses_negative_fd() -> None:
    with pytest.raises(ValueError):
        inject_fd(-1)


def test_response_encoding_uses_negative_errno() -> None:
    assert response_fields(deny(errno.EPERM)) == (0, -errno.EPERM, 0)
    assert response_fields(returns(9)) == (9, 0, 0)
    assert response_fields(allow()) == (0, 0, abi.USER_NOTIF_FLAG_CONTINUE)
    with pytest.raises(ValueError):
        response_fields(inject_fd(3))


@pytest.mark.parametrize(("text", "expected"), [
    ("deny:EPERM", deny(errno.EPERM)),
    ("deny:enosys", deny(errno.ENOSYS)),
    ("deny:13", deny(13)),
    ("returns:0", returns(0)),
    ("returns:0x10", returns(16)),
    ("allow", allow()),
])
def test_parse_decision(text: str, expected: Decision) -> None:
    got = parse_decision(text)
    assert (got.kind, got.errno, got.value) == (expected.kind, expected.errno, expected.value)


@pytest.mark.parametrize("bad", ["deny", "deny:EWHAT", "deny:0", "deny:600", "returns:-1",
                                 "returns:x", "continue", "allow:1", ""])
def test_parse_decision_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_decision(bad)


def test_unknown_syscall_name_is_refused_at_registration() -> None:
    policy = PolicySet("p")
    with pytest.raises(PolicyError, match="unknown system call 'mkdri'"):
        policy.on("mkdri")(lambda n: None)


def test_second_handler_for_a_syscall_is_refused() -> None:
    policy = PolicySet("p")
    policy.on("mkdir")(lambda n: None)
    with pytest.raises(PolicyError, match="already handled"):
        policy.on("mkdir", "rmdir")(lambda n: None)


def test_options_are_checked_against_defaults() -> None:
    policy = PolicySet("p", defaults={"limit": 3, "strict": False, "ratio": 0.5})
    policy.apply_options({"limit": 5, "ratio": 1})
    assert dict(policy.options) == {"limit": 5, "strict": False, "ratio": 1}
    with pytest.raises(ValueError, match=r"options\.bogus: unknown option"):
        policy.apply_options({"bogus": 1})
    with pytest.raises(ValueError, match=r"options\.strict: expected bool, got int"):
        policy.apply_options({"strict": 1})
    with pytest.raises(ValueError, match=r"options\.limit: expected int, got bool"):
        policy.apply_options({"limit": True})


def test_check_result_rules() -> None:
    assert check_result(None, "p", read_memory=True) is None
    assert check_result(allow(), "p", read_memory=False) == allow()
    assert check_result(allow(unchecked=True), "p", read_memory=True).unchecked
    assert check_result(deny(1), "p", read_memory=True) == deny(1)
    with pytest.raises(PolicyError, match="after reading target memory"):
        check_result(allow(), "p", read_memory=True)
    with pytest.raises(PolicyError, match="not a Decision"):
        check_result(1, "p", read_memory=False)


def test_chain_orders_handlers_by_policy() -> None:
    a, b = PolicySet("a"), PolicySet("b")
    a.on("mkdir")(lambda n: None)
    b.on("mkdir", "getppid")(lambda n: None)

    async def later(n: object) -> None:
        return None

    a.on("getppid")(later)
    chain = Chain([("first", a), ("second", b)])
    assert [link.policy for link in chain.links("mkdir")] == ["first", "second"]
    assert [link.is_async for link in chain.links("getppid")] == [True, False]
    assert chain.links("rmdir") == ()
    assert chain.syscalls == {"mkdir", "getppid"}


def test_struct_layouts_match_the_running_kernel() -> None:
    assert bpf.notif_sizes() == (abi.NOTIF_SIZE, abi.NOTIF_RESP_SIZE, abi.SECCOMP_DATA_SIZE)
    bpf.check_kernel_abi()


def test_notification_roundtrip() -> None:
    raw = abi.RawNotification(2**64 - 1, 42, 0, 83, abi.AUDIT_ARCH_X86_64, 0x1000,
                              (1, 2, 3, 4, 5, 2**64 - 1))
    assert abi.unpack_notification(abi.pack_notification(raw)) == raw


def test_the_hot_loops_partial_unpack_reads_the_same_fields() -> None:
    """NotifyFd.recv() unpacks only id, pid, nr, arch and args, at their own offsets."""
    raw = abi.RawNotification(2**64 - 2, 4242, 0xFFFFFFFF, -7, abi.AUDIT_ARCH_I386,
                              2**64 - 3, (11, 12, 13, 14, 15, 2**64 - 1))
    buf = abi.pack_notification(raw)
    assert abi.NOTIF_HEAD.size + 8 == abi.NOTIF_ARGS_OFFSET  # then the 8-byte ip
    assert abi.NOTIF_ARGS_OFFSET + abi.NOTIF_ARGS.size == abi.NOTIF_SIZE
    assert abi.NOTIF_HEAD.unpack_from(buf) == (raw.id, raw.pid, raw.nr, raw.arch)
    assert abi.NOTIF_ARGS.unpack_from(buf, abi.NOTIF_ARGS_OFFSET) == raw.args


def test_answers_with_long_reasons_are_not_kept_in_the_shared_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """deny(), returns() and allow() keep up to _CACHE_MAX answers by reason, for the
    whole daemon's life. A reason naming what a container chose (a path: up to 16 KiB
    escaped) would keep megabytes per 4,096 calls: only short reasons are kept."""
    # Empty caches: earlier tests of the same process may have filled them (then
    # nothing more is kept, short reasons included).
    for cache in ("_DENY", "_RETURNS", "_ALLOW"):
        monkeypatch.setattr(supervisor.policy, cache, {})
    long = "p" * 5000
    assert deny(errno.EACCES, reason=long) is not deny(errno.EACCES, reason=long)
    assert deny(errno.EACCES, reason=long) == deny(errno.EACCES, reason=long)
    assert returns(1, reason=long) is not returns(1, reason=long)
    assert allow(reason=long) is not allow(reason=long)
    short = "p" * 100
    assert deny(errno.EACCES, reason=short) is deny(errno.EACCES, reason=short)
    assert returns(1, reason=short) is returns(1, reason=short)
    assert allow(reason=short, unchecked=True) is allow(reason=short, unchecked=True)


# Bytes that decide whether a path is normal, and others: NUL, non-ASCII, a letter.
_path_bytes = st.lists(st.sampled_from([b"/", b".", b"a", b"\0", b"\xff", b"//", b"/."]),
                       max_size=40).map(b"".join)


@given(path=_path_bytes)
@settings(max_examples=2000, deadline=None)
def test_normalised_path_is_what_normpath_gives_with_either_twin(path: bytes) -> None:
    """normalised_path() skips normpath for a path that is normal already, and finds
    that with memchr in the compiled loop (_hotloop.plain_path) or with two substring
    searches in pure Python: both twins give the same verdict, and the result is
    normpath's for every absolute path (a leading "//" made "/"), the path itself when
    normal. A test that compiled twin found every path plain would fail here."""
    assert accel.HOTLOOP is not None, f"the compiled hot loop is not built: {accel.WHY}"
    plain = supervisor.policy._plain_path(path)
    assert accel.HOTLOOP.plain_path(path) is plain
    path = b"/" + path
    expected = b"/" + posixpath.normpath(path).lstrip(b"/")
    plain = supervisor.policy._plain_path(path)
    assert accel.HOTLOOP.plain_path(path) is plain
    assert normalised_path(path) == expected
    if plain:
        assert expected == path
        assert normalised_path(path) is path


def test_normalised_path_refuses_what_is_not_an_absolute_path() -> None:
    """A relative path has no lexical normal form without its base; a str (or any
    other type) is refused by name, not answered "not an absolute path"."""
    for path in (b"", b"a/b", b"./a", b"\0/"):
        with pytest.raises(ValueError, match="not an absolute path"):
            normalised_path(path)
    for wrong in ("/a", bytearray(b"/a"), memoryview(b"/a"), None):
        with pytest.raises(TypeError, match="needs bytes"):
            normalised_path(wrong)  # type: ignore[arg-type]
    assert accel.HOTLOOP is not None
    with pytest.raises(TypeError, match="needs bytes"):
        accel.HOTLOOP.plain_path("/a")
    assert normalised_path(b"/") == b"/"
    assert normalised_path(b"//") == b"/"
    assert normalised_path(b"/a/./b/../c/") == b"/a/c"


@pytest.mark.parametrize("path", [
    b"/" * 4095, b"/" + b"./" * 2047, b"/" + b"../" * 1364, b"/a" * 2047 + b"/",
    b"/" + b"a" * 4094, b"/" + b"\xff\x00." * 1364, b"/.." + b"/a" * 2046,
])
def test_normalised_path_takes_the_longest_hostile_paths_a_read_gives(path: bytes) -> None:
    """Paths of up to 4,095 bytes (all a declared read returns) made of nothing but
    slashes, dots, `..` or bytes that are no text: both twins give normpath's result."""
    assert len(path) <= 4095
    expected = b"/" + posixpath.normpath(path).lstrip(b"/")
    assert normalised_path(path) == expected
    assert accel.HOTLOOP is not None
    assert accel.HOTLOOP.plain_path(path) is supervisor.policy._plain_path(path)
