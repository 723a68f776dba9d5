"""Fault schedules: what happens when, as plain data drawn from one seed.

A schedule is everything a run of the fault harness does to the stack in one round:
the sizes the pool's VMs start from, the spec changes a user makes, and the faults
injected (process kills, API errors and timeouts, stale watch views, VMM hangs and
vanishing sockets, a node squeezed by another pod). :func:`generate` draws it from
``random.Random(seed)`` and nothing else, so a seed *is* the schedule: ``python -m
bench.faults --replay SEED`` plays the same schedule again. (The processes' own timing
is not replayed: a kill "right after ResizeInProgress" lands wherever that phase is
entered in the rerun.)

Schedules respect what a user could ask of the pool (RESIZE.md §4-§6): sizes within
each VM's ceilings and above its boot memory, memory in whole 2 MiB blocks, and final
sizes that fit their node side by side, so that every VM can converge once the faults
stop. Intermediate sizes may overcommit a node (the kubelet defers them) or exceed it
(Infeasible), on purpose.
"""

from __future__ import annotations

import enum
import json
import random
from typing import Any

import cattrs
from attrs import field, frozen

from core.constants import POD_MEMORY_OVERHEAD, GiB, MiB

REPLAY_COMMAND = "python -m bench.faults --replay {seed}"

CONTROLLER = "controller"
DAEMON_PREFIX = "daemon:"


class FaultKind(enum.StrEnum):
    KILL = "kill"  # SIGKILL a component at `at`, start it again `duration` s later
    KILL_AT_PHASE = "kill-at-phase"  # the same, right after `vm` enters `phase` (armed at `at`)
    API_ERROR = "api-error"  # the next `count` calls of class `call` answered `status`
    API_TIMEOUT = "api-timeout"  # the next `count` calls held `duration` s, then cut
    WATCH_DELAY = "watch-delay"  # watch events held back `delay` s, for `duration` s
    WATCH_DUPLICATE = "watch-duplicate"  # every watch event sent twice, for `duration` s
    WATCH_REORDER = "watch-reorder"  # adjacent watch events swapped, for `duration` s
    WATCH_DROP = "watch-drop"  # every open watch cut (the informer resumes or relists)
    VMM_HANG = "vmm-hang"  # the VM's VMM answers nothing for `duration` s (SIGUSR1)
    VMM_SOCKET_GONE = "vmm-socket-gone"  # the VMM's socket file renamed away for `duration` s
    NODE_SQUEEZE = "node-squeeze"  # a pod takes `memory` of the node for `duration` s


PROCESS_FAULTS = frozenset({FaultKind.KILL, FaultKind.KILL_AT_PHASE})
PROXY_FAULTS = frozenset(
    {
        FaultKind.API_ERROR,
        FaultKind.API_TIMEOUT,
        FaultKind.WATCH_DELAY,
        FaultKind.WATCH_DUPLICATE,
        FaultKind.WATCH_REORDER,
        FaultKind.WATCH_DROP,
    }
)
VMM_FAULTS = frozenset({FaultKind.VMM_HANG, FaultKind.VMM_SOCKET_GONE})


class CallClass(enum.StrEnum):
    """API calls the proxy can pick out (see :func:`testbed.faults.proxy.classify`)."""

    POD_RESIZE = "pod-resize"  # PATCH pods/<name>/resize
    VM_STATUS = "vm-status"  # PUT/PATCH virtualmachines/<name>/status
    VM_PATCH = "vm-patch"  # PATCH virtualmachines/<name> (finalizers)
    POD_CREATE = "pod-create"  # POST pods
    EVENT = "event"  # POST/PATCH events
    LIST = "list"  # GET of a collection (an informer's list)
    WATCH = "watch"  # GET ...?watch=true (opening a watch)
    OTHER = "other"


# What each component calls, and so what a fault aimed at it may hit.
CONTROLLER_CALLS = (
    CallClass.POD_RESIZE,
    CallClass.VM_STATUS,
    CallClass.VM_PATCH,
    CallClass.EVENT,
    CallClass.LIST,
    CallClass.WATCH,
)
DAEMON_CALLS = (CallClass.VM_STATUS, CallClass.EVENT, CallClass.LIST, CallClass.WATCH)
API_ERROR_STATUSES = (409, 429, 500)
WATCHED_PHASES = ("PodResizeInProgress", "ResizeInProgress", "Running")


class ScheduleError(ValueError):
    """A schedule (or the pool it is drawn for) that cannot be played."""


# --- the pool ---------------------------------------------------------------------------


@frozen
class NodeGeometry:
    name: str
    cpu: int  # vCPUs the node's pods may hold
    memory: int  # bytes
    vmm_error_rate: float = 0.0  # VMMs on this node answer vm.resize 500 this often


