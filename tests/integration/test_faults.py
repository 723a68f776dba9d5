"""Fault injection end to end (issue 7, ADR 0008): nothing is lost.

One harness (testbed.faults.runner) on the session's control plane: fault proxies in front
of the API server for the controller and each daemon, two simulated nodes, four VMs.
Seeded schedules kill processes (also right at phase boundaries), fail and time out API
calls, delay, duplicate, reorder and cut watch events, hang VMMs and take their sockets
away, and squeeze nodes, while the checker samples RESIZE.md §8 invariants 1, 2, 3 and
5 all along; after each schedule every VM must converge (invariant 4).

A failing schedule is reported with its seed and ``python -m bench.faults --replay
SEED``; a bug it finds gets a ``test_schedule_<seed>`` regression test below.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve

from adapters.k8s.client import Conflict, Kube, NotFound, Unavailable, load_api_client
from adapters.k8s.events import EventRecorder
from adapters.k8s.informer import Informer
from adapters.k8s.vms import VmApi, finalizer_patch, vm_path
from apps.common.executor import SharedExecutor
from core import (
    AddFinalizer,
    Owner,
    ResizeRecord,
    SetResizeTarget,
    Step,
    decide,
    owned_by,
    parse_vm,
)
from core.constants import GiB
from testbed.faults.fuzz import run_fuzz
from testbed.faults.proxy import ApiProxy
from testbed.faults.runner import Harness, ScheduleResult, vm_object
from testbed.faults.schedule import CallClass

pytestmark = pytest.mark.integration

# CI size: 50 schedules (about five minutes on two idle cores); more with the variable.
SCHEDULES = int(os.environ.get("CHSCALE_FAULT_SCHEDULES", "50"))
FIRST_SEED = int(os.environ.get("CHSCALE_FAULT_SEED", "0"))
FUZZ_OBJECTS = 60


# --- regressions found by schedules (first: they must run before the harness's controller
# starts, which would otherwise reconcile their objects) ------------------------------


def test_schedule_14(control_plane: Any, namespace: str) -> None:
    """The kernel's record, written by the real executor, is what the API server stores."""
    kube = Kube(control_plane.api_client())
    name = "stale-record"
    obj = kube.create(
        vm_path(namespace), vm_object(namespace, name, "nowhere", 3, 2 * GiB, 6, 12 * GiB)
    )
    try:
        executor = SharedExecutor(VmApi(kube, EventRecorder(kube, "test")), lambda _obj: None)
        # The VMM step of generation 8, after the pod patch that made pod generation 9; the
        # VMM was asked and refused three times.
        asked = ResizeRecord(
            3, 2 * GiB, 8, Step.VMM, pod_generation=9, attempts=3, vmm_requested=True
        )
        obj = executor.write_status(
            obj, parse_vm(obj), (SetResizeTarget(asked, owner=Owner.DAEMON),)
        )
        # The guest is done; the pod must follow: the kernel forgets the old patch.
        shrink = evolve(
            asked,
            step=Step.POD_SHRINK,
            generation=9,
            pod_generation=None,
            attempts=0,
            vmm_requested=False,
        )
        executor.write_status(obj, parse_vm(obj), (SetResizeTarget(shrink, owner=Owner.DAEMON),))
        stored = parse_vm(kube.get(vm_path(namespace, name))).status.resize
        assert stored is not None
        assert (stored.step, stored.generation) == (Step.POD_SHRINK, 9)
        assert (stored.pod_generation, stored.attempts, stored.vmm_requested) == (None, 0, False)
    finally:
        kube.delete(vm_path(namespace, name))


def test_fuzz_0_22(control_plane: Any, namespace: str) -> None:
    """What the controller does for a VM with 2^63 vCPUs, against the real API server."""
    kube = Kube(control_plane.api_client())
    name = "many-sockets"
    body = vm_object(namespace, name, "nowhere", 2, 2 * GiB, 6, 12 * GiB)
    body["spec"]["instance"]["cpu"] = {"sockets": 2**62, "coresPerSocket": 2}
    kube.create(vm_path(namespace), body)
    executor = SharedExecutor(VmApi(kube, EventRecorder(kube, "test")), lambda _obj: None)
    try:
        for _ in range(3):  # finalizer, then status: as the controller's reconciles do
            obj = kube.get(vm_path(namespace, name))
            actions = owned_by(decide(parse_vm(obj), None), Owner.CONTROLLER)
            obj = executor.write_status(obj, parse_vm(obj), actions)
            if any(isinstance(a, AddFinalizer) for a in actions):
                kube.patch(vm_path(namespace, name), finalizer_patch(obj, True))
        conditions = (kube.get(vm_path(namespace, name)).get("status") or {}).get("conditions")
        assert any(
            c.get("type") == "SpecValid" and c.get("status") == "False" for c in conditions or ()
        ), conditions
    finally:
        kube.patch(vm_path(namespace, name), {"metadata": {"finalizers": None}})
        kube.delete(vm_path(namespace, name))


