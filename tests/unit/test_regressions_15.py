"""Issue 15: one regression test per finding, each named after it.

Each was seen failing on the kernel before the change (see the report of the branch
``guest``). They drive the one-VM rig of test_kernel.py (the real kernel between a
scripted kubelet and a scripted VMM; the safety invariant is checked after every step)
and, where a finding lives in an adapter, the adapter itself with a fake on the far side.
"""

from __future__ import annotations

from typing import Any

import pytest
from attrs import evolve

from adapters.cloudhypervisor.types import CpusConfig, MemoryConfig, VmConfig, VmInfo, VmmPing
from adapters.k8s.client import ApiError, Conflict, Forbidden
from apps.common.worker import run_worker
from apps.daemon.daemon import VmmCallFailed
from apps.daemon.vmm import BootDefaults, Vmm
from core import (
    DEFAULT_CONFIG,
    UNOBSERVED_VMM,
    Allocation,
    BootVmm,
    Capacity,
    ConditionStatus,
    EventType,
    KernelConfig,
    Owner,
    Phase,
    PodPhase,
    PodView,
    Requeue,
    ResizePod,
    ResizeRecord,
    Resources,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    decide,
    owned_by,
    pod_resources,
    validate_vm,
)
from core.constants import GiB, MiB
from core.kernel import granted
from core.wire import apply_status
from tests.unit.test_kernel import EIGHT, OVERHEAD, Rig

T0 = 1_000_000.0  # the decisions' clock starts here (seconds since the epoch)


def drive(rig: Rig, seconds: float, *, kubelet: bool = True, guest: bool = False) -> int:
    """Run controller, kubelet and daemon at the times their requeue hints ask for, for
    ``seconds`` of the rig's clock; returns how many daemon decisions (VMM visits) ran."""
    assert rig.now is not None
    end = rig.now + seconds
    visits = 0
    while rig.now < end:
        before = len(rig.requeues)
        rig.controller()
        if kubelet:
            rig.kubelet_accepts()
        rig.daemon()
        visits += 1
        if guest:
            rig.guest_settles()
        hints = [r.after for r in rig.requeues[before:]]
        if not hints and rig.quiet():
            break
        rig.now += min(hints) if hints else 1.0
    return visits


def stalled_events(rig: Rig) -> list[str]:
    return [e.reason for e in rig.events if e.reason == "VMResizeStalled"]


# --- 1: v50's memory_actual_size is the requested size ----------------------------------


def test_finding_01_v50_shrink_not_reported_done_and_pod_keeps_memory() -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT, reports_actual=False)
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    rig.settle()
    assert "VMResizeCompleted" not in rig.reasons()
    assert rig.phase is Phase.RUNNING
    resized = rig.resized
    assert resized is not None and resized.status is ConditionStatus.FALSE
    assert resized.reason == "GuestMemoryUnverifiable"
    assert "v50.0" in resized.message and "keeps" in resized.message
    # The guest was asked for less, but the pod keeps what the guest may still hold.
    assert rig.vmm.requested_memory == 6 * GiB
    assert rig.vm.status.allocated is not None and rig.vm.status.allocated.memory == 8 * GiB
    assert rig.pod is not None and rig.pod.actual is not None
    assert rig.pod.actual.memory >= 8 * GiB + OVERHEAD
    assert stalled_events(rig) == ["VMResizeStalled"]


def test_finding_01_the_vmm_version_is_recorded_in_status() -> None:
    rig = Rig.running(EIGHT)
    rig.vm = rig.vm.evolve(status=evolve(rig.vm.status, vmm_version=None))
    rig.daemon()
    assert rig.vm.status.vmm_version == "v53.0"  # read from vmm.ping by the adapter


def test_finding_01_v53_shrink_waits_for_the_plugged_size() -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT)
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    for _ in range(3):
        rig.controller()
        rig.daemon()
    assert rig.vmm.requested_memory == 6 * GiB
    assert rig.phase is Phase.RESIZE_IN_PROGRESS  # memory_actual_size still says 8Gi
    rig.guest_settles()
    rig.settle()
    assert rig.converged_to(evolve(EIGHT, memory=6 * GiB))


