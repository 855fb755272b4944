"""supervisor.router: labels from listenerMetadata, and the first matching route."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.config import Config, RouteMatch, parse_config
from supervisor.policy import Container
from supervisor.router import (
    RouteChoice,
    container_name,
    matches,
    parse_labels,
    pod_name,
    pod_namespace,
    route_for,
)

FILE = "/etc/seccomp-supervisor/test.toml"


def config(*routes: dict[str, Any], defaults: tuple[str, ...] = ("base",)) -> Config:
    return parse_config({
        "defaults": {"policies": list(defaults)},
        "policy": [{"name": n, "path": f"{n}.py"} for n in ("base", "a", "b", "c")],
        "route": list(routes),
    }, FILE)


def container(id: str = "web-1", metadata: str = "", *,
              annotations: dict[str, str] | None = None,
              labels: dict[str, str] | None = None) -> Container:
    return Container(id=id, metadata=metadata,
                     labels=MappingProxyType(labels if labels is not None
                                             else parse_labels(metadata)),
                     annotations=MappingProxyType(annotations or {}))


# --------------------------------------------------------------------------- parse_labels


@pytest.mark.parametrize(("metadata", "labels"), [
    ("", {}),
    ("team=build", {"team": "build"}),
    ("team=build\nenv=ci", {"team": "build", "env": "ci"}),
    ("team=build\r\nenv=ci\r\n", {"team": "build", "env": "ci"}),
    ("  team =  build  \n", {"team": "build"}),
    ("url=http://x/?a=b", {"url": "http://x/?a=b"}),
    ("empty=", {"empty": ""}),
    ("no equals sign\nk=v", {"k": "v"}),
    ("=value\n  =x\nk=v", {"k": "v"}),
    ("k=1\nk=2", {"k": "2"}),
    ("a=1;b=2", {"a": "1;b=2"}),          # lines only: no other separator
    ("a=1,b=2", {"a": "1,b=2"}),
    ("\n\n\nk=v\n\n", {"k": "v"}),
    ("k=a b c", {"k": "a b c"}),
])
def test_parse_labels(metadata: str, labels: dict[str, str]) -> None:
    assert parse_labels(metadata) == labels


@given(st.text())
def test_parse_labels_never_raises(metadata: str) -> None:
    labels = parse_labels(metadata)
    for key, value in labels.items():
        assert key and key == key.strip() and "=" not in key and "\n" not in key
        assert value == value.strip() and "\n" not in value


# --------------------------------------------------------------------------- route_for


def test_no_routes_gives_the_defaults() -> None:
    assert route_for(container(), config()) == RouteChoice(("base",), "enforce", None)


def test_no_match_gives_the_defaults_in_enforce_mode() -> None:
    c = config({"match": {"container": "ci-*"}, "policies": ["a"], "mode": "shadow"})
    assert route_for(container("web-1"), c) == RouteChoice(("base",), "enforce", None)


def test_empty_defaults() -> None:
    c = config(defaults=())
    assert route_for(container(), c) == RouteChoice((), "enforce", None)


@pytest.mark.parametrize(("glob", "cid", "hit"), [
    ("ci-*", "ci-42", True),
    ("ci-*", "ci-", True),
    ("ci-*", "CI-42", False),            # case-sensitive
    ("ci-*", "web-ci-1", False),         # anchored
    ("ci-?", "ci-4", True),
    ("ci-?", "ci-42", False),
    ("ci-[0-9]*", "ci-7x", True),
    ("ci-[0-9]*", "ci-x7", False),
    ("abc", "abc", True),
    ("abc", "abcd", False),
    ("*", "", True),
])
def test_container_glob(glob: str, cid: str, hit: bool) -> None:
    c = config({"match": {"container": glob}, "policies": ["a"]})
    expected = RouteChoice(("a",), "enforce", 0) if hit else RouteChoice(("base",), "enforce",
                                                                          None)
    assert route_for(container(cid), c) == expected


@pytest.mark.parametrize(("glob", "metadata", "hit"), [
    ("team=build*", "team=build-farm\nenv=ci", True),   # the raw string, newlines included
    ("team=build", "team=build\nenv=ci", False),        # the whole string must match
    ("*env=ci*", "team=build\nenv=ci", True),
    ("*env=ci*", "", False),
    ("", "", True),
])
def test_metadata_glob(glob: str, metadata: str, hit: bool) -> None:
    c = config({"match": {"metadata": glob}, "policies": ["a"]})
    assert route_for(container(metadata=metadata), c).route_index == (0 if hit else None)


@pytest.mark.parametrize(("globs", "metadata", "hit"), [
    ({"team": "build*"}, "team=build-farm", True),
    ({"team": "build*"}, "team=web", False),
    ({"team": "build*"}, "env=ci", False),                 # missing label: no match
    ({"team": "*"}, "env=ci", False),                      # even for "*"
    ({"team": "*"}, "team=", True),
    ({"team": "build", "env": "ci"}, "env=ci\nteam=build", True),
    ({"team": "build", "env": "ci"}, "team=build\nenv=prod", False),
    ({"team": "build"}, "team = build \n", True),          # trimmed
])
def test_labels(globs: dict[str, str], metadata: str, hit: bool) -> None:
    c = config({"match": {"labels": globs}, "policies": ["a"]})
    assert route_for(container(metadata=metadata), c).route_index == (0 if hit else None)


def test_labels_come_from_the_metadata_when_the_container_has_none() -> None:
    c = config({"match": {"labels": {"team": "build"}}, "policies": ["a"]})
    bare = Container(id="x", metadata="team=build")
    assert route_for(bare, c).route_index == 0


def test_labels_given_by_the_container_are_used() -> None:
    c = config({"match": {"labels": {"team": "build"}}, "policies": ["a"]})
    assert route_for(container(metadata="", labels={"team": "build"}), c).route_index == 0


@pytest.mark.parametrize(("globs", "annotations", "hit"), [
    ({"io.kubernetes.pod.namespace": "ci"}, {"io.kubernetes.pod.namespace": "ci"}, True),
    ({"io.kubernetes.pod.namespace": "ci"}, {"io.kubernetes.pod.namespace": "prod"}, False),
    ({"io.kubernetes.pod.namespace": "*"}, {}, False),          # missing key: no match
    ({"io.kubernetes.pod.namespace": "*"}, {"other": "ci"}, False),
    ({"a": "1", "b": "2*"}, {"a": "1", "b": "22", "c": "x"}, True),
    ({"a": "1", "b": "2*"}, {"a": "1"}, False),
])
def test_annotations(globs: dict[str, str], annotations: dict[str, str], hit: bool) -> None:
    c = config({"match": {"annotations": globs}, "policies": ["a"]})
    assert route_for(container(annotations=annotations), c).route_index == (0 if hit else None)


def test_all_conditions_must_hold() -> None:
    c = config({"match": {"container": "ci-*", "labels": {"team": "build"},
                          "metadata": "*env=ci*", "annotations": {"ns": "ci"}},
                "policies": ["a"]})
    meta = "team=build\nenv=ci"
    good = container("ci-1", meta, annotations={"ns": "ci"})
    assert route_for(good, c).route_index == 0
    for bad in (container("web-1", meta, annotations={"ns": "ci"}),
                container("ci-1", "team=web\nenv=ci", annotations={"ns": "ci"}),
                container("ci-1", "team=build\nenv=prod", annotations={"ns": "ci"}),
                container("ci-1", meta, annotations={"ns": "prod"}),
                container("ci-1", meta)):
        assert route_for(bad, c).route_index is None


def test_first_match_wins() -> None:
    c = config(
        {"match": {"container": "db-*"}, "policies": ["c"]},
        {"match": {"container": "ci-*"}, "policies": ["a"]},
        {"match": {"container": "ci-1*"}, "policies": ["b"]},
        {"match": {"metadata": "*"}, "policies": ["b", "c"], "mode": "shadow"},
    )
    assert route_for(container("ci-10"), c) == RouteChoice(("a",), "enforce", 1)
    assert route_for(container("db-1"), c) == RouteChoice(("c",), "enforce", 0)
    assert route_for(container("web"), c) == RouteChoice(("b", "c"), "shadow", 3)


def test_shadow_mode_and_empty_chain() -> None:
    c = config({"match": {"container": "learn-*"}, "policies": [], "mode": "shadow"})
    assert route_for(container("learn-1"), c) == RouteChoice((), "shadow", 0)


def test_matches_directly() -> None:
    m = RouteMatch(container="a*", labels=MappingProxyType({"k": "v"}))
    assert matches(m, Container(id="ab", metadata="k=v"))
    assert not matches(m, Container(id="ab", metadata="k=w"))
    assert not matches(m, Container(id="b", metadata="k=v"))


# --------------------------------------------------------------------------- container_name

NAME_KEY = "org.seccomp-supervisor.name"


@pytest.mark.parametrize(("value", "name"), [
    ("web", "web"),
    ("  web-1.a_b \n", "web-1.a_b"),
    ("/web", "web"),               # docker's form
    ("//web", ""),                 # only one leading slash goes
    ("", ""),
    ("-web", ""),                  # must start with a letter or digit
    ("web/1", ""),
    ("we b", ""),
    ("web\n2", ""),
    ("w" * 253, "w" * 253),
    ("w" * 254, ""),
    ("wéb", ""),
])
def test_container_name_is_normalised(value: str, name: str) -> None:
    assert container_name({NAME_KEY: value}) == name


def test_container_name_without_the_annotation_is_empty() -> None:
    assert container_name({}) == ""
    assert container_name({"io.kubernetes.cri-o.Created": "x"}) == ""


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=300), max_size=5))
def test_container_name_never_raises_and_is_a_name(annotations: dict[str, str]) -> None:
    name = container_name(annotations)
    assert name == "" or (len(name) <= 253 and name.isascii() and name[0].isalnum())


def test_container_name_route() -> None:
    cfg = config({"match": {"container_name": "web-*"}, "policies": ["a"]})
    named = Container(id="0d8909fad7c9", name="web-1")
    assert route_for(named, cfg) == RouteChoice(("a",), "enforce", 0)
    assert route_for(Container(id="x", name="db"), cfg).route_index is None
    # A container without a name does not match, not even the glob "*".
    star = config({"match": {"container_name": "*"}, "policies": ["a"]})
    assert route_for(Container(id="web-1"), star).route_index is None
    assert route_for(named, star).route_index == 0


def test_container_name_comes_from_the_handoff() -> None:
    from supervisor.handoff import build_state_message, parse_state

    data = build_state_message(pid=5, container_id="0d8909fad7c9", bundle="/b",
                               annotations={NAME_KEY: " web "})
    assert parse_state(data, 1).to_container(0).name == "web"
    plain = build_state_message(pid=5, container_id="web", bundle="/b")
    assert parse_state(plain, 1).to_container(0).name == ""


def test_container_name_survives_the_fd_store() -> None:
    from supervisor.fdstore import container_from_state, session_state

    c = Container(id="abc", annotations=MappingProxyType({NAME_KEY: "web"}), name="web")
    assert container_from_state(session_state(c)).name == "web"


def test_container_name_in_config_must_be_a_string() -> None:
    from supervisor.errors import ConfigError

    with pytest.raises(ConfigError, match=r"route\[0\]\.match\.container_name"):
        config({"match": {"container_name": 5}, "policies": ["a"]})


# --------------------------------------------------------------------------- pods

CONTAINERD = {"io.kubernetes.cri.sandbox-namespace": "prod",
              "io.kubernetes.cri.sandbox-name": "web-7d4b9c-x2x9k",
              "io.kubernetes.cri.container-name": "nginx"}
CRIO = {"io.kubernetes.pod.namespace": "prod",
        "io.kubernetes.pod.name": "web-7d4b9c-x2x9k",
        "io.kubernetes.container.name": "nginx"}


@pytest.mark.parametrize("annotations", [CONTAINERD, CRIO, {**CONTAINERD, **CRIO}],
                         ids=["containerd", "cri-o", "both-agree"])
def test_pod_fields_are_the_same_whichever_runtime(annotations: dict[str, str]) -> None:
    assert pod_namespace(annotations) == "prod"
    assert pod_name(annotations) == "web-7d4b9c-x2x9k"
    assert container_name(annotations) == "nginx"


@pytest.mark.parametrize(("containerd_key", "crio_key", "getter"), [
    ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace", pod_namespace),
    ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name", pod_name),
    ("io.kubernetes.cri.container-name", "io.kubernetes.container.name", container_name),
])
def test_disagreeing_runtime_keys_name_nothing(
        containerd_key: str, crio_key: str, getter: Callable[[Mapping[str, str]], str]) -> None:
    # One runtime writes its own keys last; the other runtime's keys can only come from
    # the pod's author (a passed-through pod annotation). Neither side wins a conflict.
    assert getter({containerd_key: "prod", crio_key: "kube-system"}) == ""
    assert getter({crio_key: "kube-system", containerd_key: "prod"}) == ""
    # ...nor may an invalid value on one key be ignored in favour of the other.
    assert getter({containerd_key: "prod", crio_key: "Prod!"}) == ""


def test_name_annotations_must_agree_with_podmans() -> None:
    assert container_name({"io.kubernetes.container.name": "a", NAME_KEY: "a"}) == "a"
    assert container_name({"io.kubernetes.container.name": "a", NAME_KEY: "b"}) == ""


@pytest.mark.parametrize(("value", "ok"), [
    ("prod", True), ("kube-system", True), ("a", True), ("0", True), ("a" * 63, True),
    ("a" * 64, False), ("", False), ("Prod", False), ("-prod", False), ("prod-", False),
    ("pr.od", False), ("prod\n", False), (" prod", False), ("pröd", False), ("prod_1", False),
])
def test_pod_namespace_is_a_dns1123_label(value: str, ok: bool) -> None:
    for key in ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"):
        assert pod_namespace({key: value}) == (value if ok else "")


@pytest.mark.parametrize(("value", "ok"), [
    ("web", True), ("web-1.example.com", True), ("a" * 63 + "." + "b" * 63, True),
    (".".join(["a" * 63] * 3 + ["a" * 61]), True),  # 253 characters, four labels
    ("a." * 126 + "a", True), ("a." * 126 + "ab", False),  # 253 vs 254 characters
    ("a" * 64, False), ("web..1", False), (".web", False), ("web.", False),
    ("Web", False), ("web\n", False), ("web_1", False), ("", False),
])
def test_pod_name_is_a_dns1123_subdomain(value: str, ok: bool) -> None:
    for key in ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"):
        assert pod_name({key: value}) == (value if ok else "")


_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@given(st.dictionaries(st.sampled_from(["io.kubernetes.cri.sandbox-namespace",
                                        "io.kubernetes.pod.namespace",
                                        "io.kubernetes.cri.sandbox-name",
                                        "io.kubernetes.pod.name", "x"]),
                       st.text(max_size=300) | st.from_regex(_DNS1123_LABEL, fullmatch=True),
                       max_size=5))
def test_pod_fields_never_raise_and_are_kubernetes_names(annotations: dict[str, str]) -> None:
    namespace = pod_namespace(annotations)
    assert namespace == "" or (len(namespace) <= 63 and _DNS1123_LABEL.fullmatch(namespace))
    name = pod_name(annotations)
    assert name == "" or (len(name) <= 253 and all(
        len(part) <= 63 and _DNS1123_LABEL.fullmatch(part) for part in name.split(".")))
    # A value is only ever one of the annotations' values, unchanged.
    assert namespace == "" or namespace in annotations.values()
    assert name == "" or name in annotations.values()


def test_pod_routes() -> None:
    cfg = config({"match": {"pod_namespace": "prod-*", "pod_name": "web-*"},
                  "policies": ["a"]},
                 {"match": {"pod_namespace": "*"}, "policies": ["b"]})
    web = Container(id="1", pod_namespace="prod-eu", pod_name="web-0", name="nginx")
    assert route_for(web, cfg) == RouteChoice(("a",), "enforce", 0)
    assert route_for(Container(id="2", pod_namespace="prod-eu", pod_name="db-0"),
                     cfg).route_index == 1
    # Outside Kubernetes there is no namespace: not even "*" matches.
    assert route_for(Container(id="3", pod_name="web-0"), cfg).route_index is None


def test_pod_fields_come_from_the_handoff_and_survive_the_fd_store() -> None:
    from supervisor.fdstore import container_from_state, session_state
    from supervisor.handoff import build_state_message, parse_state

    for written in (CONTAINERD, CRIO):
        data = build_state_message(pid=5, container_id="0d8909fad7c9", bundle="/b",
                                   annotations=written)
        c = parse_state(data, 1).to_container(0)
        assert (c.pod_namespace, c.pod_name, c.name) == ("prod", "web-7d4b9c-x2x9k", "nginx")
        # Not stored: recomputed from the annotations on restore and takeover.
        state = session_state(c)
        assert "pod_namespace" not in state["container"]
        restored = container_from_state(state)
        assert (restored.pod_namespace, restored.pod_name, restored.name) == (
            "prod", "web-7d4b9c-x2x9k", "nginx")


@pytest.mark.parametrize("key", ["pod_namespace", "pod_name"])
def test_pod_keys_in_config_must_be_strings(key: str) -> None:
    from supervisor.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"route\[0\]\.match\.{key}"):
        config({"match": {key: ["prod"]}, "policies": ["a"]})
    assert config({"match": {key: "x"}, "policies": ["a"]}).routes[0].match == RouteMatch(
        **{key: "x"})


def test_a_looser_pod_namespace_route_is_warned_about_unless_tied_to_a_peer_uid() -> None:
    from supervisor.router import route_warnings

    shadow = config({"match": {"pod_namespace": "dev-*"}, "policies": ["base"],
                     "mode": "shadow"})
    [warning] = route_warnings(shadow)
    assert "route[0]: warning: it matches only what the container's creator writes " \
           "(pod_namespace)" in warning
    tied = config({"match": {"pod_namespace": "dev-*", "peer_uid": [0]},
                   "policies": ["base"], "mode": "shadow"})
    assert route_warnings(tied) == []
    stricter = config({"match": {"pod_name": "web-*"}, "policies": ["base", "a"]})
    assert route_warnings(stricter) == []
