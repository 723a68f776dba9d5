"""API JSON to kernel values and back (core.wire)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from core import (
    Allocation,
    Capacity,
    Condition,
    ConditionStatus,
    Owner,
    Phase,
    PodPhase,
    PodResizeCondition,
    ResizeRecord,
    Resources,
    SetAllocated,
    SetCapacity,
    SetCondition,
    SetObserved,
    SetPhase,
    SetResizeTarget,
    Step,
    VmSpec,
    VmStatus,
    apply_status,
    decide,
    parse_pod,
    parse_vm,
    render_status,
)
from core.actions import EventType, RecordEvent, Requeue, ResizePod
from core.constants import FINALIZER, VM_CONTAINER, GiB, MiB
from core.wire import parse_spec, parse_status

C = Owner.CONTROLLER

# --- strategies ---------------------------------------------------------------------------

memory = st.integers(min_value=0, max_value=1 << 50)
small = st.integers(min_value=0, max_value=10**6)
allocations = st.builds(Allocation, small, memory)
records = st.builds(
    ResizeRecord,
    vcpus=small,
    memory=memory,
    generation=small,
    step=st.sampled_from(Step),
    return_phase=st.sampled_from([Phase.RUNNING, Phase.PAUSED]),
    pod_generation=st.none() | small,
    attempts=small,
    started_at=st.none() | st.just("2025-01-01T00:00:00Z"),
    vmm_requested=st.booleans(),
    wait_since=st.none() | st.floats(0, 2e9, allow_nan=False),
)
conditions = st.builds(
    Condition,
    type=st.sampled_from(["Resized", "VMMReachable", "SpecValid"]),
    status=st.sampled_from(ConditionStatus),
    reason=st.text(min_size=1, max_size=12),
    message=st.text(max_size=40),
    observed_generation=st.none() | small,
)
statuses = st.builds(
    VmStatus,
    phase=st.none() | st.sampled_from(Phase),
    node_name=st.none() | st.text(min_size=1, max_size=10),
    pod_name=st.none() | st.text(min_size=1, max_size=10),
    pod_uid=st.none() | st.uuids().map(str),
    observed_generation=st.none() | small,
    desired=st.none() | allocations,
    capacity=st.none() | st.builds(Capacity, small, memory, memory),
    allocated=st.none() | allocations,
    resize=st.none() | records,
    conditions=st.lists(conditions, max_size=3, unique_by=lambda c: c.type).map(tuple),
)


# --- status -------------------------------------------------------------------------------


@given(statuses)
def test_status_round_trips_through_json(status: VmStatus) -> None:
    rendered = render_status(status)
    assert parse_status(json.loads(json.dumps(rendered))) == status


def _merge_patch(target: object, patch: object) -> object:
    """RFC 7386, as the API server applies a status merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


@given(statuses, statuses)
def test_a_status_merge_patch_replaces_every_field_of_the_old_status(
    old: VmStatus, new: VmStatus
) -> None:
    # Found by fault schedule 14: a record's defaults were omitted, so a patch never reset
    # attempts or vmmRequested, nor cleared podGeneration.
    stored = _merge_patch({}, render_status(old))
    patched = _merge_patch(stored, json.loads(json.dumps(render_status(new))))
    assert parse_status(patched) == new