# --- 2: boot_vcpus changes on accept ---------------------------------------------------


def test_finding_02_cpu_shrink_not_done_on_boot_vcpus() -> None:
    rig = Rig.running(evolve(EIGHT, cores_per_socket=6), boot=EIGHT)
    rig.ejects = False
    rig.set_spec(EIGHT)
    for _ in range(6):
        rig.round()
    assert rig.vmm.vcpus == 8  # config.cpus.boot_vcpus moved at once ...
    assert rig.running_vcpus == 12  # ... the vCPU threads did not
    assert rig.phase is Phase.RESIZE_IN_PROGRESS
    assert rig.vm.status.allocated is not None and rig.vm.status.allocated.vcpus == 12
    assert rig.pod is not None and rig.pod.desired is not None
    assert rig.pod.desired.cpu_millis == 12000  # the pod did not shrink under them


# --- 3: a pending vCPU removal: 429 for ever, and the wedge ---------------------------


def test_finding_03_pending_removal_probed_with_backoff_never_asking_the_running_count() -> None:
    rig = Rig.running(evolve(EIGHT, cores_per_socket=6), boot=EIGHT)
    rig.ejects = False
    rig.now = T0
    rig.set_spec(EIGHT)
    drive(rig, 1.0)
    assert rig.running_vcpus == 12 and rig.vmm.vcpus == 8
    rig.set_spec(evolve(EIGHT, cores_per_socket=6))  # back to the count still running
    visits = drive(rig, DEFAULT_CONFIG.vcpu_removal_deadline_s + 10)
    vcpu_calls = [c.vcpus for c in rig.vmm_calls if c.vcpus is not None]
    # Only the probe (the count configured) is sent while the removal is pending: asking
    # for 12 would answer 204 and leave the removal pending for ever.
    assert vcpu_calls[0] == 8 and set(vcpu_calls[1:]) == {8}
    assert all(c.probe for c in rig.vmm_calls[1:])
    # Capped exponential backoff: a bounded number of calls, delays that grow.
    assert visits < 40 and len(rig.vmm_calls) < 40
    busy = [r.after for r in rig.requeues if r.owner is Owner.DAEMON]
    assert max(busy) <= DEFAULT_CONFIG.wait_poll_cap_s
    assert busy[-3] > busy[1]
    # Past the deadline: Running, a reason naming the guest, allocated the truth.
    assert rig.phase is Phase.RUNNING
    assert rig.resized is not None and rig.resized.reason == "GuestVcpuRemovalStuck"
    assert rig.vm.status.allocated is not None and rig.vm.status.allocated.vcpus == 12
    assert stalled_events(rig) == ["VMResizeStalled"]
    # The guest ejects at last: a new spec change starts over and completes.
    rig.running_vcpus = None
    rig.now += 1
    rig.set_spec(evolve(EIGHT, cores_per_socket=6, memory=5 * GiB))
    rig.now = None
    rig.settle()
    assert rig.converged_to(evolve(EIGHT, cores_per_socket=6, memory=5 * GiB))


# --- 4: a guest that plugs or unplugs only part, or nothing ------------------------------


@pytest.mark.parametrize("unplugged", [0, GiB], ids=["nothing", "part"])
def test_finding_04_guest_that_does_not_unplug_settles_at_the_deadline(unplugged: int) -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT)
    rig.now = T0
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    drive(rig, 1.0)
    assert rig.vmm.requested_memory == 6 * GiB
    rig.vmm = evolve(rig.vmm, actual_memory=8 * GiB - unplugged)  # and no further
    visits = drive(rig, DEFAULT_CONFIG.guest_memory_deadline_s + 10)
    assert visits < 40  # vm.info polled with backoff, not ~16 times a second
    assert rig.phase is Phase.RUNNING
    assert rig.resized is not None and rig.resized.reason == "GuestMemoryStuck"
    held = 8 * GiB - unplugged
    assert rig.vm.status.allocated is not None and rig.vm.status.allocated.memory == held
    assert rig.pod is not None and rig.pod.actual is not None
    assert rig.pod.actual.memory >= held + OVERHEAD
    assert stalled_events(rig) == ["VMResizeStalled"]
    assert rig.quiet()  # settled: nothing more is asked for this generation


