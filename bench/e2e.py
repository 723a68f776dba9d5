"""Benchmark: resize latency end to end on the real local stack, against its floor.

    python -m bench.e2e                     # 20 resizes, alternately grow and shrink
    python -m bench.e2e --resizes 40 --latencies
    python -m bench.e2e --eject-delay 0     # a guest that ejects vCPUs at once

A real kube-apiserver and etcd, the admission webhook, the controller, one simulated
kubelet (no artificial actuation delay) and its node daemon, the Cloud Hypervisor
simulator. One VM is resized ``--resizes`` times, alternately grown (2 -> 4 vCPUs, 2Gi ->
4Gi) and shrunk back; each latency is the time from sending the spec change to reading
the VM back Running with allocated == spec (polled every ``--poll`` seconds). Prints
``e2e_p50_ms`` and ``e2e_p99_ms``, split by grow and shrink.

The floor, in the same run (ADR 0015): the controller and the node daemon are stopped,
then the same calls a resize needs are issued back to back by this process alone, on a
second VM and pod no component acts on: the spec patch through the webhooks, the VM
status writes of each phase (conditional, as chscale writes them), the pods/resize
patch, the pod status write the kubelet would make, and one ``vm.resize`` on a VMM
simulator's socket. ``e2e_floor_ms`` is its median; ``e2e_over_floor_p50``/``_p99`` are
chscale's percentiles divided by it (ratios are what to compare on a shared machine).

``api_writes_per_resize`` counts the write requests (POST, PUT, PATCH, DELETE) the API
server itself counted (``apiserver_request_total`` on its /metrics) during the resizes,
divided by their number: the bench's own spec patch included, node heartbeats and
leases excluded (printed as ``api_background_writes_per_resize``). One
``api_writes_per_resize_<resource>_<subresource>_<verb>`` line per kind of write.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.k8s.client import Kube
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged, resize_vm
from bench.measure import (
    RequestKey,
    busy_gaps,
    parse_request_totals,
    per_resize,
    percentile,
    ratio,
    writes_between,
)
from core import parse_vm
from core.constants import POD_MEMORY_OVERHEAD, VM_CONTAINER, MiB
from core.quantity import parse_bytes
from testbed.kubelet.vmm import DEFAULT_VMM_COMMAND
from testbed.localstack.stack import Stack
from testbed.procs import Child

NAMESPACE = "default"
VM_NAME = "bench-e2e"
FLOOR_VM_NAME = "bench-e2e-floor"
# No kubelet serves this node, so nothing acts on the floor's pod but this process.
FLOOR_NODE = "chscale-floor-nowhere"
NODE = "node-a"
SMALL = (2, "2Gi")
LARGE = (4, "4Gi")
CONVERGE_TIMEOUT_S = 60.0
DEFAULT_RESIZES = 20
VMM_START_TIMEOUT_S = 30.0
MS = 1000.0
QUIET_S = 0.3
QUIET_ROUNDS = 10


def vm_object(vcpus: int, memory: str, name: str = VM_NAME) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": vcpus}, "memory": {"size": memory}}
        },
    }


def wait_resized(kube: Kube, vcpus: int, memory: int, poll: float) -> dict[str, Any]:
    """Poll until the VM is Running/Paused with allocated == spec == (vcpus, memory)."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    url = vm_path(NAMESPACE, VM_NAME)
    while True:
        obj = kube.get(url)
        vm = parse_vm(obj)
        if (
            vm.spec is not None
            and (vm.spec.vcpus, vm.spec.memory) == (vcpus, memory)
            and converged(obj)
        ):
            return obj
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{VM_NAME} did not reach {vcpus} vCPUs / {memory} bytes within "
                f"{CONVERGE_TIMEOUT_S:.0f}s: {obj.get('status')}"
            )
        time.sleep(poll)


def request_totals(kube: Kube) -> dict[RequestKey, float]:
    """The API server's own request counters (its /metrics, as the admin)."""
    resp = kube.pool.request("GET", kube.host + "/metrics", headers={"Accept": "text/plain"})
    if resp.status != 200:
        raise RuntimeError(f"GET /metrics answered {resp.status}: {resp.data[:200]!r}")
    return parse_request_totals(resp.data.decode())


