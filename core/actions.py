"""What the kernel asks for. Every action is a small frozen value.

Which process carries an action out is part of it: side effects on the pod and the
Kubernetes object belong to the controller (:class:`ControllerAction`), side effects on
the VMM socket belong to the node daemon (:class:`DaemonAction`). Status writes, events
and requeue hints (:class:`SharedAction`) carry an ``owner`` chosen by the kernel row that
produced them, so that for any situation exactly one process writes.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from attrs import field, frozen

from core.model import Allocation, Capacity, Condition, Phase, ResizeRecord, Resources


class Owner(enum.StrEnum):
    CONTROLLER = "controller"
    DAEMON = "daemon"


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Action:
    owner: Owner


@frozen
class ControllerAction(Action):
    owner: ClassVar[Owner] = Owner.CONTROLLER


@frozen
class DaemonAction(Action):
    owner: ClassVar[Owner] = Owner.DAEMON


@frozen
class SharedAction(Action):
    owner: Owner = field(kw_only=True)


# --- status (merged by the executor into one status-subresource write) ---


@frozen
class SetPhase(SharedAction):
    phase: Phase


@frozen
class SetCondition(SharedAction):
    condition: Condition


@frozen
class SetResizeTarget(SharedAction):
    """Replace ``status.resize``; ``None`` clears it."""

    record: ResizeRecord | None


@frozen
class SetAllocated(SharedAction):
    allocation: Allocation


@frozen
class SetCapacity(SharedAction):
    capacity: Capacity


@frozen
class SetVmmVersion(SharedAction):
    """``status.vmmVersion``: what ``vmm.ping`` reported (it decides what counts as evidence)."""

    version: str


@frozen
class SetObserved(SharedAction):
    """``status.observedGeneration``, ``status.desired``, ``status.nodeName`` and the VM
    pod's ``status.vmPodName`` / ``status.vmPodUID``."""

    generation: int
    desired: Allocation | None
    node_name: str | None
    pod_name: str | None = None
    pod_uid: str | None = None


# --- events and scheduling hints ---


@frozen
class RecordEvent(SharedAction):
    type: EventType
    reason: str
    message: str


@frozen
class Requeue(SharedAction):
    """Look again after ``after`` seconds even if nothing is observed to change."""

    after: float


# --- controller side effects ---


@frozen
class AddFinalizer(ControllerAction):
    pass


@frozen
class RemoveFinalizer(ControllerAction):
    pass


@frozen
class CreatePod(ControllerAction):
    resources: Resources


@frozen
class DeletePod(ControllerAction):
    pass


@frozen
class ResizePod(ControllerAction):
    """PATCH ``pods/resize``: requests = limits = these, for the VM container.

    ``announce`` is the event to record once the API server has taken the patch (the
    seed's ``VMResizePodInitiated``, "when the pod resize subresource update succeeds"):
    only the executor knows that it did, and saying it then needs no status write and
    no second look at the pod (ADR 0021)."""

    resources: Resources
    announce: RecordEvent | None = field(default=None, kw_only=True)


# --- daemon side effects ---


@frozen
class BootVmm(DaemonAction):
    """vm.create with this configuration, then vm.boot."""

    boot_vcpus: int
    max_vcpus: int
    memory: int
    hotplug_size: int


@frozen
class ResizeVmm(DaemonAction):
    """vm.resize with only the fields that change (``None`` = leave alone)."""

    vcpus: int | None = None
    memory: int | None = None
    # A probe: the vCPU count already configured, sent again to learn whether a removal
    # is still pending (429) or done (204). Its success is fed back as ``probe_ok``.
    probe: bool = False


STATUS_ACTIONS = (
    SetPhase,
    SetCondition,
    SetResizeTarget,
    SetAllocated,
    SetCapacity,
    SetObserved,
    SetVmmVersion,
)


def owned_by(actions: tuple[Action, ...], owner: Owner) -> tuple[Action, ...]:
    # A list comprehension, not a generator: this runs after every decision.
    return tuple([a for a in actions if a.owner is owner])
