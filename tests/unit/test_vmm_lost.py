"""A VMM socket that vanishes while its pod runs has a deadline (issue 15, RESIZE.md 4b):
past it, ``VMMReachable=False`` names it (``VMMSocketGone``) with what a person can do, and one
Warning event says so; before it, and without a clock, it is only ``Unreachable``."""

from __future__ import annotations

import threading
from typing import Any

from attrs import evolve

from apps.daemon.daemon import Daemon
from core import (
    RESIZED,
    VMM_REACHABLE,
    Allocation,
    Capacity,
    Condition,
    ConditionStatus,
    Owner,
    Phase,
    PodPhase,
    PodView,
    Reasons,
    RecordEvent,
    ResizeRecord,
    SetPhase,
    Step,
    Vm,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    decide,
    owned_by,
    pod_resources,
)
from core.config import DEFAULT_CONFIG
from core.constants import GiB
from core.wire import apply_status

T0 = 1_000_000.0
SPEC = VmSpec(1, 1, 1 * GiB, max_vcpus=4, max_memory=4 * GiB)
DEADLINE = DEFAULT_CONFIG.vmm_unreachable_deadline_s


def _running() -> tuple[Vm, PodView]:
    resources = pod_resources(SPEC)
    pod = PodView(
        "vm-0-pod",
        generation=1,
        observed_generation=1,
        phase=PodPhase.RUNNING,
        node_name="node-a",
        desired=resources,
        actual=resources,
    )
    status = VmStatus(
        phase=Phase.RUNNING,
        node_name="node-a",
        observed_generation=1,
        desired=Allocation(1, 1 * GiB),
        capacity=Capacity(4, 4 * GiB, 1 * GiB),
        allocated=Allocation(1, 1 * GiB),
        vmm_version="v53.0",
    )
    return Vm("default", "vm-0", generation=1, spec=SPEC, status=status), pod


def _gone(since: float | None) -> VmmView:
    return VmmView(VmmState.UNREACHABLE, detail="no such file", unreachable_since=since)


def _daemon(vm: Vm, pod: PodView, vmm: VmmView, now: float | None) -> tuple[Any, ...]:
    return owned_by(decide(vm, pod, vmm, now=now), Owner.DAEMON)


def _reachable(vm: Vm) -> Condition | None:
    return vm.status.condition(VMM_REACHABLE)


def _events(actions: tuple[Any, ...]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, RecordEvent)]


def test_a_vanished_socket_is_named_lost_once_its_deadline_passes() -> None:
    vm, pod = _running()
    early = _daemon(vm, pod, _gone(T0), T0 + DEADLINE / 2)
    vm = vm.evolve(status=apply_status(vm.status, early))
    cond = _reachable(vm)
    assert cond is not None and cond.reason == Reasons.UNREACHABLE
    assert _events(early) == []

    late = _daemon(vm, pod, _gone(T0), T0 + DEADLINE)
    vm = vm.evolve(status=apply_status(vm.status, late))
    cond = _reachable(vm)
    assert cond is not None
    assert (cond.status, cond.reason) == (ConditionStatus.FALSE, Reasons.VMM_SOCKET_GONE)
    assert "deleting the pod restarts the VM" in cond.message
    assert _events(late) == [Reasons.EV_VMM_UNREACHABLE]

    # One event: later decisions keep the condition and say nothing new.
    again = _daemon(vm, pod, _gone(T0), T0 + 3 * DEADLINE)
    assert _events(again) == []


def test_without_a_clock_or_a_start_no_deadline_passes() -> None:
    vm, pod = _running()
    for vmm, now in ((_gone(T0), None), (_gone(None), T0 + 10 * DEADLINE)):
        actions = _daemon(vm, pod, vmm, now)
        status = apply_status(vm.status, actions)
        cond = status.condition(VMM_REACHABLE)
        assert cond is not None and cond.reason == Reasons.UNREACHABLE
        assert _events(actions) == []


def test_the_daemon_counts_the_wait_from_the_first_failure_in_a_row() -> None:
    daemon = Daemon.__new__(Daemon)  # only the bookkeeping, no API or queue
    daemon._unreachable, daemon._busy, daemon._answered = {}, {}, {}
    daemon._lock = threading.Lock()
    first = daemon._remembered("default/vm-0", "pod-uid", VmmView(VmmState.UNREACHABLE))
    second = daemon._remembered("default/vm-0", "pod-uid", VmmView(VmmState.UNREACHABLE))
    assert first.unreachable_since is not None
    assert second.unreachable_since == first.unreachable_since
    back = daemon._remembered("default/vm-0", "pod-uid", VmmView(VmmState.RUNNING))
    assert back.unreachable_since is None
    again = daemon._remembered("default/vm-0", "pod-uid", VmmView(VmmState.UNREACHABLE))
    assert again.unreachable_since is not None
    assert "default/vm-0" in daemon._unreachable


def test_a_guest_step_whose_socket_is_gone_settles_at_the_deadline() -> None:
    """A VM in ResizeInProgress whose VMM socket vanished waited there for ever (only the
    condition said why): past the deadline the step stalls like any other, back to
    Running with Resized=False, and allocated keeps the most the guest may hold (the
    target it was asked to grow to)."""
    vm, pod = _running()
    grown = pod_resources(VmSpec(1, 2, 2 * GiB, max_vcpus=4, max_memory=4 * GiB))
    pod = PodView(
        pod.name,
        generation=3,
        observed_generation=3,
        phase=PodPhase.RUNNING,
        node_name="node-a",
        desired=grown,
        actual=grown,
    )
    record = ResizeRecord(
        vcpus=2, memory=2 * GiB, generation=2, step=Step.VMM, pod_generation=3,
        vmm_requested=True, wait_since=T0,
    )  # fmt: skip
    status = evolve(vm.status, phase=Phase.RESIZE_IN_PROGRESS, resize=record)
    vm = Vm("default", "vm-0", generation=2, spec=evolve(SPEC, cores_per_socket=2,
            memory=2 * GiB), status=status)  # fmt: skip
    early = _daemon(vm, pod, _gone(T0), T0 + DEADLINE / 2)
    assert Phase.RUNNING not in [a.phase for a in early if isinstance(a, SetPhase)]
    late = _daemon(vm, pod, _gone(T0), T0 + DEADLINE)
    after = apply_status(vm.status, late)
    assert after.phase is Phase.RUNNING, late
    resized = after.condition(RESIZED)
    assert resized is not None and resized.reason == Reasons.VMM_SOCKET_GONE, resized
    assert after.allocated == Allocation(2, 2 * GiB)  # asked, so it may hold it
    assert after.resize is not None and after.resize.step is Step.STALLED
    assert _events(late) == [Reasons.EV_VMM_UNREACHABLE, "VMResizeStalled"]
