"""decide(vm, pod, vmm) -> actions: every phase transition of chscale in one pure function.

Theory of operation
-------------------
The controller and the node daemon are level-triggered: whenever anything about a VM
changes, or a requeue hint fires, they observe the VirtualMachine, its pod and (the daemon
only) the VMM, call :func:`decide`, and carry out the actions they own
(:mod:`core.actions`). Nothing is remembered between calls except what the actions write
into ``status``; so a restarted process resumes where the last one stopped.

A resize is planned by one rule (:func:`plan`), re-evaluated on every call. Let *current*
be what the guest holds, *desired* what the spec asks for, and *envelope* their
component-wise maximum:

1. the pod is not sure to hold the envelope (+ VMM overhead) -> grow the pod (PodGrow);
2. the guest differs from desired                            -> change the guest (Vmm);
3. the pod holds more than desired needs                      -> shrink the pod (PodShrink);
4. otherwise                                                  -> done.

What the pod is *sure to hold* (:func:`granted`) is the smaller of its spec (a pending
patch may be about to shrink it) and what the kubelet reports (it may not have grown it
yet), compared exactly. Kubernetes' 5% rounding tolerance is applied only to a report
the kubelet has finished with; 5% of a pod is more than the whole VMM overhead, so a
tolerance anywhere else would let the guest outgrow its cgroup.

This yields the orders of RESIZE.md §4 without special cases: growth is pod then guest,
shrink is guest then pod, and a mixed change is pod-grow, guest, pod-shrink. Because the
pod always covers the envelope before the guest moves, and shrinks only after the guest
has settled, the pod's memory limit never drops below guest memory + overhead, and the
VMM is never asked for more than the pod was granted. A spec change mid-resize simply
changes *desired*; the next evaluation plans from wherever the world is.

The phase mirrors the step: PodGrow/PodShrink = PodResizeInProgress, Vmm =
ResizeInProgress. Phase changes go through :mod:`core.table`, which also names the event
that announces each one and the process that owns it (the controller owns pod steps and
the lifecycle; the daemon owns the VMM step and boot).

What the guest holds is judged on evidence (RESIZE.md 4a, ADR 0010): *current* is
``status.allocated``, which :func:`_guest_truth` moves only on proof (a vCPU probe's 204,
the plugged size from Cloud Hypervisor v52 on); where nothing can prove a shrink (older
VMMs) the pod keeps what the guest may still hold and a condition says so. Every wait has
a deadline (:class:`core.config.KernelConfig`), counted from ``status.resize.waitSince``,
which the kernel stamps with the ``now`` its caller passes in: past it the VM settles
(``Stalled``) where the pod still covers the guest, and says what is stuck.

Observations can be stale. ``status.resize.podGeneration`` records the pod generation our
``pods/resize`` patch produced, and, when the pod step hands over to the VMM step, the
generation of the pod view that showed the guest covered; a pod view older than that, or
whose kubelet has not yet observed it, is treated as "not yet known" and never acted
upon (by the controller, nor by a daemon whose pod cache lags the controller's).

Intent is written before the act: a decision's status actions come first, and the
executor writes them with the resourceVersion it decided on, so a decision made on a
stale VirtualMachine fails with a conflict before its side effects happen. The guest
step's intent (``vmmRequested``, the deadline's start, its ``VMResizeInitiated``) is
written by the decision that opens the step, before the daemon can act on it; the
daemon's ``vm.resize`` then writes nothing of its own (ADR 0019). It is safe on a stale
view because only the daemon takes a VM out of ``ResizeInProgress`` and the pod that
covers the target shrinks only after it has; what the VMM was asked is in its own
configuration, which a restarted daemon reads. This relies on each process feeding its
own writes back into its cache (a cache that lags behind the process's own writes could
repeat an old decision's unguarded side effects).
"""

from __future__ import annotations

from core.actions import (
    Action,
    AddFinalizer,
    BootVmm,
    CreatePod,
    DeletePod,
    EventType,
    Owner,
    RecordEvent,
    RemoveFinalizer,
    Requeue,
    ResizePod,
    ResizeVmm,
    SetAllocated,
    SetCapacity,
    SetCondition,
    SetObserved,
    SetPhase,
    SetResizeTarget,
    SetVmmVersion,
    owned_by,
)
from core.config import DEFAULT_CONFIG, KernelConfig
from core.constants import GUEST_MEMORY_ALIGNMENT, HOTPLUG_REGION_ALIGNMENT, MILLICORES_PER_VCPU
from core.model import (
    PLUGGED_SIZE_SINCE,
    RESIZE_PHASES,
    STEADY_PHASES,
    TERMINAL_PHASES,
    UNOBSERVED_VMM,
    VMM_PHASES,
    Allocation,
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
    evolve,
)
from core.quantity import format_bytes
from core.resources import (
    capacity_errors,
    pod_resources,
    pod_resources_for,
    spec_errors,
    vmm_config,
)
from core.table import RETURN, Cause, move

__all__ = ["RESIZED", "VMM_REACHABLE", "VMM_TRUSTED", "Reasons", "decide", "plan"]

RESIZED = "Resized"
VMM_REACHABLE = "VMMReachable"
VMM_TRUSTED = "VMMTrusted"
SPEC_VALID = "SpecValid"
BOOTED = "Booted"


class Reasons:
    """Condition reasons (RESIZE.md §4) and the events that are not phase moves."""

    RESIZED = "Resized"
    IN_PROGRESS = "InProgress"
    POD_RESIZE_DEFERRED = "PodResizeDeferred"
    POD_RESIZE_INFEASIBLE = "PodResizeInfeasible"
    POD_RESIZE_ERROR = "PodResizeError"
    VM_RESIZE_FAILED = "VMResizeFailed"
    EXCEEDS_CAPACITY = "ExceedsCapacity"
    UNSUPPORTED = "Unsupported"
    INVALID_SPEC = "InvalidSpec"
    VALID = "Valid"
    REACHABLE = "Reachable"
    UNREACHABLE = "Unreachable"
    VMM_SOCKET_GONE = "VMMSocketGone"  # unreachable past its deadline while the pod runs
    TRUSTED = "Trusted"
    VMM_UNTRUSTED = "VMMUntrusted"  # the socket leads elsewhere than the pod's own VMM
    # RESIZE.md 4a/4b: what is stuck, named in the reason; the message says what to do.
    GUEST_MEMORY_UNVERIFIABLE = "GuestMemoryUnverifiable"  # VMM < v52 cannot tell
    GUEST_MEMORY_STUCK = "GuestMemoryStuck"  # the guest did not (un)plug in time
    GUEST_VCPU_REMOVAL_STUCK = "GuestVcpuRemovalStuck"  # the guest did not eject in time
    VMM_RESIZE_STUCK = "VMMResizeStuck"  # the VMM kept refusing until the deadline
    KUBELET_RESIZE_STUCK = "KubeletResizeStuck"  # the kubelet did not resize in time
    POD_RESIZE_FORBIDDEN = "PodResizeForbidden"  # a quota, RBAC or validation refusal
    BOOT_FAILED = "BootFailed"
    BOOT_STUCK = "BootStuck"
    BOOTED = "Booted"
    # events
    EV_POD_INITIATED = "VMResizePodInitiated"
    EV_POD_DEFERRED = "VMPodResizeDeferred"
    EV_POD_ERROR = "VMPodResizeError"
    EV_VMM_INITIATED = "VMResizeInitiated"
    EV_VMM_FAILED = "VMResizeFailed"
    EV_BOOT_FAILED = "VMBootFailed"
    EV_VMM_UNREACHABLE = "VMMUnreachable"
    EV_VMM_UNTRUSTED = "VMMUntrusted"


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def kubelet_done(pod: PodView) -> bool:
    """Has the kubelet finished with the pod's current spec (observed it, nothing pending)?

    Only kubelets that report ``status.observedGeneration`` (1.34+) can say so; for older
    ones this is False and the kernel relies on the reported resources alone.
    """
    return (
        pod.observed_generation is not None
        and pod.observed_generation >= pod.generation
        and pod.resize_pending is None
        and pod.resize_in_progress is None
        and pod.legacy_resize_status is None
    )


def pod_stale(pod: PodView, pod_generation: int | None) -> bool:
    """Is this pod view older than the ``pods/resize`` patch that produced ``pod_generation``
    (or has its kubelet not yet looked at that patch)? Kubelets before 1.34 do not report
    ``observedGeneration``; for them only the generation itself can tell."""
    if pod_generation is None:
        return False
    if pod.generation < pod_generation:
        return True
    return pod.observed_generation is not None and pod.observed_generation < pod_generation


def granted(pod: PodView, config: KernelConfig = DEFAULT_CONFIG) -> Resources | None:
    """What the pod is sure to hold now *and* after the kubelet acts on its spec.

    That is the smaller of the spec (a pending patch may be about to shrink the pod) and
    what the kubelet reports (it may not have grown the pod yet), compared exactly: the 5%
    tolerance decides only "is the kubelet done" (:func:`matches`), never how much the
    guest may hold (RESIZE.md 4a; 5% of a 32Gi pod is five times the VMM overhead).
    ``None``: the pod reports no resources.
    """
    actual = pod.actual
    if actual is None:
        return None
    spec = pod.desired
    if spec is None:
        return actual
    return Resources(min(actual.cpu_millis, spec.cpu_millis), min(actual.memory, spec.memory))