def test_finding_04_partial_plug_shows_in_allocated_part_by_part() -> None:
    rig = Rig.running(EIGHT)
    rig.now = T0
    rig.set_spec(VmSpec(2, 6, 8 * GiB))  # CPU and memory up
    for _ in range(4):
        rig.controller()
        rig.kubelet_accepts()
    rig.daemon()
    rig.vmm = evolve(rig.vmm, actual_memory=5 * GiB)
    rig.daemon()
    # vCPUs as the guest runs them; memory the most it may reach (the pod holds that),
    # never the 5Gi it has so far as though the rest could not come.
    allocated = rig.vm.status.allocated
    assert allocated is not None and (allocated.vcpus, allocated.memory) == (12, 8 * GiB)
    drive(rig, DEFAULT_CONFIG.guest_memory_deadline_s + 10)  # the guest stops at 5Gi
    assert rig.phase is Phase.RUNNING
    assert rig.resized is not None and rig.resized.reason == "GuestMemoryStuck"
    assert "holds 5Gi" in rig.resized.message
    assert rig.vm.status.allocated == Allocation(12, 8 * GiB)


def test_finding_04_memory_shrink_while_paused_returns_to_paused_at_the_deadline() -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT, phase=Phase.PAUSED)
    rig.now = T0
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    drive(rig, DEFAULT_CONFIG.guest_memory_deadline_s + 10, guest=True)  # paused: nothing
    assert rig.phase is Phase.PAUSED
    assert rig.resized is not None and rig.resized.reason == "GuestMemoryStuck"
    assert rig.vm.status.allocated is not None and rig.vm.status.allocated.memory == 8 * GiB


# --- 5: boot with what the pod holds ----------------------------------------------------


def _scheduled(spec: VmSpec, pod_spec: VmSpec, generation: int = 2) -> tuple[Vm, PodView]:
    resources = pod_resources(pod_spec)
    pod = PodView(
        "vm-a",
        observed_generation=1,
        phase=PodPhase.RUNNING,
        node_name="node-a",
        desired=resources,
        actual=resources,
    )
    vm = Vm(
        "default",
        "a",
        generation=generation,
        spec=spec,
        status=VmStatus(phase=Phase.SCHEDULED, node_name="node-a", observed_generation=1),
    )
    return vm, pod


def test_finding_05_boot_uses_what_the_pod_holds_not_a_newer_spec() -> None:
    small = VmSpec(1, 1, 1 * GiB)
    vm, pod = _scheduled(VmSpec(1, 1, 8 * GiB), small)  # patched to 8Gi before boot
    boots = [
        a for a in decide(vm, pod, VmmView(VmmState.NOT_CREATED), now=T0) if isinstance(a, BootVmm)
    ]
    assert len(boots) == 1
    boot = boots[0]
    assert (boot.boot_vcpus, boot.memory) == (1, 1 * GiB)
    assert boot.memory + OVERHEAD <= pod.actual.memory  # type: ignore[union-attr]
    # The ceiling is the new spec's, so the resize after boot can reach it.
    assert boot.memory + boot.hotplug_size >= 8 * GiB
    # After boot the difference is a resize: the pod grows first.
    running = VmmView(
        VmmState.RUNNING,
        vcpus=1,
        max_vcpus=boot.max_vcpus,
        boot_memory=boot.memory,
        hotplug_size=boot.hotplug_size,
        requested_memory=boot.memory,
        actual_memory=boot.memory,
        version="v53.0",
    )
    rig = Rig(vm=vm, pod=pod, vmm=running)
    rig.daemon()
    assert rig.phase is Phase.RUNNING
    rig.settle()
    assert rig.converged_to(VmSpec(1, 1, 8 * GiB))


