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

Observations can be stale. ``status.resize.podGeneration`` records the pod generation our
``pods/resize`` patch produced, and, when the pod step hands over to the VMM step, the
generation of the pod view that showed the guest covered; a pod view older than that, or
whose kubelet has not yet observed it, is treated as "not yet known" and never acted
upon (by the controller, nor by a daemon whose pod cache lags the controller's).

Intent is written before the act: a decision's status actions come first, and the
executor writes them with the resourceVersion it decided on, so a decision made on a
stale VirtualMachine fails with a conflict before its side effects happen. The VMM call
records ``vmmRequested`` in ``status.resize`` first, which also makes a retry (after a
429 or a 500) quiet. This relies on each process feeding its own writes back into its
cache (a cache that lags behind the process's own writes could repeat an old decision's
unguarded side effects).
"""

from __future__ import annotations

from attrs import evolve

from core.actions import (
    Action,
    AddFinalizer,
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
)
from core.config import DEFAULT_CONFIG, KernelConfig
from core.model import (
    RESIZE_PHASES,
    STEADY_PHASES,
    TERMINAL_PHASES,
    UNOBSERVED_VMM,
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
    VmmCallErrorKind,
    VmmState,
    VmmView,
)
from core.resources import (
    capacity_errors,
    pod_resources,
    pod_resources_for,
    spec_errors,
    vmm_config,
)
from core.table import RETURN, Cause, move

__all__ = ["RESIZED", "VMM_REACHABLE", "Reasons", "decide", "plan"]

RESIZED = "Resized"
VMM_REACHABLE = "VMMReachable"
SPEC_VALID = "SpecValid"


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
    # events
    EV_POD_INITIATED = "VMResizePodInitiated"
    EV_POD_DEFERRED = "VMPodResizeDeferred"
    EV_POD_ERROR = "VMPodResizeError"
    EV_VMM_INITIATED = "VMResizeInitiated"
    EV_VMM_FAILED = "VMResizeFailed"


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
    what the kubelet reports (it may not have grown the pod yet). Kubernetes may round what
    it reports, so once the kubelet is done with the spec, a report within the tolerance
    below the spec counts as the spec. ``None``: the pod reports no resources.
    """
    actual = pod.actual
    if actual is None:
        return None
    spec = pod.desired
    if spec is None:
        return actual
    memory = actual.memory
    if (
        memory < spec.memory
        and kubelet_done(pod)
        and _within_tolerance(spec.memory - memory, spec.memory, config)
    ):
        memory = spec.memory
    return Resources(min(actual.cpu_millis, spec.cpu_millis), min(memory, spec.memory))


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

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
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
) -> tuple[Action, ...]:
    """Everything that should happen next for ``vm``, given what was just observed."""
    out = _Out(vm)
    if vm.deleting:
        _deletion(out, pod)
        return out.done()
    if not vm.has_finalizer:
        out.effect(AddFinalizer())
        return out.done()

    _observe(out, vm, pod)
    phase = vm.status.phase
    if phase is None:
        out.transition(Cause.ACCEPTED)
        return out.done()
    if phase in TERMINAL_PHASES or phase is Phase.UNKNOWN:
        return out.done()
    if not out.spec_ok:
        _invalid_spec(out, vm)
        if phase in (Phase.PENDING, Phase.SCHEDULING):
            return out.done()
    elif (cond := vm.status.condition(SPEC_VALID)) and cond.status is ConditionStatus.FALSE:
        out.condition(Owner.CONTROLLER, SPEC_VALID, ConditionStatus.TRUE, Reasons.VALID, "")

    if phase is Phase.PENDING:
        _pending(out, vm, pod, config)
    elif phase is Phase.SCHEDULING:
        _scheduling(out, vm, pod, config)
    elif _pod_ended(out, pod):
        pass
    elif phase is Phase.SCHEDULED:
        _scheduled(out, vm, vmm)
    else:
        _vmm_health(out, vm, vmm, config)
        if phase in RESIZE_PHASES and vmm.observed:
            _recover_status(out, vm, vmm)
        if phase in STEADY_PHASES:
            _steady(out, vm, pod, vmm, config)
        elif phase is Phase.POD_RESIZE_IN_PROGRESS:
            _pod_step(out, vm, pod, config)
        elif phase is Phase.RESIZE_IN_PROGRESS:
            _vmm_step(out, vm, pod, vmm, config)
    return out.done()


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