def _within_tolerance(difference: int, of: int, config: KernelConfig) -> bool:
    """``difference <= of * tolerance``, exactly, in integers (Fractions are slow)."""
    num, den = config.pod_memory_tolerance.as_integer_ratio()
    return difference * den <= of * num


def covers(granted: Resources, needed: Resources, config: KernelConfig = DEFAULT_CONFIG) -> bool:
    """Does a pod that is sure to hold ``granted`` (see :func:`granted`) hold ``needed``?

    Exact: the guest's memory plus the VMM overhead must fit under the cgroup limit. The
    5% tolerance for Kubernetes' rounding is applied where the report is read
    (:func:`granted`), not here: 5% of a pod's memory is more than the whole overhead.
    """
    return granted.cpu_millis >= needed.cpu_millis and granted.memory >= needed.memory


def matches(granted: Resources, wanted: Resources, config: KernelConfig = DEFAULT_CONFIG) -> bool:
    """Does a pod report ``granted`` that is ``wanted`` up to Kubernetes' rounding?"""
    return granted.cpu_millis == wanted.cpu_millis and _within_tolerance(
        abs(granted.memory - wanted.memory), wanted.memory, config
    )


def plan(
    current: Allocation,
    pod: PodView,
    desired: Allocation,
    config: KernelConfig = DEFAULT_CONFIG,
) -> tuple[Step | None, Resources | Allocation | None]:
    """The next step toward ``desired`` and its target; ``(None, None)`` when done."""
    envelope = Allocation(max(current.vcpus, desired.vcpus), max(current.memory, desired.memory))
    needed = pod_resources_for(envelope, config)
    held = granted(pod, config)
    if held is None or not covers(held, needed, config):
        return Step.POD_GROW, needed
    if current != desired:
        return Step.VMM, desired
    final = pod_resources_for(desired, config)
    assert pod.actual is not None  # granted() is None without it
    if not matches(pod.actual, final, config) or pod.desired != final:
        return Step.POD_SHRINK, final
    return None, None


_CAUSE_OF_STEP = {
    Step.POD_GROW: Cause.NEEDS_POD_GROW,
    Step.VMM: Cause.NEEDS_VMM,
    Step.POD_SHRINK: Cause.NEEDS_POD_SHRINK,
    None: Cause.RESIZED,
}


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


class _Out:
    """Collects actions and returns them status-first, side effects next, hints last:
    the order in which an executor must carry them out for crash safety (intent is
    recorded before the act)."""

    def __init__(self, vm: Vm, now: float | None = None) -> None:
        self.vm = vm
        self.now = now
        # The phase the VMM is in, for a return the daemon makes in this decision.
        self.daemon_return: Phase | None = None
        # The spec's problems, worked out once per decision (several steps ask).
        self.spec_problems = vm.spec_errors if vm.spec is None else spec_errors(vm.spec)
        self.spec_ok = vm.spec is not None and not self.spec_problems
        self.status: list[Action] = []
        self.events: list[Action] = []
        self.effects: list[Action] = []
        self.hints: list[Action] = []

    def transition(self, cause: Cause, message: str = "") -> Phase:
        phase = self.vm.status.phase
        mv = move(phase, cause)
        to = mv.to
        if to == RETURN:
            record = self.vm.status.resize
            to = record.return_phase if record is not None else Phase.RUNNING
            if mv.owner is Owner.DAEMON and self.daemon_return is not None:
                to = self.daemon_return
        assert isinstance(to, Phase)
        self.status.append(SetPhase(to, owner=mv.owner))
        text = message or f"{phase or 'new'} -> {to}"
        self.events.append(RecordEvent(mv.event_type, mv.reason, text, owner=mv.owner))
        return to

    def condition(
        self,
        owner: Owner,
        type_: str,
        status: ConditionStatus,
        reason: str,
        message: str,
    ) -> bool:
        """Set a condition unless it already says exactly this; True if it changed."""
        cond = Condition(type_, status, reason, message, self.vm.generation)
        if cond.same_as(self.vm.status.condition(type_)):
            return False
        self.status.append(SetCondition(cond, owner=owner))
        return True

    def record(self, owner: Owner, record: ResizeRecord | None) -> None:
        if record != self.vm.status.resize:
            self.status.append(SetResizeTarget(record, owner=owner))

    def event(self, owner: Owner, type_: EventType, reason: str, message: str) -> None:
        self.events.append(RecordEvent(type_, reason, message, owner=owner))

    def effect(self, action: Action) -> None:
        self.effects.append(action)

    def requeue(self, owner: Owner, after: float) -> None:
        self.hints.append(Requeue(after, owner=owner))

    def done(self) -> tuple[Action, ...]:
        return (*self.status, *self.events, *self.effects, *self.hints)


# ---------------------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------------------


def decide(
    vm: Vm,
    pod: PodView | None,
    vmm: VmmView = UNOBSERVED_VMM,
    config: KernelConfig = DEFAULT_CONFIG,
    now: float | None = None,
    *,
    owner: Owner | None = None,
) -> tuple[Action, ...]:
    """Everything that should happen next for ``vm``, given what was just observed.

    ``now`` (seconds since the epoch, from the adapter's clock) is what deadlines are
    measured with; without it no wait ever times out (the kernel reads no clock).

    ``owner`` asks for one process's actions only: the same as ``owned_by(decide(...),
    owner)`` (a property test holds the two equal), without working out the parts of the
    decision whose every action is the other process's. Each process is woken by every
    change of the VM and its pod, and most of those changes are the other's business."""
    out = _Out(vm, now)
    controller, daemon = owner is not Owner.DAEMON, owner is not Owner.CONTROLLER
    _decide(out, vm, pod, vmm, config, controller, daemon)
    actions = out.done()
    return actions if owner is None else owned_by(actions, owner)


def _decide(
    out: _Out,
    vm: Vm,
    pod: PodView | None,
    vmm: VmmView,
    config: KernelConfig,
    controller: bool,
    daemon: bool,
) -> None:
    """The body of :func:`decide`; ``controller`` and ``daemon`` say whose actions are
    wanted (a part that only emits the other's is skipped)."""
    if vm.deleting:
        _deletion(out, pod)
        return
    if not vm.has_finalizer:
        out.effect(AddFinalizer())
        return

    if controller:
        _observe(out, vm, pod)
    phase = vm.status.phase
    if phase is None:
        out.transition(Cause.ACCEPTED)
        return
    if phase in TERMINAL_PHASES or phase is Phase.UNKNOWN:
        return
    if not out.spec_ok:
        if controller:
            _invalid_spec(out, vm)
        if phase in (Phase.PENDING, Phase.SCHEDULING):
            return
    elif (
        controller
        and (cond := vm.status.condition(SPEC_VALID))
        and cond.status is ConditionStatus.FALSE
    ):
        out.condition(Owner.CONTROLLER, SPEC_VALID, ConditionStatus.TRUE, Reasons.VALID, "")

    if phase is Phase.PENDING:
        if controller:
            _pending(out, vm, pod, config)
    elif phase is Phase.SCHEDULING:
        if controller:
            _scheduling(out, vm, pod, config)
    elif _pod_ended(out, pod) or _vmm_untrusted(out, vm, vmm, config):
        pass
    elif phase is Phase.SCHEDULED:
        _vmm_version(out, vm, vmm)
        if not _vmm_ended(out, vm, vmm):
            _scheduled(out, vm, pod, vmm, config)
    else:
        _vmm_health(out, vm, vmm, config)
        _vmm_version(out, vm, vmm)
        if _vmm_ended(out, vm, vmm):
            return
        if phase in RESIZE_PHASES and vmm.observed:
            _recover_status(out, vm, vmm, pod, config)
            vm = out.vm  # the steps plan with what was recovered
            _track_return_phase(out, vm, vmm)
        if phase in STEADY_PHASES:
            if daemon and vmm.observed:
                _daemon_steady(out, vm, vmm, pod, config)
            if controller:
                _steady(out, vm, pod, config)
        elif phase is Phase.POD_RESIZE_IN_PROGRESS:
            if controller:
                _pod_step(out, vm, pod, config)
        elif phase is Phase.RESIZE_IN_PROGRESS and daemon:
            _vmm_step(out, vm, pod, vmm, config)


def _observe(out: _Out, vm: Vm, pod: PodView | None) -> None:
    desired = vm.spec.desired if vm.spec is not None and out.spec_ok else None
    node = pod.node_name if pod is not None and pod.node_name else vm.status.node_name
    status = vm.status
    # Like nodeName, the pod's name and uid stay once seen: a lost pod is still the one
    # the VM ran in (ch-vmm users find it by status.vmPodName).
    pod_name = pod.name if pod is not None and pod.name else status.pod_name
    pod_uid = pod.uid if pod is not None and pod.uid else status.pod_uid
    observed = (vm.generation, desired, node, pod_name, pod_uid)
    if (
        status.observed_generation,
        status.desired,
        status.node_name,
        status.pod_name,
        status.pod_uid,
    ) != observed:
        out.status.append(SetObserved(*observed, owner=Owner.CONTROLLER))