# --- 6: the tolerance never loosens the safety check --------------------------------


def test_finding_06_tolerance_never_lets_the_guest_outgrow_the_reported_limit() -> None:
    want = Resources(8000, 32 * GiB + OVERHEAD)
    reported = Resources(8000, want.memory - want.memory // 20)  # 5% under, kubelet done
    pod = PodView("vm-a", generation=2, observed_generation=2, desired=want, actual=reported)
    held = granted(pod)
    assert held is not None and held.memory == reported.memory
    rig = Rig.running(VmSpec(2, 4, 16 * GiB), boot=VmSpec(2, 4, 8 * GiB))
    rig.set_spec(VmSpec(2, 4, 32 * GiB))
    rig.controller()
    rig.controller()
    rig.kubelet_accepts()
    assert rig.pod is not None
    rig.pod = evolve(rig.pod, actual=reported)
    rig.controller()
    assert rig.phase is Phase.POD_RESIZE_IN_PROGRESS  # not handed to the guest
    rig.daemon()
    assert rig.vmm.requested_memory == 16 * GiB


# --- 7: boot failures --------------------------------------------------------------------


def test_finding_07_boot_failure_backs_off_reports_once_and_gives_up_at_the_deadline() -> None:
    vm, pod = _scheduled(VmSpec(1, 1, 1 * GiB), VmSpec(1, 1, 1 * GiB), generation=1)
    rig = Rig(vm=vm, pod=pod, vmm=VmmView(VmmState.NOT_CREATED), now=T0)
    boots = 0
    while rig.now < T0 + DEFAULT_CONFIG.boot_deadline_s + 60:
        view = rig.vmm
        actions = owned_by(decide(rig.vm, rig.pod, view, now=rig.now), Owner.DAEMON)
        rig._carry_out(actions)
        if not any(isinstance(a, BootVmm) for a in actions):
            break
        boots += 1
        failed = evolve(view, call_error=VmmCallError(VmmCallErrorKind.FAILED, "500 boom"))
        again = owned_by(decide(rig.vm, rig.pod, failed, now=rig.now), Owner.DAEMON)
        rig._carry_out(again)
        hints = [a.after for a in again if isinstance(a, Requeue)]
        if not hints:
            break  # given up
        rig.now += min(hints)
    assert 3 < boots < 20  # retried with backoff, not every 50 ms for ever
    booted = rig.vm.status.condition("Booted")
    assert booted is not None and booted.reason == "BootStuck" and "fix the spec" in booted.message
    assert rig.reasons().count("VMBootFailed") == 2  # the first failure, and giving up
    # A fixed spec (a new generation) boots again.
    rig.vm = rig.vm.evolve(generation=2, spec=VmSpec(1, 1, 2 * GiB))
    assert any(isinstance(a, BootVmm) for a in decide(rig.vm, rig.pod, rig.vmm, now=rig.now))


def test_finding_07_no_kernel_is_a_condition_not_a_boot() -> None:
    calls: list[str] = []
    vmm = Vmm("/nonexistent.sock", None, BootDefaults())
    vmm.client = _FakeVmm(calls)  # type: ignore[assignment]
    boot = BootVmm(boot_vcpus=1, max_vcpus=2, memory=GiB, hotplug_size=GiB)
    with pytest.raises(VmmCallFailed) as failed:
        vmm.boot(boot)
    assert failed.value.error.kind is VmmCallErrorKind.INVALID
    assert "spec.instance.boot.kernel" in failed.value.error.message
    assert calls == []  # nothing sent to the VMM
    vm, pod = _scheduled(VmSpec(1, 1, GiB), VmSpec(1, 1, GiB), generation=1)
    acts = decide(
        vm, pod, evolve(VmmView(VmmState.NOT_CREATED), call_error=failed.value.error), now=T0
    )
    cond = [a.condition for a in acts if hasattr(a, "condition")]
    assert cond and cond[0].reason == "BootStuck" and "boot.kernel" in cond[0].message


def test_finding_07_a_created_config_is_deleted_before_the_retry() -> None:
    calls: list[str] = []
    vmm = Vmm("/nonexistent.sock", None, BootDefaults(kernel="/boot/vmlinux"))
    vmm.client = _FakeVmm(calls, state="Created")  # type: ignore[assignment]
    vmm.boot(BootVmm(boot_vcpus=1, max_vcpus=2, memory=GiB, hotplug_size=GiB))
    assert calls == ["info", "delete", "create", "boot"]


class _FakeVmm:
    def __init__(self, calls: list[str], state: str | None = None) -> None:
        self.calls, self.state = calls, state

    def info(self) -> VmInfo:
        self.calls.append("info")
        if self.state is None:
            from adapters.cloudhypervisor.errors import VmNotCreated

            raise VmNotCreated("/nonexistent.sock", "vm.info", 500, "VM is not created")
        return VmInfo(self.state, VmConfig(CpusConfig(1, 2), MemoryConfig(GiB)))

    def ping(self) -> VmmPing:
        return VmmPing(version="v53.0")

    def delete(self) -> None:
        self.calls.append("delete")

    def create(self, _config: dict[str, Any]) -> None:
        self.calls.append("create")

    def boot(self) -> None:
        self.calls.append("boot")


# --- 8: a quota's 403 --------------------------------------------------------------------


def test_finding_08_quota_refusal_reported_once_per_generation() -> None:
    rig = Rig.running(EIGHT)
    rig.set_spec(evolve(EIGHT, memory=8 * GiB))
    rig.patch_refusal = "forbidden: exceeded quota: q, requested: memory=8448Mi"
    for _ in range(5):
        rig.round()
    assert rig.phase is Phase.RUNNING
    assert rig.resized is not None and rig.resized.reason == "PodResizeForbidden"
    assert rig.reasons().count("VMPodResizeForbidden") == 1
    forbidden = [e for e in rig.events if e.reason == "VMPodResizeForbidden"]
    assert forbidden[0].type is EventType.WARNING
    assert rig.pod_patches == []  # never re-sent for this generation
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))  # a new spec change retries
    rig.settle()
    assert rig.converged_to(evolve(EIGHT, memory=6 * GiB))


