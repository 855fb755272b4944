"""Learn mode by annotation: ``io.containers.trace-syscall`` (podman's OCI hook
convention) routes a container to a recording policy that writes the profile named in the
annotation, merged into its base profile."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.learn import known_syscalls
from supervisor.policy import Container
from supervisor.profile import Action, check_profile, load_profile
from supervisor.router import (
    TRACE_ANNOTATION,
    TraceAnnotationError,
    TraceRequest,
    parse_trace_annotation,
    trace_request,
)

from .daemon_harness import running_daemon

ROOT = Path(__file__).resolve().parent.parent

# --- parsing, as the hook does (pure) -------------------------------------------------------


@pytest.mark.parametrize(("value", "request_"), [
    ("of:/out.json", TraceRequest("/out.json")),
    ("of:/a/out.json;if:/b/in.json", TraceRequest("/a/out.json", "/b/in.json")),
    ("if:/b/in.json;of:/a/out.json", TraceRequest("/a/out.json", "/b/in.json")),
    ("of: /a/out.json ;if:\t/b/in.json ", TraceRequest("/a/out.json", "/b/in.json")),
])
def test_valid_annotations(value: str, request_: TraceRequest) -> None:
    assert parse_trace_annotation(value) == request_


@pytest.mark.parametrize(("value", "message"), [
    ("of:/a.json;if:/b.json;if:/c.json", "more than one ';'"),
    ("/a.json", "'/a.json' must start with 'of:' (output file) or 'if:' (input profile)"),
    (" of:/a.json", "must start with 'of:'"),
    ("OF:/a.json", "must start with 'of:'"),
    ("of:a.json", "the output file path must be absolute: 'a.json'"),
    ("of:/a.json;if:b.json", "the input profile path must be absolute: 'b.json'"),
    ("of:", "the output file path must be absolute: ''"),
    ("if:/b.json", "an output file ('of:') is required"),
    ("", "must start with 'of:'"),
    ("of:/a.json;of:/b.json", "output file ('of:') given twice"),
    ("of:/x/../etc/cron.d/a", "contains '..' or NUL"),
])
def test_invalid_annotations(value: str, message: str) -> None:
    with pytest.raises(TraceAnnotationError) as info:
        parse_trace_annotation(value)
    assert message in str(info.value)


def test_trace_request_reads_the_annotation() -> None:
    assert trace_request(Container("c")) is None
    assert trace_request(Container("c", annotations={"other": "of:/x"})) is None
    annotated = Container("c", annotations={TRACE_ANNOTATION: "of:/x.json"})
    assert trace_request(annotated) == TraceRequest("/x.json")
    with pytest.raises(TraceAnnotationError):
        trace_request(Container("c", annotations={TRACE_ANNOTATION: "x.json"}))


# --- the route in the daemon ------------------------------------------------------------------

CONFIG = f"""
[trace_annotation]
enabled = true

[defaults]
policies = ["hardening"]

[[policy]]
name = "hardening"
path = "{ROOT}/policies/hardening.py"