def _deletion(out: _Out, pod: PodView | None) -> None:
    if pod is None:
        if out.vm.has_finalizer:
            out.effect(RemoveFinalizer())
    elif not pod.deleting:
        out.effect(DeletePod())


def _invalid_spec(out: _Out, vm: Vm) -> None:
    message = "; ".join(str(e) for e in out.spec_problems) or "spec is missing"
    out.condition(
        Owner.CONTROLLER, SPEC_VALID, ConditionStatus.FALSE, Reasons.INVALID_SPEC, message
    )


def _pod_ended(out: _Out, pod: PodView | None) -> bool:
    if pod is None:
        out.transition(Cause.POD_LOST, "the VM's pod is gone")
    elif pod.phase is PodPhase.SUCCEEDED:
        out.transition(Cause.POD_SUCCEEDED, f"pod {pod.name} succeeded")
    elif pod.phase is PodPhase.FAILED:
        out.transition(Cause.POD_FAILED, f"pod {pod.name} failed")
    else:
        return False
    out.record(Owner.CONTROLLER, None)
    return True


# --- lifecycle ------------------------------------------------------------------------


def _pending(out: _Out, vm: Vm, pod: PodView | None, config: KernelConfig) -> None:
    assert vm.spec is not None
    if pod is None:
        out.effect(CreatePod(pod_resources(vm.spec, config)))
    out.transition(Cause.POD_CREATED)


def _scheduling(out: _Out, vm: Vm, pod: PodView | None, config: KernelConfig) -> None:
    assert vm.spec is not None
    if pod is None:
        out.effect(CreatePod(pod_resources(vm.spec, config)))
    elif pod.phase is PodPhase.SUCCEEDED:
        out.transition(Cause.POD_SUCCEEDED)
    elif pod.phase is PodPhase.FAILED:
        out.transition(Cause.POD_FAILED)
    elif pod.phase is PodPhase.RUNNING and pod.node_name:
        out.transition(Cause.POD_RUNNING, f"pod {pod.name} runs on {pod.node_name}")


def boot_config(
    spec: VmSpec, pod: PodView, config: KernelConfig = DEFAULT_CONFIG
) -> BootVmm | None:
    """What the VMM boots with: what the pod holds, never more (RESIZE.md 4a).

    A spec changed before boot is not yet in the pod (the pod was created for the spec of
    its day, and no pod step runs before boot): the guest boots within the pod's grant,
    with the ceilings of the current spec, and the rest becomes a resize after boot.
    ``None``: the pod reports no resources yet, or they hold no guest at all."""
    held = granted(pod, config)
    if held is None:
        return None
    wanted = vmm_config(spec)
    vcpus = min(wanted.boot_vcpus, held.cpu_millis // MILLICORES_PER_VCPU)
    room = held.memory - config.pod_memory_overhead
    memory = min(wanted.memory, room - room % GUEST_MEMORY_ALIGNMENT)
    if vcpus < 1 or memory <= 0:
        return None
    if (vcpus, memory) == (wanted.boot_vcpus, wanted.memory):
        return wanted
    ceiling = wanted.memory + wanted.hotplug_size
    region = -(-(ceiling - memory) // HOTPLUG_REGION_ALIGNMENT) * HOTPLUG_REGION_ALIGNMENT
    return BootVmm(boot_vcpus=vcpus, max_vcpus=wanted.max_vcpus, memory=memory, hotplug_size=region)


def _scheduled(out: _Out, vm: Vm, pod: PodView | None, vmm: VmmView, config: KernelConfig) -> None:
    assert pod is not None  # _pod_ended() handled a missing pod
    record = vm.status.resize
    if vmm.state in (VmmState.NOT_CREATED, VmmState.CREATED) and vm.spec is not None:
        if record is not None and record.step is Step.STALLED:
            if record.generation == vm.generation:
                return  # given up on this generation; a spec change retries
            record = None
        boot = boot_config(vm.spec, pod, config)
        if boot is None:
            out.requeue(Owner.DAEMON, config.unreachable_retry_s)
            return
        if record is None or record.step is not Step.BOOT:
            record = ResizeRecord(
                vcpus=boot.boot_vcpus,
                memory=boot.memory,
                generation=vm.generation,
                step=Step.BOOT,
                wait_since=out.now,
            )
        if vmm.call_error is not None:
            _boot_failed(out, vm, record, vmm.call_error, config)
            return
        out.record(Owner.DAEMON, record)
        out.effect(boot)
        out.requeue(Owner.DAEMON, config.poll_after(_waited(out, record), config.boot_deadline_s))
    elif vmm.state is VmmState.UNREACHABLE:
        # The kubelet has not started the VMM yet, or its socket is not there yet.
        out.requeue(Owner.DAEMON, 0.2)
    elif vmm.state in (VmmState.RUNNING, VmmState.PAUSED) and vmm.capacity is not None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))
        current = _guest_truth(None, vmm)
        if current is not None:
            out.status.append(SetAllocated(current, owner=Owner.DAEMON))
        if record is not None and record.step in (Step.BOOT, Step.STALLED):
            out.record(Owner.DAEMON, None)
        if (cond := vm.status.condition(BOOTED)) and cond.status is not ConditionStatus.TRUE:
            out.condition(
                Owner.DAEMON, BOOTED, ConditionStatus.TRUE, Reasons.BOOTED, f"booted with {current}"
            )
        out.transition(Cause.VMM_BOOTED, f"VMM booted with {current}")


def _boot_failed(
    out: _Out, vm: Vm, record: ResizeRecord, error: VmmCallError, config: KernelConfig
) -> None:
    """vm.create or vm.boot refused: back off, say so once, give up at the deadline (or at
    once when no retry can help); the daemon deletes the created config before a retry,
    so a fixed spec is what the next boot uses."""
    attempts = record.attempts + 1
    first = record.attempts == 0
    record = evolve(record, attempts=attempts, wait_since=record.wait_since or out.now)
    waited = _waited(out, record)
    hopeless = error.kind is VmmCallErrorKind.INVALID
    if hopeless or waited >= config.boot_deadline_s:
        out.record(Owner.DAEMON, evolve(record, step=Step.STALLED))
        why = (
            "it cannot work as written"
            if hopeless
            else (f"it kept failing for {config.boot_deadline_s:g}s ({attempts} attempts)")
        )
        message = f"the VMM did not boot, {why}: {error.message}; fix the spec to retry"
        out.condition(Owner.DAEMON, BOOTED, ConditionStatus.FALSE, Reasons.BOOT_STUCK, message)
        out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_BOOT_FAILED, message)
        return
    out.record(Owner.DAEMON, record)
    out.condition(
        Owner.DAEMON,
        BOOTED,
        ConditionStatus.FALSE,
        Reasons.BOOT_FAILED,
        f"the VMM refused to boot (retrying with backoff): {error.message}",
    )
    if first:
        out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_BOOT_FAILED, error.message)
    out.requeue(Owner.DAEMON, config.vmm_backoff(record.attempts - 1))


# --- shared guards --------------------------------------------------------------------


def _guest_truth(known: Allocation | None, vmm: VmmView) -> Allocation | None:
    """What the guest holds on evidence (RESIZE.md 4a), part by part, given ``known``
    (``status.allocated``, the last thing proven).

    vCPUs: threads start when a grow is accepted, but leave only when the guest ejects,
    which only a probe shows (the caller lowers the count on ``probe_ok``); so a count
    below ``known`` is not believed. Memory: from v52 ``memory_actual_size`` is what the
    guest plugged (a paused guest's accepted growth counts, it sees it on resume); before
    v52 it echoes the request, so growth is believed and a shrink is not: the guest may
    still hold ``known``."""
    if vmm.vcpus is None or vmm.requested_memory is None:
        return None
    vcpus = vmm.vcpus if known is None else max(vmm.vcpus, known.vcpus)
    plugged = vmm.plugged_memory
    if plugged is not None:
        memory = plugged
        if vmm.state is VmmState.PAUSED and plugged < vmm.requested_memory:
            memory = vmm.requested_memory
    elif known is None:
        memory = vmm.requested_memory
    else:
        memory = max(vmm.requested_memory, known.memory)
    return Allocation(vcpus, memory)


def _vmm_version(out: _Out, vm: Vm, vmm: VmmView) -> None:
    if vmm.observed and vmm.version and vmm.version != vm.status.vmm_version:
        out.status.append(SetVmmVersion(vmm.version, owner=Owner.DAEMON))


def _vmm_ended(out: _Out, vm: Vm, vmm: VmmView) -> bool:
    """The guest powered off, or the VMM no longer has the VM it booted (it exited and
    came back, or someone deleted it): the VM ends visibly (RESIZE.md 4b)."""
    if vmm.state is VmmState.SHUTDOWN:
        out.record(Owner.DAEMON, None)
        out.transition(Cause.VMM_SHUTDOWN, "the VMM reports Shutdown: the guest powered off")
        return True
    booted = vm.status.phase in VMM_PHASES
    if booted and vmm.state in (VmmState.NOT_CREATED, VmmState.CREATED):
        out.record(Owner.DAEMON, None)
        out.transition(
            Cause.VMM_LOST,
            f"the VMM has no running VM any more (state {vmm.state}); the guest is gone: "
            "delete and re-create the VirtualMachine to start it again",
        )
        return True
    return False