def test_finding_08_the_controller_tells_quota_refusals_from_node_capacity() -> None:
    from apps.controller.main import permanent_refusal

    quota = Forbidden(403, "Forbidden", "exceeded quota: compute-resources")
    assert permanent_refusal(quota) == "forbidden: exceeded quota: compute-resources"
    capacity = Forbidden(403, "Forbidden", "no room", [{"type": "NodeCapacity"}])
    assert permanent_refusal(capacity) is None  # that one is Infeasible
    assert permanent_refusal(ApiError(422, "Invalid", "bad")) == "invalid: bad"
    assert permanent_refusal(Conflict(409, "Conflict", "stale")) is None


# --- 9: names that cannot work ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a" * 61, "a" * 64, "my.vm", "My-VM"])
def test_finding_09_names_that_cannot_work_are_refused_at_admission(name: str) -> None:
    vm = Vm("default", name, spec=EIGHT)
    errors = validate_vm(vm)
    assert [e.path for e in errors] == ["metadata.name"]
    assert validate_vm(Vm("default", "a" * 60, spec=EIGHT)) == ()


# --- 10: the VMM shuts down or loses its VM -------------------------------------------


@pytest.mark.parametrize("phase", [Phase.RUNNING, Phase.RESIZE_IN_PROGRESS])
def test_finding_10_vmm_shutdown_or_exit_ends_the_vm_visibly(phase: Phase) -> None:
    rig = Rig.running(EIGHT)
    rig.vm = rig.vm.evolve(status=evolve(rig.vm.status, phase=phase))
    shutdown = evolve(rig.vmm, state=VmmState.SHUTDOWN, version="v53.0")
    acts = owned_by(decide(rig.vm, rig.pod, shutdown), Owner.DAEMON)
    assert [a.phase for a in acts if hasattr(a, "phase")] == [Phase.SUCCEEDED]
    assert "VMShutdown" in [a.reason for a in acts if hasattr(a, "reason")]
    lost = VmmView(VmmState.NOT_CREATED, version="v53.0")
    acts = owned_by(decide(rig.vm, rig.pod, lost), Owner.DAEMON)
    assert [a.phase for a in acts if hasattr(a, "phase")] == [Phase.FAILED]
    assert "VMMLost" in [a.reason for a in acts if hasattr(a, "reason")]


