"""Benchmark: how long one ``core.decide`` call takes.

    python -m bench.kernel                # the default states, a few seconds
    python -m bench.kernel --profile 20   # plus the 20 costliest functions of the first state

Each state is decided ``--calls`` times per round for ``--rounds`` rounds; the figure per
state is the median over rounds of the time per call, in microseconds. The states are
what the two processes decide most: a controller waiting for the kubelet in the middle
of a resize (the last line, ``decide_us_per_call``; goal <= 20), a daemon calling the VMM,
a daemon waiting for the guest to plug, and both processes looking at a settled VM.
Times are this thread's CPU time (the machine is shared); ``*_wall_us`` the wall clock.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from attrs import evolve

from core import (
    UNOBSERVED_VMM,
    Action,
    Condition,
    ConditionStatus,
    Phase,
    PodPhase,
    PodResizeCondition,
    PodView,
    ResizeRecord,
    Step,
    Vm,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    decide,
    pod_resources,
)
from core.constants import GiB
from core.resources import capacity_for

BOOT = VmSpec(sockets=2, cores_per_socket=4, memory=4 * GiB)  # the seed's VM
GROWN = VmSpec(sockets=2, cores_per_socket=6, memory=8 * GiB)
CAPACITY = capacity_for(BOOT)


def _vm(phase: Phase, spec: VmSpec, allocated: VmSpec, record: ResizeRecord | None) -> Vm:
    return Vm(
        "default",
        "my-vm",
        uid="u-1",
        generation=2,
        spec=spec,
        status=VmStatus(
            phase=phase,
            node_name="node-a",
            observed_generation=2,
            desired=spec.desired,
            capacity=CAPACITY,
            allocated=allocated.desired,
            resize=record,
            conditions=(
                Condition(
                    "Resized",
                    ConditionStatus.FALSE,
                    "InProgress",
                    "waiting for the kubelet to resize pod vm-my-vm to cpu 12, memory 8448Mi",
                    2,
                ),
            ),
        ),
    )


def _pod(desired: VmSpec, actual: VmSpec, *, busy: bool) -> PodView:
    return PodView(
        "vm-my-vm",
        generation=3,
        observed_generation=3,
        phase=PodPhase.RUNNING,
        node_name="node-a",
        desired=pod_resources(desired),
        actual=pod_resources(actual),
        resize_in_progress=PodResizeCondition(None, "", 3) if busy else None,
    )


def _vmm(vcpus: int, requested: int, plugged: int) -> VmmView:
    return VmmView(
        VmmState.RUNNING,
        vcpus=vcpus,
        max_vcpus=CAPACITY.max_vcpus,
        boot_memory=CAPACITY.boot_memory,
        hotplug_size=CAPACITY.max_memory - CAPACITY.boot_memory,
        requested_memory=requested,
        actual_memory=plugged,
    )


def states() -> dict[str, tuple[Vm, PodView, VmmView]]:
    growing = ResizeRecord(12, 8 * GiB, 2, Step.POD_GROW, pod_generation=3)
    vmm_step = ResizeRecord(12, 8 * GiB, 2, Step.VMM, pod_generation=3)
    settled = _vm(Phase.RUNNING, GROWN, GROWN, None)
    done = Condition(
        "Resized", ConditionStatus.TRUE, "Resized", f"allocated {GROWN.desired} as specified", 2
    )
    settled = settled.evolve(status=evolve(settled.status, conditions=(done,)))
    return {
        # The controller, mid-resize, while the kubelet actuates the pod (the typical call).
        "controller_pod_step": (
            _vm(Phase.POD_RESIZE_IN_PROGRESS, GROWN, BOOT, growing),
            _pod(GROWN, BOOT, busy=True),
            UNOBSERVED_VMM,
        ),
        "daemon_vmm_call": (
            _vm(Phase.RESIZE_IN_PROGRESS, GROWN, BOOT, vmm_step),
            _pod(GROWN, GROWN, busy=False),
            _vmm(8, 4 * GiB, 4 * GiB),
        ),
        "daemon_waiting_for_plug": (
            _vm(Phase.RESIZE_IN_PROGRESS, GROWN, BOOT, vmm_step),
            _pod(GROWN, GROWN, busy=False),
            _vmm(12, 8 * GiB, 6 * GiB),
        ),
        "controller_settled": (settled, _pod(GROWN, GROWN, busy=False), UNOBSERVED_VMM),
        "daemon_settled": (
            settled,
            _pod(GROWN, GROWN, busy=False),
            _vmm(12, 8 * GiB, 8 * GiB),
        ),
    }


def per_call_us(
    call: Callable[[], tuple[Action, ...]], calls: int, rounds: int
) -> tuple[float, float]:
    """Median over rounds of the time per call: (CPU time of this thread, wall time).
    The machine is shared, so the CPU figure is the one to compare."""
    call()  # warm up
    cpu, wall = [], []
    for _ in range(rounds):
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            call()
        cpu.append((time.thread_time() - start_cpu) / calls * 1e6)
        wall.append((time.perf_counter() - start_wall) / calls * 1e6)
    return statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="decide() calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the N costliest functions"
    )
    args = parser.parse_args(argv)

    results = {}
    for name, (vm, pod, vmm) in states().items():
        cpu, wall = per_call_us(partial(decide, vm, pod, vmm), args.calls, args.rounds)
        results[name] = cpu
        print(f"{name}_us={cpu:.2f}")
        print(f"{name}_wall_us={wall:.2f}")
    if args.profile:
        vm, pod, vmm = states()["controller_pod_step"]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls * 5):
            decide(vm, pod, vmm)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue(), file=sys.stderr)
    print(f"decide_us_per_call={results['controller_pod_step']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
