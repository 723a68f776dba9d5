"""How many VM status writes a resize takes (issue 19): every decision that changes status
is one write (the executor merges its status actions), so the kernel's decisions are what
to count. Counts, not timings: deterministic."""

from __future__ import annotations

from attrs import evolve

from core import RecordEvent, Requeue
from core.actions import SharedAction
from core.constants import GiB
from tests.unit.test_kernel import EIGHT, Rig


def _writes_and_events(rig: Rig) -> tuple[int, list[str]]:
    writes, events = 0, []
    for _ in range(12):
        for decide in (rig.controller, rig.daemon):
            actions = decide()
            if any(
                isinstance(a, SharedAction) and not isinstance(a, RecordEvent | Requeue)
                for a in actions
            ):
                writes += 1
            events += [a.reason for a in actions if isinstance(a, RecordEvent)]
            rig.kubelet_admits()
            rig.kubelet_accepts()
        rig.guest_settles()
    return writes, events


def test_a_one_step_grow_with_a_quick_kubelet_takes_three_status_writes() -> None:
    """Start (controller), patch accepted + the guest step opened (controller, one write
    since the kubelet was quick), completion (daemon): one per phase, as the floor has
    (ADR 0015). The daemon's ``vm.resize`` needs no write of its own: the hand-off opened
    the step (ADR 0019). The seed's five events are all still there."""
    rig = Rig.running(EIGHT)
    rig.set_spec(evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB))
    writes, events = _writes_and_events(rig)
    assert rig.vm.status.allocated == rig.vm.spec.desired  # type: ignore[union-attr]
    assert writes == 3, writes
    assert events == [
        "VMResizeInitiated",
        "VMResizePodInitiated",
        "VMResizeInProgress",
        "VMResizeInitiated",
        "VMResizeCompleted",
    ], events


def test_a_one_step_shrink_takes_one_status_write_per_phase() -> None:
    """Start with the guest step opened (controller), guest done and the pod step next
    (daemon), pod shrunk and done (controller)."""
    big = evolve(EIGHT, cores_per_socket=EIGHT.cores_per_socket + 2, memory=8 * GiB)
    rig = Rig.running(big, boot=EIGHT)
    rig.set_spec(EIGHT)
    writes, events = _writes_and_events(rig)
    assert rig.vm.status.allocated == rig.vm.spec.desired  # type: ignore[union-attr]
    assert writes == 3, writes
    assert events[0] == "VMResizeInitiated" and events[-1] == "VMResizeCompleted", events
    # The start is the VMM call's announcement too: both at once (ADR 0019).
    assert events.count("VMResizeInitiated") == 1, events
