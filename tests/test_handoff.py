"""The runtime protocol core: parsing, building, framing, and taking ownership of fds."""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.errors import HandoffError
from supervisor.handoff import (
    BadFdError,
    Handoff,
    MessageAssembler,
    PeerCredentials,
    accept_handoff,
    build_state_message,
    parse_state,
)
from supervisor.spawn import FilteredChild

from .sockets import fd_count

# Sent by runc 1.1.5 (Debian 1.1.5+ds1) for `runc run capt1` with listenerMetadata
# "team=build\nenv=ci" and two annotations; captured on this machine.
RUNC_MESSAGE = (
    b'{"ociVersion":"1.0.2-dev","fds":["seccompFd"],"pid":3934,'
    b'"metadata":"team=build\\nenv=ci","state":{"ociVersion":"1.0.2-dev","id":"capt1",'
    b'"status":"creating","pid":3934,"bundle":"/tmp/cap/bundle","annotations":'
    b'{"b\\u003c\\u0026\\u003e":"x","org.example/a":"1"}}}'
)
# What crun 1.8 writes (yajl, same fields, its own version string).
CRUN_MESSAGE = (
    b'{"ociVersion":"0.2.0","fds":["seccompFd"],"pid":4242,"metadata":"team=db",'
    b'"state":{"ociVersion":"0.2.0","id":"db-1","status":"creating","pid":4242,'
    b'"bundle":"/run/bundles/db-1"}}'
)
PEER = PeerCredentials(pid=1, uid=0, gid=0)


def message(**changes: Any) -> bytes:
    """A valid runc-style message with top-level keys (or ``state.KEY``) changed;
    a value of ``...`` removes the key."""
    top: dict[str, Any] = json.loads(RUNC_MESSAGE)
    for key, value in changes.items():
        target, name = (top.get("state"), key[6:]) if key.startswith("state_") else (top, key)
        if not isinstance(target, dict):
            continue
        if value is ...:
            target.pop(name, None)
        else:
            target[name] = value
    return json.dumps(top).encode()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


# --------------------------------------------------------------------------- parse_state


def test_runc_message() -> None:
    state = parse_state(RUNC_MESSAGE, 1)
    assert state.oci_version == "1.0.2-dev"
    assert state.fds == ("seccompFd",)
    assert state.seccomp_index == 0
    assert state.pid == state.state_pid == 3934
    assert state.metadata == "team=build\nenv=ci"
    assert state.container_id == "capt1"
    assert state.status == "creating"
    assert state.bundle == "/tmp/cap/bundle"
    assert dict(state.annotations) == {"b<&>": "x", "org.example/a": "1"}


def test_crun_message() -> None:
    state = parse_state(CRUN_MESSAGE, 1)
    assert state.oci_version == "0.2.0"
    assert state.container_id == "db-1"
    assert state.pid == 4242
    assert dict(state.annotations) == {}


def test_container_from_state() -> None:
    container = parse_state(RUNC_MESSAGE, 1).to_container()
    assert container.id == "capt1"
    assert container.pid == 3934
    assert container.metadata == "team=build\nenv=ci"
    assert dict(container.labels) == {"team": "build", "env": "ci"}
    assert dict(container.annotations) == {"b<&>": "x", "org.example/a": "1"}
    assert container.bundle == "/tmp/cap/bundle"
    assert container.status == "creating"
    assert container.runtime_version == "1.0.2-dev"


def test_optional_fields_may_be_absent() -> None:
    state = parse_state(message(metadata=..., state_pid=..., state_annotations=...), 1)
    assert state.metadata == ""
    assert state.state_pid == 0
    assert dict(state.annotations) == {}


def test_seccomp_fd_found_by_name() -> None:
    state = parse_state(message(fds=["pidFd", "seccompFd", "other"]), 3)
    assert state.seccomp_index == 1
    assert state.fds == ("pidFd", "seccompFd", "other")


def test_unknown_keys_are_ignored() -> None:
    assert parse_state(message(fdIndexes={"seccompFd": 0}, extra=[1, 2]), 1).pid == 3934