def test_schedule_43(control_plane: Any, namespace: str) -> None:
    """A relist that comes before the watch event of our own status write announces it.

    The schedule restarted the controller, which wrote a VM's status (cached at once by
    observe_write); a watch fault then made its informer relist before that write's watch
    event came. The listing showed the VM at exactly the cached version, so nothing was
    announced, the watch resumed past the write, and the VM, waiting for that echo to be
    decided again, stayed in PodResizeInProgress until the five-minute resync."""
    kube = Kube(control_plane.api_client())
    name = "own-write"
    kube.create(vm_path(namespace), vm_object(namespace, name, "nowhere", 2, 2 * GiB, 6, 12 * GiB))
    informer = Informer(kube, vm_path(namespace), name="vms")
    seen: list[tuple[str, str]] = []
    informer.add_handler(lambda ev, obj: seen.append((ev, obj["metadata"]["resourceVersion"])))
    try:
        informer._relist()  # the restarted controller's first listing
        written = kube.patch(
            vm_path(namespace, name) + "/status", {"status": {"phase": "PodResizeInProgress"}}
        )
        assert informer.observe_write(written)
        informer._relist()  # the watch failed before the write's event came
        assert seen[-1] == ("MODIFIED", written["metadata"]["resourceVersion"])
    finally:
        kube.delete(vm_path(namespace, name))


# --- the proxy does what it is told ----------------------------------------------------


def test_the_proxy_injects_errors_timeouts_and_stale_watches(
    control_plane: Any, namespace: str, tmp_path: Path
) -> None:
    proxy = ApiProxy("test", control_plane.kubeconfig_path)
    proxy.start()
    try:
        kube = Kube(load_api_client(str(proxy.write_kubeconfig(tmp_path / "kubeconfig"))))
        maps = f"/api/v1/namespaces/{namespace}/configmaps"
        assert kube.get(maps)["items"] == []  # transparent without faults
        proxy.fail_next(CallClass.LIST, 409, 1)
        with pytest.raises(Conflict):
            kube.get(maps)
        proxy.fail_next(CallClass.LIST, 500, 1)
        with pytest.raises(Unavailable) as error:
            kube.get(maps)
        assert error.value.status == 500
        assert kube.get(maps)["items"] == []  # the rule is used up
        # A timeout after the call reached the server: the write happened, unanswered.
        proxy.hang_next(CallClass.OTHER, 1, 0.1, after_upstream=True)
        with pytest.raises(Unavailable) as error:
            kube.create(maps, {"metadata": {"name": "written"}, "data": {}})
        assert error.value.status == 0
        assert kube.get(f"{maps}/written")["metadata"]["name"] == "written"
        # Before it reached the server: nothing happened.
        proxy.hang_next(CallClass.OTHER, 1, 0.1, after_upstream=False)
        with pytest.raises(Unavailable):
            kube.create(maps, {"metadata": {"name": "lost"}, "data": {}})
        with pytest.raises(NotFound):
            kube.get(f"{maps}/lost")
        # Duplicated watch events, then a cut watch.
        version = kube.get(maps)["metadata"]["resourceVersion"]
        proxy.set_watch_faults(30, duplicate=True)
        seen: list[str] = []
        with kube.open_watch(maps, {"resourceVersion": version}, timeout=10) as stream:
            kube.create(maps, {"metadata": {"name": "twice"}, "data": {}})
            with pytest.raises(Unavailable, match="WatchInterrupted"):
                for event in stream:
                    seen.append(event["object"]["metadata"]["name"])
                    if len(seen) == 2:
                        proxy.drop_watches()
        assert seen == ["twice", "twice"]
        assert proxy.injected["watch:duplicate"] == 1
        assert proxy.injected["watch:drop"] == 1
        # Delayed watch events arrive no sooner than the delay.
        version = kube.get(maps)["metadata"]["resourceVersion"]
        proxy.set_watch_faults(30, delay=0.5)
        with kube.open_watch(maps, {"resourceVersion": version}, timeout=10) as stream:
            began = time.monotonic()
            kube.create(maps, {"metadata": {"name": "late"}, "data": {}})
            event = next(iter(stream))
            assert time.monotonic() - began >= 0.5
            assert event["object"]["metadata"]["name"] == "late"
    finally:
        proxy.stop()


# --- the schedules ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("faults"), control_plane=control_plane)
    h.start()
    yield h
    h.stop()


def _play(harness: Harness, seed: int) -> ScheduleResult:
    return harness.run(harness.schedule(seed))


@pytest.mark.timeout(1800)
def test_seeded_fault_schedules_lose_nothing(harness: Harness) -> None:
    results = [_play(harness, seed) for seed in range(FIRST_SEED, FIRST_SEED + SCHEDULES)]
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(r.report() for r in failed)
    assert len(results) == SCHEDULES
    # The schedules did something: faults took effect and the checker looked.
    assert sum(r.faults_injected for r in results) >= SCHEDULES
    assert harness.checks() > 100 * SCHEDULES


@pytest.mark.timeout(600)
def test_malformed_vms_never_crash_the_controller(harness: Harness) -> None:
    result = run_fuzz(harness, FUZZ_OBJECTS, seed=FIRST_SEED)
    assert not result.failures, "\n".join(result.failures)
    assert result.written > FUZZ_OBJECTS // 2  # most got past the schema to the controller
    assert result.flagged > FUZZ_OBJECTS // 4
