"""Benchmark: how long the discrete-event simulation takes at cluster scale.

    python -m bench.simulate                      # 10,000 VMs, 1,000 nodes, 100,000 resizes
    python -m bench.simulate --vms 1000 --nodes 100 --resizes 10000
    python -m bench.simulate --profile 30         # plus the 30 costliest functions

Prints the simulation's own ``name=value`` report, then ``sim_wall_s`` (goal <= 60 s for
the default size), ``sim_cpu_s`` (this process's CPU time: the figure to compare when
the machine is shared) and ``sim_decides_per_resize`` (calls of the kernel's ``decide``
per resize requested, counted by wrapping the function the simulation calls; the
simulation itself is unchanged).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time

import sim.cluster
from bench.measure import CallCounter
from sim.cluster import SimConfig, simulate

DEFAULT_VMS = 10_000
DEFAULT_NODES = 1_000
DEFAULT_RESIZES = 100_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    parser.add_argument("--vms", type=int, default=DEFAULT_VMS)
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    parser.add_argument("--resizes", type=int, default=DEFAULT_RESIZES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--controller-workers",
        type=int,
        default=SimConfig().controller_workers,
        help="the controller's --workers",
    )
    parser.add_argument(
        "--profile", type=int, metavar="N", default=0, help="print the N costliest functions"
    )
    args = parser.parse_args(argv)
    config = SimConfig(
        nodes=args.nodes,
        vms=args.vms,
        resizes=args.resizes,
        controller_workers=args.controller_workers,
    )
    profiler = cProfile.Profile() if args.profile else None
    # The simulation calls the name it imported; count the calls there.
    decide = CallCounter(sim.cluster.decide, key=lambda args: args[0].key)
    sim.cluster.decide = decide
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    try:
        report = simulate(config, random.Random(args.seed))
    finally:
        sim.cluster.decide = decide.fn
    if profiler is not None:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    for line in report.lines():
        print(line)
    for message in report.violation_messages:
        print(f"# violation: {message}", file=sys.stderr)
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue(), file=sys.stderr)
    print(f"sim_vms={args.vms}")
    print(f"sim_nodes={args.nodes}")
    print(f"sim_resizes={args.resizes}")
    print(f"sim_cpu_s={cpu:.2f}")
    print(f"sim_wall_s={wall:.2f}")
    print(f"sim_decides={decide.calls}")
    requested = report.requested or 1
    print(f"sim_decides_per_resize={decide.calls / requested:.2f}")
    print(f"sim_decides_repeated_per_resize={decide.repeats / requested:.2f}")
    for caller, calls in sorted(decide.by_caller.items()):
        print(f"sim_decides_per_resize_{caller.strip('_')}={calls / requested:.2f}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
