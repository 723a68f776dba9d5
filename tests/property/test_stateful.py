"""The kernel in a world of several VMs, driven by hypothesis (RESIZE.md section 8).

Every step is one thing happening somewhere: a user edits a spec, pauses a VM or kills a
pod; the kubelet syncs a pod; a guest plugs memory; the controller or a daemon carries
out one action (or decides anew, on a view that may be stale or already seen); a cache
catches up; a process restarts; other workloads grow or shrink; the VMM fails calls or
becomes unreachable. After every step the invariants that hold of any state are
checked; the checks that judge an action run when it lands; restarts are checked by
forking the world; and every example ends by letting the world settle (invariant 4).
"""

from __future__ import annotations

import os

import attrs
import pytest
from attrs import evolve
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from core import Resources, VmSpec, pod_resources
from core.constants import GUEST_MEMORY_ALIGNMENT, GiB, MiB
from tests.property.world import (
    OVERHEAD,
    KnownOpenFinding,
    Node,
    World,
    check_converges,
    check_restart_changes_no_outcome,
    check_state,
)

# Forking the world to check a restart costs two settlings: a few per example suffice.
MAX_FORKS = 3

vm_index = st.integers(0, 2)
fractions = st.sampled_from([0.0, 0.5, 1.0])


@st.composite
def worlds(draw: st.DrawFn) -> World:
    """One or two nodes with one to three VMs. Each node holds its VMs at boot; how much
    more it holds is drawn, so that some resizes fit, some must wait for room (Deferred)
    and some can never fit (Infeasible, or a 403 where the 1.36 validator runs)."""
    node_count = draw(st.integers(1, 2))
    vms = []
    boot = [Resources(0, 0)] * node_count
    most = [Resources(0, 0)] * node_count
    for j in range(draw(st.integers(1, 3))):
        node = draw(st.integers(0, node_count - 1))
        vcpus = draw(st.integers(1, 3))
        memory = draw(st.sampled_from([512 * MiB, 1 * GiB, 2 * GiB]))
        spec = VmSpec(
            sockets=1,
            cores_per_socket=vcpus,
            memory=memory,
            max_vcpus=vcpus * draw(st.integers(1, 4)),
            max_memory=memory * draw(st.integers(1, 8)),
        )
        rss = draw(st.integers(0, OVERHEAD // MiB - 1)) * MiB
        vms.append((f"vm-{j}", f"node-{node}", spec, draw(st.booleans()), rss))
        at_most = evolve(spec, cores_per_socket=spec.vcpu_ceiling, memory=spec.memory_ceiling)
        boot[node] = _add(boot[node], pod_resources(spec))
        most[node] = _add(most[node], pod_resources(at_most))
    nodes = []
    for i in range(node_count):
        # 0: exactly what boots; 4: everything at its ceiling at once.
        quarters = draw(st.integers(0, 4))
        nodes.append(
            Node(
                f"node-{i}",
                cpu_millis=_between(boot[i].cpu_millis, most[i].cpu_millis, quarters, 1000),
                memory=_between(boot[i].memory, most[i].memory, quarters, 128 * MiB),
                legacy=draw(st.booleans()),
                validator=draw(st.booleans()),
            )
        )
    return World.create(nodes, vms)


def _add(a: Resources, b: Resources) -> Resources:
    return Resources(a.cpu_millis + b.cpu_millis, a.memory + b.memory)


def _between(low: int, high: int, quarters: int, unit: int) -> int:
    value = low + (high - low) * quarters // 4
    return -(-value // unit) * unit


class ResizeMachine(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.forks = 0
        self.killed = False

    @initialize(world=worlds(), early=st.none() | st.integers(0, 2), grow=st.integers(1, 4))
    def boot(self, world: World, early: int | None, grow: int) -> None:
        self.world = world
        if early is not None:
            # Issue 15 finding 5: a spec changed after the pod exists, before the VMM
            # boots. The VMM must boot with what the pod holds; the rest is a resize.
            name = list(world.slots)[early % len(world.slots)]
            for _ in range(4):
                world.refresh(world.controller, name)
                world.act(world.controller, name)
                world.finish(world.controller)
                world.kubelet(name)
            spec = world.slots[name].vm.spec
            assert spec is not None and spec.max_vcpus is not None
            assert spec.max_memory is not None
            memory = min(spec.memory + grow * 256 * MiB, spec.max_memory)
            vcpus = min(spec.vcpus + 1, spec.max_vcpus)
            if world.set_spec(name, vcpus, memory, before_boot=True):
                event("spec changed before boot")
        # Every VM is created, scheduled and booted.
        assert world.settle(), "the VMs did not boot"
        note(f"nodes: {list(world.nodes.values())}")

    def _name(self, i: int) -> str:
        names = list(self.world.slots)
        return names[i % len(names)]

    # --- users ------------------------------------------------------------------------

    @rule(i=vm_index, vcpus=st.integers(1, 12), memory=st.integers(0, 4096))
    def change_spec(self, i: int, vcpus: int, memory: int) -> None:
        slot = self.world.slots[self._name(i)]
        spec = slot.vm.spec
        assert spec is not None and spec.max_vcpus is not None and spec.max_memory is not None
        capacity = slot.vm.status.capacity
        boot = capacity.boot_memory if capacity is not None else spec.memory
        blocks = (spec.max_memory - boot) // GUEST_MEMORY_ALIGNMENT
        size = boot + (memory % (blocks + 1)) * GUEST_MEMORY_ALIGNMENT
        vcpus = 1 + (vcpus - 1) % spec.max_vcpus
        if self.world.set_spec(slot.name, vcpus, size):
            note(f"{slot.name}: spec -> {vcpus} vCPUs, {size} bytes")

    @rule(i=vm_index, up=st.booleans())
    def nudge_memory(self, i: int, up: bool) -> None:
        """2Mi up or down: far inside Kubernetes' 5% rounding tolerance."""
        slot = self.world.slots[self._name(i)]
        spec = slot.vm.spec
        assert spec is not None
        size = spec.memory + (GUEST_MEMORY_ALIGNMENT if up else -GUEST_MEMORY_ALIGNMENT)
        self.world.set_spec(slot.name, spec.vcpus, size)

    @rule(i=vm_index, what=st.sampled_from(["reapply", "pause", "resume", "kill", "delete"]))
    def user(self, i: int, what: str) -> None:
        name = self._name(i)
        if what == "reapply":
            if self.world.slots[name].vm.status.capacity is not None:
                self.world.bump_generation(name)
        elif what in ("pause", "resume"):
            self.world.pause(name, what == "pause")
        elif not self.killed and len(self.world.slots) > 1:
            # At most once: a dead VM has no more resizes to show.
            self.killed = True
            self.world.kill_pod(name, deleted=what == "delete")
            event("pod killed")

    # --- the node ---------------------------------------------------------------------

    @rule(i=vm_index, times=st.integers(1, 3))
    def kubelet(self, i: int, times: int) -> None:
        for _ in range(times):
            self.world.kubelet(self._name(i))

    @rule(i=vm_index, chunk=st.sampled_from([None, 2 * MiB, 256 * MiB]), eject=st.booleans())
    def guest(self, i: int, chunk: int | None, eject: bool) -> None:
        self.world.guest(self._name(i), chunk, eject)

    @rule(
        i=vm_index,
        what=st.sampled_from(
            ["others", "no others", "faults", "unreachable", "reachable", "status lost"]
        ),
        amount=st.integers(1, 3),
    )
    def trouble(self, i: int, what: str, amount: int) -> None:
        """Other workloads take or free room on a node; a VMM fails calls or its socket
        goes away and comes back; part of the VM's status is lost (a value that no longer
        parses is dropped by core.wire, and the kernel must re-derive it)."""
        slot = self.world.slots[self._name(i)]
        node, vmm = slot.node, slot.vmm
        if what == "status lost":
            lost = ("resize", "allocated", "capacity")[amount - 1]
            self.world.lose_status(slot.name, lost)
        elif what == "others":
            node.other_cpu, node.other_memory = amount * 1000, amount * GiB
        elif what == "no others":
            node.other_cpu = node.other_memory = 0
        elif vmm is not None and what == "faults":
            vmm.faults += amount
        elif vmm is not None:
            vmm.reachable = what == "reachable"

    # --- the processes ----------------------------------------------------------------

    @rule(i=vm_index, vm=fractions, pod=fractions)
    def controller(self, i: int, vm: float, pod: float) -> None:
        """One action of the controller, its caches having caught up only so far."""
        name = self._name(i)
        self.world.refresh(self.world.controller, name, vm, pod)
        self.world.act(self.world.controller, name)

    @rule(i=vm_index, vm=fractions, pod=fractions)
    def daemon(self, i: int, vm: float, pod: float) -> None:
        name = self._name(i)
        daemon = self.world.daemons[self.world.slots[name].node.name]
        self.world.refresh(daemon, name, vm, pod)
        self.world.act(daemon, name)

    @rule(i=vm_index, times=st.integers(1, 6), lagging=st.sampled_from([None, 0, 1]))
    def everyone(self, i: int, times: int, lagging: int | None) -> None:
        """The common case, several times over: every party takes a turn on fresh views,
        except that one process's pod cache may stay where it is (a slow watch)."""
        name = self._name(i)
        slot = self.world.slots[name]
        actors = (self.world.controller, self.world.daemons[slot.node.name])
        for _ in range(times):
            self.world.kubelet(name)
            # Removed vCPUs are ejected only by the guest rule: a count change meanwhile
            # is a 429 from the VMM.
            self.world.guest(name, None, eject=False)
            for index, actor in enumerate(actors):
                self.world.refresh(actor, name, 1.0, 0.0 if index == lagging else 1.0)
                while self.world.act(actor, name) and actor.queue:
                    pass

    @rule(actor=st.integers(0, 2))
    def restart(self, actor: int) -> None:
        actors = list(self.world.actors())
        self.world.restart(actors[actor % len(actors)])
        event("restart")

    @rule(actor=st.integers(0, 2), i=vm_index)
    def restart_mid_decision(self, actor: int, i: int) -> None:
        """Fork the world in the middle of a decision: in one copy the process carries on,
        in the other it restarts there."""
        if self.forks >= MAX_FORKS:
            return
        actors = list(self.world.actors())
        index = actor % len(actors)
        chosen = actors[index]
        if not chosen.queue:
            self.world.refresh(chosen, self._name(i))
            self.world.act(chosen, self._name(i))
        if chosen.queue:
            self.forks += 1
            check_restart_changes_no_outcome(self.world, index)
            event("restart mid-decision checked")

    # --- checks -----------------------------------------------------------------------

    @invariant()
    def safe(self) -> None:
        if hasattr(self, "world"):
            check_state(self.world)

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        stats = attrs.asdict(self.world.stats)
        check_converges(self.world)
        for name, count in stats.items():
            if count:
                event(f"saw {name}")


# One known open kernel finding (issue 15, ADR 0016): recovering a lost status.allocated
# on a VMM before v52 takes memory from the pod, so it can depend on whether a late pod
# patch landed before a restart. Only a violation with exactly that signature
# (world.KnownOpenFinding) is reported as XFAIL; any other failure fails the run. The
# stalled vCPU removal whose outcome depended on a restart is fixed (ADR 0017).
TestResize = pytest.mark.xfail(
    raises=KnownOpenFinding,
    reason="open: issue 15, pre-v52 recovery of a lost allocated depends on a late patch",
    strict=False,
)(ResizeMachine.TestCase)
TestResize.settings = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
