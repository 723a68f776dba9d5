"""What the controller and the daemon share around their reconcilers: flags for the
kernel's tunables, metrics, informers, workers, signals."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from adapters.k8s.informer import Informer
from apps.common import metrics as m
from core import KernelConfig
from core.config import DEADLINE_FLAGS, DEFAULT_CONFIG
from core.quantity import parse_bytes

log = logging.getLogger(__name__)

RESIZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def add_common_flags(parser: argparse.ArgumentParser, metrics_port: int) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster)")
    parser.add_argument("--workers", type=int, default=4, help="parallel reconciles")
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="0 disables")
    parser.add_argument("--metrics-bind", default="127.0.0.1")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--pod-memory-overhead",
        default="256Mi",
        help="memory the VMM needs on top of guest RAM (RESIZE.md §2)",
    )
    # One flag per deadline of RESIZE.md 4b, named after its KernelConfig field.
    for name, flag in DEADLINE_FLAGS.items():
        parser.add_argument(
            flag,
            dest=name,
            type=_seconds,
            default=getattr(DEFAULT_CONFIG, name),
            metavar="SECONDS",
            help=f"deadline: {name.removesuffix('_deadline_s').replace('_', ' ')} "
            f"(default {getattr(DEFAULT_CONFIG, name):g})",
        )


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def kernel_config(args: argparse.Namespace) -> KernelConfig:
    deadlines = {name: getattr(args, name) for name in DEADLINE_FLAGS if hasattr(args, name)}
    return KernelConfig(pod_memory_overhead=parse_bytes(args.pod_memory_overhead), **deadlines)


class Metrics:
    def __init__(self, component: str, vms: Informer) -> None:
        self.registry = m.Registry()
        self._reconciles = self.registry.add(
            m.Counter(f"chscale_{component}_reconciles_total", "Reconciles by result.")
        )
        self._resizes = self.registry.add(
            m.Histogram(
                f"chscale_{component}_resize_duration_seconds",
                "From resize start to its end, by outcome.",
                RESIZE_BUCKETS,
            )
        )
        self.registry.add(
            m.Gauge("chscale_vms", "VirtualMachines per phase.", lambda: _phases(vms))
        )
        self._pod_resizes = self.registry.add(
            m.Counter(
                f"chscale_{component}_pod_resize_requests_total",
                "PATCH pods/resize calls made, by outcome.",
            )
        )

    def reconciled(self, result: str) -> None:
        self._reconciles.inc(result=result)

    def resize_done(self, outcome: str, seconds: float) -> None:
        self._resizes.observe(seconds, outcome=outcome)

    def pod_resize_requested(self, outcome: str) -> None:
        self._pod_resizes.inc(outcome=outcome)


def _phases(vms: Informer) -> dict[tuple[tuple[str, str], ...], float]:
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for obj in vms.list():
        phase = str((obj.get("status") or {}).get("phase") or "None")
        key = (("phase", phase),)
        counts[key] = counts.get(key, 0.0) + 1
    return counts


def run_workers(count: int, target: Callable[[], None], name: str) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=target, name=f"{name}-{i}", daemon=True) for i in range(count)
    ]
    for t in threads:
        t.start()
    return threads


def wait_for_signal(on_stop: Callable[[], Any]) -> None:
    """Block until SIGTERM or SIGINT, then run ``on_stop`` (graceful shutdown)."""
    stopped = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stopped.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stopped.wait(1.0):
        pass
    on_stop()


def start_metrics(metrics: Metrics, args: argparse.Namespace, ready: Callable[[], bool]) -> None:
    if args.metrics_port:
        m.serve(metrics.registry, args.metrics_port, ready, host=args.metrics_bind)
