"""supervisor.config: TOML → frozen dataclasses; every error names file, key and reason."""

from __future__ import annotations

import dataclasses
import errno
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import config as cfg
from supervisor.config import (
    AuditConfig,
    Config,
    ListenConfig,
    MetricsConfig,
    PolicyConfig,
    Route,
    RouteMatch,
    add_policy_files,
    default_config,
    load_config,
    parse_config,
    parse_duration,
    read_toml,
    validate_config,
    with_socket,
)
from supervisor.errors import ConfigError
from supervisor.policy import deny, returns

DATA = Path(__file__).parent / "data" / "config"
FILE = "/etc/seccomp-supervisor/test.toml"

POLICY = {"name": "p", "path": "p.py"}


def error(data: dict[str, Any], file: str = FILE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, file)
    assert info.value.file == file
    return info.value


def with_policies(**sections: Any) -> dict[str, Any]:
    """A document with policies "p" and "q" defined, plus ``sections``."""
    doc: dict[str, Any] = {"policy": [dict(POLICY), {"name": "q", "entry_point": "m:q"}]}
    doc.update(sections)
    return doc


# --------------------------------------------------------------------------- whole files


def test_empty_document_gives_the_documented_defaults() -> None:
    c = parse_config({}, FILE)
    assert c.file == FILE
    assert c.listen == ListenConfig(
        socket="/run/seccomp-supervisor/notify.sock", socket_mode=0o600, allowed_uids=(0,),
        max_handoffs=64, handoff_timeout=5.0, max_message=65536,
        control_socket="/run/seccomp-supervisor/control.sock")
    assert c.metrics == MetricsConfig(listen="127.0.0.1:9469", host="127.0.0.1", port=9469)
    assert c.metrics.enabled
    assert c.defaults.policies == ()
    assert c.defaults.unhandled.kind == "deny"
    assert c.defaults.unhandled.errno == errno.ENOSYS
    assert c.defaults.on_error.kind == "deny"
    assert c.defaults.on_error.errno == errno.EPERM
    assert c.defaults.deadline == 2.0
    assert c.defaults.max_inflight == 64
    assert c.policies == ()
    assert c.routes == ()
    assert c.audit == AuditConfig(decisions="deny", rate_limit=10)


def test_default_toml_equals_the_built_in_defaults() -> None:
    d = default_config()
    assert d.file.endswith("default.toml")
    assert dataclasses.replace(d, file=FILE) == parse_config({}, FILE)


def test_default_toml_spells_out_every_key() -> None:
    # The embedded file doubles as documentation: every key is written out.
    data = read_toml(Path(cfg.__file__).with_name("default.toml"))
    assert set(data) == {"listen", "metrics", "defaults", "audit", "trace_annotation"}
    assert tuple(data["trace_annotation"]) == cfg._TRACE_KEYS
    assert tuple(data["listen"]) == cfg._LISTEN_KEYS
    assert tuple(data["metrics"]) == cfg._METRICS_KEYS
    assert tuple(data["defaults"]) == cfg._DEFAULTS_KEYS
    assert tuple(data["audit"]) == cfg._AUDIT_KEYS


