"""The node daemon's reconcile against fakes of its collaborators (the API, the two
caches, the VMM client): the order of its VMM calls and what it writes, without a cluster.

The case here is the vCPU-removal probe the look right after an accepted ``vm.resize``
asks for. The daemon makes that probe at once and feeds its answer back in the same
reconcile (ADR 0021's addendum), so a guest that ejected at once is seen to have, not a
backoff later. Without it, the reconcile ends on a requeue with the removal unproven.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from attrs import evolve

from adapters.k8s.vms import pod_name
from apps.daemon.daemon import Daemon, VmmCallFailed
from core import (
    Allocation,
    BootVmm,
    Capacity,
    Phase,
    ResizeRecord,
    Step,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmStatus,
    pod_resources,
)
from core.config import DEFAULT_CONFIG
from core.constants import FINALIZER, VM_CONTAINER, GiB
from core.model import VmSpec
from core.wire import parse_pod, parse_vm, render_status

NODE = "node-a"
BOOT = VmSpec(1, 4, 4 * GiB, max_vcpus=8, max_memory=8 * GiB)
TARGET = evolve(BOOT, cores_per_socket=2)  # 4 -> 2 vCPUs, memory unchanged


class FakeApi:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.events: list[str] = []

    def write_status(self, vm_obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        written = copy.deepcopy(vm_obj)
        written["status"] = {**(vm_obj.get("status") or {}), **status}
        rv = int(vm_obj["metadata"]["resourceVersion"]) + 1
        written["metadata"]["resourceVersion"] = str(rv)
        self.statuses.append(written["status"])
        return written

    def record_event(self, vm_obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


class FakeCache:
    def __init__(self, *objs: dict[str, Any]) -> None:
        self.objs = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs}

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objs.get((namespace, name))

    def list(self) -> list[dict[str, Any]]:
        return list(self.objs.values())

    def observe_write(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objs[(meta["namespace"], meta["name"])] = obj


class FakeQueue:
    def add(self, key: str) -> None: ...
    def add_after(self, key: str, delay: float) -> None: ...
    def add_rate_limited(self, key: str) -> None: ...
    def forget(self, key: str) -> None: ...
    def get(self) -> str | None:
        return None

    def done(self, key: str) -> None: ...


class FakeMetrics:
    def reconciled(self, result: str) -> None: ...
    def resize_done(self, outcome: str, seconds: float) -> None: ...


class FakeVmm:
    """Cloud Hypervisor as the daemon's client sees it: ``vm.resize`` moves the
    configured count at once; a vCPU request answers 429 while a removal is pending,
    which lasts until the guest ejects (``ejects``)."""

    def __init__(self, *, ejects: bool) -> None:
        self.vcpus = BOOT.vcpus
        self.ejects = ejects
        self.pending = False
        self.calls: list[tuple[int | None, int | None]] = []

    def view(self) -> VmmView:
        return VmmView(
            VmmState.RUNNING,
            vcpus=self.vcpus,
            max_vcpus=BOOT.max_vcpus,
            boot_memory=BOOT.memory,
            hotplug_size=BOOT.max_memory - BOOT.memory,
            requested_memory=BOOT.memory,
            actual_memory=BOOT.memory,
            version="v53.0",
        )

    def resize(self, vcpus: int | None, memory: int | None) -> None:
        self.calls.append((vcpus, memory))
        if vcpus is not None and self.pending:
            raise VmmCallFailed(VmmCallError(VmmCallErrorKind.BUSY, "vCPU removal pending"))
        if vcpus is not None and vcpus < self.vcpus:
            self.pending = not self.ejects
        if vcpus is not None:
            self.vcpus = vcpus

    def boot(self, action: BootVmm) -> None:
        raise AssertionError("the VM runs already")


def _objects(opened_ago: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A VM whose guest step toward 2 vCPUs opened ``opened_ago`` seconds ago (the
    controller's hand-off wrote it), and its pod, which covers 4."""
    record = evolve(
        ResizeRecord(TARGET.vcpus, TARGET.memory, 2, Step.VMM, pod_generation=1),
        vmm_requested=True,
        wait_since=time.time() - opened_ago,  # by the daemon's clock
    )
    status = VmStatus(
        phase=Phase.RESIZE_IN_PROGRESS,
        node_name=NODE,
        observed_generation=2,
        desired=TARGET.desired,
        capacity=Capacity(BOOT.max_vcpus, BOOT.max_memory, BOOT.memory),
        allocated=Allocation(BOOT.vcpus, BOOT.memory),
        resize=record,
        vmm_version="v53.0",
    )
    cpu = {"sockets": TARGET.sockets, "coresPerSocket": TARGET.cores_per_socket}
    vm = {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "vm-0",
            "namespace": "default",
            "uid": "vm-uid",
            "generation": 2,
            "resourceVersion": "10",
            "finalizers": [FINALIZER],
        },
        "spec": {
            "instance": {
                "cpu": {**cpu, "maxVcpus": BOOT.max_vcpus},
                "memory": {"size": "4Gi", "maxSize": "8Gi"},
            }
        },
        "status": render_status(status),
    }
    covered = pod_resources(BOOT)
    quantities = {"cpu": f"{covered.cpu_millis}m", "memory": str(covered.memory)}
    held = {"requests": quantities, "limits": quantities}
    pod = {
        "metadata": {
            "name": pod_name("vm-0"),
            "namespace": "default",
            "uid": "pod-uid",
            "generation": 1,
            "resourceVersion": "9",
        },
        "spec": {"nodeName": NODE, "containers": [{"name": VM_CONTAINER, "resources": held}]},
        "status": {
            "phase": "Running",
            "observedGeneration": 1,
            "containerStatuses": [{"name": VM_CONTAINER, "resources": held}],
        },
    }
    return vm, pod