@frozen
class PoolVm:
    """A VM that lives across schedules; its ceilings are fixed when its VMM boots."""

    name: str
    node: str
    boot_vcpus: int
    boot_memory: int
    max_vcpus: int
    max_memory: int


@frozen
class Pool:
    nodes: tuple[NodeGeometry, ...]
    vms: tuple[PoolVm, ...]
    memory_step: int = 512 * MiB

    def __attrs_post_init__(self) -> None:
        names = {n.name for n in self.nodes}
        for vm in self.vms:
            if vm.node not in names:
                raise ScheduleError(f"pool VM {vm.name}: node {vm.node!r} is not in the pool")
            if not 1 <= vm.boot_vcpus <= vm.max_vcpus:
                raise ScheduleError(f"pool VM {vm.name}: boot_vcpus must be in 1..max_vcpus")
            if not 0 < vm.boot_memory <= vm.max_memory:
                raise ScheduleError(f"pool VM {vm.name}: boot_memory must be in 1..max_memory")
        if self.memory_step % (2 * MiB):
            raise ScheduleError("memory_step must be a multiple of 2 MiB")

    def node(self, name: str) -> NodeGeometry:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ScheduleError(f"no node {name!r} in the pool")

    def vm(self, name: str) -> PoolVm:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise ScheduleError(f"no VM {name!r} in the pool")

    def memory_sizes(self, vm: PoolVm) -> list[int]:
        """Every size a schedule may ask of ``vm``: boot size up to its ceiling."""
        return list(range(vm.boot_memory, vm.max_memory + 1, self.memory_step))

    def fits(self, node: str, sizes: dict[str, tuple[int, int]]) -> bool:
        """Do these (vCPUs, memory) of the node's VMs fit its allocatable side by side?"""
        geometry = self.node(node)
        here = [sizes[vm.name] for vm in self.vms if vm.node == node and vm.name in sizes]
        cpu = sum(v for v, _ in here)
        memory = sum(m + POD_MEMORY_OVERHEAD for _, m in here)
        return cpu <= geometry.cpu and memory <= geometry.memory


def default_pool() -> Pool:
    """Two nodes of 10 GiB, two VMs each; one VM per node may ask for more than its node
    holds (Infeasible), and the VMMs of the second node fail one vm.resize in ten."""
    nodes = (
        NodeGeometry("faults-a", 16, 10 * GiB),
        NodeGeometry("faults-b", 16, 10 * GiB, vmm_error_rate=0.1),
    )
    vms = (
        PoolVm("fa-0", "faults-a", 2, 1 * GiB, 6, 12 * GiB),
        PoolVm("fa-1", "faults-a", 2, 1 * GiB, 6, 6 * GiB),
        PoolVm("fb-0", "faults-b", 2, 1 * GiB, 6, 12 * GiB),
        PoolVm("fb-1", "faults-b", 2, 1 * GiB, 6, 6 * GiB),
    )
    return Pool(nodes, vms)


# --- a schedule -------------------------------------------------------------------------


@frozen
class VmStart:
    """The size a VM is brought to, fault-free, before the schedule starts."""

    vm: str
    vcpus: int
    memory: int


@frozen
class SpecChange:
    """A user edits the VM's spec ``at`` seconds into the window."""

    at: float
    vm: str
    vcpus: int
    memory: int