def _track_return_phase(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """A resize returns to the phase the VMM is in at its end: a resume (or pause) in the
    middle moves the return phase with it (RESIZE.md 4)."""
    record = vm.status.resize
    now = {VmmState.RUNNING: Phase.RUNNING, VmmState.PAUSED: Phase.PAUSED}.get(vmm.state)
    if record is not None and now is not None and record.return_phase is not now:
        out.record(Owner.DAEMON, evolve(record, return_phase=now))
        out.daemon_return = now


def _vmm_untrusted(out: _Out, vm: Vm, vmm: VmmView, config: KernelConfig) -> bool:
    """A socket that does not lead to the pod's own VMM: said once as a condition of its
    own and a Warning event, and no step runs (every step would call the VMM behind it).
    Looked at again on the poll cap: the pod's owner may put it right."""
    cond = vm.status.condition(VMM_TRUSTED)
    if vmm.state is not VmmState.UNTRUSTED:
        if vmm.observed and cond is not None and cond.status is not ConditionStatus.TRUE:
            out.condition(Owner.DAEMON, VMM_TRUSTED, ConditionStatus.TRUE, Reasons.TRUSTED, "")
        return False
    message = (
        f"the VM pod's VMM socket does not lead to its own VMM ({vmm.detail or 'refused'}): "
        "nothing is sent to it, so the guest is neither booted nor resized. Something in "
        "the pod replaced or redirected vmm/ch.sock; deleting the pod restarts the VM"
    )
    out.condition(Owner.DAEMON, VMM_TRUSTED, ConditionStatus.FALSE, Reasons.VMM_UNTRUSTED, message)
    if cond is None or cond.status is not ConditionStatus.FALSE:
        out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_VMM_UNTRUSTED, message)
    out.requeue(Owner.DAEMON, config.wait_poll_cap_s)
    return True


def _vmm_health(out: _Out, vm: Vm, vmm: VmmView, config: KernelConfig) -> None:
    if vmm.state is VmmState.UNREACHABLE and _vmm_lost(out, vmm, config):
        cond = vm.status.condition(VMM_REACHABLE)
        why = vmm.detail or "no socket"
        message = (
            f"the VMM API socket has been unreachable for "
            f"{config.vmm_unreachable_deadline_s:g}s while the pod runs ({why}): the VMM "
            "may have been killed inside its container or its socket removed; nothing about "
            "the guest can be seen or resized. Check the VM pod's container (kubectl logs, "
            "kubectl describe pod); deleting the pod restarts the VM"
        )
        out.condition(
            Owner.DAEMON, VMM_REACHABLE, ConditionStatus.FALSE, Reasons.VMM_SOCKET_GONE, message
        )
        if cond is None or cond.reason != Reasons.VMM_SOCKET_GONE:
            out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_VMM_UNREACHABLE, message)
        _guest_step_lost(out, vm)
        out.requeue(Owner.DAEMON, config.wait_poll_cap_s)
    elif vmm.state is VmmState.UNREACHABLE:
        out.condition(
            Owner.DAEMON,
            VMM_REACHABLE,
            ConditionStatus.FALSE,
            Reasons.UNREACHABLE,
            f"cannot reach the VMM API socket: {vmm.detail}" if vmm.detail else "no VMM socket",
        )
        out.requeue(Owner.DAEMON, config.unreachable_retry_s)
    elif vmm.observed:
        cond = vm.status.condition(VMM_REACHABLE)
        if cond is not None and cond.status is not ConditionStatus.TRUE:
            out.condition(Owner.DAEMON, VMM_REACHABLE, ConditionStatus.TRUE, Reasons.REACHABLE, "")


def _guest_step_lost(out: _Out, vm: Vm) -> None:
    """The guest step cannot go on without the VMM's socket: it settles like any stalled
    step (RESIZE.md 4b) instead of waiting in ResizeInProgress for a socket that may
    never come back. Nobody can see the guest, so ``allocated`` keeps the most it may
    hold: what it was proven to hold, or the target if the VMM was asked for it."""
    record, allocated = vm.status.resize, vm.status.allocated
    if vm.status.phase is not Phase.RESIZE_IN_PROGRESS or record is None or allocated is None:
        return
    requested = record.target if record.vmm_requested else None
    _vmm_stalled(
        out,
        vm,
        record,
        allocated,
        Reasons.VMM_SOCKET_GONE,
        f"the VMM's API socket is gone (see VMMReachable): the guest step toward "
        f"{record.target} cannot go on; the pod keeps what the guest may hold. Once the "
        "VMM is back (or the pod restarted), change the spec to retry",
        requested=requested,
    )


def _vmm_lost(out: _Out, vmm: VmmView, config: KernelConfig) -> bool:
    """Unreachable for the whole deadline (RESIZE.md 4b); without a clock, never."""
    since = vmm.unreachable_since
    return (
        out.now is not None
        and since is not None
        and out.now - since >= config.vmm_unreachable_deadline_s
    )


def _effective_desired(vm: Vm, out: _Out, owner: Owner) -> Allocation | None:
    """The spec's target if the running VMM can reach it; else a condition and None."""
    if vm.spec is None or not out.spec_ok:
        return None
    capacity = vm.status.capacity
    if capacity is not None:
        errors = capacity_errors(vm.spec, capacity)
        if errors:
            out.condition(
                owner,
                RESIZED,
                ConditionStatus.FALSE,
                Reasons.EXCEEDS_CAPACITY,
                "; ".join(str(e) for e in errors),
            )
            return None
    return vm.spec.desired


def _new_record(
    vm: Vm,
    step: Step,
    desired: Allocation,
    return_phase: Phase,
    pod_generation: int | None = None,
    now: float | None = None,
) -> ResizeRecord:
    record = ResizeRecord(
        vcpus=desired.vcpus,
        memory=desired.memory,
        generation=vm.generation,
        step=step,
        return_phase=return_phase,
        pod_generation=pod_generation,
    )
    if step is Step.VMM:
        return _guest_step_begins(record, now)
    # A pod step's deadline counts from its opening, which is a status write anyway: the
    # kubelet's answer then needs none to start the clock (ADR 0021).
    return evolve(record, wait_since=now)


def _guest_step_begins(record: ResizeRecord, now: float | None) -> ResizeRecord:
    """``record`` as the guest step opens: the VMM may be asked from now on, and the
    step's deadlines count from here. Whoever opens the step writes this, before the
    daemon can act on it, so the daemon's first ``vm.resize`` needs no status write of
    its own (one write and two reconciles fewer per resize, ADR 0019); what the VMM
    was really asked is in its own configuration (``vm.info``), which a restarted
    daemon reads."""
    return evolve(record, step=Step.VMM, attempts=0, vmm_requested=True, wait_since=now)


def _guest_may_reach(out: _Out, owner: Owner, current: Allocation, target: Allocation) -> None:
    """As the guest step opens, ``allocated`` takes the memory the guest may hold once the
    VMM is asked (a growth's target; before a shrink, what it holds), before it is asked:
    the most the guest may hold is never claimed less, even between the call and the
    daemon's first look, and the daemon, finding it there (:func:`_held_while_moving`),
    writes nothing until the guest has got there (ADR 0019). vCPUs stay as proven."""
    held = evolve(current, memory=max(current.memory, target.memory))
    if held != current:
        out.status.append(SetAllocated(held, owner=owner))


def _announce_guest_step(out: _Out, owner: Owner, record: ResizeRecord) -> None:
    """The seed's second ``VMResizeInitiated`` (the VMM resize), said by the decision
    that opens the guest step after a pod step, or retargets it: that decision writes
    status, so deciding again on the same observations says nothing twice, where the
    daemon's ``vm.resize`` itself writes nothing (ADR 0019). A guest step that opens a
    resize (a shrink, a drift) is announced once, by its phase change's own
    ``VMResizeInitiated``."""
    out.event(
        owner,
        EventType.NORMAL,
        Reasons.EV_VMM_INITIATED,
        f"asking the VMM for {record.target} (the guest holds {out.vm.status.allocated})",
    )


def _settled(out: _Out, owner: Owner, desired: Allocation) -> None:
    out.condition(
        owner, RESIZED, ConditionStatus.TRUE, Reasons.RESIZED, f"allocated {desired} as specified"
    )


def _waited(out: _Out, record: ResizeRecord) -> float:
    """Seconds since ``record``'s wait began; 0 without a clock (no deadline passes)."""
    if out.now is None or record.wait_since is None:
        return 0.0
    return max(out.now - record.wait_since, 0.0)


def _waiting(out: _Out, owner: Owner, record: ResizeRecord) -> ResizeRecord:
    """``record`` with its wait begun (``now``), recorded if it just began."""
    if record.wait_since is None and out.now is not None:
        record = evolve(record, wait_since=out.now)
        out.record(owner, record)
    return record


def _past(out: _Out, record: ResizeRecord, deadline: float) -> bool:
    return (
        out.now is not None and record.wait_since is not None and _waited(out, record) >= deadline
    )


def _given_up(record: ResizeRecord, step: Step, vm: Vm) -> ResizeRecord:
    """``record`` settled as ``step`` (Infeasible, Stalled) for the spec's generation: how
    many tries it took, since when it waited and which pod generation it watched no
    longer matter, and a restart that counted them differently reaches the same record."""
    return evolve(
        record, step=step, generation=vm.generation, pod_generation=None, attempts=0,
        wait_since=None,
    )  # fmt: skip


