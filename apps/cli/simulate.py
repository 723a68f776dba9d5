"""``chscale simulate``: the kernel at cluster scale on a discrete-event clock.

Runs :func:`sim.cluster.simulate` (the real :func:`core.decide` against the pure kubelet
and Cloud Hypervisor models) and prints what it measured: resize latency percentiles in
simulated time, completed / infeasible / deferred counts, node utilisation before and
after, invariant violations, and the wall time it took. The random generator is made
here (``random.Random(seed)``) and handed to the simulation as data, so the same
arguments print the same report.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

from core.constants import MILLICORES_PER_VCPU
from core.quantity import QuantityError, parse_bytes, parse_millicores
from sim.cluster import Dist, Report, SimConfig, SimError, simulate

HISTOGRAM_BINS = 50
PLOT_EXTRA_HINT = "pip install matplotlib"


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except QuantityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _millicores(text: str) -> int:
    try:
        return parse_millicores(text)
    except QuantityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dist(text: str) -> Dist:
    try:
        return Dist.parse(text)
    except SimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``chscale simulate`` (the benchmark shares them)."""
    defaults = SimConfig()
    parser.add_argument(
        "--nodes", type=int, default=defaults.nodes, help="simulated nodes (default: %(default)s)"
    )
    parser.add_argument(
        "--vms", type=int, default=defaults.vms, help="VirtualMachines (default: %(default)s)"
    )
    parser.add_argument(
        "--resizes",
        type=int,
        default=defaults.resizes,
        help="spec changes to make in all (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of every random draw (default: %(default)s)"
    )
    parser.add_argument(
        "--node-cpu", type=_millicores, default=defaults.node_cpu, help="allocatable, e.g. 32"
    )
    parser.add_argument(
        "--node-memory", type=_bytes, default=defaults.node_memory, help="allocatable, e.g. 64Gi"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="spec changes per simulated second (default: one per VM every 100 s)",
    )
    parser.add_argument(
        "--infeasible-fraction",
        type=float,
        default=defaults.infeasible_fraction,
        help="share of spec changes larger than any node",
    )
    parser.add_argument(
        "--controller-workers",
        type=int,
        default=defaults.controller_workers,
        help="the simulated controller's parallel reconciles (default: %(default)s)",
    )
    parser.add_argument(
        "--daemon-workers",
        type=int,
        default=defaults.daemon_workers,
        help="each simulated daemon's parallel reconciles (default: %(default)s)",
    )
    for name, help_text in (
        ("api-latency", "API server write latency, seconds"),
        ("watch-delay", "watch delivery delay, seconds"),
        ("kubelet-delay", "per node: kubelet actuation delay, seconds"),
        ("plug-rate", "per VMM: virtio-mem (un)plug rate, bytes/s"),
        ("eject-delay", "per VMM: time for the guest to eject a vCPU, seconds"),
        ("vmm-latency", "a call on the VMM socket, seconds"),
    ):
        attr = name.replace("-", "_")
        parser.add_argument(
            f"--{name}",
            type=_dist,
            default=getattr(defaults, attr),
            help=f"{help_text}: const:X | uniform:LO,HI | exp:MEAN | lognormal:MEDIAN,SIGMA "
            f"(default {getattr(defaults, attr)})",
        )
    parser.add_argument(
        "--settle", type=float, default=defaults.settle_s, help="simulated seconds to settle"
    )
    parser.add_argument(
        "--exact-vmm-info",
        action="store_true",
        help="render and parse vm.info JSON on every daemon reconcile (slower, same result)",
    )


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        nodes=args.nodes,
        vms=args.vms,
        resizes=args.resizes,
        node_cpu=args.node_cpu,
        node_memory=args.node_memory,
        resize_rate=args.rate,
        infeasible_fraction=args.infeasible_fraction,
        controller_workers=args.controller_workers,
        daemon_workers=args.daemon_workers,
        api_latency=args.api_latency,
        watch_delay=args.watch_delay,
        kubelet_delay=args.kubelet_delay,
        plug_rate=args.plug_rate,
        eject_delay=args.eject_delay,
        vmm_latency=args.vmm_latency,
        settle_s=args.settle,
        exact_vmm_info=args.exact_vmm_info,
    )


def run(config: SimConfig, seed: int) -> tuple[Report, float]:
    """One seeded run and its wall time in seconds."""
    started = time.perf_counter()
    report = simulate(config, random.Random(seed))
    return report, time.perf_counter() - started


def summary(config: SimConfig, report: Report) -> list[str]:
    ms = 1000.0
    cpu_nodes = config.node_cpu / MILLICORES_PER_VCPU
    return [
        f"cluster: {config.nodes} nodes ({cpu_nodes:g} CPUs, {config.node_memory / 2**30:g} GiB "
        f"each), {config.vms} VMs, {report.requested} spec changes over "
        f"{report.sim_time_s:.1f} s of simulated time",
        f"resizes: {report.completed} completed, {report.infeasible} infeasible, "
        f"{report.superseded} superseded by a newer spec, {report.deferred} still deferred, "
        f"{report.unfinished} unfinished",
        f"latency (simulated): p50 {report.percentile(50) * ms:.0f} ms, "
        f"p90 {report.percentile(90) * ms:.0f} ms, p99 {report.percentile(99) * ms:.0f} ms",
        f"utilisation cpu/memory: before {report.util_before[0]:.1%}/{report.util_before[1]:.1%}, "
        f"after {report.util_after[0]:.1%}/{report.util_after[1]:.1%}",
        f"invariant violations (RESIZE.md 8.1, 8.2): {report.violations}",
    ]


def plot(report: Report, path: str) -> str:
    """A latency histogram as PNG; returns what happened, in words."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot skipped: matplotlib is not installed (an optional extra: {PLOT_EXTRA_HINT})"
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.hist([t * 1000.0 for t in report.latencies], bins=HISTOGRAM_BINS)
    axes.set_xlabel("resize latency, simulated ms (spec change to allocated == spec)")
    axes.set_ylabel("resizes")
    axes.set_title(
        f"{report.completed} resizes: p50 {report.percentile(50) * 1000:.0f} ms, "
        f"p99 {report.percentile(99) * 1000:.0f} ms"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return f"histogram written to {path}"


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except SimError as exc:
        print(f"chscale simulate: {exc}", file=sys.stderr)
        return 2
    report, wall = run(config, args.seed)
    for line in summary(config, report):
        print(line)
    for message in report.violation_messages:
        print(f"  violation: {message}")
    if args.plot:
        print(plot(report, args.plot))
    for line in report.lines():
        print(line)
    print(f"wall_s={wall:.3f}")
    return 1 if report.violations else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on the CLI's subparsers (``apps/cli/main.py`` calls this)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="run the kernel on a simulated cluster (discrete-event, seeded)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--plot", metavar="OUT.png", help="latency histogram (needs matplotlib)")
    parser.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chscale")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