@pytest.mark.parametrize(
    ("data", "fd_count", "reason"),
    [
        (b"", 1, "not JSON"),
        (b"\xff\xfe{}", 1, "not UTF-8"),
        (b"garbage", 1, "not JSON"),
        (b"[]", 1, "not a JSON object"),
        (b'"seccompFd"', 1, "not a JSON object"),
        (b"null", 1, "not a JSON object"),
        (RUNC_MESSAGE + b"x", 1, "not JSON"),
        (RUNC_MESSAGE[:-1], 1, "not JSON"),
        (RUNC_MESSAGE, 0, "arrived"),
        (RUNC_MESSAGE, 2, "arrived"),
        (message(fds=...), 1, "fds: missing"),
        (message(fds="seccompFd"), 1, "fds: expected an array"),
        (message(fds=[0]), 1, "fds[0]"),
        (message(fds=[]), 0, "exactly once"),
        (message(fds=["pidFd"]), 1, "exactly once"),
        (message(fds=["seccompFd", "seccompFd"]), 2, "exactly once"),
        (message(ociVersion=...), 1, "ociVersion: missing"),
        (message(ociVersion=1), 1, "ociVersion: expected a string"),
        (message(ociVersion=""), 1, "ociVersion: empty"),
        (message(pid=...), 1, "pid: missing"),
        (message(pid="3934"), 1, "pid: expected an integer"),
        (message(pid=True), 1, "pid: expected an integer"),
        (message(pid=3934.0), 1, "pid: expected an integer"),
        (message(pid=-1), 1, "not a pid"),
        (message(pid=2**31), 1, "not a pid"),
        (message(metadata=None), 1, "metadata: expected a string"),
        (message(metadata=["a=b"]), 1, "metadata: expected a string"),
        (message(state=...), 1, "state: missing"),
        (message(state=[]), 1, "state: expected an object"),
        (message(state_id=...), 1, "state.id: missing"),
        (message(state_id=""), 1, "state.id: empty"),
        (message(state_id=7), 1, "state.id: expected a string"),
        (message(state_ociVersion=...), 1, "state.ociVersion: missing"),
        (message(state_status=None), 1, "state.status: expected a string"),
        (message(state_pid=False), 1, "state.pid: expected an integer"),
        (message(state_pid=-5), 1, "not a pid"),
        (message(state_bundle=...), 1, "state.bundle: missing"),
        (message(state_annotations=None), 1, "state.annotations: expected an object"),
        (message(state_annotations=["a"]), 1, "state.annotations: expected an object"),
        (message(state_annotations={"a": 1}), 1, "state.annotations['a']"),
        (b'{"pid": 1, "pid": 2}', 1, "appears twice"),
        (b'{"pid": NaN}', 1, "NaN"),
        (b'{"pid": Infinity}', 1, "Infinity"),
        (b'{"pid": ' + b"9" * 5000 + b"}", 1, "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 1, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 1, "nested too deeply"),
    ],
)
def test_invalid_messages(data: bytes, fd_count: int, reason: str) -> None:
    with pytest.raises(HandoffError) as info:
        parse_state(data, fd_count)
    assert type(info.value) is HandoffError
    assert reason in str(info.value)


def test_duplicate_keys_in_state_refused() -> None:
    data = RUNC_MESSAGE.replace(b'"id":"capt1"', b'"id":"capt1","id":"other"')
    with pytest.raises(HandoffError, match="appears twice"):
        parse_state(data, 1)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_handoff_error(data: bytes) -> None:
    try:
        parse_state(data, 1)
    except HandoffError:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_fields = st.sampled_from(["ociVersion", "fds", "pid", "metadata", "state", "state_id",
                           "state_status", "state_pid", "state_bundle", "state_annotations",
                           "state_ociVersion"])


@settings(max_examples=500)
@given(st.dictionaries(_fields, _json_values | st.just(...), max_size=4),
       st.integers(min_value=0, max_value=3))
def test_mutated_messages_only_raise_handoff_error(changes: dict[str, Any],
                                                   fd_count: int) -> None:
    try:
        state = parse_state(message(**changes), fd_count)
    except HandoffError:
        return
    assert len(state.fds) == fd_count
    assert state.fds[state.seccomp_index] == "seccompFd"
    assert isinstance(state.container_id, str) and state.container_id
    state.to_container()


@settings(max_examples=300)
@given(_json_values, st.integers(min_value=0, max_value=3))
def test_random_json_only_raises_handoff_error(value: object, fd_count: int) -> None:
    try:
        parse_state(json.dumps(value).encode(), fd_count)
    except HandoffError:
        pass


# --------------------------------------------------------------------------- building


def test_build_matches_runc_byte_for_byte() -> None:
    built = build_state_message(
        pid=3934, container_id="capt1", metadata="team=build\nenv=ci",
        bundle="/tmp/cap/bundle", oci_version="1.0.2-dev",
        annotations={"org.example/a": "1", "b<&>": "x"},
    )
    assert built == RUNC_MESSAGE


def test_build_omits_empty_fields() -> None:
    built = build_state_message(pid=0, container_id="c", bundle="/b")
    assert built == (b'{"ociVersion":"1.0.2","fds":["seccompFd"],"pid":0,"state":'
                     b'{"ociVersion":"1.0.2","id":"c","status":"creating","bundle":"/b"}}')


def test_build_replaces_invalid_utf8() -> None:
    metadata = b"k=\xff\xfe".decode("utf-8", "surrogateescape")
    built = build_state_message(pid=5, container_id="c\u2028", metadata=metadata, bundle="/")
    assert b"\\u2028" in built
    assert parse_state(built, 1).metadata == "k=\ufffd\ufffd"


@given(pid=st.integers(min_value=0, max_value=2**31 - 1),
       container_id=st.text(min_size=1, max_size=20),
       metadata=st.text(max_size=30), bundle=st.text(max_size=20),
       status=st.sampled_from(["creating", "running"]),
       annotations=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_build_then_parse(pid: int, container_id: str, metadata: str, bundle: str,
                          status: str, annotations: dict[str, str]) -> None:
    def go(text: str) -> str:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)

    built = build_state_message(pid=pid, container_id=container_id, metadata=metadata,
                                bundle=bundle, status=status, annotations=annotations)
    state = parse_state(built, 1)
    assert (state.pid, state.state_pid) == (pid, pid)
    assert state.container_id == go(container_id)
    assert state.metadata == go(metadata)
    assert state.bundle == go(bundle)
    assert state.status == status
    assert dict(state.annotations) == {go(k): go(v) for k, v in sorted(annotations.items())}
    assembler = MessageAssembler()
    assert assembler.feed(built)


# --------------------------------------------------------------------------- framing


def test_assembler_completes_on_the_last_byte() -> None:
    assembler = MessageAssembler()
    for i in range(len(RUNC_MESSAGE)):
        assert not assembler.complete
        assembler.feed(RUNC_MESSAGE[i:i + 1])
    assert assembler.complete
    assert assembler.data == RUNC_MESSAGE


def test_assembler_ignores_braces_in_strings() -> None:
    assembler = MessageAssembler()
    assert not assembler.feed(b'  \n{"a": "}\\"}\\\\", "b": {"c": "{"')
    assert not assembler.feed(b"}")
    assert assembler.feed(b"}")


def test_assembler_escape_split_across_chunks() -> None:
    assembler = MessageAssembler()
    assert not assembler.feed(b'{"a": "\\')
    assert not assembler.feed(b'"}')
    assert assembler.feed(b'"}')


@pytest.mark.parametrize("data", [b"[1]", b'"x"', b"  7", b"\xff"])
def test_assembler_non_object_is_complete_at_once(data: bytes) -> None:
    assembler = MessageAssembler()
    assert assembler.feed(data)


def test_assembler_blank_is_incomplete() -> None:
    assembler = MessageAssembler()
    assert not assembler.feed(b" \t\r\n")
    assert len(assembler) == 4


@given(_json_values.map(lambda v: {"v": v}), st.data())
def test_assembler_finds_the_end_of_any_object(value: dict[str, Any],
                                               data: st.DataObject) -> None:
    text = json.dumps(value, ensure_ascii=data.draw(st.booleans()))
    encoded = text.encode("utf-8", "surrogatepass")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=8)))
    assembler = MessageAssembler()
    start = 0
    for cut in [*cuts, len(encoded)]:
        assert assembler.feed(encoded[start:cut]) == (cut == len(encoded))
        start = cut
    assert assembler.data == encoded