def quiet_totals(kube: Kube) -> dict[RequestKey, float]:
    """The counters once the writes that trail a converged resize (its events) are in:
    two snapshots ``QUIET_S`` apart with the same write counts, or the last one."""
    totals = request_totals(kube)
    for _ in range(QUIET_ROUNDS):
        time.sleep(QUIET_S)
        newer = request_totals(kube)
        if not writes_between(totals, newer):
            return newer
        totals = newer
    return totals


def run(
    kube: Kube, resizes: int, poll: float, settle: float
) -> tuple[list[float], Counter[RequestKey]]:
    """The resizes' latencies and the API writes they made (the VM's creation and boot
    not included)."""
    apply_vm(kube, vm_object(*SMALL), NAMESPACE)
    Follower(kube, NAMESPACE, VM_NAME).wait(converged, CONVERGE_TIMEOUT_S)
    before = quiet_totals(kube)
    latencies: list[float] = []
    for i in range(resizes):
        vcpus, memory = LARGE if i % 2 == 0 else SMALL
        if settle:
            time.sleep(settle)
        started = time.perf_counter()
        resize_vm(kube, NAMESPACE, VM_NAME, vcpus, memory)
        wait_resized(kube, vcpus, parse_bytes(memory), poll)
        latencies.append(time.perf_counter() - started)
    return latencies, writes_between(before, quiet_totals(kube))


# --- the floor ----------------------------------------------------------------------------


def pod_memory(memory: str) -> str:
    return f"{(parse_bytes(memory) + POD_MEMORY_OVERHEAD) // MiB}Mi"


def floor_pod(template: dict[str, Any]) -> dict[str, Any]:
    """A copy of the VM pod's spec, bound to a node no kubelet serves."""
    spec = copy.deepcopy(template["spec"])
    spec["nodeName"] = FLOOR_NODE
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"vm-{FLOOR_VM_NAME}", "namespace": NAMESPACE},
        "spec": spec,
    }


def pod_status(
    template: dict[str, Any], vcpus: int, memory: str, generation: int
) -> dict[str, Any]:
    """The pod status the kubelet writes once a resize is actuated (template: the VM pod's
    status as the simulated kubelet last wrote it), for (vcpus, memory)."""
    status = copy.deepcopy(template)
    values = {"cpu": str(vcpus), "memory": pod_memory(memory)}
    for container in status.get("containerStatuses") or []:
        if container.get("name") == VM_CONTAINER:
            container["resources"] = {"requests": dict(values), "limits": dict(values)}
            container["allocatedResources"] = dict(values)
    status["observedGeneration"] = generation
    return status


def vm_status(
    template: dict[str, Any], phase: str, generation: int, desired: tuple[int, str], done: bool
) -> dict[str, Any]:
    """The VM status of one phase of a resize to ``desired`` (template: the bench VM's
    status as chscale last wrote it)."""
    status = copy.deepcopy(template)
    vcpus, memory = desired
    status["phase"] = phase
    status["observedGeneration"] = generation
    status["desired"] = {"vcpus": vcpus, "memory": memory}
    status["vmPodName"] = f"vm-{FLOOR_VM_NAME}"
    if done:
        status["allocated"] = {"vcpus": vcpus, "memory": memory}
    return status


