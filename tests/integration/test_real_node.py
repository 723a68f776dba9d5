"""A real node (containerd + runc + kubelet v1.35, testbed.node.realnode) in the local
stack: what it registers, real cgroup limits, in-place resize as the real kubelet does
it, and a teardown that leaves nothing (ADR 0014).

Runs in the default ``make test`` where the machine allows a real node (root, writable
cgroups, overlayfs); skipped, saying why, there or with ``CHSCALE_NODE=simulated``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.k8s.client import Kube, NotFound
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged, resize_refused, resize_vm
from core.constants import POD_MEMORY_OVERHEAD, GiB
from core.podlayout import vmm_socket_path
from core.quantity import parse_bytes
from testbed.controlplane.launcher import ControlPlane
from testbed.localstack.stack import NodeSpec, Stack
from testbed.node.realnode import RealNode, cgroup_hierarchies

from .conftest import real_node_tests

NODE_NAME = "real-node"
WAIT_S = 90.0
MI = 1024 * 1024
# Containers merge by name, so a patch names only what it changes.
STRATEGIC = "application/strategic-merge-patch+json"

_run, _why = real_node_tests()
pytestmark = pytest.mark.skipif(not _run, reason=_why)


@pytest.fixture(scope="module")
def stack(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("realnode"),
        nodes=[NodeSpec(NODE_NAME)],
        control_plane=control_plane,
        webhook=True,
        kubelet="real",
    )
    s.start()
    yield s
    s.stop()


def _wait(what: str, probe: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def _pod(name: str, cpu: str, memory: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            "containers": [
                {
                    "name": "main",
                    "image": "chscale.local/pause:3.10",
                    "imagePullPolicy": "Never",
                    "resources": {
                        "requests": {"cpu": cpu, "memory": memory},
                        "limits": {"cpu": cpu, "memory": memory},
                    },
                    "resizePolicy": [
                        {"resourceName": "cpu", "restartPolicy": "NotRequired"},
                        {"resourceName": "memory", "restartPolicy": "NotRequired"},
                    ],
                }
            ],
        },
    }


def _memory_limit(node: RealNode, pod_uid: str) -> int | None:
    """The pod-level cgroup's memory limit, read from the cgroup file system."""
    return _pod_memory_file(node, pod_uid, "memory.limit_in_bytes", "memory.max")


def _memory_usage(node: RealNode, pod_uid: str) -> int | None:
    """What the pod's processes hold, as the cgroup counts it (the OOM killer's view)."""
    return _pod_memory_file(node, pod_uid, "memory.usage_in_bytes", "memory.current")


def _pod_memory_file(node: RealNode, pod_uid: str, v1: str, v2: str) -> int | None:
    for hierarchy in cgroup_hierarchies():
        # The v1 memory controller, or the v2 unified hierarchy.
        for leaf, name in ((v1, "memory"), (v2, "unified")):
            if hierarchy.name not in (name, "cgroup", "memory,"):
                continue
            pod_dir = hierarchy / node.cgroup_root.lstrip("/") / "kubepods" / f"pod{pod_uid}" / leaf
            if pod_dir.is_file():
                text = pod_dir.read_text().strip()
                return None if text == "max" else int(text)
    return None