# --------------------------------------------------------------------------- accept_handoff


def test_accept_keeps_only_the_listener(sleeper: FilteredChild) -> None:
    baseline = fd_count()
    extra_r, extra_w = os.pipe()
    listener = sleeper.take_listener()
    data = message(pid=sleeper.pid, fds=["pidFd", "seccompFd", "log"])
    handoff = accept_handoff(data, [extra_r, listener, extra_w], PEER)
    try:
        assert handoff.notify_fd == listener
        assert os.readlink(f"/proc/self/fd/{listener}") == "anon_inode:seccomp notify"
        assert not is_open(extra_r)
        assert not is_open(extra_w)
        assert handoff.state.pid == sleeper.pid
        assert handoff.container.id == "capt1"
        assert handoff.peer == PEER
    finally:
        handoff.close()
    assert not is_open(listener)
    assert fd_count() == baseline - 1  # the listener taken from the child


def _other_fds() -> list[tuple[str, int]]:
    r, w = os.pipe()
    os.close(w)
    a, b = socket.socketpair()
    b.close()
    return [("pipe", r), ("memfd", os.memfd_create("x")), ("socket", a.detach()),
            ("file", os.open("/dev/null", os.O_RDONLY))]


@pytest.mark.parametrize("kind", ["pipe", "memfd", "socket", "file"])
def test_wrong_fd_type_is_refused_and_closed(kind: str) -> None:
    baseline = fd_count()
    candidates = _other_fds()
    fd = dict(candidates)[kind]
    for name, other in candidates:
        if name != kind:
            os.close(other)
    with pytest.raises(BadFdError, match="not a seccomp listener"):
        accept_handoff(RUNC_MESSAGE, [fd], PEER)
    assert not is_open(fd)
    assert fd_count() == baseline