def _poll(
    out: _Out, owner: Owner, record: ResizeRecord, deadline: float, config: KernelConfig
) -> None:
    out.requeue(owner, config.poll_after(_waited(out, record), deadline))


def _probe_again(out: _Out, record: ResizeRecord, vmm: VmmView, config: KernelConfig) -> None:
    """When the daemon asks again whether a pending vCPU removal is done: backed off from
    the first 429 the daemon remembers, else from the start of the wait. A first probe
    that came late (a hung VMM's call timeout) must not start the backoff at its cap."""
    waited = _waited(out, record)
    busy_for = waited
    if vmm.busy_since is not None and out.now is not None:
        busy_for = min(max(out.now - vmm.busy_since, 0.0), waited)
    deadline = config.vcpu_removal_deadline_s
    out.requeue(Owner.DAEMON, config.busy_after(busy_for, waited, deadline))


# --- steady state: Running / Paused ---------------------------------------------------


def _steady(out: _Out, vm: Vm, pod: PodView | None, config: KernelConfig) -> None:
    """The controller's part of Running and Paused: start a resize the spec asks for, or
    keep a settled one's pod where it belongs (:func:`_daemon_steady` is the daemon's)."""
    assert vm.status.phase is not None
    if pod is None or pod.deleting:
        return
    record = vm.status.resize
    if record is not None and record.step is Step.INFEASIBLE and record.generation == vm.generation:
        # Refused for this generation: keep the pod at what it has, do not ask again. Only
        # a spec above what the pod has is put back (a patch the kubelet will never
        # actuate); one below it that still covers the guest is left alone, or a quota
        # that refuses the increase back would be asked on every look.
        actual, spec = pod.actual, pod.desired
        if actual is not None and spec is not None and spec != actual:
            above = spec.cpu_millis > actual.cpu_millis or spec.memory > actual.memory
            allocated = vm.status.allocated
            short = allocated is not None and not covers(
                spec, pod_resources_for(allocated, config), config
            )
            keep = _keep(pod, allocated, config)
            if (above or short) and keep is not None and keep != spec:
                out.effect(ResizePod(keep))
        return
    desired = _effective_desired(vm, out, Owner.CONTROLLER)
    current = vm.status.allocated
    if record is not None and record.step is Step.STALLED and record.generation == vm.generation:
        # The guest did not get there in time (or cannot say): not retried for this
        # generation (``allocated`` still follows the guest); a new spec starts over.
        # The pod is left covering exactly what the guest may hold: where it stood when
        # the step stalled depends on which in-flight patches landed first (or were lost
        # to a restart), and what it ends at must depend on status alone.
        cover = pod_resources_for(current, config) if current is not None else None
        spec = pod.desired
        if (
            cover is not None
            and spec is not None
            and cover != spec
            and cover.cpu_millis <= spec.cpu_millis
            and cover.memory <= spec.memory
        ):
            out.effect(ResizePod(cover))
        return
    if desired is None or current is None or pod.actual is None:
        return
    step, target = plan(current, pod, desired, config)
    if (
        record is not None
        and record.step is Step.STALLED
        and _may_reach(current, record.target) != current
    ):
        # A stalled step may have left the VMM asked for more than ``allocated`` (a grow
        # the guest has not plugged yet), or never asked it at all (a vCPU removal still
        # pending blocked the request): only the daemon sees which. It goes first and
        # writes what the guest may reach to ``allocated`` before any pod step plans, so
        # the pod's target depends on status alone, never on whether a patch of an
        # earlier decision landed before a restart.
        step, target = Step.VMM, desired
    if step is None:
        out.record(Owner.CONTROLLER, None)
        _settled(out, Owner.CONTROLLER, desired)
        return
    # Going straight to the guest: remember which pod view showed it covered (see _pod_step).
    pod_generation = pod.generation if step is Step.VMM else None
    record = _new_record(vm, step, desired, vm.status.phase, pod_generation, out.now)
    out.record(Owner.CONTROLLER, record)
    first = "; the guest first: asking the VMM" if step is Step.VMM else ""
    out.transition(_CAUSE_OF_STEP[step], f"resizing from {current} to {desired}{first}")
    if step is Step.VMM:
        _guest_may_reach(out, Owner.CONTROLLER, current, desired)
    out.condition(
        Owner.CONTROLLER,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.IN_PROGRESS,
        f"resizing from {current} to {desired}",
    )
    if step is not Step.VMM:
        assert isinstance(target, Resources)
        if pod.desired != target:
            out.effect(_resize_pod_step(pod, target))


def _recover_status(
    out: _Out, vm: Vm, vmm: VmmView, pod: PodView | None, config: KernelConfig
) -> None:
    """``status.allocated`` or ``status.capacity`` was lost mid-resize (it did not parse,
    or someone cleared it): the VMM says what they are. Without ``allocated`` the pod step
    could never plan, and the webhook could not check updates against the ceilings. With
    nothing proven, the guest may hold the most that cannot be ruled out (see
    :func:`_recovered`); until a vCPU probe has answered, nothing is written."""
    if vm.status.allocated is None:
        current = _recovered(vmm, pod, config)
        if current is not None:
            out.status.append(SetAllocated(current, owner=Owner.DAEMON))
            out.vm = vm.evolve(status=evolve(vm.status, allocated=current))
        else:
            _probe_for_recovery(out, vmm, config)
    if vm.status.capacity is None and vmm.capacity is not None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))


def _probe_for_recovery(out: _Out, vmm: VmmView, config: KernelConfig) -> None:
    """Ask the VMM for the vCPU count it is configured for: 204 says no removal is
    pending (the count is exact), 429 that one is (see :func:`_recovered`)."""
    if vmm.vcpus is not None and vmm.call_error is None:
        out.effect(ResizeVmm(vcpus=vmm.vcpus, probe=True))
        out.requeue(Owner.DAEMON, config.vmm_poll_s)


def _recovered(vmm: VmmView, pod: PodView | None, config: KernelConfig) -> Allocation | None:
    """What the guest may hold when nothing was proven (``allocated`` lost); ``None``
    until a vCPU probe has answered (ADR 0016).

    vCPUs never come from the pod: a pod view may be older than the grow that started
    the threads still running (a lagging cache), so it is no bound. The VMM reports only
    the count it is configured for; a probe tells whether a removal is still pending:
    204, none is, and the configured count runs; 429, one is, and nothing short of the
    VMM's ``max_vcpus`` is proven. Memory: from v52 the plugged size; before v52 the most
    the pod is sure to hold (an unplug may be unfinished, and the pod never holds less
    than the guest may)."""
    current = _guest_truth(None, vmm)
    if current is None:
        return None
    if vmm.probe_ok:
        vcpus = current.vcpus
    elif vmm.call_error is not None and vmm.call_error.kind is VmmCallErrorKind.BUSY:
        vcpus = max(current.vcpus, vmm.max_vcpus or 0)
    else:
        return None
    memory = current.memory
    held = granted(pod, config) if pod is not None else None
    if vmm.plugged_memory is None and held is not None:
        room = held.memory - config.pod_memory_overhead
        memory = max(memory, room - room % GUEST_MEMORY_ALIGNMENT)
    return Allocation(vcpus, memory)


def _daemon_steady(
    out: _Out, vm: Vm, vmm: VmmView, pod: PodView | None, config: KernelConfig
) -> None:
    """Keep status in line with what the guest is seen to hold while no resize runs."""
    known = vm.status.allocated
    truth = _guest_truth(known, vmm) if known is not None else _recovered(vmm, pod, config)
    if truth is None and known is None:
        _probe_for_recovery(out, vmm, config)
    removal_done = False
    if known is not None and truth is not None and vmm.vcpus is not None:
        if truth.vcpus > vmm.vcpus and vmm.probe_ok:
            # A removal that stalled (or that a restart left behind) finished late.
            truth, removal_done = evolve(truth, vcpus=vmm.vcpus), True
        elif truth.vcpus > vmm.vcpus and vmm.call_error is None:
            # More vCPUs than configured may still run: only a probe shows when the guest
            # ejects them. One per look (watch events, the daemon's resync), no loop of
            # its own: a guest that never ejects costs one 429 per resync.
            out.effect(ResizeVmm(vcpus=vmm.vcpus, probe=True))
    if truth is not None and vmm.requested is not None:
        # No resize runs: a growth the guest has not finished plugging (a stalled one)
        # may still finish, so ``allocated`` keeps what the VMM was asked.
        truth = _may_reach(truth, vmm.requested)
    if truth is not None and truth != vm.status.allocated:
        out.status.append(SetAllocated(truth, owner=Owner.DAEMON))
    if vmm.capacity is not None and vm.status.capacity is None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))
    if vm.status.phase is Phase.RUNNING and vmm.state is VmmState.PAUSED:
        _steady_record_follows(out, vm, out.transition(Cause.VMM_PAUSED))
    elif vm.status.phase is Phase.PAUSED and vmm.state is VmmState.RUNNING:
        _steady_record_follows(out, vm, out.transition(Cause.VMM_RESUMED))
    elif removal_done:
        _late_removal(out, vm, vmm)
    else:
        _vmm_drift(out, vm, vmm, truth)