def test_status_json_uses_quantities_and_camel_case() -> None:
    status = VmStatus(
        phase=Phase.RESIZE_IN_PROGRESS,
        capacity=Capacity(16, 20 * GiB, 4 * GiB),
        allocated=Allocation(8, 4 * GiB + 256 * MiB),
        resize=ResizeRecord(12, 8 * GiB, 3, Step.VMM, pod_generation=5, vmm_requested=True),
        conditions=(Condition("Resized", ConditionStatus.FALSE, "InProgress", "x", 3),),
    )
    rendered = render_status(status, {"Resized": "2025-01-01T00:00:00Z"})
    assert rendered["phase"] == "ResizeInProgress"
    assert rendered["capacity"] == {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"}
    assert rendered["allocated"] == {"vcpus": 8, "memory": "4352Mi"}
    assert rendered["resize"] == {
        "vcpus": 12,
        "memory": "8Gi",
        "generation": 3,
        "step": "Vmm",
        "returnPhase": "Running",
        "podGeneration": 5,
        "attempts": 0,
        "startedAt": None,
        "vmmRequested": True,
        "waitSince": None,
    }
    assert rendered["conditions"] == [
        {
            "type": "Resized",
            "status": "False",
            "reason": "InProgress",
            "message": "x",
            "observedGeneration": 3,
            "lastTransitionTime": "2025-01-01T00:00:00Z",
        }
    ]


def test_empty_status_renders_nulls_so_a_merge_patch_clears_fields() -> None:
    assert render_status(VmStatus()) == {
        "phase": None,
        "nodeName": None,
        "vmPodName": None,
        "vmPodUID": None,
        "observedGeneration": None,
        "desired": None,
        "capacity": None,
        "allocated": None,
        "resize": None,
        "conditions": [],
        "vmmVersion": None,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, VmStatus()),
        ("garbage", VmStatus()),
        ({"phase": "Bogus"}, VmStatus(phase=Phase.UNKNOWN)),
        ({"phase": ""}, VmStatus()),
        ({"resize": {"vcpus": "two", "memory": "1Gi", "generation": 1, "step": "Vmm"}}, VmStatus()),
        ({"resize": {"vcpus": 2, "memory": "1Gi", "generation": 1, "step": "Nope"}}, VmStatus()),
        ({"resize": {"vcpus": True, "memory": "1Gi", "generation": 1, "step": "Vmm"}}, VmStatus()),
        ({"allocated": {"vcpus": 2, "memory": "lots"}}, VmStatus()),
        ({"allocated": [2, "1Gi"]}, VmStatus()),
        ({"capacity": {"maxVcpus": 2}}, VmStatus()),
        ({"observedGeneration": "3", "nodeName": 7}, VmStatus()),
        ({"conditions": [{"type": "Resized"}, "x", None]}, VmStatus()),
        (
            {"allocated": {"vcpus": 2, "memory": 1073741824}},
            VmStatus(allocated=Allocation(2, GiB)),
        ),
    ],
)
def test_status_that_does_not_parse_is_dropped_not_fatal(raw: object, expected: VmStatus) -> None:
    assert parse_status(raw) == expected


def test_apply_status_merges_in_order_and_keeps_the_rest() -> None:
    before = VmStatus(
        phase=Phase.RUNNING,
        node_name="n",
        capacity=Capacity(4, 8 * GiB, 2 * GiB),
        allocated=Allocation(2, 2 * GiB),
        resize=ResizeRecord(2, 4 * GiB, 2, Step.POD_GROW),
        conditions=(
            Condition("Resized", ConditionStatus.FALSE, "InProgress"),
            Condition("SpecValid", ConditionStatus.TRUE, "Valid"),
        ),
    )
    resized = Condition("Resized", ConditionStatus.TRUE, "Resized", "done", 2)
    after = apply_status(
        before,
        (
            SetPhase(Phase.POD_RESIZE_IN_PROGRESS, owner=C),
            SetPhase(Phase.RESIZE_IN_PROGRESS, owner=C),  # the later one wins
            SetCondition(resized, owner=C),
            SetResizeTarget(None, owner=C),
            SetAllocated(Allocation(2, 4 * GiB), owner=C),
            SetObserved(2, Allocation(2, 4 * GiB), "n2", owner=C),
            RecordEvent(EventType.NORMAL, "X", "y", owner=C),
            Requeue(1.0, owner=C),
            ResizePod(Resources(1, 1)),
        ),
    )
    assert after == VmStatus(
        phase=Phase.RESIZE_IN_PROGRESS,
        node_name="n2",
        observed_generation=2,
        desired=Allocation(2, 4 * GiB),
        capacity=Capacity(4, 8 * GiB, 2 * GiB),
        allocated=Allocation(2, 4 * GiB),
        resize=None,
        conditions=(resized, Condition("SpecValid", ConditionStatus.TRUE, "Valid")),
    )
    assert apply_status(before, ()) == before
    capacity = Capacity(8, 16 * GiB, 4 * GiB)
    assert apply_status(before, (SetCapacity(capacity, owner=C),)).capacity == capacity


# --- VirtualMachine -------------------------------------------------------------------------


def _vm_object(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "my-vm",
            "namespace": "default",
            "uid": "u-1",
            "generation": 4,
            "resourceVersion": "77",
            "finalizers": [FINALIZER],
        },
        "spec": {
            "instance": {"cpu": {"sockets": 2, "coresPerSocket": 4}, "memory": {"size": "4Gi"}}
        },
        "status": status,
    }