# --- 11: the kubelet's Error on a decrease ---------------------------------------------


def test_finding_11_kubelet_error_on_decrease_is_not_waited_on_for_ever() -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT)
    rig.now = T0
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    for _ in range(8):
        rig.controller()
        record = rig.vm.status.resize
        if rig.phase is Phase.POD_RESIZE_IN_PROGRESS and record and record.pod_generation:
            break
        rig.daemon()
        rig.guest_settles()
    message = "cannot decrease memory limits: attempting to set pod memory limit below usage"
    rig.kubelet_error(message)
    while rig.phase is Phase.POD_RESIZE_IN_PROGRESS and rig.now < T0 + 1000:
        before = len(rig.requeues)
        rig.controller()
        hints = [r.after for r in rig.requeues[before:]]
        rig.now += min(hints) if hints else 1.0
    assert rig.now < T0 + DEFAULT_CONFIG.pod_resize_deadline_s + 30
    assert rig.phase is Phase.RUNNING
    resized = rig.resized
    assert resized is not None and resized.reason == "KubeletResizeStuck"
    assert "below usage" in resized.message
    # The pod's spec is put back to what it holds, which covers the guest.
    assert rig.pod is not None and rig.pod.desired == rig.pod.actual
    assert rig.pod.actual is not None and rig.pod.actual.memory >= 6 * GiB + OVERHEAD
    assert rig.reasons().count("VMPodResizeError") == 1
    assert stalled_events(rig) == ["VMResizeStalled"]


# --- 12: Paused, resumed, resized ----------------------------------------------------------


def test_finding_12_resize_started_paused_returns_to_running_after_a_resume() -> None:
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT, phase=Phase.PAUSED)
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))  # guest first: the daemon ends it
    rig.controller()
    assert rig.phase is Phase.RESIZE_IN_PROGRESS
    rig.vmm = evolve(rig.vmm, state=VmmState.RUNNING)  # the user resumed the VM
    rig.settle()
    assert rig.phase is Phase.RUNNING
    assert Phase.PAUSED not in rig.phases


# --- 13: 409 conflicts ------------------------------------------------------------------


class _Queue:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.added: list[str] = []

    def get(self) -> str | None:
        if self.rounds == 0:
            return None
        self.rounds -= 1
        return "default/a"

    def add(self, key: str) -> None:
        self.added.append(f"add {key}")

    def add_rate_limited(self, key: str) -> float:
        self.added.append(f"backoff {key}")
        return 0.0

    def add_after(self, key: str, delay: float) -> None:
        self.added.append(f"after {key}")

    def forget(self, key: str) -> None:
        pass

    def done(self, key: str) -> None:
        pass


class _Metrics:
    def reconciled(self, result: str) -> None:
        pass

    def resize_done(self, outcome: str, seconds: float) -> None:
        pass


def test_finding_13_conflicts_are_retried_with_backoff() -> None:
    import threading

    def reconcile(_key: str) -> float | None:
        raise Conflict(409, "Conflict", "the object has been modified")

    queue = _Queue(rounds=3)
    run_worker(
        queue,  # type: ignore[arg-type]
        reconcile,
        _Metrics(),
        lambda exc: isinstance(exc, Conflict),
        300.0,
        threading.Event(),
    )
    assert queue.added == ["backoff default/a"] * 3


