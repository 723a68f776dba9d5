"""Each invariant check of ``world.py`` fails on a kernel broken in the way it guards.

A check that never fails proves nothing. Each row below names a check, a deliberately
broken kernel (a monkeypatched variant: the pod shrunk first, the guest grown first,
Infeasible ignored, the staleness guard skipped, ...) and a short scripted scenario. The
scenario first runs on the real kernel with every check on and must pass (so the
scenario is legitimate); then it runs on the broken kernel with every *other* check
switched off and must fail with exactly that check (so it is this check that sees it).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
from attrs import evolve

import core.kernel as kernel
from core import (
    DEFAULT_CONFIG,
    Action,
    Allocation,
    KernelConfig,
    Owner,
    Phase,
    PodView,
    RecordEvent,
    ResizePod,
    Resources,
    Step,
    Vm,
    VmmView,
    VmSpec,
    pod_resources,
    pod_resources_for,
)
from core import decide as real_decide
from core.constants import GiB, MiB
from tests.property import world as world_module
from tests.property.world import InvariantViolation, Node, World

# The check each name stands for, as the world module calls it.
CHECKS = {
    "pod_limit_covers_guest": "check_pod_limit_covers_guest",
    "vmm_within_pod": "check_vmm_within_pod",
    "phase_moves_in_table": "check_phase_moves_in_table",
    "converges": "check_converges",
    "infeasible_bounded": "check_infeasible_bounded",
    "restart_changes_no_outcome": "check_restart_changes_no_outcome",
    "effects_safe_against_truth": "check_effects_safe_against_truth",
    "allocated_truthful": "check_allocated_truthful",
}

ONE_GIB = VmSpec(1, 2, 1 * GiB, max_vcpus=8, max_memory=4 * GiB)

Plan = tuple[Step | None, Resources | Allocation | None]


# --- scenarios --------------------------------------------------------------------------


def one_vm(
    *,
    node_memory: int = 32 * GiB,
    validator: bool = False,
    rss: int = 0,
    reports_actual: bool = True,
) -> World:
    world = World.create(
        [Node("node-0", cpu_millis=16000, memory=node_memory, validator=validator)],
        [("vm-0", "node-0", ONE_GIB, reports_actual, rss)],
    )
    assert world.settle(), "did not boot"
    return world


def resize(world: World, memory: int, vcpus: int = 2, turns: int = 8) -> None:
    assert world.set_spec("vm-0", vcpus, memory), "the webhook refused it"
    for _ in range(turns):
        world.turn("vm-0")


def grow_then_shrink_a_little() -> None:
    # The VMM itself uses nothing, so the kubelet sees no usage above the new limit and
    # accepts a shrink the guest has not made yet.
    world = one_vm()
    resize(world, 3 * GiB)
    resize(world, 3 * GiB - 128 * MiB)


def grow_memory() -> None:
    resize(one_vm(), 2 * GiB)


def grow_cpu() -> None:
    resize(one_vm(), 1 * GiB, vcpus=4)


def grow_then_settle() -> None:
    world = one_vm()
    world.set_spec("vm-0", 2, 2 * GiB)
    world_module.check_converges(world)


def grow_shrink_then_settle() -> None:
    world = one_vm()
    resize(world, 3 * GiB)
    world.set_spec("vm-0", 2, 1 * GiB)
    world_module.check_converges(world)


def grow_while_paused() -> None:
    world = one_vm()
    world.pause("vm-0", True)
    for _ in range(2):
        world.turn("vm-0")
    assert world.slots["vm-0"].vm.status.phase is Phase.PAUSED
    resize(world, 2 * GiB)
    assert world.slots["vm-0"].vm.status.phase is Phase.PAUSED


def grow_beyond_the_node() -> None:
    world = one_vm(node_memory=2 * GiB)  # a 4Gi + 256Mi pod can never fit
    resize(world, 4 * GiB, turns=12)
    slot = world.slots["vm-0"]
    assert slot.infeasible_generation == slot.vm.generation


def grow_beyond_the_node_with_the_validator() -> None:
    world = one_vm(node_memory=2 * GiB, validator=True)
    resize(world, 4 * GiB, turns=12)
    assert world.stats.refusals >= 1


def restart_between_status_and_pod_patch() -> None:
    """The controller has written PodResizeInProgress; its pod patch is still to come."""
    world = one_vm()
    world.set_spec("vm-0", 2, 2 * GiB)
    world.refresh(world.controller, "vm-0")
    assert world.act(world.controller, "vm-0")
    assert any(isinstance(t.action, ResizePod) for t in world.controller.queue)
    world_module.check_restart_changes_no_outcome(world, 0)


def daemon_with_an_old_pod_view() -> None:
    """The daemon's pod cache stops at a 3Gi pod; the pod then shrinks to 1Gi and grows
    to 2Gi, and the user asks for 3Gi just as the daemon is to grow the guest to 2Gi."""
    world = one_vm()
    daemon = world.daemons["node-0"]
    resize(world, 3 * GiB)
    for memory in (1 * GiB, 2 * GiB):
        world.set_spec("vm-0", 2, memory)
        for _ in range(8):
            world.kubelet("vm-0")
            world.kubelet("vm-0")
            world.guest("vm-0", None)
            world.refresh(world.controller, "vm-0")
            world.act(world.controller, "vm-0")
            world.finish(world.controller)
            phase = world.slots["vm-0"].vm.status.phase
            if memory == 2 * GiB and phase is Phase.RESIZE_IN_PROGRESS:
                break
            world.refresh(daemon, "vm-0", vm=1.0, pod=0.0)
            world.act(daemon, "vm-0")
            world.finish(daemon)
    slot = world.slots["vm-0"]
    assert slot.vm.status.phase is Phase.RESIZE_IN_PROGRESS
    old = slot.pods[daemon.pod_seen["vm-0"]]
    assert old is not None and old.actual == pod_resources(evolve(ONE_GIB, memory=3 * GiB))
    world.set_spec("vm-0", 2, 3 * GiB)
    world.refresh(daemon, "vm-0", vm=1.0, pod=0.0)
    world.act(daemon, "vm-0")
    world.finish(daemon)


def grow_then_shrink_with_a_busy_vmm() -> None:
    """As above, but the VMM uses most of its overhead: the kubelet would refuse the
    early shrink, yet asking for it is already unsafe."""
    world = one_vm(rss=200 * MiB)
    resize(world, 2 * GiB)
    resize(world, 1 * GiB)


def v50_shrink_then_settle() -> None:
    """Issue 15 finding 1: a VMM before v52 cannot say what the guest gave back; here
    the guest gives nothing back."""
    world = one_vm(reports_actual=False)
    resize(world, 3 * GiB)
    vmm = world.slots["vm-0"].vmm
    assert vmm is not None
    vmm.unplug_limit = 0
    world.set_spec("vm-0", 2, 2 * GiB)
    world.settle()
    world_module.check_converges(world)
    world_module.check_allocated_truthful(world)


def cpu_shrink_never_ejected_then_settle() -> None:
    """Issue 15 findings 2 and 3: boot_vcpus moves on accept; the guest never ejects."""
    world = one_vm()
    vmm = world.slots["vm-0"].vmm
    assert vmm is not None
    vmm.ejects = False
    world.set_spec("vm-0", 1, 1 * GiB)
    world.settle()
    world_module.check_converges(world)
    world_module.check_allocated_truthful(world)


def never_unplugging_guest_settles() -> None:
    """Issue 15 finding 4: a guest that gives nothing back; the wait has a deadline."""
    world = one_vm()
    resize(world, 3 * GiB)
    vmm = world.slots["vm-0"].vmm
    assert vmm is not None
    vmm.unplug_limit = 0
    world.set_spec("vm-0", 2, 2 * GiB)
    world_module.check_converges(world)


def grow_beyond_the_quota() -> None:
    """Issue 15 finding 8: a ResourceQuota's 403 is not retried for the generation."""
    world = one_vm()
    world.slots["vm-0"].quota = 2 * GiB
    resize(world, 3 * GiB, turns=12)
    resize(world, 3 * GiB - 2 * MiB, turns=12)


