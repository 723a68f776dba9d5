"""The simulated kubelet's rules (sim/kubelet.py), driven through an in-memory API server.

``World`` stores pods as the API server would, applies the model's WritePodStatus as a
JSON merge patch and its DeletePod as a delete, and moves a fake clock. Every assertion is
about the resulting pod objects, the effects, or the model's wake-up time.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.kubelet import (
    DeletePod,
    Kubelet,
    KubeletConfig,
    KubeletInputError,
    Output,
    RecordEvent,
    Resources,
    StartVmm,
    StopVmm,
    WritePodStatus,
    fits_node,
    mark_proposed,
    pod_requests,
    rfc3339,
    selects_node,
)

GiB = 1 << 30
NODE = "node-a"
T0 = 1_700_000_000.0


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch, as the API server applies a merge-patch+json body."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _res(cpu: str, memory: str, limit_cpu: str | None = None, limit_memory: str | None = None):
    return {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": limit_cpu or cpu, "memory": limit_memory or memory},
    }


class World:
    def __init__(self, cpu: str = "4", memory: int = 8 * GiB, **config: Any) -> None:
        from core.quantity import parse_millicores

        self.config = KubeletConfig(NODE, cpu=parse_millicores(cpu), memory=memory, **config)
        self.kubelet = Kubelet(self.config)
        self.pods: dict[str, dict[str, Any]] = {}
        self.now = T0
        self.usage: dict[str, int] = {}
        # VMM exits to report in the next step only (uid -> exit code).
        self.exits: dict[str, int] = {}
        self.log: list[Any] = []
        self.last = Output()
        self._serial = 0

    def add(self, name: str, containers: dict[str, dict[str, Any]], **spec: Any) -> str:
        self._serial += 1
        uid = f"uid-{name}"
        self.pods[name] = {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": uid,
                "generation": 1,
                "creationTimestamp": rfc3339(self.now + self._serial),
            },
            "spec": {
                "nodeName": NODE,
                "containers": [
                    {"name": c, "image": "ch:latest", "resources": r} for c, r in containers.items()
                ],
                **spec,
            },
            "status": {"phase": "Pending", "qosClass": "Guaranteed"},
        }
        return uid

    def add_vm(self, name: str, cpu: str, memory: str) -> str:
        return self.add(name, {"vm-manager": _res(cpu, memory)})

    def resize(self, name: str, **containers: dict[str, Any]) -> int:
        pod = self.pods[name]
        for c in pod["spec"]["containers"]:
            if c["name"] in containers:
                c["resources"] = containers[c["name"]]
        pod["metadata"]["generation"] += 1
        return pod["metadata"]["generation"]

    def delete(self, name: str) -> None:
        self.pods[name]["metadata"]["deletionTimestamp"] = rfc3339(self.now)

    def step(self, advance: float = 0.0) -> Output:
        self.now += advance
        out = self.kubelet.step(
            self.now, copy.deepcopy(list(self.pods.values())), self.usage, self.exits
        )
        self.exits = {}
        for effect in out.effects:
            self.log.append(effect)
            if isinstance(effect, WritePodStatus):
                pod = self.pods[effect.name]
                assert pod["metadata"]["uid"] == effect.uid
                pod["status"] = _merge(pod["status"], effect.status)
            elif isinstance(effect, DeletePod):
                self.pods.pop(effect.name, None)
        self.last = out
        return out

    # --- reading ---------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        return self.pods[name]["status"]

    def cond(self, name: str, type_: str) -> dict[str, Any] | None:
        for c in self.status(name).get("conditions") or ():
            if c["type"] == type_:
                return c
        return None

    def cstatus(self, name: str, container: str = "vm-manager") -> dict[str, Any]:
        for cs in self.status(name)["containerStatuses"]:
            if cs["name"] == container:
                return cs
        raise AssertionError(f"no status for {container}")

    def events(self, reason: str | None = None) -> list[RecordEvent]:
        return [e for e in self.log if isinstance(e, RecordEvent) and reason in (None, e.reason)]

    def effects(self, kind: type) -> list[Any]:
        return [e for e in self.last.effects if isinstance(e, kind)]


# --- admission and start ----------------------------------------------------------------


def test_a_bound_pod_starts_running_with_its_resources():
    w = World()
    uid = w.add_vm("vm1", "2", "3Gi")
    out = w.step()
    assert out.effects[0] == StartVmm("ns", "vm1", uid)
    st = w.status("vm1")
    assert st["phase"] == "Running"
    assert st["observedGeneration"] == 1
    assert st["startTime"] == rfc3339(T0)
    assert st["qosClass"] == "Guaranteed"  # not ours: left as the API server set it
    for type_ in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady"):
        cond = w.cond("vm1", type_)
        assert cond is not None and cond["status"] == "True"
        assert cond["observedGeneration"] == 1
    cs = w.cstatus("vm1")
    assert cs["ready"] is True and cs["started"] is True
    assert cs["state"] == {"running": {"startedAt": rfc3339(T0)}}
    assert cs["resources"] == _res("2", "3Gi")
    assert cs["allocatedResources"] == {"cpu": "2", "memory": "3Gi"}
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert out.wake_at is None


def test_a_second_step_without_changes_writes_nothing():
    w = World()
    w.add_vm("vm1", "2", "3Gi")
    w.step()
    assert w.step(5).effects == ()


def test_a_lost_status_write_is_repeated():
    w = World()
    uid = w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.kubelet.status_write_failed(uid)
    assert len(w.step(1).effects) == 1
    assert isinstance(w.last.effects[0], WritePodStatus)


def test_a_pod_that_does_not_fit_is_rejected_like_the_kubelet_does():
    w = World(cpu="4", memory=4 * GiB)
    w.add_vm("big", "1", "3Gi")
    uid = w.add_vm("late", "1", "2Gi")
    w.step()
    st = w.status("late")
    assert st["phase"] == "Failed"
    assert st["reason"] == "OutOfmemory"
    assert st["message"] == (
        "Pod was rejected: Node didn't have enough resource: memory, "
        f"requested: {2 * GiB}, used: {3 * GiB}, capacity: {4 * GiB}"
    )
    assert StartVmm("ns", "late", uid) not in w.log
    assert "containerStatuses" not in st


def test_admission_counts_pod_overhead():
    w = World(cpu="3", memory=4 * GiB)
    w.add("vm1", {"vm-manager": _res("1", "1Gi")}, overhead={"cpu": "1500m"})
    w.add("vm2", {"vm-manager": _res("1", "1Gi")})
    w.step()
    assert w.kubelet.free() == (500, 3 * GiB)
    assert w.status("vm2")["reason"] == "OutOfcpu"


# --- in-place resize --------------------------------------------------------------------


def test_an_accepted_resize_completes_in_the_same_step_when_the_delay_is_zero():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    out = w.step(1)
    st = w.status("vm1")
    assert st["observedGeneration"] == gen == 2
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "2Gi")
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "2", "memory": "2Gi"}
    assert [e.reason for e in w.events()] == ["ResizeStarted", "ResizeCompleted"]
    assert '"generation":2' in w.events("ResizeStarted")[0].message
    assert out.wake_at is None
    assert len(w.effects(WritePodStatus)) == 1  # one write: no transient InProgress


def test_a_resize_with_a_delay_reports_in_progress_then_completes():
    w = World(resize_delay_s=5.0)
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    out = w.step(1)
    progress = w.cond("vm1", "PodResizeInProgress")
    assert progress is not None
    assert progress["status"] == "True"
    assert progress["observedGeneration"] == gen
    assert "reason" not in progress and "message" not in progress
    assert w.status("vm1")["observedGeneration"] == gen
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "2", "memory": "2Gi"}
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi")  # not actuated yet
    assert out.wake_at == T0 + 1 + 5

    assert w.step(4.9).effects == ()
    w.step(0.1)
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "2Gi")
    assert w.last.wake_at is None


def test_a_new_resize_during_actuation_restarts_it_toward_the_latest_spec():
    w = World(resize_delay_s=5.0)
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.step(1)
    gen = w.resize("vm1", **{"vm-manager": _res("3", "2Gi")})
    w.step(2)
    assert w.cond("vm1", "PodResizeInProgress")["observedGeneration"] == gen
    assert w.last.wake_at == T0 + 3 + 5
    w.step(5)
    assert w.cstatus("vm1")["resources"] == _res("3", "2Gi")
    assert w.cond("vm1", "PodResizeInProgress") is None


@pytest.mark.parametrize(
    ("cpu", "memory", "message"),
    [
        (
            "5",
            "1Gi",
            "Node didn't have enough capacity: cpu, requested: 5000, capacity: 4000",
        ),
        (
            "1",
            "9Gi",
            f"Node didn't have enough capacity: memory, requested: {9 * GiB}, capacity: {8 * GiB}",
        ),
        # Both too big: the kubelet names memory (it checks memory first here).
        (
            "6",
            "10Gi",
            f"Node didn't have enough capacity: memory, requested: {10 * GiB}, capacity: {8 * GiB}",
        ),
    ],
)
def test_a_resize_beyond_allocatable_is_infeasible(cpu, memory, message):
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res(cpu, memory)})
    out = w.step(1)
    pending = w.cond("vm1", "PodResizePending")
    assert pending is not None
    assert (pending["reason"], pending["message"]) == ("Infeasible", message)
    assert pending["observedGeneration"] == gen
    assert w.status("vm1")["observedGeneration"] == gen
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "1", "memory": "1Gi"}
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi")
    assert [e.reason for e in w.events()] == ["ResizeInfeasible"]
    assert out.wake_at is None  # infeasible resizes are not retried on a timer


@pytest.mark.parametrize(
    ("cpu", "memory", "message"),
    [
        (
            "4",
            "2Gi",
            "Node didn't have enough resource: cpu, requested: 4000, used: 1000, capacity: 4000",
        ),
        (
            "1",
            "6Gi",
            f"Node didn't have enough resource: memory, requested: {6 * GiB}, "
            f"used: {3 * GiB}, capacity: {8 * GiB}",
        ),
        # Both short: the admission predicate names cpu first.
        (
            "4",
            "6Gi",
            "Node didn't have enough resource: cpu, requested: 4000, used: 1000, capacity: 4000",
        ),
    ],
)
def test_a_resize_that_fits_the_node_but_not_now_is_deferred(cpu, memory, message):
    w = World(deferred_retry_s=60.0)
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "1", "3Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res(cpu, memory)})
    out = w.step(1)
    pending = w.cond("vm1", "PodResizePending")
    assert (pending["reason"], pending["message"]) == ("Deferred", message)
    assert pending["observedGeneration"] == gen
    assert w.status("vm1")["observedGeneration"] == gen
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "1", "memory": "1Gi"}
    assert out.wake_at == T0 + 1 + 60.0


def test_a_deferred_resize_is_accepted_once_another_pod_is_deleted():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    other = w.add_vm("other", "2", "2Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res("3", "2Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending")["reason"] == "Deferred"

    w.delete("other")
    w.step(1)
    kinds = [type(e) for e in w.last.effects if not isinstance(e, RecordEvent)]
    # The VMM stops first, then the terminal status, then the delete that confirms it.
    assert kinds.index(StopVmm) < kinds.index(DeletePod)
    assert StopVmm("ns", "other", other) in w.last.effects
    assert "other" not in w.pods
    # Same step: the terminated pod's room went to the deferred resize.
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"] == _res("3", "2Gi")
    assert w.status("vm1")["observedGeneration"] == gen


def test_a_deferred_resize_is_retried_periodically():
    w = World(deferred_retry_s=30.0)
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "3", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    first = w.cond("vm1", "PodResizePending")
    assert w.last.wake_at == T0 + 31
    assert w.step(29).effects == ()  # nothing changes before the period is up
    w.step(1)
    again = w.cond("vm1", "PodResizePending")
    assert again["reason"] == "Deferred"
    assert again["lastProbeTime"] == rfc3339(T0 + 31)
    assert again["lastTransitionTime"] == first["lastTransitionTime"]
    assert w.last.wake_at == T0 + 61
    assert len(w.events("ResizeDeferred")) == 1  # unchanged situation, no new event


def test_a_new_spec_that_fits_replaces_a_deferred_one():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "2", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    gen = w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "1Gi")
    assert w.status("vm1")["observedGeneration"] == gen


def test_a_spec_reverted_to_the_allocation_clears_pending():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("9", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending")["reason"] == "Infeasible"
    gen = w.resize("vm1", **{"vm-manager": _res("1", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending") is None
    assert w.status("vm1")["observedGeneration"] == gen


def test_resize_is_atomic_across_containers():
    w = World(cpu="4")
    w.add(
        "pod",
        {"vm-manager": _res("1", "1Gi"), "sidecar": _res("1", "1Gi")},
    )
    w.add_vm("other", "1", "1Gi")
    w.step()
    # Either growth alone would fit (3 of 4 cpus); together they need 5.
    w.resize("pod", **{"vm-manager": _res("2", "1Gi"), "sidecar": _res("2", "1Gi")})
    w.step(1)
    assert w.cond("pod", "PodResizePending")["reason"] == "Deferred"
    assert w.cond("pod", "PodResizePending")["message"].startswith(
        "Node didn't have enough resource: cpu, requested: 4000, used: 1000"
    )
    for container in ("vm-manager", "sidecar"):
        assert w.cstatus("pod", container)["allocatedResources"] == {"cpu": "1", "memory": "1Gi"}
        assert w.cstatus("pod", container)["resources"] == _res("1", "1Gi")
    w.delete("other")
    w.step(1)
    for container in ("vm-manager", "sidecar"):
        assert w.cstatus("pod", container)["resources"] == _res("2", "1Gi")


def test_limits_alone_can_be_resized():
    w = World()
    w.add("vm1", {"vm-manager": _res("1", "1Gi", "2", "2Gi")})
    w.step()
    w.resize("vm1", **{"vm-manager": _res("1", "1Gi", "3", "4Gi")})
    w.step(1)
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi", "3", "4Gi")
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "1", "memory": "1Gi"}


def test_limits_above_allocatable_are_not_infeasible():
    """The kubelet judges fit on requests; limits may overcommit the node."""
    w = World(cpu="4", memory=8 * GiB)
    w.add("vm1", {"vm-manager": _res("1", "1Gi", "2", "2Gi")})
    w.step()
    w.resize("vm1", **{"vm-manager": _res("1", "1Gi", "16", "64Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}


def test_a_shrink_under_way_still_holds_its_old_size_for_others():
    w = World(cpu="4", resize_delay_s=5.0)
    w.add_vm("shrinking", "3", "1Gi")
    w.add_vm("growing", "1", "1Gi")
    w.step()
    w.resize("shrinking", **{"vm-manager": _res("1", "1Gi")})
    w.step(1)
    w.resize("growing", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    assert w.cond("growing", "PodResizePending")["message"] == (
        "Node didn't have enough resource: cpu, requested: 3000, used: 3000, capacity: 4000"
    )
    w.step(4)  # the shrink is actuated; the room it frees goes to the deferred growth
    assert w.cstatus("shrinking")["resources"] == _res("1", "1Gi")
    assert w.cond("growing", "PodResizePending") is None
    assert w.cond("growing", "PodResizeInProgress")["observedGeneration"] == 2
    w.step(5)
    assert w.cstatus("growing")["resources"] == _res("3", "1Gi")


def test_pending_resizes_are_retried_highest_priority_first():
    w = World(cpu="4")
    w.add_vm("blocker", "2", "1Gi")
    w.add("low", {"vm-manager": _res("1", "1Gi")}, priority=0)
    w.add("high", {"vm-manager": _res("1", "1Gi")}, priority=1000)
    w.step()
    w.resize("low", **{"vm-manager": _res("2", "1Gi")})
    w.resize("high", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    assert w.cond("low", "PodResizePending")["reason"] == "Deferred"
    assert w.cond("high", "PodResizePending")["reason"] == "Deferred"
    w.resize("blocker", **{"vm-manager": _res("1", "1Gi")})  # room for one of the two
    w.step(1)
    assert w.cond("high", "PodResizePending") is None
    assert w.cond("low", "PodResizePending")["reason"] == "Deferred"


# --- memory-limit decrease below usage ----------------------------------------------------


def test_a_memory_decrease_below_usage_is_an_error_until_usage_drops():
    w = World(error_retry_s=10.0)
    uid = w.add_vm("vm1", "2", "4Gi")
    w.step()
    w.usage[uid] = 3 * GiB
    gen = w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    # Before the step sees the new spec, only the pods given can tell that usage matters.
    assert w.kubelet.usage_wanted() == frozenset()
    assert w.kubelet.usage_wanted(w.pods.values()) == frozenset({uid})
    out = w.step(1)
    progress = w.cond("vm1", "PodResizeInProgress")
    assert progress["reason"] == "Error"
    assert progress["message"] == (
        "cannot decrease memory limits: ["
        f"attempting to set pod memory limit ({2 * GiB}) below current usage ({3 * GiB}), "
        f'attempting to set container "vm-manager" memory limit ({2 * GiB}) '
        f"below current usage ({3 * GiB})]"
    )
    assert progress["observedGeneration"] == gen
    assert w.status("vm1")["observedGeneration"] == gen
    # Allocated, not actuated: the resources stay where they were.
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "2", "memory": "2Gi"}
    assert w.cstatus("vm1")["resources"] == _res("2", "4Gi")
    assert w.kubelet.usage_wanted() == frozenset({uid})
    assert out.wake_at == T0 + 1 + 10
    assert [e.reason for e in w.events()] == ["ResizeStarted", "ResizeError"]

    w.step(10)  # retried on the timer, still refused: the same condition, no new event
    again = w.cond("vm1", "PodResizeInProgress")
    assert (again["reason"], again["message"]) == (progress["reason"], progress["message"])
    assert again["lastTransitionTime"] == progress["lastTransitionTime"]
    assert again["lastProbeTime"] == rfc3339(T0 + 11)
    assert len(w.events("ResizeError")) == 1
    assert w.last.wake_at == T0 + 21
    w.usage[uid] = 1 * GiB
    w.step(1)  # a retry on the next call, not only on the timer
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "2Gi")
    assert w.kubelet.usage_wanted(w.pods.values()) == frozenset()


def test_a_memory_decrease_above_usage_and_unknown_usage_proceed():
    w = World()
    uid = w.add_vm("vm1", "2", "4Gi")
    other = w.add_vm("vm2", "1", "2Gi")
    w.step()
    w.usage[uid] = 1 * GiB
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.resize("vm2", **{"vm-manager": _res("1", "1Gi")})  # no usage known for vm2
    assert other not in w.usage
    w.step(1)
    assert w.cstatus("vm1")["resources"] == _res("2", "2Gi")
    assert w.cstatus("vm2")["resources"] == _res("1", "1Gi")


def test_only_the_vmm_container_is_charged_with_usage():
    w = World()
    uid = w.add("pod", {"vm-manager": _res("1", "2Gi"), "sidecar": _res("1", "2Gi")})
    w.step()
    w.usage[uid] = 3 * GiB - 1
    # The pod limit drops 4Gi -> 3Gi (above the usage); only the sidecar shrinks.
    w.resize("pod", sidecar=_res("1", "1Gi"))
    w.step(1)
    assert w.cond("pod", "PodResizeInProgress") is None
    w.resize("pod", **{"vm-manager": _res("1", "1536Mi")})
    w.step(1)
    assert w.cond("pod", "PodResizeInProgress")["message"] == (
        "cannot decrease memory limits: ["
        f"attempting to set pod memory limit ({int(2.5 * GiB)}) below current usage "
        f'({3 * GiB - 1}), attempting to set container "vm-manager" memory limit '
        f"({int(1.5 * GiB)}) below current usage ({3 * GiB - 1})]"
    )


def test_a_single_refusal_is_printed_without_brackets():
    w = World()
    # Unlimited sidecar: the pod has no pod-level memory limit, only the container check.
    uid = w.add(
        "pod",
        {"vm-manager": _res("1", "2Gi"), "sidecar": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    )
    w.step()
    w.usage[uid] = 3 * GiB
    w.resize("pod", **{"vm-manager": _res("1", "1Gi")})
    w.step(1)
    assert w.cond("pod", "PodResizeInProgress")["message"] == (
        'cannot decrease memory limits: attempting to set container "vm-manager" memory '
        f"limit ({GiB}) below current usage ({3 * GiB})"
    )


def test_a_new_resize_replaces_an_error_with_a_fresh_in_progress():
    w = World(resize_delay_s=5.0)
    uid = w.add_vm("vm1", "2", "4Gi")
    w.step()
    w.usage[uid] = 3 * GiB - 1  # below 3Gi: the second resize's limit is above it
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.step(1)
    w.step(5)
    assert w.cond("vm1", "PodResizeInProgress")["reason"] == "Error"
    assert w.cond("vm1", "PodResizeInProgress")["observedGeneration"] == 2
    gen = w.resize("vm1", **{"vm-manager": _res("2", "3Gi")})
    w.step(1)
    progress = w.cond("vm1", "PodResizeInProgress")
    assert "reason" not in progress
    assert progress["observedGeneration"] == gen == 3
    w.step(5)
    assert w.cstatus("vm1")["resources"] == _res("2", "3Gi")
    assert w.cond("vm1", "PodResizeInProgress") is None


# --- legacy status.resize -----------------------------------------------------------------


def test_legacy_mode_writes_status_resize_instead_of_conditions():
    w = World(resize_delay_s=5.0, legacy_resize_status=True, report_observed_generation=False)
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "2", "1Gi")
    w.step()
    assert "observedGeneration" not in w.status("vm1")
    assert "observedGeneration" not in w.cond("vm1", "Ready")

    w.resize("vm1", **{"vm-manager": _res("9", "1Gi")})
    w.step(1)
    assert w.status("vm1")["resize"] == "Infeasible"
    w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    assert w.status("vm1")["resize"] == "Deferred"
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    assert w.status("vm1")["resize"] == "InProgress"
    w.step(5)
    assert "resize" not in w.status("vm1")
    assert w.cstatus("vm1")["resources"] == _res("2", "1Gi")
    for c in w.status("vm1")["conditions"]:
        assert c["type"] not in ("PodResizePending", "PodResizeInProgress")


def test_mark_proposed_plays_a_pre_133_api_server():
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    assert mark_proposed(pod)["status"] == {"phase": "Running", "resize": "Proposed"}
    assert pod["status"] == {"phase": "Running"}


# --- deletion ------------------------------------------------------------------------------


def test_a_deleted_pod_is_stopped_reported_and_confirmed():
    w = World()
    uid = w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.delete("vm1")
    w.now += 1
    out = w.kubelet.step(w.now, [copy.deepcopy(w.pods["vm1"])])
    kinds = [type(e) for e in out.effects]
    assert kinds == [StopVmm, WritePodStatus, DeletePod]
    status = out.effects[1].status
    assert status["phase"] == "Succeeded"
    state = status["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["finishedAt"]) == (0, rfc3339(w.now))
    assert out.effects[2] == DeletePod("ns", "vm1", uid)
    assert w.kubelet.free() == (4000, 8 * GiB)
    # The delete did not land: it is repeated after a while, the VMM is not stopped twice.
    again = w.kubelet.step(w.now + 1, [copy.deepcopy(w.pods["vm1"])])
    assert again.effects == ()
    assert again.wake_at == w.now + 10
    later = w.kubelet.step(w.now + 10, [copy.deepcopy(w.pods["vm1"])])
    assert later.effects == (DeletePod("ns", "vm1", uid),)
    assert w.kubelet.step(w.now + 11, []).effects == ()


def test_a_pod_that_vanishes_has_its_vmm_stopped():
    w = World()
    uid = w.add_vm("vm1", "1", "1Gi")
    w.step()
    del w.pods["vm1"]
    assert w.step(1).effects == (StopVmm("ns", "vm1", uid),)
    assert w.kubelet.known() == frozenset()


def test_a_rejected_pod_is_deleted_without_a_vmm():
    w = World(memory=1 * GiB)
    uid = w.add_vm("vm1", "1", "2Gi")
    w.step()
    w.delete("vm1")
    out = w.step(1)
    assert out.effects == (DeletePod("ns", "vm1", uid),)


def test_pods_of_other_nodes_are_ignored():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.pods["vm1"]["spec"]["nodeName"] = "node-b"
    assert w.step().effects == ()


# --- a restarted kubelet adopts what runs ---------------------------------------------------


def test_a_restarted_kubelet_adopts_running_pods_without_readmitting_them():
    w = World(resize_delay_s=5.0)
    uid = w.add_vm("vm1", "3", "6Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("4", "7Gi")})
    w.step(1)  # allocated, not yet actuated
    fresh = Kubelet(w.config)
    out = fresh.step(w.now + 1, copy.deepcopy(list(w.pods.values())))
    assert StartVmm("ns", "vm1", uid) in out.effects
    assert fresh.allocated(uid) == {"vm-manager": Resources(4000, 7 * GiB, 4000, 7 * GiB)}
    assert fresh.actuated(uid) == {"vm-manager": Resources(3000, 6 * GiB, 3000, 6 * GiB)}
    status = next(e for e in out.effects if isinstance(e, WritePodStatus)).status
    assert status["phase"] == "Running"
    assert status["startTime"] == rfc3339(T0)
    progress = next(c for c in status["conditions"] if c["type"] == "PodResizeInProgress")
    assert progress["observedGeneration"] == 2
    done = fresh.step(w.now + 6, copy.deepcopy(list(w.pods.values())))
    written = next(e for e in done.effects if isinstance(e, WritePodStatus)).status
    assert written["containerStatuses"][0]["resources"] == _res("4", "7Gi")


# --- inputs ---------------------------------------------------------------------------------


def test_a_bad_quantity_names_the_pod_and_field():
    w = World()
    w.add_vm("vm1", "1", "lots")
    with pytest.raises(
        KubeletInputError,
        match=r"pod ns/vm1: spec.containers\[0\]"
        r".resources.limits.memory: 'lots' is not a quantity",
    ):
        w.step()


def test_a_pod_without_uid_is_refused():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    del w.pods["vm1"]["metadata"]["uid"]
    with pytest.raises(KubeletInputError, match=r"metadata\.uid"):
        w.step()


@pytest.mark.parametrize(
    "config",
    [
        {"cpu": 0, "memory": GiB},
        {"cpu": 1000, "memory": -1},
        {"cpu": 1000, "memory": GiB, "deferred_retry_s": 0},
        {"cpu": 1000, "memory": GiB, "resize_delay_s": -1},
        {"cpu": 1000, "memory": GiB, "runtime_poll_s": -1},
        {"cpu": 1000, "memory": GiB, "deferred_retry_initial_s": 0},
        {"cpu": 1000, "memory": GiB, "reserved_cpu": -1},
        {"cpu": 1000, "memory": GiB, "reserved_cpu": 1000},
        {"cpu": 1000, "memory": GiB, "reserved_memory": GiB // 2, "eviction_hard_memory": GiB // 2},
    ],
)
def test_nonsense_configs_are_refused(config):
    with pytest.raises(KubeletInputError):
        KubeletConfig(NODE, **config)


def test_requests_default_to_limits():
    r = Resources.from_json({"limits": {"cpu": "1500m", "memory": "1Gi"}}, "x")
    assert r == Resources(1500, GiB, 1500, GiB)
    assert r.to_json() == _res("1500m", "1Gi")


# --- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t", [0.0, 951782400.0, 1_700_000_000.9, 4102444800.0, 1709164800.0, -86400.0]
)
def test_rfc3339_agrees_with_datetime(t):
    assert rfc3339(t) == datetime.fromtimestamp(int(t // 1), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pending_pod(name, selector=None, cpu="1", memory="1Gi", **spec):
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}"},
        "spec": {
            "containers": [{"name": "c", "resources": _res(cpu, memory)}],
            **({"nodeSelector": selector} if selector is not None else {}),
            **spec,
        },
        "status": {"phase": "Pending"},
    }


@pytest.mark.parametrize(
    ("pod", "selected"),
    [
        (_pending_pod("free"), True),
        (_pending_pod("mine", {"kubernetes.io/hostname": NODE}), True),
        (_pending_pod("zone", {"zone": "a"}), True),
        (_pending_pod("theirs", {"kubernetes.io/hostname": "node-b"}), False),
        (_pending_pod("bound", nodeName="node-b"), False),
        (_pending_pod("custom", schedulerName="other"), False),
        (_pending_pod("gated", schedulingGates=[{"name": "example.com/wait"}]), False),
        (_pending_pod("ungated", schedulingGates=[]), True),
    ],
)
def test_selects_node(pod, selected):
    config = KubeletConfig(NODE, cpu=4000, memory=8 * GiB, labels={"zone": "a"})
    assert selects_node(config, pod) is selected


def test_fits_node_is_first_fit_on_allocatable():
    config = KubeletConfig(NODE, cpu=4000, memory=8 * GiB)
    bound = [_pending_pod("a", cpu="2", nodeName=NODE), _pending_pod("b", cpu="1", nodeName="x")]
    assert fits_node(config, bound, _pending_pod("new", cpu="2"))
    assert not fits_node(config, bound, _pending_pod("new", cpu="2100m"))
    bound[0]["status"]["phase"] = "Failed"
    assert fits_node(config, bound, _pending_pod("new", cpu="4"))


def test_pod_requests_counts_the_larger_of_desired_allocated_and_actual():
    pod = _pending_pod("p", cpu="1", memory="1Gi", nodeName=NODE)
    pod["status"] = {
        "containerStatuses": [
            {
                "name": "c",
                "allocatedResources": {"cpu": "2", "memory": "1Gi"},
                "resources": _res("1", "3Gi"),
            }
        ]
    }
    assert pod_requests(pod) == (2000, 3 * GiB)
    pod["spec"]["containers"][0]["resources"] = _res("8", "8Gi")
    pod["status"]["conditions"] = [{"type": "PodResizePending", "reason": "Infeasible"}]
    assert pod_requests(pod) == (2000, 3 * GiB)  # an infeasible desire holds nothing


# --- invariants over random histories ------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "resize", "delete", "usage", "wait"]),
        st.integers(0, 7),  # which pod
        st.integers(1, 6),  # cpu
        st.integers(1, 12),  # memory GiB
        st.sampled_from([0.0, 0.5, 1.0, 3.0, 11.0]),  # time passing
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, delay=st.sampled_from([0.0, 1.0, 2.5]), legacy=st.booleans())
def test_random_histories_never_overcommit_and_always_report_the_generation(ops, delay, legacy):
    w = World(
        cpu="8",
        memory=16 * GiB,
        resize_delay_s=delay,
        deferred_retry_s=5.0,
        legacy_resize_status=legacy,
    )
    for op, index, cpu, memory, wait in ops:
        name = f"p{index}"
        live = name in w.pods and "deletionTimestamp" not in w.pods[name]["metadata"]
        if op == "add" and name not in w.pods:
            w.add_vm(name, str(cpu), f"{memory}Gi")
        elif op == "resize" and live:
            w.resize(name, **{"vm-manager": _res(str(cpu), f"{memory}Gi")})
        elif op == "delete" and live:
            w.delete(name)
        elif op == "usage" and name in w.pods:
            w.usage[w.pods[name]["metadata"]["uid"]] = memory * GiB
        out = w.step(wait)
        free_cpu, free_memory = w.kubelet.free()
        assert free_cpu >= 0 and free_memory >= 0
        assert out.wake_at is None or out.wake_at > w.now
        for pod in w.pods.values():
            status = pod["status"]
            if status.get("phase") != "Running":
                continue
            assert status["observedGeneration"] == pod["metadata"]["generation"]
            uid = pod["metadata"]["uid"]
            resources = {cs["name"]: cs["resources"] for cs in status["containerStatuses"]}
            actuated = w.kubelet.actuated(uid)
            assert resources == {n: r.to_json() for n, r in actuated.items()}


# --- issue 14: the kubelet as strict as the real one --------------------------------------


def test_a_memory_decrease_to_exactly_the_usage_is_refused():
    # The real kubelet refuses at usage >= the new limit, not only above it.
    w = World()
    uid = w.add_vm("vm1", "2", "4Gi")
    w.step()
    w.usage[uid] = 2 * GiB
    gen = w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.step(1)
    progress = w.cond("vm1", "PodResizeInProgress")
    assert progress["reason"] == "Error"
    assert progress["observedGeneration"] == gen
    assert progress["message"] == (
        "cannot decrease memory limits: ["
        f"attempting to set pod memory limit ({2 * GiB}) below current usage ({2 * GiB}), "
        f'attempting to set container "vm-manager" memory limit ({2 * GiB}) '
        f"below current usage ({2 * GiB})]"
    )
    assert w.cstatus("vm1")["allocatedResources"] == {"cpu": "2", "memory": "2Gi"}
    assert w.cstatus("vm1")["resources"] == _res("2", "4Gi")
    w.usage[uid] = 2 * GiB - 1
    w.step(1)
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "2Gi")


def test_a_refused_decrease_is_retried_every_sync_period_with_one_event_per_generation():
    w = World(error_retry_s=12.0)
    uid = w.add_vm("vm1", "2", "4Gi")
    w.step()
    w.usage[uid] = 3 * GiB
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.step(1)
    assert w.last.wake_at == T0 + 1 + 12
    # The usage moves on every retry, and so does the message; the event does not.
    for extra in range(1, 4):
        w.usage[uid] = 3 * GiB + extra
        w.step(12)
        assert (
            f"below current usage ({3 * GiB + extra})"
            in w.cond("vm1", "PodResizeInProgress")["message"]
        )
        assert w.last.wake_at == w.now + 12
    assert len(w.events("ResizeError")) == 1
    # A new resize that is refused too is a new generation: one more event.
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizeInProgress")["reason"] == "Error"
    assert len(w.events("ResizeError")) == 2


def test_a_deferred_message_that_changes_raises_no_new_event():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "2", "1Gi")
    w.add_vm("third", "500m", "1Gi")
    w.step()
    gen = w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    before = w.cond("vm1", "PodResizePending")["message"]
    w.delete("third")  # what is used changes, the resize still does not fit
    w.step(1)
    after = w.cond("vm1", "PodResizePending")
    assert after["reason"] == "Deferred" and after["message"] != before
    assert after["observedGeneration"] == gen
    assert len(w.events("ResizeDeferred")) == 1


def _exit(w: World, name: str, code: int) -> None:
    w.exits[w.pods[name]["metadata"]["uid"]] = code
    w.step(1)


@pytest.mark.parametrize(
    ("policy", "code", "phase", "reason"),
    [
        ("Never", 1, "Failed", "Error"),
        ("Never", 137, "Failed", "Error"),
        ("Never", 0, "Succeeded", "Completed"),
        ("OnFailure", 0, "Succeeded", "Completed"),
    ],
)
def test_a_vmm_that_exits_terminates_its_container_and_ends_the_pod(policy, code, phase, reason):
    w = World()
    w.add("vm1", {"vm-manager": _res("1", "1Gi")}, restartPolicy=policy)
    w.step()
    _exit(w, "vm1", code)
    status = w.status("vm1")
    assert status["phase"] == phase
    terminated = w.cstatus("vm1")["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (code, reason)
    assert terminated["finishedAt"] == rfc3339(w.now)
    assert not w.cstatus("vm1")["ready"]
    ready = w.cond("vm1", "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == ("PodCompleted" if code == 0 else "PodFailed")
    assert not w.effects(StartVmm) and not w.effects(DeletePod)
    assert "vm1" in w.pods  # a terminal pod stays until someone deletes it
    assert w.step(5).effects == ()


def test_a_vmm_that_exits_under_restart_always_is_started_again_with_the_allocation():
    w = World()
    uid = w.add_vm("vm1", "2", "4Gi")  # restartPolicy defaults to Always
    w.step()
    w.usage[uid] = 3 * GiB
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizeInProgress")["reason"] == "Error"
    _exit(w, "vm1", 137)
    assert w.effects(StartVmm) == [StartVmm("ns", "vm1", uid)]
    cs = w.cstatus("vm1")
    assert w.status("vm1")["phase"] == "Running"
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 137
    assert cs["state"]["running"]["startedAt"] == rfc3339(w.now)
    # The new container has the allocated (smaller) limit: the decrease is in force.
    assert cs["resources"] == _res("2", "2Gi")
    assert w.cond("vm1", "PodResizeInProgress") is None


def test_a_vmm_that_keeps_exiting_is_restarted_after_the_crash_loop_back_off():
    """As the kubelet does: once at once, then after 10 s, 20 s, ... up to 5 min, the
    container waiting in CrashLoopBackOff meanwhile, and at once again after a long run."""
    w = World()
    uid = w.add_vm("vm1", "1", "1Gi")
    w.step()
    _exit(w, "vm1", 1)
    assert w.effects(StartVmm) == [StartVmm("ns", "vm1", uid)]
    assert w.cstatus("vm1")["restartCount"] == 1
    for backoff in (10.0, 20.0, 40.0):
        _exit(w, "vm1", 1)
        assert not w.effects(StartVmm)
        cs = w.cstatus("vm1")
        assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert f"back-off {backoff:g}s" in cs["state"]["waiting"]["message"]
        assert cs["ready"] is False and cs["lastState"]["terminated"]["exitCode"] == 1
        assert w.status("vm1")["phase"] == "Running"
        assert w.cond("vm1", "Ready")["status"] == "False"
        assert w.cond("vm1", "ContainersReady")["reason"] == "ContainersNotReady"
        assert w.last.wake_at == w.now + backoff  # the kubelet comes back for it
        restarts = cs["restartCount"]
        w.step(backoff - 0.5)
        assert not w.effects(StartVmm)
        w.step(0.5)
        assert w.effects(StartVmm) == [StartVmm("ns", "vm1", uid)]
        assert w.cstatus("vm1")["restartCount"] == restarts + 1
        assert "running" in w.cstatus("vm1")["state"]
        assert w.cond("vm1", "Ready")["status"] == "True"
    assert len(w.events("BackOff")) == 3
    # Running for longer than twice the longest back-off: the next exit restarts at once.
    w.step(2 * 300.0 + 1)
    _exit(w, "vm1", 1)
    assert w.effects(StartVmm) == [StartVmm("ns", "vm1", uid)]


def test_the_crash_loop_back_off_is_capped_at_five_minutes():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    waits = []
    for _ in range(9):
        _exit(w, "vm1", 1)
        if w.effects(StartVmm):
            waits.append(0.0)
            continue
        wait = w.last.wake_at - w.now
        waits.append(wait)
        w.step(wait)
        assert w.effects(StartVmm)
    assert waits == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


def test_an_exited_pod_frees_its_room_for_a_deferred_resize():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.add("other", {"vm-manager": _res("3", "1Gi")}, restartPolicy="Never")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending")["reason"] == "Deferred"
    _exit(w, "other", 1)
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"] == _res("3", "1Gi")


def test_a_terminal_pod_is_not_restarted_or_rewritten_by_a_restarted_kubelet():
    w = World()
    w.add("vm1", {"vm-manager": _res("1", "1Gi")}, restartPolicy="Never")
    w.step()
    _exit(w, "vm1", 2)
    fresh = Kubelet(w.config)
    out = fresh.step(w.now + 1, copy.deepcopy(list(w.pods.values())))
    assert out.effects == ()
    w.delete("vm1")
    out = fresh.step(w.now + 2, copy.deepcopy(list(w.pods.values())))
    assert [type(e) for e in out.effects] == [DeletePod]


def test_a_deleted_exited_pod_keeps_its_exit_code():
    w = World()
    w.add("vm1", {"vm-manager": _res("1", "1Gi")}, restartPolicy="Never")
    w.step()
    _exit(w, "vm1", 3)
    w.delete("vm1")
    w.step(1)
    written = [e for e in w.log if isinstance(e, WritePodStatus)][-1].status
    assert written["phase"] == "Failed"
    assert written["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert "vm1" not in w.pods


def test_a_bad_restart_policy_names_the_field():
    w = World()
    w.add("vm1", {"vm-manager": _res("1", "1Gi")}, restartPolicy="Sometimes")
    with pytest.raises(KubeletInputError, match=r"spec\.restartPolicy"):
        w.step()


def test_infeasible_is_judged_against_capacity_minus_reserved():
    w = World(cpu="4", memory=8 * GiB, reserved_cpu=1000, reserved_memory=GiB)
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("3500m", "1Gi")})
    w.step(1)
    pending = w.cond("vm1", "PodResizePending")
    assert (pending["reason"], pending["message"]) == (
        "Infeasible",
        "Node didn't have enough capacity: cpu, requested: 3500, capacity: 3000",
    )
    w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    assert w.cond("vm1", "PodResizePending") is None
    assert w.cstatus("vm1")["resources"] == _res("3", "1Gi")


def test_a_resize_inside_the_eviction_threshold_stays_deferred_for_ever():
    mib = 1 << 20
    w = World(
        memory=8 * GiB, reserved_memory=GiB, eviction_hard_memory=100 * mib, deferred_retry_s=5.0
    )
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    # 7Gi - 50Mi fits capacity minus reserved (7Gi), not allocatable (7Gi - 100Mi).
    want = 7 * GiB - 50 * mib
    w.resize("vm1", **{"vm-manager": _res("1", f"{want}")})
    w.step(1)
    pending = w.cond("vm1", "PodResizePending")
    assert pending["reason"] == "Deferred"
    assert pending["message"] == (
        f"Node didn't have enough resource: memory, requested: {want}, used: 0, "
        f"capacity: {7 * GiB - 100 * mib}"
    )
    for _ in range(10):  # alone on the node: nothing will ever free the room
        w.step(5)
        assert w.cond("vm1", "PodResizePending")["reason"] == "Deferred"
    assert len(w.events("ResizeDeferred")) == 1


def test_admission_and_binding_use_allocatable():
    config = KubeletConfig(
        NODE, cpu=4000, memory=8 * GiB, reserved_memory=GiB, eviction_hard_memory=GiB
    )
    assert (config.allocatable_cpu, config.allocatable_memory) == (4000, 6 * GiB)
    assert (config.feasible_cpu, config.feasible_memory) == (4000, 7 * GiB)
    assert fits_node(config, [], _pending_pod("a", memory="6Gi"))
    assert not fits_node(config, [], _pending_pod("a", memory="6500Mi"))
    w = World(memory=8 * GiB, reserved_memory=GiB, eviction_hard_memory=GiB)
    w.add_vm("big", "1", "6500Mi")
    w.step()
    assert w.status("big")["reason"] == "OutOfmemory"
    assert w.kubelet.free() == (4000, 6 * GiB)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"cpu_manager_static": True},
            "Resize is infeasible for Guaranteed Pods alongside CPU Manager static policy",
        ),
        (
            {"memory_manager_static": True},
            "Resize is infeasible for Guaranteed Pods alongside Memory Manager static policy",
        ),
    ],
)
def test_a_static_manager_policy_makes_guaranteed_resizes_infeasible(config, message):
    w = World(**config)
    w.add_vm("vm1", "1", "1Gi")
    w.add("burst", {"vm-manager": _res("1", "1Gi", limit_cpu="2", limit_memory="2Gi")})
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "2Gi")})
    w.resize("burst", **{"vm-manager": _res("1", "1Gi", limit_cpu="3", limit_memory="2Gi")})
    w.step(1)
    pending = w.cond("vm1", "PodResizePending")
    assert (pending["reason"], pending["message"]) == ("Infeasible", message)
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi")
    # A Burstable pod is not pinned: its resize goes through.
    assert w.cond("burst", "PodResizePending") is None
    assert w.cstatus("burst")["resources"]["limits"]["cpu"] == "3"


def test_deferred_resizes_are_retried_after_the_initial_delay_then_every_period():
    w = World(deferred_retry_initial_s=30.0, deferred_retry_s=180.0)
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "3", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(1)
    assert w.last.wake_at == T0 + 1 + 30
    w.step(30)
    assert w.cond("vm1", "PodResizePending")["lastProbeTime"] == rfc3339(T0 + 31)
    assert w.last.wake_at == T0 + 31 + 180
    w.step(179)
    assert w.cond("vm1", "PodResizePending")["lastProbeTime"] == rfc3339(T0 + 31)
    w.step(1)
    assert w.cond("vm1", "PodResizePending")["lastProbeTime"] == rfc3339(T0 + 211)


def test_a_triggered_retry_leaves_the_periodic_timer_alone():
    w = World(deferred_retry_initial_s=30.0, deferred_retry_s=180.0)
    w.add_vm("vm1", "1", "1Gi")
    w.add_vm("other", "2", "1Gi")
    w.add_vm("third", "500m", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("3", "1Gi")})
    w.step(1)
    w.delete("third")  # a retry on the trigger, still Deferred
    w.step(10)
    assert w.cond("vm1", "PodResizePending")["lastProbeTime"] == rfc3339(T0 + 11)
    w.step(1)  # the deleted pod is gone: only the deferred retry is left to wake for
    assert w.last.wake_at == T0 + 31


def test_deferred_retries_go_highest_priority_first():
    w = World(cpu="4")
    w.add_vm("hog", "3", "1Gi")
    w.add("low", {"vm-manager": _res("500m", "1Gi")}, priority=1)
    w.add("high", {"vm-manager": _res("500m", "1Gi")}, priority=100)
    w.step()
    w.resize("low", **{"vm-manager": _res("1", "1Gi")})
    w.resize("high", **{"vm-manager": _res("1", "1Gi")})
    w.step(1)
    w.resize("hog", **{"vm-manager": _res("2500m", "1Gi")})  # frees room for one of them
    w.step(1)
    assert w.cond("high", "PodResizePending") is None
    assert w.cond("low", "PodResizePending")["reason"] == "Deferred"


def test_the_runtime_poll_actuates_on_its_next_tick():
    w = World(runtime_poll_s=1.0)
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(0.3)
    assert w.cond("vm1", "PodResizeInProgress") is not None
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi")
    assert w.last.wake_at == T0 + 1  # the next whole tick of the 1 s poll
    w.step(0.69)
    assert w.cstatus("vm1")["resources"] == _res("1", "1Gi")
    w.step(0.01)
    assert w.cond("vm1", "PodResizeInProgress") is None
    assert w.cstatus("vm1")["resources"] == _res("2", "1Gi")


def test_without_a_runtime_poll_a_resize_completes_in_the_same_step():
    w = World()
    w.add_vm("vm1", "1", "1Gi")
    w.step()
    w.resize("vm1", **{"vm-manager": _res("2", "1Gi")})
    w.step(0.3)
    assert w.cstatus("vm1")["resources"] == _res("2", "1Gi")