def test_full_example_file() -> None:
    path = DATA / "full.toml"
    c = load_config(path)
    assert c.file == str(path)
    assert c.listen == ListenConfig(
        socket="/run/test/notify.sock", socket_mode=0o660, allowed_uids=(0, 1000),
        max_handoffs=8, handoff_timeout=1.5, max_message=4096,
        control_socket="/run/test/control.sock")
    assert c.metrics == MetricsConfig(listen="[::1]:9100", host="::1", port=9100)
    assert c.defaults.policies == ("hardening",)
    assert c.defaults.unhandled == deny(errno.EPERM, reason="configured")
    assert c.defaults.on_error == returns(0, reason="configured")
    assert c.defaults.deadline == 0.25
    assert c.defaults.max_inflight == 16
    hardening, learn = c.policies
    assert hardening == PolicyConfig(name="hardening", path=DATA / "policies" / "hardening.py",
                                     entry_point=None, options={"limit": 3, "paths": ["/tmp"]},
                                     index=0)
    assert learn == PolicyConfig(name="learn.v2", path=None,
                                 entry_point="example_pkg.learn:policy", options={}, index=1)
    assert c.policy_config("learn.v2") is learn
    with pytest.raises(KeyError):
        c.policy_config("nope")
    first, second = c.routes
    assert first == Route(index=0, match=RouteMatch(
        labels={"team": "build*"}, container="ci-*",
        annotations={"io.kubernetes.pod.namespace": "ci"}),
        policies=("hardening", "learn.v2"), mode="enforce")
    assert second == Route(index=1, match=RouteMatch(metadata="*debug=1*"), policies=(),
                           mode="shadow")
    assert c.audit == AuditConfig(decisions="all", rate_limit=0)


