"""Benchmark: many VMs resized at once through one controller, on the real local stack.

    python -m bench.burst                  # 1,000 VMs on 10 simulated nodes (110 pods each)
    python -m bench.burst --vms 100

Creates ``--vms`` small VMs (1 vCPU, 256Mi), each with its own Cloud Hypervisor
simulator process, waits until all are Running, then patches every spec at once (to 2
vCPUs, 512Mi, from a few client threads) and times until every VM is Running with
allocated == spec. Prints ``burst_total_s`` (goal <= 60 for 1,000 VMs), the controller's
peak resident memory ``controller_rss_mb`` (VmHWM; goal <= 200), and what the machine
held: ``vmm_processes`` and ``mem_used_mb`` (the drop in MemAvailable with every VM up).

Also, in the same run:
- ``burst_api_writes_per_resize`` (and one line per kind of write) from the API
  server's own ``apiserver_request_total``, node heartbeats and leases left out;
- where the time goes: per step of the grow (``admitted`` by the webhook, the
  controller's ``pod_resize_requested``, the kubelet's ``pod_actuated``, the controller's
  ``guest_step_started``, the daemon's ``vmm_resized`` and ``completed``), from the
  components' log timestamps, the p50/p99 seconds each VM spent reaching it from the
  step before (``burst_stage_<step>_p50_s``) and when the last VM reached it
  (``burst_last_<step>_s``, from the start of the burst);
- the floor of its API traffic (bench/floor.py, ADR 0015): chscale's controller and
  daemons stopped, as many VMs and pods nobody acts on, and the same resize's API calls
  made for each from the same ``PATCH_THREADS`` client threads: ``burst_floor_s`` and
  ``burst_over_floor`` (the VMM calls are not in it: one per VM, each on its own VMM).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.k8s.client import Kube, Unavailable
from adapters.k8s.vms import vm_path
from apps.cli import nodekind
from apps.cli.vmops import apply_vm, converged, resize_vm
from bench.apistats import quiet_totals
from bench.e2e import component_logs
from bench.floor import FloorVm, register_floor_node, stop_chscale
from bench.measure import (
    GROW_MILESTONES,
    cpu_by_component,
    milestones,
    per_resize,
    percentile,
    ratio,
    stage_seconds,
    writes_between,
)
from core import parse_vm
from testbed.kubelet.agent import MAX_PODS
from testbed.localstack.stack import NodeSpec, Stack

NAMESPACE = "default"
DEFAULT_NODES = 4
BEFORE = (1, "256Mi")
AFTER = (2, "512Mi")
AFTER_POD_CPU = 2
AFTER_POD_MEMORY_MI = 512 + 256  # guest + the VMM overhead
# Node headroom over what the VMs need after the burst.
HEADROOM = 1.25
LIST_POLL_S = 0.25
PATCH_THREADS = 8
CREATE_THREADS = 8
API_ATTEMPTS = 20
RETRY_PAUSE_S = 0.05


def _status_field(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _mem_available_mb() -> float:
    available = nodekind.available_memory()
    if available is None:
        raise RuntimeError("/proc/meminfo has no MemAvailable")
    return available / float(1 << 20)


class _Retries:
    """Counts API calls that had to be repeated (an admission webhook call that failed
    under load answers 500; a client retries it)."""

    def __init__(self) -> None:
        self.count = 0

    def call(self, fn: Callable[[], object]) -> None:
        for attempt in range(API_ATTEMPTS):
            try:
                fn()
                return
            except Unavailable:
                if attempt == API_ATTEMPTS - 1:
                    raise
                self.count += 1
                time.sleep(RETRY_PAUSE_S)


def _vm(name: str, vcpus: int, memory: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": vcpus}, "memory": {"size": memory}}
        },
    }


def _wait_all(
    kube: Kube, names: set[str], want: tuple[int, str] | None, timeout: float, what: str
) -> float:
    """Poll the VM list until every VM in ``names`` has converged (to ``want`` if given);
    returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    left = len(names)
    while True:
        items = kube.get(vm_path(NAMESPACE)).get("items") or []
        done = 0
        for obj in items:
            if obj["metadata"]["name"] not in names or not converged(obj):
                continue
            vm = parse_vm(obj)
            if want is None or (vm.spec is not None and vm.spec.vcpus == want[0]):
                done += 1
        left = len(names) - done
        if left == 0:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {left} of {len(names)} VMs not there after {timeout}s")
        time.sleep(LIST_POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument(
        "--nodes",
        type=int,
        help=f"simulated nodes (default: {DEFAULT_NODES}, or as many as {MAX_PODS} pods each need)",
    )
    parser.add_argument("--boot-timeout", type=float, default=1800.0)
    parser.add_argument("--burst-timeout", type=float, default=600.0)
    parser.add_argument("--batch", type=int, default=100, help="VMs created per step")
    parser.add_argument(
        "--min-free-mb",
        type=float,
        default=3072.0,
        help="stop before the VMs would leave less memory than this available",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="the controller's and the daemons' --workers (default: theirs)",
    )
    parser.add_argument("--state-dir", help="default: a temporary directory")
    args = parser.parse_args(argv)
    # A node takes at most MAX_PODS pods, as a real kubelet's default --max-pods, and the
    # scheduler holds to it: more VMs than that would wait in Scheduling for ever.
    fewest = math.ceil(args.vms / int(MAX_PODS))
    if args.nodes is None:
        args.nodes = max(DEFAULT_NODES, fewest)
    elif args.nodes < fewest:
        parser.error(f"--nodes {args.nodes}: {args.vms} VMs need at least {fewest} nodes "
                     f"({MAX_PODS} pods each)")  # fmt: skip
    # A timeout's SIGTERM must still tear the stack down (the finally below), or the
    # simulated kubelets' VMM processes outlive the run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    per_node = math.ceil(args.vms / args.nodes)
    cpu = math.ceil(per_node * AFTER_POD_CPU * HEADROOM)
    memory_gi = math.ceil(per_node * AFTER_POD_MEMORY_MI * HEADROOM / 1024)
    nodes = [NodeSpec(f"burst-{i}", str(cpu), f"{memory_gi}Gi") for i in range(args.nodes)]
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="chscale-bench-burst-"))
    names = {f"burst-{i:04d}" for i in range(args.vms)}
    workers = ("--workers", str(args.workers)) if args.workers is not None else ()
    stack = Stack(state, nodes=nodes, webhook=True, component_args=workers)
    retries = _Retries()
    try:
        stack.start()
        assert stack.control_plane is not None
        kube = Kube(stack.control_plane.api_client())
        try:
            boot_s, used_mb = _boot(kube, sorted(names), retries, args)
        except NotEnoughMemory as exc:
            print(f"# {exc}")
            print("burst_feasible=0")
            return 3
        vmm_processes = _count_vmm_processes(stack)

        before = quiet_totals(kube)
        sent: dict[str, datetime] = {}

        def patch(name: str) -> None:
            sent[f"{NAMESPACE}/{name}"] = datetime.now(UTC)
            retries.call(lambda: resize_vm(kube, NAMESPACE, name, *AFTER))

        pids = {name: child.pid for name, child in stack.children.items()}
        pids |= {name: child.pid for name, child in stack.control_plane.processes.items()}
        cpu_before = cpu_by_component(pids)
        started = time.monotonic()
        with ThreadPoolExecutor(PATCH_THREADS) as pool:
            list(pool.map(patch, sorted(names)))
        patched_s = time.monotonic() - started
        _wait_all(kube, names, AFTER, args.burst_timeout, "burst")
        total_s = time.monotonic() - started
        cpu_after = cpu_by_component(pids)
        writes = writes_between(before, quiet_totals(kube))
        controller = stack.children["controller-0"].pid
        hwm = _status_field(controller, "VmHWM")
        rss = _status_field(controller, "VmRSS")
        # Said now as well: the floor takes as long again, and a run can be stopped there.
        print(f"# burst done in {total_s:.2f} s; measuring the floor", flush=True)
        floor_s, floor_writes = _floor(kube, stack, sorted(names), retries)
    finally:
        stack.stop()
    print(f"burst_vms={args.vms}")
    print(f"burst_nodes={args.nodes}")
    print(f"boot_all_s={boot_s:.1f}")
    print(f"vmm_processes={vmm_processes}")
    print(f"mem_used_mb={used_mb:.0f}")
    print(f"burst_patch_s={patched_s:.2f}")
    print(f"burst_total_s={total_s:.2f}")
    print(f"burst_floor_s={floor_s:.2f}")
    print(f"burst_over_floor={ratio(total_s, floor_s):.2f}")
    print(f"api_retries={retries.count}")
    if hwm is not None:
        print(f"controller_rss_mb={hwm / 1024:.1f}")
    if rss is not None:
        print(f"controller_rss_now_mb={rss / 1024:.1f}")
    total, background, breakdown = per_resize(writes, args.vms)
    print(f"burst_api_writes_per_resize={total:.2f}")
    print(f"burst_api_background_writes_per_resize={background:.2f}")
    for name, value in breakdown.items():
        print(f"burst_api_writes_per_resize_{name}={value:.2f}")
    print(f"burst_floor_api_writes_per_resize={floor_writes:.2f}")
    # Where the machine's CPU went during the burst (2 cores: at most 2 s per second).
    used = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    for name, seconds in sorted(used.items(), key=lambda item: -item[1]):
        print(f"burst_cpu_s_{name.replace('-', '_')}={seconds:.1f}")
    _print_stages(stack, sent)
    print(f"# logs: {stack.logs}")
    return 0


