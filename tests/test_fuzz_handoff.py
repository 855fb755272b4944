"""Hypothesis against the handoff parser, the framing, fd ownership, and the real daemon.

(tests/test_handoff.py has the example-based tests and fuzzes ``parse_state`` on raw
bytes and mutated runc messages; this file adds runtime-shaped messages checked field by
field, chunking invariance of the framing, ``accept_handoff`` with real fds of every
kind, and random connections to a real ``seccomp-supervisor serve`` process.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.errors import HandoffError
from supervisor.handoff import (
    SECCOMP_FD_NAME,
    MessageAssembler,
    PeerCredentials,
    accept_handoff,
    build_state_message,
    parse_state,
)
from supervisor.spawn import FilteredChild

from .conftest import sleeping_target
from .daemon_harness import write_config
from .sockets import rights

PEER = PeerCredentials(pid=1, uid=0, gid=0)
SEED_MESSAGES = [
    build_state_message(pid=4242, container_id="c1", metadata="team=a\nenv=b",
                        bundle="/b", oci_version="1.0.2-dev",
                        annotations={"org.example/k": "v"}),
    json.dumps({"ociVersion": "0.2.0", "fds": ["seccompFd"], "pid": 0, "metadata": "",
                "state": {"ociVersion": "0.2.0", "id": "x", "status": "running", "pid": 0,
                          "bundle": "."}}, indent=4).encode(),
]


# --------------------------------------------------------------------------- parse_state

_text = st.text(max_size=20)
_pid = st.integers(min_value=-3, max_value=2**31 + 3) | st.booleans() | st.none() \
    | st.floats(allow_nan=False) | _text
_names = st.lists(st.sampled_from([SECCOMP_FD_NAME, "logFd", "", "seccompfd"]) | _text,
                  max_size=5)


@st.composite
def runtime_shaped(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A message shaped like runc's or crun's, with any field possibly of a wrong type
    or missing, serialised compactly or pretty-printed."""
    state: dict[str, Any] = {
        "ociVersion": draw(_text), "id": draw(_text), "status": draw(
            st.sampled_from(["creating", "running", "created"]) | _text),
        "pid": draw(_pid), "bundle": draw(_text),
        "annotations": draw(st.dictionaries(_text, _text | _pid, max_size=3)),
    }
    top: dict[str, Any] = {"ociVersion": draw(_text), "fds": draw(_names),
                           "pid": draw(_pid), "metadata": draw(_text | _pid),
                           "state": state}
    for obj in (top, state):
        for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=2)):
            obj.pop(key, None)
    indent = draw(st.sampled_from([None, 4]))
    raw = json.dumps(top, indent=indent, ensure_ascii=draw(st.booleans()))
    return top, raw.encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(runtime_shaped(), st.integers(min_value=0, max_value=4))
def test_parse_accepts_exactly_what_it_reports(shaped: tuple[dict[str, Any], bytes],
                                               fd_count: int) -> None:
    top, raw = shaped
    try:
        state = parse_state(raw, fd_count)
    except HandoffError:
        return
    # Whatever it accepted is what was sent, with the types it promises.
    assert state.fds == tuple(top["fds"]) and len(state.fds) == fd_count
    assert state.fds[state.seccomp_index] == SECCOMP_FD_NAME
    assert type(state.pid) is int and state.pid == top["pid"]
    assert state.metadata == top.get("metadata", "")
    assert state.container_id == top["state"]["id"] != ""
    assert state.status == top["state"]["status"]
    assert state.state_pid == top["state"].get("pid", 0)
    assert dict(state.annotations) == top["state"].get("annotations", {})
    container = state.to_container()
    assert container.id == state.container_id and container.pid == state.pid


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=20))
def test_parse_on_any_bytes_raises_only_handoff_error(data: bytes, fd_count: int) -> None:
    with contextlib.suppress(HandoffError):
        parse_state(data, fd_count)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=3000))
def test_deep_nesting_is_a_handoff_error(depth: int) -> None:
    with contextlib.suppress(HandoffError):
        parse_state(b'{"a":' * depth + b"1" + b"}" * depth, 1)


# --------------------------------------------------------------------------- framing


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEED_MESSAGES) | st.binary(max_size=300), st.binary(max_size=40),
       st.data())
