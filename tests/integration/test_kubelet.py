"""The simulated kubelet against the real API server, one fresh node per test.

The kubelet adapter runs in-process (its sync loop in a thread), with the Cloud
Hypervisor simulator as the VMM. Assertions are about the objects the API server holds
(pods, node, lease) and about what the VMM answers, never about calls made.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import VmmUnreachable
from adapters.cloudhypervisor.types import VmmPing
from adapters.k8s.client import Kube, NotFound, load_api_client
from core.constants import GiB, MiB
from core.podlayout import vmm_socket_path
from core.quantity import parse_bytes, parse_millicores
from sim.kubelet import HOSTNAME_LABEL, KubeletConfig
from testbed.kubelet.agent import LEASE_NAMESPACE, KubeletAgent
from testbed.kubelet.vmm import VmmRuntime

pytestmark = pytest.mark.integration

VMM = (sys.executable, "-m", "testbed.chsim.main")
CONTAINER = "vm-manager"
NODE_CPU, NODE_MEMORY = 4000, 8 * GiB
TIMEOUT_S = 30.0


@pytest.fixture
def kube(control_plane: Any) -> Kube:
    return Kube(load_api_client(str(control_plane.kubeconfig_path)))


@pytest.fixture
def ns(namespace: Any) -> str:
    return namespace if isinstance(namespace, str) else namespace["metadata"]["name"]


def placeholder_kernel(directory: str) -> str:
    path = os.path.join(directory, "vmlinux")
    open(path, "wb").close()
    return path


@pytest.fixture
def socket_root() -> Iterator[str]:
    # Short and under /tmp: a Unix socket path must fit in 107 bytes.
    root = tempfile.mkdtemp(prefix="chk-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def pod_body(ns: str, name: str, cpu: str, memory: str, node: str) -> dict[str, Any]:
    """A VM-like pod: one guaranteed container, resizable in place, bound for ``node``."""
    values = {"cpu": cpu, "memory": memory}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeSelector": {HOSTNAME_LABEL: node},
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": CONTAINER,
                    "image": "chscale/vmm:test",
                    "resources": {"requests": values, "limits": values},
                    "resizePolicy": [
                        {"resourceName": "cpu", "restartPolicy": "NotRequired"},
                        {"resourceName": "memory", "restartPolicy": "NotRequired"},
                    ],
                }
            ],
        },
    }


class Node:
    """A running simulated kubelet and the helpers a test needs around it."""

    def __init__(self, kube: Kube, ns: str, agent: KubeletAgent, runtime: VmmRuntime) -> None:
        self.kube, self.ns, self.agent, self.runtime = kube, ns, agent, runtime
        self.name = agent.config.node_name

    def pod_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{name}"

    def create_pod(self, name: str, cpu: str, memory: str) -> dict[str, Any]:
        body = pod_body(self.ns, name, cpu, memory, self.name)
        return self.kube.create(f"/api/v1/namespaces/{self.ns}/pods", body)

    def get(self, name: str) -> dict[str, Any]:
        return self.kube.get(self.pod_path(name))

    def wait(self, name: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.get(name)
            if check(pod):
                return pod
            time.sleep(0.05)
        raise AssertionError(f"pod {name}: {what} not reached in {TIMEOUT_S}s; last: {pod}")

    def running(self, name: str) -> dict[str, Any]:
        return self.wait(name, "Running", lambda p: p.get("status", {}).get("phase") == "Running")

    def resize(self, name: str, cpu: str, memory: str) -> dict[str, Any]:
        return self.kube.resize_pod(self.ns, name, CONTAINER, cpu, memory)

    def history(
        self, pod: dict[str, Any], until: Callable[[dict[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        """Every version of the pod after ``pod`` (from a watch), up to the first one for
        which ``until`` holds."""
        meta = pod["metadata"]
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={meta['name']}",
            "resourceVersion": meta["resourceVersion"],
            "timeoutSeconds": int(TIMEOUT_S),
        }
        seen = []
        path = f"/api/v1/namespaces/{self.ns}/pods"
        for event in self.kube.stream(path, query, timeout=TIMEOUT_S + 5):
            if event.get("type") != "MODIFIED":
                continue
            seen.append(event["object"])
            if until(event["object"]):
                return seen
        raise AssertionError(f"pod {meta['name']}: watch ended first; saw {seen}")

    def delete_all(self) -> None:
        pods = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods")["items"]
        for pod in pods:
            if pod["spec"].get("nodeName") == self.name:
                self.kube.delete(self.pod_path(pod["metadata"]["name"]))
        for pod in pods:
            if pod["spec"].get("nodeName") == self.name:
                self.gone(pod["metadata"]["name"])

    def gone(self, name: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self.get(name)
            except NotFound:
                return
            time.sleep(0.05)
        raise AssertionError(f"pod {name} still exists after {TIMEOUT_S}s")


def node_name() -> str:
    return f"kubelet-{uuid.uuid4().hex[:8]}"


@contextmanager
def kubelet(
    kube: Kube,
    ns: str,
    socket_root: str,
    name: str | None = None,
    every_namespace: bool = False,
    **config: Any,
) -> Iterator[Node]:
    name = name or node_name()
    runtime = VmmRuntime(socket_root, VMM)
    agent = KubeletAgent(
        kube,
        KubeletConfig(name, cpu=NODE_CPU, memory=NODE_MEMORY, **config),
        runtime,
        heartbeat_s=1.0,
        # Other tests leave pending pods behind on the shared API server: not ours to run.
        namespace=None if every_namespace else ns,
    )
    agent.start()
    node = Node(kube, ns, agent, runtime)
    try:
        yield node
        node.delete_all()  # while the kubelet runs, so that it confirms the deletions
    finally:
        agent.stop()
        kube.delete(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}")
        kube.delete(f"/api/v1/nodes/{name}")


def answering(socket: str) -> VmmPing:
    deadline = time.monotonic() + TIMEOUT_S
    with CloudHypervisorClient(socket, timeout=1.0) as vmm:
        while True:
            try:
                return vmm.ping()
            except VmmUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in pod.get("status", {}).get("conditions") or ():
        if c["type"] == type_:
            return c
    return None


def actual(pod: dict[str, Any]) -> tuple[int, int, int, int]:
    """(cpu request, cpu limit, memory request, memory limit) of the container's status."""
    (cs,) = pod["status"]["containerStatuses"]
    r = cs["resources"]
    return (
        parse_millicores(r["requests"]["cpu"]),
        parse_millicores(r["limits"]["cpu"]),
        parse_bytes(r["requests"]["memory"]),
        parse_bytes(r["limits"]["memory"]),
    )


