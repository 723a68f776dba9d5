"""The node daemon against the real API server and the Cloud Hypervisor simulator:
boot, CPU and memory growth and shrink as the VMM itself reports them, VMM errors, a vCPU
removal still pending in the guest (429), an unreachable VMM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.types import VmInfo
from adapters.k8s.client import Kube
from adapters.k8s.vms import vm_path
from apps.cli.vmops import (
    Follower,
    converged,
    event_reasons,
    events_for,
    resize_vm,
    wait_for_events,
)
from core import parse_vm
from core.constants import API_GROUP, API_VERSION, GiB
from core.kernel import VMM_REACHABLE
from core.podlayout import vmm_socket_path
from testbed.localstack.stack import NodeSpec, Stack

pytestmark = pytest.mark.integration

FLAKY, SLOW = "d-flaky", "d-slow"
SIM = "python -m testbed.chsim.main"


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
        vm_path(namespace),
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


def vmm_socket(stack: Stack, kube: Kube, namespace: str, name: str, node: str) -> str:
    """Where the VM's VMM listens: its API socket in the pod's directory on ``node``."""
    pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-{name}")
    return vmm_socket_path(str(stack.socket_root(node)), pod["metadata"]["uid"])


def vmm_info(stack: Stack, kube: Kube, namespace: str, name: str, node: str) -> VmInfo:
    """vm.info, asked of the VM's VMM over its API socket."""
    with CloudHypervisorClient(vmm_socket(stack, kube, namespace, name, node), timeout=5.0) as c:
        return c.info()


def resize_and_wait(
    kube: Kube, namespace: str, name: str, vcpus: int | None, memory: str | None
) -> dict[str, Any]:
    resize_vm(kube, namespace, name, vcpus, memory)
    return Follower(kube, namespace, name).wait(converged, 60)


def test_boot_creates_and_boots_the_vmm_as_the_spec_says(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "boots", SLOW, vcpus=3)
    info = vmm_info(stack, kube, namespace, "boots", SLOW)
    assert info.state == "Running"
    assert (info.config.cpus.boot_vcpus, info.config.memory.size) == (3, 2 * GiB)
    status = parse_vm(kube.get(vm_path(namespace, "boots"))).status
    assert status.capacity is not None
    assert status.capacity.max_vcpus == info.config.cpus.max_vcpus
    # The Event follows the status write that made the VM Running.
    events = wait_for_events(
        kube, namespace, "boots", lambda evs: "VMStarted" in event_reasons(evs), 10
    )
    assert "VMStarted" in event_reasons(events), event_reasons(events)
    kube.delete(vm_path(namespace, "boots"))


@pytest.mark.parametrize(
    ("name", "boot", "target"),
    [
        ("cpu-up", 2, 4),  # grow to the default ceiling (twice the boot count)
        ("cpu-down", 4, 1),  # shrink: done only once the guest has ejected them
    ],
)
def test_cpu_change_reaches_the_vmm(
    stack: Stack, kube: Kube, namespace: str, name: str, boot: int, target: int
) -> None:
    make_vm(kube, namespace, name, SLOW, vcpus=boot)
    obj = resize_and_wait(kube, namespace, name, target, None)
    assert parse_vm(obj).status.allocated.vcpus == target  # type: ignore[union-attr]
    assert vmm_info(stack, kube, namespace, name, SLOW).config.cpus.boot_vcpus == target
    kube.delete(vm_path(namespace, name))


def test_grow_memory_hotplugs_and_the_guest_plugs_it(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "mem-up", SLOW)
    obj = resize_and_wait(kube, namespace, "mem-up", None, "5Gi")
    assert parse_vm(obj).status.allocated.memory == 5 * GiB  # type: ignore[union-attr]
    info = vmm_info(stack, kube, namespace, "mem-up", SLOW)
    assert info.config.memory.size + (info.config.memory.hotplugged_size or 0) == 5 * GiB
    assert info.guest_memory == 5 * GiB
    kube.delete(vm_path(namespace, "mem-up"))


def test_shrink_memory_unplugs_before_the_vm_is_running_again(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "mem-down", SLOW)
    resize_and_wait(kube, namespace, "mem-down", None, "6Gi")
    obj = resize_and_wait(kube, namespace, "mem-down", None, "3Gi")
    assert parse_vm(obj).status.allocated.memory == 3 * GiB  # type: ignore[union-attr]
    assert vmm_info(stack, kube, namespace, "mem-down", SLOW).guest_memory == 3 * GiB
    kube.delete(vm_path(namespace, "mem-down"))


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
    kube.delete(vm_path(namespace, "flaky"))


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
    kube.delete(vm_path(namespace, "slow"))


def test_unreachable_vmm_gives_a_condition_not_a_crash(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    make_vm(kube, namespace, "lost", SLOW, vcpus=2)
    sock = vmm_socket(stack, kube, namespace, "lost", SLOW)
    os.rename(sock, f"{sock}.away")
    try:
        # Touch the VM so the daemon looks now rather than at its next resync.
        kube.patch(vm_path(namespace, "lost"), {"metadata": {"annotations": {"poke": "1"}}})
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
    obj = resize_and_wait(kube, namespace, "lost", None, "3Gi")
    assert parse_vm(obj).status.allocated.memory == 3 * GiB  # type: ignore[union-attr]
    kube.delete(vm_path(namespace, "lost"))
