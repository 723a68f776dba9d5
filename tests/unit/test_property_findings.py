"""Kernel bugs the stateful property suite found (issue 15), each replayed as one
deterministic decision sequence.

Each test builds the world the failing example reached (a VirtualMachine, the pod view
one process holds, what the VMM reports) and asks the real kernel what to do.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve

from core import (
    UNOBSERVED_VMM,
    Allocation,
    Capacity,
    Owner,
    Phase,
    PodPhase,
    PodView,
    ResizePod,
    ResizeRecord,
    ResizeVmm,
    Resources,
    SetAllocated,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    decide,
    owned_by,
    pod_resources,
)
from core.constants import GiB
from core.wire import apply_status

T0 = 1_000_000.0
SPEC = VmSpec(1, 1, 1 * GiB, max_vcpus=4, max_memory=4 * GiB)


def _pod(resources: Resources, generation: int) -> PodView:
    return PodView(
        "vm-0-pod",
        generation=generation,
        observed_generation=generation,
        phase=PodPhase.RUNNING,
        node_name="node-a",
        desired=resources,
        actual=resources,
    )


def _vm(status: VmStatus, generation: int, spec: VmSpec = SPEC) -> Vm:
    return Vm("default", "vm-0", generation=generation, spec=spec, status=status)


def _vmm(vcpus: int, memory: int, *, v53: bool = True, **kw: Any) -> VmmView:
    return VmmView(
        VmmState.RUNNING,
        vcpus=vcpus,
        max_vcpus=4,
        boot_memory=1 * GiB,
        hotplug_size=3 * GiB,
        requested_memory=memory,
        actual_memory=memory,  # v53 reports what was plugged; v50 echoes the request
        version="v53.0" if v53 else "v50.0",
        **kw,
    )


def _daemon(vm: Vm, pod: PodView, vmm: VmmView, now: float) -> tuple[Any, ...]:
    return owned_by(decide(vm, pod, vmm, now=now), Owner.DAEMON)


def _allocated(actions: tuple[Any, ...]) -> list[Allocation]:
    return [a.allocation for a in actions if isinstance(a, SetAllocated)]


def test_allocated_lost_during_a_pending_vcpu_removal_is_not_recovered_from_a_stale_pod() -> None:
    """allocated_truthful: a VM grew to 2 vCPUs (pod generation 3), then the spec asked 1;
    the VMM accepted (it reports 1) but the guest has not ejected (2 threads run). Then
    ``status.allocated`` was lost, and the daemon's pod cache still shows the pod of
    generation 1 (1 CPU, before the grow). Recovering from that view wrote 1 vCPU: the
    removal then looked finished, and the pod was shrunk under 2 running vCPUs."""
    grown = pod_resources(evolve(SPEC, cores_per_socket=2))
    small = pod_resources(SPEC)
    record = ResizeRecord(
        vcpus=1,
        memory=1 * GiB,
        generation=3,
        step=Step.VMM,
        pod_generation=3,
        vmm_requested=True,
        wait_since=T0,
    )
    status = VmStatus(
        phase=Phase.RESIZE_IN_PROGRESS,
        node_name="node-a",
        observed_generation=3,
        desired=Allocation(1, 1 * GiB),
        capacity=Capacity(4, 4 * GiB, 1 * GiB),
        allocated=None,  # lost
        resize=record,
        vmm_version="v53.0",
    )
    vm = _vm(status, generation=3)
    vmm = _vmm(1, 1 * GiB)  # the VMM's configuration: 1 vCPU asked, the removal pending
    stale = _pod(small, generation=1)
    fresh = _pod(grown, generation=3)
    # However the daemon's decisions fall, what it writes to allocated never claims
    # fewer vCPUs than the pod of the grow covers (the guest may still run them all).
    seen: list[Allocation] = []
    now = T0
    for pod in (stale, stale, fresh, fresh):
        actions = _daemon(vm, pod, vmm, now)
        seen += _allocated(actions)
        vm = vm.evolve(status=apply_status(vm.status, actions))
        if any(isinstance(a, ResizeVmm) and a.probe for a in actions):
            # The removal is pending: the probe answers 429, fed back as the daemon does.
            busy = evolve(vmm, call_error=VmmCallError(VmmCallErrorKind.BUSY, "pending"))
            answer = _daemon(vm, pod, busy, now)
            seen += _allocated(answer)
            vm = vm.evolve(status=apply_status(vm.status, answer))
        now += 1.0
    assert seen, "the daemon never recovered allocated"
    assert all(a.vcpus >= 2 for a in seen), seen
    # And the controller never shrinks the pod's CPU below the 2 vCPUs that may run.
    controller = owned_by(decide(vm, fresh, UNOBSERVED_VMM, now=now), Owner.CONTROLLER)
    for action in controller:
        if isinstance(action, ResizePod):
            assert action.resources.cpu_millis >= 2000, action
