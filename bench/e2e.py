"""Benchmark: resize latency end to end on the real local stack, against its floor.

    python -m bench.e2e                     # 20 resizes, alternately grow and shrink
    python -m bench.e2e --resizes 40 --latencies
    python -m bench.e2e --eject-delay 0     # a guest that ejects vCPUs at once

A real kube-apiserver and etcd, the admission webhook, the controller, one simulated
kubelet (no artificial actuation delay) and its node daemon, the Cloud Hypervisor
simulator. One VM is resized ``--resizes`` times, alternately grown (2 -> 4 vCPUs, 2Gi ->
4Gi) and shrunk back; each latency is the time from sending the spec change to reading
the VM back Running with allocated == spec, as a watch opened before the change delivers
it (``--poll S``: read every S seconds instead; polling every 5 ms added its own GETs to a
2-core API server in the middle of the resize, and up to a poll to each latency). Prints
``e2e_p50_ms`` and ``e2e_p99_ms``, split by grow and shrink.

The floor, in the same run (bench/floor.py, ADR 0015): the controller and the node
daemon are stopped, then the calls a resize needs are issued back to back by this
process alone, on a second VM and pod no component acts on: the spec patch through the
webhooks, the VM status writes of each phase (conditional, as chscale writes them), the
pods/resize patch, the pod status write the kubelet would make, and one ``vm.resize`` on
a VMM simulator's socket. ``e2e_floor_ms`` is its median; ``e2e_over_floor_p50``/``_p99`` are
chscale's percentiles divided by it (ratios are what to compare on a shared machine).

``api_writes_per_resize`` counts the write requests (POST, PUT, PATCH, DELETE) the API
server itself counted (``apiserver_request_total`` on its /metrics) during the resizes,
divided by their number: the bench's own spec patch included, node heartbeats and
leases excluded (printed as ``api_background_writes_per_resize``). One
``api_writes_per_resize_<resource>_<subresource>_<verb>`` line per kind of write.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.k8s.client import Kube, WatchStream
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged, resize_vm
from bench.apistats import quiet_totals, request_totals
from bench.floor import FloorVm, Size, register_floor_node, start_vmm, stop_chscale, vm_object
from bench.measure import (
    GROW_MILESTONES,
    SHRINK_MILESTONES,
    RequestKey,
    busy_gaps,
    milestones,
    per_resize,
    percentile,
    ratio,
    stage_seconds,
    status_changes,
    writes_between,
)
from core import parse_vm
from core.quantity import parse_bytes
from testbed.kubelet.vmm import DEFAULT_VMM_COMMAND
from testbed.localstack.stack import Stack

NAMESPACE = "default"
VM_NAME = "bench-e2e"
FLOOR_VM_NAME = "bench-e2e-floor"
NODE = "node-a"
SMALL = (2, "2Gi")
LARGE = (4, "4Gi")
# A real node has this machine's CPUs (2 here) and runs its guests' memory for real
# (--sim-touch-memory): a memory-only resize that fits beside the node's own pods.
REAL_SMALL = (1, "256Mi")
REAL_LARGE = (1, "512Mi")
CONVERGE_TIMEOUT_S = 60.0
DEFAULT_RESIZES = 20
MS = 1000.0


def _resized(obj: Mapping[str, Any], vcpus: int, memory: int) -> bool:
    vm = parse_vm(obj)
    return (
        vm.spec is not None
        and (vm.spec.vcpus, vm.spec.memory) == (vcpus, memory)
        and converged(obj)
    )


def watch_from(kube: Kube, resource_version: str) -> WatchStream:
    """The bench VM's changes after ``resource_version``, open before the change is sent."""
    query = {"fieldSelector": f"metadata.name={VM_NAME}", "resourceVersion": resource_version}
    return kube.open_watch(vm_path(NAMESPACE), query, timeout=CONVERGE_TIMEOUT_S)


def watch_resized(stream: WatchStream, vcpus: int, memory: int) -> dict[str, Any]:
    """The first object the watch delivers Running/Paused with allocated == spec."""
    try:
        for event in stream:
            obj = event.get("object") or {}
            if (
                event.get("type") == "MODIFIED"
                and "metadata" in obj
                and _resized(obj, vcpus, memory)
            ):
                return obj
    finally:
        stream.close()
    raise TimeoutError(f"{VM_NAME} did not reach {vcpus} vCPUs / {memory} bytes (watch ended)")