def _running(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    path = f"/api/v1/namespaces/{namespace}/pods/{name}"
    return _wait(f"{name} Running", lambda: (p := kube.get(path))["status"].get("phase")
                 == "Running" and p)  # fmt: skip


def test_the_node_is_a_real_kubelet_with_containerd(stack: Stack, kube: Kube) -> None:
    node = kube.get(f"/api/v1/nodes/{NODE_NAME}")
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.35."), info
    assert info["containerRuntimeVersion"].startswith("containerd://2."), info
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
    # The node daemon looks for VMM sockets under the real kubelet's pods directory.
    root = stack.socket_root(NODE_NAME)
    assert root == stack.real_nodes[NODE_NAME].pods_root
    argv = stack.children[f"daemon-{NODE_NAME}"].argv
    assert argv[argv.index("--vmm-socket-root") + 1] == str(root)


def test_resize_in_place_moves_the_real_cgroup(stack: Stack, kube: Kube, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    kube.create(pods, _pod("grower", "100m", "64Mi"))
    pod = _running(kube, namespace, "grower")
    uid = pod["metadata"]["uid"]
    node = stack.real_nodes[NODE_NAME]
    assert _wait("64Mi cgroup", lambda: _memory_limit(node, uid) == 64 * MI)
    kube.patch(
        f"{pods}/grower/resize",
        {"spec": {"containers": [{"name": "main", "resources": {
            "requests": {"cpu": "200m", "memory": "128Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"}}}]}},
        STRATEGIC,
    )  # fmt: skip
    assert _wait("grown cgroup", lambda: _memory_limit(node, uid) == 128 * MI)

    def reported() -> bool:
        status = kube.get(f"{pods}/grower")["status"]
        res = (status.get("containerStatuses") or [{}])[0].get("resources") or {}
        return (res.get("limits") or {}).get("memory") == "128Mi"

    _wait("status resources 128Mi", reported)
    kube.patch(
        f"{pods}/grower/resize",
        {"spec": {"containers": [{"name": "main", "resources": {
            "requests": {"cpu": "100m", "memory": "96Mi"},
            "limits": {"cpu": "100m", "memory": "96Mi"}}}]}},
        STRATEGIC,
    )  # fmt: skip
    assert _wait("shrunk cgroup", lambda: _memory_limit(node, uid) == 96 * MI)


def test_a_resize_beyond_the_node_is_infeasible(stack: Stack, kube: Kube, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    kube.create(pods, _pod("too-big", "100m", "64Mi"))
    _running(kube, namespace, "too-big")
    capacity = kube.get(f"/api/v1/nodes/{NODE_NAME}")["status"]["capacity"]["cpu"]
    beyond = str(int(capacity) * 2)
    kube.patch(
        f"{pods}/too-big/resize",
        {"spec": {"containers": [{"name": "main", "resources": {
            "requests": {"cpu": beyond}, "limits": {"cpu": beyond}}}]}},
        STRATEGIC,
    )  # fmt: skip

    def infeasible() -> dict[str, Any] | None:
        for c in kube.get(f"{pods}/too-big")["status"].get("conditions") or []:
            if c.get("type") == "PodResizePending" and c.get("reason") == "Infeasible":
                return c
        return None

    condition = _wait("PodResizePending Infeasible", infeasible)
    assert "capacity" in condition.get("message", ""), condition


class _Sampler(threading.Thread):
    """Samples the VM pod's cgroup memory limit against what the guest holds (the VMM's
    own ``vm.info``): the limit must never drop below guest + the pod's VMM overhead, or
    the kernel's OOM killer would take the VMM (RESIZE.md's safety promise)."""

    def __init__(self, node: RealNode, pod_uid: str) -> None:
        super().__init__(daemon=True)
        self.node, self.uid = node, pod_uid
        self.socket = vmm_socket_path(str(node.pods_root), pod_uid)
        self.stop = threading.Event()
        self.samples = 0
        self.violations: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with CloudHypervisorClient(self.socket, timeout=2.0) as vmm:
            while not self.stop.wait(0.02):
                limit = _memory_limit(self.node, self.uid)
                try:
                    guest = vmm.info().guest_memory
                except Exception as exc:  # a busy VMM: sample again, keep the last errors
                    self.errors = [*self.errors[-4:], repr(exc)]
                    continue
                if limit is None:
                    self.errors = [*self.errors[-4:], "no cgroup memory limit found"]
                    continue
                self.samples += 1
                if limit < guest + POD_MEMORY_OVERHEAD:
                    self.violations.append((limit, guest))


def _oom_kills(node: RealNode, pod_uid: str) -> int:
    for hierarchy in cgroup_hierarchies():
        pod_dir = hierarchy / node.cgroup_root.lstrip("/") / "kubepods" / f"pod{pod_uid}"
        control = pod_dir / "memory.oom_control"
        if control.is_file():
            for line in control.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return 0


def test_a_vm_grows_shrinks_and_is_refused_on_the_real_node(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    vm = {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "metadata": {"name": "real-vm"},
        "spec": {
            "instance": {
                "cpu": {"sockets": 1, "coresPerSocket": 1},
                # A ceiling far past the machine, so that the node, not the VMM, refuses.
                "memory": {"size": "256Mi", "maxSize": "1Ti"},
            },
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
        },
    }
    apply_vm(kube, vm, namespace)
    follower = Follower(kube, namespace, "real-vm")
    follower.wait(converged, WAIT_S)
    pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-real-vm")
    uid = pod["metadata"]["uid"]
    node = stack.real_nodes[NODE_NAME]
    sampler = _Sampler(node, uid)
    sampler.start()
    try:
        resize_vm(kube, namespace, "real-vm", None, "512Mi")
        grown = follower.wait(converged, WAIT_S)
        assert grown["status"]["allocated"]["memory"] == "512Mi", grown["status"]
        assert (_memory_limit(node, uid) or 0) >= 512 * MI + POD_MEMORY_OVERHEAD
        # The guest's memory is really held (the simulator's ballast): the cgroup counts
        # what a real VMM's guest would cost it, so a pod shrunk under it would OOM.
        _wait("the cgroup holds the guest", lambda: (_memory_usage(node, uid) or 0) >= 512 * MI)
        resize_vm(kube, namespace, "real-vm", None, "384Mi")
        shrunk = follower.wait(converged, WAIT_S)
        assert shrunk["status"]["allocated"]["memory"] == "384Mi", shrunk["status"]
        capacity = kube.get(f"/api/v1/nodes/{NODE_NAME}")["status"]["capacity"]["memory"]
        beyond = f"{parse_bytes(capacity) * 2 // GiB}Gi"
        resize_vm(kube, namespace, "real-vm", None, beyond)
        refused = follower.wait(lambda o: resize_refused(o) is not None, WAIT_S)
        assert "capacity" in (resize_refused(refused) or ""), refused["status"]
        assert refused["status"]["phase"] == "Running"
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert sampler.samples > 0, sampler.errors
    assert sampler.violations == []
    assert _oom_kills(node, uid) == 0
    status = kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-real-vm")["status"]
    assert status["containerStatuses"][0]["restartCount"] == 0
    kube.patch(vm_path(namespace, "real-vm"), {"metadata": {"finalizers": None}})
    kube.delete(vm_path(namespace, "real-vm"))


def _ready(kube: Kube, name: str) -> bool:
    try:
        node = kube.get(f"/api/v1/nodes/{name}")
    except NotFound:
        return False
    conditions = node.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _global_leftovers(node: RealNode) -> list[str]:
    """What the machine shows of a run, looked up independently of RealNode's records."""
    left = []
    with open("/proc/self/mountinfo") as handle:
        left += [f"mount {line.split()[4]}" for line in handle if str(node.run_dir) in line]
    left += [
        f"cgroup {h / node.cgroup_root.lstrip('/')}"
        for h in cgroup_hierarchies()
        if (h / node.cgroup_root.lstrip("/")).exists()
    ]
    if Path("/sys/class/net", node.bridge).exists():
        left.append(f"bridge {node.bridge}")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(node.run_dir) in cmdline or str(node.state_dir) in cmdline:
                left.append(f"process {entry.name}: {cmdline[:120]}")
    if node.run_dir.exists():
        left.append(f"directory {node.run_dir}")
    return left


def test_two_runs_do_not_collide_and_leave_nothing(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    kube = Kube(control_plane.api_client())
    # One of the two is shown more CPUs than the machine has (its kubelet in a mount
    # namespace of its own): its mounts must still reach runc, and go at the end.
    nodes = [
        RealNode(f"twin-{i}", tmp_path / f"twin-{i}", control_plane, cpus=cpus)
        for i, cpus in enumerate((6, None))
    ]
    try:
        for node in nodes:
            node.start()
        a, b = nodes
        assert a.run_dir != b.run_dir and a.cgroup_root != b.cgroup_root
        assert a.bridge != b.bridge and a.subnet != b.subnet
        for node in nodes:
            _wait(f"{node.name} Ready", lambda n=node: _ready(kube, n.name))
        # A running pod on each: mounts (rootfs, netns, tokens), cgroups, the bridge.
        pods = f"/api/v1/namespaces/{namespace}/pods"
        for node in nodes:
            pod = _pod(f"on-{node.name}", "100m", "64Mi")
            pod["spec"]["nodeName"] = node.name
            del pod["spec"]["nodeSelector"]
            kube.create(pods, pod)
        for node in nodes:
            _running(kube, namespace, f"on-{node.name}")
            assert node.leftovers(), "a running node shows nothing: the check could not fail"
            assert _global_leftovers(node)
        assert kube.get(f"/api/v1/nodes/{a.name}")["status"]["capacity"]["cpu"] == "6"
        # The pod's service-account token, mounted by that kubelet, is seen out here.
        assert any("kubernetes.io~projected" in m for m in a.leftovers()), a.leftovers()
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert node.leftovers() == []
        assert _global_leftovers(node) == []
        kube.delete(f"/api/v1/nodes/{node.name}")


_OWNER = """
import sys, time
from pathlib import Path
from testbed.controlplane.launcher import ControlPlane
from testbed.node.realnode import RealNode
cp = ControlPlane(Path(sys.argv[2]))
cp.start()
node = RealNode("orphaned", Path(sys.argv[1]), cp)
node.start()
print(node.run_id, flush=True)
time.sleep(600)
"""


def test_a_killed_owners_run_is_swept_by_the_next(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from testbed.node.realnode import cleanup_stale_runs

    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(tmp_path / "orphaned"), str(tmp_path / "cp")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()
        assert run_id, "the owner did not start its node"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    orphan = RealNode("orphaned", tmp_path / "orphaned", ControlPlane(), run_id=run_id)
    assert orphan.leftovers(), "nothing left by a killed owner: the check could not fail"
    assert run_id in cleanup_stale_runs()
    assert orphan.leftovers() == []
    assert _global_leftovers(orphan) == []