def test_config_is_frozen() -> None:
    c = load_config(DATA / "full.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.listen.socket = "/tmp/x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.policies[0].options["limit"] = 4  # type: ignore[index]
    with pytest.raises(TypeError):
        c.routes[0].match.labels["team"] = "x"  # type: ignore[index]


def test_options_are_copied_from_the_document() -> None:
    doc = {"policy": [{"name": "p", "path": "p.py", "options": {"paths": ["/a"]}}]}
    c = parse_config(doc, FILE)
    doc["policy"][0]["options"]["paths"].append("/b")  # type: ignore[index]
    assert c.policies[0].options == {"paths": ["/a"]}


def test_relative_policy_path_resolves_against_the_config_directory(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "conf.toml"
    conf.parent.mkdir()
    conf.write_text('[[policy]]\nname = "a"\npath = "policies/a.py"\n'
                    '[[policy]]\nname = "b"\npath = "/abs/b.py"\n'
                    '[[policy]]\nname = "c"\npath = "../c.py"\n')
    a, b, c = load_config(conf).policies
    assert a.path == tmp_path / "etc" / "policies" / "a.py"
    assert b.path == Path("/abs/b.py")
    assert c.path == tmp_path / "etc" / ".." / "c.py"


def test_relative_config_file_name_gives_absolute_policy_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = parse_config({"policy": [POLICY]}, "conf.toml")
    assert c.policies[0].path == tmp_path / "p.py"
    assert c.policies[0].path.is_absolute()


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[listen]\nsocket = "/x"\nmax_handoffs = = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert info.value.file == str(conf)
    assert info.value.key == "(syntax)"
    assert "line 3" in info.value.reason
    assert str(info.value).startswith(f"{conf}: (syntax): ")


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[defaults]\ndeadline = "1s"\ndeadline = "2s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert info.value.key == "(syntax)"


def test_not_utf8(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_bytes(b'[listen]\nsocket = "/\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert (info.value.key, info.value.reason) == ("(syntax)", "not UTF-8: invalid byte at "
                                                               "offset 20")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.file == str(tmp_path / "nope.toml")
    assert info.value.key == "(file)"
    assert "No such file" in info.value.reason


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("doc", "key"), [
    ({"listne": {}}, "listne"),
    ({"listen": {"sockett": "/x"}}, "listen.sockett"),
    ({"metrics": {"port": 1}}, "metrics.port"),
    ({"defaults": {"deadlines": "1s"}}, "defaults.deadlines"),
    ({"audit": {"rate": 1}}, "audit.rate"),
    ({"policy": [{"name": "p", "path": "p.py", "option": {}}]}, "policy[0].option"),
    (with_policies(route=[{"match": {"container": "*"}, "policies": [], "modes": "x"}]),
     "route[0].modes"),
    (with_policies(route=[{"match": {"containers": "*"}, "policies": []}]),
     "route[0].match.containers"),
    ({"listen": {"max handoffs": 1}}, 'listen."max handoffs"'),
])
def test_unknown_keys_are_refused(doc: dict[str, Any], key: str) -> None:
    e = error(doc)
    assert e.key == key
    assert e.reason.startswith("unknown key (known: ")


def test_unknown_key_lists_the_known_ones() -> None:
    e = error({"metrics": {"lisen": "x"}})
    assert e.reason == "unknown key (known: listen)"


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("doc", "key", "reason"), [
    # sections of the wrong type
    ({"listen": []}, "listen", "expected a table, got an array"),
    ({"metrics": "x"}, "metrics", "expected a table, got string 'x'"),
    ({"defaults": 1}, "defaults", "expected a table, got integer 1"),
    ({"audit": True}, "audit", "expected a table, got boolean True"),
    ({"policy": {"name": "p"}}, "policy", "expected an array of tables ([[policy]])"),
    ({"route": "x"}, "route", "expected an array of tables ([[route]])"),
    # [listen]
    ({"listen": {"socket": 3}}, "listen.socket", "expected a string, got integer 3"),
    ({"listen": {"socket": ""}}, "listen.socket", "empty socket path"),
    ({"listen": {"socket": "/a\0b"}}, "listen.socket", "NUL"),
    ({"listen": {"socket": "/" + "x" * 107}}, "listen.socket",
     "socket path is 108 bytes; unix sockets allow at most 107"),
    ({"listen": {"control_socket": ["/x"]}}, "listen.control_socket", "expected a string"),
    ({"listen": {"socket_mode": 600}}, "listen.socket_mode",
     "mode must be within 0o000..0o777 (600 is 0o1130: write 0o600 or \"0600\" for octal)"),
    ({"listen": {"socket_mode": -1}}, "listen.socket_mode", "mode must be within 0o000..0o777"),
    ({"listen": {"socket_mode": "rw-------"}}, "listen.socket_mode",
     "'rw-------' is not an octal mode"),
    ({"listen": {"socket_mode": "0680"}}, "listen.socket_mode", "is not an octal mode"),
    ({"listen": {"socket_mode": "07777"}}, "listen.socket_mode", "within 0o000..0o777"),
    ({"listen": {"socket_mode": 1.5}}, "listen.socket_mode", "expected an octal mode"),
    ({"listen": {"socket_mode": True}}, "listen.socket_mode", "expected an octal mode"),
    ({"listen": {"allowed_uids": 0}}, "listen.allowed_uids", "expected an array of uids"),
    ({"listen": {"allowed_uids": []}}, "listen.allowed_uids", "empty"),
    ({"listen": {"allowed_uids": [0, -1]}}, "listen.allowed_uids[1]", "must be >= 0, got -1"),
    ({"listen": {"allowed_uids": [2**32 - 1]}}, "listen.allowed_uids[0]", "must be <= "),
    ({"listen": {"allowed_uids": ["root"]}}, "listen.allowed_uids[0]",
     "expected an integer, got string 'root'"),
    ({"listen": {"max_handoffs": 0}}, "listen.max_handoffs", "must be >= 1, got 0"),
    ({"listen": {"max_handoffs": "64"}}, "listen.max_handoffs", "expected an integer"),
    ({"listen": {"max_handoffs": True}}, "listen.max_handoffs", "expected an integer"),
    ({"listen": {"max_handoffs": 2.0}}, "listen.max_handoffs", "expected an integer"),
    ({"listen": {"handoff_timeout": "0s"}}, "listen.handoff_timeout", "must be > 0"),
    ({"listen": {"handoff_timeout": "soon"}}, "listen.handoff_timeout", "is not a duration"),
    ({"listen": {"max_message": 100}}, "listen.max_message", "must be >= 1024, got 100"),
    ({"listen": {"max_message": 2**40}}, "listen.max_message", "must be <= 67108864"),
    # [metrics]
    ({"metrics": {"listen": 9469}}, "metrics.listen", "expected a string"),
    ({"metrics": {"listen": "9469"}}, "metrics.listen", "expected \"HOST:PORT\""),
    ({"metrics": {"listen": ":9469"}}, "metrics.listen", "empty host"),
    ({"metrics": {"listen": "localhost:"}}, "metrics.listen", "the port must be a number"),
    ({"metrics": {"listen": "localhost:http"}}, "metrics.listen", "the port must be a number"),
    ({"metrics": {"listen": "localhost:-1"}}, "metrics.listen", "the port must be a number"),
    ({"metrics": {"listen": "localhost:65536"}}, "metrics.listen", "port 65536 is above 65535"),
    ({"metrics": {"listen": "localhost:123456"}}, "metrics.listen", "the port must be"),
    ({"metrics": {"listen": "::1:9469"}}, "metrics.listen", "put an IPv6 address in brackets"),
    ({"metrics": {"listen": "[::1]"}}, "metrics.listen", "expected \"HOST:PORT\""),
    ({"metrics": {"listen": "[::1:9469"}}, "metrics.listen", "expected \"HOST:PORT\""),
    ({"metrics": {"listen": "[]:9469"}}, "metrics.listen", "'' is not an IPv6 address"),
    ({"metrics": {"listen": "[nope]:9469"}}, "metrics.listen", "is not an IPv6 address"),
    ({"metrics": {"listen": "local host:1"}}, "metrics.listen", "blanks"),
    # [defaults]
    ({"defaults": {"policies": "p"}}, "defaults.policies", "expected an array of strings"),
    ({"defaults": {"policies": [1]}}, "defaults.policies[0]", "expected a string"),
    ({"defaults": {"policies": ["nope"]}}, "defaults.policies[0]",
     "unknown policy 'nope': no [[policy]] has that name (defined: none)"),
    (with_policies(defaults={"policies": ["p", "x"]}), "defaults.policies[1]",
     "unknown policy 'x': no [[policy]] has that name (defined: p, q)"),
    (with_policies(defaults={"policies": ["p", "q", "p"]}), "defaults.policies[2]",
     "policy 'p' is listed twice (also defaults.policies[0])"),
    ({"defaults": {"unhandled": "deny:EFOO"}}, "defaults.unhandled", "unknown errno name"),
    ({"defaults": {"unhandled": "deny:0"}}, "defaults.unhandled", "errno must be in 1..511"),
    ({"defaults": {"unhandled": "deny:512"}}, "defaults.unhandled", "errno must be in 1..511"),
    ({"defaults": {"unhandled": "continue"}}, "defaults.unhandled", "expected 'deny:ERRNO'"),
    ({"defaults": {"unhandled": 1}}, "defaults.unhandled", "expected a string"),
    ({"defaults": {"on_error": "returns:-1"}}, "defaults.on_error", "is an error return"),
    ({"defaults": {"on_error": "returns:x"}}, "defaults.on_error", "'returns:x'"),
    ({"defaults": {"on_error": ""}}, "defaults.on_error", "expected 'deny:ERRNO'"),
    ({"defaults": {"deadline": "0s"}}, "defaults.deadline", "duration must be > 0, got '0s'"),
    ({"defaults": {"deadline": 0}}, "defaults.deadline", "duration must be > 0, got 0"),
    ({"defaults": {"deadline": "-1s"}}, "defaults.deadline", "duration must be > 0, got '-1s'"),
    ({"defaults": {"deadline": "2h"}}, "defaults.deadline",
     "duration must be at most 1h, got '2h'"),
    ({"defaults": {"deadline": "fast"}}, "defaults.deadline", "'fast' is not a duration"),
    ({"defaults": {"deadline": ""}}, "defaults.deadline", "empty duration"),
    ({"defaults": {"deadline": math.inf}}, "defaults.deadline", "duration must be finite"),
    ({"defaults": {"deadline": math.nan}}, "defaults.deadline", "duration must be finite"),
    ({"defaults": {"deadline": True}}, "defaults.deadline", "expected a duration string"),
    ({"defaults": {"deadline": ["2s"]}}, "defaults.deadline", "expected a duration string"),
    ({"defaults": {"max_inflight": 0}}, "defaults.max_inflight", "must be >= 1, got 0"),
    ({"defaults": {"max_inflight": "many"}}, "defaults.max_inflight", "expected an integer"),
    # [[policy]]
    ({"policy": ["p"]}, "policy[0]", "expected a table, got string 'p'"),
    ({"policy": [{"path": "p.py"}]}, "policy[0].name", "missing"),
    ({"policy": [{"name": 1, "path": "p.py"}]}, "policy[0].name", "expected a string"),
    ({"policy": [{"name": "", "path": "p.py"}]}, "policy[0].name", "use only letters"),
    ({"policy": [{"name": "a b", "path": "p.py"}]}, "policy[0].name", "use only letters"),
    ({"policy": [{"name": "a/b", "path": "p.py"}]}, "policy[0].name", "use only letters"),
    ({"policy": [POLICY, {"name": "x", "path": "x.py"}, POLICY]}, "policy[2].name",
     "duplicate policy name 'p' (also policy[0])"),
    ({"policy": [{"name": "p"}]}, "policy[0]",
     "needs exactly one of 'path' and 'entry_point'"),
    ({"policy": [{"name": "p", "path": "p.py", "entry_point": "m"}]}, "policy[0]",
     "has both 'path' and 'entry_point'"),
    ({"policy": [{"name": "p", "path": 1}]}, "policy[0].path", "expected a string"),
    ({"policy": [{"name": "p", "path": ""}]}, "policy[0].path", "expected a file path"),
    ({"policy": [{"name": "p", "entry_point": "a-b:c"}]}, "policy[0].entry_point",
     "expected \"package.module\" or \"package.module:attribute\""),
    ({"policy": [{"name": "p", "entry_point": "m:"}]}, "policy[0].entry_point", "expected"),
    ({"policy": [{"name": "p", "entry_point": ":x"}]}, "policy[0].entry_point", "expected"),
    ({"policy": [{"name": "p", "entry_point": "a..b"}]}, "policy[0].entry_point", "expected"),
    ({"policy": [{"name": "p", "path": "p.py", "options": []}]}, "policy[0].options",
     "expected a table, got an array"),
    # [[route]]
    (with_policies(route=[{"policies": ["p"]}]), "route[0].match", "missing"),
    (with_policies(route=[{"match": {"container": "*"}}]), "route[0].policies", "missing"),
    (with_policies(route=[{"match": {}, "policies": []}]), "route[0].match",
     "empty: needs at least one of metadata, labels, container, annotations"),
    (with_policies(route=[{"match": "ci-*", "policies": []}]), "route[0].match",
     "expected a table"),
    (with_policies(route=[{"match": {"container": 1}, "policies": []}]),
     "route[0].match.container", "expected a string"),
    (with_policies(route=[{"match": {"metadata": ["a"]}, "policies": []}]),
     "route[0].match.metadata", "expected a string"),
    (with_policies(route=[{"match": {"labels": "team=x"}, "policies": []}]),
     "route[0].match.labels", "expected a table"),
    (with_policies(route=[{"match": {"labels": {"team": 1}}, "policies": []}]),
     "route[0].match.labels.team", "expected a string"),
    (with_policies(route=[{"match": {"labels": {}}, "policies": []}]),
     "route[0].match.labels", "empty table"),
    (with_policies(route=[{"match": {"annotations": {"io.x/y": True}}, "policies": []}]),
     'route[0].match.annotations."io.x/y"', "expected a string"),
    (with_policies(route=[{"match": {"annotations": {}}, "policies": []}]),
     "route[0].match.annotations", "empty table"),
    (with_policies(route=[{"match": {"container": "*"}, "policies": "p"}]),
     "route[0].policies", "expected an array of strings"),
    (with_policies(route=[{"match": {"container": "a"}, "policies": ["p"]},
                          {"match": {"container": "b"}, "policies": ["nope", "p"]}]),
     "route[1].policies[0]", "unknown policy 'nope'"),
    (with_policies(route=[{"match": {"container": "*"}, "policies": ["q", "q"]}]),
     "route[0].policies[1]", "listed twice"),
    (with_policies(route=[{"match": {"container": "*"}, "policies": [], "mode": "audit"}]),
     "route[0].mode", "expected \"enforce\" or \"shadow\", got string 'audit'"),
    # [audit]
    ({"audit": {"decisions": "denied"}}, "audit.decisions", "expected \"all\", \"deny\""),
    ({"audit": {"decisions": 1}}, "audit.decisions", "expected \"all\""),
    ({"audit": {"rate_limit": -1}}, "audit.rate_limit", "must be >= 0, got -1"),
    ({"audit": {"rate_limit": 1.5}}, "audit.rate_limit", "expected an integer"),
])
def test_bad_values(doc: dict[str, Any], key: str, reason: str) -> None:
    e = error(doc)
    assert e.key == key
    assert reason in e.reason
    assert str(e) == f"{FILE}: {key}: {e.reason}"


# --------------------------------------------------------------------------- good values


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25),
    ("2s", 2.0),
    ("1.5s", 1.5),
    ("1m", 60.0),
    ("1h", 3600.0),
    ("10us", 1e-5),
    ("10µs", 1e-5),  # U+00B5 MICRO SIGN
    ("10μs", 1e-5),  # U+03BC GREEK SMALL LETTER MU
    ("500ns", 5e-7),
    ("1m30s", 90.0),
    ("1s500ms", 1.5),
    (".5s", 0.5),
    ("2.s", 2.0),
    (" 2s ", 2.0),
    ("+2s", 2.0),
    (3, 3.0),
    (0.5, 0.5),
    (3600, 3600.0),
])
def test_durations(text: object, seconds: float) -> None:
    value = parse_duration(text, file=FILE, key="k")
    assert value == seconds
    assert type(value) is float
    assert parse_config({"defaults": {"deadline": text}}, FILE).defaults.deadline == seconds