class Floor:
    """The calls one resize needs, made back to back by this process alone."""

    def __init__(self, kube: Kube, stack: Stack, vm_template: dict[str, Any]) -> None:
        self.kube = kube
        pod_name = (vm_template.get("status") or {}).get("vmPodName") or f"vm-{VM_NAME}"
        pod_template = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}")
        self.vm_status = vm_template["status"]
        self.pod_status = pod_template["status"]
        self.vm_url = vm_path(NAMESPACE, FLOOR_VM_NAME)
        self.pod_url = f"/api/v1/namespaces/{NAMESPACE}/pods/vm-{FLOOR_VM_NAME}"
        pod = kube.create(f"/api/v1/namespaces/{NAMESPACE}/pods", floor_pod(pod_template))
        self.pod_uid = pod["metadata"]["uid"]
        self.pod_generation = int(pod["metadata"].get("generation") or 1)
        kube.patch(
            f"{self.pod_url}/status",
            {"metadata": {"uid": self.pod_uid}, "status": self.pod_status},
        )
        vm = apply_vm(kube, vm_object(*SMALL, name=FLOOR_VM_NAME), NAMESPACE)
        self.vm_rv = kube.patch_status(
            self.vm_url,
            vm_status(self.vm_status, "Running", int(vm["metadata"]["generation"]), SMALL, True),
            vm["metadata"]["resourceVersion"],
        )["metadata"]["resourceVersion"]
        # Its own VMM: the guest ejects vCPUs at once, because the floor counts the VMM
        # call a resize needs, not the guest's ACPI ejection (guest time, see ADR 0015).
        self.socket_dir = Path(tempfile.mkdtemp(prefix="chs-floor-"))
        socket = self.socket_dir / "ch.sock"
        boot_vcpus, max_vcpus = SMALL[0], LARGE[0]
        boot_memory = SMALL[1].removesuffix("i")  # "2Gi" -> "2G": Cloud Hypervisor's syntax
        hotplug = f"{parse_bytes(LARGE[1]) - parse_bytes(SMALL[1])}"
        stack.children["floor-vmm"] = Child(
            "floor-vmm",
            [
                *DEFAULT_VMM_COMMAND,
                "--api-socket",
                f"path={socket}",
                "--cpus",
                f"boot={boot_vcpus},max={max_vcpus}",
                "--memory",
                f"size={boot_memory},hotplug_method=virtio-mem,hotplug_size={hotplug}",
                "--sim-eject-delay",
                "0",
                "--sim-name",
                FLOOR_VM_NAME,
            ],
            stack.logs / "floor-vmm.log",
        )
        deadline = time.monotonic() + VMM_START_TIMEOUT_S
        while not socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the floor's VMM did not listen on {socket}")
            time.sleep(0.02)
        self.vmm = CloudHypervisorClient(str(socket), vm=FLOOR_VM_NAME)
        self.vmm.ping()

    def _status(self, phase: str, generation: int, desired: tuple[int, str], done: bool) -> None:
        written = self.kube.patch_status(
            self.vm_url, vm_status(self.vm_status, phase, generation, desired, done), self.vm_rv
        )
        self.vm_rv = written["metadata"]["resourceVersion"]

    def _pod_step(self, vcpus: int, memory: str) -> None:
        resized = self.kube.resize_pod(
            NAMESPACE, f"vm-{FLOOR_VM_NAME}", VM_CONTAINER, str(vcpus), pod_memory(memory)
        )
        generation = int(resized["metadata"].get("generation") or 1)
        self.kube.patch(
            f"{self.pod_url}/status",
            {
                "metadata": {"uid": self.pod_uid},
                "status": pod_status(self.pod_status, vcpus, memory, generation),
            },
        )

    def one(self, grow: bool) -> float:
        """One resize's calls (grow: pod first; shrink: guest first), in seconds."""
        target = LARGE if grow else SMALL
        vcpus, memory = target
        started = time.perf_counter()
        resized = resize_vm(self.kube, NAMESPACE, FLOOR_VM_NAME, vcpus, memory)
        generation = int(resized["metadata"]["generation"])
        # The controller decides from the object the spec patch produced.
        self.vm_rv = resized["metadata"]["resourceVersion"]
        if grow:
            self._status("PodResizeInProgress", generation, target, False)
            self._pod_step(vcpus, memory)
            self._status("ResizeInProgress", generation, target, False)
            self.vmm.resize(desired_vcpus=vcpus, desired_ram=parse_bytes(memory))
        else:
            self._status("ResizeInProgress", generation, target, False)
            self.vmm.resize(desired_vcpus=vcpus, desired_ram=parse_bytes(memory))
            self._status("PodResizeInProgress", generation, target, False)
            self._pod_step(vcpus, memory)
        self._status("Running", generation, target, True)
        self.kube.get(self.vm_url)  # the reader's confirmation, as wait_resized does
        return time.perf_counter() - started


def measure_floor(kube: Kube, stack: Stack, samples: int) -> tuple[list[float], int]:
    """Stops the controller and the node daemon, then times ``samples`` floor resizes;
    returns the times and the API writes they made."""
    for name in ("controller-0", f"daemon-{NODE}"):
        stack.children[name].stop()
    floor = Floor(kube, stack, kube.get(vm_path(NAMESPACE, VM_NAME)))
    before = request_totals(kube)
    times = [floor.one(grow=i % 2 == 0) for i in range(samples)]
    writes, _, _ = per_resize(writes_between(before, request_totals(kube)), samples)
    floor.vmm.close()
    return times, round(writes * samples)


