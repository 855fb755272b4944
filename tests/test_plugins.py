"""supervisor.plugins: loading policy modules; a broken policy is a ConfigError, never a
crash."""

from __future__ import annotations

import errno
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from supervisor.config import PolicyConfig, add_policy_files, load_config, parse_config
from supervisor.errors import ConfigError
from supervisor.plugins import check_config, load_policies, load_policy, module_name
from supervisor.policy import Container, Decision, HandlerEntry, Notification, PolicySet

CONF = "/etc/seccomp-supervisor/test.toml"

# A policy with options, a configure hook that validates them, and a handler.
LIMITS = """
import errno
from supervisor.policy import PolicySet, deny, allow

policy = PolicySet("limits", defaults={"limit": 1, "name": "x", "strict": False})
SEEN = []

@policy.configure
def _check(options):
    if options["limit"] < 0:
        raise ValueError("limit must be >= 0")
    SEEN.append(options["limit"])

@policy.on("chmod")
def chmod(n):
    if n.args[1] > policy.options["limit"]:
        return deny(errno.EPERM, reason="over the limit")
    return allow()
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def entry(path: Path | None = None, *, name: str = "limits", entry_point: str | None = None,
          options: dict[str, Any] | None = None, index: int = 0) -> PolicyConfig:
    return PolicyConfig(name=name, path=path, entry_point=entry_point,
                        options=MappingProxyType(options or {}), index=index)


def notification(syscall: str, *args: int) -> Notification:
    return Notification(id=1, pid=1, nr=0, arch="x86_64", syscall=syscall,
                        args=(*args, *(0,) * (6 - len(args))), container=Container(id="c"))


def decide(handler: HandlerEntry | None, n: Notification) -> Decision:
    """Run a synchronous handler and return its decision (None is a test failure)."""
    assert handler is not None and not handler.is_async
    decision = handler.func(n)
    assert isinstance(decision, Decision)
    return decision


def load_error(pc: PolicyConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_policy(pc, CONF)
    assert info.value.file == CONF
    return info.value


@pytest.fixture
def clean_modules() -> Iterator[None]:
    """Forget the modules a test imported (policy copies and entry-point modules)."""
    yield
    for name in list(sys.modules):
        if name.startswith(("seccomp_policy_", "sp_test_pkg")):
            del sys.modules[name]


pytestmark = pytest.mark.usefixtures("clean_modules")


# --------------------------------------------------------------------------- from a path


def test_load_from_path_registers_handlers_and_applies_options(tmp_path: Path) -> None:
    path = write(tmp_path, "limits.py", LIMITS)
    ps = load_policy(entry(path, name="my-limits", options={"limit": 3}), CONF)
    assert isinstance(ps, PolicySet)
    assert ps.name == "my-limits"
    assert ps.syscalls == frozenset({"chmod"})
    assert ps.options == {"limit": 3, "name": "x", "strict": False}
    handler = ps.handler_for("chmod")
    assert handler is not None
    assert decide(handler, notification("chmod", 0, 2)).kind == "allow"
    decision = decide(handler, notification("chmod", 0, 4))
    assert (decision.kind, decision.errno) == ("deny", errno.EPERM)


def test_options_default_when_not_given(tmp_path: Path) -> None:
    ps = load_policy(entry(write(tmp_path, "limits.py", LIMITS)), CONF)
    assert ps.options == {"limit": 1, "name": "x", "strict": False}


def test_unknown_option_names_the_key(tmp_path: Path) -> None:
    e = load_error(entry(write(tmp_path, "limits.py", LIMITS), options={"bogus": 1}, index=2))
    assert e.key == "policy[2].options.bogus"
    assert e.reason == "unknown option (known: limit, name, strict)"


def test_option_of_the_wrong_type(tmp_path: Path) -> None:
    e = load_error(entry(write(tmp_path, "limits.py", LIMITS), options={"strict": "yes"}))
    assert e.key == "policy[0].options.strict"
    assert e.reason == "expected bool, got str"


def test_configure_hook_refusal_is_a_config_error(tmp_path: Path) -> None:
    e = load_error(entry(write(tmp_path, "limits.py", LIMITS), options={"limit": -1}))
    assert e.key == "policy[0].options"
    assert e.reason == "limit must be >= 0"


@pytest.mark.parametrize(("raised", "reason"), [
    ('KeyError("n2")', "KeyError: 'n2'"),
    ("SystemExit(4)", "SystemExit: 4"),
    # BaseExceptions that are not the daemon's own: they went through the reload and
    # stopped the running daemon, every container's calls with it.
    ("asyncio.CancelledError('x')", "CancelledError: x"),
    ("Stop('y')", "Stop: y"),
])
def test_configure_hook_crash_is_a_config_error(tmp_path: Path, raised: str,
                                                reason: str) -> None:
    path = write(tmp_path, "hook.py", f"""
        import asyncio
        from supervisor.policy import PolicySet
        class Stop(BaseException):
            pass
        policy = PolicySet("hook", defaults={{"n": 1}})
        @policy.configure
        def _boom(options):
            raise {raised}
    """)
    e = load_error(entry(path))
    assert e.key == "policy[0].options"
    assert e.reason == f"the policy's configure hook failed: {reason}"


@pytest.mark.parametrize(("source", "reason"), [
    ("def broken(:\n    pass\n", "SyntaxError: "),
    ("raise RuntimeError('no config here')\n", "RuntimeError: no config here"),
    ("import no_such_module_for_tests\n", "ModuleNotFoundError: No module named "
                                          "'no_such_module_for_tests'"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("import asyncio\nraise asyncio.CancelledError('at import')\n",
     "CancelledError: at import"),
    ("class Stop(BaseException): pass\nraise Stop('at import')\n", "Stop: at import"),
    ("from supervisor.policy import PolicySet\npolicy = PolicySet('x')\n"
     "@policy.on('no_such_call')\ndef h(n):\n    return None\n",
     "PolicyError: policy 'x': h: unknown system call 'no_such_call'"),
    ("from supervisor.policy import PolicySet\npolicy = PolicySet('x')\n"
     "@policy.on('chmod')\ndef a(n): return None\n@policy.on('chmod')\ndef b(n): return None\n",
     "PolicyError: policy 'x': 'chmod' already handled by a"),
    ("from supervisor.policy import PolicySet\npolicy = PolicySet('')\n",
     "PolicyError: a PolicySet needs a non-empty name"),
])
def test_broken_policy_file_is_a_config_error(tmp_path: Path, source: str,
                                              reason: str) -> None:
    path = write(tmp_path, "broken.py", source)
    e = load_error(entry(path, index=1))
    assert e.key == "policy[1].path"
    assert e.reason.startswith(f"cannot load {path}: ")
    assert reason in e.reason
    assert module_name("limits") not in sys.modules


def test_syntax_error_reason_has_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "x = 1\ny = (\n")
    e = load_error(entry(path))
    assert "line 2" in e.reason


def test_missing_file(tmp_path: Path) -> None:
    e = load_error(entry(tmp_path / "nope.py"))
    assert e.key == "policy[0].path"
    assert e.reason.startswith(f"cannot load {tmp_path / 'nope.py'}: FileNotFoundError: ")


def test_a_directory_is_not_a_policy(tmp_path: Path) -> None:
    e = load_error(entry(tmp_path))
    assert "IsADirectoryError" in e.reason


def test_module_without_policy_set(tmp_path: Path) -> None:
    e = load_error(entry(write(tmp_path, "empty.py", "x = 1\n")))
    assert e.key == "policy[0].path"
    assert e.reason == (f"{tmp_path / 'empty.py'}: defines no PolicySet "
                        f"(expected `policy = PolicySet(...)`)")


def test_module_with_several_policy_sets(tmp_path: Path) -> None:
    e = load_error(entry(write(tmp_path, "two.py", """
        from supervisor.policy import PolicySet
        a = PolicySet("a")
        b = PolicySet("b")
    """)))
    assert "defines several PolicySets (a, b); name the one to use `policy`" in e.reason


def test_attribute_named_policy_wins(tmp_path: Path) -> None:
    ps = load_policy(entry(write(tmp_path, "two.py", """
        from supervisor.policy import PolicySet
        helper = PolicySet("helper")
        policy = PolicySet("main")
        policy.description = "the main one"
    """)), CONF)
    assert ps.description == "the main one"


def test_the_only_policy_set_under_another_name(tmp_path: Path) -> None:
    ps = load_policy(entry(write(tmp_path, "other.py", """
        from supervisor import policy          # the module, not a PolicySet
        hardening = policy.PolicySet("hardening", description="found")
        alias = hardening                      # the same object twice is still one
    """)), CONF)
    assert ps.description == "found"
    assert ps.name == "limits"


def test_same_file_twice_gives_independent_policy_sets(tmp_path: Path) -> None:
    path = write(tmp_path, "limits.py", LIMITS)
    a = load_policy(entry(path, name="a", options={"limit": 1}), CONF)
    b = load_policy(entry(path, name="b", options={"limit": 5}, index=1), CONF)
    assert a is not b
    assert (a.name, b.name) == ("a", "b")
    assert a.options["limit"] == 1 and b.options["limit"] == 5
    ha, hb = a.handler_for("chmod"), b.handler_for("chmod")
    assert ha is not None and hb is not None
    # each handler sees its own module's `policy`, hence its own options
    assert decide(ha, notification("chmod", 0, 3)).kind == "deny"
    assert decide(hb, notification("chmod", 0, 3)).kind == "allow"
    # and each module has its own globals
    assert ha.func.__globals__ is not hb.func.__globals__
    assert ha.func.__globals__["SEEN"] == [1]
    assert hb.func.__globals__["SEEN"] == [5]


def test_loading_again_runs_the_current_file(tmp_path: Path) -> None:
    path = write(tmp_path, "v.py", """
        from supervisor.policy import PolicySet
        policy = PolicySet("v", description="one")
    """)
    first = load_policy(entry(path, name="v"), CONF)
    # same size, same second: a bytecode cache keyed on mtime+size would serve "one"
    write(tmp_path, "v.py", """
        from supervisor.policy import PolicySet
        policy = PolicySet("v", description="two")
    """)
    second = load_policy(entry(path, name="v"), CONF)
    assert (first.description, second.description) == ("one", "two")
    assert first is not second
    assert not (tmp_path / "__pycache__").exists()


def test_module_is_registered_for_dataclasses_and_replaced_on_reload(tmp_path: Path) -> None:
    path = write(tmp_path, "dc.py", """
        from __future__ import annotations
        import dataclasses
        from supervisor.policy import PolicySet

        @dataclasses.dataclass
        class Rule:
            prefix: str
            limit: int = 0

        policy = PolicySet("dc")
        RULE = Rule("/tmp")
    """)
    load_policy(entry(path, name="dc"), CONF)
    first = sys.modules[module_name("dc")]
    assert first.RULE.prefix == "/tmp"
    assert first.__file__ == str(path)
    load_policy(entry(path, name="dc"), CONF)
    assert sys.modules[module_name("dc")] is not first


def test_a_failed_reload_keeps_the_previous_module(tmp_path: Path) -> None:
    path = write(tmp_path, "v.py", "from supervisor.policy import PolicySet\n"
                                   "policy = PolicySet('v')\n")
    load_policy(entry(path, name="v"), CONF)
    good = sys.modules[module_name("v")]
    write(tmp_path, "v.py", "raise RuntimeError('half-edited')\n")
    load_error(entry(path, name="v"))
    assert sys.modules[module_name("v")] is good


def test_module_names_are_distinct_per_policy_name() -> None:
    names = ["a-b", "a_b", "a.b", "a__b", "a_hb", "a_db", "ab"]
    modules = [module_name(n) for n in names]
    assert len(set(modules)) == len(names)
    assert all(m.isidentifier() and m.startswith("seccomp_policy_") for m in modules)


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package ``sp_test_pkg`` on sys.path."""
    root = tmp_path / "site"
    write(root, "sp_test_pkg/__init__.py", "")
    write(root, "sp_test_pkg/limits.py", LIMITS + "\nNOT_A_POLICY = 3\n"
          "class Holder:\n    inner = PolicySet('inner')\n")
    write(root, "sp_test_pkg/broken.py", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(root))
    return root


