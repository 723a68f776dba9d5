"""The e2e suite's mid-resize scenarios on the real node (issue 16): a spec changed while
the real kubelet works on the previous one, and the controller SIGKILLed there, both end
at the newest spec, with the pod as the seed's formula says and one pod resize per
change. Sizes fit this machine (the real node has its 2 CPUs); the guest's memory is
really held (``--sim-touch-memory``), so the pod's cgroup is sampled against it.

Skipped, saying why, where the machine cannot run a real node or ``CHSCALE_NODE=simulated``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from adapters.k8s.client import Kube
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged, resize_vm
from core import parse_vm
from core.constants import POD_MEMORY_OVERHEAD, VM_CONTAINER
from core.quantity import parse_bytes
from testbed.controlplane.launcher import ControlPlane
from testbed.localstack.stack import NodeSpec, Stack

from .conftest import real_node_tests

NODE_NAME = "real-e2e-node"
WAIT_S = 90.0
MI = 1024 * 1024

_run, _why = real_node_tests()
pytestmark = pytest.mark.skipif(not _run, reason=_why)


@pytest.fixture(scope="module")
def stack(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("realnode-e2e"),
        nodes=[NodeSpec(NODE_NAME)],
        control_plane=control_plane,
        webhook=True,
        kubelet="real",
    )
    s.start()
    yield s
    s.stop()


def _vm(kube: Kube, namespace: str, name: str) -> Follower:
    apply_vm(
        kube,
        {
            "metadata": {"name": name},
            "spec": {
                "instance": {
                    "cpu": {"sockets": 1, "coresPerSocket": 1},
                    "memory": {"size": "256Mi", "maxSize": "1Gi"},
                },
                "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            },
        },
        namespace,
    )
    follower = Follower(kube, namespace, name)
    follower.wait(converged, WAIT_S)
    return follower


def _pod(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-{name}")


def _assert_pod_holds(pod: dict[str, Any], memory: int) -> None:
    """Requests = limits = guest + overhead, in the spec and as the kubelet reports."""
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == VM_CONTAINER)
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == VM_CONTAINER)
    for resources in (spec["resources"], status["resources"]):
        for kind in ("requests", "limits"):
            assert parse_bytes(resources[kind]["memory"]) == memory + POD_MEMORY_OVERHEAD


def _in_phase(phase: str) -> Any:
    return lambda o: (o.get("status") or {}).get("phase") == phase


def _end(kube: Kube, namespace: str, name: str) -> None:
    kube.patch(vm_path(namespace, name), {"metadata": {"finalizers": None}})
    kube.delete(vm_path(namespace, name))


def test_a_spec_changed_while_the_real_kubelet_resizes_ends_at_the_newest(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    follower = _vm(kube, namespace, "changer")
    try:
        resize_vm(kube, namespace, "changer", None, "768Mi")
        # The real kubelet takes about a second per step: the pod step is there to see.
        follower.wait(_in_phase("PodResizeInProgress"), WAIT_S, interval=0.01)
        resize_vm(kube, namespace, "changer", None, "512Mi")
        obj = follower.wait(converged, WAIT_S)
        allocated = parse_vm(obj).status.allocated
        assert allocated is not None and allocated.memory == 512 * MI, obj["status"]
        _assert_pod_holds(_pod(kube, namespace, "changer"), 512 * MI)
    finally:
        _end(kube, namespace, "changer")


def test_the_controller_sigkilled_mid_resize_on_the_real_node_converges(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    follower = _vm(kube, namespace, "crash")
    try:
        generation_before = _pod(kube, namespace, "crash")["metadata"]["generation"]
        resize_vm(kube, namespace, "crash", None, "512Mi")
        follower.wait(_in_phase("PodResizeInProgress"), WAIT_S, interval=0.01)
        stack.children["controller-0"].kill()
        stack.start_controller(0)
        obj = follower.wait(converged, WAIT_S)
        allocated = parse_vm(obj).status.allocated
        assert allocated is not None and allocated.memory == 512 * MI, obj["status"]
        pod = _pod(kube, namespace, "crash")
        _assert_pod_holds(pod, 512 * MI)
        # A growth takes one pod resize: the restarted controller repeated none.
        assert pod["metadata"]["generation"] == generation_before + 1
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    finally:
        _end(kube, namespace, "crash")