# --- the report ---------------------------------------------------------------------------


def print_latencies(prefix: str, values: list[float]) -> None:
    if not values:
        return
    print(f"{prefix}_p50_ms={percentile(values, 50) * MS:.1f}")
    print(f"{prefix}_p99_ms={percentile(values, 99) * MS:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--resizes", type=int, default=DEFAULT_RESIZES)
    parser.add_argument(
        "--floor-samples", type=int, default=0, help="floor resizes (default: --resizes)"
    )
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between reads")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to wait before each resize"
    )
    parser.add_argument(
        "--eject-delay",
        type=float,
        help="seconds the simulated guests take to eject vCPUs (default: the simulator's)",
    )
    parser.add_argument("--latencies", action="store_true", help="also print each resize's latency")
    parser.add_argument("--state-dir", help="default: a temporary directory (logs/ in it)")
    args = parser.parse_args(argv)
    if args.resizes < 1:
        parser.error("--resizes must be >= 1")
    samples = args.floor_samples or args.resizes
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="chscale-bench-e2e-"))
    vmm_command = None
    if args.eject_delay is not None:
        vmm_command = " ".join([*DEFAULT_VMM_COMMAND, "--sim-eject-delay", str(args.eject_delay)])
    stack = Stack(
        state, nodes=1, node_cpu="16", node_memory="32Gi", webhook=True, vmm_command=vmm_command
    )
    try:
        stack.start()
        assert stack.control_plane is not None
        kube = Kube(stack.control_plane.api_client())
        latencies, writes = run(kube, args.resizes, args.poll, args.settle)
        floor, floor_writes = measure_floor(kube, stack, samples)
    finally:
        stack.stop()
    grows, shrinks = latencies[0::2], latencies[1::2]
    floor_ms = statistics.median(floor) * MS
    p50, p99 = percentile(latencies, 50) * MS, percentile(latencies, 99) * MS
    print(f"e2e_resizes={len(latencies)}")
    print(f"e2e_mean_ms={sum(latencies) / len(latencies) * MS:.1f}")
    print(f"e2e_p50_ms={p50:.1f}")
    print(f"e2e_p90_ms={percentile(latencies, 90) * MS:.1f}")
    print(f"e2e_p99_ms={p99:.1f}")
    print(f"e2e_max_ms={max(latencies) * MS:.1f}")
    print_latencies("e2e_grow", grows)
    print_latencies("e2e_shrink", shrinks)
    print(f"e2e_floor_samples={len(floor)}")
    print(f"e2e_floor_ms={floor_ms:.1f}")
    print(f"e2e_floor_p99_ms={percentile(floor, 99) * MS:.1f}")
    print_latencies("e2e_floor_grow", floor[0::2])
    print_latencies("e2e_floor_shrink", floor[1::2])
    print(f"e2e_over_floor_p50={ratio(p50, floor_ms):.2f}")
    print(f"e2e_over_floor_p99={ratio(p99, floor_ms):.2f}")
    print(f"e2e_floor_api_writes_per_resize={floor_writes / len(floor):.2f}")
    total, background, breakdown = per_resize(writes, len(latencies))
    print(f"api_writes_per_resize={total:.2f}")
    print(f"api_background_writes_per_resize={background:.2f}")
    for name, value in breakdown.items():
        print(f"api_writes_per_resize_{name}={value:.2f}")
    daemon_log = stack.logs / f"daemon-{NODE}.log"
    gaps = busy_gaps(daemon_log.read_text().splitlines()) if daemon_log.exists() else []
    # A vm.resize refused 429 (a vCPU removal still pending in the guest), retried until
    # accepted: the wait each such resize paid, from the daemon's own log.
    print(f"e2e_vmm_busy_resizes={len(gaps)}")
    if gaps:
        print(f"e2e_vmm_busy_wait_p50_ms={percentile(gaps, 50) * MS:.1f}")
        print(f"e2e_vmm_busy_wait_max_ms={max(gaps) * MS:.1f}")
    if args.latencies:
        kinds = ("grow", "shrink")
        for i, value in enumerate(latencies):
            print(f"# resize {i} {kinds[i % 2]} {value * MS:.1f} ms")
    print(f"# logs: {stack.logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