def test_entry_point_with_attribute(package: Path) -> None:
    ps = load_policy(entry(entry_point="sp_test_pkg.limits:policy", name="ep",
                           options={"limit": 7}), CONF)
    assert ps.name == "ep"
    assert ps.options["limit"] == 7
    assert ps is sys.modules["sp_test_pkg.limits"].policy


def test_entry_point_dotted_attribute(package: Path) -> None:
    ps = load_policy(entry(entry_point="sp_test_pkg.limits:Holder.inner", name="in"), CONF)
    assert ps is sys.modules["sp_test_pkg.limits"].Holder.inner


def test_entry_point_module_only(package: Path) -> None:
    ps = load_policy(entry(entry_point="sp_test_pkg.limits", name="ep"), CONF)
    assert ps.syscalls == frozenset({"chmod"})


@pytest.mark.parametrize(("entry_point", "reason"), [
    ("sp_test_pkg.nope", "cannot load sp_test_pkg.nope: ModuleNotFoundError: "),
    ("sp_no_such_pkg.mod:policy", "cannot load sp_no_such_pkg.mod:policy: "
                                  "ModuleNotFoundError: "),
    ("sp_test_pkg.broken", "cannot load sp_test_pkg.broken: ImportError: needs libfoo"),
    ("sp_test_pkg.limits:missing", "sp_test_pkg.limits:missing: sp_test_pkg.limits has no "
                                   "attribute 'missing'"),
    ("sp_test_pkg.limits:NOT_A_POLICY", "sp_test_pkg.limits:NOT_A_POLICY: NOT_A_POLICY is a "
                                        "int, not a PolicySet"),
    ("sp_test_pkg", "sp_test_pkg: defines no PolicySet"),
])
def test_bad_entry_points(package: Path, entry_point: str, reason: str) -> None:
    e = load_error(entry(entry_point=entry_point, index=3))
    assert e.key == "policy[3].entry_point"
    assert e.reason.startswith(reason)