def allocated(pod: dict[str, Any]) -> tuple[int, int]:
    (cs,) = pod["status"]["containerStatuses"]
    a = cs["allocatedResources"]
    return parse_millicores(a["cpu"]), parse_bytes(a["memory"])


def settled(generation: int) -> Callable[[dict[str, Any]], bool]:
    """The kubelet has seen ``generation`` and has nothing left in flight for it."""

    def check(pod: dict[str, Any]) -> bool:
        return (
            pod["status"].get("observedGeneration", 0) >= generation
            and condition(pod, "PodResizeInProgress") is None
            and condition(pod, "PodResizePending") is None
        )

    return check


def test_a_pod_is_bound_and_runs_with_its_resources(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root) as node:
        obj = kube.get(f"/api/v1/nodes/{node.name}")
        assert obj["metadata"]["labels"][HOSTNAME_LABEL] == node.name
        assert parse_millicores(obj["status"]["allocatable"]["cpu"]) == NODE_CPU
        assert parse_bytes(obj["status"]["allocatable"]["memory"]) == NODE_MEMORY
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        lease = kube.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{node.name}"
        )
        assert lease["spec"]["holderIdentity"] == node.name

        node.create_pod("vm-a", "1500m", "1536Mi")
        pod = node.running("vm-a")
        assert pod["spec"]["nodeName"] == node.name
        assert pod["status"]["observedGeneration"] == pod["metadata"]["generation"]
        assert condition(pod, "Ready")["status"] == "True"
        (cs,) = pod["status"]["containerStatuses"]
        assert cs["ready"] is True and cs["started"] is True
        assert "startedAt" in cs["state"]["running"]
        assert actual(pod) == (1500, 1500, 1536 * MiB, 1536 * MiB)
        assert allocated(pod) == (1500, 1536 * MiB)
        # The pod's VMM listens where the node daemon looks for it (once it is up: the
        # container runs from the moment its process starts, as with any runtime).
        uid = pod["metadata"]["uid"]
        assert answering(vmm_socket_path(socket_root, uid)).pid == node.runtime.running()[uid]


def test_a_refused_binding_does_not_hold_up_the_other_pods(kube, ns, socket_root, control_plane):
    # CI run of stop 10: pods left pending in namespaces being deleted (the API server
    # refuses to bind them) stopped every later pod from being bound on that node.
    name = node_name()
    doomed = control_plane.create_namespace(f"{ns[:50]}-gone")
    kube.create(f"/api/v1/namespaces/{doomed}/pods", pod_body(doomed, "stuck", "1", "1Gi", name))
    control_plane.delete_namespace(doomed)
    with kubelet(kube, ns, socket_root, name=name, every_namespace=True) as node:
        node.create_pod("vm-a", "1", "1Gi")
        assert node.running("vm-a")["spec"]["nodeName"] == name
        stuck = kube.get(f"/api/v1/namespaces/{doomed}/pods/stuck")
        assert not stuck["spec"].get("nodeName")