@pytest.mark.parametrize(("text", "reason"), [
    ("0s", "duration must be > 0, got '0s'"),
    ("0", "'0' is not a duration (missing unit)"),
    ("2", "'2' is not a duration (missing unit)"),
    ("-1s", "duration must be > 0, got '-1s'"),
    (-1, "duration must be > 0, got -1"),
    (0.0, "duration must be > 0, got 0.0"),
    ("fast", "'fast' is not a duration"),
    ("", "empty duration"),
    ("   ", "empty duration"),
    ("-", "'-' is not a duration"),
    ("2 s", "is not a duration"),
    ("2S", "is not a duration"),
    ("2sec", "is not a duration"),
    ("1m30", "is not a duration"),
    ("s", "is not a duration"),
    ("1e3ms", "is not a duration"),
    ("1..5s", "is not a duration"),
    ("٣s", "is not a duration"),  # ARABIC-INDIC DIGIT THREE: not an ASCII digit
    ("3601s", "at most 1h"),
    (3600.5, "at most 1h"),
    (None, "expected a duration string or a number of seconds, got NoneType None"),
])
def test_bad_durations(text: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, file=FILE, key="defaults.deadline")
    assert (info.value.file, info.value.key) == (FILE, "defaults.deadline")
    assert reason in info.value.reason