def _scheduled(out: _Out, vm: Vm, vmm: VmmView) -> None:
    if vmm.state in (VmmState.NOT_CREATED, VmmState.CREATED) and vm.spec is not None:
        out.effect(vmm_config(vm.spec))
        out.requeue(Owner.DAEMON, 0.05)
    elif vmm.state is VmmState.UNREACHABLE:
        # The kubelet has not started the VMM yet, or its socket is not there yet.
        out.requeue(Owner.DAEMON, 0.2)
    elif vmm.state in (VmmState.RUNNING, VmmState.PAUSED) and vmm.capacity is not None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))
        current = _vmm_current(vmm)
        if current is not None:
            out.status.append(SetAllocated(current, owner=Owner.DAEMON))
        out.transition(Cause.VMM_BOOTED, f"VMM booted with {current}")


# --- shared guards --------------------------------------------------------------------


def _vmm_current(vmm: VmmView) -> Allocation | None:
    """The most the guest may hold right now: requested, or more while unplugging."""
    if vmm.vcpus is None or vmm.requested_memory is None:
        return None
    plugged = vmm.plugged_memory or 0
    return Allocation(vmm.vcpus, max(vmm.requested_memory, plugged))


def _vmm_health(out: _Out, vm: Vm, vmm: VmmView, config: KernelConfig) -> None:
    if vmm.state is VmmState.UNREACHABLE:
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
) -> ResizeRecord:
    return ResizeRecord(
        vcpus=desired.vcpus,
        memory=desired.memory,
        generation=vm.generation,
        step=step,
        return_phase=return_phase,
        pod_generation=pod_generation,
    )


def _settled(out: _Out, owner: Owner, desired: Allocation) -> None:
    out.condition(
        owner, RESIZED, ConditionStatus.TRUE, Reasons.RESIZED, f"allocated {desired} as specified"
    )


# --- steady state: Running / Paused ---------------------------------------------------


def _steady(out: _Out, vm: Vm, pod: PodView | None, vmm: VmmView, config: KernelConfig) -> None:
    assert vm.status.phase is not None
    if vmm.observed:
        _daemon_steady(out, vm, vmm)
    if pod is None or pod.deleting:
        return
    record = vm.status.resize
    if record is not None and record.step is Step.INFEASIBLE and record.generation == vm.generation:
        # Refused for this generation: keep the pod at what it has, do not ask again.
        if pod.actual is not None and pod.desired != pod.actual:
            out.effect(ResizePod(pod.actual))
        return
    desired = _effective_desired(vm, out, Owner.CONTROLLER)
    current = vm.status.allocated
    if desired is None or current is None or pod.actual is None:
        return
    step, target = plan(current, pod, desired, config)
    if step is None:
        out.record(Owner.CONTROLLER, None)
        _settled(out, Owner.CONTROLLER, desired)
        return
    # Going straight to the guest: remember which pod view showed it covered (see _pod_step).
    pod_generation = pod.generation if step is Step.VMM else None
    record = _new_record(vm, step, desired, vm.status.phase, pod_generation)
    out.record(Owner.CONTROLLER, record)
    out.transition(_CAUSE_OF_STEP[step], f"resizing from {current} to {desired}")
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
            out.effect(ResizePod(target))


def _recover_status(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """``status.allocated`` or ``status.capacity`` was lost mid-resize (it did not parse,
    or someone cleared it): the VMM says what they are. Without ``allocated`` the pod step
    could never plan, and the webhook could not check updates against the ceilings."""
    if vm.status.allocated is None:
        current = _vmm_current(vmm)
        if current is not None:
            out.status.append(SetAllocated(current, owner=Owner.DAEMON))
    if vm.status.capacity is None and vmm.capacity is not None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))