def test_invalid_message_closes_every_fd(sleeper: FilteredChild) -> None:
    listener = sleeper.take_listener()
    r, w = os.pipe()
    baseline = fd_count() - 3
    with pytest.raises(HandoffError):
        accept_handoff(b'{"not": "a state"}', [listener, r, w], PEER)
    assert not any(is_open(fd) for fd in (listener, r, w))
    assert fd_count() == baseline


def test_fd_count_mismatch_closes_every_fd(sleeper: FilteredChild) -> None:
    listener = sleeper.take_listener()
    r, w = os.pipe()
    with pytest.raises(HandoffError, match="arrived"):
        accept_handoff(RUNC_MESSAGE, [listener, r, w], PEER)
    assert not any(is_open(fd) for fd in (listener, r, w))


def test_no_fds_at_all() -> None:
    with pytest.raises(HandoffError, match="arrived"):
        accept_handoff(RUNC_MESSAGE, [], PEER)


def test_handoff_take_and_close(sleeper: FilteredChild) -> None:
    listener = sleeper.take_listener()
    handoff = accept_handoff(RUNC_MESSAGE, [listener], PEER)
    assert isinstance(handoff, Handoff)
    fd = handoff.take_fd()
    assert fd == listener and handoff.notify_fd == -1
    handoff.close()  # no longer the owner: does nothing
    assert is_open(fd)
    with pytest.raises(ValueError, match="already taken"):
        handoff.take_fd()
    os.close(fd)


def test_handoff_context_manager_closes(sleeper: FilteredChild) -> None:
    listener = sleeper.take_listener()
    with accept_handoff(RUNC_MESSAGE, [listener], PEER) as handoff:
        assert handoff.notify_fd == listener
    assert handoff.notify_fd == -1
    assert not is_open(listener)
    handoff.close()