def test_a_resize_goes_through_in_progress_and_completes(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, resize_delay_s=1.0) as node:
        node.create_pod("vm-a", "1", "1Gi")
        node.running("vm-a")
        patched = node.resize("vm-a", "2", "2Gi")
        generation = patched["metadata"]["generation"]
        assert generation == 2
        seen = node.history(patched, settled(generation))
        in_progress = [condition(p, "PodResizeInProgress") for p in seen]
        during = [c for c in in_progress if c is not None]
        assert during, "PodResizeInProgress never appeared"
        assert all(c.get("observedGeneration") == generation for c in during)
        assert all("reason" not in c for c in during)
        first = seen[[c is not None for c in in_progress].index(True)]
        assert allocated(first) == (2000, 2 * GiB)  # allocated before actuated
        assert actual(first) == (1000, 1000, GiB, GiB)
        final = seen[-1]
        assert final["status"]["observedGeneration"] == final["metadata"]["generation"]
        assert actual(final) == (2000, 2000, 2 * GiB, 2 * GiB)
        assert allocated(final) == (2000, 2 * GiB)


def test_a_resize_beyond_the_node_is_infeasible(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root) as node:
        node.create_pod("vm-a", "1", "1Gi")
        node.running("vm-a")
        generation = node.resize("vm-a", "8", "1Gi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "PodResizePending",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        pending = condition(pod, "PodResizePending")
        assert pending["reason"] == "Infeasible"
        assert pending["message"] == (
            "Node didn't have enough capacity: cpu, requested: 8000, capacity: 4000"
        )
        assert pod["status"]["observedGeneration"] == generation
        assert actual(pod) == (1000, 1000, GiB, GiB)


def test_a_deferred_resize_is_accepted_after_another_pod_is_deleted(kube, ns, socket_root):
    with kubelet(kube, ns, socket_root, deferred_retry_s=300.0) as node:
        node.create_pod("vm-a", "2", "1Gi")
        node.running("vm-a")
        node.create_pod("vm-b", "2", "1Gi")
        node.running("vm-b")
        generation = node.resize("vm-a", "3", "1Gi")["metadata"]["generation"]
        pod = node.wait(
            "vm-a",
            "Deferred",
            lambda p: (
                (condition(p, "PodResizePending") or {}).get("observedGeneration") == generation
            ),
        )
        pending = condition(pod, "PodResizePending")
        assert pending["reason"] == "Deferred"
        assert pending["message"] == (
            "Node didn't have enough resource: cpu, requested: 3000, used: 2000, capacity: 4000"
        )
        assert actual(pod) == (2000, 2000, GiB, GiB)

        node.kube.delete(node.pod_path("vm-b"))  # an ordinary, graceful delete
        node.gone("vm-b")  # the kubelet stopped its VMM and confirmed the deletion
        pod = node.wait("vm-a", "resized", settled(generation))
        assert actual(pod) == (3000, 3000, GiB, GiB)
        assert pod["status"]["observedGeneration"] == generation


def test_a_memory_decrease_below_the_guest_is_an_error_until_the_guest_shrinks(
    kube, ns, socket_root
):
    with kubelet(kube, ns, socket_root) as node:
        uid = node.create_pod("vm-a", "1", "3Gi")["metadata"]["uid"]
        node.running("vm-a")
        # Play the node daemon: boot a guest of 512Mi, then plug it up to 2Gi.
        socket = vmm_socket_path(socket_root, uid)
        answering(socket)
        with CloudHypervisorClient(socket) as vmm:
            vmm.create(
                {
                    "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
                    "memory": {
                        "size": 512 * MiB,
                        "hotplug_method": "VirtioMem",
                        "hotplug_size": 2 * GiB,
                    },
                    # The VMM opens the kernel at boot; an empty file will do.
                    "payload": {"kernel": placeholder_kernel(socket_root)},
                }
            )
            vmm.boot()
            vmm.resize(desired_ram=2 * GiB)
            deadline = time.monotonic() + TIMEOUT_S
            while vmm.info().guest_memory != 2 * GiB and time.monotonic() < deadline:
                time.sleep(0.05)

            generation = node.resize("vm-a", "1", "1Gi")["metadata"]["generation"]
            pod = node.wait(
                "vm-a",
                "Error",
                lambda p: (condition(p, "PodResizeInProgress") or {}).get("reason") == "Error",
            )
            progress = condition(pod, "PodResizeInProgress")
            assert progress["observedGeneration"] == generation
            assert progress["message"] == (
                "cannot decrease memory limits: ["
                f"attempting to set pod memory limit ({GiB}) below current usage ({2 * GiB}), "
                f'attempting to set container "vm-manager" memory limit ({GiB}) '
                f"below current usage ({2 * GiB})]"
            )
            assert pod["status"]["observedGeneration"] == generation
            assert actual(pod) == (1000, 1000, 3 * GiB, 3 * GiB)
            assert allocated(pod) == (1000, GiB)

            vmm.resize(desired_ram=512 * MiB)  # the guest gives the memory back
            pod = node.wait("vm-a", "resized", settled(generation))
            assert actual(pod) == (1000, 1000, GiB, GiB)