def _late_removal(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """The guest ejected, after its step stalled, the vCPUs it had been asked to remove:
    the VMM accepts vCPU counts again, so the step that stalled runs again for the spec
    of this generation. Which count the VMM was left at depends on whether an in-flight
    request of an earlier generation landed before a restart; running the step again
    makes the outcome the spec's, either way (RESIZE.md 8, invariant 6)."""
    record = vm.status.resize
    if vm.spec is None or not out.spec_ok or record is None:
        return
    if record.step is not Step.STALLED or record.generation != vm.generation:
        return
    phase = vm.status.phase
    assert phase is not None
    out.record(Owner.DAEMON, _new_record(vm, Step.VMM, vm.spec.desired, phase, now=out.now))
    out.transition(
        Cause.VMM_DRIFTED,
        f"the guest finished removing vCPUs late (the VMM is configured for {vmm.requested});"
        f" resuming toward {vm.spec.desired}",
    )


def _steady_record_follows(out: _Out, vm: Vm, phase: Phase) -> None:
    """A record kept while no resize runs (a stalled or infeasible generation) names the
    phase the VM is in, whether the pause or resume came before the resize ended or after:
    the same world then reads the same, however the daemon's restarts fell."""
    record = vm.status.resize
    if record is not None and record.return_phase is not phase:
        out.record(Owner.DAEMON, evolve(record, return_phase=phase))


def _vmm_drift(out: _Out, vm: Vm, vmm: VmmView, truth: Allocation | None) -> None:
    """The VMM is configured for something else than the spec while the guest is known
    to hold the spec: left so by a stalled step (a shrink a VMM before v52 cannot verify,
    a vCPU removal that never finished) whose spec came back. Only the daemon sees it:
    the guest step runs again (the pod covers ``allocated``, which is the target)."""
    record = vm.status.resize
    requested = vmm.requested
    if vm.spec is None or not out.spec_ok or requested is None or truth is None:
        return
    desired = vm.spec.desired
    in_force = record is not None and record.generation == vm.generation
    if in_force or truth != desired or requested == desired or vm.status.allocated != truth:
        return
    phase = vm.status.phase
    assert phase is not None
    out.record(Owner.DAEMON, _new_record(vm, Step.VMM, desired, phase, now=out.now))
    out.transition(
        Cause.VMM_DRIFTED, f"the VMM is configured for {requested}, the spec asks {desired}"
    )


# --- the pod step (controller) --------------------------------------------------------


def _fresh(cond_generation: int | None, record: ResizeRecord) -> bool:
    """Does a pod condition speak about our patch (or is it from an older request)?"""
    if record.pod_generation is None:
        return False
    return cond_generation is None or cond_generation >= record.pod_generation


def _pod_step(out: _Out, vm: Vm, pod: PodView | None, config: KernelConfig) -> None:
    assert pod is not None  # _pod_ended() handled a missing pod
    record = vm.status.resize
    current = vm.status.allocated
    if current is None:
        return
    desired = _effective_desired(vm, out, Owner.CONTROLLER)
    # Only the user writes the spec. A target taken from status.resize instead is one any
    # writer of the VM's status could have put there (ADR 0011): it may still grow the
    # pod (never unsafe for the guest) but never shrink it.
    from_spec = desired is not None
    if desired is None:
        # Out of reach (or invalid) now: finish toward what was being applied, safely.
        if record is None:
            return
        desired = record.target
    return_phase = record.return_phase if record is not None else Phase.RUNNING
    # A 403 answers the patch a decision just sent, aimed at the target recorded then. If
    # the spec has moved on since, it says nothing about the new target: try that one.
    refused = pod.resize_refused if record is not None and record.target == desired else None
    forbidden = pod.resize_forbidden if record is not None and record.target == desired else None
    if record is None or record.target != desired or record.generation != vm.generation:
        step = record.step if record is not None else Step.POD_GROW
        fresh_record = _new_record(vm, step, desired, return_phase, now=out.now)
        if record is not None and record.target == desired:
            fresh_record = evolve(record, generation=vm.generation)
        record = fresh_record
        out.record(Owner.CONTROLLER, record)
        vm = vm.evolve(status=evolve(vm.status, resize=record))

    stale = pod_stale(pod, record.pod_generation)
    if refused is not None:
        _infeasible(out, vm, pod, record, refused)
        return
    if forbidden is not None:
        _forbidden(out, vm, pod, record, forbidden)
        return
    if record.pod_generation is not None and not stale:
        pending = pod.resize_pending
        legacy_infeasible = pod.legacy_resize_status == "Infeasible"
        if (
            pending is not None
            and pending.reason == "Infeasible"
            and _fresh(pending.observed_generation, record)
        ) or legacy_infeasible:
            message = pending.message if pending is not None else "Infeasible (status.resize)"
            _infeasible(out, vm, pod, record, message)
            return

    if stale:
        if record.pod_generation is not None and record.wait_since is not None:
            # The kubelet has not even looked at our patch: that wait has a deadline too.
            _pod_waiting(out, vm, pod, record, config)
        return
    if (
        record.step in (Step.POD_GROW, Step.POD_SHRINK)
        and record.pod_generation is None
        and pod.desired is not None
        and pod.desired == _pod_target(record.step, current, desired, config)
    ):
        # Our patch is in this view: the kubelet's conditions are judged against its
        # generation. It is kept in memory, not written (ADR 0021): the controller's view
        # of the pod never goes back, and a restarted controller finds the patch in the
        # pod the same way. The guest step, which the daemon judges on its own pod view,
        # writes the generation when it opens.
        _pod_step(out, _with_pod_generation(out, vm, record, pod), pod, config)
        return
    step, target = plan(current, pod, desired, config)
    if step is Step.POD_SHRINK and not from_spec:
        _shrink_unchecked(out, vm, pod, record, current, config)
        return
    kubelet_busy = (
        pod.resize_pending is not None
        or pod.resize_in_progress is not None
        or pod.legacy_resize_status is not None  # Proposed, InProgress, Deferred
    )
    if step is None and kubelet_busy:
        _pod_waiting(out, vm, pod, record, config)  # not done while the kubelet still works
        return
    if step is None:
        out.record(Owner.CONTROLLER, None)
        if from_spec:
            _settled(out, Owner.CONTROLLER, desired)  # else the spec's problem stays said
        out.transition(Cause.RESIZED, f"resized to {desired}")
        return
    if step is Step.VMM:
        # The daemon compares its own pod view with this generation: a view older than the
        # one that showed the pod covering the guest must not let the guest grow.
        record = _guest_step_begins(evolve(record, pod_generation=pod.generation), out.now)
        out.record(Owner.CONTROLLER, record)
        out.transition(Cause.NEEDS_VMM, f"pod holds {pod.actual}; resizing the guest to {desired}")
        _guest_may_reach(out, Owner.CONTROLLER, current, desired)
        _announce_guest_step(out, Owner.CONTROLLER, record)
        return

    assert isinstance(target, Resources)
    if step is not record.step:
        record = evolve(record, step=step, pod_generation=None, wait_since=out.now)
        out.record(Owner.CONTROLLER, record)
    if pod.desired != target:
        out.effect(_resize_pod_step(pod, target))
        if record.pod_generation is not None:
            # Written by a controller before ADR 0021: the generation it names is not the
            # one this patch makes.
            out.record(Owner.CONTROLLER, evolve(record, pod_generation=None))
        return
    if record.pod_generation is None or record.pod_generation < pod.generation:
        vm = _with_pod_generation(out, vm, record, pod)
        assert vm.status.resize is not None
        record = vm.status.resize
    _pod_waiting(out, vm, pod, record, config)


def _pod_target(
    step: Step, current: Allocation, desired: Allocation, config: KernelConfig
) -> Resources:
    if step is Step.POD_SHRINK:
        return pod_resources_for(desired, config)
    envelope = Allocation(max(current.vcpus, desired.vcpus), max(current.memory, desired.memory))
    return pod_resources_for(envelope, config)


def _resize_pod_step(pod: PodView, target: Resources) -> ResizePod:
    """The ``pods/resize`` patch of a pod step, announced once the API server takes it."""
    announce = RecordEvent(
        EventType.NORMAL,
        Reasons.EV_POD_INITIATED,
        f"pod {pod.name} resize to {target} requested",
        owner=Owner.CONTROLLER,
    )
    return ResizePod(target, announce=announce)


def _with_pod_generation(out: _Out, vm: Vm, record: ResizeRecord, pod: PodView) -> Vm:
    """``vm`` as this decision sees it once ``pod`` shows the pod step's patch: the
    record names the pod's generation, in memory only (nothing is written for it)."""
    seen = vm.evolve(status=evolve(vm.status, resize=evolve(record, pod_generation=pod.generation)))
    out.vm = seen
    return seen


def _pod_waiting(
    out: _Out, vm: Vm, pod: PodView, record: ResizeRecord, config: KernelConfig
) -> None:
    record = _waiting(out, Owner.CONTROLLER, record)
    current = vm.status.allocated
    if current is not None and _past(out, record, config.pod_resize_deadline_s):
        _pod_stalled(out, vm, pod, record, current, config)
        return
    # The pod's conditions and our own writes come as watch events: the one thing no event
    # brings is the deadline, so that is the only time to look again. A poll here was a
    # decision per poll that found nothing new.
    if out.now is not None:
        waited = _waited(out, record)
        out.requeue(Owner.CONTROLLER, config.at_deadline(waited, config.pod_resize_deadline_s))
    pending, progress = pod.resize_pending, pod.resize_in_progress
    if pending is None and pod.legacy_resize_status == "Deferred":
        # A kubelet before 1.33 says only this, in status.resize, with no generation.
        pending = PodResizeCondition("Deferred", "status.resize: Deferred")
    if (
        pending is not None
        and pending.reason == "Deferred"
        and _fresh(pending.observed_generation, record)
    ):
        previous = vm.status.condition(RESIZED)
        changed = out.condition(
            Owner.CONTROLLER,
            RESIZED,
            ConditionStatus.FALSE,
            Reasons.POD_RESIZE_DEFERRED,
            f"the node cannot fit the pod resize yet; the kubelet will retry: {pending.message}",
        )
        if changed and (previous is None or previous.reason != Reasons.POD_RESIZE_DEFERRED):
            out.event(Owner.CONTROLLER, EventType.NORMAL, Reasons.EV_POD_DEFERRED, pending.message)
    elif (
        progress is not None
        and progress.reason == "Error"
        and _fresh(progress.observed_generation, record)
    ):
        if out.condition(
            Owner.CONTROLLER,
            RESIZED,
            ConditionStatus.FALSE,
            Reasons.POD_RESIZE_ERROR,
            f"the kubelet failed to resize the pod and will retry: {progress.message}",
        ):
            out.event(Owner.CONTROLLER, EventType.WARNING, Reasons.EV_POD_ERROR, progress.message)
    elif (said := out.vm.status.condition(RESIZED)) is not None and said.reason in (
        Reasons.POD_RESIZE_DEFERRED,
        Reasons.POD_RESIZE_ERROR,
    ):
        # The kubelet no longer says Deferred or Error: take that back. Otherwise the
        # step's opening already said the resize is in progress, and restating it as
        # the kubelet works would be a status write per look for nothing (ADR 0021).
        out.condition(
            Owner.CONTROLLER,
            RESIZED,
            ConditionStatus.FALSE,
            Reasons.IN_PROGRESS,
            f"waiting for the kubelet to resize pod {pod.name} to "
            f"{pod.desired if pod.desired is not None else 'the target'}",
        )


def _infeasible(out: _Out, vm: Vm, pod: PodView, record: ResizeRecord, message: str) -> None:
    if pod.actual is not None and pod.desired != pod.actual:
        out.effect(ResizePod(pod.actual))
    out.record(Owner.CONTROLLER, _given_up(record, Step.INFEASIBLE, vm))
    out.condition(
        Owner.CONTROLLER,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.POD_RESIZE_INFEASIBLE,
        f"the node can never fit this resize; change the spec to retry: {message}",
    )
    out.transition(Cause.INFEASIBLE, message)


def _keep(
    pod: PodView, allocated: Allocation | None, config: KernelConfig = DEFAULT_CONFIG
) -> Resources | None:
    """What to put a refused or stalled pod back to: what it has, and never less than the
    guest holds (our view of the pod may lag the kubelet's)."""
    if pod.actual is None:
        return None
    if allocated is None:
        return pod.actual
    cover = pod_resources_for(allocated, config)
    return Resources(
        max(pod.actual.cpu_millis, cover.cpu_millis), max(pod.actual.memory, cover.memory)
    )


def _forbidden(out: _Out, vm: Vm, pod: PodView, record: ResizeRecord, message: str) -> None:
    """A refusal no retry can fix (a ResourceQuota's 403, RBAC, a 422): reported once for
    this spec generation, like Infeasible; the pod keeps what it has."""
    keep = _keep(pod, vm.status.allocated)
    if keep is not None and pod.desired != keep:
        out.effect(ResizePod(keep))
    out.record(Owner.CONTROLLER, _given_up(record, Step.INFEASIBLE, vm))
    out.condition(
        Owner.CONTROLLER,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.POD_RESIZE_FORBIDDEN,
        "the API server refused the pod resize (a ResourceQuota, RBAC or validation); "
        f"raise the quota or change the spec to retry: {message}",
    )
    out.transition(Cause.FORBIDDEN, message)


def _shrink_unchecked(
    out: _Out,
    vm: Vm,
    pod: PodView,
    record: ResizeRecord,
    current: Allocation,
    config: KernelConfig,
) -> None:
    """The spec is out of reach and only a pod shrink to status.resize's target is left:
    the controller cannot check that target against anything it observes (the spec says
    otherwise), so the pod keeps what it has and the VM settles. The condition the spec's
    problem set (ExceedsCapacity, InvalidSpec) says why; a new spec starts over."""
    keep = _keep(pod, current, config)
    if keep is not None and pod.desired != keep:
        out.effect(ResizePod(keep))
    out.record(Owner.CONTROLLER, _given_up(record, Step.INFEASIBLE, vm))
    out.transition(
        Cause.STALLED,
        f"the guest holds {current}; pod {pod.name} keeps {pod.actual} rather than shrink "
        "to a target the spec no longer gives (the spec is out of the VM's reach)",
    )


def _pod_stalled(
    out: _Out,
    vm: Vm,
    pod: PodView,
    record: ResizeRecord,
    current: Allocation,
    config: KernelConfig,
) -> None:
    """The kubelet did not finish in time (Deferred, Error, or silence): put the pod's
    spec back to what it holds (never below what the guest holds) and settle."""
    keep = _keep(pod, current, config)
    if keep is not None and pod.desired != keep:
        out.effect(ResizePod(keep))
    said = pod.resize_in_progress or pod.resize_pending
    kubelet = f": the kubelet says {said.reason}: {said.message}" if said and said.reason else ""
    message = (
        f"the kubelet did not resize pod {pod.name} to {pod.desired} within "
        f"{config.pod_resize_deadline_s:g}s{kubelet}; the pod keeps {pod.actual} and the "
        f"guest {current}. Free the node (or the VM's memory usage) and change the spec "
        "to retry"
    )
    out.record(Owner.CONTROLLER, _given_up(record, Step.INFEASIBLE, vm))
    out.condition(
        Owner.CONTROLLER, RESIZED, ConditionStatus.FALSE, Reasons.KUBELET_RESIZE_STUCK, message
    )
    out.transition(Cause.STALLED, message)


# --- the VMM step (daemon) ------------------------------------------------------------


def _vmm_step(out: _Out, vm: Vm, pod: PodView | None, vmm: VmmView, config: KernelConfig) -> None:
    record = vm.status.resize
    if not vmm.observed or pod is None:
        return
    if record is None:
        _vmm_step_unrecorded(out, vm, vmm)
        return
    if vmm.call_error is not None:
        _vmm_call_failed(out, vm, record, vmm, config)
        return
    desired = _effective_desired(vm, out, Owner.DAEMON) or record.target
    if pod_stale(pod, record.pod_generation):
        out.requeue(Owner.DAEMON, config.vmm_poll_s)  # our pod view lags the controller's
        return
    known = vm.status.allocated
    if known is None:  # lost, and _recover_status is still waiting for its probe
        return
    truth = _guest_truth(known, vmm)
    requested = vmm.requested
    if truth is None or requested is None:
        return
    if vmm.probe_ok and truth.vcpus > requested.vcpus:
        # A vCPU request answered 204: no removal is pending, the guest ejected them.
        truth = evolve(truth, vcpus=requested.vcpus)
    # A removal the guest has not finished: every vCPU request answers 429 until it has,
    # and asking for the count still running would answer 204 but leave it pending.
    removal_pending = truth.vcpus > requested.vcpus
    asking = requested != desired and not removal_pending
    # About to ask: the guest is on its way to the spec's memory, not yet to what the VMM
    # holds now (the step's opening put that in ``allocated``, see _guest_may_reach).
    held = _held_while_moving(
        known, truth, evolve(requested, memory=desired.memory) if asking else requested
    )
    # ``allocated`` bounds what the guest may hold from above: a rise is written at once
    # (nothing may plan the pod below it). A fall of memory rides with the step's next
    # write, which its end makes anyway: alone, it was a write (and an echo) per shrink
    # while the guest still ejected vCPUs, for no reader (the pod shrinks only after the
    # step), and vm.info shows it again on every look (ADR 0021). vCPUs are written as
    # they are proven: a removal is proven only by a probe's 204, which no later look sees.
    falls = held.vcpus == known.vcpus and held.memory < known.memory
    if held != known and not falls:
        out.status.append(SetAllocated(held, owner=Owner.DAEMON))
    if asking:
        step, _ = plan(truth, pod, desired, config)
        if step is Step.POD_GROW:
            # The VMM may have been asked for more than the guest has plugged yet: the
            # guest may still get there, so the pod step plans with that too.
            out.status.append(SetAllocated(_may_reach(truth, requested), owner=Owner.DAEMON))
            out.record(
                Owner.DAEMON, _new_record(vm, step, desired, record.return_phase, now=out.now)
            )
            out.transition(Cause.NEEDS_POD_GROW, f"the spec grew to {desired}; growing the pod")
            return
        if record.target != desired or record.generation != vm.generation:
            record = evolve(
                record, vcpus=desired.vcpus, memory=desired.memory, generation=vm.generation
            )
            record = _guest_step_begins(record, out.now)
            out.record(Owner.DAEMON, record)
            _announce_guest_step(out, Owner.DAEMON, record)
        elif not record.vmm_requested:
            # Opened by a chscale before ADR 0019, whose daemon announced its own call.
            record = evolve(record, vmm_requested=True, wait_since=record.wait_since or out.now)
            out.record(Owner.DAEMON, record)
            _announce_guest_step(out, Owner.DAEMON, record)
        _falls_along(out, falls, held)
        out.effect(
            ResizeVmm(
                vcpus=desired.vcpus if requested.vcpus != desired.vcpus else None,
                memory=desired.memory if requested.memory != desired.memory else None,
            )
        )
        out.requeue(Owner.DAEMON, config.vmm_poll_s)
        return
    if record.target != desired or record.generation != vm.generation:
        record = evolve(
            record,
            vcpus=desired.vcpus,
            memory=desired.memory,
            generation=vm.generation,
            attempts=0,
            wait_since=None,
        )
        out.record(Owner.DAEMON, record)
    record = _waiting(out, Owner.DAEMON, record)
    if removal_pending:
        # Ask again for the count already configured: 204 = ejected, 429 = not yet.
        if _past(out, record, config.vcpu_removal_deadline_s):
            _vmm_stalled(
                out,
                vm,
                record,
                truth,
                Reasons.GUEST_VCPU_REMOVAL_STUCK,
                f"the guest did not eject vCPUs ({truth.vcpus} still run, {requested.vcpus} "
                f"asked) within {config.vcpu_removal_deadline_s:g}s; the pod keeps "
                f"{truth.vcpus} vCPUs. Check the guest's ACPI CPU hot-unplug support (or "
                "restart the VM), then change the spec to retry",
            )
            return
        _falls_along(out, falls, held)
        out.effect(ResizeVmm(vcpus=requested.vcpus, probe=True))
        _probe_again(out, record, vmm, config)
        return
    if truth != desired:
        if vmm.plugged_memory is None and truth.memory > requested.memory:
            # A VMM before v52 cannot say what the guest gave back: nothing to wait for.
            _vmm_stalled(
                out,
                vm,
                record,
                truth,
                Reasons.GUEST_MEMORY_UNVERIFIABLE,
                f"the guest was asked to shrink to {format_bytes(requested.memory)}, but this "
                f"VMM ({vmm.version or 'version unknown'}) cannot report unplugged memory "
                f"(Cloud Hypervisor < v{PLUGGED_SIZE_SINCE}): the guest may still hold "
                f"{format_bytes(truth.memory)}, so the pod keeps it. Upgrade the VMM, or "
                "restart the VM to shrink it",
            )
            return
        if _past(out, record, config.guest_memory_deadline_s):
            _vmm_stalled(
                out,
                vm,
                record,
                truth,
                Reasons.GUEST_MEMORY_STUCK,
                f"the guest holds {format_bytes(truth.memory)} of memory, not the "
                f"{format_bytes(requested.memory)} asked, after "
                f"{config.guest_memory_deadline_s:g}s; the pod keeps what the guest may hold. "
                "Check the guest's virtio-mem driver (movable memory, memhp_default_state), "
                "then change the spec to retry",
                requested,
            )
            return
        _falls_along(out, falls, held)
        _poll(out, Owner.DAEMON, record, config.guest_memory_deadline_s, config)
        return
    if falls:
        out.status.append(SetAllocated(held, owner=Owner.DAEMON))
    step, _ = plan(desired, pod, desired, config)
    if step is None:
        out.record(Owner.DAEMON, None)
        _settled(out, Owner.DAEMON, desired)
        out.transition(Cause.RESIZED, f"resized to {desired}")
    else:
        out.record(
            Owner.DAEMON,
            evolve(
                record,
                step=Step.POD_SHRINK,
                generation=vm.generation,
                pod_generation=None,
                attempts=0,
                vmm_requested=False,
                wait_since=out.now,
                vcpus=desired.vcpus,
                memory=desired.memory,
            ),
        )
        out.transition(Cause.NEEDS_POD_SHRINK, f"guest now has {desired}; shrinking the pod")


def _falls_along(out: _Out, falls: bool, held: Allocation) -> None:
    """A fall of ``allocated`` the step has not finished: written if the decision writes
    status anyway."""
    if falls and out.status:
        out.status.append(SetAllocated(held, owner=Owner.DAEMON))


def _held_while_moving(known: Allocation, truth: Allocation, requested: Allocation) -> Allocation:
    """``allocated`` while the guest is seen on its way to ``requested``: vCPUs as they
    are proven (threads start on accept; leave on a probe's 204), memory the most the
    guest may hold until it has plugged or unplugged all of it (the target of a growth,
    what it held before a shrink), then what it holds. A guest plugs virtio-mem block by
    block: writing each block it reached would be one status write per look, and each
    write's echo is another look (measured: 48 writes per resize in the simulation,
    issue 19), while no reader needs the progress (the pod covers the envelope, and a
    guest that stops short is settled with what it holds, see :func:`_vmm_stalled`)."""
    if truth.memory == requested.memory:
        return truth
    return evolve(truth, memory=max(known.memory, truth.memory, requested.memory))


def _may_reach(truth: Allocation, requested: Allocation) -> Allocation:
    return Allocation(max(truth.vcpus, requested.vcpus), max(truth.memory, requested.memory))


def _vmm_stalled(
    out: _Out,
    vm: Vm,
    record: ResizeRecord,
    truth: Allocation,
    reason: str,
    message: str,
    requested: Allocation | None = None,
) -> None:
    """Settle where the pod still covers what the guest may hold (the pod step never
    shrinks it below ``allocated``), and say why (RESIZE.md 4b). A guest that plugged only
    part of a growth may still plug the rest: ``allocated`` keeps what it was asked."""
    truth = _may_reach(truth, requested) if requested is not None else truth
    if truth != vm.status.allocated:
        out.status.append(SetAllocated(truth, owner=Owner.DAEMON))
    out.record(Owner.DAEMON, _given_up(record, Step.STALLED, vm))
    out.condition(Owner.DAEMON, RESIZED, ConditionStatus.FALSE, reason, message)
    out.transition(Cause.STALLED, message)


def _vmm_step_unrecorded(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """``status.resize`` was lost (it did not parse, or someone cleared it): nothing says
    which pod view showed the guest covered, so hand back to the controller, which checks
    the pod again before the guest moves. The guest's extent goes to ``allocated`` so the
    controller plans from what the guest may really hold."""
    if vm.status.allocated is None:
        return  # lost too: _recover_status is still waiting for its probe
    current = _guest_truth(vm.status.allocated, vmm)
    if current is None:
        return
    desired = _effective_desired(vm, out, Owner.DAEMON) or current
    out.status.append(SetAllocated(current, owner=Owner.DAEMON))
    back_to = Phase.PAUSED if vmm.state is VmmState.PAUSED else Phase.RUNNING
    out.record(Owner.DAEMON, _new_record(vm, Step.POD_GROW, desired, back_to, now=out.now))
    out.transition(Cause.NEEDS_POD_GROW, "status.resize was lost; checking the pod again")


def _vmm_call_failed(
    out: _Out, vm: Vm, record: ResizeRecord, vmm: VmmView, config: KernelConfig
) -> None:
    error = vmm.call_error
    assert error is not None
    truth = _guest_truth(vm.status.allocated, vmm) or vm.status.allocated
    if error.kind is VmmCallErrorKind.BUSY:
        # A vCPU removal is still pending in the guest: not a failure, just not yet. The
        # probe backs off with the time waited, up to the removal's deadline; only the
        # wait's start is written (once), not each 429 (ADR 0021).
        record = _waiting(out, Owner.DAEMON, record)
        if truth is not None and _past(out, record, config.vcpu_removal_deadline_s):
            _vmm_stalled(
                out,
                vm,
                record,
                truth,
                Reasons.GUEST_VCPU_REMOVAL_STUCK,
                f"the VMM answered 429 for {config.vcpu_removal_deadline_s:g}s: the guest "
                f"has not finished ejecting vCPUs; the pod keeps {truth}. Check the guest's "
                "ACPI CPU hot-unplug support (or restart the VM), then change the spec to "
                "retry",
            )
            return
        _probe_again(out, record, vmm, config)
        return
    attempts = record.attempts + 1
    record = evolve(record, attempts=attempts, wait_since=record.wait_since or out.now)
    if truth is not None and (
        error.kind is VmmCallErrorKind.INVALID or _past(out, record, config.vmm_resize_deadline_s)
    ):
        _vmm_stalled(
            out,
            vm,
            record,
            truth,
            Reasons.VMM_RESIZE_STUCK,
            f"the VMM refused the resize ({attempts} attempts): {error.message}; the guest "
            f"holds {truth}. Check the VMM's log, then change the spec to retry",
        )
        out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_VMM_FAILED, error.message)
        return
    out.record(Owner.DAEMON, record)
    out.condition(
        Owner.DAEMON,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.VM_RESIZE_FAILED,
        f"the VMM refused the resize (attempt {attempts}, retrying): {error.message}",
    )
    if attempts == 1:  # one event per refusal streak, not one per retry
        out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_VMM_FAILED, error.message)
    out.requeue(Owner.DAEMON, config.vmm_backoff(attempts - 1))
