"""A pure model of a kubelet's pod lifecycle and in-place resize (Kubernetes 1.33-1.35).

Theory of operation
-------------------
:class:`Kubelet` is a sans-I/O state machine in the style of h11. The caller owns every
clock, socket and process; the model owns every decision. The caller hands it the pods
bound to its node (plain JSON dicts, as the API server returns them), the memory each
pod's VMM process holds (the cgroup usage: guest memory it has touched plus its own), the
exit codes of VMMs that exited, and the current time; it answers with effects to carry out in order
(:class:`WritePodStatus`, :class:`StartVmm`, :class:`StopVmm`, :class:`DeletePod`,
:class:`RecordEvent`) and the time at which it wants to be called again.

Per pod the model keeps the three resource states of KEP-1287:

- *desired*: ``spec.containers[].resources``, read from the input on every call;
- *allocated*: what the kubelet admitted (its checkpoint), reported as
  ``containerStatuses[].allocatedResources`` (requests only, as the kubelet does);
- *actuated*: what the runtime applied, reported as ``containerStatuses[].resources``.

A change flows desired -> allocated -> actuated:

1. Desired != allocated (a ``pods/resize`` patch): the resize is judged as one atomic
   request across all containers, requests and limits together. A Guaranteed pod under
   a static CPU or memory manager policy, or new total requests above capacity minus
   reserved -> ``PodResizePending`` reason ``Infeasible`` (not retried until the spec
   changes). Within that, but not within what the other pods leave of allocatable
   (which also subtracts the hard-eviction threshold) -> ``PodResizePending`` reason
   ``Deferred``, retried when another pod is added, removed, ends or is resized,
   ``deferred_retry_initial_s`` after it was deferred and then every
   ``deferred_retry_s``. Otherwise accepted: allocated := desired,
   ``PodResizePending`` cleared, ``PodResizeInProgress`` (no reason) for this generation.
2. Allocated != actuated: after ``resize_delay_s`` (on the next ``runtime_poll_s``
   tick, if set) the resize is actuated, unless a memory limit decreases to or below
   what the VMM process holds: then ``PodResizeInProgress`` keeps its generation and
   gets reason ``Error`` with the kubelet's message, and the actuation is retried on
   every later call (and every ``error_retry_s``, the sync period).
3. Actuated == allocated: ``PodResizeInProgress`` is removed, ``resources`` show the
   new values.

``status.observedGeneration`` and the kubelet-owned conditions carry the generation of
the pod the status was computed from; a resize condition carries the generation of the
resize it describes. Resize events are recorded when a condition's reason or generation
changes, not on every new message. In legacy mode the model writes ``status.resize``
(``InProgress``, ``Deferred``, ``Infeasible``) instead of the two conditions, as kubelets
before 1.33 did.

The model does not schedule. :func:`selects_node` and :func:`fits_node` are the first-fit
rule the adapter (and the simulations) use to bind pending pods, kept here because they
are pure and must agree with the kubelet's own admission check.

A VMM that exits terminates the VMM container; with ``restartPolicy: Never`` (or
``OnFailure`` and exit 0) the pod ends ``Failed`` or ``Succeeded``, otherwise the VMM is
started again with the allocated resources.

A VMM that exits again is started after the kubelet's crash-loop back-off (10 s, doubling
to 5 min); meanwhile its container waits in ``CrashLoopBackOff`` and the pod is not Ready.

Known simplifications (each stated where it lives): no init containers, no probes, the
VMM container gets all of the pod's memory usage and its exit ends the other containers
too, a deleted pod's VMM is taken to exit cleanly.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from attrs import define, field, frozen

from core.constants import VM_CONTAINER
from core.quantity import (
    QuantityError,
    format_bytes,
    format_millicores,
    parse_bytes,
    parse_millicores,
)

__all__ = [
    "DEFAULT_DEFERRED_RETRY_S",
    "DEFAULT_ERROR_RETRY_S",
    "HOSTNAME_LABEL",
    "DeletePod",
    "Effect",
    "Kubelet",
    "KubeletConfig",
    "KubeletInputError",
    "Output",
    "RecordEvent",
    "ResizeStatus",
    "Resources",
    "StartVmm",
    "StopVmm",
    "WritePodStatus",
    "fits_node",
    "mark_proposed",
    "node_labels",
    "pod_requests",
    "rfc3339",
    "selects_node",
]

# --- constants --------------------------------------------------------------------------

HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_SCHEDULER = "default-scheduler"

# The real kubelet retries pending resizes 30 s after start and then every 3 min; the
# simulated one defaults to a shorter period so demos and tests see it happen.
DEFAULT_DEFERRED_RETRY_S = 60.0
# A refused actuation is retried on every pod sync; the real kubelet's come every
# ~12-15 s, the simulated one's default is short so that tests see the retry.
DEFAULT_ERROR_RETRY_S = 2.0
# How often a DeletePod is repeated while the pod is still observed (a lost delete).
DELETE_RETRY_S = 10.0
# The kubelet's crash-loop back-off: a container that exits is started again at once the
# first time, then after 10 s, doubling up to 5 min; a back-off untouched for twice that
# long starts over (kubelet's flowcontrol.Backoff).
CRASH_BACKOFF_INITIAL_S = 10.0
CRASH_BACKOFF_MAX_S = 300.0
REASON_CRASH_LOOP = "CrashLoopBackOff"
EV_BACK_OFF = "BackOff"

PENDING = "PodResizePending"
IN_PROGRESS = "PodResizeInProgress"
REASON_DEFERRED = "Deferred"
REASON_INFEASIBLE = "Infeasible"
REASON_ERROR = "Error"

# Conditions the kubelet computes itself; any other condition on the pod is preserved.
_READY_TO_START = "PodReadyToStartContainers"
_INITIALIZED = "Initialized"
_READY = "Ready"
_CONTAINERS_READY = "ContainersReady"
_SCHEDULED = "PodScheduled"
_KUBELET_CONDITIONS = (_READY_TO_START, _INITIALIZED, _READY, _CONTAINERS_READY, _SCHEDULED)
_OWNED_CONDITIONS = frozenset((*_KUBELET_CONDITIONS, PENDING, IN_PROGRESS))
_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_TERMINAL_PHASES = ("Succeeded", "Failed")

# Event reasons of pkg/kubelet/events.
EV_RESIZE_STARTED = "ResizeStarted"
EV_RESIZE_COMPLETED = "ResizeCompleted"
EV_RESIZE_DEFERRED = "ResizeDeferred"
EV_RESIZE_INFEASIBLE = "ResizeInfeasible"
EV_RESIZE_ERROR = "ResizeError"
EV_OUT_OF = "OutOf"  # + resource name, the reason of an admission rejection


class ResizeStatus(enum.StrEnum):
    """``status.resize`` of kubelets before 1.33 (``Proposed`` came from the API server)."""

    PROPOSED = "Proposed"
    IN_PROGRESS = "InProgress"
    DEFERRED = "Deferred"
    INFEASIBLE = "Infeasible"


class KubeletInputError(ValueError):
    """The caller handed the model something a real API server would never send."""


# --- time -------------------------------------------------------------------------------


def rfc3339(t: float) -> str:
    """``t`` seconds since the epoch as the second-precision UTC string of ``metav1.Time``.

    Pure arithmetic (days-to-civil), because this package may not import ``datetime``.
    """
    seconds = int(t // 1)
    days, rest = divmod(seconds, 86400)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"


# --- values -----------------------------------------------------------------------------


@frozen
class Resources:
    """One container's CPU (millicores) and memory (bytes) requests and limits."""

    cpu_request: int | None = None
    memory_request: int | None = None
    cpu_limit: int | None = None
    memory_limit: int | None = None

    @classmethod
    def from_json(cls, obj: object, where: str) -> Resources:
        """Parse a ``ResourceRequirements``; requests default to limits (as the API server
        defaults them), other resources are ignored."""
        if obj is None:
            return cls()
        if type(obj) is not dict and not isinstance(obj, Mapping):  # dict: skip the ABC
            raise KubeletInputError(f"{where}: expected an object, got {type(obj).__name__}")
        requests = _resource_list(obj.get("requests"), f"{where}.requests")
        limits = _resource_list(obj.get("limits"), f"{where}.limits")
        cpu_limit = _cpu(limits.get("cpu"), f"{where}.limits.cpu")
        memory_limit = _memory(limits.get("memory"), f"{where}.limits.memory")
        cpu_request = _cpu(requests.get("cpu"), f"{where}.requests.cpu")
        memory_request = _memory(requests.get("memory"), f"{where}.requests.memory")
        return cls(
            cpu_request=cpu_limit if cpu_request is None else cpu_request,
            memory_request=memory_limit if memory_request is None else memory_request,
            cpu_limit=cpu_limit,
            memory_limit=memory_limit,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        requests = self.requests_json()
        if requests:
            out["requests"] = requests
        limits = _list_json(self.cpu_limit, self.memory_limit)
        if limits:
            out["limits"] = limits
        return out

    def requests_json(self) -> dict[str, str]:
        return _list_json(self.cpu_request, self.memory_request)


@frozen
class _Totals:
    cpu: int = 0  # millicores
    memory: int = 0  # bytes

    def __add__(self, other: _Totals) -> _Totals:
        return _Totals(self.cpu + other.cpu, self.memory + other.memory)

    def max(self, other: _Totals) -> _Totals:
        return _Totals(max(self.cpu, other.cpu), max(self.memory, other.memory))


def _resource_list(obj: object, where: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if type(obj) is not dict and not isinstance(obj, Mapping):  # dict: skip the ABC
        raise KubeletInputError(f"{where}: expected an object, got {type(obj).__name__}")
    return obj


def _cpu(value: object, where: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_millicores(value)
    except QuantityError as exc:
        raise KubeletInputError(f"{where}: {exc}") from exc


def _memory(value: object, where: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except QuantityError as exc:
        raise KubeletInputError(f"{where}: {exc}") from exc


def _list_json(cpu: int | None, memory: int | None) -> dict[str, str]:
    out = {}
    if cpu is not None:
        out["cpu"] = format_millicores(cpu)
    if memory is not None:
        out["memory"] = format_bytes(memory)
    return out


def _requests(resources: Mapping[str, Resources]) -> _Totals:
    # Summed as plain ints: admission sums this over every pod of the node, and a
    # _Totals per term was most of that cost.
    cpu = memory = 0
    for r in resources.values():
        cpu += r.cpu_request or 0
        memory += r.memory_request or 0
    return _Totals(cpu, memory)


def _held(pods: Iterable[_Pod]) -> _Totals:
    """What ``pods`` hold of the node together: the sum of their :meth:`_Pod.holds`,
    worked out here in plain ints (this runs over every pod of the node at each
    admission and resize, and the _Totals of each term were most of its cost)."""
    cpu = memory = 0
    running = _Stage.RUNNING
    for p in pods:
        if p.stage is not running:
            continue
        allocated_cpu = allocated_memory = actuated_cpu = actuated_memory = 0
        for r in p.allocated.values():
            allocated_cpu += r.cpu_request or 0
            allocated_memory += r.memory_request or 0
        for r in p.actuated.values():
            actuated_cpu += r.cpu_request or 0
            actuated_memory += r.memory_request or 0
        overhead = p.overhead
        cpu += max(allocated_cpu, actuated_cpu) + overhead.cpu
        memory += max(allocated_memory, actuated_memory) + overhead.memory
    return _Totals(cpu, memory)


def _pod_memory_limit(resources: Mapping[str, Resources]) -> int | None:
    """The pod cgroup's memory limit: the sum of the containers' limits, or none at all
    when any container is unlimited."""
    limits = [r.memory_limit for r in resources.values()]
    if not limits or any(limit is None for limit in limits):
        return None
    return sum(limit for limit in limits if limit is not None)


# --- configuration and effects ----------------------------------------------------------


@frozen
class KubeletConfig:
    """One node. ``cpu`` is the node's capacity in millicores, ``memory`` its capacity in
    bytes; the ``reserved_*`` amounts (system-reserved plus kube-reserved) and the
    hard-eviction threshold are taken off to make allocatable, as the kubelet does."""

    node_name: str
    cpu: int
    memory: int
    labels: Mapping[str, str] = field(factory=dict, converter=dict, hash=False)
    resize_delay_s: float = 0.0
    deferred_retry_s: float = DEFAULT_DEFERRED_RETRY_S
    # The first retry after a resize is deferred (the real kubelet: 30 s, then every
    # 3 min); None keeps the period for both.
    deferred_retry_initial_s: float | None = None
    error_retry_s: float = DEFAULT_ERROR_RETRY_S
    # Write ``status.resize`` instead of the PodResizePending/InProgress conditions.
    legacy_resize_status: bool = False
    # Kubelets before 1.33 reported no ``observedGeneration`` at all.
    report_observed_generation: bool = True
    # The container that runs the VMM; it is charged with the pod's memory usage.
    vmm_container: str = VM_CONTAINER
    host_ip: str = "127.0.0.1"
    # --system-reserved plus --kube-reserved: off capacity for Infeasible and allocatable.
    reserved_cpu: int = 0
    reserved_memory: int = 0
    # --eviction-hard memory.available: off allocatable only, so a resize inside it is
    # Deferred for ever rather than Infeasible.
    eviction_hard_memory: int = 0
    # --cpu-manager-policy=static / --memory-manager-policy=Static: a Guaranteed pod's
    # resize is Infeasible (1.33-1.35 without InPlacePodVerticalScalingExclusiveCPUs).
    cpu_manager_static: bool = False
    memory_manager_static: bool = False
    # The kubelet acts on resizes on its runtime poll (PLEG relist, ~1 s): an accepted
    # resize is actuated and reported on the first tick of this period after it is due.
    # 0: at once.
    runtime_poll_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not self.node_name:
            raise KubeletInputError("node_name is empty")
        if self.cpu <= 0 or self.memory <= 0:
            raise KubeletInputError(
                f"node {self.node_name}: capacity cpu and memory must be positive, "
                f"got cpu={self.cpu}m memory={self.memory}"
            )
        for name in ("reserved_cpu", "reserved_memory", "eviction_hard_memory"):
            if getattr(self, name) < 0:
                raise KubeletInputError(f"node {self.node_name}: {name} must not be negative")
        if self.allocatable_cpu <= 0 or self.allocatable_memory <= 0:
            raise KubeletInputError(
                f"node {self.node_name}: reserved and eviction threshold leave nothing "
                f"allocatable (cpu={self.allocatable_cpu}m memory={self.allocatable_memory})"
            )
        for name in ("resize_delay_s", "runtime_poll_s", "deferred_retry_s", "error_retry_s"):
            value = getattr(self, name)
            if value < 0 or (name in ("deferred_retry_s", "error_retry_s") and value == 0):
                raise KubeletInputError(f"node {self.node_name}: {name} must be positive")
        initial = self.deferred_retry_initial_s
        if initial is not None and initial <= 0:
            raise KubeletInputError(
                f"node {self.node_name}: deferred_retry_initial_s must be positive"
            )

    @property
    def feasible_cpu(self) -> int:
        """What a pod may ever ask for: capacity minus reserved (the Infeasible bound)."""
        return self.cpu - self.reserved_cpu

    @property
    def feasible_memory(self) -> int:
        return self.memory - self.reserved_memory

    @property
    def allocatable_cpu(self) -> int:
        """Node allocatable, what admission and Deferred are judged against."""
        return self.cpu - self.reserved_cpu

    @property
    def allocatable_memory(self) -> int:
        return self.memory - self.reserved_memory - self.eviction_hard_memory

    @property
    def first_deferred_retry_s(self) -> float:
        initial = self.deferred_retry_initial_s
        return self.deferred_retry_s if initial is None else initial


@frozen
class WritePodStatus:
    """Merge-patch ``status`` into the pod's status subresource (None clears a field;
    lists replace the pod's lists whole)."""

    namespace: str
    name: str
    uid: str
    status: dict[str, Any] = field(eq=True, hash=False)


@frozen
class StartVmm:
    """Make sure the pod's VMM process runs (idempotent: the pod may be adopted)."""

    namespace: str
    name: str
    uid: str


@frozen
class StopVmm:
    namespace: str
    name: str
    uid: str


@frozen
class DeletePod:
    """Confirm termination: delete with grace period 0 and a UID precondition."""

    namespace: str
    name: str
    uid: str


@frozen
class RecordEvent:
    namespace: str
    name: str
    uid: str
    type: str  # Normal | Warning
    reason: str
    message: str


Effect = WritePodStatus | StartVmm | StopVmm | DeletePod | RecordEvent


@frozen
class Output:
    """What to do now, in order, and when to call :meth:`Kubelet.step` again at the
    latest (None: only when something changes)."""

    effects: tuple[Effect, ...] = ()
    wake_at: float | None = None


# --- scheduling helpers (pure; the adapter binds, the model does not schedule) ------------


def node_labels(config: KubeletConfig) -> dict[str, str]:
    return {
        HOSTNAME_LABEL: config.node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **config.labels,
    }


def selects_node(config: KubeletConfig, pod: Mapping[str, Any]) -> bool:
    """Whether an unscheduled pod is one this node would bind: default scheduler, no
    scheduling gates left, and a ``nodeSelector`` (if any) that the node's labels satisfy."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if spec.get("schedulingGates"):
        return False  # the scheduler leaves gated pods alone; the API server refuses them
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return False
    if (spec.get("schedulerName") or DEFAULT_SCHEDULER) != DEFAULT_SCHEDULER:
        return False
    labels = node_labels(config)
    selector = spec.get("nodeSelector") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def pod_requests(pod: Mapping[str, Any]) -> tuple[int, int]:
    """A pod's (cpu millicores, memory bytes) as the scheduler counts them: per container
    the largest of desired (unless the resize is Infeasible), allocated and actual
    requests, summed, plus the pod overhead."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    where = _pod_ref(pod)
    infeasible = _condition_reason(status, PENDING) == REASON_INFEASIBLE or (
        status.get("resize") == ResizeStatus.INFEASIBLE
    )
    statuses = {cs.get("name"): cs for cs in status.get("containerStatuses") or ()}
    total = _Totals()
    for index, container in enumerate(spec.get("containers") or ()):
        name = container.get("name")
        at = f"{where}: spec.containers[{index}]"
        desired = _Totals()
        if not infeasible or name not in statuses:
            r = Resources.from_json(container.get("resources"), f"{at}.resources")
            desired = _Totals(r.cpu_request or 0, r.memory_request or 0)
        cs = statuses.get(name) or {}
        allocated = Resources.from_json(
            {"requests": cs.get("allocatedResources") or {}}, f"{at} allocatedResources"
        )
        actual = Resources.from_json(cs.get("resources"), f"{at} status resources")
        total = total + desired.max(
            _Totals(allocated.cpu_request or 0, allocated.memory_request or 0)
        ).max(_Totals(actual.cpu_request or 0, actual.memory_request or 0))
    overhead = _overhead(spec, where)
    return total.cpu + overhead.cpu, total.memory + overhead.memory


def fits_node(
    config: KubeletConfig, bound_pods: Iterable[Mapping[str, Any]], pod: Mapping[str, Any]
) -> bool:
    """First fit: the requests of the live pods bound to this node plus this pod's stay
    within allocatable (capacity minus reserved minus the eviction threshold)."""
    cpu, memory = pod_requests(pod)
    for other in bound_pods:
        if (other.get("spec") or {}).get("nodeName") != config.node_name:
            continue
        if (other.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        if _uid(other) == _uid(pod):
            continue
        other_cpu, other_memory = pod_requests(other)
        cpu += other_cpu
        memory += other_memory
    return cpu <= config.allocatable_cpu and memory <= config.allocatable_memory


def mark_proposed(pod: dict[str, Any]) -> dict[str, Any]:
    """What an API server before 1.33 did to a pod whose resources a patch changed: set
    ``status.resize = Proposed`` (for simulations that play such an API server)."""
    status = dict(pod.get("status") or {})
    status["resize"] = str(ResizeStatus.PROPOSED)
    return {**pod, "status": status}


# --- internal per-pod state -------------------------------------------------------------


@frozen
class _Cond:
    """A resize condition as the kubelet's status manager keeps it."""

    type: str
    reason: str
    message: str
    generation: int
    transition: str
    probe: str

    def to_json(self, with_generation: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "status": "True"}
        if with_generation:
            out["observedGeneration"] = self.generation
        out["lastProbeTime"] = self.probe
        out["lastTransitionTime"] = self.transition
        if self.reason:
            out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        return out


def _set_cond(
    old: _Cond | None, type_: str, reason: str, message: str, generation: int, ts: str
) -> _Cond:
    """The status manager's rule: the transition time moves only when the reason does."""
    transition = old.transition if old is not None and old.reason == reason else ts
    return _Cond(type_, reason, message, generation, transition, ts)


class _Stage(enum.Enum):
    RUNNING = "running"
    REJECTED = "rejected"
    EXITED = "exited"  # the VMM exited and the restart policy keeps it down: a terminal phase
    TERMINATED = "terminated"  # being deleted


@define
class _Pod:
    uid: str
    namespace: str
    name: str
    stage: _Stage
    containers: tuple[str, ...] = ()
    images: dict[str, str] = field(factory=dict)
    started_at: str = ""
    scheduled_at: str = ""
    allocated: dict[str, Resources] = field(factory=dict)
    actuated: dict[str, Resources] = field(factory=dict)
    overhead: _Totals = _Totals()
    generation: int = 1
    priority: int = 0
    guaranteed: bool = False
    evaluated: tuple[int, dict[str, Resources]] | None = None
    pending: _Cond | None = None
    in_progress: _Cond | None = None
    actuate_at: float | None = None  # allocated != actuated: when to try actuating
    error_retry_at: float | None = None
    rejection: tuple[str, str] | None = None  # (reason, message)
    vmm_started: bool = False
    terminated_at: str = ""
    restart_policy: str = "Always"
    # The VMM container: its exit code (None: still runs, or stopped by a deletion), how
    # often it was restarted, its last termination, and when the current one started.
    exit_code: int | None = None
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    vmm_started_at: str = ""
    # The crash-loop back-off: when the exited VMM container starts again (None: it runs),
    # the wait after its next exit, and when the back-off last moved.
    restart_at: float | None = None
    backoff_s: float = 0.0
    backoff_moved: float | None = None
    # A pod found already Succeeded/Failed (a restarted kubelet): its status is final.
    status_frozen: bool = False
    delete_sent_at: float | None = None
    last_written: dict[str, Any] | None = None
    foreign_conditions: list[dict[str, Any]] = field(factory=list)
    # The last status rendered and what it was rendered from (see Kubelet._rendered).
    rendered: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def holds(self) -> _Totals:
        """What the pod occupies on the node while a resize is under way: the larger of
        allocated and actuated, per resource (the kubelet's fit check does the same)."""
        if self.stage is not _Stage.RUNNING:
            return _Totals()
        allocated, actuated = _requests(self.allocated), _requests(self.actuated)
        return _Totals(
            max(allocated.cpu, actuated.cpu) + self.overhead.cpu,
            max(allocated.memory, actuated.memory) + self.overhead.memory,
        )


@frozen
class _Observed:
    """The parts of an input pod the model reads."""

    uid: str
    namespace: str
    name: str
    generation: int
    deleting: bool
    created: str
    priority: int
    containers: tuple[str, ...]
    images: dict[str, str] = field(eq=False, hash=False)
    desired: dict[str, Resources] = field(eq=False, hash=False)
    overhead: _Totals
    status: Mapping[str, Any] = field(eq=False, hash=False)
    # The status's conditions the kubelet does not own, to be preserved on every write.
    foreign: tuple[Mapping[str, Any], ...] = field(default=(), eq=False, hash=False)
    restart_policy: str = "Always"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid") or "")


def _pod_ref(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"pod {meta.get('namespace') or ''}/{meta.get('name') or ''}"


def _condition_reason(status: Mapping[str, Any], type_: str) -> str | None:
    for cond in status.get("conditions") or ():
        if cond.get("type") == type_:
            return str(cond.get("reason") or "")
    return None


def _overhead(spec: Mapping[str, Any], where: str) -> _Totals:
    overhead = spec.get("overhead") or {}
    return _Totals(
        _cpu(overhead.get("cpu"), f"{where}: spec.overhead.cpu") or 0,
        _memory(overhead.get("memory"), f"{where}: spec.overhead.memory") or 0,
    )


def _observe(pod: Mapping[str, Any]) -> _Observed:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    uid = _uid(pod)
    where = _pod_ref(pod)
    if not uid:
        raise KubeletInputError(f"{where}: metadata.uid is missing")
    if not meta.get("name"):
        raise KubeletInputError(f"pod with uid {uid}: metadata.name is missing")
    containers = spec.get("containers") or ()
    if not containers:
        raise KubeletInputError(f"{where}: spec.containers is empty")
    names: list[str] = []
    images: dict[str, str] = {}
    desired: dict[str, Resources] = {}
    for index, container in enumerate(containers):
        name = container.get("name")
        if not name or name in desired:
            raise KubeletInputError(
                f"{where}: spec.containers[{index}].name is missing or repeated"
            )
        names.append(name)
        images[name] = str(container.get("image") or "")
        desired[name] = Resources.from_json(
            container.get("resources"), f"{where}: spec.containers[{index}].resources"
        )
    generation = meta.get("generation")
    priority = spec.get("priority")
    status = pod.get("status") or {}
    restart_policy = spec.get("restartPolicy") or "Always"
    if restart_policy not in _RESTART_POLICIES:
        raise KubeletInputError(
            f"{where}: spec.restartPolicy {restart_policy!r} is not one of "
            + ", ".join(_RESTART_POLICIES)
        )
    return _Observed(
        uid=uid,
        namespace=str(meta.get("namespace") or ""),
        name=str(meta["name"]),
        generation=generation if isinstance(generation, int) else 1,
        deleting=bool(meta.get("deletionTimestamp")),
        created=str(meta.get("creationTimestamp") or ""),
        priority=priority if isinstance(priority, int) else 0,
        containers=tuple(names),
        images=images,
        desired=desired,
        overhead=_overhead(spec, where),
        status=status,
        foreign=tuple(
            c
            for c in status.get("conditions") or ()
            if (type(c) is dict or isinstance(c, Mapping))  # dict: skip the ABC
            and c.get("type") not in _OWNED_CONDITIONS
        ),
        restart_policy=str(restart_policy),
    )


def _guaranteed(resources: Mapping[str, Resources]) -> bool:
    return all(
        r.cpu_limit is not None
        and r.memory_limit is not None
        and r.cpu_request == r.cpu_limit
        and r.memory_request == r.memory_limit
        for r in resources.values()
    )


def _go_error_list(errors: list[str]) -> str:
    """How Go's ``utilerrors.NewAggregate(errs).Error()`` prints: one error bare, several
    bracketed and comma-separated."""
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


# --- the model --------------------------------------------------------------------------


class Kubelet:
    """The kubelet of one node. Drive it with :meth:`step`; report failed status writes
    with :meth:`status_write_failed`. :meth:`usage_wanted` names the pods whose memory
    usage the next step needs (pending memory-limit decreases)."""

    def __init__(self, config: KubeletConfig) -> None:
        self.config = config
        self._pods: dict[str, _Pod] = {}
        self._retry_at: float | None = None  # next periodic retry of pending resizes
        # uid -> (resourceVersion, what was read from that version); see _observe_pod.
        self._observed: dict[str, tuple[str, _Observed]] = {}

    # -- queries ---------------------------------------------------------------------

    def usage_wanted(self, pods: Iterable[Mapping[str, Any]] = ()) -> frozenset[str]:
        """UIDs of the pods whose memory usage the next :meth:`step` over ``pods`` needs:
        an allocated memory-limit decrease not yet actuated, or (among ``pods``) a spec
        that lowers a memory limit below what is actuated now. Read usage for these
        before stepping, or a zero resize delay actuates the decrease unchecked."""
        wanted = set()
        for p in self._pods.values():
            if p.stage is not _Stage.RUNNING or p.actuate_at is None:
                continue
            if any(
                _decreases(p.actuated[c].memory_limit, p.allocated[c].memory_limit)
                for c in p.containers
            ):
                wanted.add(p.uid)
        for pod in pods:
            p = self._pods.get(_uid(pod))
            if p is None or p.stage is not _Stage.RUNNING:
                continue
            for index, container in enumerate((pod.get("spec") or {}).get("containers") or ()):
                name = container.get("name")
                if name not in p.actuated:
                    continue
                limits = (container.get("resources") or {}).get("limits") or {}
                where = f"{_pod_ref(pod)}: spec.containers[{index}].resources.limits.memory"
                desired = _memory(limits.get("memory"), where)
                if _decreases(p.actuated[name].memory_limit, desired):
                    wanted.add(p.uid)
        return frozenset(wanted)

    def known(self) -> frozenset[str]:
        return frozenset(self._pods)

    def allocated(self, uid: str) -> dict[str, Resources] | None:
        p = self._pods.get(uid)
        return dict(p.allocated) if p is not None and p.stage is _Stage.RUNNING else None

    def actuated(self, uid: str) -> dict[str, Resources] | None:
        p = self._pods.get(uid)
        return dict(p.actuated) if p is not None and p.stage is _Stage.RUNNING else None

    def free(self) -> tuple[int, int]:
        """Allocatable minus what admitted pods hold: (millicores, bytes)."""
        used = _held(self._pods.values())
        cfg = self.config
        return cfg.allocatable_cpu - used.cpu, cfg.allocatable_memory - used.memory

    # -- feedback --------------------------------------------------------------------

    def status_write_failed(self, uid: str) -> None:
        """The last WritePodStatus for ``uid`` did not land: write it again next step."""
        p = self._pods.get(uid)
        if p is not None:
            p.last_written = None

    # -- the step --------------------------------------------------------------------

    def step(
        self,
        now: float,
        pods: Iterable[Mapping[str, Any]],
        usage: Mapping[str, int] | None = None,
        exits: Mapping[str, int] | None = None,
    ) -> Output:
        """Observe the pods bound to this node (others are ignored), with the memory each
        pod's VMM process holds (by UID; a missing entry means unknown, which never
        blocks) and the exit code of each VMM that exited since the last call (by UID),
        and return what a kubelet would do at time ``now``."""
        run = _Run(self, now, usage or {})
        observed: dict[str, _Observed] = {}
        node_name = self.config.node_name
        for pod in pods:
            if (pod.get("spec") or {}).get("nodeName") != node_name:
                continue
            obs = self._observe_pod(pod)
            observed[obs.uid] = obs
        if len(self._observed) > len(observed):
            self._observed = {uid: seen for uid, seen in self._observed.items() if uid in observed}
        run.forget_vanished(observed)
        run.terminate_deleting(observed)
        run.handle_exits(exits or {})
        run.restart_due()
        run.admit_new(observed)
        run.handle_updates(observed)
        run.actuate_due()
        # A retry can accept a shrink whose actuation frees room for the next deferred
        # resize; each round either actuates something or ends the loop.
        for _ in range(len(self._pods) + 1):
            run.retry_pending()
            run.actuate_due()
            if not run.retry_trigger:
                break
        run.write_statuses(observed)
        return Output(tuple(run.effects), self._wake_at(now))

    def _observe_pod(self, pod: Mapping[str, Any]) -> _Observed:
        """``_observe(pod)``, reused while the pod's resourceVersion stays the same.

        The caller hands over every pod on every step, and reading one (its quantities
        above all) was most of a step's cost. An API server gives a changed object a new
        resourceVersion, so an unchanged one is the same object: what was read from it
        still holds. A pod without a resourceVersion is read afresh every time.
        """
        meta = pod.get("metadata")
        # type() first: a Mapping check of a dict runs through the ABC machinery, for
        # every pod of the node at every step.
        if type(meta) is not dict and not isinstance(meta, Mapping):
            return _observe(pod)
        rv, uid = meta.get("resourceVersion"), meta.get("uid")
        if type(rv) is not str or not rv or type(uid) is not str:
            return _observe(pod)
        seen = self._observed.get(uid)
        if seen is not None and seen[0] == rv:
            return seen[1]
        obs = _observe(pod)
        self._observed[obs.uid] = (rv, obs)
        return obs

    def _wake_at(self, now: float) -> float | None:
        times: list[float] = []
        for p in self._pods.values():
            if p.stage is _Stage.RUNNING:
                if p.error_retry_at is not None:
                    times.append(p.error_retry_at)
                elif p.actuate_at is not None:
                    times.append(p.actuate_at)
            if p.restart_at is not None and p.stage is _Stage.RUNNING:
                times.append(p.restart_at)
            if p.delete_sent_at is not None:
                times.append(p.delete_sent_at + DELETE_RETRY_S)
        if self._retry_at is not None and self._deferred():
            times.append(self._retry_at)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _deferred(self) -> list[_Pod]:
        return [
            p
            for p in self._pods.values()
            if p.stage is _Stage.RUNNING
            and p.pending is not None
            and p.pending.reason == REASON_DEFERRED
        ]


def _decreases(old: int | None, new: int | None) -> bool:
    return new is not None and (old is None or new < old)


class _Run:
    """One call of :meth:`Kubelet.step`: the time, the usage, and the effects so far."""

    def __init__(self, kubelet: Kubelet, now: float, usage: Mapping[str, int]) -> None:
        self.k = kubelet
        self.cfg = kubelet.config
        self.pods = kubelet._pods
        self.now = now
        self.ts = rfc3339(now)
        self.usage = usage
        self.effects: list[Effect] = []
        self.retry_trigger = False

    # -- lifecycle -------------------------------------------------------------------

    def forget_vanished(self, observed: Mapping[str, _Observed]) -> None:
        for uid in [uid for uid in self.pods if uid not in observed]:
            p = self.pods.pop(uid)
            if p.vmm_started:
                self.effects.append(StopVmm(p.namespace, p.name, p.uid))
            if p.stage is _Stage.RUNNING:
                self.retry_trigger = True  # pods_removed

    def terminate_deleting(self, observed: Mapping[str, _Observed]) -> None:
        for obs in observed.values():
            if not obs.deleting:
                continue
            p = self.pods.get(obs.uid)
            if p is None:
                # Deleted before we ever admitted it: nothing runs, confirm at once.
                p = _Pod(obs.uid, obs.namespace, obs.name, _Stage.TERMINATED)
                p.containers = obs.containers
                p.images = dict(obs.images)
                self.pods[obs.uid] = p
            p.generation = obs.generation
            if p.stage is _Stage.RUNNING:
                if p.vmm_started:
                    self.effects.append(StopVmm(p.namespace, p.name, p.uid))
                    p.vmm_started = False
                p.stage = _Stage.TERMINATED
                p.terminated_at = self.ts
                p.actuate_at = p.error_retry_at = None
                self.retry_trigger = True  # pod_terminated
            elif p.stage in (_Stage.REJECTED, _Stage.EXITED):
                p.stage = _Stage.TERMINATED
        # The status write for the terminal state goes out in write_statuses; the delete
        # must follow it, so it is queued there too.

    def handle_exits(self, exits: Mapping[str, int]) -> None:
        """VMM processes that exited: the VMM container is terminated; the restart policy
        says whether it starts again or the pod ends (Never: Failed, or Succeeded on 0)."""
        for uid, code in exits.items():
            p = self.pods.get(uid)
            if p is None or p.stage is not _Stage.RUNNING or not p.vmm_started:
                continue
            name = self._vmm_container(p)
            terminated = {
                "exitCode": code,
                "reason": _exit_reason(code),
                "startedAt": p.vmm_started_at or p.started_at or None,
                "finishedAt": self.ts,
                "containerID": f"sim://{p.uid}/{name}",
            }
            if p.restart_policy == "Always" or (p.restart_policy == "OnFailure" and code != 0):
                p.last_terminated = terminated
                moved = p.backoff_moved
                if moved is None or self.now - moved > 2 * CRASH_BACKOFF_MAX_S:
                    p.backoff_s = 0.0  # never backed off, or long enough ago: start over
                wait, p.backoff_moved = p.backoff_s, self.now
                p.backoff_s = min(max(2 * wait, CRASH_BACKOFF_INITIAL_S), CRASH_BACKOFF_MAX_S)
                if wait <= 0:
                    self._restart(p, name)
                    continue
                # A crash loop: the container waits, the pod runs on without it.
                p.restart_at = self.now + wait
                self._event(
                    p,
                    "Warning",
                    EV_BACK_OFF,
                    f"Back-off restarting failed container {name} in pod {p.name}",
                )
                continue
            p.stage = _Stage.EXITED
            p.exit_code = code
            p.terminated_at = self.ts
            p.actuate_at = p.error_retry_at = None
            p.pending = p.in_progress = None
            self.retry_trigger = True  # what the pod held is free

    def restart_due(self) -> None:
        """Start the exited VMM containers whose back-off has passed."""
        for p in self.pods.values():
            if p.restart_at is not None and p.stage is _Stage.RUNNING and self.now >= p.restart_at:
                self._restart(p, self._vmm_container(p))

    def _restart(self, p: _Pod, name: str) -> None:
        # The new container is created with what is allocated: a refused memory decrease
        # is in force from now on (the real kubelet's OOM loop).
        p.restart_at = None
        p.restarts += 1
        p.vmm_started_at = self.ts
        p.actuated = {**p.actuated, name: p.allocated[name]}
        if p.actuated == p.allocated:
            p.actuate_at = p.error_retry_at = None
            p.in_progress = None
        self.effects.append(StartVmm(p.namespace, p.name, p.uid))

    def admit_new(self, observed: Mapping[str, _Observed]) -> None:
        # Admission in creation order, as the kubelet sorts pod additions.
        new = sorted(
            (o for o in observed.values() if o.uid not in self.pods and not o.deleting),
            key=lambda o: (o.created, o.namespace, o.name),
        )
        for obs in new:
            if obs.status.get("phase") in _TERMINAL_PHASES:
                # Finished before this kubelet process: nothing to start, nothing to
                # rewrite (a terminal pod is never run again).
                p = _Pod(obs.uid, obs.namespace, obs.name, _Stage.EXITED)
                p.containers = obs.containers
                p.status_frozen = True
                self.pods[obs.uid] = p
                continue
            adopted = _adopt(obs)
            if adopted is not None:
                allocated, actuated = adopted
            else:
                allocated = dict(obs.desired)
                actuated = dict(obs.desired)
            p = _Pod(obs.uid, obs.namespace, obs.name, _Stage.RUNNING)
            p.containers = obs.containers
            p.images = dict(obs.images)
            p.overhead = obs.overhead
            p.priority = obs.priority
            p.generation = obs.generation
            p.restart_policy = obs.restart_policy
            p.foreign_conditions = _foreign_conditions(obs)
            p.scheduled_at = _condition_time(obs.status, _SCHEDULED) or self.ts
            want = _requests(allocated).max(_requests(actuated)) + obs.overhead
            failure = self._fit_failure(want, exclude=obs.uid) if adopted is None else None
            if failure is not None:
                resource, message = failure
                p.stage = _Stage.REJECTED
                p.rejection = (EV_OUT_OF + resource, f"Pod was rejected: {message}")
                self.pods[obs.uid] = p
                self._event(p, "Warning", EV_OUT_OF + resource, message)
                continue
            p.allocated = allocated
            p.actuated = actuated
            p.guaranteed = _guaranteed(obs.desired)
            p.started_at = str(obs.status.get("startTime") or self.ts) if adopted else self.ts
            p.vmm_started_at = p.started_at
            p.evaluated = None
            if allocated != actuated:
                p.actuate_at = self._actuation_time()
                old = _observed_generation(obs.status, IN_PROGRESS)
                generation = old if old is not None else obs.generation
                p.in_progress = _Cond(IN_PROGRESS, "", "", generation, self.ts, self.ts)
            p.vmm_started = True
            self.pods[obs.uid] = p
            self.effects.append(StartVmm(p.namespace, p.name, p.uid))
            self.retry_trigger = True  # pods_added

    def handle_updates(self, observed: Mapping[str, _Observed]) -> None:
        # One pass: which pods changed is judged on stage and evaluated, which the
        # bookkeeping below leaves alone.
        changed: list[_Observed] = []
        for obs in observed.values():
            if obs.deleting:
                continue
            p = self.pods.get(obs.uid)
            if p is None:
                continue
            if p.stage is _Stage.RUNNING and p.evaluated != (obs.generation, obs.desired):
                changed.append(obs)
            p.generation = obs.generation
            p.priority = obs.priority
            p.restart_policy = obs.restart_policy
            p.foreign_conditions = _foreign_conditions(obs)
        changed.sort(key=lambda o: (o.created, o.namespace, o.name))
        for obs in changed:
            p = self.pods[obs.uid]
            if self._resize(p, obs.desired, obs.generation):
                self.retry_trigger = True  # pod_resized

    # -- resize ----------------------------------------------------------------------

    def _resize(self, p: _Pod, desired: dict[str, Resources], generation: int) -> bool:
        """The allocation manager's handlePodResourcesResize; True when it allocated."""
        p.evaluated = (generation, dict(desired))
        if desired == p.allocated:
            p.pending = None
            return False
        own = _requests(desired) + p.overhead
        infeasible = self._infeasible(p, own)
        if infeasible is not None:
            self._pending(p, REASON_INFEASIBLE, infeasible, generation, desired)
            return False
        failure = self._fit_failure(own, exclude=p.uid)
        if failure is not None:
            was = p.pending
            self._pending(p, REASON_DEFERRED, failure[1], generation, desired)
            # A newly deferred resize is retried first after the initial delay (unless
            # a retry is due sooner), then on the period; a retry that defers it again
            # leaves the timer to retry_pending.
            if was is None or (was.reason, was.generation) != (REASON_DEFERRED, generation):
                first = self.now + self.cfg.first_deferred_retry_s
                if self.k._retry_at is None or self.k._retry_at <= self.now:
                    self.k._retry_at = first
                else:
                    self.k._retry_at = min(self.k._retry_at, first)
            return False
        p.allocated = dict(desired)
        p.pending = None
        # Clear-then-set: a newly accepted resize always gets a fresh condition.
        p.in_progress = _Cond(IN_PROGRESS, "", "", generation, self.ts, self.ts)
        p.actuate_at = self._actuation_time()
        p.error_retry_at = None
        self._event(p, "Normal", EV_RESIZE_STARTED, _resize_message("started", desired, generation))
        return True

    def _pending(
        self, p: _Pod, reason: str, message: str, generation: int, desired: dict[str, Resources]
    ) -> None:
        old = p.pending
        p.pending = _set_cond(old, PENDING, reason, message, generation, self.ts)
        # The condition's message follows the node (what is used changes); the event
        # only the reason or the generation, or every retry would add one.
        if old is None or (old.reason, old.generation) != (reason, generation):
            event = EV_RESIZE_INFEASIBLE if reason == REASON_INFEASIBLE else EV_RESIZE_DEFERRED
            text = _resize_message(reason, desired, generation, message)
            self._event(p, "Warning", event, text)

    def _infeasible(self, p: _Pod, own: _Totals) -> str | None:
        # A static CPU or memory manager pins a Guaranteed pod's resources; 1.33-1.35
        # refuse to resize it at all (InPlacePodVerticalScalingExclusiveCPUs is off).
        if p.guaranteed and self.cfg.cpu_manager_static:
            return "Resize is infeasible for Guaranteed Pods alongside CPU Manager static policy"
        if p.guaranteed and self.cfg.memory_manager_static:
            return (
                "Resize is infeasible for Guaranteed Pods alongside Memory Manager static policy"
            )
        # Judged against capacity minus system/kube reserved, not allocatable: a request
        # that only the eviction threshold keeps out is Deferred, for ever.
        # The kubelet checks memory before cpu here, and reports cpu in millicores.
        if own.memory > self.cfg.feasible_memory:
            return (
                f"Node didn't have enough capacity: memory, requested: {own.memory}, "
                f"capacity: {self.cfg.feasible_memory}"
            )
        if own.cpu > self.cfg.feasible_cpu:
            return (
                f"Node didn't have enough capacity: cpu, requested: {own.cpu}, "
                f"capacity: {self.cfg.feasible_cpu}"
            )
        return None

    def _fit_failure(self, own: _Totals, exclude: str) -> tuple[str, str] | None:
        """The admission predicate (cpu checked before memory, like the scheduler's fit),
        against what every other admitted pod holds."""
        used = _held(other for uid, other in self.pods.items() if uid != exclude)
        for resource, requested, in_use, capacity in (
            ("cpu", own.cpu, used.cpu, self.cfg.allocatable_cpu),
            ("memory", own.memory, used.memory, self.cfg.allocatable_memory),
        ):
            if requested + in_use > capacity:
                return resource, (
                    f"Node didn't have enough resource: {resource}, requested: {requested}, "
                    f"used: {in_use}, capacity: {capacity}"
                )
        return None

    def retry_pending(self) -> None:
        """RetryPendingResizes: on a trigger from another pod, or when the period is up."""
        triggered, self.retry_trigger = self.retry_trigger, False
        deferred = self.k._deferred()
        if not deferred:
            self.k._retry_at = None
            return
        periodic = self.k._retry_at is not None and self.now >= self.k._retry_at
        if not (triggered or periodic):
            return
        # A periodic retry starts the next period; a triggered one leaves the timer.
        if periodic or self.k._retry_at is None:
            self.k._retry_at = self.now + self.cfg.deferred_retry_s
        for p in sorted(deferred, key=self._retry_order):
            if p.evaluated is None:
                continue
            generation, desired = p.evaluated
            self._resize(p, desired, generation)

    def _retry_order(self, p: _Pod) -> tuple[Any, ...]:
        # The allocation manager's order: resizes that do not grow requests first, then
        # higher priority, then Guaranteed, then the longest pending.
        desired = p.evaluated[1] if p.evaluated is not None else p.allocated
        growing = _requests(desired).max(_requests(p.allocated)) != _requests(p.allocated)
        since = p.pending.transition if p.pending is not None else ""
        return (growing, -p.priority, not p.guaranteed, since, p.namespace, p.name)

    # -- actuation -------------------------------------------------------------------

    def _actuation_time(self) -> float:
        """When an accepted resize is actuated: after the resize delay, on the first
        runtime-poll tick (ticks at whole multiples of the period) after that."""
        due = self.now + self.cfg.resize_delay_s
        poll = self.cfg.runtime_poll_s
        if poll <= 0:
            return due
        return (due // poll + 1) * poll

    def actuate_due(self) -> None:
        for p in self.pods.values():
            if p.stage is not _Stage.RUNNING or p.actuate_at is None:
                continue
            if self.now < p.actuate_at:
                continue
            refusal = self._memory_refusal(p)
            if refusal is not None:
                old = p.in_progress
                # An existing condition keeps the generation it was set with.
                generation = old.generation if old is not None else p.generation
                p.in_progress = _set_cond(
                    old, IN_PROGRESS, REASON_ERROR, refusal, generation, self.ts
                )
                p.error_retry_at = self.now + self.cfg.error_retry_s
                # The usage in the message moves with the guest; an event per retry
                # would be a storm: one per reason or generation.
                if old is None or (old.reason, old.generation) != (REASON_ERROR, generation):
                    self._event(
                        p,
                        "Warning",
                        EV_RESIZE_ERROR,
                        _resize_message("error", p.allocated, generation, refusal),
                    )
                continue
            frees = _requests(p.allocated).max(_requests(p.actuated)) != _requests(p.allocated)
            p.actuated = dict(p.allocated)
            p.actuate_at = p.error_retry_at = None
            done = p.in_progress
            p.in_progress = None
            generation = done.generation if done is not None else p.generation
            self._event(
                p,
                "Normal",
                EV_RESIZE_COMPLETED,
                _resize_message("completed", p.allocated, generation),
            )
            if frees:
                self.retry_trigger = True  # what this pod held beyond its allocation is free

    def _memory_refusal(self, p: _Pod) -> str | None:
        """The kubelet's best-effort guard before lowering memory limits (1.34+: pod and
        container level). The whole of the pod's usage is charged to the VMM container."""
        usage = self.usage.get(p.uid)
        if usage is None:
            return None
        errors: list[str] = []
        old_pod, new_pod = _pod_memory_limit(p.actuated), _pod_memory_limit(p.allocated)
        # The kubelet refuses at usage >= the new limit, not only above it.
        if new_pod is not None and _decreases(old_pod, new_pod) and usage >= new_pod:
            errors.append(
                f"attempting to set pod memory limit ({new_pod}) below current usage ({usage})"
            )
        name = self._vmm_container(p)
        old_c, new_c = p.actuated[name].memory_limit, p.allocated[name].memory_limit
        if new_c is not None and _decreases(old_c, new_c) and usage >= new_c:
            errors.append(
                f'attempting to set container "{name}" memory limit ({new_c}) '
                f"below current usage ({usage})"
            )
        if not errors:
            return None
        return "cannot decrease memory limits: " + _go_error_list(errors)

    def _vmm_container(self, p: _Pod) -> str:
        if self.cfg.vmm_container in p.containers:
            return self.cfg.vmm_container
        return p.containers[0]

    # -- status ----------------------------------------------------------------------

    def write_statuses(self, observed: Mapping[str, _Observed]) -> None:
        for uid, p in list(self.pods.items()):
            status = self._rendered(p)
            never_ran = p.stage is _Stage.TERMINATED and not p.started_at
            quiet = never_ran or p.status_frozen
            if status is not p.last_written and status != p.last_written and not quiet:
                p.last_written = status
                self.effects.append(WritePodStatus(p.namespace, p.name, p.uid, status))
            if p.stage is _Stage.TERMINATED and uid in observed:
                due = p.delete_sent_at is None or self.now >= p.delete_sent_at + DELETE_RETRY_S
                if due:
                    p.delete_sent_at = self.now
                    self.effects.append(DeletePod(p.namespace, p.name, p.uid))

    def _rendered(self, p: _Pod) -> dict[str, Any]:
        """``_render(p)``, reused while nothing it reads has changed.

        Most pods on a node are at rest in most steps; rebuilding their status only to
        find it equal to the last write was a large part of a step. The key holds every
        input of ``_render`` that can change (the configuration cannot), by value.
        """
        key = (
            p.stage,
            p.generation,
            p.rejection,
            p.started_at,
            p.scheduled_at,
            p.terminated_at,
            p.exit_code,
            p.restarts,
            p.vmm_started_at,
            p.restart_at,
            p.pending,
            p.in_progress,
            p.actuate_at is not None,
            p.containers,
            # The dicts themselves, compared by value: the model replaces them whenever
            # they change and never changes one in place (nor hands one out), and _render
            # reads them by container name, so their order does not matter.
            p.images,
            p.allocated,
            p.actuated,
            tuple(p.foreign_conditions),  # a rejected pod's status holds the list itself
            "" if p.started_at else self.ts,
        )
        cached = p.rendered
        if cached is not None and cached[0] == key:
            return cached[1]
        status = self._render(p)
        p.rendered = (key, status)
        return status

    def _render(self, p: _Pod) -> dict[str, Any]:
        gen = self.cfg.report_observed_generation
        status: dict[str, Any] = {
            "observedGeneration": p.generation if gen else None,
            "hostIP": self.cfg.host_ip,
            "hostIPs": [{"ip": self.cfg.host_ip}],
        }
        if p.stage is _Stage.REJECTED:
            assert p.rejection is not None
            status.update(
                phase="Failed",
                reason=p.rejection[0],
                message=p.rejection[1],
                conditions=p.foreign_conditions,
                containerStatuses=None,
                resize=None,
            )
            return status
        running = p.stage is _Stage.RUNNING
        # A deleted pod's VMM is taken to exit cleanly: the kubelet then reports Succeeded.
        if running:
            phase = "Running"
        elif p.exit_code is not None:
            phase = "Succeeded" if p.exit_code == 0 else "Failed"
        else:
            phase = "Succeeded" if p.started_at else "Failed"
        conditions = list(p.foreign_conditions)
        backing_off = running and p.restart_at is not None
        for type_ in _KUBELET_CONDITIONS:
            ok = type_ in (_SCHEDULED, _INITIALIZED) or running
            if backing_off and type_ in (_READY, _CONTAINERS_READY):
                ok = False
            cond: dict[str, Any] = {"type": type_, "status": "True" if ok else "False"}
            if gen:
                cond["observedGeneration"] = p.generation
            cond["lastProbeTime"] = None
            since = p.scheduled_at if type_ == _SCHEDULED else p.started_at or self.ts
            if backing_off:
                exited = (p.last_terminated or {}).get("finishedAt")
                cond["lastTransitionTime"] = since if ok else exited or since
                if not ok:
                    cond["reason"] = "ContainersNotReady"
            else:
                cond["lastTransitionTime"] = p.terminated_at if not ok else since
                if not ok:
                    cond["reason"] = "PodCompleted" if phase == "Succeeded" else "PodFailed"
            conditions.append(cond)
        resize: str | None = None
        if running and self.cfg.legacy_resize_status:
            resize = _legacy_resize(p)
        elif running:
            for c in (p.pending, p.in_progress):
                if c is not None:
                    conditions.append(c.to_json(gen))
        status.update(
            phase=phase,
            reason=None,
            message=None,
            startTime=p.started_at or None,
            conditions=conditions,
            containerStatuses=[self._container_status(p, name, running) for name in p.containers],
            resize=resize,
        )
        return status

    def _container_status(self, p: _Pod, name: str, running: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "image": p.images.get(name, ""),
            "imageID": p.images.get(name, ""),
            "containerID": f"sim://{p.uid}/{name}",
            "ready": running,
            "started": running,
            "restartCount": 0,
            "lastState": {},
        }
        vmm = name == self._vmm_container(p)
        if vmm and p.restarts:
            out["restartCount"] = p.restarts
            out["lastState"] = {"terminated": p.last_terminated}
        if running and vmm and p.restart_at is not None:
            out["ready"] = out["started"] = False
            out["state"] = {
                "waiting": {
                    "reason": REASON_CRASH_LOOP,
                    "message": f"back-off {p.restart_at - (p.backoff_moved or 0):g}s "
                    f"restarting failed container={name} pod={p.name}_{p.namespace}({p.uid})",
                }
            }
        elif running:
            started = p.vmm_started_at if vmm and p.vmm_started_at else p.started_at
            out["state"] = {"running": {"startedAt": started}}
        else:
            # Only the VMM is a process; the other containers are taken to stop with it.
            code = p.exit_code if vmm and p.exit_code is not None else 0
            started = p.vmm_started_at if vmm and p.vmm_started_at else p.started_at
            out["state"] = {
                "terminated": {
                    "exitCode": code,
                    "reason": _exit_reason(code),
                    "startedAt": started or None,
                    "finishedAt": p.terminated_at,
                    "containerID": f"sim://{p.uid}/{name}",
                }
            }
        if name in p.allocated:
            out["allocatedResources"] = p.allocated[name].requests_json()
        if name in p.actuated:
            out["resources"] = p.actuated[name].to_json()
        return out

    def _event(self, p: _Pod, type_: str, reason: str, message: str) -> None:
        self.effects.append(RecordEvent(p.namespace, p.name, p.uid, type_, reason, message))


def _exit_reason(code: int) -> str:
    # containerd's reasons: Completed for 0, Error otherwise (OOMKilled is not modelled).
    return "Completed" if code == 0 else "Error"


def _legacy_resize(p: _Pod) -> str | None:
    # Deferred and Infeasible take precedence over InProgress (KEP-1287, Resize Status).
    if p.pending is not None:
        return str(ResizeStatus(p.pending.reason))
    if p.in_progress is not None or p.actuate_at is not None:
        return str(ResizeStatus.IN_PROGRESS)
    return None


# json.dumps(body, separators=(",", ":")) builds a new encoder on every call (its
# arguments are not the defaults); an encoder keeps no state between calls, so one does.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _resize_message(
    what: str, resources: Mapping[str, Resources], generation: int, error: str | None = None
) -> str:
    body: dict[str, Any] = {
        "containers": [{"name": n, "resources": r.to_json()} for n, r in resources.items()],
        "generation": generation,
    }
    if error is not None:
        body["error"] = error
    return f"Pod resize {what}: " + _COMPACT_JSON.encode(body)


def _foreign_conditions(obs: _Observed) -> list[dict[str, Any]]:
    # Copies: the pod's own condition objects are not the kubelet's to hand on.
    return [dict(c) for c in obs.foreign]


def _condition_time(status: Mapping[str, Any], type_: str) -> str | None:
    for c in status.get("conditions") or ():
        if c.get("type") == type_ and c.get("lastTransitionTime"):
            return str(c["lastTransitionTime"])
    return None


def _observed_generation(status: Mapping[str, Any], type_: str) -> int | None:
    for c in status.get("conditions") or ():
        if c.get("type") == type_:
            gen = c.get("observedGeneration")
            return gen if isinstance(gen, int) else None
    return None


def _adopt(obs: _Observed) -> tuple[dict[str, Resources], dict[str, Resources]] | None:
    """A pod some earlier kubelet process already started (its status names every
    container with resources): take its allocation and actual resources from the status,
    the way a restarted kubelet reads its checkpoint, instead of admitting it afresh."""
    if obs.status.get("phase") != "Running":
        return None
    statuses = {cs.get("name"): cs for cs in obs.status.get("containerStatuses") or ()}
    if set(statuses) != set(obs.containers):
        return None
    allocated: dict[str, Resources] = {}
    actuated: dict[str, Resources] = {}
    for name in obs.containers:
        cs = statuses[name]
        if cs.get("resources") is None or cs.get("allocatedResources") is None:
            return None
        where = f"pod {obs.ref}: status.containerStatuses[{name}]"
        actual = Resources.from_json(cs.get("resources"), f"{where}.resources")
        requests = Resources.from_json(
            {"requests": cs.get("allocatedResources")}, f"{where}.allocatedResources"
        )
        # The checkpoint also held the allocated limits; the status does not show them.
        # The spec's limits are right when the spec's requests are what was allocated,
        # otherwise the actual limits are the best evidence left.
        spec = obs.desired[name]
        same = (spec.cpu_request, spec.memory_request) == (
            requests.cpu_request,
            requests.memory_request,
        )
        limits = spec if same else actual
        allocated[name] = attrs.evolve(
            limits, cpu_request=requests.cpu_request, memory_request=requests.memory_request
        )
        actuated[name] = actual
    return allocated, actuated
