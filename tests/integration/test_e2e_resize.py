"""End to end: the real API server, the webhook, the controller, the simulated kubelets,
the Cloud Hypervisor simulators and the node daemons, as separate processes.

Each test asserts the state of the world (VM status, pod resources, events, what the VMM
reports), not the calls made, except where the contract counts calls (pods/resize).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import CloudHypervisorError
from adapters.k8s.client import Kube, NotFound
from adapters.k8s.vms import vm_path
from apps.cli.vmops import (
    Follower,
    converged,
    event_reasons,
    events_for,
    resize_refused,
    resize_vm,
    wait_for_events,
)
from core import parse_vm
from core.constants import API_GROUP, API_VERSION, POD_MEMORY_OVERHEAD, VM_CONTAINER, GiB
from core.kernel import RESIZED
from core.podlayout import vmm_socket_path
from core.quantity import parse_bytes, parse_millicores
from testbed.localstack.stack import NodeSpec, Stack

pytestmark = pytest.mark.integration

BIG, SMALL = "e2e-big", "e2e-small"
HOSTNAME = "kubernetes.io/hostname"
WEBHOOK = True


@pytest.fixture(scope="module")
def stack(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("e2e"),
        nodes=[NodeSpec(BIG, "32", "64Gi"), NodeSpec(SMALL, "8", "16Gi")],
        control_plane=control_plane,
        webhook=WEBHOOK,
        # A little actuation time, and a guest that (un)plugs at 8 GiB/s, so that every
        # phase is observable by a sampling test; still well under a second per resize.
        resize_delay=0.2,
        vmm_command="python -m testbed.chsim.main --sim-plug-rate 8G --sim-eject-delay 0.2",
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture
def vms(kube: Kube, namespace: str) -> Iterator[list[str]]:
    """Names of the VMs a test creates; deleted (pods and all) when it ends. There is no
    kube-controller-manager, so namespace deletion would not clean anything up."""
    names: list[str] = []
    yield names
    for name in names:
        kube.delete(vm_path(namespace, name))
    deadline = time.monotonic() + 60
    for name in names:
        while time.monotonic() < deadline:
            try:
                kube.get(vm_path(namespace, name))
            except NotFound:
                break
            time.sleep(0.1)


def create_vm(
    kube: Kube,
    namespace: str,
    names: list[str],
    name: str,
    node: str,
    sockets: int = 2,
    cores: int = 4,
    memory: str = "4Gi",
    max_size: str | None = None,
) -> dict[str, Any]:
    mem: dict[str, Any] = {"size": memory}
    if max_size:
        mem["maxSize"] = max_size
    obj = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "instance": {"cpu": {"sockets": sockets, "coresPerSocket": cores}, "memory": mem},
            "nodeSelector": {HOSTNAME: node},
        },
    }
    created = kube.create(vm_path(namespace), obj)
    names.append(name)
    return created


def wait_converged(kube: Kube, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    return Follower(kube, namespace, name).wait(converged, timeout)


def pod(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(f"/api/v1/namespaces/{namespace}/pods/vm-{name}")


def container_resources(pod_obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = next(c for c in pod_obj["spec"]["containers"] if c["name"] == VM_CONTAINER)
    status = next(c for c in pod_obj["status"]["containerStatuses"] if c["name"] == VM_CONTAINER)
    return spec["resources"], status["resources"]


def assert_pod_matches_seed_formula(pod_obj: dict[str, Any], vcpus: int, memory: int) -> None:
    spec, actual = container_resources(pod_obj)
    for resources in (spec, actual):
        for kind in ("requests", "limits"):
            assert parse_millicores(resources[kind]["cpu"]) == vcpus * 1000
            assert parse_bytes(resources[kind]["memory"]) == memory + POD_MEMORY_OVERHEAD


def reasons(kube: Kube, namespace: str, name: str, component: str | None = None) -> list[str]:
    return event_reasons(events_for(kube, namespace, name), component)


def wait_reasons(
    kube: Kube,
    namespace: str,
    name: str,
    ok: Callable[[list[str]], bool],
    timeout: float = 10,
    component: str | None = None,
) -> list[str]:
    """The VM's Event reasons in order (only ``component``'s, if given), once ``ok`` holds
    for them."""
    events = wait_for_events(
        kube, namespace, name, lambda evs: ok(event_reasons(evs, component)), timeout
    )
    found = event_reasons(events, component)
    assert ok(found), " ".join(found)
    return found


def wait_event(
    kube: Kube, namespace: str, name: str, reason: str, timeout: float = 10
) -> list[dict[str, Any]]:
    """The VM's Events of ``reason``, once there is one."""
    events = wait_for_events(
        kube, namespace, name, lambda evs: reason in event_reasons(evs), timeout
    )
    return [e for e in events if e["reason"] == reason]


