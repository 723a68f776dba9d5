"""Continuous checks of RESIZE.md §8 against the real API server and the VMM sockets.

The checker reads the world directly (its own client, never through a fault proxy):

- a **sampler** thread loops over the pool's VMs and, for each, reads the pod, then
  ``vm.info`` on the VMM socket, then the pod again. Taking the larger of the two pod
  reads makes a flagged sample sound: the pod's limit at the instant ``vm.info`` was
  read was one of the two values (or in between), so a guest above both is a real
  violation, never a race of the sampler. It checks

  - invariant 1: the pod's enforced memory limit (``status.containerStatuses``) >= the
    guest's plugged memory + the VMM overhead;
  - invariant 1 (spec): the pod's own spec never asks for less than the guest may hold
    + the overhead (a shrink must follow the guest, not lead it);
  - invariant 2: the VMM's requested configuration (boot vCPUs; boot memory + hotplugged
    size) never exceeds what the pod has been granted (its enforced limits);

- a **phase watcher** follows every VM's status through a watch (every write is an
  event) and checks invariant 3's graph: each phase change is an edge of
  :data:`core.table.TRANSITIONS`. It also fires one-shot triggers ("kill the controller
  right after fa-0 enters ResizeInProgress");

- :meth:`Checker.converged` checks invariant 4 for one VM when asked: Running (or
  Paused), ``allocated`` == spec, no resize in flight, the pod's spec and enforced
  resources match the seed's formula, and the VMM itself holds exactly the spec.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import frozen

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import CloudHypervisorError
from adapters.k8s.client import ApiError, Gone, Kube, NotFound
from adapters.k8s.vms import vm_path
from apps.common.logs import kv
from core import parse_vm
from core.constants import MILLICORES_PER_VCPU, POD_MEMORY_OVERHEAD, VM_CONTAINER
from core.model import Phase
from core.podlayout import vmm_socket_path
from core.quantity import QuantityError, parse_bytes, parse_millicores
from core.table import RETURN, TRANSITIONS

log = logging.getLogger("chscale.faults.checker")

INFO_TIMEOUT_S = 0.3
WATCH_TIMEOUT_S = 300
SAMPLE_PAUSE_S = 0.005
HISTORY = 40


@frozen
class Violation:
    invariant: str
    vm: str
    detail: str
    seed: int | None = None

    def __str__(self) -> str:
        seed = f"seed={self.seed} " if self.seed is not None else ""
        return f"{seed}invariant {self.invariant} vm={self.vm}: {self.detail}"


def _edges() -> dict[str | None, set[str]]:
    edges: dict[str | None, set[str]] = {}
    for (source, _cause), move in TRANSITIONS.items():
        targets = [Phase.RUNNING, Phase.PAUSED] if move.to == RETURN else [move.to]
        key = None if source is None else str(source)
        edges.setdefault(key, set()).update(str(t) for t in targets)
    return edges


PHASE_EDGES = _edges()


def pod_path(namespace: str, vm: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/vm-{vm}"


def _container(items: Any) -> dict[str, Any] | None:
    for item in items or ():
        if isinstance(item, dict) and item.get("name") == VM_CONTAINER:
            return item
    return None


def pod_limits(pod: dict[str, Any], enforced: bool) -> tuple[int, int] | None:
    """(cpu millicores, memory bytes) limits of the VM container: what the kubelet
    enforces (``status``) or what the spec asks (``spec``); None if not reported."""
    if enforced:
        container = _container((pod.get("status") or {}).get("containerStatuses"))
    else:
        container = _container((pod.get("spec") or {}).get("containers"))
    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    try:
        return parse_millicores(limits["cpu"]), parse_bytes(limits["memory"])
    except (KeyError, QuantityError):
        return None


class Trigger:
    """Fires ``action`` once, the first time ``vm`` enters ``phase`` after arming."""

    def __init__(self, vm: str, phase: str, action: Callable[[], None]) -> None:
        self.vm, self.phase, self.action = vm, phase, action
        self.fired = threading.Event()


class Checker:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        vms: list[str],
        socket_root: Callable[[str], str],
        overhead: int = POD_MEMORY_OVERHEAD,
    ) -> None:
        self.kube, self.namespace, self.vms = kube, namespace, list(vms)
        self.socket_root = socket_root
        self.overhead = overhead
        self._lock = threading.Lock()
        self._violations: list[Violation] = []
        self._seen: set[tuple[str, str, str]] = set()  # one report per (invariant, vm, seed)
        self.checks = 0
        self.samples = 0
        self.seed: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: dict[str, CloudHypervisorClient] = {}
        self._triggers: list[Trigger] = []
        self._phases: dict[str, str | None] = {}
        self.transitions: list[tuple[str, str | None, str]] = []  # (vm, from, to)
        self._watch_ready = threading.Event()
        # The last status writes of every VM, for a failure report.
        self._history: dict[str, deque[str]] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._sample_loop, "sampler"), (self._watch_loop, "phases")):
            thread = threading.Thread(target=target, name=f"checker-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watch_ready.wait(30)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for client in self._clients.values():
            client.close()

    # --- results ------------------------------------------------------------------------

    def violate(self, invariant: str, vm: str, detail: str) -> None:
        with self._lock:
            key = (invariant, vm, str(self.seed))
            if key in self._seen:
                return  # one report per VM, invariant and schedule is enough
            self._seen.add(key)
            violation = Violation(invariant, vm, detail, self.seed)
            self._violations.append(violation)
        log.error("invariant violated", extra=kv(vm=vm, invariant=invariant, detail=detail))

    def take_violations(self) -> list[Violation]:
        with self._lock:
            taken, self._violations = self._violations, []
            return taken

    def count(self, n: int = 1) -> None:
        with self._lock:
            self.checks += n

    def arm(self, trigger: Trigger) -> None:
        with self._lock:
            self._triggers.append(trigger)

    def disarm(self) -> None:
        with self._lock:
            self._triggers.clear()

    def phase(self, vm: str) -> str | None:
        with self._lock:
            return self._phases.get(vm)

    def history(self, vm: str) -> list[str]:
        with self._lock:
            return list(self._history.get(vm, ()))

    def take_transitions(self) -> list[tuple[str, str | None, str]]:
        with self._lock:
            taken, self.transitions = self.transitions, []
            return taken

    # --- invariants 1 and 2: sampling ---------------------------------------------------

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            for vm in self.vms:
                if self._stop.is_set():
                    return
                try:
                    self.sample(vm)
                except Exception:  # the checker must outlive anything the stack does
                    log.exception("sample failed", extra=kv(vm=vm))
                time.sleep(SAMPLE_PAUSE_S)

    def _client(self, path: str) -> CloudHypervisorClient:
        client = self._clients.get(path)
        if client is None:
            client = self._clients[path] = CloudHypervisorClient(path, timeout=INFO_TIMEOUT_S)
        return client

    def sample(self, vm: str) -> bool:
        """One sound sample of invariants 1 and 2 for ``vm``; False if nothing was read."""
        path = pod_path(self.namespace, vm)
        try:
            before = self.kube.get(path)
            uid = before["metadata"]["uid"]
            node = (before.get("spec") or {}).get("nodeName")
            if not node:
                return False
            socket = vmm_socket_path(self.socket_root(node), uid)
            info = self._client(socket).info()
            after = self.kube.get(path)
        except (ApiError, CloudHypervisorError, KeyError):
            return False
        if after["metadata"]["uid"] != uid:
            return False
        enforced = [pod_limits(p, True) for p in (before, after)]
        asked = [pod_limits(p, False) for p in (before, after)]
        if None in enforced or None in asked:
            return False
        cpu_limit = max(e[0] for e in enforced if e is not None)
        memory_limit = max(e[1] for e in enforced if e is not None)
        spec_memory = max(a[1] for a in asked if a is not None)
        requested_memory = info.config.memory.size + (info.config.memory.hotplugged_size or 0)
        plugged = info.guest_memory
        requested_vcpus = info.config.cpus.boot_vcpus
        with self._lock:
            self.samples += 1
            self.checks += 4
        mib = 1 << 20
        if memory_limit < plugged + self.overhead:
            self.violate(
                "1",
                vm,
                f"pod memory limit {memory_limit // mib}Mi < guest {plugged // mib}Mi + "
                f"overhead {self.overhead // mib}Mi",
            )
        if spec_memory < max(plugged, requested_memory) + self.overhead:
            self.violate(
                "1-spec",
                vm,
                f"pod spec memory limit {spec_memory // mib}Mi < guest "
                f"{max(plugged, requested_memory) // mib}Mi + overhead {self.overhead // mib}Mi",
            )
        if requested_memory + self.overhead > memory_limit:
            self.violate(
                "2",
                vm,
                f"VMM asked for {requested_memory // mib}Mi but the pod is granted "
                f"{memory_limit // mib}Mi (incl. {self.overhead // mib}Mi overhead)",
            )
        if requested_vcpus * MILLICORES_PER_VCPU > cpu_limit:
            self.violate(
                "2",
                vm,
                f"VMM asked for {requested_vcpus} vCPUs but the pod is granted {cpu_limit}m",
            )
        return True

    # --- invariant 3: the phase graph ---------------------------------------------------

    def _watch_loop(self) -> None:
        collection = vm_path(self.namespace)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = self.kube.get(collection)
                    with self._lock:
                        for obj in listing.get("items") or ():
                            name = obj["metadata"]["name"]
                            self._phases[name] = (obj.get("status") or {}).get("phase")
                    version = listing["metadata"]["resourceVersion"]
                    self._watch_ready.set()
                query = {"resourceVersion": version, "timeoutSeconds": WATCH_TIMEOUT_S}
                with self.kube.open_watch(collection, query, WATCH_TIMEOUT_S + 30) as stream:
                    for event in stream:
                        if self._stop.is_set():
                            return
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            raise Gone(410, "Expired", str(obj.get("message")))
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self._on_vm(obj)
                        elif event.get("type") == "DELETED":
                            with self._lock:
                                self._phases.pop(obj["metadata"]["name"], None)
            except Gone:
                version = None  # relist: a gap, so the next change is not judged
            except Exception:
                if self._stop.is_set():
                    return
                log.warning("phase watch failed; resuming", exc_info=True)
                time.sleep(0.2)

    def _on_vm(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        new = status.get("phase")
        fire: list[Trigger] = []
        conditions = [c for c in status.get("conditions") or () if isinstance(c, dict)]
        line = (
            f"{time.strftime('%H:%M:%S')} rv={obj['metadata'].get('resourceVersion')} "
            f"gen={obj['metadata'].get('generation')} phase={new} "
            f"allocated={status.get('allocated')} resize={status.get('resize')} "
            f"conditions={[(c.get('type'), c.get('reason')) for c in conditions]}"
        )
        with self._lock:
            self._history.setdefault(name, deque(maxlen=HISTORY)).append(line)
            known = name in self._phases
            old = self._phases.get(name)
            self._phases[name] = new
            if new == old or new is None:
                return
            if known or old is not None:
                self.transitions.append((name, old, new))
            self.checks += 1
            for trigger in self._triggers:
                if trigger.vm == name and trigger.phase == new and not trigger.fired.is_set():
                    trigger.fired.set()
                    fire.append(trigger)
        for trigger in fire:
            trigger.action()
        if (known or old is not None) and new not in PHASE_EDGES.get(old, set()):
            self.violate("3", name, f"phase {old} -> {new} is not an edge of the phase graph")

    # --- invariant 4: convergence -------------------------------------------------------

    def converged(self, vm: str) -> str | None:
        """None when ``vm`` has converged; else what is still off."""
        try:
            obj = self.kube.get(vm_path(self.namespace, vm))
            pod = self.kube.get(pod_path(self.namespace, vm))
        except NotFound as exc:
            return f"gone: {exc.message}"
        except ApiError as exc:
            return f"unreadable: {exc}"
        parsed = parse_vm(obj)
        status = parsed.status
        if parsed.spec is None:
            return "no valid spec"
        desired = parsed.spec.desired
        if status.phase not in (Phase.RUNNING, Phase.PAUSED):
            return f"phase {status.phase}"
        if status.observed_generation != parsed.generation:
            return f"observedGeneration {status.observed_generation} != {parsed.generation}"
        if status.allocated != desired:
            return f"allocated {status.allocated} != desired {desired}"
        if status.resize is not None:
            return f"resize still recorded: {status.resize}"
        want = (desired.vcpus * MILLICORES_PER_VCPU, desired.memory + self.overhead)
        for enforced, what in ((True, "enforced"), (False, "spec")):
            limits = pod_limits(pod, enforced)
            if limits != want:
                return f"pod {what} limits {limits} != {want}"
        node = (pod.get("spec") or {}).get("nodeName") or ""
        socket = vmm_socket_path(self.socket_root(node), pod["metadata"]["uid"])
        try:
            with CloudHypervisorClient(socket, timeout=2.0) as client:
                info = client.info()
        except CloudHypervisorError as exc:
            return f"VMM unreadable: {exc}"
        requested = info.config.memory.size + (info.config.memory.hotplugged_size or 0)
        held = (info.config.cpus.boot_vcpus, requested, info.guest_memory)
        if held != (desired.vcpus, desired.memory, desired.memory):
            return f"VMM holds (vcpus, requested, plugged) {held}, spec wants {desired}"
        return None