def test_duration_maximum_is_a_parameter() -> None:
    assert parse_duration("2h", file=FILE, key="k", maximum=86400) == 7200.0
    with pytest.raises(ConfigError, match="at most 1m"):
        parse_duration("61s", file=FILE, key="k", maximum=60)


@pytest.mark.parametrize(("value", "mode"), [
    (0o600, 0o600), (0o660, 0o660), (0, 0), (0o777, 0o777),
    ("0600", 0o600), ("600", 0o600), ("0o640", 0o640), ("0", 0),
])
def test_socket_modes(value: object, mode: int) -> None:
    assert parse_config({"listen": {"socket_mode": value}}, FILE).listen.socket_mode == mode


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:9469", "127.0.0.1", 9469),
    ("0.0.0.0:0", "0.0.0.0", 0),
    ("localhost:65535", "localhost", 65535),
    ("[::1]:9469", "::1", 9469),
    ("[::]:80", "::", 80),
])
def test_metrics_listen(listen: str, host: str, port: int) -> None:
    m = parse_config({"metrics": {"listen": listen}}, FILE).metrics
    assert (m.listen, m.host, m.port, m.enabled) == (listen, host, port, True)


def test_metrics_disabled() -> None:
    m = parse_config({"metrics": {"listen": ""}}, FILE).metrics
    assert not m.enabled
    assert (m.host, m.port) == ("", 0)