[[policy]]
name = "learn"
path = "{ROOT}/policies/learn.py"
options = {{ directory = "{{tmp}}/learned" }}
"""
NO_LEARN = CONFIG.split("[[policy]]\nname = \"learn\"")[0]

BASE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
    ],
}


def annotated(value: str) -> Container:
    return Container("traced-1", annotations={TRACE_ANNOTATION: value}, peer_uid=0)


async def test_route_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(BASE))
    allow_base = tmp_path / "allow.json"
    allow_base.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    out = f"{tmp_path}/learned/sub/out.json"
    async with running_daemon(tmp_path, CONFIG) as d:
        route = d.daemon._trace_route
        got = route(annotated(f"of:{out};if:{base}"))
        assert got is not None
        chain, choice = got
        assert chain.names == choice.policies == ("trace-syscall",)
        assert choice.mode == "enforce"
        assert "mkdirat" in chain.syscalls and "write" not in chain.syscalls
        assert route(Container("plain")) is None
        refused = {
            "of:x.json": "the output file path must be absolute",
            f"of:{tmp_path}/elsewhere.json": "is outside the learn policy's directory",
            f"of:{tmp_path}/learned": "is outside the learn policy's directory",
            f"of:{out};if:{tmp_path}/missing.json": "cannot read the profile",
            f"of:{out};if:{allow_base}": "a base for learn mode must deny by default",
        }
        for value, reason in refused.items():
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="supervisor.daemon"):
                assert route(annotated(value)) is None
            [record] = caplog.records
            assert record.getMessage().startswith(
                f"container traced-1: annotation {TRACE_ANNOTATION} ignored, routed as "
                "usual: ")
            assert reason in record.getMessage()
    (tmp_path / "n").mkdir()
    async with running_daemon(tmp_path / "n", NO_LEARN) as d:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="supervisor.daemon"):
            assert d.daemon._trace_route(annotated(f"of:{out}")) is None
        assert "no policy named 'learn' is configured" in caplog.text


async def test_output_whose_directory_escapes_by_symlink_is_not_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "learned").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "learned" / "link").symlink_to(outside)
    async with running_daemon(tmp_path, CONFIG) as d:
        got = d.daemon._trace_route(annotated(f"of:{tmp_path}/learned/link/out.json"))
        assert got is not None
        chain, _ = got
        with caplog.at_level(logging.ERROR, logger="supervisor.daemon"):
            for _name, policy in chain.policies:
                policy.session_ended(annotated(""))
    assert list(outside.iterdir()) == []
    assert "outside" in caplog.text and "not writing" in caplog.text


# --- runc --------------------------------------------------------------------------------------


async def wait_for(path: Path) -> None:
    with trio.fail_after(10):
        while not await trio.Path(path).exists():
            await trio.sleep(0.02)


def allowed(profile: Any) -> set[str]:
    return {name for rule in profile.syscalls if rule.action == Action.ALLOW and not rule.args
            for name in rule.names}


@pytest.mark.parametrize("runtime", ["runc", "crun"])
async def test_container_annotated_for_tracing_writes_its_profile(
        tmp_path: Path, runtime: Any) -> None:
    """runc and crun send the config's annotations in the state (no need to read the
    bundle's config.json); the daemon routes the container to learn mode, writes the
    profile named in the annotation on exit, merged into the base (whose rules win), and
    the runtime then runs the same command under it."""
    from .runtime import container, oci_config, unique_id

    base = tmp_path / "base.json"
    base.write_text(json.dumps(BASE))
    out = tmp_path / "learned" / "web.json"
    names = sorted(known_syscalls() - {"write"})
    script = "ls -l / >/dev/null && mkdir /tmp/x && echo listed"
    async with running_daemon(tmp_path, CONFIG) as d:
        config = oci_config(["sh", "-c", script], notify=names, listener_path=d.socket_path,
                            annotations={TRACE_ANNOTATION: f"of:{out};if:{base}"})
        bundle = tmp_path / "learning"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container(runtime, bundle, unique_id("trace-ann")) as c:
            done = await c.run()
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"listed\n"  # learning answers CONTINUE: mkdir ran
        await wait_for(out)
        # The normal chain (hardening) never saw it; nothing went to the learn policy's
        # own directory file either.
        assert [p.name for p in (tmp_path / "learned").iterdir()] == ["web.json"]
    learned = load_profile(out)
    assert learned.default_action == Action.ERRNO
    assert {"execve", "getdents64", "newfstatat"} <= allowed(learned)
    if runtime == "runc":  # runc's init (Go) runs under the filter before its execve
        assert "epoll_ctl" in allowed(learned)
    # The base's rules are kept and win over what was seen.
    assert learned.syscalls[1:] == load_profile(base).syscalls
    assert not {"mkdir", "mkdirat"} & allowed(learned)
    assert [f for f in check_profile(out.read_text(), str(out)) if f.severity == "error"] == []

    for args, ok in ((["sh", "-c", "ls -l / >/dev/null && echo listed"], True),
                     (["sh", "-c", "ls -l / >/dev/null && echo listed; mkdir /tmp/y"], False)):
        config = oci_config(args)
        config["linux"]["seccomp"] = learned.to_dict()
        bundle = tmp_path / f"enforced-{ok}"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        async with container(runtime, bundle, unique_id("trace-ann")) as c:
            done = await c.run()
        assert done.stdout == b"listed\n", done.stderr
        if ok:
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode != 0
            assert b"Permission denied" in done.stderr  # the base's EACCES rule
