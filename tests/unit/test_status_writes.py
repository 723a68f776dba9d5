"""How many VM status writes a resize takes (issue 19): every decision that changes status
is one write (the executor merges its status actions), so the kernel's decisions are what
to count. Counts, not timings: deterministic."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from attrs import evolve

from core import Action, RecordEvent, Requeue, ResizePod
from core.actions import SharedAction
from core.constants import GiB
from tests.unit.test_kernel import EIGHT, Rig


def _writes_and_events(
    rig: Rig,
    *,
    kubelet_lags: bool = False,
    each_round: Callable[[int], None] | None = None,
) -> tuple[int, list[str]]:
    """Status writes and event reasons until the resize is done. A lagging kubelet is
    the e2e case: the controller sees its own patch (and the kubelet's admission) before
    the kubelet has actuated, and looks each time. ``each_round`` changes the world
    before each round (a guest that ejects late)."""
    writes, events = 0, []

    def look(decide: Callable[[], tuple[Action, ...]]) -> None:
        nonlocal writes
        actions = decide()
        if any(
            isinstance(a, SharedAction) and not isinstance(a, RecordEvent | Requeue)
            for a in actions
        ):
            writes += 1
        events.extend(a.reason for a in actions if isinstance(a, RecordEvent))
        events.extend(
            a.announce.reason for a in actions if isinstance(a, ResizePod) and a.announce
        )

    for n in range(12):
        if each_round is not None:
            each_round(n)
        for decide in (rig.controller, rig.daemon):
            look(decide)
            if kubelet_lags:
                look(rig.controller)  # its own patch, not yet looked at
                rig.kubelet_admits()
                look(rig.controller)  # admitted, not yet actuated
            rig.kubelet_admits()
            rig.kubelet_accepts()
        rig.guest_settles()
    return writes, events


@pytest.mark.parametrize("kubelet_lags", [False, True], ids=["quick-kubelet", "lagging-kubelet"])
def test_a_one_step_grow_takes_three_status_writes(kubelet_lags: bool) -> None:
    """Start (controller), the guest step opened once the pod holds the target
    (controller), completion (daemon): one per phase, as the floor has (ADR 0015). Seeing
    its own patch and the kubelet's admission writes nothing: the patch's generation is
    kept in memory and the pod step's wait began at its opening (ADR 0021). The daemon's
    ``vm.resize`` needs no write of its own: the hand-off opened the step (ADR 0019). The
    seed's five events are all still there, ``VMResizePodInitiated`` said by the
    executor once the API server has taken the patch."""
    rig = Rig.running(EIGHT)
    rig.set_spec(evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB))
    writes, events = _writes_and_events(rig, kubelet_lags=kubelet_lags)
    assert rig.vm.status.allocated == rig.vm.spec.desired  # type: ignore[union-attr]
    assert writes == 3, writes
    assert events == [
        "VMResizeInitiated",
        "VMResizePodInitiated",
        "VMResizeInProgress",
        "VMResizeInitiated",
        "VMResizeCompleted",
    ], events


@pytest.mark.parametrize("kubelet_lags", [False, True], ids=["quick-kubelet", "lagging-kubelet"])
def test_a_one_step_shrink_takes_one_status_write_per_phase(kubelet_lags: bool) -> None:
    """Start with the guest step opened (controller), guest done and the pod step next
    (daemon), pod shrunk and done (controller)."""
    big = evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB)
    rig = Rig.running(big, boot=EIGHT)
    rig.set_spec(EIGHT)
    writes, events = _writes_and_events(rig, kubelet_lags=kubelet_lags)
    assert rig.vm.status.allocated == rig.vm.spec.desired  # type: ignore[union-attr]
    assert writes == 3, writes
    assert events[0] == "VMResizeInitiated" and events[-1] == "VMResizeCompleted", events
    # The start is the VMM call's announcement too: both at once (ADR 0019).
    assert events.count("VMResizeInitiated") == 1, events


def test_a_shrink_whose_vcpus_leave_late_writes_its_memory_with_the_step_end() -> None:
    """The guest gives its memory back at once but ejects vCPUs three rounds late (the
    probe answers 429 meanwhile): the lower memory is written with the step's end, not
    alone (ADR 0021). ``allocated`` only ever errs high, which is the safe side."""
    big = evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB)
    rig = Rig.running(big, boot=EIGHT)
    rig.ejects = False

    def eject_late(n: int) -> None:
        if n == 3:
            rig.ejects, rig.running_vcpus = True, None
        elif n < 3 and rig.vm.status.allocated is not None:
            assert rig.vm.status.allocated.memory == 8 * GiB  # not claimed lower early

    rig.set_spec(EIGHT)
    writes, _ = _writes_and_events(rig, each_round=eject_late)
    assert rig.vm.status.allocated == rig.vm.spec.desired  # type: ignore[union-attr]
    assert any(c.probe for c in rig.vmm_calls), "the probe never answered 429"
    assert writes == 3, writes


def test_a_vcpu_removal_proven_by_a_probe_is_written_while_memory_still_leaves() -> None:
    """Regression (fault schedule 46): with the fall of vCPUs held back like memory's, the
    probe's 204 was forgotten and every look probed again (a call every poll, and a VMM
    error rate turned it into a backoff past the deadline). Memory still leaving is seen
    on every look; a removal only by the probe."""
    big = evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB)
    rig = Rig.running(big, boot=EIGHT)
    rig.set_spec(EIGHT)
    rig.controller()  # the guest step opens
    for _ in range(6):
        rig.daemon()  # the guest never gives its memory back here
    probes = [c for c in rig.vmm_calls if c.probe]
    assert len(probes) == 1, rig.vmm_calls
    assert rig.vm.status.allocated is not None
    assert rig.vm.status.allocated.vcpus == EIGHT.vcpus
    assert rig.vm.status.allocated.memory == 8 * GiB
