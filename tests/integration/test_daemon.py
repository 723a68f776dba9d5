"""The node daemon against the real API server and the Cloud Hypervisor simulator:
VMM errors, a vCPU removal still pending in the guest (429), an unreachable VMM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.k8s.client import Kube
from apps.cli.vmops import Follower, converged, events_for, resize_vm, vm_url
from apps.localstack.stack import NodeSpec, Stack
from core import parse_vm
from core.constants import API_GROUP, API_VERSION, GiB
from core.kernel import VMM_REACHABLE
from sim.kubelet import vmm_socket_path

pytestmark = pytest.mark.integration

FLAKY, SLOW = "d-flaky", "d-slow"
SIM = "python -m apps.chsim.main"


@pytest.fixture(scope="module")
def stack(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("daemon"),
        nodes=[
            # Half of all vm.resize calls fail with a 500 (seeded, so the run repeats).
            NodeSpec(FLAKY, "16", "32Gi", f"{SIM} --sim-error-rate 0.5 --sim-error-seed 7"),
            # The guest takes 1.5 s to eject a removed vCPU: a 429 window.
            NodeSpec(SLOW, "16", "32Gi", f"{SIM} --sim-eject-delay 1.5"),
        ],
        control_plane=control_plane,
        webhook=False,
    )
    s.start()
    yield s
    s.stop()


def make_vm(kube: Kube, namespace: str, name: str, node: str, vcpus: int = 4) -> None:
    kube.create(
        vm_url(namespace),
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "instance": {
                    "cpu": {"sockets": 1, "coresPerSocket": vcpus},
                    "memory": {"size": "2Gi"},
                },
                "nodeSelector": {"kubernetes.io/hostname": node},
            },
        },
    )
    Follower(kube, namespace, name).wait(converged, 60)


def test_vmm_errors_give_vmresizefailed_then_recover(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "flaky", FLAKY)
    for vcpus, memory in ((6, "4Gi"), (3, "2Gi"), (8, "6Gi")):
        resize_vm(kube, namespace, "flaky", vcpus, memory)
        obj = Follower(kube, namespace, "flaky").wait(converged, 90)
        allocated = parse_vm(obj).status.allocated
        assert allocated is not None and allocated.vcpus == vcpus
    failed = [e for e in events_for(kube, namespace, "flaky") if e["reason"] == "VMResizeFailed"]
    assert failed, "a 50% error rate over three resizes produced no VMResizeFailed event"
    assert all(e["type"] == "Warning" for e in failed)
    kube.delete(vm_url(namespace, "flaky"))


def test_vcpu_change_while_a_removal_is_pending_is_a_quiet_retry(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "slow", SLOW, vcpus=4)
    resize_vm(kube, namespace, "slow", 2, None)  # marks two vCPUs for removal
    follower = Follower(kube, namespace, "slow")
    follower.wait(lambda o: (o.get("status") or {}).get("allocated", {}).get("vcpus") == 2, 30)
    resize_vm(kube, namespace, "slow", 1, None)  # the guest is still ejecting: 429
    obj = follower.wait(converged, 60)
    assert parse_vm(obj).status.allocated.vcpus == 1  # type: ignore[union-attr]
    log = (stack.logs / f"daemon-{SLOW}.log").read_text()
    assert "kind=Busy" in log, "the VMM never answered 429"
    reasons = [e["reason"] for e in events_for(kube, namespace, "slow")]
    assert "VMResizeFailed" not in reasons, "a 429 is not a failure"
    kube.delete(vm_url(namespace, "slow"))


def test_unreachable_vmm_gives_a_condition_not_a_crash(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "lost", SLOW, vcpus=2)
    pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-lost")
    sock = vmm_socket_path(str(stack.socket_root(SLOW)), pod["metadata"]["uid"])
    os.rename(sock, f"{sock}.away")
    try:
        # Touch the VM so the daemon looks now rather than at its next resync.
        kube.patch(vm_url(namespace, "lost"), {"metadata": {"annotations": {"poke": "1"}}})
        follower = Follower(kube, namespace, "lost")

        def unreachable(obj: dict[str, Any]) -> bool:
            cond = parse_vm(obj).status.condition(VMM_REACHABLE)
            return cond is not None and cond.status == "False"

        obj = follower.wait(unreachable, 30)
        assert parse_vm(obj).status.phase == "Running"
        assert stack.children[f"daemon-{SLOW}"].alive()
    finally:
        os.rename(f"{sock}.away", sock)

    def reachable(obj: dict[str, Any]) -> bool:
        cond = parse_vm(obj).status.condition(VMM_REACHABLE)
        return cond is not None and cond.status == "True"

    Follower(kube, namespace, "lost").wait(reachable, 30)
    resize_vm(kube, namespace, "lost", None, "3Gi")
    obj = Follower(kube, namespace, "lost").wait(converged, 60)
    assert parse_vm(obj).status.allocated.memory == 3 * GiB  # type: ignore[union-attr]
    kube.delete(vm_url(namespace, "lost"))