def trust_the_vmm(known: Allocation | None, vmm: VmmView) -> Allocation | None:
    """The kernel before issue 15: what the VMM was asked is what the guest holds."""
    if vmm.vcpus is None or vmm.requested_memory is None:
        return None
    return Allocation(vmm.vcpus, vmm.requested_memory)


def retry_forbidden(*args: object) -> None:
    """Forgets a quota's refusal: the next look asks again."""


# --- broken kernels -----------------------------------------------------------------------


def shrink_pod_first(
    current: Allocation, pod: PodView, desired: Allocation, config: KernelConfig = DEFAULT_CONFIG
) -> Plan:
    """The anchor's mistake: a shrink starts with the pod."""
    final = pod_resources_for(desired, config)
    if desired.memory < current.memory and pod.desired != final:
        return Step.POD_SHRINK, final
    return REAL_PLAN(current, pod, desired, config)


def grow_guest_first(
    current: Allocation, pod: PodView, desired: Allocation, config: KernelConfig = DEFAULT_CONFIG
) -> Plan:
    if current != desired:
        return Step.VMM, desired
    return REAL_PLAN(current, pod, desired, config)


def never_shrink_the_pod(
    current: Allocation, pod: PodView, desired: Allocation, config: KernelConfig = DEFAULT_CONFIG
) -> Plan:
    step, target = REAL_PLAN(current, pod, desired, config)
    return (None, None) if step is Step.POD_SHRINK else (step, target)


def without_events(
    vm: Vm,
    pod: PodView | None,
    vmm: VmmView,
    config: KernelConfig = DEFAULT_CONFIG,
    now: float | None = None,
    *,
    owner: Owner | None = None,
) -> tuple[Action, ...]:
    actions = real_decide(vm, pod, vmm, config, now, owner=owner)
    return tuple(a for a in actions if not isinstance(a, RecordEvent))


