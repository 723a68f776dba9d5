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


def _after_stalled_removal() -> tuple[Vm, PodView]:
    """restart_changes_no_outcome: a VM at 3 vCPUs was asked 2 (generation 3), then 1
    (generation 4); the guest was paused and ejected nothing, and the removal stalled
    (GuestVcpuRemovalStuck, 3 vCPUs still run). Whether generation 3's vm.resize landed
    before the daemon restarted left the VMM configured for 2 or for 1."""
    spec = VmSpec(1, 1, 1 * GiB, max_vcpus=4, max_memory=4 * GiB)
    stalled = ResizeRecord(vcpus=1, memory=1 * GiB, generation=4, step=Step.STALLED)
    status = VmStatus(
        phase=Phase.RUNNING,
        node_name="node-a",
        observed_generation=4,
        desired=Allocation(1, 1 * GiB),
        capacity=Capacity(4, 4 * GiB, 1 * GiB),
        allocated=Allocation(3, 1 * GiB),
        resize=stalled,
        vmm_version="v50.0",
    )
    held = pod_resources(evolve(spec, cores_per_socket=3))
    return _vm(status, generation=4, spec=spec), _pod(held, generation=5)


def _settle_daemon(vm: Vm, pod: PodView, vmm: VmmView, ejects: bool) -> tuple[Vm, VmmView]:
    """The daemon decides and carries out its VMM calls, against a VMM whose guest has
    finished every removal (``ejects``) or never does, until it has nothing to ask."""
    now = T0
    for _ in range(12):
        actions = _daemon(vm, pod, vmm, now)
        vm = vm.evolve(status=apply_status(vm.status, actions))
        calls = [a for a in actions if isinstance(a, ResizeVmm)]
        if not calls:
            return vm, vmm
        (call,) = calls
        if call.probe and not ejects:
            busy = evolve(vmm, call_error=VmmCallError(VmmCallErrorKind.BUSY, "pending"))
            vm = vm.evolve(status=apply_status(vm.status, _daemon(vm, pod, busy, now)))
            return vm, vmm  # nothing more to learn until the guest ejects
        if call.probe:
            done = _daemon(vm, pod, evolve(vmm, probe_ok=True), now)
            vm = vm.evolve(status=apply_status(vm.status, done))
        else:
            assert call.vcpus is not None
            vmm = evolve(vmm, vcpus=call.vcpus)  # accepted; this guest ejects at once
        now += 1.0
    raise AssertionError(f"the daemon kept asking: {vm.status}")


def test_a_stalled_removal_the_guest_finishes_late_ends_at_the_spec_either_way() -> None:
    """Once the guest ejects, the two worlds (VMM left at 2 or at 1) must end alike: a
    steady probe sees the eject, ``allocated`` follows, and the step that stalled runs
    again for the spec, so the VMM ends configured for 1 in both."""
    ends = []
    for configured in (2, 1):
        vm, pod = _after_stalled_removal()
        vmm = _vmm(configured, 1 * GiB, v53=False)
        vm, vmm = _settle_daemon(vm, pod, vmm, ejects=True)
        assert vm.status.allocated is not None
        ends.append((vmm.vcpus, vm.status.allocated.vcpus))
    assert ends == [(1, 1), (1, 1)], ends


def test_a_stalled_removal_the_guest_never_finishes_is_probed_not_retried() -> None:
    """A guest that never ejects: the probe answers 429, nothing else is asked, and
    ``allocated`` keeps the vCPUs that still run."""
    vm, pod = _after_stalled_removal()
    vmm = _vmm(2, 1 * GiB, v53=False)
    probes = [a for a in _daemon(vm, pod, vmm, T0) if isinstance(a, ResizeVmm)]
    assert probes == [ResizeVmm(vcpus=2, probe=True)], probes
    vm, vmm = _settle_daemon(vm, pod, vmm, ejects=False)
    assert vmm.vcpus == 2 and vm.status.allocated == Allocation(3, 1 * GiB), vm.status
    assert vm.status.phase is Phase.RUNNING