def _daemon(vmm: FakeVmm, opened_ago: float = 0.0) -> tuple[Daemon, FakeApi, FakeCache]:
    vm, pod = _objects(opened_ago)
    vms = FakeCache(vm)
    api = FakeApi()
    daemon = Daemon(
        api,
        vms,
        FakeCache(pod),
        FakeQueue(),
        FakeMetrics(),
        node_name=NODE,
        vmm_for_pod=lambda _pod, _vm: vmm,  # type: ignore[arg-type, return-value]
        config=DEFAULT_CONFIG,
        is_conflict=lambda _e: False,
    )
    return daemon, api, vms


def test_the_objects_parse_as_meant() -> None:
    vm, pod = _objects()
    parsed = parse_vm(vm)
    assert parsed.spec is not None and parsed.spec.desired == TARGET.desired, parsed.spec_errors
    assert parsed.status.phase is Phase.RESIZE_IN_PROGRESS
    assert parse_pod(pod).actual == pod_resources(BOOT)


def test_a_guest_that_ejects_at_once_is_proven_in_the_same_reconcile() -> None:
    vmm = FakeVmm(ejects=True)
    daemon, api, vms = _daemon(vmm)
    daemon.reconcile("default/vm-0")
    # vm.resize to 2, then at once the probe of the removal (204: the guest ejected).
    assert vmm.calls == [(2, None), (2, None)]
    allocated = vms.get("default", "vm-0")["status"]["allocated"]  # type: ignore[index]
    assert allocated["vcpus"] == TARGET.vcpus
    # The step ended in that reconcile: the pod follows the guest down next.
    assert api.statuses[-1]["phase"] == str(Phase.POD_RESIZE_IN_PROGRESS)


def test_a_guest_that_has_not_ejected_costs_one_429_and_waits_for_the_backoff() -> None:
    vmm = FakeVmm(ejects=False)
    daemon, _, vms = _daemon(vmm)
    after = daemon.reconcile("default/vm-0")
    assert vmm.calls == [(2, None), (2, None)]  # the resize, and one probe that got 429
    status = vms.get("default", "vm-0")["status"]  # type: ignore[index]
    assert status["allocated"]["vcpus"] == BOOT.vcpus  # not proven: the guest may run 4
    assert status["phase"] == str(Phase.RESIZE_IN_PROGRESS)
    assert after is not None and after > 0  # the next probe waits for its backoff


@pytest.mark.parametrize("ejects", [True, False])
def test_a_second_reconcile_after_the_probe_sends_no_resize_again(ejects: bool) -> None:
    vmm = FakeVmm(ejects=ejects)
    daemon, _, _ = _daemon(vmm)
    daemon.reconcile("default/vm-0")
    calls = len(vmm.calls)
    daemon._hold.clear()  # as if the backoff had passed
    daemon.reconcile("default/vm-0")
    # Only probes follow, never a new vm.resize with another count.
    assert all(call == (2, None) for call in vmm.calls[calls:])


