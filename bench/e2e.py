"""Benchmark: resize latency end to end on the real local stack.

    python -m bench.e2e                 # 100 resizes, alternately grow and shrink
    python -m bench.e2e --resizes 20

A real kube-apiserver and etcd, the admission webhook, the controller, one simulated
kubelet (no artificial actuation delay) and its node daemon, the Cloud Hypervisor
simulator (guest plugs at once). One VM is resized ``--resizes`` times, alternately
grown (2 -> 4 vCPUs, 2Gi -> 4Gi) and shrunk back; each latency is the time from sending
the spec change to reading the VM back Running with allocated == spec (polled every
``--poll`` seconds). Prints ``e2e_p50_ms`` (goal <= 300) and ``e2e_p99_ms`` (goal <= 1000).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.k8s.client import Kube
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged, resize_vm
from core import parse_vm
from core.quantity import parse_bytes
from testbed.localstack.stack import Stack

NAMESPACE = "default"
VM_NAME = "bench-e2e"
SMALL = (2, "2Gi")
LARGE = (4, "4Gi")
CONVERGE_TIMEOUT_S = 60.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def vm_object(vcpus: int, memory: str) -> dict[str, Any]:
    return {
        "metadata": {"name": VM_NAME},
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


def run(stack: Stack, resizes: int, poll: float) -> list[float]:
    assert stack.control_plane is not None
    kube = Kube(stack.control_plane.api_client())
    apply_vm(kube, vm_object(*SMALL), NAMESPACE)
    Follower(kube, NAMESPACE, VM_NAME).wait(converged, CONVERGE_TIMEOUT_S)
    latencies: list[float] = []
    for i in range(resizes):
        vcpus, memory = LARGE if i % 2 == 0 else SMALL
        started = time.perf_counter()
        resize_vm(kube, NAMESPACE, VM_NAME, vcpus, memory)
        wait_resized(kube, vcpus, parse_bytes(memory), poll)
        latencies.append(time.perf_counter() - started)
    kube.delete(vm_path(NAMESPACE, VM_NAME))
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--resizes", type=int, default=100)
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between reads")
    parser.add_argument("--state-dir", help="default: a temporary directory")
    args = parser.parse_args(argv)
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="chscale-bench-e2e-"))
    stack = Stack(state, nodes=1, node_cpu="16", node_memory="32Gi", webhook=True)
    try:
        stack.start()
        latencies = run(stack, args.resizes, args.poll)
    finally:
        stack.stop()
    ms = 1000.0
    print(f"e2e_resizes={len(latencies)}")
    print(f"e2e_mean_ms={sum(latencies) / len(latencies) * ms:.1f}")
    print(f"e2e_p50_ms={percentile(latencies, 50) * ms:.1f}")
    print(f"e2e_p90_ms={percentile(latencies, 90) * ms:.1f}")
    print(f"e2e_p99_ms={percentile(latencies, 99) * ms:.1f}")
    print(f"e2e_max_ms={max(latencies) * ms:.1f}")
    grows, shrinks = latencies[0::2], latencies[1::2]
    print(f"e2e_grow_p50_ms={percentile(grows, 50) * ms:.1f}")
    if shrinks:
        print(f"e2e_shrink_p50_ms={percentile(shrinks, 50) * ms:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
