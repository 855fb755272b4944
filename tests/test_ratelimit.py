"""Back-pressure: the token bucket (pure), its config keys, and a real daemon enforcing it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from supervisor.config import parse_config
from supervisor.errors import ConfigError
from supervisor.ratelimit import TokenBucket

from .soak import NR_GETPGID, config_text, daemon_process, start_target

# --------------------------------------------------------------------------- pure bucket


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    bucket = TokenBucket(10, 3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.05)          # half a token
    assert bucket.take(100.1)               # one token after 0.1 s at 10/s
    assert not bucket.take(100.1)
    assert [bucket.take(200.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(1, 1, now=50.0)
    assert bucket.take(50.0)
    assert not bucket.take(10.0)
    assert not bucket.take(50.5)
    assert bucket.take(51.0)


def test_bucket_long_run_rate() -> None:
    bucket = TokenBucket(1000, 1, now=0.0)
    taken = sum(bucket.take(i * 0.0001) for i in range(100_000))  # 10 s, asked 10x too often
    assert 9_990 <= taken <= 10_001


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1),
                                             (float("nan"), 1), (1, 0), (1, 0.5)])
def test_bucket_refuses_bad_limits(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)


# --------------------------------------------------------------------------- config


def test_rate_keys_parse_with_defaults() -> None:
    d = parse_config({}, "f.toml").defaults
    assert d.rate == 0 and d.rate_burst == 0
    assert d.rate_exceeded.kind == "deny" and d.rate_exceeded.errno == errno.EAGAIN
    d = parse_config({"defaults": {"rate": 250, "rate_exceeded": "returns:0"}}, "f.toml").defaults
    assert d.rate == 250.0 and d.burst == 250
    assert d.rate_exceeded.kind == "returns" and d.rate_exceeded.value == 0
    d = parse_config({"defaults": {"rate": 0.5, "rate_burst": 4}}, "f.toml").defaults
    assert d.rate == 0.5 and d.burst == 4
    assert parse_config({"defaults": {"rate": 0.5}}, "f.toml").defaults.burst == 1


@pytest.mark.parametrize(("table", "key"), [
    ({"rate": -1}, "defaults.rate"),
    ({"rate": "fast"}, "defaults.rate"),
    ({"rate": True}, "defaults.rate"),
    ({"rate": float("inf")}, "defaults.rate"),
    ({"rate_burst": -2}, "defaults.rate_burst"),
    ({"rate_burst": 1.5}, "defaults.rate_burst"),
    ({"rate_exceeded": "deny:NOPE"}, "defaults.rate_exceeded"),
])
def test_bad_rate_keys_name_file_and_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"defaults": table}, "/etc/x.toml")
    assert info.value.file == "/etc/x.toml" and info.value.key == key


# --------------------------------------------------------------------------- real daemon


def test_a_container_over_its_rate_gets_the_configured_answer(tmp_path: Path) -> None:
    calls = 600
    with daemon_process(tmp_path, config_text(
            tmp_path, "rate = 100\nrate_burst = 20\n")) as d:
        d.start()
        result = start_target(d.socket_path, 1, calls, "--eagain-ok", "--only", "sync") \
            .result(60)
        assert result["wrong"] == 0 and result["calls"] == calls
        # At most the burst plus what the rate refilled while the target ran.
        allowed = 20 + 100 * result["seconds"] + 1
        assert 20 <= result["ok"] <= allowed, result
        assert result["eagain"] == calls - result["ok"]
        assert d.metric("seccomp_supervisor_notifications_total", syscall="getpgid",
                        policy="(rate)", decision="deny") == result["eagain"]
        assert d.metric("seccomp_supervisor_notifications_total", syscall="getpgid",
                        policy="echo", decision="returns") == result["ok"]


def test_a_flooding_container_does_not_starve_a_quiet_one(tmp_path: Path) -> None:
    """Same daemon, same limit: the flooder spends its own budget; every call of the
    quiet container (well under the limit) is answered by the policy."""
    with daemon_process(tmp_path, config_text(
            tmp_path, "rate = 200\nrate_burst = 20\n")) as d:
        d.start()
        flooders = [start_target(d.socket_path, i, 4000, "--eagain-ok", container_id=f"flood-{i}")
                    for i in (1, 2)]
        quiet = start_target(d.socket_path, 9, 60, "--pause", "0.02", container_id="quiet")
        q = quiet.result(60)
        floods = [f.result(120) for f in flooders]
        assert q["wrong"] == 0 and q["eagain"] == 0 and q["ok"] == 60, q
        assert q["max_latency"] < 0.5, q
        for f in floods:
            assert f["wrong"] == 0
            assert f["eagain"] > f["ok"], f  # most of the flood was refused
            assert f["ok"] <= 20 + 200 * f["seconds"] + 1


def test_rate_limited_answer_can_be_a_return_value(tmp_path: Path) -> None:
    with daemon_process(tmp_path, config_text(
            tmp_path, "rate = 1\nrate_burst = 1\nrate_exceeded = \"returns:7\"\n")) as d:
        d.start()
        # The first call takes the only token, the rest get 7 (a wrong answer for the
        # target, which is how we see it).
        result = start_target(d.socket_path, 2, 5, "--only", "sync").result(30)
        assert result["ok"] == 1 and result["wrong"] == 4
        assert all(f"nr={NR_GETPGID}" in s and "rc=7 " in s for s in result["samples"])
