"""The daemon's container image, built by deploy/image/build.sh and run under podman as
deploy/kubernetes/daemonset.yaml runs it (issue 18, parts 1 and 6).

The DaemonSet is translated to ``podman run`` options field by field (host pid
namespace, the capabilities it adds and drops, no_new_privs, a read-only root, its
volumes: the socket directory and the kubelet's seccomp directory as host directories,
the ConfigMaps as kubelet lays them out, with ``..data`` symlinks); a field the
translation does not know fails the test, so a change to the DaemonSet is never silently
left untested. Its init container installs the pods' profiles, its daemon serves a runc
container on the host whose seccomp section is the installed hardening.json, its probes
run as the kubelet runs them, /metrics is scraped inside the pod's network namespace.

The rootfs tarball is cached by build.sh (``/var/cache/seccomp-supervisor/image``):
only the first run on a machine pays for mmdebstrap. Everything runs in a private podman
storage (``tests/podman.py``); every container is removed by name when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .podman import ULIMITS, PodmanSession, podman_session
from .runtime import container, make_bundle, unique_id

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "deploy" / "image" / "build.sh"
MANIFESTS = ROOT / "deploy" / "kubernetes"
POD_ANNOTATIONS = {"io.kubernetes.cri.container-type": "container",
                   "io.kubernetes.cri.sandbox-namespace": "shop",
                   "io.kubernetes.cri.sandbox-name": "web-0",
                   "io.kubernetes.cri.container-name": "app"}


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [doc for path in sorted(MANIFESTS.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    [doc] = [d for d in docs
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


# --------------------------------------------------------------------------- translation
# A pod's fields as podman options, for what the DaemonSet uses. Unknown fields raise: a
# new field in the DaemonSet must be translated here (or said to need nothing).

POD_FIELDS = {"hostPID", "hostNetwork", "automountServiceAccountToken", "priorityClassName",
              "terminationGracePeriodSeconds", "tolerations", "initContainers", "containers",
              "volumes"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports",
                    "readinessProbe", "livenessProbe", "startupProbe", "restartPolicy",
                    "resources", "securityContext", "volumeMounts"}
SECURITY_FIELDS = {"runAsUser", "privileged", "allowPrivilegeEscalation",
                   "readOnlyRootFilesystem", "capabilities", "seccompProfile",
                   "appArmorProfile"}


def _known(what: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{what}: no podman translation for {sorted(unknown)} "
                         "(extend tests/test_image.py)")


@dataclass(frozen=True)
class Volume:
    """Where a pod volume lives on this host: a directory bound into the containers."""

    directory: Path
    read_only: bool = False


def pod_options(pod: Mapping[str, Any]) -> list[str]:
    """The pod-level options every container of the pod gets."""
    _known("pod spec", pod, POD_FIELDS)
    options = ["--pid=host"] if pod.get("hostPID") else []
    # Not the host's network: the pod's own namespace; loopback is all the test needs
    # (it scrapes /metrics from inside, as the Service reaches the pod's address).
    options.append("--network=host" if pod.get("hostNetwork") else "--network=none")
    if "terminationGracePeriodSeconds" in pod:
        options.append(f"--stop-timeout={pod['terminationGracePeriodSeconds']}")
    return options


def container_options(ctr: Mapping[str, Any], volumes: Mapping[str, Volume]) -> list[str]:
    """``podman run`` options for one container of the pod (not the image, not the
    command)."""
    _known(f"container {ctr['name']}", ctr, CONTAINER_FIELDS)
    options: list[str] = []
    if ctr.get("imagePullPolicy") in ("IfNotPresent", "Never"):
        options.append("--pull=never")  # the image is only in local storage
    for env in ctr.get("env", []):
        options.append(f"--env={env['name']}={env['value']}")
    security = ctr.get("securityContext", {})
    _known(f"securityContext of {ctr['name']}", security, SECURITY_FIELDS)
    if "runAsUser" in security:
        options.append(f"--user={security['runAsUser']}")
    if security.get("privileged"):
        options.append("--privileged")
    if security.get("allowPrivilegeEscalation") is False:
        options.append("--security-opt=no-new-privileges")
    if security.get("readOnlyRootFilesystem"):
        # podman's --read-only adds tmpfs on /run, /tmp and /var/tmp; the kubelet does not.
        options += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = security.get("capabilities", {})
    options += [f"--cap-drop={cap}" for cap in capabilities.get("drop", [])]
    options += [f"--cap-add=CAP_{cap}" for cap in capabilities.get("add", [])]
    seccomp = security.get("seccompProfile", {"type": "RuntimeDefault"})["type"]
    if seccomp == "Unconfined":
        options.append("--security-opt=seccomp=unconfined")
    elif seccomp != "RuntimeDefault":  # RuntimeDefault: podman's own default profile
        raise ValueError(f"seccompProfile {seccomp}: no podman translation")
    apparmor = security.get("appArmorProfile", {"type": "RuntimeDefault"})["type"]
    if apparmor == "Unconfined":
        options.append("--security-opt=apparmor=unconfined")
    elif apparmor != "RuntimeDefault":
        raise ValueError(f"appArmorProfile {apparmor}: no podman translation")
    for mount in ctr.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        suffix = ":ro" if mount.get("readOnly") or volume.read_only else ""
        options.append(f"--volume={volume.directory}:{mount['mountPath']}{suffix}")
    return options


def kubelet_configmap(directory: Path, data: Mapping[str, str]) -> Path:
    """A ConfigMap volume as the kubelet writes it: the files in a timestamped
    directory, ``..data`` a symlink to it, each key a symlink through ``..data``."""
    stamp = directory / "..2026_12_06_12_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, text in data.items():
        (stamp / key).write_text(text)
        (stamp / key).chmod(0o644)
    (directory / "..data").symlink_to(stamp.name)
    for key in data:
        (directory / key).symlink_to(f"..data/{key}")
    return directory


def pod_volumes(pod: Mapping[str, Any], base: Path, host_paths: Mapping[str, Path],
                configmaps: Mapping[str, Mapping[str, str]] | None = None,
                ) -> dict[str, Volume]:
    """Each volume of the pod on this host: hostPaths at ``host_paths[PATH]`` (test
    directories standing in for the node's), ConfigMaps from deploy/kubernetes/ in the
    kubelet's layout (read-only, as the kubelet mounts them; ``configmaps`` replaces
    the data of those it names), emptyDirs as a directory
    (disk or ``medium: Memory`` alike): shared by the pod's containers and kept across
    their restarts, as the kubelet keeps them."""
    volumes: dict[str, Volume] = {}
    for volume in pod["volumes"]:
        name = volume["name"]
        if "hostPath" in volume:
            directory = host_paths[volume["hostPath"]["path"]]
            directory.mkdir(parents=True, exist_ok=True)
            volumes[name] = Volume(directory)
        elif "configMap" in volume:
            data = (configmaps or {}).get(volume["configMap"]["name"]) or manifest(
                "ConfigMap", volume["configMap"]["name"])["data"]
            volumes[name] = Volume(kubelet_configmap(base / name, data), read_only=True)
        elif "emptyDir" in volume:
            (base / name).mkdir(mode=0o755)
            volumes[name] = Volume(base / name)
        else:
            raise ValueError(f"volume {name}: no podman translation for {volume}")
    return volumes


def test_translation_refuses_what_it_does_not_know() -> None:
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    [daemon] = pod["containers"]
    volumes = {v["name"]: Volume(Path("/nonexistent")) for v in pod["volumes"]}
    options = container_options(daemon, volumes)
    assert "--cap-drop=ALL" in options and "--cap-add=CAP_SYS_PTRACE" in options
    assert "--security-opt=no-new-privileges" in options and "--read-only" in options
    with pytest.raises(ValueError, match="hostIPC"):
        pod_options({**pod, "hostIPC": True})
    with pytest.raises(ValueError, match="runAsNonRoot"):
        container_options({**daemon, "securityContext": {"runAsNonRoot": True}}, volumes)
    with pytest.raises(ValueError, match="lifecycle"):
        container_options({**daemon, "lifecycle": {}}, volumes)


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class Built:
    tag: str
    seconds: float
    size: int
    log: str


@pytest.fixture(scope="module")
def pm() -> Iterator[PodmanSession]:
    with podman_session("root", storage_driver="overlay") as session:
        yield session


@pytest.fixture(scope="module")
def image(pm: PodmanSession) -> Built:
    """build.sh into the session's storage, with the default tag (the DaemonSet's
    image); the rootfs tarball from its cache when an earlier run made it."""
    env = {**os.environ, "PODMAN": " ".join(pm.argv()),
           "PYTHON": sys.executable}
    started = time.monotonic()
    done = subprocess.run([str(BUILD)], env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    tag = done.stdout.strip().splitlines()[-1]
    size = int(pm.sync("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    return Built(tag, seconds, size, done.stderr)


def test_image_is_small_and_has_what_the_daemonset_runs(pm: PodmanSession,
                                                        image: Built) -> None:
    print(f"\nimage {image.tag}: {image.size / 1e6:.0f} MB, build.sh {image.seconds:.0f} s")
    print("\n".join(line for line in image.log.splitlines() if line.startswith("build.sh")))
    spec = manifest("DaemonSet")["spec"]["template"]["spec"]
    # The DaemonSet's image name resolves to what build.sh tagged (podman tries
    # localhost/ for a short name first, as the node's image store would hold it).
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {
        image.tag.removeprefix("localhost/")}
    assert image.size < 160e6, image.size
    name = pm.name("image-contents")
    with pm.sync_container(name):
        done = pm.sync("run", "--name", name, "--runtime", pm.runtime_path("runc"),
                       "--network=none", *ULIMITS, "--pull=never", image.tag, "sh", "-c",
                       "for c in seccomp-supervisor sh cp mv cat; do command -v $c; done; "
                       "ls /usr/share/seccomp-supervisor/policies; "
                       "seccomp-supervisor --version; "
                       "for c in gcc cc pip pip3; do command -v $c; done "
                       "|| echo no-compiler-no-pip; "
                       "find / -xdev -name '*.whl' | wc -l",
                       check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:5] == ["/usr/local/bin/seccomp-supervisor", "/usr/bin/sh", "/usr/bin/cp",
                         "/usr/bin/mv", "/usr/bin/cat"], done.stdout
    for policy in sorted(p.name for p in (ROOT / "policies").glob("*.py")):
        assert policy in lines, (policy, done.stdout)
    assert "no-compiler-no-pip" in lines, done.stdout
    assert lines[-1] == "0", "the wheels stayed in the image"


def cached_rootfs(image: Built) -> Path:
    [path] = re.findall(r"^build\.sh: rootfs (?:from the cache|built in \d+ s): (\S+)$",
                        image.log, re.M)
    return Path(path)


@pytest.mark.parametrize("planted", ["cache directory others may write",
                                     "tarball of another uid",
                                     "cache inside a directory others may write"])
def test_build_refuses_a_rootfs_someone_else_could_have_planted(
        tmp_path: Path, pm: PodmanSession, image: Built, planted: str) -> None:
    """The cached rootfs becomes an image that runs as root on every node: a tarball in
    a cache directory that others may write (itself or a directory above it), or owned
    by another uid, is refused (here a copy of the real one: it would build)."""
    cache = tmp_path / "cache"
    if planted == "cache inside a directory others may write":
        # Our cache directory, but whoever may write to its parent may rename it away
        # and put a directory of theirs, with their tarball, in its place.
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared").chmod(0o777)
        cache = tmp_path / "shared" / "cache"
    cache.mkdir()
    tarball = cache / cached_rootfs(image).name
    shutil.copyfile(cached_rootfs(image), tarball)
    if planted == "cache directory others may write":
        cache.chmod(0o1777)
    elif planted == "tarball of another uid":
        os.chown(tarball, 65534, 65534)
    env = {**os.environ, "PODMAN": " ".join(pm.argv()), "PYTHON": sys.executable,
           "SECCOMP_SUPERVISOR_IMAGE_CACHE": str(cache)}
    done = subprocess.run([str(BUILD), "--tag", "localhost/seccomp-supervisor:planted"],
                          env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "is not ours alone" in done.stderr, done.stderr[-2000:]
    assert pm.sync("image", "exists", "localhost/seccomp-supervisor:planted",
                   check=False).returncode == 1


# --------------------------------------------------------------------------- the pod


@dataclass
class Pod:
    pm: PodmanSession
    image: str
    spec: dict[str, Any]
    volumes: dict[str, Volume]
    socket_dir: Path       # the node's /run/seccomp-supervisor
    seccomp_dir: Path      # the node's /var/lib/kubelet/seccomp
    names: list[str]

    def run_args(self, ctr: Mapping[str, Any], name: str, *extra: str) -> list[str]:
        """``run -d`` of one of the pod's containers, its command and args as given."""
        return ["run", "--detach", "--name", name, "--runtime", self.pm.runtime_path("runc"),
                *pod_ulimits(), *pod_options(self.spec), *container_options(ctr, self.volumes),
                *extra, ctr["image"], *ctr.get("command", []), *ctr.get("args", [])]

    async def start(self, ctr: Mapping[str, Any], *extra: str) -> str:
        name = self.pm.name(f"img-{ctr['name']}")
        self.names.append(name)
        done = await self.pm.podman(*self.run_args(ctr, name, *extra))
        assert done.returncode == 0, done.stderr
        return name

    async def wait_exit(self, name: str, timeout: float = 60) -> int:
        done = await self.pm.podman("wait", name, timeout=timeout)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    async def logs(self, name: str) -> str:
        done = await self.pm.podman("logs", name)
        return done.stdout + done.stderr

    async def probe(self, name: str, probe: Mapping[str, Any],
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The probe's exec command until it succeeds (the kubelet's periodSeconds,
        shortened)."""
        deadline = trio.current_time() + timeout
        while True:
            done = await self.pm.exec(name, probe["exec"]["command"])
            if done.returncode == 0 or trio.current_time() > deadline:
                return done
            await trio.sleep(0.2)

    async def scrape(self, name: str, port: int) -> str:
        """GET /metrics from inside the pod's network namespace (the Service's path)."""
        done = await self.pm.exec(name, [
            "python3", "-c", "import sys, urllib.request; sys.stdout.write(urllib.request."
            f"urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read().decode())"])
        assert done.returncode == 0, done.stderr
        return done.stdout


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def pod_ulimits() -> list[str]:
    """The node runtime's fd limit, as high as this test may give: containerd 1.x and
    CRI-O give containers a hard RLIMIT_NOFILE of 1048576 (the daemon raises its soft
    limit to it); podman's own default would raise it past what this host's root may
    (no CAP_SYS_RESOURCE, tests/podman.py)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=1024:1024"]


