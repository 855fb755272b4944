"""Pod-aware routing with real runc containers whose config.json carries exactly the
annotations containerd's CRI plugin, then CRI-O, write for a pod's container: the same
routes and the same Container fields whichever runtime wrote them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from .daemon_harness import CLI, RunningDaemon, running_daemon
from .runtime import Container, container, make_bundle, unique_id

pytestmark = pytest.mark.runtime

POLICY = Path(__file__).resolve().parent / "policies" / "containers.py"
NOTIFY = ("mkdir", "mkdirat", "openat")

ROUTED = f"""
[defaults]
policies = ["fallback"]

[[policy]]
name = "fallback"
path = "{POLICY}"
options = {{ tag = "fallback", errno = 1 }}

[[policy]]
name = "prod"
path = "{POLICY}"
options = {{ tag = "prod", errno = 13 }}

[[policy]]
name = "dev"
path = "{POLICY}"
options = {{ tag = "dev", errno = 30 }}

[[route]]
match = {{ pod_namespace = "prod", container_name = "app" }}
policies = ["prod"]

[[route]]
match = {{ pod_namespace = "dev-*", pod_name = "web-*" }}
policies = ["dev"]
"""


def containerd(namespace: str, pod: str, name: str) -> dict[str, str]:
    """What containerd's CRI plugin (1.6, 1.7, 2.x) writes for a pod's container, plus
    the keys it always adds next to them."""
    return {"io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "5f" * 32,
            "io.kubernetes.cri.sandbox-namespace": namespace,
            "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.container-name": name,
            "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"}


def crio(namespace: str, pod: str, name: str) -> dict[str, str]:
    """What CRI-O writes: the kubelet's container labels copied into the annotations,
    next to CRI-O's own io.kubernetes.cri-o.* keys."""
    return {"io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.name": pod,
            "io.kubernetes.container.name": name,
            "io.kubernetes.pod.uid": "0b3e2a1c-6a3d-4c5e-9f00-000000000000",
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.Namespace": namespace}


# (annotations, tag that answers, its errno message, expected pod namespace/pod/name)
CASES: list[tuple[dict[str, str], str, str, str]] = [
    (containerd("prod", "web-0", "app"), "prod", "Permission denied", "prod/web-0/app"),
    (crio("prod", "web-1", "app"), "prod", "Permission denied", "prod/web-1/app"),
    (containerd("dev-eu", "web-2", "sidecar"), "dev", "Read-only file system",
     "dev-eu/web-2/sidecar"),
    (crio("dev-us", "web-3", "app"), "dev", "Read-only file system", "dev-us/web-3/app"),
    # Same container in the wrong namespace: the container_name alone is not enough.
    (crio("staging", "web-4", "app"), "fallback", "Operation not permitted",
     "staging/web-4/app"),
    # containerd's own keys say prod, a passed-through pod annotation claims CRI-O's key
    # for another namespace: the namespace is unknown, the pod falls to [defaults].
    ({**containerd("dev-eu", "web-5", "app"), "io.kubernetes.pod.namespace": "prod"},
     "fallback", "Operation not permitted", "/web-5/app"),
]


def _inject_line(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith("tag="):
            return dict(part.split("=", 1) for part in line.split(" "))
    raise AssertionError(f"no injected line in {text!r}")


async def _wait_output(ctr: Container, pattern: str, timeout: float = 15) -> str:
    with trio.fail_after(timeout):
        while not re.search(pattern, ctr.output()):
            await trio.sleep(0.02)
    return ctr.output()


async def _status(d: RunningDaemon) -> dict[str, Any]:
    with trio.fail_after(20):
        result = await trio.run_process(
            [*CLI, "status", "--json", "--control", d.control_path],
            capture_stdout=True, capture_stderr=True, check=True)
    status: dict[str, Any] = json.loads(result.stdout)
    return status


async def test_pods_routed_the_same_behind_containerd_and_cri_o(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ROUTED) as d, trio.open_nursery() as nursery:
        ctrs: dict[int, Container] = {}
        started = trio.Semaphore(0)

        async def one(i: int, annotations: dict[str, str]) -> None:
            bundle = make_bundle(tmp_path / f"b{i}", ["sh", "-c", "cat /inject; exec sleep 60"],
                                 notify=NOTIFY, listener_path=d.socket_path,
                                 annotations=annotations)
            async with container("runc", bundle, unique_id("k8s-pod")) as ctr:
                ctrs[i] = ctr
                result = await ctr.run(detach=True)
                assert result.returncode == 0, result.stderr
                started.release()
                await trio.sleep_forever()

        for i, (annotations, *_) in enumerate(CASES):
            nursery.start_soon(one, i, annotations)
        for _ in CASES:
            await started.acquire()

        for i, (_, tag, message, pod) in enumerate(CASES):
            ctr = ctrs[i]
            # The policy reads the pod fields from its Container.
            line = _inject_line(await _wait_output(ctr, r"tag=.*\n"))
            assert (line["tag"], line["pod"]) == (tag, pod), (i, line)
            denied = await ctr.exec(["mkdir", "/tmp/deny-x"])
            assert denied.returncode == 1
            assert f"'/tmp/deny-x': {message}" in denied.stderr.decode(), (i, denied)
            allowed = await ctr.exec(["sh", "-c", "mkdir /tmp/allow-y && test -d /tmp/allow-y"])
            assert allowed.returncode == 0, (i, allowed)

        status = await _status(d)
        by_id = {s["container"]: s for s in status["sessions"]}
        for i, (_, tag, _, pod) in enumerate(CASES):
            session = by_id[ctrs[i].id]
            assert session["policies"] == [tag]
            namespace, pod_name, name = pod.split("/")
            assert (session["pod_namespace"], session["pod_name"], session["name"]) == (
                namespace, pod_name, name), session
        nursery.cancel_scope.cancel()  # the containers are deleted on the way out
