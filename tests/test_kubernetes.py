"""deploy/kubernetes/: every manifest valid for a named Kubernetes version (offline, with
the schemas kubernetes-validate bundles, strict: unknown fields are errors), the
DaemonSet's privileges equal to the systemd unit's, the ConfigMap's config and policies
accepted by the real config loader, and its seccomp profiles by `profile check`."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trio
import yaml

from supervisor.config import load_config
from supervisor.policy import Container
from supervisor.testing import load, run_policy

from .daemon_harness import running_daemon
from .runtime import container, make_bundle, unique_id

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "systemd" / "seccomp-supervisor.service"
# The oldest version the manifests need: appArmorProfile in a securityContext is 1.30.
KUBERNETES_VERSION = "1.30.0"
CLI = [sys.executable, "-m", "supervisor"]
# The image's policies (placeholder path in the ConfigMap) are this repository's.
IMAGE_POLICIES = "/usr/share/seccomp-supervisor/policies/"


def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.relative_to(MANIFESTS)}[{i}]", doc))
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for _, d in documents()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def test_there_are_manifests() -> None:
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace", "Pod", "Service"]


@pytest.mark.parametrize(("where", "doc"), documents(), ids=[w for w, _ in documents()])
def test_manifest_is_valid_for_the_named_kubernetes_version(where: str,
                                                            doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_the_api_server_would() -> None:
    ds = one("DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitie"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(ds))
    wrong_type["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def unit_capabilities() -> set[str]:
    [line] = [line for line in UNIT.read_text().splitlines()
              if line.startswith("CapabilityBoundingSet=")]
    return {cap.removeprefix("CAP_") for cap in line.split("=", 1)[1].split()}


def test_daemonset_privileges_are_the_units() -> None:
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    [ctr] = spec["containers"]
    sc = ctr["securityContext"]
    assert set(sc["capabilities"]["add"]) == unit_capabilities()
    assert len(sc["capabilities"]["add"]) == len(unit_capabilities())
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert spec["hostPID"] is True and spec["hostNetwork"] is False
    assert "hostUsers" not in spec  # setns needs CAP_SYS_ADMIN in the node's user ns
    for init in spec["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert init["securityContext"]["privileged"] is False


def test_daemonset_upgrades_by_surge_and_takeover() -> None:
    ds = one("DaemonSet")["spec"]
    assert ds["updateStrategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    [ctr] = ds["template"]["spec"]["containers"]
    assert "--takeover" in ctr["command"]
    pid_file = ctr["command"][ctr["command"].index("--pid-file") + 1]
    assert ctr["readinessProbe"]["exec"]["command"] == ["cat", pid_file]


def test_daemonset_keeps_sessions_in_a_native_sidecar_keeper() -> None:
    """The daemon's sessions survive its crashes in the fd keeper (supervisor/keeper.py):
    a native sidecar (started first, restarted on its own, stopped last) sharing a
    pod-private emptyDir with the daemon, with no capability at all."""
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    [keeper] = [c for c in spec["initContainers"] if c["name"] == "fd-keeper"]
    [ctr] = spec["containers"]
    assert keeper["restartPolicy"] == "Always"
    command = keeper["command"]
    assert command[:2] == ["seccomp-supervisor", "keep"]
    path = command[command.index("--socket") + 1]
    assert ctr["command"][ctr["command"].index("--fd-keeper") + 1] == path
    assert path in keeper["startupProbe"]["exec"]["command"][-1]
    directory = str(Path(path).parent)
    keeper_volume = volumes_by_mount(keeper, spec)[directory]
    assert volumes_by_mount(ctr, spec)[directory] is keeper_volume
    assert "emptyDir" in keeper_volume
    # No other container of the pod reaches it.
    name = next(m["name"] for m in keeper["volumeMounts"] if m["mountPath"] == directory)
    users = [c["name"] for c in spec["initContainers"] + spec["containers"]
             if any(m["name"] == name for m in c.get("volumeMounts", []))]
    assert sorted(users) == sorted([keeper["name"], ctr["name"]])
    sc = keeper["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # The CLI accepts exactly these arguments.
    from supervisor.cli import _parser

    assert _parser().parse_args(command[1:]).max_fds == 6144
    args = _parser().parse_args(ctr["command"][1:])
    assert args.takeover and args.fd_keeper == path


def volumes_by_mount(container: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def configmap_config(tmp_path: Path) -> Path:
    data = one("ConfigMap", "seccomp-supervisor-config")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text.replace(IMAGE_POLICIES, f"{ROOT}/policies/"))
    return tmp_path / "config.toml"


def test_paths_agree_between_config_daemonset_and_profiles(tmp_path: Path) -> None:
    config = load_config(str(configmap_config(tmp_path)))
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    [ctr] = spec["containers"]
    mounts = volumes_by_mount(ctr, spec)
    socket_dir = str(Path(config.listen.socket).parent)
    assert mounts[socket_dir]["hostPath"]["path"] == socket_dir
    # The liveness probe asks the daemon's own control socket.
    assert config.listen.control_socket in ctr["livenessProbe"]["exec"]["command"]
    assert config.listen.control_socket.startswith(socket_dir + "/")
    assert config.metrics.listen == f"0.0.0.0:{ctr['ports'][0]['containerPort']}"
    assert mounts["/etc/seccomp-supervisor"]["configMap"]["name"] == \
        "seccomp-supervisor-config"
    assert "/etc/seccomp-supervisor/config.toml" in ctr["command"]
    # Every profile hands its listener to that socket.
    for name, text in one("ConfigMap", "seccomp-supervisor-profiles")["data"].items():
        assert yaml.safe_load(text)["listenerPath"] == config.listen.socket, name
    # ...and is installed where the kubelet resolves localhostProfile.
    [init] = [c for c in spec["initContainers"] if c["name"] == "install-profiles"]
    init_mounts = volumes_by_mount(init, spec)
    assert init_mounts["/host-seccomp"]["hostPath"]["path"] == "/var/lib/kubelet/seccomp"
    assert init_mounts["/profiles"]["configMap"]["name"] == "seccomp-supervisor-profiles"
    assert "dest=/host-seccomp/seccomp-supervisor" in init["command"][-1]
    # The example pod names an installed profile.
    pod = one("Pod")["spec"]["containers"][0]["securityContext"]["seccompProfile"]
    directory, _, profile = pod["localhostProfile"].partition("/")
    assert pod["type"] == "Localhost" and directory == "seccomp-supervisor"
    assert profile in one("ConfigMap", "seccomp-supervisor-profiles")["data"]
    # The Service scrapes the container's metrics port.
    service = one("Service")["spec"]
    assert service["ports"][0]["targetPort"] == ctr["ports"][0]["name"]
    assert service["selector"].items() <= one("DaemonSet")["spec"]["template"]["metadata"][
        "labels"].items()


def test_configmap_config_passes_check(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "check", "--config", str(configmap_config(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr


def test_configmap_profiles_pass_profile_check(tmp_path: Path) -> None:
    for name, text in one("ConfigMap", "seccomp-supervisor-profiles")["data"].items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run([*CLI, "profile", "check", "--strict", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"OK \(0 errors, 0 warnings", result.stdout), result.stdout


def _ptrace_cont_nobody() -> None:
    """ptrace(PTRACE_CONT, a pid that cannot exist): ESRCH when it runs, so an EPERM
    can only be the policy's."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(101, 7, 2**22 + 1, 0, 0) == -1:  # SYS_ptrace (x86_64), PTRACE_CONT
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.parametrize(("namespace", "expected"), [
    ("debug", errno.ESRCH), ("prod", errno.EPERM), ("", errno.EPERM)])
