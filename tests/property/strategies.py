"""Hypothesis strategies for the kernel's three observations.

``arbitrary_*`` draw anything the types allow, sense or not (the kernel must cope);
``plausible`` draws the states a running system passes through: a booted VM with a
recorded capacity, somewhere in a resize, with a pod and a VMM that agree with it more
or less (a kubelet that has not caught up, a guest still plugging, a stale generation).
"""

from __future__ import annotations

from attrs import evolve
from hypothesis import strategies as st

from core import (
    UNOBSERVED_VMM,
    Allocation,
    Capacity,
    Condition,
    ConditionStatus,
    Phase,
    PodPhase,
    PodResizeCondition,
    PodView,
    ResizeRecord,
    Resources,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    pod_resources_for,
)
from core.constants import GUEST_MEMORY_ALIGNMENT, GiB, MiB
from core.resources import capacity_for

# --- anything ---------------------------------------------------------------------------

small = st.integers(0, 64)
memory = st.sampled_from([0, 1, GiB, 2 * GiB, 4 * GiB, 4 * GiB + 2 * MiB, 8 * GiB, 20 * GiB])
allocations = st.builds(Allocation, small, memory)
resources = st.builds(Resources, st.integers(0, 64_000), memory)
records = st.builds(
    ResizeRecord,
    vcpus=small,
    memory=memory,
    generation=small,
    step=st.sampled_from(Step),
    return_phase=st.sampled_from([Phase.RUNNING, Phase.PAUSED]),
    pod_generation=st.none() | small,
    attempts=st.integers(0, 100),
    vmm_requested=st.booleans(),
)
resize_conditions = st.none() | st.builds(
    PodResizeCondition,
    reason=st.sampled_from([None, "Deferred", "Infeasible", "Error", "Whatever"]),
    message=st.text(max_size=10),
    observed_generation=st.none() | small,
)
arbitrary_vms = st.builds(
    Vm,
    namespace=st.just("ns"),
    name=st.just("vm"),
    generation=st.integers(1, 64),
    spec=st.none()
    | st.builds(
        VmSpec,
        sockets=st.integers(-1, 4),
        cores_per_socket=st.integers(-1, 8),
        memory=memory,
        max_vcpus=st.none() | small,
        max_memory=st.none() | memory,
    ),
    status=st.builds(
        VmStatus,
        phase=st.none() | st.sampled_from(Phase),
        observed_generation=st.none() | small,
        capacity=st.none() | st.builds(Capacity, small, memory, memory),
        allocated=st.none() | allocations,
        resize=st.none() | records,
    ),
    deleting=st.booleans(),
    has_finalizer=st.booleans(),
)
arbitrary_pods = st.none() | st.builds(
    PodView,
    name=st.just("vm-pod"),
    generation=st.integers(1, 64),
    observed_generation=st.none() | small,
    phase=st.sampled_from(PodPhase),
    node_name=st.none() | st.just("n"),
    deleting=st.booleans(),
    desired=st.none() | resources,
    actual=st.none() | resources,
    resize_pending=resize_conditions,
    resize_in_progress=resize_conditions,
    legacy_resize_status=st.none() | st.sampled_from(["Proposed", "InProgress", "Infeasible"]),
    resize_refused=st.none() | st.just("refused"),
)
call_errors = st.builds(VmmCallError, st.sampled_from(VmmCallErrorKind), st.text(max_size=5))
arbitrary_vmms = st.just(UNOBSERVED_VMM) | st.builds(
    VmmView,
    state=st.sampled_from(VmmState),
    vcpus=st.none() | small,
    max_vcpus=st.none() | small,
    boot_memory=st.none() | memory,
    hotplug_size=st.none() | memory,
    requested_memory=st.none() | memory,
    actual_memory=st.none() | memory,
    call_error=st.none() | call_errors,
    unreachable_since=st.none() | st.floats(0, 2e6),
    busy_since=st.none() | st.floats(0, 2e6),
)


# --- what a running system passes through -------------------------------------------------


@st.composite
def plausible(draw: st.DrawFn) -> tuple[Vm, PodView, VmmView]:
    """A booted VM somewhere in (or out of) a resize, its pod and its VMM."""
    boot = VmSpec(1, draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 4])) * GiB)
    capacity = capacity_for(boot)
    blocks = (capacity.max_memory - capacity.boot_memory) // GUEST_MEMORY_ALIGNMENT

    def allocation() -> Allocation:
        size = (
            capacity.boot_memory
            + draw(st.sampled_from([0, 1, 64, 128, blocks // 2, blocks - 1, blocks]))
            * GUEST_MEMORY_ALIGNMENT
        )
        return Allocation(draw(st.integers(1, capacity.max_vcpus)), size)

    current, wanted = allocation(), allocation()
    generation = draw(st.integers(2, 5))
    spec = VmSpec(1, wanted.vcpus, wanted.memory)
    envelope = Allocation(max(current.vcpus, wanted.vcpus), max(current.memory, wanted.memory))
    sizes = [pod_resources_for(a) for a in (current, wanted, envelope)]
    pod_generation = draw(st.integers(1, 6))
    nudge = draw(st.sampled_from([0, 0, 0, 2 * MiB, -2 * MiB]))
    actual = draw(st.sampled_from(sizes))
    pod = PodView(
        "vm-pod",
        generation=pod_generation,
        observed_generation=draw(st.sampled_from([pod_generation, pod_generation - 1, None])),
        phase=PodPhase.RUNNING,
        node_name="n",
        desired=draw(st.sampled_from(sizes)),
        actual=evolve(actual, memory=actual.memory + nudge),
        resize_pending=draw(
            st.none()
            | st.builds(
                PodResizeCondition,
                st.sampled_from(["Deferred", "Infeasible"]),
                st.just("kubelet says"),
                st.sampled_from([pod_generation, pod_generation - 1, None]),
            )
        ),
        resize_in_progress=draw(
            st.none() | st.builds(PodResizeCondition, st.sampled_from([None, "Error"]))
        ),
    )
    record = draw(
        st.none()
        | st.builds(
            ResizeRecord,
            vcpus=st.just(wanted.vcpus),
            memory=st.just(wanted.memory),
            generation=st.sampled_from([generation, generation - 1]),
            step=st.sampled_from(Step),
            return_phase=st.sampled_from([Phase.RUNNING, Phase.PAUSED]),
            pod_generation=st.none() | st.sampled_from([pod_generation, pod_generation + 1]),
            attempts=st.integers(0, 3),
            vmm_requested=st.booleans(),
        )
    )
    phase = draw(
        st.sampled_from(
            [Phase.RUNNING, Phase.PAUSED, Phase.POD_RESIZE_IN_PROGRESS, Phase.RESIZE_IN_PROGRESS]
        )
    )
    status = VmStatus(
        phase=phase,
        node_name="n",
        observed_generation=generation,
        desired=wanted,
        capacity=capacity,
        allocated=current,
        resize=record,
        conditions=(Condition("Resized", ConditionStatus.FALSE, "InProgress", "", generation),),
    )
    vm = Vm("ns", "vm", generation=generation, spec=spec, status=status)
    requested = draw(st.sampled_from([current, wanted]))
    vmm = VmmView(
        draw(st.sampled_from([VmmState.RUNNING, VmmState.PAUSED])),
        vcpus=requested.vcpus,
        max_vcpus=capacity.max_vcpus,
        boot_memory=capacity.boot_memory,
        hotplug_size=capacity.max_memory - capacity.boot_memory,
        requested_memory=requested.memory,
        actual_memory=draw(st.sampled_from([requested.memory, current.memory, None])),
    )
    return vm, pod, vmm
