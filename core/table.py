"""The phase graph: every transition the kernel may make, as data.

A row maps (phase, cause) to the next phase, the event that announces it, and the
process that owns the move. ``RETURN`` means "the phase the resize started from"
(Running or Paused). :func:`core.kernel.decide` computes the cause from what it observes
and looks the move up here; a pair that is not in the table is never taken. The README's
transition table is generated from these rows (``python -m core.table``) and a test checks
that it has not drifted.
"""

from __future__ import annotations

import enum

from attrs import frozen

from core.actions import EventType, Owner
from core.model import Phase


class Cause(enum.StrEnum):
    ACCEPTED = "accepted"  # a new VirtualMachine
    POD_CREATED = "pod created"
    POD_RUNNING = "pod running on a node"
    VMM_BOOTED = "VMM booted"
    VMM_PAUSED = "VMM paused"
    VMM_RESUMED = "VMM resumed"
    NEEDS_POD_GROW = "pod must grow first"
    NEEDS_VMM = "guest must change; pod covers it"
    NEEDS_POD_SHRINK = "guest done; pod must follow"
    RESIZED = "allocated == desired"
    INFEASIBLE = "pod resize infeasible"
    POD_SUCCEEDED = "pod succeeded"
    POD_FAILED = "pod failed"
    POD_LOST = "pod gone"
    STALLED = "a wait passed its deadline"
    FORBIDDEN = "pod resize refused for good"
    VMM_SHUTDOWN = "VMM reports Shutdown"
    VMM_LOST = "VMM lost the VM"
    VMM_DRIFTED = "VMM configured otherwise"


RETURN = "Return"  # the phase recorded in status.resize.returnPhase


@frozen
class Move:
    to: Phase | str
    event_type: EventType
    reason: str
    owner: Owner


_N, _W = EventType.NORMAL, EventType.WARNING
_C, _D = Owner.CONTROLLER, Owner.DAEMON
P = Phase

TRANSITIONS: dict[tuple[Phase | None, Cause], Move] = {
    (None, Cause.ACCEPTED): Move(P.PENDING, _N, "VMAccepted", _C),
    (P.PENDING, Cause.POD_CREATED): Move(P.SCHEDULING, _N, "VMPodCreated", _C),
    (P.SCHEDULING, Cause.POD_RUNNING): Move(P.SCHEDULED, _N, "VMScheduled", _C),
    (P.SCHEDULED, Cause.VMM_BOOTED): Move(P.RUNNING, _N, "VMStarted", _D),
    (P.RUNNING, Cause.VMM_PAUSED): Move(P.PAUSED, _N, "VMPaused", _D),
    (P.PAUSED, Cause.VMM_RESUMED): Move(P.RUNNING, _N, "VMResumed", _D),
    # Resize: growth is pod first, shrink is guest first (RESIZE.md §4).
    (P.RUNNING, Cause.NEEDS_POD_GROW): Move(P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C),
    (P.PAUSED, Cause.NEEDS_POD_GROW): Move(P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C),
    (P.RUNNING, Cause.NEEDS_VMM): Move(P.RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C),
    (P.PAUSED, Cause.NEEDS_VMM): Move(P.RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C),
    # A stalled step left the VMM configured for another target than the spec's.
    (P.RUNNING, Cause.VMM_DRIFTED): Move(P.RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _D),
    (P.PAUSED, Cause.VMM_DRIFTED): Move(P.RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _D),
    (P.RUNNING, Cause.NEEDS_POD_SHRINK): Move(
        P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C
    ),
    (P.PAUSED, Cause.NEEDS_POD_SHRINK): Move(P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInitiated", _C),
    (P.POD_RESIZE_IN_PROGRESS, Cause.NEEDS_VMM): Move(
        P.RESIZE_IN_PROGRESS, _N, "VMResizeInProgress", _C
    ),
    (P.POD_RESIZE_IN_PROGRESS, Cause.RESIZED): Move(RETURN, _N, "VMResizeCompleted", _C),
    (P.POD_RESIZE_IN_PROGRESS, Cause.INFEASIBLE): Move(RETURN, _W, "VMPodResizeInfeasible", _C),
    (P.RESIZE_IN_PROGRESS, Cause.NEEDS_POD_SHRINK): Move(
        P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInProgress", _D
    ),
    # The spec grew while the guest was changing: the pod must grow before the guest does.
    (P.RESIZE_IN_PROGRESS, Cause.NEEDS_POD_GROW): Move(
        P.POD_RESIZE_IN_PROGRESS, _N, "VMResizeInProgress", _D
    ),
    (P.RESIZE_IN_PROGRESS, Cause.RESIZED): Move(RETURN, _N, "VMResizeCompleted", _D),
    # RESIZE.md 4b: past a deadline, or on a refusal no retry fixes, the VM settles where
    # the pod still covers what the guest may hold, and says why.
    (P.POD_RESIZE_IN_PROGRESS, Cause.STALLED): Move(RETURN, _W, "VMResizeStalled", _C),
    (P.RESIZE_IN_PROGRESS, Cause.STALLED): Move(RETURN, _W, "VMResizeStalled", _D),
    (P.POD_RESIZE_IN_PROGRESS, Cause.FORBIDDEN): Move(RETURN, _W, "VMPodResizeForbidden", _C),
}

# A pod that ends or disappears ends the VM from any phase that has one.
for _phase in (
    P.SCHEDULING,
    P.SCHEDULED,
    P.RUNNING,
    P.PAUSED,
    P.POD_RESIZE_IN_PROGRESS,
    P.RESIZE_IN_PROGRESS,
):
    TRANSITIONS[(_phase, Cause.POD_SUCCEEDED)] = Move(P.SUCCEEDED, _N, "VMStopped", _C)
    TRANSITIONS[(_phase, Cause.POD_FAILED)] = Move(P.FAILED, _W, "VMFailed", _C)
    if _phase is not P.SCHEDULING:  # while scheduling, a lost pod is simply re-created
        TRANSITIONS[(_phase, Cause.POD_LOST)] = Move(P.FAILED, _W, "VMPodLost", _C)
        # The guest powered off, or the VMM lost its VM (restarted, exited): the VM ends
        # visibly instead of waiting on a socket for ever (RESIZE.md 4b).
        TRANSITIONS[(_phase, Cause.VMM_SHUTDOWN)] = Move(P.SUCCEEDED, _N, "VMShutdown", _D)
        if _phase is not P.SCHEDULED:
            TRANSITIONS[(_phase, Cause.VMM_LOST)] = Move(P.FAILED, _W, "VMMLost", _D)


class IllegalTransition(Exception):
    """The kernel tried a move that the table does not allow: a bug in the kernel."""


def move(phase: Phase | None, cause: Cause) -> Move:
    try:
        return TRANSITIONS[(phase, cause)]
    except KeyError:
        raise IllegalTransition(f"no transition from {phase} on {cause.value!r}") from None


def markdown_table() -> str:
    lines = [
        "| from | cause | to | event | owner |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (phase, cause), mv in TRANSITIONS.items():
        to = "Running/Paused (where it started)" if mv.to == RETURN else str(mv.to)
        lines.append(
            f"| {phase or '(new)'} | {cause.value} | {to} | "
            f"{mv.reason} ({mv.event_type}) | {mv.owner} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