@pytest.mark.parametrize(("text", "kind", "number"), [
    ("deny:EPERM", "deny", errno.EPERM),
    ("deny:eacces", "deny", errno.EACCES),
    ("deny:13", "deny", 13),
    ("returns:0", "returns", 0),
    ("returns:0x10", "returns", 16),
    ("allow", "allow", 0),
])
def test_decisions(text: str, kind: str, number: int) -> None:
    d = parse_config({"defaults": {"unhandled": text, "on_error": text}}, FILE).defaults
    for decision in (d.unhandled, d.on_error):
        assert decision.kind == kind
        assert (decision.errno if kind == "deny" else decision.value) == number


def test_routes_keep_their_order_and_index() -> None:
    routes = [{"match": {"container": f"c{i}"}, "policies": ["p"] if i % 2 else []}
              for i in range(5)]
    c = parse_config(with_policies(route=routes), FILE)
    assert [r.index for r in c.routes] == [0, 1, 2, 3, 4]
    assert [r.match.container for r in c.routes] == ["c0", "c1", "c2", "c3", "c4"]
    assert c.routes[1].policies == ("p",)
    assert all(r.mode == "enforce" for r in c.routes)


def test_policy_names_may_use_dots_dashes_and_underscores() -> None:
    c = parse_config({"policy": [{"name": "a.b-c_D9", "entry_point": "pkg.mod"}],
                      "defaults": {"policies": ["a.b-c_D9"]}}, FILE)
    assert c.defaults.policies == ("a.b-c_D9",)
    assert c.policies[0].entry_point == "pkg.mod"