def test_entry_point_options_are_validated(package: Path) -> None:
    e = load_error(entry(entry_point="sp_test_pkg.limits:policy", options={"bogus": True}))
    assert e.key == "policy[0].options.bogus"


# --------------------------------------------------------------------------- whole configs


def conf_file(directory: Path, text: str) -> Path:
    return write(directory, "conf.toml", text)


def test_load_policies_from_a_config(tmp_path: Path, package: Path) -> None:
    write(tmp_path, "policies/limits.py", LIMITS)
    conf = conf_file(tmp_path, """
        [defaults]
        policies = ["strict", "ep"]

        [[policy]]
        name = "strict"
        path = "policies/limits.py"
        options = { limit = 0, strict = true }

        [[policy]]
        name = "loose"
        path = "policies/limits.py"
        options = { limit = 100 }

        [[policy]]
        name = "ep"
        entry_point = "sp_test_pkg.limits"
    """)
    loaded = load_policies(load_config(conf))
    assert list(loaded) == ["strict", "loose", "ep"]
    assert [ps.name for ps in loaded.values()] == ["strict", "loose", "ep"]
    assert loaded["strict"].options["limit"] == 0
    assert loaded["loose"].options["limit"] == 100
    assert len({id(ps) for ps in loaded.values()}) == 3