def test_configmap_policy_decides_on_the_pod_namespace(
        tmp_path: Path, namespace: str, expected: int) -> None:
    """cluster.py (from the ConfigMap, with its options there) reads the namespace from
    the container, as routes do, on a real ptrace call."""
    configmap_config(tmp_path)
    policy = load(tmp_path / "cluster.py", ptrace_namespaces=["debug"])
    pod = Container(id="c", pod_namespace=namespace, pod_name="p", name="app")
    assert run_policy(policy, _ptrace_cont_nobody, container=pod).errno == expected


@pytest.mark.runtime
async def test_configmap_config_and_profile_serve_a_pod_container(tmp_path: Path) -> None:
    """What a node runs: the ConfigMap's config (paths moved into tmp_path, metrics off),
    its policies, and a runc container whose seccomp section is the ConfigMap's
    hardening.json and whose annotations are what CRI-O writes for a pod."""
    (tmp_path / "etc").mkdir()
    config_text = configmap_config(tmp_path / "etc").read_text()
    (tmp_path / "sock").mkdir()
    config_text = (config_text.replace("/run/seccomp-supervisor/", f"{tmp_path}/sock/")
                   .replace('listen = "0.0.0.0:9469"', 'listen = ""')
                   .replace('path = "cluster.py"', f'path = "{tmp_path}/etc/cluster.py"'))
    profile = json.loads(one("ConfigMap", "seccomp-supervisor-profiles")["data"][
        "hardening.json"])
    async with running_daemon(tmp_path, config_text) as d:
        profile["listenerPath"] = d.socket_path
        bundle = make_bundle(
            tmp_path / "bundle",
            ["sh", "-c", "touch /tmp/f; chmod 4755 /tmp/f; echo setuid=$?; "
                         "chmod 0755 /tmp/f; echo plain=$?; exec sleep 60"],
            annotations={"io.kubernetes.pod.namespace": "default",
                         "io.kubernetes.pod.name": "hardened",
                         "io.kubernetes.container.name": "app"})
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["seccomp"] = profile
        (bundle / "config.json").write_text(json.dumps(spec))
        async with container("runc", bundle, unique_id("k8s-cm")) as ctr:
            result = await ctr.run(detach=True)
            assert result.returncode == 0, result.stderr
            with trio.fail_after(15):
                while "plain=" not in ctr.output():
                    await trio.sleep(0.02)
            assert "setuid=1" in ctr.output() and "plain=0" in ctr.output(), ctr.output()
            [session] = d.daemon.status()["sessions"]
            assert (session["pod_namespace"], session["pod_name"], session["name"]) == (
                "default", "hardened", "app")
            assert session["policies"] == ["hardening", "cluster"]
            assert session["labels"] == {"profile": "hardening"}