# --------------------------------------------------------------------------- all errors


def test_validate_config_reports_independent_problems_together() -> None:
    doc = {
        "listen": {"max_handoffs": 0},
        "defaults": {"deadline": "fast", "policies": ["ghost"]},
        "policy": [{"name": "ok", "path": "ok.py"}, {"name": "bad name", "path": "x.py"},
                   {"name": "ep", "entry_point": "pkg.mod"}],
        "route": [{"match": {"container": "*"}, "policies": ["ok", "ghost"]},
                  {"match": {}, "policies": []}],
        "audit": {"decisions": "some"},
        "typo": 1,
    }
    errors, policies = validate_config(doc, FILE)
    assert [e.key for e in errors] == [
        "typo", "listen.max_handoffs", "defaults.deadline", "audit.decisions",
        "policy[1].name", "route[0].policies[1]", "route[1].match",
    ]
    assert all(e.file == FILE for e in errors)
    assert [p.name for p in policies] == ["ok", "ep"]
    with pytest.raises(ConfigError) as info:
        parse_config(doc, FILE)
    assert info.value.key == "typo"


def test_validate_config_of_a_good_document() -> None:
    errors, policies = validate_config(with_policies(), FILE)
    assert errors == []
    assert [p.name for p in policies] == ["p", "q"]


