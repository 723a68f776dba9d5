"""The kernel's view of the world: small immutable values, integers only.

Three observations feed :func:`core.kernel.decide`: the VirtualMachine (:class:`Vm`), the
VM's pod (:class:`PodView`, or ``None`` when there is none) and the VMM (:class:`VmmView`).
Adapters build them from API objects (see :mod:`core.wire`) and from ``vm.info``. CPU is
counted in vCPUs for the guest and millicores for the pod; memory is always bytes.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from attrs import frozen

from core.constants import (
    DEFAULT_MAX_MEMORY_FACTOR,
    DEFAULT_MAX_VCPUS_FACTOR,
    HOTPLUG_REGION_ALIGNMENT,
    MAX_VCPUS,
)
from core.quantity import format_bytes, format_millicores


class Phase(enum.StrEnum):
    """``status.phase`` values, spelled as ch-vmm spells them (RESIZE.md §1)."""

    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    PAUSED = "Paused"
    POD_RESIZE_IN_PROGRESS = "PodResizeInProgress"
    RESIZE_IN_PROGRESS = "ResizeInProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


RESIZE_PHASES = frozenset({Phase.POD_RESIZE_IN_PROGRESS, Phase.RESIZE_IN_PROGRESS})
STEADY_PHASES = frozenset({Phase.RUNNING, Phase.PAUSED})
# Phases in which a VMM process exists for the VM and its ceilings are fixed.
VMM_PHASES = STEADY_PHASES | RESIZE_PHASES
TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class Step(enum.StrEnum):
    """Where a resize stands; recorded in ``status.resize.step``."""

    POD_GROW = "PodGrow"  # pod grows so the guest may grow
    VMM = "Vmm"  # the guest changes; the pod already covers both old and new
    POD_SHRINK = "PodShrink"  # the guest has shrunk; the pod follows
    INFEASIBLE = "Infeasible"  # the node can never hold it; kept to avoid a retry loop
    # A wait passed its deadline, or the guest's part cannot be verified (RESIZE.md 4b):
    # kept, like Infeasible, so the same generation is not retried; a new spec starts over.
    STALLED = "Stalled"
    BOOT = "Boot"  # the VMM is being booted; attempts and the wait count boot failures


@frozen
class Allocation:
    """What the guest has (or should have): vCPUs and guest memory in bytes."""

    vcpus: int
    memory: int

    def __str__(self) -> str:
        return f"{self.vcpus} vCPUs, {format_bytes(self.memory)} memory"


@frozen
class Resources:
    """Pod-side resources of the VM container: millicores and bytes (requests = limits)."""

    cpu_millis: int
    memory: int

    def __str__(self) -> str:
        return f"cpu {format_millicores(self.cpu_millis)}, memory {format_bytes(self.memory)}"


@frozen
class BootSource:
    kernel: str | None = None
    initramfs: str | None = None
    cmdline: str | None = None


# The hash is cached: a spec is a key of core.resources' memo of its errors.
@frozen(cache_hash=True)
class VmSpec:
    sockets: int
    cores_per_socket: int
    memory: int
    max_vcpus: int | None = None
    max_memory: int | None = None
    boot: BootSource = BootSource()
    # ch-vmm's ``cpu.dedicatedCPUPlacement`` and ``memory.hugepages.pageSize``: both change
    # how the pod and the VMM are sized and resized (ADR 0013).
    dedicated_cpus: bool = False
    hugepage_size: str | None = None

    # Cached per spec (the spec is immutable): the kernel asks for these on nearly every
    # decision, and a spec lives for a whole resize, hundreds of decisions.
    @functools.cached_property
    def vcpus(self) -> int:
        return self.sockets * self.cores_per_socket

    @functools.cached_property
    def desired(self) -> Allocation:
        return Allocation(self.vcpus, self.memory)

    @property
    def vcpu_ceiling(self) -> int:
        if self.max_vcpus is not None:
            return self.max_vcpus
        return max(min(DEFAULT_MAX_VCPUS_FACTOR * self.vcpus, MAX_VCPUS), self.vcpus)

    @property
    def memory_ceiling(self) -> int:
        """The largest guest memory the VMM will reach: boot size plus an aligned region."""
        wanted = (
            self.max_memory
            if self.max_memory is not None
            else DEFAULT_MAX_MEMORY_FACTOR * self.memory
        )
        region = max(wanted - self.memory, 0)
        region = -(-region // HOTPLUG_REGION_ALIGNMENT) * HOTPLUG_REGION_ALIGNMENT
        return self.memory + region


@frozen
class Capacity:
    """What the running VMM can reach; fixed when it boots."""

    max_vcpus: int
    max_memory: int
    boot_memory: int


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


@frozen
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    observed_generation: int | None = None

    def same_as(self, other: Condition | None) -> bool:
        """Equal in everything a reader acts on (timestamps are the adapter's business)."""
        return other is not None and (
            self.type,
            self.status,
            self.reason,
            self.message,
            self.observed_generation,
        ) == (other.type, other.status, other.reason, other.message, other.observed_generation)


@frozen
class ResizeRecord:
    """``status.resize``: the target being applied and how far it got.

    Everything a restarted controller or daemon needs beyond what it can observe lives
    here: which spec generation is being applied, the pod generation our ``pods/resize``
    patch produced or the controller last checked (so an older pod view is recognised as
    stale), the attempt count that drives backoff, whether the VMM was asked, and the
    phase to return to.
    """

    vcpus: int
    memory: int
    generation: int
    step: Step
    return_phase: Phase = Phase.RUNNING
    pod_generation: int | None = None
    attempts: int = 0
    started_at: str | None = None  # stamped by the adapter; the kernel never reads clocks
    # The guest step toward this target is open: the VMM may have been asked for it
    # (written by whoever opens the step, before the daemon can call; ADR 0019). What it
    # was really asked is in the VMM's own configuration.
    vmm_requested: bool = False
    # When the current wait began (``now`` of the decision that started it, seconds since
    # the epoch; the adapters pass ``now`` in): deadlines of RESIZE.md 4b count from here.
    wait_since: float | None = None

    # Cached per record (immutable): a decision reads it several times.
    @functools.cached_property
    def target(self) -> Allocation:
        return Allocation(self.vcpus, self.memory)


@frozen
class VmStatus:
    phase: Phase | None = None
    node_name: str | None = None
    # ``status.vmPodName`` / ``status.vmPodUID``, as ch-vmm reports them: the pod last seen.
    pod_name: str | None = None
    pod_uid: str | None = None
    observed_generation: int | None = None
    desired: Allocation | None = None
    capacity: Capacity | None = None
    allocated: Allocation | None = None
    resize: ResizeRecord | None = None
    conditions: tuple[Condition, ...] = ()
    vmm_version: str | None = None  # from vmm.ping, e.g. "v50.0"

    def condition(self, type_: str) -> Condition | None:
        for cond in self.conditions:
            if cond.type == type_:
                return cond
        return None


@frozen
class FieldError:
    """One problem with an object, at a JSON field path such as ``spec.instance.cpu.sockets``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@frozen
class Vm:
    namespace: str
    name: str
    uid: str = ""
    generation: int = 1
    spec: VmSpec | None = None
    # Why ``spec`` is None: an object that slipped past admission is a condition, not a crash.
    spec_errors: tuple[FieldError, ...] = ()
    status: VmStatus = VmStatus()
    deleting: bool = False
    has_finalizer: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def evolve(self, **changes: object) -> Vm:
        return evolve(self, **changes)


class PodPhase(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


@frozen
class PodResizeCondition:
    """A ``PodResizePending`` or ``PodResizeInProgress`` condition of the pod."""

    reason: str | None
    message: str = ""
    observed_generation: int | None = None


@frozen
class PodView:
    """The VM pod as far as resize is concerned; ``desired`` is the container spec,
    ``actual`` is ``status.containerStatuses[vm-manager].resources``."""

    name: str
    generation: int = 1
    observed_generation: int | None = None
    uid: str | None = None
    phase: PodPhase = PodPhase.PENDING
    node_name: str | None = None
    deleting: bool = False
    desired: Resources | None = None
    actual: Resources | None = None
    resize_pending: PodResizeCondition | None = None
    resize_in_progress: PodResizeCondition | None = None
    legacy_resize_status: str | None = None  # ``status.resize`` of kubelets before 1.33
    # A ``pods/resize`` patch refused synchronously (1.36 PodResizeValidator, 403
    # NodeCapacity). Adapters set it for the re-decision right after the refusal.
    resize_refused: str | None = None
    # A ``pods/resize`` patch refused for a reason no retry fixes (a ResourceQuota's or
    # RBAC's 403, a 422): reported once per spec generation, like Infeasible.
    resize_forbidden: str | None = None


class VmmState(enum.StrEnum):
    NOT_CREATED = "NotCreated"
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    UNREACHABLE = "Unreachable"
    # The pod's socket does not lead to the pod's own VMM (a symlink, another pod's VMM,
    # a foreign owner): nothing was sent, and nothing is until it does (issue 17).
    UNTRUSTED = "Untrusted"
    # The caller does not look at the VMM (the controller never does).
    UNOBSERVED = "Unobserved"


class VmmCallErrorKind(enum.StrEnum):
    BUSY = "Busy"  # 429: a vCPU removal is still pending in the guest
    FAILED = "Failed"  # any other refusal
    INVALID = "Invalid"  # the request cannot work as written (no kernel): do not retry


@frozen
class VmmCallError:
    kind: VmmCallErrorKind
    message: str


# The first Cloud Hypervisor release whose ``memory_actual_size`` is the virtio-mem plugged
# size; before it the field echoes the requested size (REALITY.md 1).
PLUGGED_SIZE_SINCE = 52


# Memoized (a pure function of the version string, of which a cluster has a few): the
# kernel asks it of every new VMM view. Bounded.
@functools.lru_cache(maxsize=256)
def vmm_major(version: str | None) -> int | None:
    """The major number of a ``vmm.ping`` version such as ``"v50.0"``; None if unreadable."""
    if not version:
        return None
    digits = version.strip().lstrip("vV").split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


@frozen
class VmmView:
    """What ``vm.info`` (and ``vmm.ping``) say, reduced to what resize needs.

    ``vcpus`` and ``requested_memory`` are the configuration: Cloud Hypervisor updates it
    the moment it accepts a resize, before the guest did anything. ``actual_memory`` is
    ``memory_actual_size``, which is what the guest plugged only from v52 on (see
    :attr:`plugged_memory`); vCPU removals are seen only through :attr:`probe_ok`.
    """

    state: VmmState
    vcpus: int | None = None
    max_vcpus: int | None = None
    boot_memory: int | None = None
    hotplug_size: int | None = None
    requested_memory: int | None = None
    actual_memory: int | None = None
    detail: str = ""  # why the VMM is unreachable, for the condition message
    # The error of a vm.resize or boot call just made; adapters set it for the re-decision.
    call_error: VmmCallError | None = None
    version: str | None = None  # vmm.ping's version, e.g. "v50.0"; None if not known
    # A vCPU probe (vm.resize to the count already configured) just answered 204: no
    # removal is pending any more. Adapters set it for the re-decision.
    probe_ok: bool = False
    # When this process first saw the socket unreachable, in a row (the adapter's memory:
    # a daemon restart starts the wait again); None while reachable or unknown.
    unreachable_since: float | None = None
    # When this process's vCPU requests first answered 429, in a row (the adapter's memory,
    # like unreachable_since); None when none has, or after a restart.
    busy_since: float | None = None

    # This and the next are cached per view (immutable): one decision asks several times,
    # and the controller decides on the one UNOBSERVED_VMM for ever.
    @functools.cached_property
    def observed(self) -> bool:
        return self.state not in (VmmState.UNOBSERVED, VmmState.UNREACHABLE, VmmState.UNTRUSTED)

    @functools.cached_property
    def reports_plugged(self) -> bool:
        """Does ``memory_actual_size`` tell what the guest plugged (>= v52)? An unknown
        version counts as no: believing an echo of the request is how shrinks went wrong."""
        major = vmm_major(self.version)
        return major is not None and major >= PLUGGED_SIZE_SINCE

    @property
    def plugged_memory(self) -> int | None:
        """What the guest has plugged, when the VMM can say; else None."""
        return self.actual_memory if self.reports_plugged else None

    @property
    def requested(self) -> Allocation | None:
        if self.vcpus is None or self.requested_memory is None:
            return None
        return Allocation(self.vcpus, self.requested_memory)

    @property
    def capacity(self) -> Capacity | None:
        if self.max_vcpus is None or self.boot_memory is None:
            return None
        return Capacity(
            self.max_vcpus, self.boot_memory + (self.hotplug_size or 0), self.boot_memory
        )


UNOBSERVED_VMM = VmmView(VmmState.UNOBSERVED)


# --- evolve ---------------------------------------------------------------------------

_T = TypeVar("_T")


def _evolver(cls: type) -> tuple[Callable[[Any], tuple[Any, ...]], dict[str, int]]:
    fields = attrs.fields(cls)
    # Positional construction needs every field to be a plain init argument, in order.
    assert len(fields) > 1 and all(a.init and not a.kw_only and a.alias == a.name for a in fields)
    return operator.attrgetter(*(a.name for a in fields)), {a.name: i for i, a in enumerate(fields)}


_VALUE_CLASSES = (Allocation, Resources, Capacity, ResizeRecord, VmStatus, Vm, PodView, VmmView)
# Built once at import and never changed: for each value class, how to read all its
# fields at once and where each one goes.
_EVOLVERS = {cls: _evolver(cls) for cls in _VALUE_CLASSES}

for _cls in (*_VALUE_CLASSES, Condition, PodResizeCondition, VmmCallError, BootSource, VmSpec):
    # attrs adds a __ne__ written in Python that inverts __eq__; object's own does the
    # same in C (NotImplemented passed through), and the kernel compares allocations
    # and records with != on every decision.
    if "__ne__" in _cls.__dict__:
        del _cls.__ne__


def evolve(inst: _T, **changes: Any) -> _T:
    """``attrs.evolve(inst, **changes)``, several times faster for the model's own value
    classes (every status write and many decisions make one; attrs' generic version walks
    the fields in Python). None of them has validators or converters, so building the
    copy positionally is the same as attrs building it by keyword."""
    entry = _EVOLVERS.get(type(inst))
    if entry is None:
        return attrs.evolve(inst, **changes)
    values, index = entry
    new = list(values(inst))
    for name, value in changes.items():
        position = index.get(name)
        if position is None:
            raise TypeError(f"evolve() got an unexpected keyword argument {name!r}")
        new[position] = value
    return type(inst)(*new)