def test_a_late_first_probe_backs_off_from_its_429_not_from_the_steps_opening() -> None:
    """The daemon's first look came 5 s after the step opened (say, a hung VMM's call
    timeout): the probes still start at the shortest backoff, from the first 429."""
    vmm = FakeVmm(ejects=False)
    daemon, _, _ = _daemon(vmm, opened_ago=5.0)
    after = daemon.reconcile("default/vm-0")
    assert vmm.calls == [(2, None), (2, None)]
    assert after is not None
    assert after < 0.1, after  # not the 5 s cap the time since the opening would give
    # The next probe, once that backoff has passed, backs off from the same first 429.
    time.sleep(after)
    daemon._hold.clear()
    again = daemon.reconcile("default/vm-0")
    assert vmm.calls[2:] == [(2, None)]
    assert again is not None and again < 0.5, again


# --- a VMM that stops answering ------------------------------------------------------------


class HangingVmm(FakeVmm):
    """A VMM whose API can stop answering (``hung``): ``vm.info`` then fails as the
    daemon's client reports a timed-out call."""

    def __init__(self) -> None:
        super().__init__(ejects=True)
        self.hung = False

    def view(self) -> VmmView:
        if self.hung:
            return VmmView(VmmState.UNREACHABLE, detail="vm.info: timed out after 5.0 s")
        return super().view()


def _messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "apps.daemon.daemon" and "answering" in r.getMessage()
    ]


def test_a_vmm_that_stops_answering_and_answers_again_is_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vmm = HangingVmm()
    daemon, _, _ = _daemon(vmm)
    caplog.set_level("INFO", logger="apps.daemon.daemon")
    daemon.reconcile("default/vm-0")  # answers: the step's resize and probe
    vmm.hung = True
    for _ in range(3):
        daemon._hold.clear()
        daemon.reconcile("default/vm-0")
    vmm.hung = False
    daemon.reconcile("default/vm-0")
    daemon.reconcile("default/vm-0")
    assert _messages(caplog) == [
        ("WARNING", "VMM stopped answering"),
        ("INFO", "VMM answering again"),
    ]
    lost = next(r for r in caplog.records if r.getMessage() == "VMM stopped answering")
    assert lost.__dict__.get("vm") == "default/vm-0"
    assert "timed out" in str(lost.__dict__.get("error"))


def test_a_vmm_still_starting_is_no_news(caplog: pytest.LogCaptureFixture) -> None:
    """Before a VMM first answers (its socket not there yet) nothing is logged; nor when
    the VMM of a replaced pod has not answered yet."""
    vmm = HangingVmm()
    vmm.hung = True
    daemon, _, _ = _daemon(vmm)
    caplog.set_level("INFO", logger="apps.daemon.daemon")
    daemon.reconcile("default/vm-0")
    vmm.hung = False
    daemon.reconcile("default/vm-0")
    assert _messages(caplog) == []
    # The pod is replaced (a new uid): its VMM has not answered yet.
    pod = daemon.pods.get("default", pod_name("vm-0"))
    assert pod is not None
    daemon.pods.objs[("default", pod_name("vm-0"))] = {  # type: ignore[attr-defined]
        **pod,
        "metadata": {**pod["metadata"], "uid": "pod-uid-2"},
    }
    vmm.hung = True
    daemon._hold.clear()
    daemon.reconcile("default/vm-0")
    assert _messages(caplog) == []


def test_a_deleted_vm_is_forgotten() -> None:
    vmm = HangingVmm()
    daemon, _, vms = _daemon(vmm)
    daemon.reconcile("default/vm-0")
    vmm.hung = True
    daemon._hold.clear()
    daemon.reconcile("default/vm-0")
    assert "default/vm-0" in daemon._unreachable
    del vms.objs[("default", "vm-0")]
    assert daemon.reconcile("default/vm-0") is None
    memories = (daemon._hold, daemon._unreachable, daemon._busy, daemon._answered)
    assert all("default/vm-0" not in memory for memory in memories)