def _daemon_steady(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """Keep status in line with the VMM while no resize runs."""
    settled = vmm.settled
    if settled is not None and settled != vm.status.allocated:
        out.status.append(SetAllocated(settled, owner=Owner.DAEMON))
    if vmm.capacity is not None and vm.status.capacity is None:
        out.status.append(SetCapacity(vmm.capacity, owner=Owner.DAEMON))
    if vm.status.phase is Phase.RUNNING and vmm.state is VmmState.PAUSED:
        out.transition(Cause.VMM_PAUSED)
    elif vm.status.phase is Phase.PAUSED and vmm.state is VmmState.RUNNING:
        out.transition(Cause.VMM_RESUMED)


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
    if desired is None:
        # Out of reach (or invalid) now: finish toward what was being applied, safely.
        if record is None:
            return
        desired = record.target
    return_phase = record.return_phase if record is not None else Phase.RUNNING
    # A 403 answers the patch a decision just sent, aimed at the target recorded then. If
    # the spec has moved on since, it says nothing about the new target: try that one.
    refused = pod.resize_refused if record is not None and record.target == desired else None
    if record is None or record.target != desired or record.generation != vm.generation:
        step = record.step if record is not None else Step.POD_GROW
        fresh_record = _new_record(vm, step, desired, return_phase)
        if record is not None and record.target == desired:
            fresh_record = evolve(record, generation=vm.generation)
        record = fresh_record
        out.record(Owner.CONTROLLER, record)
        vm = vm.evolve(status=evolve(vm.status, resize=record))

    stale = pod_stale(pod, record.pod_generation)
    if refused is not None:
        _infeasible(out, vm, pod, record, refused)
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
        return
    if (
        record.step in (Step.POD_GROW, Step.POD_SHRINK)
        and record.pod_generation is None
        and pod.desired is not None
        and pod.desired == _pod_target(record.step, current, desired, config)
    ):
        # Our patch is visible: remember its generation (older views now count as stale)
        # and announce it, before anything moves on, however fast the kubelet was.
        _patch_accepted(out, record, pod)
        return
    step, target = plan(current, pod, desired, config)
    kubelet_busy = (
        pod.resize_pending is not None
        or pod.resize_in_progress is not None
        or pod.legacy_resize_status is not None  # Proposed, InProgress, Deferred
    )
    if step is None and kubelet_busy:
        _pod_waiting(out, vm, pod, record)  # not done while the kubelet still works on it
        return
    if step is None:
        out.record(Owner.CONTROLLER, None)
        _settled(out, Owner.CONTROLLER, desired)
        out.transition(Cause.RESIZED, f"resized to {desired}")
        return
    if step is Step.VMM:
        # The daemon compares its own pod view with this generation: a view older than the
        # one that showed the pod covering the guest must not let the guest grow.
        out.record(
            Owner.CONTROLLER,
            evolve(
                record,
                step=Step.VMM,
                pod_generation=pod.generation,
                attempts=0,
                vmm_requested=False,
            ),
        )
        out.transition(Cause.NEEDS_VMM, f"pod holds {pod.actual}; resizing the guest to {desired}")
        return

    assert isinstance(target, Resources)
    if step is not record.step:
        record = evolve(record, step=step, pod_generation=None)
        out.record(Owner.CONTROLLER, record)
    if pod.desired != target:
        out.effect(ResizePod(target))
        if record.pod_generation is not None:
            out.record(Owner.CONTROLLER, evolve(record, pod_generation=None))
        return
    if record.pod_generation is None or record.pod_generation < pod.generation:
        _patch_accepted(out, record, pod)
        return
    _pod_waiting(out, vm, pod, record)


def _pod_target(
    step: Step, current: Allocation, desired: Allocation, config: KernelConfig
) -> Resources:
    if step is Step.POD_SHRINK:
        return pod_resources_for(desired, config)
    envelope = Allocation(max(current.vcpus, desired.vcpus), max(current.memory, desired.memory))
    return pod_resources_for(envelope, config)


def _patch_accepted(out: _Out, record: ResizeRecord, pod: PodView) -> None:
    out.record(Owner.CONTROLLER, evolve(record, pod_generation=pod.generation))
    out.event(
        Owner.CONTROLLER,
        EventType.NORMAL,
        Reasons.EV_POD_INITIATED,
        f"pod {pod.name} resize to {pod.desired} accepted (generation {pod.generation})",
    )


def _pod_waiting(out: _Out, vm: Vm, pod: PodView, record: ResizeRecord) -> None:
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
    else:
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
    out.record(
        Owner.CONTROLLER,
        evolve(record, step=Step.INFEASIBLE, generation=vm.generation, pod_generation=None),
    )
    out.condition(
        Owner.CONTROLLER,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.POD_RESIZE_INFEASIBLE,
        f"the node can never fit this resize; change the spec to retry: {message}",
    )
    out.transition(Cause.INFEASIBLE, message)


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
    current = _vmm_current(vmm)
    requested = vmm.requested
    if current is None or requested is None:
        return
    if requested != desired:
        step, _ = plan(current, pod, desired, config)
        if step is Step.POD_GROW:
            out.status.append(SetAllocated(current, owner=Owner.DAEMON))
            out.record(Owner.DAEMON, _new_record(vm, step, desired, record.return_phase))
            out.transition(Cause.NEEDS_POD_GROW, f"the spec grew to {desired}; growing the pod")
            return
        if record.target != desired or record.generation != vm.generation:
            record = evolve(
                record,
                vcpus=desired.vcpus,
                memory=desired.memory,
                generation=vm.generation,
                attempts=0,
                vmm_requested=False,
            )
        first_call = not record.vmm_requested
        out.record(Owner.DAEMON, evolve(record, vmm_requested=True))
        out.effect(
            ResizeVmm(
                vcpus=desired.vcpus if requested.vcpus != desired.vcpus else None,
                memory=desired.memory if requested.memory != desired.memory else None,
            )
        )
        if first_call:  # a retry (after a 429 or a 500) is not news
            out.event(
                Owner.DAEMON,
                EventType.NORMAL,
                Reasons.EV_VMM_INITIATED,
                f"asking the VMM for {desired} (it has {requested})",
            )
        out.requeue(Owner.DAEMON, config.vmm_poll_s)
        return
    if vmm.settled != desired:
        out.requeue(Owner.DAEMON, config.vmm_poll_s)  # the guest is still (un)plugging
        return
    out.status.append(SetAllocated(desired, owner=Owner.DAEMON))
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
                vcpus=desired.vcpus,
                memory=desired.memory,
            ),
        )
        out.transition(Cause.NEEDS_POD_SHRINK, f"guest now has {desired}; shrinking the pod")


