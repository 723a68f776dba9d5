"""A forged status may not steer a pod shrink (issue 17, item 2; ADR 0011).

Only the user writes ``spec``; ``status`` has other writers (the VM's own node daemon,
and anyone who steals its token). Forge a ``capacity`` the spec exceeds, so the spec is
"out of reach", and a ``status.resize`` target far below what the guest holds: the
controller used to finish "toward what was being applied" and shrink the pod to the
forged target, under the guest's memory. It now never shrinks toward a target the spec
did not give, and says where the VM stands."""

from __future__ import annotations

from core import (
    RESIZED,
    Allocation,
    Capacity,
    Owner,
    Phase,
    PodView,
    ResizePod,
    ResizeRecord,
    Resources,
    SetCondition,
    SetPhase,
    Step,
    Vm,
    VmSpec,
    VmStatus,
    decide,
    owned_by,
)
from core.constants import GiB, MiB
from core.model import UNOBSERVED_VMM, ConditionStatus

T0 = 1_000_000.0
GUEST = 8 * GiB
HELD = Resources(4000, GUEST + 256 * MiB)  # what the pod holds: the guest plus overhead


def _forged(record: ResizeRecord, allocated: Allocation) -> tuple[Vm, PodView]:
    spec = VmSpec(1, 4, GUEST, max_vcpus=4, max_memory=16 * GiB)
    status = VmStatus(
        phase=Phase.POD_RESIZE_IN_PROGRESS,
        allocated=allocated,
        capacity=Capacity(4, 4 * GiB, 2 * GiB),  # the spec's 8Gi is "out of reach"
        resize=record,
        observed_generation=3,
    )
    vm = Vm("tenant-b", "victim", generation=3, spec=spec, status=status)
    return vm, PodView("vm-victim", node_name="node-a", desired=HELD, actual=HELD, generation=4)


def _controller(vm: Vm, pod: PodView) -> tuple[object, ...]:
    return owned_by(decide(vm, pod, UNOBSERVED_VMM, now=T0), Owner.CONTROLLER)


def test_a_forged_target_and_capacity_do_not_shrink_the_pod() -> None:
    forged = ResizeRecord(vcpus=4, memory=2 * GiB, generation=3, step=Step.POD_SHRINK)
    vm, pod = _forged(forged, Allocation(4, 2 * GiB))
    actions = _controller(vm, pod)
    patches = [a.resources for a in actions if isinstance(a, ResizePod)]
    assert all(p.memory >= HELD.memory for p in patches), patches
    # The VM settles where it stands and says why, instead of waiting for ever.
    settled = decide(vm, pod, UNOBSERVED_VMM, now=T0)
    assert [a.phase for a in settled if isinstance(a, SetPhase)] == [Phase.RUNNING], settled
    resized = [
        a.condition for a in settled if isinstance(a, SetCondition) and a.condition.type == RESIZED
    ]
    assert resized and resized[-1].status is ConditionStatus.FALSE
    assert resized[-1].reason == "ExceedsCapacity", resized


def test_a_grow_toward_the_record_still_finishes_when_the_spec_is_out_of_reach() -> None:
    """Growing is never unsafe for the guest: a grow begun for an earlier spec may still
    complete its pod step toward the recorded target."""
    record = ResizeRecord(vcpus=4, memory=GUEST + 1 * GiB, generation=3, step=Step.POD_GROW)
    vm, pod = _forged(record, Allocation(4, GUEST))
    patches = [a.resources for a in _controller(vm, pod) if isinstance(a, ResizePod)]
    assert patches and patches[-1].memory > HELD.memory, patches