@frozen
class Fault:
    """One fault; which fields matter depends on ``kind`` (see :class:`FaultKind`).

    ``target`` is a component (``controller``, ``daemon:<node>``) for process and proxy
    faults, a VM for VMM faults and a node for a squeeze.
    """

    kind: FaultKind = field(converter=FaultKind)
    at: float
    target: str
    duration: float = 0.0
    vm: str = ""
    phase: str = ""
    call: str = ""
    status: int = 0
    count: int = 0
    delay: float = 0.0
    after_upstream: bool = False  # API_TIMEOUT: the call reaches the API server first
    memory: int = 0

    def __attrs_post_init__(self) -> None:
        where = f"fault {self.kind} at {self.at}"
        if self.at < 0 or self.duration < 0 or self.delay < 0:
            raise ScheduleError(f"{where}: times must be >= 0")
        if self.kind in PROCESS_FAULTS | PROXY_FAULTS and not (
            self.target == CONTROLLER or self.target.startswith(DAEMON_PREFIX)
        ):
            raise ScheduleError(f"{where}: target must be a component, got {self.target!r}")
        if self.kind is FaultKind.KILL_AT_PHASE and not (self.vm and self.phase):
            raise ScheduleError(f"{where}: needs vm and phase")
        if self.kind in (FaultKind.API_ERROR, FaultKind.API_TIMEOUT):
            if self.count < 1:
                raise ScheduleError(f"{where}: count must be >= 1")
            CallClass(self.call)  # raises ValueError naming the bad class
        if self.kind is FaultKind.API_ERROR and self.status not in API_ERROR_STATUSES:
            raise ScheduleError(f"{where}: status must be one of {API_ERROR_STATUSES}")
        if self.kind is FaultKind.NODE_SQUEEZE and self.memory <= 0:
            raise ScheduleError(f"{where}: memory must be > 0")

    @property
    def ends(self) -> float:
        return self.at + self.duration

    def describe(self) -> str:
        parts = [f"{self.at:.2f}s {self.kind} {self.target}"]
        for name in ("vm", "phase", "call", "status", "count", "delay", "memory"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self.after_upstream:
            parts.append("after_upstream")
        if self.duration:
            parts.append(f"for {self.duration:.2f}s")
        return " ".join(parts)


@frozen
class Schedule:
    seed: int
    window: float  # faults and spec changes happen within [0, window) seconds
    starts: tuple[VmStart, ...]
    changes: tuple[SpecChange, ...]
    faults: tuple[Fault, ...]

    @property
    def replay_command(self) -> str:
        return REPLAY_COMMAND.format(seed=self.seed)

    def final_sizes(self) -> dict[str, tuple[int, int]]:
        sizes = {s.vm: (s.vcpus, s.memory) for s in self.starts}
        for change in sorted(self.changes, key=lambda c: c.at):
            sizes[change.vm] = (change.vcpus, change.memory)
        return sizes

    def describe(self) -> str:
        lines = [f"schedule seed={self.seed} window={self.window}s"]
        lines += [f"  start {s.vm}: {s.vcpus} vCPUs {s.memory // MiB}Mi" for s in self.starts]
        events: list[tuple[float, str]] = [
            (c.at, f"{c.at:.2f}s spec {c.vm} -> {c.vcpus} vCPUs {c.memory // MiB}Mi")
            for c in self.changes
        ]
        events += [(f.at, f.describe()) for f in self.faults]
        lines += [f"  {text}" for _, text in sorted(events)]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(_converter.unstructure(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        try:
            return _converter.structure(json.loads(text), cls)
        except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
            raise ScheduleError(f"not a schedule: {exc}") from exc


_converter = cattrs.Converter()
_converter.register_unstructure_hook(tuple, list)


# --- generation ----------------------------------------------------------------------


@frozen
class GeneratorConfig:
    window: float = 1.5
    max_changes_per_vm: int = 3
    min_faults: int = 2
    max_faults: int = 5
    max_kills: int = 1
    infeasible_chance: float = 0.15


# Relative frequency of each kind of fault in a schedule.
FAULT_WEIGHTS: dict[FaultKind, int] = {
    FaultKind.KILL: 2,
    FaultKind.KILL_AT_PHASE: 3,
    FaultKind.API_ERROR: 4,
    FaultKind.API_TIMEOUT: 3,
    FaultKind.WATCH_DELAY: 3,
    FaultKind.WATCH_DUPLICATE: 2,
    FaultKind.WATCH_REORDER: 2,
    FaultKind.WATCH_DROP: 1,
    FaultKind.VMM_HANG: 2,
    FaultKind.VMM_SOCKET_GONE: 2,
    FaultKind.NODE_SQUEEZE: 2,
}

_FINAL_ATTEMPTS = 50


def generate(seed: int, pool: Pool, config: GeneratorConfig | None = None) -> Schedule:
    """The schedule of ``seed``: a pure function of its arguments."""
    config = config or GeneratorConfig()
    rng = random.Random(seed)
    starts_sizes = _fitting_sizes(rng, pool, None)
    finals = _fitting_sizes(rng, pool, starts_sizes)
    starts = tuple(VmStart(vm, v, m) for vm, (v, m) in sorted(starts_sizes.items()))
    changes: list[SpecChange] = []
    for vm in pool.vms:
        count = rng.randint(0, config.max_changes_per_vm)
        if finals[vm.name] != starts_sizes[vm.name]:
            count = max(count, 1)
        times = sorted(round(rng.uniform(0, config.window * 0.8), 3) for _ in range(count))
        for i, at in enumerate(times):
            if i == len(times) - 1:
                vcpus, memory = finals[vm.name]
            else:
                vcpus, memory = _intermediate(rng, pool, vm, config)
            changes.append(SpecChange(at, vm.name, vcpus, memory))
    faults = _faults(rng, pool, config)
    return Schedule(
        seed=seed,
        window=config.window,
        starts=starts,
        changes=tuple(sorted(changes, key=lambda c: (c.at, c.vm))),
        faults=tuple(sorted(faults, key=lambda f: f.at)),
    )


def _size(rng: random.Random, pool: Pool, vm: PoolVm, limit: int | None = None) -> tuple[int, int]:
    sizes = [m for m in pool.memory_sizes(vm) if limit is None or m <= limit]
    return rng.randint(1, vm.max_vcpus), rng.choice(sizes)


def _fitting_sizes(
    rng: random.Random, pool: Pool, previous: dict[str, tuple[int, int]] | None
) -> dict[str, tuple[int, int]]:
    """Sizes for every VM that fit each node side by side (drawn until they do)."""
    for _ in range(_FINAL_ATTEMPTS):
        sizes: dict[str, tuple[int, int]] = {}
        for vm in pool.vms:
            vcpus, memory = _size(rng, pool, vm)
            if previous is not None:
                # Often keep one dimension: CPU-only and memory-only resizes are the norm.
                keep = rng.random()
                if keep < 0.3:
                    vcpus = previous[vm.name][0]
                elif keep < 0.6:
                    memory = previous[vm.name][1]
            sizes[vm.name] = (vcpus, memory)
        if all(pool.fits(node.name, sizes) for node in pool.nodes):
            return sizes
    if previous is not None:
        return dict(previous)
    return {vm.name: (vm.boot_vcpus, vm.boot_memory) for vm in pool.vms}


def _intermediate(
    rng: random.Random, pool: Pool, vm: PoolVm, config: GeneratorConfig
) -> tuple[int, int]:
    node = pool.node(vm.node)
    too_big = [m for m in pool.memory_sizes(vm) if m + POD_MEMORY_OVERHEAD > node.memory]
    if too_big and rng.random() < config.infeasible_chance:
        return rng.randint(1, vm.max_vcpus), rng.choice(too_big)
    return _size(rng, pool, vm, limit=node.memory - POD_MEMORY_OVERHEAD)


def _components(pool: Pool) -> list[str]:
    return [CONTROLLER, *(f"{DAEMON_PREFIX}{n.name}" for n in pool.nodes)]


def _faults(rng: random.Random, pool: Pool, config: GeneratorConfig) -> list[Fault]:
    kinds = list(FAULT_WEIGHTS)
    weights = [FAULT_WEIGHTS[k] for k in kinds]
    faults: list[Fault] = []
    kills = 0
    for _ in range(rng.randint(config.min_faults, config.max_faults)):
        kind = rng.choices(kinds, weights)[0]
        if kind in PROCESS_FAULTS:
            if kills >= config.max_kills:
                kind = FaultKind.API_ERROR
            else:
                kills += 1
        faults.append(_fault(rng, pool, config, kind))
    return faults


def _fault(rng: random.Random, pool: Pool, config: GeneratorConfig, kind: FaultKind) -> Fault:
    at = round(rng.uniform(0, config.window * 0.9), 3)
    duration = round(rng.uniform(0.3, 1.5), 3)
    component = rng.choice(_components(pool))
    vm = rng.choice(pool.vms)
    calls = CONTROLLER_CALLS if component == CONTROLLER else DAEMON_CALLS
    args: dict[str, Any] = {"kind": kind, "at": at, "target": component}
    if kind is FaultKind.KILL:
        args["duration"] = round(rng.uniform(0.0, 0.6), 3)
    elif kind is FaultKind.KILL_AT_PHASE:
        args.update(
            at=round(rng.uniform(0, config.window * 0.5), 3),
            duration=round(rng.uniform(0.0, 0.6), 3),
            vm=vm.name,
            phase=rng.choice(WATCHED_PHASES),
            target=rng.choice([CONTROLLER, f"{DAEMON_PREFIX}{vm.node}"]),
        )
    elif kind is FaultKind.API_ERROR:
        args.update(
            call=rng.choice(calls), status=rng.choice(API_ERROR_STATUSES), count=rng.randint(1, 3)
        )
    elif kind is FaultKind.API_TIMEOUT:
        args.update(
            call=rng.choice(calls),
            count=rng.randint(1, 2),
            duration=round(rng.uniform(0.2, 1.0), 3),
            after_upstream=rng.random() < 0.5,
        )
    elif kind is FaultKind.WATCH_DELAY:
        args.update(duration=duration, delay=round(rng.uniform(0.1, 0.8), 3))
    elif kind in (FaultKind.WATCH_DUPLICATE, FaultKind.WATCH_REORDER):
        args["duration"] = duration
    elif kind in VMM_FAULTS:
        args.update(target=vm.name, duration=duration)
    elif kind is FaultKind.NODE_SQUEEZE:
        node = rng.choice(pool.nodes)
        squeeze = rng.choice(range(1 * GiB, node.memory // 2 + 1, pool.memory_step))
        args.update(target=node.name, duration=duration, memory=squeeze)
    return Fault(**args)
