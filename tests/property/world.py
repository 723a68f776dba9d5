"""An in-memory world in which the real kernel runs a few VMs on nodes of limited size.

What is modelled
----------------
- The API server keeps every version of each VirtualMachine and each pod (the index in
  the history is the resourceVersion). A status write is conditional on the version it
  was decided from: a write based on an older version fails as a 409 would.
- The controller and one daemon per node are separate actors with their own caches. A
  cache lags (it may hold any version between the last one the actor saw and the
  newest) but never goes back, and an actor's own writes land in its cache at once, as
  with client-go informers plus ``observe_write``. An actor may decide twice on the same
  view (a duplicated observation). A restart empties the caches (the next list is fresh)
  and forgets the rest of the decision being carried out.
- Each actor carries out a decision the way the executors in ``apps/`` do: the merged
  status write first, then events, then side effects; a refused ``pods/resize`` (403) or
  ``vm.resize`` is fed straight back into a second decision. A decision is carried out
  one action at a time, so a restart can fall between any two.
- The kubelet (1.33+ conditions with ``observedGeneration``, or a kubelet before 1.33
  with ``status.resize`` and no ``observedGeneration``): a resize is admitted, deferred
  (it does not fit beside the other pods and other workloads, whose size changes),
  infeasible (it can never fit the node), and actuated later, unless a memory limit
  would drop below what the VMM process uses (reason ``Error``). Optionally a 1.36
  ``PodResizeValidator`` refuses an oversized ``pods/resize`` with 403 NodeCapacity.
- Cloud Hypervisor: the configuration changes when ``vm.resize`` is accepted; the guest
  plugs and unplugs memory later, in chunks; a removed vCPU stays until the guest ejects
  it, and meanwhile a vCPU count change is a 429; an identical ``desired_ram`` is a 500,
  and injected faults are 500s (the CPU part of a call sticks when the memory part fails).
  The VMM may report the plugged size in ``memory_actual_size`` (v52+) or echo the
  request there (v50). Guests may be unkind: never plug, never eject, or give back only
  so much memory. A ResourceQuota may refuse a pod resize (403, not NodeCapacity).
- Time: the world has a clock the decisions are given (``now``); settling moves it on,
  so a wait that cannot end ends at its deadline (RESIZE.md 4b).
- Users change specs at any moment, but only in ways the admission webhook accepts
  (``core.resources.validate_vm``), pause and resume VMs, and pods may die.

The seven invariants of RESIZE.md section 8 are the ``check_*`` functions below. Each
raises :class:`InvariantViolation` naming itself; ``tests/property/test_checks_bite.py``
shows that each one fails on a deliberately broken kernel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
from attrs import evolve

from core import (
    DEFAULT_CONFIG,
    RESIZED,
    UNOBSERVED_VMM,
    Action,
    AddFinalizer,
    Allocation,
    BootVmm,
    ConditionStatus,
    CreatePod,
    DeletePod,
    KernelConfig,
    Owner,
    Phase,
    PodPhase,
    PodResizeCondition,
    PodView,
    RecordEvent,
    RemoveFinalizer,
    Requeue,
    ResizePod,
    ResizeVmm,
    Resources,
    SetPhase,
    SetResizeTarget,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    apply_status,
    decide,
    pod_resources,
)
from core.actions import STATUS_ACTIONS
from core.constants import GUEST_MEMORY_ALIGNMENT, MILLICORES_PER_VCPU
from core.model import RESIZE_PHASES, STEADY_PHASES, TERMINAL_PHASES
from core.resources import validate_vm
from core.table import RETURN, TRANSITIONS

CONFIG = DEFAULT_CONFIG
OVERHEAD = CONFIG.pod_memory_overhead
# Rounds of the settling driver before a world that has not settled counts as stuck.
SETTLE_ROUNDS = 40
# Seconds of the world's clock per settling round: the longest deadline passes in a few.
SETTLE_ROUND_S = 20.0
SETTLE_ROUNDS_BEFORE_TIME = 10
# Pod resize requests one spec generation may cause (grow, shrink, and a restore, with
# room for a re-plan); an infeasible loop exceeds it within a few rounds.
MAX_POD_REQUESTS_PER_GENERATION = 6

# The phase graph as the contract draws it, frozen when this module is imported so that a
# kernel that rewrites the table at run time is still judged against the original.
_TABLE = dict(TRANSITIONS)


class InvariantViolation(AssertionError):
    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check


class KnownOpenFinding(InvariantViolation):
    """A violation with the signature of a finding that is known and still open (issue
    15, ADR 0016): a restart changed the outcome only for VMs that lost
    ``status.allocated`` on a VMM before v52, whose memory is recovered from the pod.
    The state machine reports it as XFAIL; every other violation fails the run."""


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@attrs.define
class Node:
    name: str
    cpu_millis: int
    memory: int
    legacy: bool = False  # a kubelet before 1.33: status.resize, no observedGeneration
    validator: bool = False  # 1.36 PodResizeValidator: a 403 for an oversized resize
    other_cpu: int = 0  # other workloads on the node
    other_memory: int = 0


@attrs.define
class Vmm:
    """One Cloud Hypervisor process (its API and its guest)."""

    reports_actual: bool
    rss: int  # memory the VMM process itself uses, below the overhead
    state: VmmState = VmmState.NOT_CREATED
    reachable: bool = True
    vcpus: int = 0
    max_vcpus: int = 0
    boot_memory: int = 0
    hotplug_size: int = 0
    requested: int = 0  # config.memory.size + hotplugged size
    plugged: int = 0  # what the guest has onlined
    removal_pending: bool = False
    faults: int = 0  # upcoming vm.resize calls that fail with 500
    # Unkind guests (REALITY.md 1): how much more memory the guest can give back (None:
    # all of it), whether its virtio-mem driver plugs at all, whether it ejects vCPUs.
    unplug_limit: int | None = None
    plugs: bool = True
    ejects: bool = True
    running_vcpus: int = 0  # vCPU threads alive (more than ``vcpus`` while a removal waits)

    def view(self) -> VmmView:
        if not self.reachable:
            return VmmView(VmmState.UNREACHABLE, detail="connection refused")
        if self.state is VmmState.NOT_CREATED:
            return VmmView(VmmState.NOT_CREATED)
        return VmmView(
            self.state,
            vcpus=self.vcpus,
            max_vcpus=self.max_vcpus,
            boot_memory=self.boot_memory,
            hotplug_size=self.hotplug_size,
            requested_memory=self.requested,
            # Before v52 memory_actual_size echoes the request (REALITY.md 1).
            actual_memory=self.plugged if self.reports_actual else self.requested,
            version="v53.0" if self.reports_actual else "v50.0",
        )

    @property
    def guest_memory(self) -> int:
        """The most memory the guest may touch now (unplugging is not instantaneous)."""
        return max(self.requested, self.plugged)

    def boot(self, action: BootVmm) -> None:
        self.state = VmmState.RUNNING
        self.vcpus, self.max_vcpus = action.boot_vcpus, action.max_vcpus
        self.boot_memory, self.hotplug_size = action.memory, action.hotplug_size
        self.requested = self.plugged = action.memory
        self.running_vcpus = action.boot_vcpus

    def resize(self, vcpus: int | None, memory: int | None) -> VmmCallError | None:
        if not self.reachable or self.state not in (VmmState.RUNNING, VmmState.PAUSED):
            return VmmCallError(VmmCallErrorKind.FAILED, "VM is not running")
        if vcpus is not None and self.removal_pending:
            # Every vCPU request while a removal is pending, the same count included.
            return VmmCallError(VmmCallErrorKind.BUSY, "vCPU removal still pending")
        if vcpus is not None and vcpus != self.vcpus:
            if not 1 <= vcpus <= self.max_vcpus:
                return VmmCallError(VmmCallErrorKind.FAILED, f"invalid vCPU count {vcpus}")
            if self.faults and memory is None:
                self.faults -= 1
                return VmmCallError(VmmCallErrorKind.FAILED, "failed to resize vCPUs")
            self.removal_pending = vcpus < self.running_vcpus
            self.vcpus = vcpus  # sticks even if the memory part fails below
            if vcpus > self.running_vcpus:
                self.running_vcpus = vcpus
        if memory is not None:
            if self.faults:
                self.faults -= 1
                return VmmCallError(VmmCallErrorKind.FAILED, "virtio-mem: resize failed")
            region = memory - self.boot_memory
            if memory == self.requested:
                return VmmCallError(VmmCallErrorKind.FAILED, "virtio-mem: identical size")
            if not 0 <= region <= self.hotplug_size or region % GUEST_MEMORY_ALIGNMENT:
                return VmmCallError(VmmCallErrorKind.FAILED, f"invalid memory size {memory}")
            # The guest (un)plugs later, whatever the version: before v52 the VMM just
            # cannot say how far it got (memory_actual_size echoes the request).
            self.requested = memory
        return None

    def guest_step(self, chunk: int | None, eject: bool = True) -> bool:
        """The guest (un)plugs up to ``chunk`` bytes (``None``: everything) and, if
        ``eject``, ejects a removed vCPU; a paused guest does nothing. True if anything
        changed."""
        if self.state is VmmState.PAUSED:
            return False
        eject = eject and self.ejects
        changed = self.removal_pending and eject
        if changed:
            self.running_vcpus = self.vcpus
        self.removal_pending = self.removal_pending and not eject
        gap = self.requested - self.plugged if self.plugs else 0
        if gap < 0 and self.unplug_limit is not None:
            gap = -min(-gap, self.unplug_limit)
        if gap:
            step = abs(gap) if chunk is None else min(abs(gap), chunk)
            self.plugged += step if gap > 0 else -step
            if gap < 0 and self.unplug_limit is not None:
                self.unplug_limit -= step
            changed = True
        return changed

    @property
    def settled(self) -> bool:
        """Nothing left for the guest to do (or nothing it can do: it is paused)."""
        paused = self.state is VmmState.PAUSED
        stuck = not (self.plugs and self.ejects) or self.unplug_limit is not None
        return paused or stuck or (not self.removal_pending and self.plugged == self.requested)

    @property
    def unkind(self) -> bool:
        return not (self.plugs and self.ejects) or self.unplug_limit is not None


@attrs.define
class Slot:
    """One VM: the histories of its API objects, what the kubelet admitted, its VMM."""

    name: str
    node: Node
    rss: int
    reports_actual: bool
    vms: list[Vm]
    pods: list[PodView | None] = attrs.Factory(lambda: [None])
    admitted: Resources | None = None  # the kubelet's allocated resources
    vmm: Vmm | None = None
    # bookkeeping for the checks
    pod_requests: Counter[int] = attrs.Factory(Counter)  # per VM generation
    infeasible_generation: int | None = None  # the generation refused as infeasible
    dead: bool = False
    # A ResourceQuota: a pods/resize asking more memory than this is a 403 (not
    # NodeCapacity), which no retry fixes.
    quota: int | None = None
    # status.allocated was lost while the VMM could not report plugged memory (< v52).
    lost_allocated_pre_v52: bool = False

    @property
    def vm(self) -> Vm:
        return self.vms[-1]

    @property
    def pod(self) -> PodView | None:
        return self.pods[-1]

    def write_pod(self, pod: PodView | None) -> None:
        if pod != self.pod:
            self.pods.append(pod)

    def clone(self, nodes: dict[str, Node]) -> Slot:
        return evolve(
            self,
            node=nodes[self.node.name],
            vms=list(self.vms),
            pods=list(self.pods),
            vmm=evolve(self.vmm) if self.vmm is not None else None,
            pod_requests=Counter(self.pod_requests),
        )


@attrs.frozen
class Task:
    """One action of a decision still to be carried out, with the views it came from."""

    actions: tuple[Action, ...]  # the whole decision (the status write merges them)
    action: Action | None  # None: the merged status write
    name: str
    vm_version: int
    vmm_view: VmmView


@attrs.define
class Actor:
    owner: Owner
    node: str | None  # a daemon serves one node
    vm_seen: dict[str, int] = attrs.Factory(dict)
    pod_seen: dict[str, int] = attrs.Factory(dict)
    queue: list[Task] = attrs.Factory(list)

    def clone(self) -> Actor:
        return evolve(
            self, vm_seen=dict(self.vm_seen), pod_seen=dict(self.pod_seen), queue=list(self.queue)
        )


@attrs.define
class Stats:
    decisions: int = 0
    stale_decisions: int = 0
    conflicts: int = 0
    refusals: int = 0
    vmm_busy: int = 0
    vmm_failed: int = 0
    infeasible: int = 0
    deferred: int = 0
    restarts: int = 0
    completed: int = 0

    def clone(self) -> Stats:
        return evolve(self)


# ---------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------


@attrs.define
class World:
    nodes: dict[str, Node]
    slots: dict[str, Slot]
    controller: Actor
    daemons: dict[str, Actor]
    config: KernelConfig = CONFIG
    accommodating: bool = False  # the kubelet defers nothing (settling)
    stats: Stats = attrs.Factory(Stats)
    # The decisions' clock (seconds): deadlines (RESIZE.md 4b) pass as it moves on.
    now: float = 1_000_000.0

    @classmethod
    def create(
        cls,
        nodes: list[Node],
        vms: list[tuple[str, str, VmSpec, bool, int]],
    ) -> World:
        """``vms``: (name, node, spec, VMM reports memory_actual_size, VMM rss)."""
        by_name = {n.name: n for n in nodes}
        slots = {}
        for name, node, spec, reports_actual, rss in vms:
            vm = Vm("default", name, uid=f"uid-{name}", generation=1, spec=spec)
            slots[name] = Slot(name, by_name[node], rss, reports_actual, [vm])
        return cls(
            nodes=by_name,
            slots=slots,
            controller=Actor(Owner.CONTROLLER, None),
            daemons={n.name: Actor(Owner.DAEMON, n.name) for n in nodes},
        )

    def clone(self) -> World:
        nodes = {name: evolve(node) for name, node in self.nodes.items()}
        return evolve(
            self,
            nodes=nodes,
            slots={name: slot.clone(nodes) for name, slot in self.slots.items()},
            controller=self.controller.clone(),
            daemons={name: d.clone() for name, d in self.daemons.items()},
            stats=self.stats.clone(),
        )

    def actors(self) -> Iterator[Actor]:
        yield self.controller
        yield from self.daemons.values()

    def serves(self, actor: Actor, slot: Slot) -> bool:
        return actor.node is None or actor.node == slot.node.name

    # --- the user -----------------------------------------------------------------------

    def set_spec(self, name: str, vcpus: int, memory: int, *, before_boot: bool = False) -> bool:
        """A spec update, if the admission webhook accepts it (``before_boot``: one made
        while the VM's pod exists but its VMM has not booted yet)."""
        slot = self.slots[name]
        old = slot.vm
        booted = old.status.capacity is not None
        if old.spec is None or slot.dead or booted == before_boot:
            return False
        spec = evolve(old.spec, sockets=1, cores_per_socket=vcpus, memory=memory)
        if spec == old.spec:
            return False
        new = old.evolve(spec=spec, generation=old.generation + 1)
        if validate_vm(new, old):
            return False
        slot.vms.append(new)
        return True

    def bump_generation(self, name: str) -> None:
        """A user re-applies the spec (a new generation, the same numbers)."""
        slot = self.slots[name]
        slot.vms.append(slot.vm.evolve(generation=slot.vm.generation + 1))

    def lose_status(self, name: str, field: str) -> None:
        """Part of the VM's status no longer parses (core.wire drops it)."""
        slot = self.slots[name]
        status = slot.vm.status
        if getattr(status, field) is not None:
            slot.vms.append(slot.vm.evolve(status=evolve(status, **{field: None})))
            if field == "allocated" and slot.vmm is not None and not slot.vmm.reports_actual:
                slot.lost_allocated_pre_v52 = True
        if field == "resize":
            # The kernel's memory of this generation is gone (an Infeasible verdict with
            # it): trying once more is all it can do, and the count starts afresh.
            slot.infeasible_generation = None
            slot.pod_requests[slot.vm.generation] = 0

    def pause(self, name: str, paused: bool) -> None:
        vmm = self.slots[name].vmm
        if vmm is not None and vmm.state in (VmmState.RUNNING, VmmState.PAUSED):
            vmm.state = VmmState.PAUSED if paused else VmmState.RUNNING

    def kill_pod(self, name: str, deleted: bool) -> None:
        slot = self.slots[name]
        pod = slot.pod
        if pod is None:
            return
        slot.write_pod(None if deleted else evolve(pod, phase=PodPhase.FAILED))
        slot.vmm = None
        slot.dead = True

    # --- the kubelet --------------------------------------------------------------------

    def kubelet(self, name: str) -> bool:
        """One sync of the kubelet for this VM's pod. True if it changed anything."""
        slot = self.slots[name]
        pod = slot.pod
        if pod is None or pod.phase in (PodPhase.SUCCEEDED, PodPhase.FAILED):
            return False
        if pod.phase is PodPhase.PENDING:
            slot.admitted = pod.desired
            slot.vmm = Vmm(slot.reports_actual, slot.rss)
            observed = None if slot.node.legacy else pod.generation
            slot.write_pod(
                evolve(
                    pod, phase=PodPhase.RUNNING, actual=pod.desired, observed_generation=observed
                )
            )
            return True
        new, admitted = self._sync(slot, pod, count=True)
        changed = new != pod or admitted != slot.admitted
        slot.admitted = admitted
        slot.write_pod(new)
        return changed

    def kubelet_busy(self, name: str) -> bool:
        """Would a kubelet sync change anything?"""
        slot = self.slots[name]
        pod = slot.pod
        if pod is None or pod.phase in (PodPhase.SUCCEEDED, PodPhase.FAILED):
            return False
        if pod.phase is PodPhase.PENDING:
            return True
        new, admitted = self._sync(slot, pod, count=False)
        return new != pod or admitted != slot.admitted

    def _sync(self, slot: Slot, pod: PodView, *, count: bool) -> tuple[PodView, Resources | None]:
        """The pod status and the admitted resources after one sync (KEP-1287: desired ->
        admitted -> actuated, one stage per sync)."""
        assert pod.desired is not None and pod.actual is not None
        pending = progress = None
        admitted = slot.admitted
        actual = pod.actual
        if pod.desired != admitted:
            verdict, message = self._admit(slot, pod.desired, count=count)
            if verdict == "ok":
                admitted = pod.desired
                progress = PodResizeCondition(None, "", pod.generation)
            else:
                pending = PodResizeCondition(verdict, message, pod.generation)
        if admitted != actual and progress is None:  # admitted on an earlier sync
            assert admitted is not None
            usage = (slot.vmm.guest_memory + slot.vmm.rss) if slot.vmm is not None else 0
            if admitted.memory < actual.memory and admitted.memory < usage:
                progress = PodResizeCondition(
                    "Error",
                    f"memory limit ({admitted.memory}) below usage ({usage})",
                    pod.generation,
                )
            else:
                actual = admitted
        if slot.node.legacy:
            legacy = None
            if pending is not None:
                legacy = pending.reason
            elif progress is not None:
                legacy = "InProgress"
            return evolve(pod, actual=actual, legacy_resize_status=legacy), admitted
        new = evolve(
            pod,
            actual=actual,
            observed_generation=pod.generation,
            resize_pending=pending,
            resize_in_progress=progress,
        )
        return new, admitted

    def _admit(self, slot: Slot, want: Resources, *, count: bool) -> tuple[str, str]:
        node = slot.node
        for resource, asked, capacity in (
            ("cpu", want.cpu_millis, node.cpu_millis),
            ("memory", want.memory, node.memory),
        ):
            if asked > capacity:
                self.stats.infeasible += count
                return "Infeasible", (
                    f"Node didn't have enough capacity: {resource}, requested: {asked}, "
                    f"capacity: {capacity}"
                )
        if self.accommodating:
            return "ok", ""
        others = [
            s.admitted
            for s in self.slots.values()
            if s is not slot and s.node is node and s.admitted is not None and not s.dead
        ]
        for resource, asked, used, capacity in (
            (
                "cpu",
                want.cpu_millis,
                node.other_cpu + sum(r.cpu_millis for r in others),
                node.cpu_millis,
            ),
            ("memory", want.memory, node.other_memory + sum(r.memory for r in others), node.memory),
        ):
            if asked + used > capacity:
                self.stats.deferred += count
                return "Deferred", (
                    f"Node didn't have enough resource: {resource}, requested: {asked}, "
                    f"used: {used}, capacity: {capacity}"
                )
        return "ok", ""

    # --- the guest ----------------------------------------------------------------------

    def guest(self, name: str, chunk: int | None, eject: bool = True) -> bool:
        vmm = self.slots[name].vmm
        changed = vmm is not None and vmm.guest_step(chunk, eject)
        check_pod_limit_covers_guest(self)
        return changed

    # --- the actors ---------------------------------------------------------------------

    def restart(self, actor: Actor) -> None:
        actor.queue.clear()
        actor.vm_seen.clear()
        actor.pod_seen.clear()
        self.stats.restarts += 1

    def refresh(self, actor: Actor, name: str, vm: float = 1.0, pod: float | None = None) -> None:
        """Let the actor's VM and pod caches catch up that fraction of the way to the
        newest versions (the pod cache as far as the VM cache unless told otherwise)."""
        slot = self.slots[name]
        for seen, history, fraction in (
            (actor.vm_seen, slot.vms, vm),
            (actor.pod_seen, slot.pods, vm if pod is None else pod),
        ):
            latest = len(history) - 1
            now = seen.get(name, latest)
            seen[name] = now + round((latest - now) * fraction)

    def turn(self, name: str, *, eject: bool = True) -> None:
        """One turn of everyone for this VM on fresh views: the kubelet syncs twice, the
        guest settles, the controller and the VM's daemon each decide and carry out."""
        slot = self.slots[name]
        self.kubelet(name)
        self.kubelet(name)
        self.guest(name, None, eject)
        for actor in (self.controller, self.daemons[slot.node.name]):
            self.refresh(actor, name)
            self._decide(actor, name)
            self.finish(actor)
        check_state(self)

    def view(self, actor: Actor, name: str) -> tuple[int, Vm, PodView | None]:
        slot = self.slots[name]
        actor.vm_seen.setdefault(name, len(slot.vms) - 1)
        actor.pod_seen.setdefault(name, len(slot.pods) - 1)
        index = actor.vm_seen[name]
        return index, slot.vms[index], slot.pods[actor.pod_seen[name]]

    def act(self, actor: Actor, name: str) -> bool:
        """Carry out the next action of the actor's current decision, or decide anew
        (on whatever its caches hold) and carry out the first. True if anything happened."""
        if not actor.queue:
            slot = self.slots[name]
            if not self.serves(actor, slot):
                return False
            self._decide(actor, name)
            if not actor.queue:
                return False
        self._carry_out(actor, actor.queue.pop(0))
        return True

    def finish(self, actor: Actor) -> None:
        while actor.queue:
            self._carry_out(actor, actor.queue.pop(0))

    def _decide(
        self,
        actor: Actor,
        name: str,
        *,
        refused: str | None = None,
        call_error: VmmCallError | None = None,
        vmm_view: VmmView | None = None,
    ) -> None:
        slot = self.slots[name]
        index, vm, pod = self.view(actor, name)
        if actor.owner is Owner.CONTROLLER:
            vmm = UNOBSERVED_VMM
        elif vmm_view is not None:
            vmm = vmm_view
        else:
            vmm = slot.vmm.view() if slot.vmm is not None else VmmView(VmmState.UNREACHABLE)
        if refused is not None and refused.startswith("forbidden:"):
            assert pod is not None
            pod = evolve(pod, resize_forbidden=refused)
        elif refused is not None:
            assert pod is not None
            pod = evolve(pod, resize_refused=refused)
        if call_error is not None:
            vmm = evolve(vmm, call_error=call_error)
        self.stats.decisions += 1
        if index != len(slot.vms) - 1 or pod is not slot.pod:
            self.stats.stale_decisions += 1
        actions = decide(vm, pod, vmm, self.config, self.now, owner=actor.owner)
        steps = [Task(actions, None, name, index, vmm)]
        steps += [
            Task(actions, a, name, index, vmm)
            for a in actions
            if not isinstance(a, (*STATUS_ACTIONS, Requeue))
        ]
        if call_error is not None:
            # The daemon's _call_failed carries out status and events only.
            steps = [s for s in steps if s.action is None or isinstance(s.action, RecordEvent)]
        actor.queue[:0] = steps

    def _carry_out(self, actor: Actor, step: Task) -> None:
        slot = self.slots[step.name]
        action = step.action
        if action is None:
            if not self._write_status(actor, slot, step):
                # 409: the executor re-reads and re-decides; nothing else of it happens.
                actor.queue = [s for s in actor.queue if s.actions is not step.actions]
            return
        if isinstance(action, RecordEvent):
            return  # events are looked at per decision (check_phase_moves_in_table)
        if isinstance(action, ResizePod):
            self._resize_pod(actor, slot, action)
        elif isinstance(action, ResizeVmm):
            self._resize_vmm(actor, slot, step, action)
        elif isinstance(action, BootVmm):
            if slot.vmm is not None and slot.vmm.state is VmmState.NOT_CREATED:
                slot.vmm.boot(action)
        elif isinstance(action, CreatePod):
            if slot.pod is None and not slot.dead:
                vm = slot.vm
                slot.write_pod(
                    PodView(
                        f"{vm.name}-pod",
                        node_name=slot.node.name,
                        desired=action.resources,
                        actual=None,
                    )
                )
                actor.pod_seen[slot.name] = len(slot.pods) - 1
        elif isinstance(action, (AddFinalizer, RemoveFinalizer, DeletePod)):
            raise AssertionError(f"unexpected {action!r}: the world never deletes VMs")

    def _write_status(self, actor: Actor, slot: Slot, step: Task) -> bool:
        old = slot.vms[step.vm_version]
        status_actions = tuple(a for a in step.actions if isinstance(a, STATUS_ACTIONS))
        new_status = apply_status(old.status, status_actions) if status_actions else old.status
        if new_status == old.status:
            return True  # the executor writes only what differs
        if step.vm_version != len(slot.vms) - 1:
            self.stats.conflicts += 1
            return False
        check_phase_moves_in_table(old, step.actions)
        record = new_status.resize
        if (
            record is not None
            and record.step is Step.INFEASIBLE
            and (old.status.resize is None or old.status.resize.step is not Step.INFEASIBLE)
        ):
            slot.infeasible_generation = record.generation
        if old.status.phase in RESIZE_PHASES and new_status.phase in STEADY_PHASES:
            self.stats.completed += 1
        slot.vms.append(old.evolve(status=new_status))
        actor.vm_seen[slot.name] = len(slot.vms) - 1
        return True

    def _resize_pod(self, actor: Actor, slot: Slot, action: ResizePod) -> None:
        pod = slot.pod
        if pod is None:
            return  # 404
        check_effects_safe_against_truth(slot, action)
        node = slot.node
        target = action.resources
        if pod.desired != target:
            # A request refused with a 403 is a request all the same.
            check_infeasible_bounded(slot, action)
            slot.pod_requests[slot.vm.generation] += 1
        if node.validator and (target.memory > node.memory or target.cpu_millis > node.cpu_millis):
            self.stats.refusals += 1
            message = (
                f'pods "{pod.name}" is forbidden: Node didn\'t have enough capacity '
                f"(NodeCapacity): memory, requested: {target.memory}, capacity: {node.memory}"
            )
            self._decide(actor, slot.name, refused=message)
            return
        grows = pod.desired is None or target.memory > pod.desired.memory
        if slot.quota is not None and target.memory > slot.quota and grows:
            # A quota refuses an increase beyond it; a decrease is always admitted.
            self.stats.refusals += 1
            message = f"forbidden: exceeded quota: memory, requested: {target.memory}"
            self._decide(actor, slot.name, refused=message)
            return
        if pod.desired != target:
            patched = evolve(pod, desired=target, generation=pod.generation + 1)
            if node.legacy:  # before 1.33 the API server marked every resize Proposed
                patched = evolve(patched, legacy_resize_status="Proposed")
            slot.write_pod(patched)
        actor.pod_seen[slot.name] = len(slot.pods) - 1

    def _resize_vmm(self, actor: Actor, slot: Slot, step: Task, action: ResizeVmm) -> None:
        vmm = slot.vmm
        check_vmm_within_pod(slot, action)
        check_effects_safe_against_truth(slot, action)
        error = (
            vmm.resize(action.vcpus, action.memory)
            if vmm is not None
            else VmmCallError(VmmCallErrorKind.FAILED, "no VMM")
        )
        if error is None:
            if action.probe:
                # 204 to the count already configured: the daemon tells the kernel.
                self._decide(actor, slot.name, vmm_view=evolve(step.vmm_view, probe_ok=True))
            return
        if error.kind is VmmCallErrorKind.BUSY:
            self.stats.vmm_busy += 1
        else:
            self.stats.vmm_failed += 1
        self._decide(actor, slot.name, call_error=error, vmm_view=step.vmm_view)

    # --- settling -----------------------------------------------------------------------

    def quiet(self) -> bool:
        """Nothing left for anyone to do (requeue hints aside)."""
        if any(a.queue for a in self.actors()):
            return False
        for name, slot in self.slots.items():
            if slot.vmm is not None and not slot.vmm.settled:
                return False
            if slot.vm.status.phase in RESIZE_PHASES and not slot.dead:
                return False  # waiting is not settled: it ends, at the latest at a deadline
            if self.kubelet_busy(name):
                return False
            pod = slot.pod
            vmm = slot.vmm.view() if slot.vmm is not None else VmmView(VmmState.UNREACHABLE)
            for owner, view in ((Owner.CONTROLLER, UNOBSERVED_VMM), (Owner.DAEMON, vmm)):
                acts = decide(slot.vm, pod, view, self.config, self.now, owner=owner)
                if any(not isinstance(a, Requeue) and not _idle_probe(slot, a) for a in acts):
                    return False
        return True

    def settle(self, rounds: int = SETTLE_ROUNDS) -> bool:
        """User changes stop, the kubelet accommodates, every process catches up and works
        in a fixed order. True once nothing is left to do."""
        self.accommodating = True
        try:
            return self._settle(rounds)
        finally:
            self.accommodating = False

    def _settle(self, rounds: int) -> bool:
        for node in self.nodes.values():
            node.other_cpu = node.other_memory = 0
        for slot in self.slots.values():
            if slot.vmm is not None:
                slot.vmm.reachable = True
        for actor in self.actors():
            self.finish(actor)
        for round_ in range(rounds):
            # Time passes while settling, once everything that can finish has had rounds
            # to: a wait that cannot end ends at its deadline.
            if round_ >= SETTLE_ROUNDS_BEFORE_TIME:
                self.now += SETTLE_ROUND_S
            for name in self.slots:
                for _ in range(3):
                    if not self.kubelet(name):
                        break
                self.guest(name, None)
            for actor in self.actors():
                for name, slot in self.slots.items():
                    if self.serves(actor, slot):
                        self.refresh(actor, name)
                        self._decide(actor, name)
                        self.finish(actor)
                        check_pod_limit_covers_guest(self)
            if self.quiet():
                return True
        return False

    def outcome(self) -> dict[str, tuple[Any, ...]]:
        """Everything a user could see once the world is quiet (but events).

        Some of it depends on timing rather than on decisions, and is reduced to what the
        contract promises: a VM whose pod died ends, that is all (a resize step may have
        raced the death); a VM whose newest spec was infeasible keeps whatever it had
        when that spec arrived (an earlier step may or may not have landed by then), with
        its pod put back to what it actually has, covering the guest."""
        result: dict[str, tuple[Any, ...]] = {}
        for name, slot in self.slots.items():
            status = slot.vm.status
            record = status.resize
            pod, vmm = slot.pod, slot.vmm
            conditions = tuple(sorted((c.type, c.status, c.reason) for c in status.conditions))
            if slot.dead:
                result[name] = (status.phase,)
            elif record is not None and record.step is Step.INFEASIBLE:
                agrees = (
                    pod is not None
                    and vmm is not None
                    and pod.actual is not None
                    and pod.desired == pod.actual
                    and status.allocated == Allocation(vmm.vcpus, vmm.requested)
                    and pod.actual.memory >= vmm.guest_memory + OVERHEAD
                )
                result[name] = (
                    status.phase,
                    status.capacity,
                    evolve(record, started_at=None),
                    conditions,
                    # What a user sees of the pod, not how many patches it took there.
                    "put back, consistent"
                    if agrees
                    else (
                        (pod.phase, pod.desired, pod.actual) if pod is not None else None,
                        vmm,
                        status.allocated,
                    ),
                )
            else:
                result[name] = (
                    status.phase,
                    status.allocated,
                    status.capacity,
                    evolve(record, started_at=None) if record is not None else None,
                    conditions,
                    (pod.phase, pod.desired, pod.actual) if pod is not None else None,
                    (vmm.state, vmm.vcpus, vmm.requested, vmm.plugged) if vmm is not None else None,
                )
        return result


# ---------------------------------------------------------------------------------------
# The invariants of RESIZE.md section 8
# ---------------------------------------------------------------------------------------


def check_pod_limit_covers_guest(world: World) -> None:
    """(1) The cgroup limit the kubelet enforces (its *actual* resources, not the spec)
    is at least the guest's memory plus the VMM overhead, at every step."""
    for slot in world.slots.values():
        pod, vmm = slot.pod, slot.vmm
        if pod is None or pod.actual is None or vmm is None or vmm.state is VmmState.NOT_CREATED:
            continue
        if pod.actual.memory < vmm.guest_memory + OVERHEAD:
            raise InvariantViolation(
                "pod_limit_covers_guest",
                f"{slot.name}: pod limit {pod.actual.memory} < guest {vmm.guest_memory} "
                f"+ overhead {OVERHEAD}",
            )


def check_vmm_within_pod(slot: Slot, action: ResizeVmm | None = None) -> None:
    """(2) The VMM is never asked for more than the pod has been granted; with no action,
    what the VMM has been asked so far still fits the pod."""
    problem = _vmm_beyond_pod(slot, action)
    if problem:
        raise InvariantViolation("vmm_within_pod", problem)


def _vmm_beyond_pod(slot: Slot, action: ResizeVmm | None) -> str | None:
    pod, vmm = slot.pod, slot.vmm
    if pod is None or pod.actual is None or vmm is None or vmm.state is VmmState.NOT_CREATED:
        return None
    vcpus, memory = vmm.vcpus, vmm.requested
    if action is not None:
        vcpus = action.vcpus if action.vcpus is not None else vcpus
        memory = action.memory if action.memory is not None else memory
    if vcpus * MILLICORES_PER_VCPU > pod.actual.cpu_millis or memory + OVERHEAD > pod.actual.memory:
        return (
            f"{slot.name}: VMM {'asked for' if action else 'holds'} {vcpus} vCPUs, "
            f"{memory} bytes; the pod was granted {pod.actual}"
        )
    return None


def check_phase_moves_in_table(old: Vm, actions: tuple[Action, ...]) -> None:
    """(3) A committed phase change is a move of the table from the phase it was decided
    in (a return goes where the resize started), announced in the same decision."""
    for action in actions:
        if not isinstance(action, SetPhase) or action.phase is old.status.phase:
            continue
        moves = [(cause, mv) for (phase, cause), mv in _TABLE.items() if phase == old.status.phase]
        record = old.status.resize
        back_to = record.return_phase if record is not None else Phase.RUNNING
        # The daemon moves the return phase with the VMM (a resume mid-resize) in the
        # same decision that returns (RESIZE.md 4).
        backs = {back_to} | {
            a.record.return_phase
            for a in actions
            if isinstance(a, SetResizeTarget) and a.record is not None
        }
        fitting = [
            mv
            for _, mv in moves
            if mv.to == action.phase or (mv.to == RETURN and action.phase in backs)
        ]
        if not fitting:
            raise InvariantViolation(
                "phase_moves_in_table",
                f"{old.name}: {old.status.phase} -> {action.phase} is not a move of the table"
                + (f" (the resize started {back_to})" if old.status.phase in RESIZE_PHASES else ""),
            )
        reasons = {a.reason for a in actions if isinstance(a, RecordEvent)}
        if not any(mv.reason in reasons for mv in fitting):
            raise InvariantViolation(
                "phase_moves_in_table",
                f"{old.name}: entered {action.phase} without its event "
                f"{[mv.reason for mv in fitting]}",
            )


def settle_resuming(world: World, resume_all: bool = False) -> bool:
    """Settle; then resume the paused VMs whose resize waits on their guest (or, with
    ``resume_all``, every paused VM), and settle again. A paused guest cannot give memory
    back or eject a vCPU (and until it ejects one, Cloud Hypervisor refuses any other vCPU
    count with a 429): such a resize waits, rightly, in ResizeInProgress. Once its user
    resumes it, it must finish."""
    settled = world.settle()
    waiting = [
        slot
        for slot in world.slots.values()
        if slot.vmm is not None
        and slot.vmm.state is VmmState.PAUSED
        and (
            resume_all
            or (
                (slot.vmm.plugged > slot.vmm.requested or slot.vmm.removal_pending)
                and slot.vm.status.phase is Phase.RESIZE_IN_PROGRESS
            )
        )
    ]
    if waiting:
        for slot in waiting:
            world.pause(slot.name, False)
        settled = world.settle()
    return settled


def check_converges(world: World) -> None:
    """(4) Once user changes stop and the kubelet accommodates, every VM settles within a
    bounded number of rounds in a steady phase matching its VMM, with allocated ==
    desired, or (for a generation the node could never fit) with its pod put back."""
    settled = settle_resuming(world)
    if not settled:
        stuck = {
            n: (s.vm.status.phase, s.vm.status.resize, s.pod, s.vmm) for n, s in world.slots.items()
        }
        raise InvariantViolation("converges", f"not settled after {SETTLE_ROUNDS} rounds: {stuck}")
    for name, slot in world.slots.items():
        problem = _outcome_problem(slot)
        if problem:
            raise InvariantViolation("converges", f"{name}: {problem}")
    check_allocated_truthful(world)


def _outcome_problem(slot: Slot) -> str | None:
    vm, pod, vmm = slot.vm, slot.pod, slot.vmm
    status = vm.status
    if slot.dead:
        return None if status.phase in TERMINAL_PHASES else f"pod died, VM is {status.phase}"
    assert vm.spec is not None and pod is not None and vmm is not None
    steady = Phase.PAUSED if vmm.state is VmmState.PAUSED else Phase.RUNNING
    if status.phase is not steady:
        return f"phase {status.phase}, VMM {vmm.state}"
    resized = status.condition(RESIZED)
    record = status.resize
    if record is not None and record.step is Step.STALLED:
        # A guest that did not (or a VMM that cannot say): settled, saying why.
        if record.generation != vm.generation:
            return f"stalled record of generation {record.generation} outlived it"
        if resized is None or resized.reason not in STALL_REASONS:
            return f"stalled resize without its condition: {resized}"
        return None
    if (
        record is not None
        and record.step is Step.INFEASIBLE
        and resized is not None
        and resized.reason in ("PodResizeForbidden", "KubeletResizeStuck")
    ):
        if record.generation != vm.generation:
            return f"refused record of generation {record.generation} outlived it"
        return None
    if record is not None and record.step is Step.INFEASIBLE:
        if record.generation != vm.generation:
            return f"infeasible record of generation {record.generation} outlived it"
        if pod.desired != pod.actual:
            return f"infeasible resize left the pod at {pod.desired}, it has {pod.actual}"
        if resized is None or resized.reason != "PodResizeInfeasible":
            return f"infeasible resize without its condition: {resized}"
        return None
    desired = vm.spec.desired
    want = pod_resources(vm.spec, CONFIG)
    if status.allocated != desired or (vmm.vcpus, vmm.requested) != (desired.vcpus, desired.memory):
        return f"allocated {status.allocated}, VMM {vmm.vcpus}/{vmm.requested}, wanted {desired}"
    if pod.desired != want or pod.actual != want:
        return f"pod {pod.desired}/{pod.actual}, wanted {want}"
    if record is not None:
        return f"resize record left behind: {record}"
    if resized is None or resized.status is not ConditionStatus.TRUE:
        return f"Resized condition {resized}"
    return None


def check_infeasible_bounded(slot: Slot, action: ResizePod) -> None:
    """(5) A spec generation refused as infeasible causes no further pod resize request
    but putting the pod back (to what it has, or had: the controller's view of "what it
    actually has" may lag), and no generation causes more than a few requests."""
    generation = slot.vm.generation
    put_back = any(p is not None and p.actual == action.resources for p in slot.pods)
    if slot.infeasible_generation == generation and not put_back:
        raise InvariantViolation(
            "infeasible_bounded",
            f"{slot.name}: generation {generation} was infeasible, yet the pod is asked for "
            f"{action.resources}",
        )
    if slot.pod_requests[generation] >= MAX_POD_REQUESTS_PER_GENERATION:
        raise InvariantViolation(
            "infeasible_bounded",
            f"{slot.name}: generation {generation} asked the pod to resize "
            f"{slot.pod_requests[generation] + 1} times",
        )


def _idle_probe(slot: Slot, action: object) -> bool:
    """A vCPU probe the VMM would answer 429 (the guest still has not ejected): it looks,
    and changes nothing, like a vm.info. The daemon makes one per look at a VM whose
    guest may run more vCPUs than configured, however long the guest takes."""
    return (
        isinstance(action, ResizeVmm)
        and action.probe
        and slot.vmm is not None
        and slot.vmm.removal_pending
    )


def check_restart_changes_no_outcome(world: World, actor_index: int) -> None:
    """(6) Restarting a process between two actions of a decision changes no outcome: the
    world where it restarts settles exactly as the world where it carried on."""
    carried_on = world.clone()
    restarted = world.clone()
    actor = list(restarted.actors())[actor_index]
    restarted.restart(actor)
    # Whether a paused guest ended up waiting can depend on the order of two VMM calls,
    # so both worlds are resumed before they are compared.
    settled = (settle_resuming(carried_on, True), settle_resuming(restarted, True))
    if settled != (True, True) or carried_on.outcome() != restarted.outcome():
        diff = {
            name: (a, restarted.outcome()[name])
            for name, a in carried_on.outcome().items()
            if a != restarted.outcome()[name]
        }
        known = settled == (True, True) and all(
            world.slots[name].lost_allocated_pre_v52 for name in diff
        )
        raise (KnownOpenFinding if known else InvariantViolation)(
            "restart_changes_no_outcome",
            f"restarting the {actor.owner} changed the outcome (settled {settled}): {diff}",
        )


def check_effects_safe_against_truth(slot: Slot, action: ResizePod | ResizeVmm) -> None:
    """(7) Actions are decided on views that may be stale or seen twice; judged against
    the true world when they land, none is unsafe: no pod patch below what the guest
    holds (memory + overhead, or its vCPUs), no VMM request beyond the pod's grant."""
    vmm = slot.vmm
    if isinstance(action, ResizeVmm):
        problem = _vmm_beyond_pod(slot, action)
        if problem:
            raise InvariantViolation("effects_safe_against_truth", problem)
        return
    if vmm is None or vmm.state is VmmState.NOT_CREATED:
        return
    target = action.resources
    if target.memory < vmm.guest_memory + OVERHEAD or target.cpu_millis < (
        vmm.vcpus * MILLICORES_PER_VCPU
    ):
        raise InvariantViolation(
            "effects_safe_against_truth",
            f"{slot.name}: pod patched to {target} while the guest holds {vmm.vcpus} vCPUs, "
            f"{vmm.guest_memory} bytes",
        )


STALL_REASONS = frozenset(
    {
        "GuestMemoryUnverifiable",
        "GuestMemoryStuck",
        "GuestVcpuRemovalStuck",
        "VMMResizeStuck",
    }
)


def _allocated_untruthful(slot: Slot) -> str | None:
    status, vmm = slot.vm.status, slot.vmm
    if slot.dead or vmm is None or vmm.state not in (VmmState.RUNNING, VmmState.PAUSED):
        return None
    allocated = status.allocated
    if allocated is None:
        return "no allocated for a running VMM"
    if allocated.memory < vmm.plugged:
        return f"allocated {allocated} claims less memory than the guest holds ({vmm.plugged})"
    if allocated.vcpus < vmm.running_vcpus:
        return f"allocated {allocated} claims fewer vCPUs than run ({vmm.running_vcpus})"
    return None


def check_allocated_truthful(world: World) -> None:
    """(8) Once settled, ``status.allocated`` never claims less than the guest holds
    (memory it has plugged and not given back, vCPU threads not ejected), whatever the VMM
    version reports and however unkind the guest (RESIZE.md 4a)."""
    for name, slot in world.slots.items():
        problem = _allocated_untruthful(slot)
        if problem:
            raise InvariantViolation("allocated_truthful", f"{name}: {problem}")


def check_state(world: World) -> None:
    """The invariants that hold of every state (run after every step)."""
    check_pod_limit_covers_guest(world)
    for slot in world.slots.values():
        check_vmm_within_pod(slot)