def vmm_client(stack: Stack, pod_obj: dict[str, Any]) -> CloudHypervisorClient:
    node = pod_obj["spec"]["nodeName"]
    path = vmm_socket_path(str(stack.socket_root(node)), pod_obj["metadata"]["uid"])
    return CloudHypervisorClient(path, timeout=2.0)


def pod_resize_requests(stack: Stack, controller: str = "controller-0") -> float:
    port = stack.metrics_ports[controller]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("chscale_controller_pod_resize_requests_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the seed's examples --------------------------------------------------------------


# A growth's Events, in order, per component. Each component writes an Event after the
# status write it belongs to, so across components only causality orders them. The
# hand-off that opens the guest step announces its VMM resize (ADR 0019).
GROWTH_EVENTS = {
    "chscale-controller": [
        "VMResizeInitiated",  # resize detected
        "VMResizePodInitiated",  # pod resize accepted
        "VMResizeInProgress",  # pod step done, VMM step begins
        "VMResizeInitiated",  # the VMM resize, asked from here on
    ],
    "chscale-daemon": [
        "VMResizeCompleted",
    ],
}


def _in_order(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


@pytest.mark.parametrize(
    ("sockets", "cores", "memory"),
    [(2, 6, "4Gi"), (2, 4, "8Gi"), (4, 4, "16Gi")],
    ids=["cpu-8-to-12", "memory-4Gi-to-8Gi", "combined-16-vcpus-16Gi"],
)
def test_seed_example(
    stack: Stack, kube: Kube, namespace: str, vms: list[str], sockets: int, cores: int, memory: str
) -> None:
    create_vm(kube, namespace, vms, "seed", BIG)
    wait_converged(kube, namespace, "seed")
    before = {c: len(reasons(kube, namespace, "seed", c)) for c in GROWTH_EVENTS}
    kube.patch(
        vm_path(namespace, "seed"),
        {
            "spec": {
                "instance": {
                    "cpu": {"sockets": sockets, "coresPerSocket": cores},
                    "memory": {"size": memory},
                }
            },
        },
    )
    obj = wait_converged(kube, namespace, "seed")
    vm = parse_vm(obj)
    assert vm.status.allocated is not None
    assert (vm.status.allocated.vcpus, vm.status.allocated.memory) == (
        sockets * cores,
        parse_bytes(memory),
    )
    cond = vm.status.condition(RESIZED)
    assert cond is not None and cond.status == "True"
    assert_pod_matches_seed_formula(
        pod(kube, namespace, "seed"), sockets * cores, parse_bytes(memory)
    )
    info = vmm_client(stack, pod(kube, namespace, "seed")).info()
    assert info.config.cpus.boot_vcpus == sockets * cores
    assert info.guest_memory == parse_bytes(memory)
    for component, expected in GROWTH_EVENTS.items():
        skip = before[component]
        # Called before the loop moves on: binding the loop variables late is safe here.
        wait_reasons(
            kube,
            namespace,
            "seed",
            lambda found: _in_order(expected, found[skip:]),  # noqa: B023
            component=component,
        )


# --- refusals -------------------------------------------------------------------------


def test_infeasible_is_refused_once_and_the_pod_restored(
    stack: Stack, kube: Kube, namespace: str, vms: list[str]
) -> None:
    create_vm(kube, namespace, vms, "huge", SMALL, sockets=1, cores=2, max_size="32Gi")
    wait_converged(kube, namespace, "huge")
    calls_before = pod_resize_requests(stack)
    resize_vm(kube, namespace, "huge", None, "20Gi")  # 20Gi + 256Mi can never fit in 16Gi
    follower = Follower(kube, namespace, "huge")
    obj = follower.wait(lambda o: resize_refused(o) is not None, 60)
    vm = parse_vm(obj)
    assert vm.status.phase == "Running"
    cond = vm.status.condition(RESIZED)
    assert cond is not None and cond.reason == "PodResizeInfeasible"
    infeasible = wait_event(kube, namespace, "huge", "VMPodResizeInfeasible")
    assert len(infeasible) == 1 and infeasible[0]["type"] == "Warning"
    assert "Node didn't have enough capacity" in infeasible[0]["message"]
    # The pod goes back to what it has; the kubelet then drops the pending resize.
    deadline = time.monotonic() + 30
    while True:
        p = pod(kube, namespace, "huge")
        conditions = {c["type"] for c in p["status"].get("conditions") or []}
        if "PodResizePending" not in conditions or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert_pod_matches_seed_formula(p, 2, 4 * GiB)
    assert "PodResizePending" not in conditions
    # One request to grow, one to restore, and nothing more for this generation.
    assert pod_resize_requests(stack) - calls_before == 2
    time.sleep(3)
    assert pod_resize_requests(stack) - calls_before == 2
    assert parse_vm(kube.get(vm_path(namespace, "huge"))).status.phase == "Running"
    # A new spec generation is tried again, and a feasible one succeeds.
    resize_vm(kube, namespace, "huge", None, "8Gi")
    wait_converged(kube, namespace, "huge")


def test_deferred_completes_when_room_is_made(
    stack: Stack, kube: Kube, namespace: str, vms: list[str]
) -> None:
    create_vm(kube, namespace, vms, "grower", SMALL, sockets=1, cores=2, max_size="12Gi")
    create_vm(kube, namespace, vms, "squatter", SMALL, sockets=1, cores=2, memory="8Gi")
    wait_converged(kube, namespace, "grower")
    wait_converged(kube, namespace, "squatter")
    resize_vm(kube, namespace, "grower", None, "10Gi")  # fits the node, not beside squatter
    follower = Follower(kube, namespace, "grower")

    def deferred(obj: dict[str, Any]) -> bool:
        cond = parse_vm(obj).status.condition(RESIZED)
        return cond is not None and cond.reason == "PodResizeDeferred"

    obj = follower.wait(deferred, 30)
    assert parse_vm(obj).status.phase == "PodResizeInProgress"
    assert wait_event(kube, namespace, "grower", "VMPodResizeDeferred")
    kube.delete(vm_path(namespace, "squatter"))  # make room; no user action on grower
    obj = follower.wait(converged, 60)
    assert parse_vm(obj).status.allocated.memory == 10 * GiB  # type: ignore[union-attr]


# --- shrink order ---------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples the pod's enforced memory limit and the guest's memory as fast as it can."""

    def __init__(self, kube: Kube, stack: Stack, namespace: str, name: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.stack, self.namespace, self.name = kube, stack, namespace, name
        self.samples: list[tuple[float, int, int]] = []  # (t, pod limit, guest memory)
        self.stopped = threading.Event()

    def run(self) -> None:
        client = vmm_client(self.stack, pod(self.kube, self.namespace, self.name))
        while not self.stopped.is_set():
            self._sample(client)
        # One sample taken wholly after the stop request, so the end state is among them:
        # the pod's final drop can land just before the VM reads Running, inside the
        # sample that was running when the test saw Running.
        for _ in range(10):
            if self._sample(client):
                return

    def _sample(self, client: CloudHypervisorClient) -> bool:
        try:
            info = client.info()
            limit = parse_bytes(
                container_resources(pod(self.kube, self.namespace, self.name))[1]["limits"][
                    "memory"
                ]
            )
            info_after = client.info()
        except (CloudHypervisorError, NotFound, KeyError, StopIteration):
            return False
        requested = info.config.memory.size + (info.config.memory.hotplugged_size or 0)
        # The most the guest held around the pod read: conservative for the check.
        guest = max(requested, info.guest_memory, info_after.guest_memory)
        self.samples.append((time.monotonic(), limit, guest))
        return True


def test_memory_shrink_shrinks_the_guest_before_the_pod(
    stack: Stack, kube: Kube, namespace: str, vms: list[str]
) -> None:
    create_vm(kube, namespace, vms, "shrinker", BIG, sockets=1, cores=2, memory="4Gi")
    wait_converged(kube, namespace, "shrinker")
    resize_vm(kube, namespace, "shrinker", None, "12Gi")
    wait_converged(kube, namespace, "shrinker")
    sampler = Sampler(kube, stack, namespace, "shrinker")
    sampler.start()
    try:
        resize_vm(kube, namespace, "shrinker", None, "4Gi")
        obj = wait_converged(kube, namespace, "shrinker")
    finally:
        sampler.stopped.set()
        sampler.join(5)
    samples = sampler.samples
    assert len(samples) > 10, "the sampler saw too little to judge"
    for _t, limit, guest in samples:
        assert limit >= guest + POD_MEMORY_OVERHEAD, (limit, guest)
    # The guest went down before the pod did.
    first_pod_drop = next(t for t, limit, _ in samples if limit < 12 * GiB + POD_MEMORY_OVERHEAD)
    guest_done = next(t for t, _, guest in samples if guest == 4 * GiB)
    assert guest_done <= first_pod_drop
    assert parse_vm(obj).status.allocated.memory == 4 * GiB  # type: ignore[union-attr]

    def last_resize_completed(order: list[str]) -> bool:
        last = order[len(order) - 1 - order[::-1].index("VMResizeInitiated") :]
        return "VMResizeCompleted" in last

    wait_reasons(kube, namespace, "shrinker", last_resize_completed)


# --- spec changes mid-resize ----------------------------------------------------------


@pytest.mark.parametrize("phase", ["PodResizeInProgress", "ResizeInProgress"])
def test_spec_change_mid_resize_converges_to_the_newest(
    stack: Stack, kube: Kube, namespace: str, vms: list[str], phase: str
) -> None:
    name = f"changer-{phase.lower()}"
    create_vm(kube, namespace, vms, name, BIG, sockets=1, cores=2, memory="4Gi")
    wait_converged(kube, namespace, name)
    resize_vm(kube, namespace, name, 4, "8Gi")  # the ceilings are 4 vCPUs and 20Gi
    follower = Follower(kube, namespace, name)
    follower.wait(lambda o: (o.get("status") or {}).get("phase") == phase, 30, interval=0.005)
    resize_vm(kube, namespace, name, 3, "6Gi")
    obj = follower.wait(converged, 60)
    vm = parse_vm(obj)
    assert vm.status.allocated is not None
    assert (vm.status.allocated.vcpus, vm.status.allocated.memory) == (3, 6 * GiB)
    assert_pod_matches_seed_formula(pod(kube, namespace, name), 3, 6 * GiB)


# --- crash safety ---------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["PodResizeInProgress", "ResizeInProgress"])
def test_controller_sigkill_mid_resize_converges(
    stack: Stack, kube: Kube, namespace: str, vms: list[str], phase: str
) -> None:
    name = f"crash-{phase.lower()}"
    create_vm(kube, namespace, vms, name, BIG, sockets=1, cores=2, memory="4Gi")
    wait_converged(kube, namespace, name)
    generation_before = pod(kube, namespace, name)["metadata"]["generation"]
    resize_vm(kube, namespace, name, 4, "8Gi")
    follower = Follower(kube, namespace, name)
    follower.wait(lambda o: (o.get("status") or {}).get("phase") == phase, 30, interval=0.005)
    stack.children["controller-0"].kill()
    stack.start_controller(0)
    obj = follower.wait(converged, 60)
    assert parse_vm(obj).status.allocated.memory == 8 * GiB  # type: ignore[union-attr]
    # A growth takes exactly one pod resize (one generation bump): none was repeated
    # with different values, and an identical repeat would have been a no-op.
    assert pod(kube, namespace, name)["metadata"]["generation"] == generation_before + 1
