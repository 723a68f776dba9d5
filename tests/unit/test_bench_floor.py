"""The floor's pure helpers (bench/floor.py): the bodies it writes."""

from __future__ import annotations

from bench.floor import FLOOR_NODE, floor_pod, pod_memory, pod_status, vm_status

POD = {
    "metadata": {"name": "vm-a", "namespace": "ns", "uid": "u1", "labels": {"x": "y"}},
    "spec": {"nodeName": "node-a", "containers": [{"name": "vm-manager"}]},
    "status": {
        "phase": "Running",
        "observedGeneration": 1,
        "containerStatuses": [
            {"name": "vm-manager", "resources": {}, "allocatedResources": {}},
            {"name": "sidecar", "resources": {"requests": {"cpu": "1"}}},
        ],
    },
}


def test_pod_memory_adds_the_vmm_overhead() -> None:
    assert pod_memory("2Gi") == "2304Mi"
    assert pod_memory("512Mi") == "768Mi"


def test_floor_pod_is_bound_where_no_kubelet_runs() -> None:
    pod = floor_pod(POD, "vm-floor")
    assert pod["metadata"] == {"name": "vm-floor", "namespace": "ns"}
    assert pod["spec"]["nodeName"] == FLOOR_NODE
    assert POD["spec"]["nodeName"] == "node-a"  # the template is not changed


def test_pod_status_sets_the_vm_container_only() -> None:
    status = pod_status(POD["status"], (4, "4Gi"), 3)
    vmm, sidecar = status["containerStatuses"]
    want = {"cpu": "4", "memory": "4352Mi"}
    assert vmm["resources"] == {"requests": want, "limits": want}
    assert vmm["allocatedResources"] == want
    assert sidecar == POD["status"]["containerStatuses"][1]
    assert status["observedGeneration"] == 3
    assert POD["status"]["observedGeneration"] == 1


def test_vm_status_of_a_phase() -> None:
    template = {"phase": "Running", "allocated": {"vcpus": 2, "memory": "2Gi"}, "conditions": []}
    mid = vm_status(template, "PodResizeInProgress", 5, (4, "4Gi"), False, "vm-floor")
    assert mid["phase"] == "PodResizeInProgress"
    assert mid["observedGeneration"] == 5
    assert mid["desired"] == {"vcpus": 4, "memory": "4Gi"}
    assert mid["allocated"] == {"vcpus": 2, "memory": "2Gi"}
    assert mid["vmPodName"] == "vm-floor"
    done = vm_status(template, "Running", 5, (4, "4Gi"), True, "vm-floor")
    assert done["allocated"] == {"vcpus": 4, "memory": "4Gi"}
    assert template["allocated"] == {"vcpus": 2, "memory": "2Gi"}