def test_parse_vm_of_the_seed_example() -> None:
    vm = parse_vm(_vm_object(phase="Running", allocated={"vcpus": 8, "memory": "4Gi"}))
    assert (vm.namespace, vm.name, vm.uid, vm.generation) == ("default", "my-vm", "u-1", 4)
    assert vm.spec == VmSpec(2, 4, 4 * GiB)
    assert vm.spec_errors == ()
    assert vm.has_finalizer and not vm.deleting
    assert vm.status.phase is Phase.RUNNING
    assert vm.status.allocated == Allocation(8, 4 * GiB)
    assert vm.key == "default/my-vm"


def test_parse_vm_keeps_bad_specs_as_errors() -> None:
    obj = _vm_object()
    obj["spec"]["instance"]["memory"]["size"] = "four gigs"
    obj["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    obj["metadata"]["finalizers"] = ["someone.else/x"]
    vm = parse_vm(obj)
    assert vm.spec is None
    assert [e.path for e in vm.spec_errors] == ["spec.instance.memory.size"]
    assert vm.deleting and not vm.has_finalizer


@pytest.mark.parametrize("meta", [None, {}, {"name": ""}, "x"])
def test_parse_vm_needs_a_name(meta: object) -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        parse_vm({"metadata": meta})


def test_parse_vm_defaults_a_missing_generation() -> None:
    obj = _vm_object()
    obj["metadata"]["generation"] = "7"
    assert parse_vm(obj).generation == 1


# --- Pod ------------------------------------------------------------------------------------


def _pod_object() -> dict[str, Any]:
    resources = {
        "requests": {"cpu": "8", "memory": "4352Mi"},
        "limits": {"cpu": "8", "memory": "4352Mi"},
    }
    return {
        "metadata": {"name": "vm-my-vm", "generation": 3, "uid": "pod-uid-1"},
        "spec": {
            "nodeName": "node-a",
            "containers": [
                {"name": "sidecar", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                {
                    "name": VM_CONTAINER,
                    "resources": {
                        "requests": {"cpu": "12", "memory": "4352Mi"},
                        "limits": {"cpu": "12", "memory": "4352Mi"},
                    },
                },
            ],
        },
        "status": {
            "phase": "Running",
            "observedGeneration": 3,
            "conditions": [
                {"type": "Ready", "status": "True"},
                {
                    "type": "PodResizePending",
                    "status": "True",
                    "reason": "Deferred",
                    "message": "not now",
                    "observedGeneration": 3,
                },
                {"type": "PodResizeInProgress", "status": "False", "reason": "Error"},
            ],
            "containerStatuses": [
                {"name": "sidecar", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                {"name": VM_CONTAINER, "resources": resources},
            ],
        },
    }


def test_parse_pod() -> None:
    pod = parse_pod(_pod_object())
    assert (pod.name, pod.uid) == ("vm-my-vm", "pod-uid-1")
    assert (pod.generation, pod.observed_generation) == (3, 3)
    assert pod.phase is PodPhase.RUNNING
    assert pod.node_name == "node-a"
    assert pod.desired == Resources(12000, 4352 * MiB)
    assert pod.actual == Resources(8000, 4352 * MiB)
    assert pod.resize_pending == PodResizeCondition("Deferred", "not now", 3)
    assert pod.resize_in_progress is None  # status False does not count
    assert pod.legacy_resize_status is None
    assert not pod.deleting and pod.resize_refused is None


def test_parse_pod_of_an_old_kubelet() -> None:
    obj = _pod_object()
    del obj["status"]["observedGeneration"]
    obj["status"]["conditions"] = []
    obj["status"]["resize"] = "Infeasible"
    pod = parse_pod(obj)
    assert pod.observed_generation is None
    assert pod.legacy_resize_status == "Infeasible"
    assert pod.resize_pending is None


def test_parse_pod_falls_back_to_requests_and_tolerates_junk() -> None:
    obj = _pod_object()
    obj["spec"]["containers"][1]["resources"] = {"requests": {"cpu": "2", "memory": "1Gi"}}
    obj["status"]["containerStatuses"][1]["resources"] = {"limits": {"cpu": "x", "memory": "1"}}
    obj["status"]["phase"] = "Exploded"
    obj["status"]["observedGeneration"] = "3"
    pod = parse_pod(obj)
    assert pod.desired == Resources(2000, GiB)
    assert pod.actual is None
    assert pod.phase is PodPhase.UNKNOWN
    assert pod.observed_generation is None


def test_parse_pod_without_status() -> None:
    pod = parse_pod({"metadata": {"name": "p"}, "spec": {"containers": []}})
    assert pod.phase is PodPhase.PENDING
    assert pod.desired is None and pod.actual is None and pod.node_name is None
    assert pod.generation == 1


# --- ch-vmm's fields (ADR 0013) -----------------------------------------------------------


def test_the_pod_name_and_uid_are_reported_as_ch_vmm_spells_them() -> None:
    status = VmStatus(phase=Phase.RUNNING, pod_name="vm-my-vm", pod_uid="u-1")
    rendered = render_status(status)
    assert (rendered["vmPodName"], rendered["vmPodUID"]) == ("vm-my-vm", "u-1")
    assert parse_status({"vmPodName": "vm-my-vm", "vmPodUID": "u-1"}) == VmStatus(
        pod_name="vm-my-vm", pod_uid="u-1"
    )
    assert parse_status({"vmPodName": 3, "vmPodUID": ""}) == VmStatus()
    observed = SetObserved(1, None, "n", "vm-my-vm", "u-2", owner=C)
    assert apply_status(status, (observed,)).pod_uid == "u-2"


def test_ch_vmm_status_fields_chscale_does_not_write_are_left_alone() -> None:
    # A merge patch only touches the keys it names: powerAction, migration and
    # volumeStatus (ch-vmm's) are never among them.
    assert not {"powerAction", "migration", "volumeStatus"} & set(render_status(VmStatus()))


def test_a_missing_memory_size_is_ch_vmms_default_of_1gi() -> None:
    for memory in ({}, {"size": None}):
        spec, errors = parse_spec({"instance": {"cpu": {"sockets": 2}, "memory": memory}})
        assert errors == () and spec is not None
        assert (spec.vcpus, spec.memory) == (2, GiB)
    spec, errors = parse_spec({})
    assert errors == () and spec is not None and spec.desired == Allocation(1, GiB)


def test_dedicated_cpus_and_hugepages_are_parsed() -> None:
    spec, errors = parse_spec(
        {
            "instance": {
                "cpu": {"sockets": 1, "coresPerSocket": 2, "dedicatedCPUPlacement": True},
                "memory": {"size": "2Gi", "hugepages": {"pageSize": "1Gi"}},
            }
        }
    )
    assert errors == () and spec is not None
    assert (spec.dedicated_cpus, spec.hugepage_size) == (True, "1Gi")
    spec, errors = parse_spec({"instance": {"memory": {"size": "2Gi", "hugepages": {}}}})
    assert spec is not None and (spec.dedicated_cpus, spec.hugepage_size) == (False, "2Mi")
    spec, errors = parse_spec(
        {"instance": {"cpu": {"dedicatedCPUPlacement": None}, "memory": {"hugepages": None}}}
    )
    assert spec is not None and (spec.dedicated_cpus, spec.hugepage_size) == (False, None)


@pytest.mark.parametrize(
    ("instance", "path"),
    [
        ({"cpu": {"dedicatedCPUPlacement": "true"}}, "spec.instance.cpu.dedicatedCPUPlacement"),
        ({"cpu": {"dedicatedCPUPlacement": 1}}, "spec.instance.cpu.dedicatedCPUPlacement"),
        ({"memory": {"hugepages": {"pageSize": "4Ki"}}}, "spec.instance.memory.hugepages.pageSize"),
        ({"memory": {"hugepages": []}}, "spec.instance.memory.hugepages"),
    ],
)
def test_mistyped_ch_vmm_fields_are_errors_with_their_path(
    instance: dict[str, Any], path: str
) -> None:
    spec, errors = parse_spec({"instance": instance})
    assert spec is None and [e.path for e in errors] == [path], errors


def test_the_crd_accepts_every_phase_chscale_writes_and_ch_vmms() -> None:
    crd = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "crd" / "virtualmachines.yaml"
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    enum = set(schema["properties"]["status"]["properties"]["phase"]["enum"])
    assert {str(p) for p in Phase} <= enum  # a new Phase needs the CRD too
    assert {"PodResizeDeferred", "PodResizeInfeasible", "Resumed"} <= enum


def test_the_status_written_after_a_decision_names_the_pod_and_keeps_it() -> None:
    vm = parse_vm(_vm_object(phase="Scheduling"))
    pod = parse_pod(_pod_object())
    status = apply_status(vm.status, decide(vm, pod))
    rendered = render_status(status)
    assert (rendered["vmPodName"], rendered["vmPodUID"]) == ("vm-my-vm", "pod-uid-1")
    # The pod gone (deleted, node lost): the status still names the pod the VM ran in.
    gone = apply_status(status, decide(vm.evolve(status=status), None))
    assert (gone.pod_name, gone.pod_uid) == ("vm-my-vm", "pod-uid-1")