def _print_stages(stack: Stack, sent: dict[str, datetime]) -> None:
    if not sent:
        return
    reached = milestones(component_logs(stack), sent)
    stages = stage_seconds(reached, sent)
    start = min(sent.values())
    for name, _, _ in GROW_MILESTONES:
        values = stages[name]
        print(f"burst_stage_{name}_vms={len(values)}")
        if not values:
            continue
        print(f"burst_stage_{name}_p50_s={percentile(values, 50):.3f}")
        print(f"burst_stage_{name}_p99_s={percentile(values, 99):.3f}")
        print(f"burst_stage_{name}_sum_s={sum(values):.2f}")
        last = max(times[name] for times in reached.values() if name in times)
        print(f"burst_last_{name}_s={(last - start).total_seconds():.2f}")


def _floor(kube: Kube, stack: Stack, names: list[str], retries: _Retries) -> tuple[float, float]:
    """The burst's API traffic without chscale: returns (seconds for all, writes per VM)."""
    stop_chscale(stack)
    register_floor_node(kube)
    template = kube.get(vm_path(NAMESPACE, names[0]))
    pod_name = (template.get("status") or {}).get("vmPodName") or f"vm-{names[0]}"
    pod = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod_name}")
    floors: list[FloorVm] = []

    def create(name: str) -> None:
        floors.append(FloorVm(kube, f"floor-{name}", template, pod, BEFORE, AFTER))

    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(lambda n: retries.call(lambda: create(n)), names))
    before = quiet_totals(kube)
    started = time.monotonic()
    with ThreadPoolExecutor(PATCH_THREADS) as pool:
        list(pool.map(lambda f: retries.call(lambda: f.one(grow=True)), floors))
    seconds = time.monotonic() - started
    total, _, _ = per_resize(writes_between(before, quiet_totals(kube)), len(floors))
    return seconds, total


