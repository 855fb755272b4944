"""Load the operator's policy modules named by the config.

A ``[[policy]]`` with a ``path`` is executed as a **fresh module on every load**: two
entries using the same file with different options get independent
:class:`~supervisor.policy.PolicySet` objects, and a reload (SIGHUP) sees the file's
current contents. The file is compiled from its source (no ``__pycache__`` is written
next to it, no stale bytecode is used). The module stays in :data:`sys.modules` under
``seccomp_policy_<name>`` (dataclasses, pickle and typing look modules up there); the
next load of the same name replaces it.

A ``[[policy]]`` with an ``entry_point`` is imported normally: the module, and so its
PolicySet, is shared by the whole process and is not re-executed on reload (its options
are applied again). One entry point can therefore back only one ``[[policy]]``.

Whatever a policy module does at import (SyntaxError, ImportError, a PolicyError from
``@policy.on("no_such_call")``, ``sys.exit()``), the caller gets a ConfigError naming the
entry: a broken policy never crashes the daemon.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path

from .config import Config, PolicyConfig, read_toml, validate_config
from .errors import ConfigError, is_daemon_own
from .policy import PolicySet

__all__ = ["check_config", "load_policies", "load_policy", "module_name"]

MODULE_PREFIX = "seccomp_policy_"


def module_name(policy_name: str) -> str:
    """The :data:`sys.modules` name of the module loaded for ``policy_name`` from a path.

    Injective over valid policy names (``a-b`` and ``a_b`` get different modules).
    """
    escaped = (policy_name.replace("_", "__").replace(".", "_d").replace("-", "_h"))
    return MODULE_PREFIX + escaped


def load_policy(pc: PolicyConfig, config_file: str) -> PolicySet:
    """Load the PolicySet of one ``[[policy]]`` entry, rename it to ``pc.name`` and apply
    ``pc.options``.

    Raises ConfigError: key ``policy[i].path`` / ``policy[i].entry_point`` if the module
    cannot be loaded or holds no single PolicySet; ``policy[i].options.<key>`` (or
    ``policy[i].options``) if the options are refused.
    """
    field = "path" if pc.path is not None else "entry_point"
    file, key = pc.location(config_file, field)
    what = str(pc.path) if pc.path is not None else str(pc.entry_point)
    try:
        if pc.path is not None:
            policy_set = _from_path(pc.name, pc.path)
        else:
            assert pc.entry_point is not None
            policy_set = _from_entry_point(pc.entry_point)
    except _NotAPolicy as exc:
        raise ConfigError(file, key, f"{what}: {exc}") from None
    except BaseException as exc:  # a policy's bug (errors.is_daemon_own)
        if is_daemon_own(exc):
            raise
        raise ConfigError(file, key, f"cannot load {what}: {type(exc).__name__}: {exc}") from None
    _rename(policy_set, pc.name)
    _apply_options(policy_set, pc, config_file)
    return policy_set


def load_policies(config: Config) -> dict[str, PolicySet]:
    """Load every ``[[policy]]`` of ``config``: name → PolicySet, in config order.

    Raises ConfigError for the first entry that fails (see :func:`load_policy`), and for
    two entries whose entry points give the same shared PolicySet.
    """
    loaded, errors = _load_all(config.policies, config.file)
    if errors:
        raise errors[0]
    return loaded


def check_config(path: str | Path) -> list[str]:
    """Every problem of the config file at ``path`` and of the policies it names, one
    readable line each (``FILE: KEY: REASON``); empty if all is well.

    Collects as much as possible: all independent config errors, and every policy that
    fails to load (the entries that parsed are loaded even when other parts are broken).
    Never raises for a bad config or policy.
    """
    file = str(path)
    try:
        data = read_toml(path)
    except ConfigError as exc:
        return [str(exc)]
    errors, policies = validate_config(data, file)
    _, load_errors = _load_all(policies, file)
    return [str(e) for e in [*errors, *load_errors]]


# --------------------------------------------------------------------------- internals


class _NotAPolicy(Exception):
    """The module loaded, but does not hold exactly one PolicySet."""


def _load_all(policies: Sequence[PolicyConfig],
              config_file: str) -> tuple[dict[str, PolicySet], list[ConfigError]]:
    loaded: dict[str, PolicySet] = {}
    owner: dict[int, PolicyConfig] = {}
    errors: list[ConfigError] = []
    for pc in policies:
        try:
            policy_set = load_policy(pc, config_file)
        except ConfigError as exc:
            errors.append(exc)
            continue
        first = owner.get(id(policy_set))
        if first is not None:
            file, key = pc.location(config_file, "entry_point")
            errors.append(ConfigError(
                file, key,
                f"{pc.entry_point} is the same PolicySet as policy {first.name!r}: an "
                f"imported module is shared, so it can back only one [[policy]] (load "
                f"the file by path to get independent copies)"))
            continue
        owner[id(policy_set)] = pc
        loaded[pc.name] = policy_set
    return loaded, errors


def _from_path(name: str, path: Path) -> PolicySet:
    modname = module_name(name)
    source = path.read_bytes()
    # The loader only gives the module its metadata (__file__, __spec__, and source for
    # tracebacks); the code is compiled here so that no bytecode cache is read or written.
    loader = importlib.machinery.SourceFileLoader(modname, str(path))
    spec = importlib.util.spec_from_file_location(modname, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    code = compile(source, str(path), "exec", dont_inherit=True)
    previous = sys.modules.get(modname)
    sys.modules[modname] = module
    try:
        exec(code, module.__dict__)
        return _find_policy_set(module)
    except BaseException:
        if previous is not None:
            sys.modules[modname] = previous
        else:
            sys.modules.pop(modname, None)
        raise


def _from_entry_point(entry_point: str) -> PolicySet:
    modname, _, attr = entry_point.partition(":")
    module = importlib.import_module(modname)
    if not attr:
        return _find_policy_set(module)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _NotAPolicy(f"{modname} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, PolicySet):
        raise _NotAPolicy(f"{attr} is a {type(obj).__name__}, not a PolicySet")
    return obj


def _find_policy_set(module: types.ModuleType) -> PolicySet:
    """The module's ``policy`` attribute if it is a PolicySet, else its only PolicySet."""
    named = getattr(module, "policy", None)
    if isinstance(named, PolicySet):
        return named
    found = {name: value for name, value in vars(module).items()
             if isinstance(value, PolicySet)}
    unique = {id(v): v for v in found.values()}
    if len(unique) == 1:
        return next(iter(unique.values()))
    if not unique:
        raise _NotAPolicy("defines no PolicySet (expected `policy = PolicySet(...)`)")
    names = ", ".join(sorted(found))
    raise _NotAPolicy(f"defines several PolicySets ({names}); name the one to use `policy`")


def _rename(policy_set: PolicySet, name: str) -> None:
    """Give the set the operator's name for it (routes, metrics and logs use it)."""
    policy_set.name = name


def _apply_options(policy_set: PolicySet, pc: PolicyConfig, config_file: str) -> None:
    try:
        policy_set.apply_options(pc.options)
    except ValueError as exc:
        message = str(exc)
        head, sep, reason = message.partition(": ")
        if sep and head.startswith("options.") and len(head) > len("options."):
            file, key = pc.location(config_file, head)
            raise ConfigError(file, key, reason) from None
        file, key = pc.location(config_file, "options")
        raise ConfigError(file, key, message) from None
    except BaseException as exc:  # a policy's bug (errors.is_daemon_own)
        if is_daemon_own(exc):
            raise
        file, key = pc.location(config_file, "options")
        raise ConfigError(file, key, f"the policy's configure hook failed: "
                                     f"{type(exc).__name__}: {exc}") from None

