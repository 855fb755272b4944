"""Choose the policy chain for a container: pure functions over the config.

The routes of the config are tried in order; the first one whose ``match`` holds decides.
All conditions present in a match must hold; each is an :func:`fnmatch.fnmatchcase` glob
(``*``, ``?``, ``[...]``, case-sensitive, ``*`` also matches ``/`` and newlines), but
``peer_uid``, a list of uids of which the handing-over process's must be one.

Metadata, labels, the container id and annotations are written by whoever creates the
container; only ``peer_uid`` comes from the kernel (``SO_PEERCRED``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final

from .config import Config, Route, RouteMatch, RouteMode, TraceAnnotationConfig
from .errors import SupervisorError
from .policy import Container

__all__ = ["CONTAINER_NAME_ANNOTATIONS", "POD_NAMESPACE_ANNOTATIONS", "POD_NAME_ANNOTATIONS",
           "TRACE_ANNOTATION", "RouteChoice", "TraceAnnotationError", "TraceRequest",
           "check_trace_permitted", "container_name", "looser_than_defaults", "matches",
           "parse_labels", "parse_trace_annotation", "pod_name", "pod_namespace", "route_for",
           "route_warnings", "trace_request"]

# podman's OCI hook convention (oci-seccomp-bpf-hook): trace the container's system calls
# and write a profile. Value: "of:/abs/out.json" or "of:/abs/out.json;if:/abs/in.json".
TRACE_ANNOTATION: Final = "io.containers.trace-syscall"
_OUTPUT_PREFIX: Final = "of:"

# Where a container's name can be read from what the runtime sends.
# podman 4.3.1 passes the name it was given (`--name`) to no runtime: not in the state
# (whose id is podman's 64-hex id), not in config.json (hostname and HOSTNAME are the short
# id); only conmon's command line and the container's /etc/hosts hold it. So with podman
# the user passes it as an annotation: `--annotation org.seccomp-supervisor.name=NAME`.
# Behind Kubernetes the CRI runtime writes the pod's container name: containerd's CRI
# plugin as io.kubernetes.cri.container-name, CRI-O (copying the kubelet's container
# labels into the annotations) as io.kubernetes.container.name.
CONTAINER_NAME_ANNOTATIONS: Final = ("io.kubernetes.cri.container-name",
                                     "io.kubernetes.container.name",
                                     "org.seccomp-supervisor.name")
# The pod's namespace and name: containerd's CRI plugin, then CRI-O's (kubelet labels).
POD_NAMESPACE_ANNOTATIONS: Final = ("io.kubernetes.cri.sandbox-namespace",
                                    "io.kubernetes.pod.namespace")
POD_NAME_ANNOTATIONS: Final = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
# podman's and docker's rule for names, with Kubernetes' length limit for a DNS name.
_CONTAINER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
# Kubernetes' rules (k8s.io/apimachinery validation): a namespace is a DNS-1123 label, a
# pod name a DNS-1123 subdomain. Checked with fullmatch, so "$" cannot let a "\n" in.
_DNS1123_LABEL: Final = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_POD_NAMESPACE: Final = re.compile(_DNS1123_LABEL)
_POD_NAME: Final = re.compile(rf"(?=.{{1,253}}\Z){_DNS1123_LABEL}(?:\.{_DNS1123_LABEL})*",
                              re.DOTALL)
_INPUT_PREFIX: Final = "if:"


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


def _agreed(annotations: Mapping[str, str], keys: tuple[str, ...],
            normalise: Callable[[str], str]) -> str:
    """The one value the ``keys`` of ``annotations`` that are present agree on, each
    normalised by ``normalise`` (which returns ``""`` for a value that is no valid name);
    ``""`` when none is present, when one is not valid, or when two disagree. Behind a
    CRI runtime only one runtime's keys are written by the runtime itself; the others can
    only come from the pod's creator (a pod annotation passed through), so a conflict
    names nothing rather than letting either side win."""
    found = ""
    for key in keys:
        value = annotations.get(key)
        if value is None:
            continue
        value = normalise(value)
        if not value or (found and value != found):
            return ""
        found = value
    return found


def _normal_container_name(value: str) -> str:
    name = value.strip().removeprefix("/")
    return name if _CONTAINER_NAME.fullmatch(name) else ""


def _exact(pattern: re.Pattern[str]) -> Callable[[str], str]:
    return lambda value: value if pattern.fullmatch(value) else ""


def container_name(annotations: Mapping[str, str]) -> str:
    """The name a container was given, from :data:`CONTAINER_NAME_ANNOTATIONS`
    (containerd's and CRI-O's keys for the name in the pod spec, podman users'
    ``org.seccomp-supervisor.name``), normalised: surrounding blanks and one leading
    ``/`` (docker's form) removed. ``""`` when there is none, when a value is not a name
    (podman's and docker's rule: a letter or digit, then letters, digits, ``_``, ``.``,
    ``-``; at most 253 characters: a value that is no name names nothing), or when two
    of the keys disagree. The annotations are written by whoever creates the container,
    like the id. Pure."""
    return _agreed(annotations, CONTAINER_NAME_ANNOTATIONS, _normal_container_name)


def pod_namespace(annotations: Mapping[str, str]) -> str:
    """The Kubernetes namespace of the container's pod, from
    :data:`POD_NAMESPACE_ANNOTATIONS` (containerd's ``io.kubernetes.cri.sandbox-namespace``,
    CRI-O's ``io.kubernetes.pod.namespace``): ``""`` when there is none, when the value is
    not a namespace name (a DNS-1123 label: at most 63 of ``a-z0-9-``, starting and ending
    with a letter or digit; nothing is stripped or folded), or when both keys are present
    and disagree. Pure."""
    return _agreed(annotations, POD_NAMESPACE_ANNOTATIONS, _exact(_POD_NAMESPACE))


def pod_name(annotations: Mapping[str, str]) -> str:
    """The name of the container's pod, from :data:`POD_NAME_ANNOTATIONS`
    (containerd's ``io.kubernetes.cri.sandbox-name``, CRI-O's ``io.kubernetes.pod.name``),
    under the rules of :func:`pod_namespace` but for a DNS-1123 subdomain (dot-separated
    labels, at most 253 characters). Pure."""
    return _agreed(annotations, POD_NAME_ANNOTATIONS, _exact(_POD_NAME))


def matches(match: RouteMatch, container: Container) -> bool:
    """True if every condition of ``match`` holds for ``container``.

    Labels are ``container.labels``, or ``parse_labels(container.metadata)`` when the
    container carries none. A label or annotation key the container lacks does not match,
    nor does a container without a name a ``container_name`` condition (nor one without
    a pod namespace or pod name a ``pod_namespace`` or ``pod_name`` one);
    nor does a ``peer_uid`` condition a container whose peer uid is unknown.
    """
    if match.peer_uid is not None and container.peer_uid not in match.peer_uid:
        return False
    if match.metadata is not None and not fnmatchcase(container.metadata, match.metadata):
        return False
    if match.container is not None and not fnmatchcase(container.id, match.container):
        return False
    if match.container_name is not None and not (
            container.name and fnmatchcase(container.name, match.container_name)):
        return False
    if match.pod_namespace is not None and not (
            container.pod_namespace
            and fnmatchcase(container.pod_namespace, match.pod_namespace)):
        return False
    if match.pod_name is not None and not (
            container.pod_name and fnmatchcase(container.pod_name, match.pod_name)):
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


def looser_than_defaults(route: Route, defaults: tuple[str, ...]) -> str | None:
    """Why ``route``'s chain is less strict than ``[defaults].policies``, or None.

    Less strict means: its decisions are not enforced (shadow mode), or a policy of the
    default chain is missing from it, or another policy is asked before one of the
    default chain's (the first decision wins, so that one can overrule it). A route whose
    chain starts with the default chain, in order, in enforce mode, is at least as strict.
    Pure."""
    if route.mode == "shadow":
        return "it is in shadow mode: its decisions are recorded, not enforced"
    missing = [name for name in defaults if name not in route.policies]
    if missing:
        return (f"it lacks {', '.join(repr(n) for n in missing)} of "
                f"[defaults].policies")
    for position, name in enumerate(defaults):
        if route.policies[position] != name:
            first = route.policies[position]
            return (f"{first!r} is asked before {name!r} of [defaults].policies, so its "
                    f"decisions overrule it")
    return None


def route_warnings(config: Config) -> list[str]:
    """Warnings for ``seccomp-supervisor check``: routes that match only fields the
    container's creator writes (metadata, labels, container id, annotations) and select
    a chain less strict than ``[defaults].policies`` (see :func:`looser_than_defaults`):
    whoever may create a container can pick that chain. And learn mode by annotation,
    when it is enabled. Pure."""
    warnings = []
    for route in config.routes:
        if not route.match.creator_controlled_only:
            continue
        why = looser_than_defaults(route, config.defaults.policies)
        if why is None:
            continue
        fields = [name for name in ("metadata", "labels", "container", "container_name",
                                    "pod_namespace", "pod_name", "annotations")
                  if getattr(route.match, name)]
        warnings.append(
            f"{config.file}: route[{route.index}]: warning: it matches only what the "
            f"container's creator writes ({', '.join(fields)}) and selects a chain less "
            f"strict than [defaults].policies ({why}); anyone who can create a container "
            f"can choose it. Add match.peer_uid to require the uid that hands the "
            f"listener over")
    trace = config.trace_annotation
    if trace.enabled:
        warnings.append(
            f"{config.file}: trace_annotation: warning: whoever creates a container "
            f"handed over by uid {', '.join(map(str, trace.peer_uid))} may switch it to "
            f"learn mode (every call answered CONTINUE) with the {TRACE_ANNOTATION} "
            f"annotation; behind CRI-O or containerd (runtime run by root) that is anyone "
            f"who may create a pod. Narrow trace_annotation.peer_uid, or disable it")
    return warnings


def _all_match(globs: Mapping[str, str], values: Mapping[str, str]) -> bool:
    for key, glob in globs.items():
        value = values.get(key)
        if value is None or not fnmatchcase(value, glob):
            return False
    return True


class TraceAnnotationError(SupervisorError):
    """The ``io.containers.trace-syscall`` annotation of a container is invalid (the
    container's creator is at fault); the message says why."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """A parsed trace annotation: write the learned profile to ``output``, merged into
    the profile at ``base`` (None: no base)."""

    output: str
    base: str | None = None


def parse_trace_annotation(value: str) -> TraceRequest:
    """Parse an ``io.containers.trace-syscall`` value as podman's hook does.

    At most one ``;``; every part starts with ``of:`` (output) or ``if:`` (base profile),
    the path after it is stripped of surrounding blanks and must be absolute; ``of:`` is
    required. Stricter than the hook: a prefix given twice is refused (the hook keeps the
    last), and so are paths with ``..`` components or NUL characters. Whether the base is
    a readable profile is checked by the caller (that is I/O). Pure; raises
    :class:`TraceAnnotationError`.
    """
    parts = value.split(";")
    if len(parts) > 2:
        raise TraceAnnotationError(f"more than one ';' in {value!r}")
    found: dict[str, str] = {}
    for part in parts:
        prefix = part[:3]
        if prefix not in (_OUTPUT_PREFIX, _INPUT_PREFIX):
            raise TraceAnnotationError(
                f"{part!r} must start with {_OUTPUT_PREFIX!r} (output file) or "
                f"{_INPUT_PREFIX!r} (input profile)")
        what = "output file" if prefix == _OUTPUT_PREFIX else "input profile"
        if prefix in found:
            raise TraceAnnotationError(f"{what} ({prefix!r}) given twice in {value!r}")
        path = part[3:].strip()
        if not posixpath.isabs(path):
            raise TraceAnnotationError(f"the {what} path must be absolute: {path!r}")
        if "\0" in path or ".." in path.split("/"):
            raise TraceAnnotationError(f"the {what} path {path!r} contains '..' or NUL")
        found[prefix] = path
    if _OUTPUT_PREFIX not in found:
        raise TraceAnnotationError(
            f"an output file ({_OUTPUT_PREFIX!r}) is required in {value!r}")
    return TraceRequest(found[_OUTPUT_PREFIX], found.get(_INPUT_PREFIX))


def trace_request(container: Container) -> TraceRequest | None:
    """The container's trace request, None when it has no ``io.containers.trace-syscall``
    annotation. Raises :class:`TraceAnnotationError` for an invalid one."""
    value = container.annotations.get(TRACE_ANNOTATION)
    return None if value is None else parse_trace_annotation(value)


def check_trace_permitted(container: Container, settings: TraceAnnotationConfig) -> None:
    """Whether the operator lets this container choose learn mode by annotation: the
    annotation is the creator's, and learn mode answers every call CONTINUE, so it is
    off unless ``[trace_annotation] enabled``, and then only for listeners handed over
    by a uid of ``[trace_annotation] peer_uid``. Pure; raises
    :class:`TraceAnnotationError` saying why not."""
    if not settings.enabled:
        raise TraceAnnotationError("learn mode by annotation is off ([trace_annotation] "
                                   "enabled = false)")
    if container.peer_uid not in settings.peer_uid:
        raise TraceAnnotationError(
            f"handed over by uid {container.peer_uid}, not one of [trace_annotation] "
            f"peer_uid ({', '.join(map(str, settings.peer_uid))})")
