"""Totality, in the style of h2: every phase against every kind of observation.

For each phase (and no phase yet) and a broad set of observations of the pod (gone,
pending, terminated, deleting, stale, each resize condition and legacy status, a 403)
and of the VMM (unobserved, unreachable, not created, running, plugging, paused, shut
down, a 429 or a 500 just returned), ``decide`` must return cleanly, and whatever it
does must be legal: every phase it sets is a move of ``core.table.TRANSITIONS`` from
the observed phase, announced by that move's event and owned by that move's owner; the
actions come status first; side effects belong to the process that can carry them out.
A pair the table does not hold raises ``IllegalTransition``, never passes silently.
"""

from __future__ import annotations

import itertools

import pytest
from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st

from core import (
    UNOBSERVED_VMM,
    Action,
    BootVmm,
    Condition,
    ConditionStatus,
    ControllerAction,
    CreatePod,
    DaemonAction,
    EventType,
    FieldError,
    Owner,
    Phase,
    PodPhase,
    PodResizeCondition,
    PodView,
    RecordEvent,
    Requeue,
    ResizePod,
    ResizeRecord,
    ResizeVmm,
    SetPhase,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    decide,
    pod_resources,
)
from core.actions import STATUS_ACTIONS, owned_by
from core.constants import GiB
from core.resources import capacity_for
from core.table import RETURN, TRANSITIONS, Cause, IllegalTransition, move
from tests.property.strategies import arbitrary_pods, arbitrary_vmms, arbitrary_vms, plausible

SPEC = VmSpec(2, 4, 4 * GiB)
BIGGER = VmSpec(2, 6, 8 * GiB)
CAPACITY = capacity_for(SPEC)
NOW = pod_resources(SPEC)
GROWN = pod_resources(BIGGER)
# When the waits below began, and a clock past every deadline from then.
WAITED, LATE = 1_000.0, 1_000_000.0


# --- the product ---------------------------------------------------------------------------


def _records() -> dict[str, ResizeRecord | None]:
    base = ResizeRecord(12, 8 * GiB, 2, Step.POD_GROW)
    return {
        "no record": None,
        "pod grow": base,
        "pod grow, patched": evolve(base, pod_generation=3),
        "vmm": evolve(base, step=Step.VMM, pod_generation=3),
        "vmm, asked": evolve(base, step=Step.VMM, pod_generation=3, vmm_requested=True),
        "pod shrink": evolve(base, step=Step.POD_SHRINK),
        "infeasible": evolve(base, step=Step.INFEASIBLE),
        "from paused": evolve(base, return_phase=Phase.PAUSED, pod_generation=3),
        "old generation": evolve(base, generation=1, attempts=7),
        # Waiting since WAITED: with the clock at LATE, past every deadline.
        "pod grow, waiting": evolve(base, pod_generation=3, wait_since=WAITED),
        "vmm, asked, waiting": evolve(
            base, step=Step.VMM, pod_generation=3, vmm_requested=True, wait_since=WAITED
        ),
    }


def _vms() -> dict[str, Vm]:
    vms = {}
    for (name, record), capacity in itertools.product(_records().items(), (CAPACITY, None)):
        status = VmStatus(
            node_name="n",
            observed_generation=1,
            desired=SPEC.desired,
            capacity=capacity,
            allocated=SPEC.desired if capacity else None,
            resize=record,
            conditions=(Condition("Resized", ConditionStatus.FALSE, "InProgress"),),
        )
        suffix = "" if capacity else ", no capacity"
        vms[f"{name}{suffix}"] = Vm("ns", "vm", generation=2, spec=BIGGER, status=status)
    base = vms["no record"]
    vms["invalid spec"] = base.evolve(
        spec=None, spec_errors=(FieldError("spec.instance.memory.size", "is required"),)
    )
    vms["spec below boot size"] = base.evolve(spec=evolve(SPEC, memory=2 * GiB))
    vms["spec beyond capacity"] = base.evolve(spec=VmSpec(8, 8, 4 * GiB))
    vms["deleting"] = base.evolve(deleting=True)
    vms["no finalizer"] = base.evolve(has_finalizer=False)
    return vms