def test_a_broken_policy_entry_does_not_cause_unknown_reference_noise() -> None:
    doc = {"policy": [{"name": "p", "path": 3}], "defaults": {"policies": ["p"]}}
    errors, _ = validate_config(doc, FILE)
    assert [e.key for e in errors] == ["policy[0].path"]


# --------------------------------------------------------------------------- CLI helpers


def test_add_policy_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = parse_config(with_policies(defaults={"policies": ["q"]}), FILE)
    c = add_policy_files(base, ["local.py", tmp_path / "sub" / "other.policy.py"])
    assert [p.name for p in c.policies] == ["p", "q", "local", "other.policy"]
    assert c.defaults.policies == ("q", "local", "other.policy")
    local = c.policy_config("local")
    assert local.path == tmp_path / "local.py"
    assert local.entry_point is None
    assert local.options == {}
    assert local.index == 2
    assert local.from_command_line
    assert local.location(FILE, "path") == ("<command line>", f"--policy {tmp_path}/local.py")
    assert local.location(FILE, "options.x") == (
        "<command line>", f"--policy {tmp_path}/local.py (options.x)")
    assert c.policy_config("p").location(FILE, "path") == (FILE, "policy[0].path")
    # a pure function: the original is untouched
    assert base.defaults.policies == ("q",)
    assert len(base.policies) == 2
    assert add_policy_files(base, []) == base


def test_add_policy_files_refuses_name_clashes() -> None:
    base = parse_config(with_policies(), FILE)
    with pytest.raises(ConfigError) as info:
        add_policy_files(base, ["/x/p.py"])
    assert info.value.file == "<command line>"
    assert info.value.key == "--policy /x/p.py"
    assert info.value.reason == f"policy name 'p' is already defined in {FILE} (policy[0])"
    with pytest.raises(ConfigError, match="already defined in the command line"):
        add_policy_files(base, ["/x/new.py", "/y/new.py"])


def test_add_policy_files_refuses_unusable_names() -> None:
    with pytest.raises(ConfigError) as info:
        add_policy_files(parse_config({}, FILE), ["/x/my policy.py"])
    assert info.value.key == "--policy /x/my policy.py"
    assert "'my policy'" in info.value.reason


def test_with_socket() -> None:
    base = parse_config({}, FILE)
    c = with_socket(base, "/tmp/s.sock")
    assert c.listen.socket == "/tmp/s.sock"
    assert c.listen.control_socket == base.listen.control_socket
    assert base.listen.socket == "/run/seccomp-supervisor/notify.sock"
    with pytest.raises(ConfigError) as info:
        with_socket(base, "/" + "x" * 200)
    assert (info.value.file, info.value.key) == ("<command line>", "--socket")


# --------------------------------------------------------------------------- hostile input

_KNOWN_KEYS = sorted({*cfg._TOP_KEYS, *cfg._LISTEN_KEYS, *cfg._METRICS_KEYS,
                      *cfg._DEFAULTS_KEYS, *cfg._POLICY_KEYS, *cfg._ROUTE_KEYS,
                      *cfg._MATCH_KEYS, *cfg._AUDIT_KEYS})
_keys = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=8))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["2s", "0s", "deny:EPERM", "allow", "p", "*", "0600", "[::1]:1",
                     "enforce", "shadow", "all", "p.py", "m:attr"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6))
def test_parse_config_raises_only_config_error(data: dict[str, Any]) -> None:
    try:
        c = parse_config(data, FILE)
    except ConfigError as exc:
        assert exc.file == FILE
        assert exc.key
        assert exc.reason
    else:
        assert isinstance(c, Config)
    errors, _ = validate_config(data, FILE)
    assert all(isinstance(e, ConfigError) for e in errors)
