"""Choose the policy chain for a container: pure functions over the config.

The routes of the config are tried in order; the first one whose ``match`` holds decides.
All conditions present in a match must hold; each is an :func:`fnmatch.fnmatchcase` glob
(``*``, ``?``, ``[...]``, case-sensitive, ``*`` also matches ``/`` and newlines).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config, RouteMatch, RouteMode
from .policy import Container

__all__ = ["RouteChoice", "matches", "parse_labels", "route_for"]


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The chain for one container: policy names in order, the mode, and which
    ``[[route]]`` chose it (``None``: no route matched, the chain is
    ``[defaults].policies``)."""

    policies: tuple[str, ...]
    mode: RouteMode
    route_index: int | None


def parse_labels(metadata: str) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a ``listenerMetadata`` string.

    One pair per line (``\\n``; a ``\\r`` before it is trimmed with the other blanks).
    Key and value are stripped of surrounding whitespace; the value runs to the end of
    the line and may contain ``=``. Lines without ``=`` or with an empty key are ignored;
    when a key repeats, the last line wins. There is no quoting and no other separator.
    Never raises.
    """
    labels: dict[str, str] = {}
    for line in metadata.split("\n"):
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key:
            labels[key] = value.strip()
    return labels


def matches(match: RouteMatch, container: Container) -> bool:
    """True if every condition of ``match`` holds for ``container``.

    Labels are ``container.labels``, or ``parse_labels(container.metadata)`` when the
    container carries none. A label or annotation key the container lacks does not match.
    """
    if match.metadata is not None and not fnmatchcase(container.metadata, match.metadata):
        return False
    if match.container is not None and not fnmatchcase(container.id, match.container):
        return False
    if match.labels:
        labels = container.labels or parse_labels(container.metadata)
        if not _all_match(match.labels, labels):
            return False
    return not match.annotations or _all_match(match.annotations, container.annotations)


def route_for(container: Container, config: Config) -> RouteChoice:
    """The chain for ``container``: the first matching ``[[route]]`` of ``config``, else
    ``[defaults].policies`` in enforce mode. Never raises."""
    for route in config.routes:
        if matches(route.match, container):
            return RouteChoice(route.policies, route.mode, route.index)
    return RouteChoice(config.defaults.policies, "enforce", None)


def _all_match(globs: Mapping[str, str], values: Mapping[str, str]) -> bool:
    for key, glob in globs.items():
        value = values.get(key)
        if value is None or not fnmatchcase(value, glob):
            return False
    return True