def test_framing_does_not_depend_on_how_bytes_are_split(head: bytes, tail: bytes,
                                                       data: st.DataObject) -> None:
    """After every chunk, ``complete`` is what feeding everything so far at once says."""
    stream = head + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunked = MessageAssembler()
    start = 0
    for cut in [*cuts, len(stream)]:
        whole = MessageAssembler()
        whole.feed(stream[:cut])
        assert chunked.feed(stream[start:cut]) == whole.complete
        start = cut
    assert chunked.data == stream


# --------------------------------------------------------------------------- fd ownership


@pytest.fixture(scope="module")
def sleeper() -> Iterator[FilteredChild]:
    """conftest's ``sleeper``, once for the module: Hypothesis runs many examples."""
    with sleeping_target(120) as child:
        yield child


def _open_kind(kind: str, listener: int) -> int:
    if kind == "listener":
        return os.dup(listener)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(r)
        return w
    if kind == "memfd":
        return os.memfd_create("fuzz")
    if kind == "socket":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
    if kind == "eventfd":
        return os.eventfd(0)
    return os.open("/dev/null", os.O_RDONLY)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_kinds = st.lists(st.sampled_from(["listener", "pipe", "memfd", "socket", "eventfd",
                                   "null"]), max_size=6)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=_kinds, names=st.none() | _names,
       base=st.sampled_from(SEED_MESSAGES) | st.binary(max_size=100))
def test_accept_handoff_closes_every_fd_it_does_not_return(
        sleeper: FilteredChild, kinds: list[str], names: list[str] | None,
        base: bytes) -> None:
    data = base
    if names is not None and base in SEED_MESSAGES:
        top = json.loads(base)
        top["fds"] = names
        data = json.dumps(top).encode()
    fds = [_open_kind(kind, sleeper.listener_fd) for kind in kinds]
    kept = -1
    try:
        handoff = accept_handoff(data, fds, PEER)
    except HandoffError:
        pass
    else:
        kept = handoff.notify_fd
        assert kinds[handoff.state.seccomp_index] == "listener"
        assert os.readlink(f"/proc/self/fd/{kept}") == "anon_inode:seccomp notify"
        handoff.close()
    # A returned fd number may have been reused by nothing else in between: check all.
    assert [fd for fd in fds if _is_open(fd)] == []


# --------------------------------------------------------------------------- real daemon


class ServeProcess:
    def __init__(self, tmp: Path) -> None:
        config = write_config(tmp, "[listen]\n"
                              f'socket = "{tmp}/sock/notify.sock"\n'
                              "handoff_timeout = 0.2\n"
                              "[defaults]\npolicies = []\n")
        self.socket = f"{tmp}/sock/notify.sock"
        self.log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        # Ready, not only listening: the socket accepts connections while the daemon is
        # still loading (it binds first), and its fd count settles only once it is ready.
        pid_file = tmp / "serve.pid"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(config),
             "--pid-file", str(pid_file)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not pid_file.exists():
            assert self.proc.poll() is None, (tmp / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not get ready"
            time.sleep(0.02)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fd_count(self, expected: int, timeout: float = 2.0) -> int:
        deadline = time.monotonic() + timeout
        while (count := self.fd_count()) != expected and time.monotonic() < deadline:
            time.sleep(0.005)
        return count

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = ServeProcess(tmp_path_factory.mktemp("fuzz-serve"))
    try:
        yield server
    finally:
        server.stop()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000) | st.sampled_from(SEED_MESSAGES).flatmap(
           lambda m: st.integers(0, len(m)).map(lambda cut: m[:cut])),
       kinds=st.lists(st.sampled_from(["pipe", "memfd", "socket", "eventfd", "null"]),
                      max_size=20),
       split=st.integers(0, 3000), shutdown=st.sampled_from([True, True, True, False]))
def test_random_connections_leave_the_serving_daemon_unchanged(
        serve_process: ServeProcess, data: bytes, kinds: list[str], split: int,
        shutdown: bool) -> None:
    """Random bytes and any number of non-listener fds, in one or two sendmsg calls:
    the daemon hangs up, closes everything, keeps serving."""
    before = serve_process.fd_count()
    fds = [_open_kind(kind, -1) for kind in kinds]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(serve_process.socket)
            try:
                first, rest = data[:split], data[split:]
                sock.sendmsg([first], rights(fds))
                if rest:
                    sock.sendall(rest)
                if shutdown:
                    sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass
    finally:
        for fd in fds:
            os.close(fd)
    assert serve_process.proc.poll() is None
    assert serve_process.settled_fd_count(before) == before