def trusting_unseen_patches(
    vm: Vm,
    pod: PodView | None,
    vmm: VmmView,
    config: KernelConfig = DEFAULT_CONFIG,
    now: float | None = None,
    *,
    owner: Owner | None = None,
) -> tuple[Action, ...]:
    """Takes a pod patch it cannot see yet as sent: true, unless the process died."""
    actions = real_decide(vm, pod, vmm, config, now, owner=owner)
    record = vm.status.resize
    if (
        vm.status.phase is Phase.POD_RESIZE_IN_PROGRESS
        and record is not None
        and record.pod_generation is None
    ):
        return tuple(a for a in actions if not isinstance(a, ResizePod))
    return actions


def return_running(self: kernel._Out, cause: kernel.Cause, message: str = "") -> Phase:
    """A resize always returns to Running, even one that started Paused."""
    resize = self.vm.status.resize
    if resize is not None:
        status = evolve(self.vm.status, resize=evolve(resize, return_phase=Phase.RUNNING))
        self.vm = self.vm.evolve(status=status)
    return REAL_TRANSITION(self, cause, message)


def ignore_infeasible(*args: object) -> None:
    """Forgets the Infeasible verdict on the next look at a Running VM."""
    out, vm, *rest = args
    assert isinstance(vm, Vm)
    record = vm.status.resize
    if record is not None and record.step is Step.INFEASIBLE:
        vm = vm.evolve(status=evolve(vm.status, resize=None))
    REAL_STEADY(out, vm, *rest)


REAL_PLAN = kernel.plan
REAL_TRANSITION = kernel._Out.transition
REAL_STEADY = kernel._steady


@attrs.frozen
class Bite:
    check: str
    broken: str  # how the kernel is broken, for the test id
    target: object  # the module or class patched
    name: str
    replacement: object
    scenario: Callable[[], None]


BITES = [
    Bite("pod_limit_covers_guest", "pod shrunk first", kernel, "plan", shrink_pod_first,
         grow_then_shrink_a_little),
    Bite("vmm_within_pod", "guest grown first (memory)", kernel, "plan", grow_guest_first,
         grow_memory),
    Bite("vmm_within_pod", "guest grown first (cpu)", kernel, "plan", grow_guest_first,
         grow_cpu),
    Bite("phase_moves_in_table", "paused resize returns running", kernel._Out, "transition",
         return_running, grow_while_paused),
    Bite("phase_moves_in_table", "phase without its event", world_module, "decide",
         without_events, grow_memory),
    Bite("converges", "pod never shrunk", kernel, "plan", never_shrink_the_pod,
         grow_shrink_then_settle),
    Bite("converges", "VMM step never done", kernel, "_vmm_step", lambda *args: None,
         grow_then_settle),
    Bite("infeasible_bounded", "Infeasible ignored", kernel, "_steady", ignore_infeasible,
         grow_beyond_the_node),
    Bite("infeasible_bounded", "403 ignored", kernel, "_infeasible", lambda *args: None,
         grow_beyond_the_node_with_the_validator),
    Bite("restart_changes_no_outcome", "unseen patch trusted", world_module, "decide",
         trusting_unseen_patches, restart_between_status_and_pod_patch),
    Bite("effects_safe_against_truth", "staleness guard skipped", kernel, "pod_stale",
         lambda pod, generation: False, daemon_with_an_old_pod_view),
    Bite("effects_safe_against_truth", "pod shrunk first", kernel, "plan", shrink_pod_first,
         grow_then_shrink_with_a_busy_vmm),
    # Issue 15: evidence and deadlines.
    Bite("allocated_truthful", "v50 echo trusted", kernel, "_guest_truth", trust_the_vmm,
         v50_shrink_then_settle),
    Bite("allocated_truthful", "boot_vcpus trusted", kernel, "_guest_truth", trust_the_vmm,
         cpu_shrink_never_ejected_then_settle),
    Bite("converges", "deadlines never pass", kernel, "_past", lambda *args: False,
         never_unplugging_guest_settles),
    Bite("infeasible_bounded", "quota refusal retried", kernel, "_forbidden", retry_forbidden,
         grow_beyond_the_quota),
]  # fmt: skip


@pytest.mark.parametrize("bite", BITES, ids=lambda b: f"{b.check}: {b.broken}")
def test_check_fails_on_a_broken_kernel(bite: Bite, monkeypatch: pytest.MonkeyPatch) -> None:
    bite.scenario()  # the real kernel, every check on: fine

    for name, function in CHECKS.items():
        if name != bite.check:
            monkeypatch.setattr(world_module, function, lambda *args, **kwargs: None)
    monkeypatch.setattr(bite.target, bite.name, bite.replacement)
    with pytest.raises(InvariantViolation) as caught:
        bite.scenario()
    assert caught.value.check == bite.check


def test_every_check_has_a_bite() -> None:
    assert {b.check for b in BITES} == set(CHECKS)
    for function in CHECKS.values():
        assert callable(getattr(world_module, function))