@asynccontextmanager
async def daemonset_pod(pm: PodmanSession, image: Built,
                        configmaps: Mapping[str, Mapping[str, str]] | None = None,
                        ) -> AsyncIterator[Pod]:
    """The DaemonSet's pod on this host; every container it started removed on exit."""
    base = Path(tempfile.mkdtemp(prefix="img-", dir="/tmp"))  # short: sun_path is 108
    spec = manifest("DaemonSet")["spec"]["template"]["spec"]
    socket_dir, seccomp_dir = base / "run-seccomp-supervisor", base / "kubelet-seccomp"
    volumes = pod_volumes(spec, base, {"/run/seccomp-supervisor": socket_dir,
                                       "/var/lib/kubelet/seccomp": seccomp_dir},
                          configmaps)
    pod = Pod(pm, image.tag, spec, volumes, socket_dir, seccomp_dir, [])
    try:
        yield pod
    finally:
        with trio.CancelScope(shield=True):
            for name in pod.names:
                await pm.podman("rm", "-f", "-t", "0", "--ignore", name)
        shutil.rmtree(base, ignore_errors=True)


def host_bundle(path: Path, pod: Pod, script: str, control: Path | None = None) -> Path:
    """A runc bundle on the host: the profile the init container installed (its
    listenerPath moved to the test's socket directory), a pod's annotations; ``control``
    a host directory at /ctl (read-only) to tell the container things."""
    profile = json.loads((pod.seccomp_dir / "seccomp-supervisor" / "hardening.json")
                         .read_text())
    assert profile["listenerPath"] == "/run/seccomp-supervisor/notify.sock"
    profile["listenerPath"] = str(pod.socket_dir / "notify.sock")
    bundle = make_bundle(path, ["sh", "-c", script], annotations=POD_ANNOTATIONS)
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["seccomp"] = profile
    if control is not None:
        config["mounts"].append({"destination": "/ctl", "type": "bind",
                                 "source": str(control), "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


async def start_daemonset(pod: Pod) -> str:
    """The init containers in order, as the kubelet runs them: each to completion, or a
    native sidecar (``restartPolicy: Always``) until its startupProbe passes; then the
    daemon until its readiness probe passes. Returns the daemon container's name."""
    for init in pod.spec["initContainers"]:
        name = await pod.start(init)
        if init.get("restartPolicy") == "Always":
            started = await pod.probe(name, init["startupProbe"])
            assert started.returncode == 0, await pod.logs(name)
        else:
            assert await pod.wait_exit(name) == 0, await pod.logs(name)
    [daemon] = pod.spec["containers"]
    name = await pod.start(daemon)
    ready = await pod.probe(name, daemon["readinessProbe"])
    assert ready.returncode == 0, await pod.logs(name)
    return name


async def wait_output(ctr: Any, pattern: str, timeout: float = 30) -> str:
    with trio.fail_after(timeout):
        while not re.search(pattern, ctr.output()):
            await trio.sleep(0.05)
    text: str = ctr.output()
    return text


async def test_daemonset_pod_serves_a_runc_container_on_the_host(
        tmp_path: Path, pm: PodmanSession, image: Built) -> None:
    async with daemonset_pod(pm, image) as pod:
        name = await start_daemonset(pod)
        # The init container installed every profile where the kubelet looks.
        profiles = manifest("ConfigMap", "seccomp-supervisor-profiles")["data"]
        installed = pod.seccomp_dir / "seccomp-supervisor"
        assert sorted(p.name for p in installed.iterdir()) == sorted(profiles)
        for key, text in profiles.items():
            assert (installed / key).read_text() == text

        bundle = host_bundle(tmp_path / "bundle", pod,
                             "touch /tmp/f; chmod 4755 /tmp/f; echo setuid=$?; "
                             "chmod 0755 /tmp/f; echo plain=$?; exec sleep 60")
        async with container("runc", bundle, unique_id("img-e2e")) as ctr:
            result = await ctr.run(detach=True)
            assert result.returncode == 0, result.stderr
            output = await wait_output(ctr, r"plain=\d")
            # hardening.py, from the image, refused the set-uid bit and let the rest run.
            assert "setuid=1" in output and "plain=0" in output, output
            assert "Operation not permitted" in output, output

            [daemon] = pod.spec["containers"]
            alive = await pod.probe(name, daemon["livenessProbe"], timeout=0)
            assert alive.returncode == 0, alive.stderr
            status = await pm.exec(name, [*daemon["livenessProbe"]["exec"]["command"],
                                          "--json"])
            [session] = json.loads(status.stdout)["sessions"]
            assert session["container"] == ctr.id
            assert (session["pod_namespace"], session["pod_name"], session["name"]) == (
                "shop", "web-0", "app")
            assert session["policies"] == ["hardening", "cluster"]

            metrics = await pod.scrape(name, daemon["ports"][0]["containerPort"])
            samples = parse_metrics(metrics)
            key = (("decision", "deny"), ("policy", "hardening"), ("syscall", "chmod"))
            assert samples[("seccomp_supervisor_notifications_total", key)] == 1.0
            assert samples[("seccomp_supervisor_sessions", ())] == 1.0
            # The image's wheel carries the compiled hot loop (built on the host).
            [hot_loop] = [dict(labels)["hot_loop"] for metric, labels in samples
                          if metric == "seccomp_supervisor_build_info"]
            assert hot_loop == "c"
            # The audit line of the refusal, on the container's stdout (the pod's log).
            logs = await pod.logs(name)
            [audit] = [json.loads(line) for line in logs.splitlines()
                       if line.startswith("{") and ctr.id in line]
            assert (audit["syscall"], audit["decision"], audit["policy"]) == (
                "chmod", "deny", "hardening"), audit

        # The kubelet stops a pod with SIGTERM: the daemon exits 0 and removes its pid file.
        stopped = await pm.podman("stop", "-t", "30", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert await pod.wait_exit(name) == 0, await pod.logs(name)


# One line per round: two notified calls, a set-uid chmod the policy refuses (EPERM) and
# a plain one it lets run; each line says what both got. Runs until /ctl/stop appears.
LOOP = """
touch /tmp/f
i=0
while [ ! -e /ctl/stop ]; do
  e=$(chmod 4755 /tmp/f 2>&1); a=$?
  p=$(chmod 0755 /tmp/f 2>&1); b=$?
  echo "round $i $a $b $e $p"
  i=$((i + 1))
done
echo done
"""


# Added to the ConfigMap's chain for the restart test: holds the next plain chmod for a
# second when the test asks (a file in the pod's /tmp), after saying so: the test kills
# the daemon exactly while it has that call received and not answered.
PROBE = """
import os

import trio

from supervisor.policy import PolicySet

policy = PolicySet("probe")


@policy.on("chmod")
async def hold(n):
    if n.args[1] & 0o7000 == 0 and os.path.exists("/tmp/hold-next"):
        os.unlink("/tmp/hold-next")
        with open("/tmp/holding", "w") as f:
            f.write(str(n.id))
        await trio.sleep(1)
    return None
"""


def with_probe(config: Mapping[str, str]) -> dict[str, str]:
    text = config["config.toml"]
    chain = 'policies = ["hardening", "cluster"]'
    assert chain in text
    text = text.replace(chain, 'policies = ["hardening", "cluster", "probe"]')
    text += '\n[[policy]]\nname = "probe"\npath = "probe.py"\n'
    return {**config, "config.toml": text, "probe.py": PROBE}


def rounds(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("round ")]


async def wait_rounds(ctr: Any, count: int, what: str, timeout: float = 60) -> int:
    """Until the loop has printed ``count`` rounds; a call never answered stops it."""
    with trio.move_on_after(timeout):
        while len(rounds(ctr.output())) < count:
            await trio.sleep(0.05)
        return len(rounds(ctr.output()))
    raise AssertionError(f"{what}: the loop stopped at round {len(rounds(ctr.output()))}: "
                         f"a call not answered\n{ctr.output()[-2000:]}")


async def test_killed_daemon_container_restarts_and_loses_no_call(
        tmp_path: Path, pm: PodmanSession, image: Built) -> None:
    """SIGKILL the daemon's container three times while a runc container on the host
    calls in a loop, and start it again as the kubelet does (restartPolicy: Always, the
    same volumes): the fd keeper beside it gives the listener back, the in-flight journal
    answers what the killed process had received, and every call of every round is
    answered by the policy: none lost (the loop would stop), none ENOSYS."""
    kills = 3
    config = with_probe(manifest("ConfigMap", "seccomp-supervisor-config")["data"])
    async with daemonset_pod(pm, image, {"seccomp-supervisor-config": config}) as pod:
        name = await start_daemonset(pod)
        [daemon] = pod.spec["containers"]
        pod_tmp = pod.volumes["tmp"].directory
        control = tmp_path / "ctl"
        control.mkdir()
        bundle = host_bundle(tmp_path / "bundle", pod, LOOP, control=control)
        async with container("runc", bundle, unique_id("img-restart")) as ctr:
            result = await ctr.run(detach=True)
            assert result.returncode == 0, result.stderr
            seen = await wait_rounds(ctr, 50, "before the first kill")
            marks, recovered = [], []
            for kill in range(kills):
                # The probe holds a call; the kill comes while the daemon has it.
                (pod_tmp / "hold-next").touch()
                with trio.fail_after(20):
                    while not (pod_tmp / "holding").exists():
                        await trio.sleep(0.01)
                killed = await pm.podman("kill", "--signal", "KILL", name)
                assert killed.returncode == 0, killed.stderr
                (pod_tmp / "holding").unlink()
                assert await pod.wait_exit(name) == 137
                marks.append(len(rounds(ctr.output())))
                started = await pm.podman("start", name)
                assert started.returncode == 0, started.stderr
                ready = await pod.probe(name, daemon["readinessProbe"])
                assert ready.returncode == 0, await pod.logs(name)
                seen = await wait_rounds(ctr, len(rounds(ctr.output())) + 50,
                                         f"after restart {kill + 1}")
                # A listener closed with the killed process: its calls fail with ENOSYS.
                assert "Function not implemented" not in ctr.output(), ctr.output()[-2000:]
                samples = parse_metrics(
                    await pod.scrape(name, daemon["ports"][0]["containerPort"]))
                # This process serves the container again from the keeper...
                assert samples[("seccomp_supervisor_sessions_restored_total",
                                (("source", "fdstore"),))] == 1.0
                # ...and answered the call the killed one held, from the journal.
                recovered.append(sum(
                    value for (metric, _), value in samples.items()
                    if metric == "seccomp_supervisor_notifications_recovered_total"))
            (control / "stop").touch()
            with trio.fail_after(30):
                while "done" not in ctr.output():
                    await trio.sleep(0.05)
            lines = rounds(ctr.output())
        print(f"\n{len(lines)} rounds ({2 * len(lines)} notified calls), daemon SIGKILLed "
              f"at rounds {marks} with a call in flight; answered from the journal after "
              f"each restart: {recovered}")
        assert recovered == [1.0] * kills
        assert seen <= len(lines)
        assert "Function not implemented" not in ctr.output(), ctr.output()[-2000:]
        for i, line in enumerate(lines):
            _, number, setuid, plain, *message = line.split(" ", 4)
            assert int(number) == i, line  # every round once, in order
            assert (setuid, plain) == ("1", "0"), line
            assert "Operation not permitted" in message[0], line