class NotEnoughMemory(RuntimeError):
    pass


def _boot(
    kube: Kube, names: list[str], retries: _Retries, args: argparse.Namespace
) -> tuple[float, float]:
    """Create the VMs a batch at a time, each batch running before the next, and stop
    early if what a VM has cost so far says the rest would not leave ``--min-free-mb``.
    Returns (seconds until all ran, megabytes the VMs took)."""
    base = previous = _mem_available_mb()
    started = time.monotonic()
    up: list[str] = []
    for i in range(0, len(names), args.batch):
        batch = names[i : i + args.batch]
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            list(
                pool.map(
                    lambda n: retries.call(lambda: apply_vm(kube, _vm(n, *BEFORE), NAMESPACE)),
                    batch,
                )
            )
        up += batch
        _wait_all(kube, set(up), None, args.boot_timeout, "boot")
        available = _mem_available_mb()
        # What the last batch cost per VM: the first one also pays one-time costs.
        per_vm = max(previous - available, 0.0) / len(batch)
        previous = available
        left = len(names) - len(up)
        if available < args.min_free_mb or (left and available - per_vm * left < args.min_free_mb):
            raise NotEnoughMemory(
                f"{len(up)} VMs run and took {base - available:.0f} MB (the last "
                f"{len(batch)} {per_vm:.1f} MB each); {left} more would leave "
                f"{available - per_vm * left:.0f} MB available, under --min-free-mb "
                f"{args.min_free_mb:.0f}: {len(names)} VMs are not feasible here"
            )
    return time.monotonic() - started, base - _mem_available_mb()


def _count_vmm_processes(stack: Stack) -> int:
    """Processes whose parent is one of the stack's kubelets: the VMMs they started."""
    kubelets = {c.pid for name, c in stack.children.items() if name.startswith("kubelet-")}
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        ppid = _status_field(int(entry.name), "PPid")
        if ppid in kubelets:
            count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
