"""The safety rules of RESIZE.md sections 4 and 8, as properties of single decisions.

The state machine (test_stateful.py) checks the invariants over whole runs; these check
that no single decision, whatever it observes, can break them: the plan never lets the
guest outgrow the pod, the controller never patches the pod below what the guest holds,
the daemon never asks the VMM for more than the pod is sure to hold (nor re-sends what
the VMM has), and deciding again on the same observations reaches a fixed point with no
further events (no event storms, no flapping).
"""

from __future__ import annotations

from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st

from core import (
    DEFAULT_CONFIG,
    UNOBSERVED_VMM,
    Action,
    Allocation,
    Owner,
    PodView,
    RecordEvent,
    ResizePod,
    ResizeVmm,
    Resources,
    Step,
    Vm,
    VmmView,
    apply_status,
    decide,
    owned_by,
    plan,
    pod_resources_for,
)
from core.actions import STATUS_ACTIONS
from core.constants import MILLICORES_PER_VCPU
from core.kernel import covers, granted, pod_stale
from tests.property.strategies import (
    allocations,
    arbitrary_pods,
    arbitrary_vmms,
    arbitrary_vms,
    plausible,
)

OVERHEAD = DEFAULT_CONFIG.pod_memory_overhead
# Decisions needed, with nothing else changing, before status stops changing.
FIXED_POINT_WITHIN = 6

states = plausible() | st.tuples(arbitrary_vms, arbitrary_pods, arbitrary_vmms)
pods = arbitrary_pods.filter(lambda p: p is not None) | plausible().map(lambda s: s[1])


@given(allocations, pods, allocations)
def test_plan_never_lets_the_guest_outgrow_the_pod(
    current: Allocation, pod: PodView, desired: Allocation
) -> None:
    step, target = plan(current, pod, desired)
    envelope = Allocation(max(current.vcpus, desired.vcpus), max(current.memory, desired.memory))
    held = granted(pod)
    if step is Step.POD_GROW:
        assert target == pod_resources_for(envelope)
    elif step is Step.VMM:
        # The guest may move anywhere between current and desired: the pod holds both.
        assert target == desired and current != desired
        assert held is not None and covers(held, pod_resources_for(envelope))
    elif step is Step.POD_SHRINK:
        assert current == desired and target == pod_resources_for(desired)
    else:
        assert step is None and target is None and current == desired
        assert pod.desired == pod_resources_for(desired)
        assert held is not None and covers(held, pod_resources_for(desired))


def _requests(actions: tuple[Action, ...], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


@given(states)
def test_the_controller_never_patches_the_pod_below_the_guest(
    state: tuple[Vm, PodView | None, VmmView],
) -> None:
    vm, pod, _ = state
    actions = owned_by(decide(vm, pod, UNOBSERVED_VMM), Owner.CONTROLLER)
    allocated = vm.status.allocated
    for patch in _requests(actions, ResizePod):
        assert pod is not None
        if patch.resources == pod.actual:
            continue  # putting the pod back to what it has
        assert allocated is not None
        assert patch.resources.memory >= allocated.memory + OVERHEAD, (patch, allocated)
        assert patch.resources.cpu_millis >= allocated.vcpus * MILLICORES_PER_VCPU


@given(states)
def test_the_daemon_never_asks_beyond_the_pod_nor_twice(
    state: tuple[Vm, PodView | None, VmmView],
) -> None:
    vm, pod, vmm = state
    actions = owned_by(decide(vm, pod, vmm), Owner.DAEMON)
    calls = _requests(actions, ResizeVmm)
    assert len(calls) <= 1
    for call in calls:
        if call.probe:
            # A probe asks for the count already configured, and nothing else: it
            # changes nothing, so it needs no more of the pod than there is, nor a
            # resize under way (one also looks for a removal that stalled finishing late).
            assert call.vcpus == vmm.vcpus and call.memory is None, call
            continue
        assert pod is not None and vm.status.resize is not None
        assert not pod_stale(pod, vm.status.resize.pod_generation)
        vcpus = call.vcpus if call.vcpus is not None else vmm.vcpus
        memory = call.memory if call.memory is not None else vmm.requested_memory
        held = granted(pod)
        assert vcpus is not None and memory is not None and held is not None
        assert covers(held, pod_resources_for(Allocation(vcpus, memory))), (call, pod)
        allocated = vm.status.allocated
        # finding 3: while a removal may be pending (the guest may run more vCPUs than
        # configured), a vCPU request other than the probe would wedge it: 204 for the
        # count still running leaves the removal pending.
        if call.vcpus is not None and allocated is not None and vmm.vcpus is not None:
            assert allocated.vcpus <= vmm.vcpus, (call, allocated, vmm.vcpus)
        # Only what changes is sent: an identical desired_ram is a 500 from virtio-mem.
        assert call.vcpus is None or call.vcpus != vmm.vcpus
        assert call.memory is None or call.memory != vmm.requested_memory
        assert call.vcpus is not None or call.memory is not None


def _status_of(vm: Vm, actions: tuple[Action, ...]) -> Vm:
    return vm.evolve(
        status=apply_status(vm.status, tuple(a for a in actions if isinstance(a, STATUS_ACTIONS)))
    )


@given(states)
def test_deciding_again_on_the_same_observations_settles_without_events(
    state: tuple[Vm, PodView | None, VmmView],
) -> None:
    vm, pod, vmm = state
    # One-shot feedback (a 403, a failed call) is not an observation that persists.
    if pod is not None:
        pod = evolve(pod, resize_refused=None)
    vmm = evolve(vmm, call_error=None)
    for _ in range(FIXED_POINT_WITHIN):
        before = vm
        controller = owned_by(decide(vm, pod, UNOBSERVED_VMM), Owner.CONTROLLER)
        vm = _status_of(vm, controller)
        daemon = owned_by(decide(vm, pod, vmm), Owner.DAEMON)
        vm = _status_of(vm, daemon)
        if vm == before:
            events = _requests(controller + daemon, RecordEvent)
            assert events == [], f"an event for an unchanged situation: {events}"
            return
    raise AssertionError(f"status still changing after {FIXED_POINT_WITHIN} decisions: {vm}")


@given(states)
def test_decide_is_a_function(state: tuple[Vm, PodView | None, VmmView]) -> None:
    vm, pod, vmm = state
    assert decide(vm, pod, vmm) == decide(vm, pod, vmm)


def test_covers_is_exact_and_granted_is_the_smaller_of_spec_and_report() -> None:
    need = Resources(2000, 1000)
    assert covers(Resources(2000, 1000), need)
    assert not covers(Resources(2000, 999), need)
    assert not covers(Resources(1999, 5000), need)
    pod = PodView("p", desired=Resources(4000, 500), actual=Resources(2000, 900))
    assert granted(pod) == Resources(2000, 500)
    assert granted(PodView("p", desired=Resources(1, 1))) is None
