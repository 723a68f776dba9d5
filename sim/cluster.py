"""A whole cluster on a discrete-event clock: the real kernel against the pure models.

Theory of operation
-------------------
:func:`simulate` plays every process of a chscale installation on one heap of timed
events, without threads, sockets or a wall clock (the clock is a float in the heap):

- an *API server* that keeps the newest VirtualMachine (a frozen :class:`core.Vm`, whose
  status is only ever changed through :func:`core.wire.apply_status`) and the newest pod
  (a JSON dict, as the API server would return it) of every VM, each with a
  resourceVersion from one counter. A status write is conditional on the resourceVersion
  the writer decided from: a write based on an older version is a conflict (409);
- *watches*: every write is delivered to each interested actor after a sampled delay, in
  order per object and actor; an actor's cache only moves forward (an equal
  resourceVersion is news, as for an informer), and its own writes land in its cache at
  once (``observe_write``);
- the *controller* and one *daemon* per node, each a work queue with a fixed number of
  workers, never reconciling one key twice at once. A reconcile reads the actor's cache,
  calls :func:`core.decide` with the simulated clock as ``now`` (so deadlines and the
  poll backoff run as in the deployed processes; without it no wait would ever end, and
  every look would come at the shortest poll) and carries out only its own actions
  (``decide(..., owner=...)``), in the kernel's order: the merged status write, then
  the side effects, then the events (no step waits for them), each an API call that
  takes a sampled latency. A conflict requeues at once; a ``Requeue`` hint becomes an
  ``AddAfter``. This is what ``apps/controller`` and ``apps/daemon`` do; the periodic
  resync is left out (every change here is delivered);
- a *scheduler* (first fit from a rotating start, with :func:`sim.kubelet.fits_node`);
- one :class:`sim.kubelet.Kubelet` per node, stepped when a pod's spec changes, at the
  time it asks to be woken, and fed each guest's memory as the pod's usage; its status
  writes are merge patches that land after a sampled latency;
- one :class:`sim.cloudhypervisor.VmmModel` per pod, spoken to over its HTTP API
  (``vm.create``, ``vm.boot``, ``vm.info``, ``vm.resize`` as JSON bytes); the daemon's
  :class:`core.VmmView` is built from the ``vm.info`` answer exactly as
  ``apps/daemon/vmm.py`` builds it;
- a *workload*: VMs created at time 0; once all run, ``resizes`` spec changes arrive as a
  Poisson process, each on a VM drawn at random, toward a size drawn at random (a given
  fraction of them larger than any node, hence infeasible).

Randomness is data: the caller passes an object with a ``random() -> float`` method (a
``random.Random(seed)`` in practice; this package may not import :mod:`random`) and every
distribution is computed here from ``random()`` alone, whose sequence for a given seed
Python guarantees across versions. One generator, drawn in event order, and a heap that
breaks ties by insertion order make a seeded run reproducible to the last digit.

Invariants 1 and 2 of RESIZE.md section 8 are checked against the models' ground truth
(the kubelet's actuated limits, the VMM's configuration and plugged memory) whenever
either side changes: after every kubelet step and before every ``vm.resize`` lands.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, Protocol

from attrs import define, field, frozen

from core import (
    DEFAULT_CONFIG,
    RESIZED,
    UNOBSERVED_VMM,
    Action,
    AddFinalizer,
    BootVmm,
    CreatePod,
    DeletePod,
    KernelConfig,
    Owner,
    Phase,
    PodView,
    RecordEvent,
    RemoveFinalizer,
    Requeue,
    ResizePod,
    ResizeVmm,
    Resources,
    Step,
    Vm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    VmSpec,
    apply_status,
    decide,
    parse_pod,
)
from core.actions import STATUS_ACTIONS
from core.constants import MILLICORES_PER_VCPU, RECONCILE_WORKERS, VM_CONTAINER, GiB, MiB
from core.model import STEADY_PHASES, evolve
from core.quantity import QuantityError, format_bytes, format_millicores, parse_quantity
from sim import kubelet as kl
from sim.cloudhypervisor import Knobs, VmmModel

__all__ = [
    "Dist",
    "Report",
    "Rng",
    "SimConfig",
    "SimError",
    "percentile",
    "simulate",
    "steady",
    "vmm_view",
]

NAMESPACE = "default"
VMM_API = "/api/v1/"
# Guest memory moves in virtio-mem blocks; targets are drawn on this grid.
MEMORY_STEP = 2 * MiB
_VMM_STATES = {
    "Created": VmmState.CREATED,
    "Running": VmmState.RUNNING,
    "Paused": VmmState.PAUSED,
    "Shutdown": VmmState.SHUTDOWN,
}
# Messages of invariant violations kept for the report (all of them are counted).
MAX_VIOLATION_MESSAGES = 20


class SimError(ValueError):
    """A simulation asked for something impossible (names the offending setting)."""


class Rng(Protocol):
    """The only thing the simulation asks of a random generator."""

    def random(self) -> float: ...


# ---------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------

_DIST_KINDS = ("const", "uniform", "exp", "lognormal")


@frozen
class Dist:
    """A distribution of non-negative numbers, written ``kind:a[,b]``:

    ``const:X``; ``uniform:LO,HI``; ``exp:MEAN``; ``lognormal:MEDIAN,SIGMA``. Numbers may
    be Kubernetes quantities (``2Gi`` for a plug rate in bytes/s, ``5m`` = 0.005 s).
    """

    kind: str
    a: float
    b: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.kind not in _DIST_KINDS:
            raise SimError(f"distribution kind {self.kind!r} is not one of {_DIST_KINDS}")
        if self.a < 0 or self.b < 0:
            raise SimError(f"distribution {self}: parameters must be >= 0")
        if self.kind == "uniform" and self.b < self.a:
            raise SimError(f"distribution {self}: the upper bound is below the lower one")

    @classmethod
    def parse(cls, text: str, what: str = "distribution") -> Dist:
        kind, sep, rest = text.partition(":")
        if not sep:
            raise SimError(f"{what}: {text!r} is not kind:params (e.g. lognormal:3m,0.5)")
        params = []
        for part in rest.split(","):
            try:
                params.append(float(parse_quantity(part.strip())))
            except QuantityError as exc:
                raise SimError(f"{what}: {part!r} is not a number: {exc}") from None
        wanted = 2 if kind in ("uniform", "lognormal") else 1
        if len(params) != wanted:
            raise SimError(f"{what}: {kind} takes {wanted} parameter(s), got {text!r}")
        return cls(kind, *params)

    def sample(self, rng: Rng) -> float:
        return self.sampler(rng)()

    def sampler(self, rng: Rng) -> Callable[[], float]:
        """A draw from this distribution, using ``rng``, each time it is called; the kind
        is decided once, as the simulation draws a latency for nearly every event."""
        kind, a, b, random = self.kind, self.a, self.b, rng.random
        if kind == "const":
            return lambda: a
        if kind == "uniform":
            span = b - a
            return lambda: a + span * random()
        log = math.log
        if kind == "exp":
            return lambda: -a * log(1.0 - random())
        sqrt, cos, exp, two_pi = math.sqrt, math.cos, math.exp, 2.0 * math.pi

        # Box-Muller: two uniforms, one normal (the other is dropped so that every draw
        # consumes the same number of uniforms).
        def lognormal() -> float:
            u1, u2 = random(), random()
            return a * exp(b * (sqrt(-2.0 * log(1.0 - u1)) * cos(two_pi * u2)))

        return lognormal

    def __str__(self) -> str:
        if self.kind in ("uniform", "lognormal"):
            return f"{self.kind}:{self.a:g},{self.b:g}"
        return f"{self.kind}:{self.a:g}"


# ---------------------------------------------------------------------------------------
# Configuration and report
# ---------------------------------------------------------------------------------------


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise SimError(f"{name} must be positive, got {value}")


@frozen
class SimConfig:
    """One simulated cluster and workload. Memory in bytes, CPU in millicores/vCPUs,
    times in seconds of simulated time."""

    nodes: int = 4
    vms: int = 40
    resizes: int = 200
    node_cpu: int = 32 * MILLICORES_PER_VCPU
    node_memory: int = 64 * GiB
    # Every VM boots with this shape; its hotplug ceilings are fixed at boot.
    vm_vcpus: int = 2
    vm_memory: int = 2 * GiB
    vm_max_vcpus: int = 8
    vm_max_memory: int = 80 * GiB
    # Feasible targets are drawn up to these (keep the average below a node's share).
    target_max_vcpus: int = 4
    target_max_memory: int = 6 * GiB
    # Share of spec changes that ask for more memory than any node has (Infeasible).
    infeasible_fraction: float = 0.02
    # Spec changes per second of simulated time; None: one per VM every 100 s.
    resize_rate: float | None = None
    controller_workers: int = RECONCILE_WORKERS
    daemon_workers: int = RECONCILE_WORKERS
    api_latency: Dist = Dist("lognormal", 0.002, 0.5)
    watch_delay: Dist = Dist("lognormal", 0.003, 0.5)
    # Per node: how long its kubelet takes to actuate an accepted resize.
    kubelet_delay: Dist = Dist("uniform", 0.0, 0.1)
    # Per VMM: the guest's virtio-mem (un)plug speed in bytes/s, and its vCPU eject time.
    plug_rate: Dist = Dist("uniform", 2.0 * GiB, 8.0 * GiB)
    eject_delay: Dist = Dist("uniform", 0.01, 0.2)
    # A call on the VMM's Unix socket; 0 skips the wait altogether.
    vmm_latency: Dist = Dist("const", 0.0)
    deferred_retry_s: float = kl.DEFAULT_DEFERRED_RETRY_S
    # Parse the vm.info JSON on every daemon reconcile (see Cluster._view).
    exact_vmm_info: bool = False
    # Simulated time allowed after the last spec change for everything to settle.
    settle_s: float = 600.0
    kernel: KernelConfig = field(default=DEFAULT_CONFIG)

    def __attrs_post_init__(self) -> None:
        for name in ("nodes", "vms", "controller_workers", "daemon_workers"):
            _positive(name, getattr(self, name))
        if self.resizes < 0:
            raise SimError(f"resizes must be >= 0, got {self.resizes}")
        for name in ("node_cpu", "node_memory", "vm_vcpus", "vm_memory", "settle_s"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.infeasible_fraction <= 1.0:
            raise SimError(f"infeasible_fraction must be in [0, 1], got {self.infeasible_fraction}")
        if self.resize_rate is not None:
            _positive("resize_rate", self.resize_rate)
        for name in ("vm_memory", "vm_max_memory", "target_max_memory"):
            if getattr(self, name) % MEMORY_STEP:
                raise SimError(f"{name} must be a multiple of 2Mi, got {getattr(self, name)}")
        if not self.vm_vcpus <= self.target_max_vcpus <= self.vm_max_vcpus:
            raise SimError(
                f"need vm_vcpus <= target_max_vcpus <= vm_max_vcpus, got {self.vm_vcpus}, "
                f"{self.target_max_vcpus}, {self.vm_max_vcpus}"
            )
        if not self.vm_memory <= self.target_max_memory <= self.vm_max_memory:
            raise SimError("need vm_memory <= target_max_memory <= vm_max_memory")
        if (
            self.infeasible_fraction > 0
            and self.vm_max_memory + self.kernel.pod_memory_overhead <= (self.node_memory)
        ):
            raise SimError(
                "infeasible_fraction > 0 needs vm_max_memory + the VMM overhead above "
                f"node_memory ({format_bytes(self.node_memory)}), or no resize can be infeasible"
            )

    @property
    def rate(self) -> float:
        return self.resize_rate if self.resize_rate is not None else self.vms / 100.0


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@frozen
class Report:
    """What a run measured. Latencies are simulated seconds from the spec change landing
    at the API server to the VM back in Running/Paused with allocated == spec (completed)
    or back with the refusal recorded (infeasible)."""

    requested: int
    completed: int
    infeasible: int
    superseded: int  # overtaken by a newer spec change of the same VM before finishing
    deferred: int  # still waiting on a Deferred pod resize when the run ended
    unfinished: int  # still in flight for any other reason when the run ended
    deferred_episodes: int  # spec generations that saw PodResizeDeferred at some point
    latencies: tuple[float, ...]
    infeasible_latencies: tuple[float, ...]
    util_before: tuple[float, float]  # (cpu, memory) share of allocatable held by pods
    util_after: tuple[float, float]
    sim_time_s: float
    events: int
    reconciles: int
    conflicts: int
    kubelet_steps: int
    vmm_calls: int
    pod_resize_requests: int
    max_pod_resizes_per_infeasible_generation: int
    not_running: int  # VMs that never reached Running during start-up
    violations: int
    violation_messages: tuple[str, ...]

    def percentile(self, p: float) -> float:
        return percentile(sorted(self.latencies), p)

    def lines(self) -> list[str]:
        """``name=value`` lines, the format every chscale benchmark prints."""
        ordered = sorted(self.latencies)
        out = {
            "resizes_requested": self.requested,
            "resizes_completed": self.completed,
            "resizes_infeasible": self.infeasible,
            "resizes_superseded": self.superseded,
            "resizes_deferred": self.deferred,
            "resizes_unfinished": self.unfinished,
            "deferred_episodes": self.deferred_episodes,
            "latency_p50_s": f"{percentile(ordered, 50):.4f}",
            "latency_p90_s": f"{percentile(ordered, 90):.4f}",
            "latency_p99_s": f"{percentile(ordered, 99):.4f}",
            "latency_max_s": f"{ordered[-1] if ordered else 0.0:.4f}",
            "infeasible_p50_s": f"{percentile(sorted(self.infeasible_latencies), 50):.4f}",
            "util_cpu_before": f"{self.util_before[0]:.4f}",
            "util_mem_before": f"{self.util_before[1]:.4f}",
            "util_cpu_after": f"{self.util_after[0]:.4f}",
            "util_mem_after": f"{self.util_after[1]:.4f}",
            "sim_time_s": f"{self.sim_time_s:.3f}",
            "sim_events": self.events,
            "reconciles": self.reconciles,
            "status_conflicts": self.conflicts,
            "kubelet_steps": self.kubelet_steps,
            "vmm_calls": self.vmm_calls,
            "pod_resize_requests": self.pod_resize_requests,
            "max_pod_resizes_per_infeasible_generation": (
                self.max_pod_resizes_per_infeasible_generation
            ),
            "vms_not_running": self.not_running,
            "invariant_violations": self.violations,
        }
        return [f"{k}={v}" for k, v in out.items()]


# ---------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------


class _PodVersion:
    """One version of a pod object: the dict (never mutated once made) and, parsed on
    first use and shared by every cache that holds this version, its kernel view."""

    __slots__ = ("_view", "obj", "rv")

    def __init__(self, obj: dict[str, Any], rv: int) -> None:
        self.obj = obj
        self.rv = rv
        self._view: PodView | None = None

    @property
    def view(self) -> PodView:
        if self._view is None:
            self._view = parse_pod(self.obj)
        return self._view

    @property
    def generation(self) -> int:
        return int(self.obj["metadata"]["generation"])


@define(slots=True, eq=False)
class _Cache:
    """An actor's view of one VM and its pod, and the VM's place in that actor's queue."""

    vm: Vm
    vm_rv: int
    pod: _PodVersion | None = None
    queued: bool = False
    running: bool = False
    dirty: bool = False
    timer_at: float | None = None
    hold_until: float = 0.0  # daemon: a refused vm.resize is retried on the backoff
    busy_since: float | None = None  # daemon: when its vCPU requests first got 429
    watch_at: float = 0.0  # when the last write delivered to this cache arrives