def _pods() -> dict[str, PodView | None]:
    running = PodView(
        "vm-pod",
        generation=3,
        observed_generation=3,
        phase=PodPhase.RUNNING,
        node_name="n",
        desired=GROWN,
        actual=GROWN,
    )
    pending = PodResizeCondition("Deferred", "not now", 3)
    return {
        "gone": None,
        "pending": PodView("vm-pod"),
        "running, grown": running,
        "running, as before": evolve(running, desired=NOW, actual=NOW),
        "patched, not actuated": evolve(running, actual=NOW),
        "stale": evolve(running, generation=2, observed_generation=2, actual=NOW),
        "unobserved patch": evolve(running, observed_generation=2, actual=NOW),
        "no resources": evolve(running, desired=None, actual=None),
        "succeeded": evolve(running, phase=PodPhase.SUCCEEDED),
        "failed": evolve(running, phase=PodPhase.FAILED),
        "unknown": evolve(running, phase=PodPhase.UNKNOWN),
        "deleting": evolve(running, deleting=True),
        "deferred": evolve(running, actual=NOW, resize_pending=pending),
        "infeasible": evolve(
            running, actual=NOW, resize_pending=evolve(pending, reason="Infeasible")
        ),
        "infeasible, older": evolve(
            running,
            actual=NOW,
            resize_pending=PodResizeCondition("Infeasible", "old", 1),
        ),
        "in progress": evolve(running, actual=NOW, resize_in_progress=PodResizeCondition(None)),
        "error": evolve(
            running, actual=NOW, resize_in_progress=PodResizeCondition("Error", "usage", 3)
        ),
        "legacy proposed": evolve(
            running, observed_generation=None, actual=NOW, legacy_resize_status="Proposed"
        ),
        "legacy deferred": evolve(
            running, observed_generation=None, actual=NOW, legacy_resize_status="Deferred"
        ),
        "legacy infeasible": evolve(
            running, observed_generation=None, actual=NOW, legacy_resize_status="Infeasible"
        ),
        "refused (403)": evolve(running, desired=NOW, actual=NOW, resize_refused="NodeCapacity"),
    }


def _vmms() -> dict[str, VmmView]:
    running = VmmView(
        VmmState.RUNNING,
        vcpus=12,
        max_vcpus=CAPACITY.max_vcpus,
        boot_memory=CAPACITY.boot_memory,
        hotplug_size=CAPACITY.max_memory - CAPACITY.boot_memory,
        requested_memory=8 * GiB,
        actual_memory=8 * GiB,
    )
    return {
        "unobserved": UNOBSERVED_VMM,
        "unreachable": VmmView(VmmState.UNREACHABLE, detail="connection refused"),
        "unreachable, long": VmmView(
            VmmState.UNREACHABLE, detail="connection refused", unreachable_since=WAITED
        ),
        "not created": VmmView(VmmState.NOT_CREATED),
        "created": VmmView(VmmState.CREATED),
        "running, at target": running,
        "running, as before": evolve(
            running, vcpus=8, requested_memory=4 * GiB, actual_memory=4 * GiB
        ),
        "plugging": evolve(running, actual_memory=6 * GiB),
        "unplugging": evolve(running, requested_memory=4 * GiB, actual_memory=6 * GiB),
        "no memory_actual_size": evolve(running, actual_memory=None),
        "paused": evolve(running, state=VmmState.PAUSED),
        "shut down": VmmView(VmmState.SHUTDOWN),
        "no config": VmmView(VmmState.RUNNING),
        "429": evolve(
            running, vcpus=8, call_error=VmmCallError(VmmCallErrorKind.BUSY, "vCPU removal")
        ),
        "429, busy for a while": evolve(
            running,
            vcpus=8,
            call_error=VmmCallError(VmmCallErrorKind.BUSY, "vCPU removal"),
            busy_since=WAITED,
        ),
        "500": evolve(
            running,
            requested_memory=4 * GiB,
            call_error=VmmCallError(VmmCallErrorKind.FAILED, "virtio-mem failed"),
        ),
    }


VMS, PODS, VMMS = _vms(), _pods(), _vmms()
PHASES = [None, *Phase]


def check_decision(vm: Vm, actions: tuple[Action, ...]) -> None:
    """Everything a decision may do, whatever it saw."""
    assert isinstance(actions, tuple)
    assert all(isinstance(a, Action) for a in actions)
    kinds = [
        0 if isinstance(a, STATUS_ACTIONS) else 1 if isinstance(a, RecordEvent) else
        3 if isinstance(a, Requeue) else 2
        for a in actions
    ]  # fmt: skip
    assert kinds == sorted(kinds), f"not status, events, effects, hints: {actions}"
    for action in actions:
        if isinstance(action, ResizeVmm | BootVmm):
            assert isinstance(action, DaemonAction) and action.owner is Owner.DAEMON
        if isinstance(action, ResizePod | CreatePod):
            assert isinstance(action, ControllerAction) and action.owner is Owner.CONTROLLER
        if isinstance(action, Requeue):
            assert action.after > 0
    # The controller and the daemon each take their own part of a decision: each part
    # holds at most one move, a move of the table from the observed phase, with its event.
    for owner in Owner:
        phases = [a for a in actions if isinstance(a, SetPhase) and a.owner is owner]
        assert len(phases) <= 1, actions
        if phases:
            _check_move(vm, phases[0], actions)


def check_owners(
    vm: Vm, pod: PodView | None, vmm: VmmView, now: float | None = None
) -> tuple[Action, ...]:
    """Asked for one process's part, ``decide`` gives exactly that part of the whole
    decision: skipping the other's parts changes nothing it owns. Returns the whole."""
    actions = decide(vm, pod, vmm, now=now)
    for owner in Owner:
        assert decide(vm, pod, vmm, now=now, owner=owner) == owned_by(actions, owner), owner
    return actions