def test_kernel_config_names_every_deadline_once() -> None:
    from core.config import DEADLINE_FLAGS

    assert set(DEADLINE_FLAGS) == {
        "pod_resize_deadline_s",
        "guest_memory_deadline_s",
        "vcpu_removal_deadline_s",
        "vmm_resize_deadline_s",
        "boot_deadline_s",
        "vmm_unreachable_deadline_s",
    }
    assert DEADLINE_FLAGS["pod_resize_deadline_s"] == "--pod-resize-deadline"
    short = KernelConfig(guest_memory_deadline_s=5.0)
    rig = Rig.running(evolve(EIGHT, memory=8 * GiB), boot=EIGHT, config=short)
    rig.now = T0
    rig.set_spec(evolve(EIGHT, memory=6 * GiB))
    drive(rig, 10.0)
    assert rig.resized is not None and rig.resized.reason == "GuestMemoryStuck"
    _ = UNOBSERVED_VMM


# --- the property suite's restart check (RESIZE.md section 8, invariant 6) --------------


def _after_stall(
    pod_memory: int, allocated: Allocation, record: ResizeRecord, generation: int
) -> tuple[Vm, PodView]:
    spec = VmSpec(1, 1, 512 * MiB, max_vcpus=4, max_memory=2 * GiB)
    status = VmStatus(
        phase=Phase.RUNNING,
        allocated=allocated,
        capacity=Capacity(4, 2 * GiB, 512 * MiB),
        resize=record,
        observed_generation=generation,
    )
    vm = Vm("default", "vm-0", generation=generation, spec=spec, status=status)
    held = Resources(2000, pod_memory)
    return vm, PodView("vm-0-pod", node_name="node-a", desired=held, actual=held, generation=5)


def _controller(vm: Vm, pod: PodView, now: float) -> tuple[Any, ...]:
    return owned_by(decide(vm, pod, UNOBSERVED_VMM, now=now), Owner.CONTROLLER)


def _pod_patches(actions: tuple[Any, ...]) -> list[Resources]:
    return [a.resources for a in actions if isinstance(a, ResizePod)]


def test_a_stalled_records_target_does_not_make_the_pod_target_depend_on_a_restart() -> None:
    """A vCPU removal stalled (GuestVcpuRemovalStuck) while the spec asked 514Mi, which
    the VMM was never asked (the pending removal blocked the request). The next spec
    (512Mi) must aim the pod at the same target whether the controller carries out its
    decision or restarts after writing its status: once the pod was patched to 770Mi by
    the envelope of the stalled record, and 768Mi after a restart."""
    stalled = ResizeRecord(vcpus=1, memory=514 * MiB, generation=2, step=Step.STALLED)
    vm, pod = _after_stall(768 * MiB, Allocation(2, 512 * MiB), stalled, generation=3)
    first = _controller(vm, pod, T0)
    # Restarted after the status write: the effects of ``first`` are lost.
    restarted = vm.evolve(status=apply_status(vm.status, first))
    second = _controller(restarted, pod, T0 + 1)
    carried_on = _pod_patches(first)
    assert carried_on == _pod_patches(second) or not carried_on, (carried_on, second)
    assert all(p.memory == 768 * MiB for p in carried_on + _pod_patches(second))


def test_a_stalled_step_leaves_the_pod_where_status_alone_says() -> None:
    """A memory shrink stalled (GuestMemoryUnverifiable). Whether an in-flight patch of an
    older generation landed (1538Mi) or was lost to a controller restart (1536Mi), the pod
    must end covering what ``allocated`` says the guest may hold, the same in both."""
    allocated = Allocation(1, 1280 * MiB)
    stalled = ResizeRecord(vcpus=1, memory=1 * GiB, generation=4, step=Step.STALLED)
    ends = []
    for memory in (1538 * MiB, 1536 * MiB):
        vm, pod = _after_stall(memory, allocated, stalled, generation=4)
        patches = _pod_patches(_controller(vm, pod, T0))
        ends.append(patches[-1] if patches else pod.desired)
    assert ends[0] == ends[1], ends
    assert ends[0] is not None and ends[0].memory == 1280 * MiB + OVERHEAD