def wait_resized(kube: Kube, vcpus: int, memory: int, poll: float) -> dict[str, Any]:
    """Poll until the VM is Running/Paused with allocated == spec == (vcpus, memory)."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    url = vm_path(NAMESPACE, VM_NAME)
    while True:
        obj = kube.get(url)
        if _resized(obj, vcpus, memory):
            return obj
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{VM_NAME} did not reach {vcpus} vCPUs / {memory} bytes within "
                f"{CONVERGE_TIMEOUT_S:.0f}s: {obj.get('status')}"
            )
        time.sleep(poll)


class StatusTrace(threading.Thread):
    """Watches the bench VM and names what each status write changed (bench.measure's
    status_changes): which writes carry information and which only restate it."""

    def __init__(self, kube: Kube, start: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        query = {
            "fieldSelector": f"metadata.name={VM_NAME}",
            "resourceVersion": start["metadata"]["resourceVersion"],
        }
        self.stream = kube.open_watch(vm_path(NAMESPACE), query, timeout=CONVERGE_TIMEOUT_S * 10)
        self.changes: Counter[str] = Counter()
        self.last: dict[str, Any] | None = start

    def run(self) -> None:
        with contextlib.suppress(Exception):  # the stream is closed under it at the end
            for event in self.stream:
                obj = event.get("object") or {}
                if event.get("type") != "MODIFIED" or "metadata" not in obj:
                    continue
                if self.last is not None:
                    if obj["metadata"].get("generation") != self.last["metadata"].get("generation"):
                        self.changes["spec"] += 1
                    else:
                        self.changes[
                            status_changes(self.last.get("status"), obj.get("status") or {})
                        ] += 1
                self.last = obj

    def stop(self) -> Counter[str]:
        self.stream.close()
        self.join(5.0)
        return self.changes


def run(
    kube: Kube,
    resizes: int,
    poll: float | None,
    settle: float,
    sent: list[datetime],
    trace: bool = False,
    sizes: tuple[Size, Size] = (SMALL, LARGE),
) -> tuple[list[float], Counter[RequestKey], Counter[str]]:
    """The resizes' latencies, the API writes they made (the VM's creation and boot
    not included) and, with ``trace``, what each VM write changed."""
    small, large = sizes
    apply_vm(kube, vm_object(VM_NAME, small), NAMESPACE)
    Follower(kube, NAMESPACE, VM_NAME).wait(converged, CONVERGE_TIMEOUT_S)
    before = quiet_totals(kube)
    tracer = None
    sent.clear()
    if trace:
        tracer = StatusTrace(kube, kube.get(vm_path(NAMESPACE, VM_NAME)))
        tracer.start()
    latencies: list[float] = []
    last = kube.get(vm_path(NAMESPACE, VM_NAME))
    for i in range(resizes):
        vcpus, memory = large if i % 2 == 0 else small
        if settle:
            time.sleep(settle)
        stream = watch_from(kube, last["metadata"]["resourceVersion"]) if poll is None else None
        sent.append(datetime.now(UTC))
        started = time.perf_counter()
        resize_vm(kube, NAMESPACE, VM_NAME, vcpus, memory)
        if stream is not None:
            last = watch_resized(stream, vcpus, parse_bytes(memory))
        else:
            last = wait_resized(kube, vcpus, parse_bytes(memory), poll)
        latencies.append(time.perf_counter() - started)
    writes = writes_between(before, quiet_totals(kube))
    return latencies, writes, tracer.stop() if tracer is not None else Counter()


# --- the floor ----------------------------------------------------------------------------


def measure_floor(
    kube: Kube, stack: Stack, samples: int, sizes: tuple[Size, Size] = (SMALL, LARGE)
) -> tuple[list[float], int]:
    """Stops the controller and the node daemon, then times ``samples`` floor resizes
    (alternately grow and shrink, with a VMM); returns the times and their API writes.
    Its pod is bound to a node no kubelet serves, so the floor is the same on either
    node kind: what the API server and a VMM cost, with no kubelet in between."""
    small, large = sizes
    stop_chscale(stack)
    register_floor_node(kube)
    vm = kube.get(vm_path(NAMESPACE, VM_NAME))
    pod_name = (vm.get("status") or {}).get("vmPodName") or f"vm-{VM_NAME}"
    pod = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}")
    vmm = start_vmm(stack, FLOOR_VM_NAME, small, large)
    floor = FloorVm(kube, FLOOR_VM_NAME, vm, pod, small, large, vmm)
    before = request_totals(kube)
    times = [floor.one(grow=i % 2 == 0) for i in range(samples)]
    writes, _, _ = per_resize(writes_between(before, request_totals(kube)), samples)
    vmm.close()
    return times, round(writes * samples)


# --- the report ---------------------------------------------------------------------------


def print_latencies(prefix: str, values: list[float]) -> None:
    if not values:
        return
    print(f"{prefix}_p50_ms={percentile(values, 50) * MS:.1f}")
    print(f"{prefix}_p99_ms={percentile(values, 99) * MS:.1f}")


def component_logs(stack: Stack) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(stack.logs.glob("*.log")):
        component = path.stem.split("-", 1)[0]
        if component in ("controller", "webhook", "kubelet", "daemon"):
            out.setdefault(component, []).extend(path.read_text(errors="replace").splitlines())
    return out


def print_stages(stack: Stack, sent: list[datetime]) -> None:
    """Per kind of resize and step, the p50 milliseconds from the step before, from the
    components' logs (bench.measure.milestones): where the time over the floor goes."""
    logs = component_logs(stack)
    key = f"{NAMESPACE}/{VM_NAME}"
    for kind, steps, starts in (
        ("grow", GROW_MILESTONES, sent[0::2]),
        ("shrink", SHRINK_MILESTONES, sent[1::2]),
    ):
        per_step: dict[str, list[float]] = {name: [] for name, _, _ in steps}
        for start in starts:
            one = {key: start}
            stages = stage_seconds(milestones(logs, one, steps), one, steps)
            for name, values in stages.items():
                per_step[name] += values
        for name, values in per_step.items():
            if values:
                print(f"e2e_{kind}_stage_{name}_p50_ms={percentile(values, 50) * MS:.1f}")


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
    parser.add_argument(
        "--poll",
        type=float,
        default=None,
        help="read the VM every this many seconds instead of watching it",
    )
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to wait before each resize"
    )
    parser.add_argument(
        "--eject-delay",
        type=float,
        help="seconds the simulated guests take to eject vCPUs (default: the simulator's)",
    )
    parser.add_argument("--latencies", action="store_true", help="also print each resize's latency")
    parser.add_argument(
        "--trace-status",
        action="store_true",
        help="watch the VM and print what each of its writes changed, per resize",
    )
    parser.add_argument(
        "--kubelet",
        choices=("simulated", "real"),
        default="simulated",
        help="the node kind (real: containerd, runc and the kubelet v1.35, this machine's "
        f"capacity, resizing {REAL_SMALL[1]} <-> {REAL_LARGE[1]})",
    )
    parser.add_argument("--state-dir", help="default: a temporary directory (logs/ in it)")
    args = parser.parse_args(argv)
    if args.resizes < 1:
        parser.error("--resizes must be >= 1")
    samples = args.floor_samples or args.resizes
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="chscale-bench-e2e-"))
    vmm_command = None
    if args.eject_delay is not None:
        vmm_command = " ".join([*DEFAULT_VMM_COMMAND, "--sim-eject-delay", str(args.eject_delay)])
    sent: list[datetime] = []
    real = args.kubelet == "real"
    sizes = (REAL_SMALL, REAL_LARGE) if real else (SMALL, LARGE)
    print(f"e2e_node_kind={args.kubelet}")
    stack = Stack(
        state,
        nodes=1,
        node_cpu="16",
        node_memory="32Gi",
        webhook=True,
        vmm_command=vmm_command,
        kubelet=args.kubelet,
    )
    try:
        stack.start()
        assert stack.control_plane is not None
        kube = Kube(stack.control_plane.api_client())
        latencies, writes, changes = run(
            kube, args.resizes, args.poll, args.settle, sent, args.trace_status, sizes
        )
        floor, floor_writes = measure_floor(kube, stack, samples, sizes)
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
    for name, count in sorted(changes.items()):
        label = name.replace("+", "_and_").replace(".", "_")
        print(f"e2e_vm_writes_per_resize_changing_{label}={count / len(latencies):.2f}")
    print_stages(stack, sent)
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