def test_one_entry_point_cannot_back_two_policies(tmp_path: Path, package: Path) -> None:
    config = parse_config({"policy": [
        {"name": "a", "entry_point": "sp_test_pkg.limits:policy"},
        {"name": "b", "entry_point": "sp_test_pkg.limits"},
    ]}, CONF)
    with pytest.raises(ConfigError) as info:
        load_policies(config)
    assert info.value.key == "policy[1].entry_point"
    assert "is the same PolicySet as policy 'a'" in info.value.reason


def test_load_policies_stops_at_the_first_error(tmp_path: Path) -> None:
    config = parse_config({"policy": [
        {"name": "a", "path": str(write(tmp_path, "a.py", LIMITS))},
        {"name": "b", "path": str(tmp_path / "missing.py")},
        {"name": "c", "path": str(write(tmp_path, "c.py", "raise ValueError\n"))},
    ]}, CONF)
    with pytest.raises(ConfigError) as info:
        load_policies(config)
    assert info.value.key == "policy[1].path"


def test_command_line_policies_are_reported_as_such(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.py", "raise RuntimeError('x')\n")
    good = write(tmp_path, "good.py", LIMITS)
    config = add_policy_files(parse_config({}, CONF), [good])
    assert list(load_policies(config)) == ["good"]
    config = add_policy_files(parse_config({}, CONF), [bad])
    with pytest.raises(ConfigError) as info:
        load_policies(config)
    assert info.value.file == "<command line>"
    assert info.value.key == f"--policy {bad}"
    assert info.value.reason == f"cannot load {bad}: RuntimeError: x"


# --------------------------------------------------------------------------- check


def test_check_config_of_a_good_config(tmp_path: Path) -> None:
    write(tmp_path, "limits.py", LIMITS)
    conf = conf_file(tmp_path, """
        [defaults]
        policies = ["limits"]
        [[policy]]
        name = "limits"
        path = "limits.py"
    """)
    assert check_config(conf) == []
    assert check_config(str(conf)) == []


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    write(tmp_path, "limits.py", LIMITS)
    write(tmp_path, "syntax.py", "def (:\n")
    conf = conf_file(tmp_path, """
        [defaults]
        deadline = "fast"

        [[policy]]
        name = "ok"
        path = "limits.py"

        [[policy]]
        name = "syntax"
        path = "syntax.py"

        [[policy]]
        name = "missing"
        path = "missing.py"

        [[policy]]
        name = "opts"
        path = "limits.py"
        options = { bogus = 1 }

        [[route]]
        match = { container = "*" }
        policies = ["ghost"]
    """)
    problems = check_config(conf)
    assert len(problems) == 5, problems
    assert all(p.startswith(f"{conf}: ") for p in problems)
    keys = [p.split(": ")[1] for p in problems]
    assert keys == ["defaults.deadline", "route[0].policies[0]", "policy[1].path",
                    "policy[2].path", "policy[3].options.bogus"]
    assert "SyntaxError" in problems[2]
    assert "FileNotFoundError" in problems[3]


def test_check_config_of_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    assert check_config(tmp_path / "nope.toml") == [
        f"{tmp_path / 'nope.toml'}: (file): cannot read: No such file or directory"]
    conf = conf_file(tmp_path, "[defaults\n")
    (problem,) = check_config(conf)
    assert problem.startswith(f"{conf}: (syntax): ")
