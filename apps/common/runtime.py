"""What the controller and the daemon share around their reconcilers: flags for the
kernel's tunables, metrics, informers, workers, signals."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.k8s.informer import Informer
from apps.common import metrics as m
from core import KernelConfig, Phase
from core.config import DEADLINE_FLAGS, DEFAULT_CONFIG
from core.constants import RECONCILE_WORKERS
from core.kernel import RESIZED, Reasons
from core.quantity import parse_bytes

log = logging.getLogger(__name__)

RESIZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# The two steps of a resize, by the phase the VM is in while the step runs (RESIZE.md §4).
STEPS = {Phase.POD_RESIZE_IN_PROGRESS: "pod", Phase.RESIZE_IN_PROGRESS: "vmm"}
TOTAL_STEP = "total"


def add_common_flags(parser: argparse.ArgumentParser, metrics_port: int) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    parser.add_argument(
        "--workers",
        type=int,
        default=RECONCILE_WORKERS,
        help="parallel reconciles (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="port of /metrics, /healthz and /readyz; 0 disables them (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-bind",
        default=m.DEFAULT_BIND,
        help="address the metrics server listens on; loopback unless set, e.g. 0.0.0.0 in "
        "a pod so that Prometheus and the kubelet's probes reach it (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-max-connections",
        type=_positive_int,
        default=m.DEFAULT_MAX_CONNECTIONS,
        help="connections the metrics server holds open at once; at the cap the oldest "
        "idle one is closed (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-deadline",
        type=_positive_float,
        default=m.DEFAULT_DEADLINE_S,
        help="seconds a metrics connection may take from accept to answer (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        help="debug, info, warning or error (default: %(default)s)",
    )
    parser.add_argument(
        "--pod-memory-overhead",
        default="256Mi",
        help="memory the VMM needs on top of guest RAM (RESIZE.md §2; default: %(default)s)",
    )
    # One flag per deadline of RESIZE.md 4b, named after its KernelConfig field.
    for name, flag in DEADLINE_FLAGS.items():
        parser.add_argument(
            flag,
            dest=name,
            type=_positive_float,
            default=getattr(DEFAULT_CONFIG, name),
            metavar="SECONDS",
            help=f"deadline: {name.removesuffix('_deadline_s').replace('_', ' ')} "
            f"(default {getattr(DEFAULT_CONFIG, name):g})",
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def kernel_config(args: argparse.Namespace) -> KernelConfig:
    deadlines = {name: getattr(args, name) for name in DEADLINE_FLAGS if hasattr(args, name)}
    return KernelConfig(pod_memory_overhead=parse_bytes(args.pod_memory_overhead), **deadlines)


class EventSink(Protocol):
    def record(self, regarding: Any, type_: str, reason: str, message: str) -> None: ...


_R = TypeVar("_R", bound=EventSink)
# What the watch last showed of a VM: its phase, when this process saw it enter that phase
# (None: before it watched), and its conditions as type -> (status, reason).
_Seen = tuple[str, float | None, dict[str, tuple[str, str]]]


class Metrics:
    """A component's metrics in its own prometheus_client registry.

    The reconcilers call :meth:`reconciled`, :meth:`resize_done` and
    :meth:`pod_resize_requested`; the steps of a resize and the condition changes are
    read off the VM watch (:meth:`on_vm`), so they count every VM the component
    watches, whichever process moved it.
    """

    def __init__(
        self,
        component: str,
        vms: Informer | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        prefix = f"chscale_{component}"
        self._reconciles = Counter(
            f"{prefix}_reconciles", "Reconciles by result.", ["result"], registry=self.registry
        )
        self._resizes = Histogram(
            f"{prefix}_resize_duration_seconds",
            "Resize durations by step (pod, vmm: time spent in that phase, as this "
            "component's watch saw it; total: from status.resize.startedAt to the end, "
            "observed by the component that ended the resize) and outcome.",
            ["step", "outcome"],
            buckets=RESIZE_BUCKETS,
            registry=self.registry,
        )
        self._pod_resizes = Counter(
            f"{prefix}_pod_resize_requests",
            "PATCH pods/resize calls made, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self._events = Counter(
            f"{prefix}_events",
            "Events this component recorded, by type and reason.",
            ["type", "reason"],
            registry=self.registry,
        )
        self._conditions = Counter(
            f"{prefix}_condition_transitions",
            "VM conditions that changed status or reason, by type, status and new reason.",
            ["type", "status", "reason"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], _Seen] = {}
        if vms is not None:
            self.registry.register(_PhaseCollector(vms))
            vms.add_handler(self.on_vm)

    # --- what the reconcilers call ----------------------------------------------------

    def reconciled(self, result: str) -> None:
        self._reconciles.labels(result=result).inc()

    def resize_done(self, outcome: str, seconds: float) -> None:
        self._resizes.labels(step=TOTAL_STEP, outcome=outcome).observe(seconds)

    def pod_resize_requested(self, outcome: str) -> None:
        self._pod_resizes.labels(outcome=outcome).inc()

    def event_recorded(self, type_: str, reason: str) -> None:
        self._events.labels(type=type_, reason=reason).inc()

    def counting_events(self, recorder: _R) -> _R:
        """``recorder`` itself, now counting each Event it is asked to record (the same
        object, so that whoever takes an EventRecorder still gets one)."""
        inner = recorder.record

        def record(regarding: Any, type_: str, reason: str, message: str) -> None:
            self.event_recorded(type_, reason)
            inner(regarding, type_, reason, message)

        recorder.record = record  # type: ignore[method-assign]
        return recorder

    # --- what the VM watch tells ------------------------------------------------------

    def on_vm(self, event: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        status = obj.get("status") or {}
        phase = str(status.get("phase") or "")
        conditions = _conditions(status)
        now = self.clock()
        with self._lock:
            previous = self._seen.pop(key, None)
            if event != "DELETED":
                since = now if previous is None or previous[0] != phase else previous[1]
                if previous is None and phase in STEPS:
                    since = None  # entered before we watched: its duration is unknown
                self._seen[key] = (phase, since, conditions)
        if previous is None:
            return
        old_phase, since, old_conditions = previous
        if old_phase in STEPS and (event == "DELETED" or old_phase != phase) and since is not None:
            outcome = _step_outcome(event, phase, conditions)
            self._resizes.labels(step=STEPS[Phase(old_phase)], outcome=outcome).observe(
                max(now - since, 0.0)
            )
        for type_, (cstatus, reason) in conditions.items():
            if old_conditions.get(type_) != (cstatus, reason):
                self._conditions.labels(type=type_, status=cstatus, reason=reason).inc()


def _conditions(status: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    out = {}
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type"):
            out[str(cond["type"])] = (str(cond.get("status")), str(cond.get("reason") or ""))
    return out


def _step_outcome(event: str, phase: str, conditions: dict[str, tuple[str, str]]) -> str:
    """How a step ended: ``next`` (the other step follows), ``completed``, ``infeasible``,
    ``stopped`` (back to Running/Paused without the target, e.g. a deadline passed),
    ``ended`` (the VM left the resize for Failed, Succeeded, ...) or ``deleted``."""
    if event == "DELETED":
        return "deleted"
    if phase in STEPS:
        return "next"
    if phase not in (Phase.RUNNING, Phase.PAUSED):
        return "ended"
    status, reason = conditions.get(RESIZED, ("", ""))
    if status == "True":
        return "completed"
    return "infeasible" if reason == Reasons.POD_RESIZE_INFEASIBLE else "stopped"


class _PhaseCollector(Collector):
    """``chscale_vms``: the watched VirtualMachines per phase, counted at scrape time."""

    def __init__(self, vms: Informer) -> None:
        self.vms = vms

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("chscale_vms", "VirtualMachines per phase.", labels=["phase"])]

    def collect(self) -> list[GaugeMetricFamily]:
        counts: dict[str, int] = {}
        for obj in self.vms.list():
            phase = str((obj.get("status") or {}).get("phase") or "None")
            counts[phase] = counts.get(phase, 0) + 1
        family = GaugeMetricFamily("chscale_vms", "VirtualMachines per phase.", labels=["phase"])
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        return [family]


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


def start_metrics(
    metrics: Metrics, args: argparse.Namespace, ready: Callable[[], bool]
) -> m.BoundedServer | None:
    if not args.metrics_port:
        return None
    server = m.serve(
        metrics.registry,
        args.metrics_port,
        ready,
        host=args.metrics_bind,
        max_connections=args.metrics_max_connections,
        deadline_s=args.metrics_deadline,
    )
    host, port = server.address
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    log.info(
        "metrics serving",
        extra={
            "url": f"http://{host}:{port}/metrics",
            "max_connections": server.max_connections,
            "deadline_s": server.deadline_s,
        },
    )
    return server