@define(slots=True, eq=False)
class _Slot:
    """Everything about one VM: the API server's objects, the VMM, the actors' caches,
    and the bookkeeping of the resizes asked of it."""

    index: int
    name: str
    uid: str
    vm: Vm
    rv: int
    ctl: _Cache
    pod: _PodVersion | None = None
    node: _Node | None = None
    dmn: _Cache | None = None
    vmm: VmmModel | None = None
    plug_rate: float = 0.0
    eject_delay: float = 0.0
    pod_status_at: float = 0.0  # kubelet status writes of this pod land in order
    kubelet_watch_at: float = 0.0
    info_key: tuple[Any, ...] = ()  # what the last parsed vm.info answer depended on
    info_view: VmmView | None = None
    open: list[tuple[int, float]] = field(factory=list)  # (generation, time asked)
    deferred_generation: int = 0
    infeasible_generation: int = 0
    pod_resizes: dict[int, int] = field(factory=dict)  # generation -> pod resize requests
    ran: bool = False


class _Actor:
    """A work queue with a fixed number of workers (the controller, or one daemon)."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self.busy = 0
        self.queue: deque[_Slot] = deque()
        self.pumping = False


@define(slots=True, eq=False)
class _Node:
    name: str
    kubelet: kl.Kubelet
    daemon: _Actor
    pods: dict[str, _PodVersion] = field(factory=dict)  # the kubelet's cache, by uid
    slots: dict[str, _Slot] = field(factory=dict)  # by pod uid
    requested: tuple[int, int] = (0, 0)  # the scheduler's tally (cpu, memory)
    step_at: float | None = None


class _Usage(Mapping[str, int]):
    """Each guest's memory, by pod uid, as the usage a kubelet step is fed: read from the
    VMM model when the step asks for it. A step reads the usage of a pod only to check
    a memory-limit decrease, and no VMM changes during a step, so this is what a dict
    filled before the step would say, without reading every VMM of the node each time."""

    __slots__ = ("_vmms",)

    def __init__(self, vmms: dict[str, VmmModel]) -> None:
        self._vmms = vmms

    def __getitem__(self, uid: str) -> int:
        return self._vmms[uid].memory_actual_size

    def __iter__(self) -> Iterator[str]:
        return iter(self._vmms)

    def __len__(self) -> int:
        return len(self._vmms)


def _resource_list(r: Resources) -> dict[str, str]:
    return {"cpu": format_millicores(r.cpu_millis), "memory": format_bytes(r.memory)}


def _merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386): null deletes, objects merge, anything else replaces."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def vmm_view(response_status: int, body: bytes) -> VmmView:
    """A ``vm.info`` answer as the daemon reads it (the mapping of ``apps/daemon/vmm.py``)."""
    if response_status == 404:
        return VmmView(VmmState.NOT_CREATED)
    if response_status != 200:
        return VmmView(VmmState.UNREACHABLE, detail=body.decode(errors="replace"))
    info = json.loads(body)
    cpus, memory = info["config"]["cpus"], info["config"]["memory"]
    boot_memory = memory["size"]
    return VmmView(
        state=_VMM_STATES.get(info["state"], VmmState.UNREACHABLE),
        vcpus=cpus["boot_vcpus"],
        max_vcpus=cpus["max_vcpus"],
        boot_memory=boot_memory,
        hotplug_size=memory.get("hotplug_size") or 0,
        requested_memory=boot_memory + (memory.get("hotplugged_size") or 0),
        actual_memory=info.get("memory_actual_size"),
    )


def _boot_body(action: BootVmm) -> bytes:
    memory: dict[str, Any] = {"size": action.memory}
    if action.hotplug_size:
        memory.update(hotplug_method="VirtioMem", hotplug_size=action.hotplug_size)
    config = {
        "cpus": {"boot_vcpus": action.boot_vcpus, "max_vcpus": action.max_vcpus},
        "memory": memory,
        # A VMM boots nothing without a payload; the daemon is given a default kernel.
        "payload": {"kernel": "/var/lib/chscale/vmlinux"},
    }
    return json.dumps(config).encode()


_Op = Generator[float, None, float | None]


class Cluster:
    """The simulation. :func:`simulate` is the way in; tests may drive it step by step."""

    def __init__(self, config: SimConfig, rng: Rng) -> None:
        self.cfg = config
        self.rng = rng
        self.kcfg = config.kernel
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._rv = 0
        # A call on the VMM socket waits only for a sampled latency; with none (the
        # default) the daemon goes on at once, without even a generator to step through.
        self._vmm_latency_zero = config.vmm_latency == Dist("const", 0.0)
        self._api_latency = config.api_latency.sampler(rng)
        self._watch_delay = config.watch_delay.sampler(rng)
        self._vmm_latency = config.vmm_latency.sampler(rng)
        self.controller = _Actor("controller", config.controller_workers)
        self.nodes: list[_Node] = []
        self.node_by_name: dict[str, _Node] = {}
        for i in range(config.nodes):
            name = f"node-{i:04d}"
            kubelet = kl.Kubelet(
                kl.KubeletConfig(
                    node_name=name,
                    cpu=config.node_cpu,
                    memory=config.node_memory,
                    resize_delay_s=config.kubelet_delay.sample(rng),
                    deferred_retry_s=config.deferred_retry_s,
                )
            )
            node = _Node(name, kubelet, _Actor(f"daemon-{name}", config.daemon_workers))
            self.nodes.append(node)
            self.node_by_name[name] = node
        self.slots: list[_Slot] = []
        self._sched_cursor = 0
        self._running = 0
        self._resizes_started_at: float | None = None
        self._resizes_issued = 0
        self._last_resize_at = 0.0
        self._open = 0  # resizes in flight over all VMs
        # figures
        self.events = 0
        self.reconciles = 0
        self.conflicts = 0
        self.kubelet_steps = 0
        self.vmm_calls = 0
        self.pod_resize_requests = 0
        self.latencies: list[float] = []
        self.infeasible_latencies: list[float] = []
        self.completed = self.infeasible = self.superseded = 0
        self.deferred_episodes = 0
        self.violations = 0
        self.violation_messages: list[str] = []
        self.util_before = (0.0, 0.0)

    # --- the clock -----------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self, drain: bool = False) -> Report:
        """Create the VMs, let them boot, play the spec changes, and stop once every one
        has finished (or ``settle_s`` after the last). ``drain`` goes on until nothing
        is left to happen (within the same limit): the world then is at rest."""
        self._create_vms()
        heap = self._heap
        pop = heapq.heappop
        deadline: float | None = None
        while heap:
            t, _, fn, args = pop(heap)
            if deadline is not None and t > deadline:
                break
            self.now = t
            self.events += 1
            fn(*args)
            if self._resizes_started_at is None:
                if self.now > self.cfg.settle_s:
                    break  # start-up never finished: report what ran
            elif self._resizes_issued == self.cfg.resizes:
                if self._open == 0 and not drain:
                    break
                if deadline is None:
                    deadline = self._last_resize_at + self.cfg.settle_s
        return self._report()

    # --- the API server ------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _latency(self) -> float:
        return self._api_latency()

    def _commit_vm(self, s: _Slot, vm: Vm) -> None:
        s.vm = vm
        s.rv = self._next_rv()
        self._watch_vm(s)
        self._account(s)

    def _commit_pod(self, s: _Slot, obj: dict[str, Any]) -> _PodVersion:
        rv = self._next_rv()
        obj["metadata"] = {**obj["metadata"], "resourceVersion": str(rv)}
        version = _PodVersion(obj, rv)
        s.pod = version
        self._watch_pod(s, version)
        return version

    def _watch_vm(self, s: _Slot) -> None:
        vm, rv = s.vm, s.rv
        self.at(self._arrival(s.ctl), self._deliver_vm, self.controller, s, s.ctl, vm, rv)
        dmn = s.dmn
        if dmn is not None:
            assert s.node is not None
            self.at(self._arrival(dmn), self._deliver_vm, s.node.daemon, s, dmn, vm, rv)

    def _watch_pod(self, s: _Slot, version: _PodVersion) -> None:
        self.at(self._arrival(s.ctl), self._deliver_pod, self.controller, s, s.ctl, version)
        node, dmn = s.node, s.dmn
        if node is not None and dmn is not None:
            self.at(self._arrival(dmn), self._deliver_pod, node.daemon, s, dmn, version)
            t = max(s.kubelet_watch_at, self.now + self._watch_delay())
            s.kubelet_watch_at = t
            self.at(t, self._kubelet_sees, node, s, version)

    def _arrival(self, cache: _Cache) -> float:
        """When a write made now reaches this cache: after a sampled delay, and never
        before an earlier write of the same object (a watch delivers in order)."""
        t = max(cache.watch_at, self.now + self._watch_delay())
        cache.watch_at = t
        return t

    def _deliver_vm(self, actor: _Actor, s: _Slot, cache: _Cache, vm: Vm, rv: int) -> None:
        # An informer counts an equal resourceVersion as news (adapters/k8s/informer.py):
        # the echo of an actor's own write triggers a reconcile.
        if rv >= cache.vm_rv:
            cache.vm, cache.vm_rv = vm, rv
            self._enqueue(actor, s, cache)

    def _deliver_pod(self, actor: _Actor, s: _Slot, cache: _Cache, version: _PodVersion) -> None:
        if cache.pod is None or version.rv >= cache.pod.rv:
            cache.pod = version
            self._enqueue(actor, s, cache)

    # --- work queues -----------------------------------------------------------------------

    def _enqueue(self, actor: _Actor, s: _Slot, cache: _Cache) -> None:
        if cache.running:
            cache.dirty = True
        elif not cache.queued:
            cache.queued = True
            actor.queue.append(s)
            self._pump(actor)

    def _enqueue_after(self, actor: _Actor, s: _Slot, cache: _Cache, after: float) -> None:
        t = self.now + after
        if cache.timer_at is not None and cache.timer_at <= t:
            return
        cache.timer_at = t
        self.at(t, self._timer, actor, s, cache, t)

    def _timer(self, actor: _Actor, s: _Slot, cache: _Cache, t: float) -> None:
        if cache.timer_at == t:
            cache.timer_at = None
            self._enqueue(actor, s, cache)

    def _pump(self, actor: _Actor) -> None:
        if actor.pumping:
            return  # a reconcile that ended without waiting: the loop below goes on
        actor.pumping = True
        while actor.busy < actor.workers and actor.queue:
            s = actor.queue.popleft()
            cache = s.ctl if actor is self.controller else s.dmn
            assert cache is not None
            cache.queued = False
            cache.running = True
            actor.busy += 1
            self.reconciles += 1
            op = self._reconcile(s) if actor is self.controller else self._daemon_reconcile(s)
            self._resume(actor, s, cache, op)
        actor.pumping = False

    def _resume(self, actor: _Actor, s: _Slot, cache: _Cache, op: _Op) -> None:
        try:
            delay = next(op)
        except StopIteration as stop:
            self._finish(actor, s, cache, stop.value)
            return
        # self.at(...), written out: every API call and wait of a reconcile comes here.
        self._seq += 1
        heapq.heappush(
            self._heap, (self.now + delay, self._seq, self._resume, (actor, s, cache, op))
        )

    def _finish(self, actor: _Actor, s: _Slot, cache: _Cache, after: float | None) -> None:
        cache.running = False
        actor.busy -= 1
        if after is not None:
            if after <= 0:
                cache.dirty = True
            else:
                self._enqueue_after(actor, s, cache, after)
        if cache.dirty:
            cache.dirty = False
            self._enqueue(actor, s, cache)
        self._pump(actor)

    # --- executing the kernel's shared actions -------------------------------------------

    def _write_status(
        self,
        s: _Slot,
        cache: _Cache,
        vm: Vm,
        rv: int,
        actions: tuple[Action, ...],
        events: bool = True,
    ) -> Generator[float, None, int]:
        """The merged status write, conditional on ``rv`` (the version ``vm`` was decided
        from), then (``events``) the events. Returns the version now held, or -1 on a
        conflict."""
        status_actions = tuple([a for a in actions if isinstance(a, STATUS_ACTIONS)])
        if status_actions:
            new = apply_status(vm.status, status_actions)
            if new != vm.status:
                yield self._latency()
                if s.rv != rv:
                    self.conflicts += 1
                    return -1
                self._commit_vm(s, s.vm.evolve(status=new))
                rv = s.rv
                cache.vm, cache.vm_rv = s.vm, rv  # observe_write: our own write, at once
        if events:
            yield from self._events(actions)
        return rv

    def _events(self, actions: tuple[Action, ...]) -> Generator[float, None, None]:
        for action in actions:
            if isinstance(action, RecordEvent):
                yield self._latency()

    # --- the controller --------------------------------------------------------------------

    def _reconcile(self, s: _Slot) -> _Op:
        cache = s.ctl
        vm, rv = cache.vm, cache.vm_rv
        pod = cache.pod.view if cache.pod is not None else None
        actions = decide(vm, pod, UNOBSERVED_VMM, self.kcfg, self.now, owner=Owner.CONTROLLER)
        if not actions:
            return None
        # The events come after the side effects, as in apps/controller.
        rv = yield from self._write_status(s, cache, vm, rv, actions, events=False)
        if rv < 0:
            return 0.0
        announced = 0
        for action in actions:
            if isinstance(action, AddFinalizer | RemoveFinalizer):
                yield self._latency()
                if s.rv != rv:
                    self.conflicts += 1  # the finalizer patch carries the resourceVersion
                    yield from self._events(actions)
                    return 0.0
                self._commit_vm(s, s.vm.evolve(has_finalizer=isinstance(action, AddFinalizer)))
                rv = s.rv
                cache.vm, cache.vm_rv = s.vm, rv
            elif isinstance(action, CreatePod):
                yield self._latency()
                if s.pod is None:
                    cache.pod = self._create_pod(s, action.resources)
            elif isinstance(action, ResizePod) and pod is not None:
                yield self._latency()
                cache.pod = self._resize_pod(s, action.resources)
                if action.announce is not None:
                    announced += 1
            elif isinstance(action, DeletePod):
                raise SimError("the workload deletes no VM, yet the kernel deleted a pod")
        yield from self._events(actions)
        for _ in range(announced):
            yield self._latency()  # the event the patch announced (apps/controller)
        return _requeue(actions)

    def _create_pod(self, s: _Slot, resources: Resources) -> _PodVersion:
        listed = _resource_list(resources)
        obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"vm-{s.name}",
                "namespace": NAMESPACE,
                "uid": f"pod-{s.uid}",
                "generation": 1,
                "creationTimestamp": kl.rfc3339(self.now),
            },
            "spec": {
                "containers": [
                    {
                        "name": VM_CONTAINER,
                        "image": "chscale/vmm:sim",
                        "resources": {"requests": listed, "limits": dict(listed)},
                        "resizePolicy": [
                            {"resourceName": "cpu", "restartPolicy": "NotRequired"},
                            {"resourceName": "memory", "restartPolicy": "NotRequired"},
                        ],
                    }
                ],
            },
            "status": {"phase": "Pending"},
        }
        version = self._commit_pod(s, obj)
        self.at(self.now + self._latency(), self._schedule, s)
        return version

    def _resize_pod(self, s: _Slot, resources: Resources) -> _PodVersion:
        assert s.pod is not None
        self.pod_resize_requests += 1
        generation = s.vm.generation
        s.pod_resizes[generation] = s.pod_resizes.get(generation, 0) + 1
        old = s.pod.obj
        listed = _resource_list(resources)
        container = {
            **old["spec"]["containers"][0],
            "resources": {"requests": listed, "limits": dict(listed)},
        }
        meta = {**old["metadata"], "generation": old["metadata"]["generation"] + 1}
        obj = {**old, "metadata": meta, "spec": {**old["spec"], "containers": [container]}}
        return self._commit_pod(s, obj)

    # --- the scheduler -----------------------------------------------------------------------

    def _schedule(self, s: _Slot) -> None:
        assert s.pod is not None
        cpu, memory = kl.pod_requests(s.pod.obj)
        n = len(self.nodes)
        for i in range(n):
            node = self.nodes[(self._sched_cursor + i) % n]
            used_cpu, used_memory = node.requested
            if used_cpu + cpu <= self.cfg.node_cpu and used_memory + memory <= self.cfg.node_memory:
                self._sched_cursor = (self._sched_cursor + i + 1) % n
                node.requested = (used_cpu + cpu, used_memory + memory)
                self._bind(s, node)
                return
        # No room anywhere: the pod stays Pending, the VM in Scheduling.

    def _bind(self, s: _Slot, node: _Node) -> None:
        assert s.pod is not None
        s.node = node
        s.dmn = _Cache(vm=s.vm, vm_rv=s.rv)  # the daemon's informer lists on start
        node.slots[s.pod.obj["metadata"]["uid"]] = s
        old = s.pod.obj
        self._commit_pod(s, {**old, "spec": {**old["spec"], "nodeName": node.name}})

    # --- the kubelets ---------------------------------------------------------------------

    def _kubelet_sees(self, node: _Node, s: _Slot, version: _PodVersion) -> None:
        uid = version.obj["metadata"]["uid"]
        old = node.pods.get(uid)
        if old is not None and version.rv <= old.rv:
            return
        node.pods[uid] = version
        # The kubelet syncs a pod when its spec changes, not when its own status lands.
        if old is None or old.generation != version.generation:
            self._step_kubelet_at(node, self.now)

    def _step_kubelet_at(self, node: _Node, t: float) -> None:
        if node.step_at is not None and node.step_at <= t:
            return
        node.step_at = t
        self.at(t, self._kubelet_step, node, t)

    def _kubelet_step(self, node: _Node, t: float) -> None:
        if node.step_at != t:
            return  # superseded by an earlier step
        node.step_at = None
        self.kubelet_steps += 1
        vmms = {}
        for uid, s in node.slots.items():
            if s.vmm is not None:
                s.vmm.advance(self.now)
                vmms[uid] = s.vmm
        out = node.kubelet.step(self.now, [v.obj for v in node.pods.values()], _Usage(vmms))
        for effect in out.effects:
            if isinstance(effect, kl.WritePodStatus):
                s = node.slots[effect.uid]
                land = max(s.pod_status_at, self.now + self._latency())
                s.pod_status_at = land
                self.at(land, self._pod_status_lands, s, effect.status)
                self._check_pod(s, node)
            elif isinstance(effect, kl.StartVmm):
                s = node.slots[effect.uid]
                if s.vmm is None:
                    s.plug_rate = self.cfg.plug_rate.sample(self.rng)
                    s.eject_delay = self.cfg.eject_delay.sample(self.rng)
                    knobs = Knobs(plug_rate=s.plug_rate or None, eject_delay_s=s.eject_delay)
                    s.vmm = VmmModel(knobs, pid=s.index + 1, now=self.now)
            elif isinstance(effect, kl.StopVmm):
                node.slots[effect.uid].vmm = None
            elif isinstance(effect, kl.DeletePod):
                raise SimError(f"the kubelet of {node.name} deleted pod {effect.name}")
        if out.wake_at is not None:
            self._step_kubelet_at(node, out.wake_at)

    def _pod_status_lands(self, s: _Slot, patch: dict[str, Any]) -> None:
        assert s.pod is not None
        old = s.pod.obj
        self._commit_pod(s, {**old, "status": _merge(old.get("status") or {}, patch)})

    # --- the daemons ----------------------------------------------------------------------

    def _vmm_call(self, s: _Slot, method: str, endpoint: str, body: bytes | None) -> Any:
        self.vmm_calls += 1
        if s.vmm is None:
            return None
        return s.vmm.handle(self.now, method, VMM_API + endpoint, body)

    def _view(self, s: _Slot) -> VmmView:
        """``vm.info``, as the daemon reads it on every reconcile.

        Rendering and parsing the JSON is most of a reconcile's cost, and between two
        changes of the VMM's configuration or state only ``memory_actual_size`` moves (the
        guest plugging). So the JSON is fetched and parsed when the configuration or state
        changed since the last read, and otherwise the last view gets the model's current
        ``memory_actual_size``, the number the JSON field is rendered from.
        ``SimConfig.exact_vmm_info`` fetches the JSON every time; a test shows that both
        give the same run.
        """
        vmm = s.vmm
        if vmm is None:
            self.vmm_calls += 1
            return VmmView(VmmState.UNREACHABLE, detail="no VMM socket")
        config = vmm.config
        key = (
            vmm.state,
            id(config),
            vmm.requested_vcpus,
            vmm.requested_hotplug,
            config["memory"]["size"] if config is not None else None,
        )
        last = s.info_view
        if last is None or key != s.info_key or self.cfg.exact_vmm_info:
            response = self._vmm_call(s, "GET", "vm.info", None)
            # The daemon reads vmm.ping's version once per VMM; the model's knob is it.
            view = evolve(
                vmm_view(response.status, response.body), version=f"v{vmm.knobs.api_version}.0"
            )
            s.info_key, s.info_view = key, view
            return view
        self.vmm_calls += 1
        vmm.advance(self.now)
        actual = vmm.memory_actual_size if vmm.knobs.report_memory_actual_size else None
        if actual != last.actual_memory:
            last = evolve(last, actual_memory=actual)
            s.info_view = last
        return last

    def _remembered(self, s: _Slot, cache: _Cache) -> VmmView:
        """``_view(s)`` with when the daemon's vCPU requests first answered 429, as
        apps/daemon adds it from its memory."""
        view = self._view(s)
        if cache.busy_since is None:
            return view
        return evolve(view, busy_since=cache.busy_since)

    def _daemon_reconcile(self, s: _Slot) -> _Op:
        cache, node = s.dmn, s.node
        assert cache is not None and node is not None
        version = cache.pod
        if version is None or version.obj["spec"].get("nodeName") != node.name:
            return None
        vm, rv, pod = cache.vm, cache.vm_rv, version.view
        if not self._vmm_latency_zero:
            yield self._vmm_latency()
        vmm = self._remembered(s, cache)
        actions = decide(vm, pod, vmm, self.kcfg, self.now, owner=Owner.DAEMON)
        if not actions:
            return None
        held = cache.hold_until - self.now
        if held > 0 and any(isinstance(a, ResizeVmm) for a in actions):
            return held
        # The events come after the VMM calls, as in apps/daemon.
        rv = yield from self._write_status(s, cache, vm, rv, actions, events=False)
        if rv < 0:
            return 0.0
        for action in actions:
            error: VmmCallError | None = None
            if isinstance(action, BootVmm):
                if not self._vmm_latency_zero:
                    yield self._vmm_latency()
                r = self._vmm_call(s, "PUT", "vm.create", _boot_body(action))
                if r is not None and r.status < 300:
                    if not self._vmm_latency_zero:
                        yield self._vmm_latency()
                    r = self._vmm_call(s, "PUT", "vm.boot", None)
                if r is None or r.status >= 300:
                    error = VmmCallError(VmmCallErrorKind.FAILED, _error_text(r))
            elif isinstance(action, ResizeVmm):
                error = yield from self._resize_vmm(s, action)
            if error is None and isinstance(action, ResizeVmm) and action.probe:
                # The probe answered 204: no removal pending; the kernel hears it at once.
                yield from self._events(actions)
                after, _ = yield from self._feed_back(s, pod, evolve(vmm, probe_ok=True))
                return after
            if error is not None:
                # A refused call goes straight back to the kernel, as apps/daemon does.
                yield from self._events(actions)
                return (yield from self._call_failed(s, pod, vmm, error))
        yield from self._events(actions)
        if any(isinstance(a, ResizeVmm) and not a.probe for a in actions):
            # Accepted: look again at once, as apps/daemon does (status and events only).
            if not self._vmm_latency_zero:
                yield self._vmm_latency()
            view = self._remembered(s, cache)
            after, again = yield from self._feed_back(s, pod, view)
            probe = next((a for a in again if isinstance(a, ResizeVmm) and a.probe), None)
            if probe is None:
                return after
            # The probe of a vCPU removal that look asks for is made at once too, and its
            # answer fed back once more, as apps/daemon does.
            error = yield from self._resize_vmm(s, probe)
            if error is None:
                after, _ = yield from self._feed_back(s, pod, evolve(view, probe_ok=True))
            else:
                after = yield from self._call_failed(s, pod, view, error)
            return after
        return _requeue(actions)

    def _resize_vmm(
        self, s: _Slot, action: ResizeVmm
    ) -> Generator[float, None, VmmCallError | None]:
        """``vm.resize`` as apps/daemon sends it (a field only for what changes), checked
        against the pod's limits as it lands; a refusal as the daemon's client reports it."""
        if not self._vmm_latency_zero:
            yield self._vmm_latency()
        self._check_resize(s, action)
        body: dict[str, int] = {}
        if action.vcpus is not None:
            body["desired_vcpus"] = action.vcpus
        if action.memory is not None:
            body["desired_ram"] = action.memory
        r = self._vmm_call(s, "PUT", "vm.resize", json.dumps(body).encode())
        cache = s.dmn
        assert cache is not None
        if r is not None and r.status < 300:
            if action.vcpus is not None:
                cache.busy_since = None  # vCPU requests are taken again, as apps/daemon
            return None
        busy = r is not None and r.status == 429
        if busy and cache.busy_since is None:
            cache.busy_since = self.now
        kind = VmmCallErrorKind.BUSY if busy else VmmCallErrorKind.FAILED
        return VmmCallError(kind, _error_text(r))

    def _call_failed(
        self, s: _Slot, pod: PodView, vmm: VmmView, error: VmmCallError
    ) -> Generator[float, None, float | None]:
        """A refused VMM call goes straight back to the kernel, with when the vCPU
        requests first got 429, and the next call waits for its requeue (apps/daemon's
        ``_call_failed``)."""
        assert s.dmn is not None
        failed = evolve(vmm, call_error=error, busy_since=s.dmn.busy_since)
        after, _ = yield from self._feed_back(s, pod, failed, hold=True)
        return after

    def _feed_back(
        self, s: _Slot, pod: PodView, vmm: VmmView, *, hold: bool = False
    ) -> Generator[float, None, tuple[float | None, tuple[Action, ...]]]:
        """Decide again at once on what a VMM call answered, on the newest cached VM (our
        own status write included), and carry out status and events only, as apps/daemon's
        ``_feed_back``: the requeue (0.0 after a conflict) and the decision. With ``hold``
        (a refusal), the next VMM call waits for that requeue."""
        cache = s.dmn
        assert cache is not None
        vm, rv = cache.vm, cache.vm_rv
        actions = decide(vm, pod, vmm, self.kcfg, self.now, owner=Owner.DAEMON)
        rv = yield from self._write_status(s, cache, vm, rv, actions)
        if rv < 0:
            return 0.0, ()
        after = _requeue(actions)
        if hold and after is not None:
            cache.hold_until = self.now + after
        return after, actions

    # --- invariants (RESIZE.md section 8, 1 and 2) ----------------------------------------

    def _violation(self, message: str) -> None:
        self.violations += 1
        if len(self.violation_messages) < MAX_VIOLATION_MESSAGES:
            self.violation_messages.append(f"t={self.now:.4f} {message}")

    def _limits(self, s: _Slot, node: _Node) -> tuple[int, int] | None:
        """The cgroup limits the kubelet has actuated for the VM container (cpu, memory)."""
        assert s.pod is not None
        actuated = node.kubelet.actuated(s.pod.obj["metadata"]["uid"])
        if not actuated or VM_CONTAINER not in actuated:
            return None
        r = actuated[VM_CONTAINER]
        if r.cpu_limit is None or r.memory_limit is None:
            return None
        return r.cpu_limit, r.memory_limit

    def _check_pod(self, s: _Slot, node: _Node) -> None:
        vmm = s.vmm
        if vmm is None or not vmm.booted:
            return
        limits = self._limits(s, node)
        if limits is None:
            return
        cpu_limit, memory_limit = limits
        overhead = self.kcfg.pod_memory_overhead
        guest = vmm.memory_actual_size
        if memory_limit < guest + overhead:
            self._violation(
                f"{s.name}: invariant 1: pod memory limit {memory_limit} < guest memory "
                f"{guest} + overhead {overhead}"
            )
        requested = vmm.config["memory"]["size"] + (vmm.requested_hotplug or 0)
        if vmm.requested_vcpus * MILLICORES_PER_VCPU > cpu_limit or (
            requested + overhead > memory_limit
        ):
            self._violation(
                f"{s.name}: invariant 2: VMM holds {vmm.requested_vcpus} vCPUs, {requested} "
                f"bytes; the pod was granted {cpu_limit}m, {memory_limit} bytes"
            )

    def _check_resize(self, s: _Slot, action: ResizeVmm) -> None:
        vmm, node = s.vmm, s.node
        if vmm is None or node is None or not vmm.booted:
            return
        limits = self._limits(s, node)
        if limits is None:
            return
        cpu_limit, memory_limit = limits
        vcpus = action.vcpus if action.vcpus is not None else vmm.requested_vcpus
        memory = action.memory
        if memory is None:
            memory = vmm.config["memory"]["size"] + (vmm.requested_hotplug or 0)
        overhead = self.kcfg.pod_memory_overhead
        if vcpus * MILLICORES_PER_VCPU > cpu_limit or memory + overhead > memory_limit:
            self._violation(
                f"{s.name}: invariant 2: vm.resize to {vcpus} vCPUs, {memory} bytes while "
                f"the pod is granted {cpu_limit}m, {memory_limit} bytes"
            )

    # --- the workload ---------------------------------------------------------------------

    def _spec(self, vcpus: int, memory: int) -> VmSpec:
        return VmSpec(
            sockets=vcpus,
            cores_per_socket=1,
            memory=memory,
            max_vcpus=self.cfg.vm_max_vcpus,
            max_memory=self.cfg.vm_max_memory,
        )

    def _create_vms(self) -> None:
        spec = self._spec(self.cfg.vm_vcpus, self.cfg.vm_memory)
        for i in range(self.cfg.vms):
            name = f"vm{i:05d}"
            vm = Vm(NAMESPACE, name, uid=f"uid-{i:05d}", spec=spec, has_finalizer=False)
            rv = self._next_rv()
            s = _Slot(i, name, vm.uid, vm, rv, _Cache(vm=vm, vm_rv=0))
            self.slots.append(s)
            self._watch_vm(s)

    def _account(self, s: _Slot) -> None:
        """Bookkeeping on every VM write: start-up progress and resize outcomes."""
        vm = s.vm
        status = vm.status
        phase = status.phase
        if not s.ran and phase is Phase.RUNNING:
            s.ran = True
            self._running += 1
            if self._running == len(self.slots) and self._resizes_started_at is None:
                self._start_resizes()
        if not s.open:
            return
        generation = vm.generation
        cond = status.condition(RESIZED)
        if (
            cond is not None
            and cond.reason == "PodResizeDeferred"
            and s.deferred_generation != generation
        ):
            s.deferred_generation = generation
            self.deferred_episodes += 1
        if phase not in STEADY_PHASES or vm.spec is None:
            return
        record = status.resize
        if status.allocated == vm.spec.desired and status.observed_generation == generation:
            self._close(s, generation, self.latencies)
            self.completed += 1
        elif (
            record is not None
            and record.step is Step.INFEASIBLE
            and record.generation == generation
        ):
            s.infeasible_generation = generation
            self._close(s, generation, self.infeasible_latencies)
            self.infeasible += 1

    def _close(self, s: _Slot, generation: int, into: list[float]) -> None:
        for g, t in s.open:
            if g == generation:
                into.append(self.now - t)
            else:
                self.superseded += 1
        self._open -= len(s.open)
        s.open.clear()

    def _start_resizes(self) -> None:
        self._resizes_started_at = self.now
        self.util_before = self._utilisation()
        if self.cfg.resizes:
            self._next_resize()

    def _next_resize(self) -> None:
        gap = -math.log(1.0 - self.rng.random()) / self.cfg.rate
        self.at(self.now + gap, self._resize_arrives)

    def _resize_arrives(self) -> None:
        cfg = self.cfg
        s = self.slots[int(self.rng.random() * len(self.slots))]
        assert s.vm.spec is not None
        current = s.vm.spec.desired
        if self.rng.random() < cfg.infeasible_fraction:
            low = cfg.node_memory - self.kcfg.pod_memory_overhead + MEMORY_STEP
            memory = self._draw_memory(max(low, cfg.vm_memory), cfg.vm_max_memory)
            vcpus = current.vcpus
        else:
            while True:
                vcpus = 1 + int(self.rng.random() * cfg.target_max_vcpus)
                memory = self._draw_memory(cfg.vm_memory, cfg.target_max_memory)
                if (vcpus, memory) != (current.vcpus, current.memory):
                    break
        vm = s.vm.evolve(spec=self._spec(vcpus, memory), generation=s.vm.generation + 1)
        s.open.append((vm.generation, self.now))
        self._open += 1
        self._resizes_issued += 1
        self._last_resize_at = self.now
        self._commit_vm(s, vm)
        if self._resizes_issued < cfg.resizes:
            self._next_resize()

    def _draw_memory(self, low: int, high: int) -> int:
        steps = (high - low) // MEMORY_STEP
        return low + int(self.rng.random() * (steps + 1)) * MEMORY_STEP

    # --- the report -----------------------------------------------------------------------

    def _utilisation(self) -> tuple[float, float]:
        cpu = memory = 0
        for node in self.nodes:
            free_cpu, free_memory = node.kubelet.free()
            cpu += self.cfg.node_cpu - free_cpu
            memory += self.cfg.node_memory - free_memory
        n = len(self.nodes)
        return cpu / (n * self.cfg.node_cpu), memory / (n * self.cfg.node_memory)

    def _report(self) -> Report:
        deferred = unfinished = 0
        for s in self.slots:
            if not s.open:
                continue
            cond = s.vm.status.condition(RESIZED)
            if cond is not None and cond.reason == "PodResizeDeferred":
                deferred += len(s.open)
            else:
                unfinished += len(s.open)
        worst = 0
        for s in self.slots:
            if s.infeasible_generation:
                worst = max(worst, s.pod_resizes.get(s.infeasible_generation, 0))
        return Report(
            requested=self._resizes_issued,
            completed=self.completed,
            infeasible=self.infeasible,
            superseded=self.superseded,
            deferred=deferred,
            unfinished=unfinished,
            deferred_episodes=self.deferred_episodes,
            latencies=tuple(self.latencies),
            infeasible_latencies=tuple(self.infeasible_latencies),
            util_before=self.util_before,
            util_after=self._utilisation(),
            sim_time_s=self.now,
            events=self.events,
            reconciles=self.reconciles,
            conflicts=self.conflicts,
            kubelet_steps=self.kubelet_steps,
            vmm_calls=self.vmm_calls,
            pod_resize_requests=self.pod_resize_requests,
            max_pod_resizes_per_infeasible_generation=worst,
            not_running=len(self.slots) - self._running,
            violations=self.violations,
            violation_messages=tuple(self.violation_messages),
        )


def _requeue(actions: tuple[Action, ...]) -> float | None:
    delays = [a.after for a in actions if isinstance(a, Requeue)]
    return min(delays) if delays else None


def _error_text(response: Any) -> str:
    if response is None:
        return "no VMM socket"
    text = response.body.decode(errors="replace") if response.body else ""
    return f"HTTP {response.status}: {text}" if text else f"HTTP {response.status}"


def simulate(config: SimConfig, rng: Rng) -> Report:
    """Run one simulation to the end (see the module docstring)."""
    return Cluster(config, rng).run()


def steady(vm: Vm) -> bool:
    """Running or Paused with allocated == spec: where every VM should end up."""
    return (
        vm.spec is not None
        and vm.status.phase in STEADY_PHASES
        and vm.status.allocated == vm.spec.desired
    )