STEADY = (Phase.RUNNING, Phase.PAUSED)


def _check_move(vm: Vm, set_phase: SetPhase, actions: tuple[Action, ...]) -> None:
    at = vm.status.phase
    legal = []
    for (phase, _cause), mv in TRANSITIONS.items():
        if phase != at:
            continue
        if mv.to == RETURN:
            record = vm.status.resize
            to = record.return_phase if record is not None else Phase.RUNNING
            if mv.owner is Owner.DAEMON and set_phase.phase in STEADY:
                # The daemon returns to the phase the VMM is in (a resume mid-resize).
                to = set_phase.phase
        else:
            to = mv.to
        if to == set_phase.phase and mv.owner is set_phase.owner:
            legal.append(mv)
    assert legal, f"{at} -> {set_phase.phase} by the {set_phase.owner} is not in the table"
    events = [a for a in actions if isinstance(a, RecordEvent) and a.owner is set_phase.owner]
    assert any(e.reason == mv.reason and e.type is mv.event_type for e in events for mv in legal), (
        f"{at} -> {set_phase.phase} without its event: {actions}"
    )


@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_every_phase_against_every_observation(phase: Phase | None) -> None:
    moves = 0
    for vm, pod, vmm in itertools.product(VMS.values(), PODS.values(), VMMS.values()):
        vm = vm.evolve(status=evolve(vm.status, phase=phase))
        actions = check_owners(vm, pod, vmm)
        check_decision(vm, actions)
        moves += any(isinstance(a, SetPhase) for a in actions)
        # Past every deadline: the verdicts, too, are each process's own.
        check_decision(vm, check_owners(vm, pod, vmm, now=LATE))
    assert moves or phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.UNKNOWN)


def test_the_product_reaches_every_row_of_the_table() -> None:
    """The observations above are broad enough to take every move of the table."""
    taken = set()
    for phase in PHASES:
        for vm, pod, vmm in itertools.product(VMS.values(), PODS.values(), VMMS.values()):
            vm = vm.evolve(status=evolve(vm.status, phase=phase))
            for action in decide(vm, pod, vmm):
                if isinstance(action, SetPhase):
                    taken.add((phase, action.phase))
    rows = set()
    for (phase, _), mv in TRANSITIONS.items():
        targets = [Phase.RUNNING, Phase.PAUSED] if mv.to == RETURN else [mv.to]
        rows.update((phase, to) for to in targets)
    assert rows - taken == set()


@pytest.mark.parametrize("cause", list(Cause), ids=str)
def test_a_pair_outside_the_table_is_refused(cause: Cause) -> None:
    for phase in PHASES:
        if (phase, cause) in TRANSITIONS:
            assert move(phase, cause) is TRANSITIONS[(phase, cause)]
        else:
            with pytest.raises(IllegalTransition, match="no transition"):
                move(phase, cause)


# --- random observations ---------------------------------------------------------------------


@given(
    arbitrary_vms,
    arbitrary_pods,
    arbitrary_vmms | st.sampled_from(list(VMMS.values())),
    st.none() | st.floats(0, 2 * LATE),
)
def test_any_observation_is_handled_cleanly(
    vm: Vm, pod: PodView | None, vmm: VmmView, now: float | None
) -> None:
    actions = check_owners(vm, pod, vmm, now)
    check_decision(vm, actions)


@given(plausible())
def test_any_plausible_state_is_handled_cleanly(state: tuple[Vm, PodView, VmmView]) -> None:
    vm, pod, vmm = state
    check_decision(vm, check_owners(vm, pod, vmm))
    check_decision(vm, check_owners(vm, pod, UNOBSERVED_VMM))


@pytest.mark.parametrize(
    "actions",
    [
        (SetPhase(Phase.SCHEDULED, owner=Owner.CONTROLLER),),  # not a move from Running
        (SetPhase(Phase.POD_RESIZE_IN_PROGRESS, owner=Owner.CONTROLLER),),  # no event
        (  # the daemon does not own this move
            SetPhase(Phase.POD_RESIZE_IN_PROGRESS, owner=Owner.DAEMON),
            RecordEvent(EventType.NORMAL, "VMResizeInitiated", "", owner=Owner.DAEMON),
        ),
        (Requeue(1.0, owner=Owner.DAEMON), SetPhase(Phase.PAUSED, owner=Owner.DAEMON)),
    ],
)
def test_the_check_refuses_illegal_decisions(actions: tuple[Action, ...]) -> None:
    vm = VMS["no record"].evolve(status=evolve(VMS["no record"].status, phase=Phase.RUNNING))
    with pytest.raises(AssertionError):
        check_decision(vm, actions)