def _vmm_step_unrecorded(out: _Out, vm: Vm, vmm: VmmView) -> None:
    """``status.resize`` was lost (it did not parse, or someone cleared it): nothing says
    which pod view showed the guest covered, so hand back to the controller, which checks
    the pod again before the guest moves. The guest's extent goes to ``allocated`` so the
    controller plans from what the guest may really hold."""
    current = _vmm_current(vmm)
    if current is None:
        return
    desired = _effective_desired(vm, out, Owner.DAEMON) or current
    out.status.append(SetAllocated(current, owner=Owner.DAEMON))
    back_to = Phase.PAUSED if vmm.state is VmmState.PAUSED else Phase.RUNNING
    out.record(Owner.DAEMON, _new_record(vm, Step.POD_GROW, desired, back_to))
    out.transition(Cause.NEEDS_POD_GROW, "status.resize was lost; checking the pod again")


def _vmm_call_failed(
    out: _Out, vm: Vm, record: ResizeRecord, vmm: VmmView, config: KernelConfig
) -> None:
    error = vmm.call_error
    assert error is not None
    if error.kind is VmmCallErrorKind.BUSY:
        # A vCPU removal is still pending in the guest: not a failure, just not yet.
        out.requeue(Owner.DAEMON, config.vmm_busy_retry_s)
        return
    attempts = record.attempts + 1
    out.record(Owner.DAEMON, evolve(record, attempts=attempts))
    out.condition(
        Owner.DAEMON,
        RESIZED,
        ConditionStatus.FALSE,
        Reasons.VM_RESIZE_FAILED,
        f"the VMM refused the resize (attempt {attempts}, retrying): {error.message}",
    )
    out.event(Owner.DAEMON, EventType.WARNING, Reasons.EV_VMM_FAILED, error.message)
    out.requeue(Owner.DAEMON, config.vmm_backoff(record.attempts))
