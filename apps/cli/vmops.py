"""VM operations the CLI and the demo share: apply, resize, follow a VM's phases."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from typing import Any

from adapters.k8s.client import Kube, NotFound
from adapters.k8s.vms import vm_path
from core import Phase, parse_vm
from core.constants import API_GROUP, API_VERSION, KIND
from core.kernel import RESIZED
from core.quantity import format_bytes, parse_bytes

EVENT_POLL_S = 0.1


def apply_vm(kube: Kube, obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    obj = {**obj, "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND}
    obj["metadata"] = {**obj.get("metadata", {}), "namespace": namespace}
    return kube.create(vm_path(namespace), obj)


def split_vcpus(vcpus: int, sockets: int) -> tuple[int, int]:
    """Keep the socket count when it divides the new total; else one socket."""
    if sockets >= 1 and vcpus % sockets == 0:
        return sockets, vcpus // sockets
    return 1, vcpus


def resize_vm(
    kube: Kube,
    namespace: str,
    name: str,
    vcpus: int | None,
    memory: str | None,
    *,
    sockets: int | None = None,
    cores_per_socket: int | None = None,
) -> dict[str, Any]:
    """Patch the VM's instance spec. ``vcpus`` is a total (split over the sockets the VM
    has when they divide it); ``sockets``/``cores_per_socket`` are the seed's own units,
    a missing one keeping its current value. Give ``vcpus`` or those, not both."""
    if vcpus is not None and (sockets is not None or cores_per_socket is not None):
        raise ValueError("give vcpus or sockets/cores_per_socket, not both")
    current = kube.get(vm_path(namespace, name))
    cpu = ((current.get("spec") or {}).get("instance") or {}).get("cpu") or {}
    patch: dict[str, Any] = {}
    if vcpus is not None:
        new_sockets, cores = split_vcpus(vcpus, int(cpu.get("sockets") or 1))
        patch["cpu"] = {"sockets": new_sockets, "coresPerSocket": cores}
    elif sockets is not None or cores_per_socket is not None:
        patch["cpu"] = {
            "sockets": sockets if sockets is not None else int(cpu.get("sockets") or 1),
            "coresPerSocket": (
                cores_per_socket
                if cores_per_socket is not None
                else int(cpu.get("coresPerSocket") or 1)
            ),
        }
    if memory is not None:
        patch["memory"] = {"size": memory}
    # A merge patch of just these fields, like `kubectl patch`: status writes by chscale
    # bump the resourceVersion all the time, and nothing else here can be clobbered.
    return kube.patch(vm_path(namespace, name), {"spec": {"instance": patch}})


def summary(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    allocated = status.get("allocated") or {}
    vm = parse_vm(obj)
    spec = f"{vm.spec.vcpus} vCPUs/{format_bytes(vm.spec.memory)}" if vm.spec else "invalid spec"
    mem = allocated.get("memory")
    alloc = f"{allocated.get('vcpus', '?')} vCPUs/{mem}" if allocated else "-"
    return f"phase={status.get('phase') or '-'} spec={spec} allocated={alloc}"


def converged(obj: dict[str, Any]) -> bool:
    """Running or Paused, with the guest holding exactly what the spec asks for."""
    vm = parse_vm(obj)
    status = vm.status
    return (
        vm.spec is not None
        and status.phase in (Phase.RUNNING, Phase.PAUSED)
        and status.allocated == vm.spec.desired
        and status.observed_generation == vm.generation
    )


def resize_refused(obj: dict[str, Any]) -> str | None:
    """The Resized condition's message when the resize for this generation was refused."""
    vm = parse_vm(obj)
    cond = vm.status.condition(RESIZED)
    if (
        cond is not None
        and cond.status == "False"
        and cond.reason in ("PodResizeInfeasible", "ExceedsCapacity", "Unsupported")
        and cond.observed_generation == vm.generation
        and vm.status.phase in (Phase.RUNNING, Phase.PAUSED)
    ):
        return f"{cond.reason}: {cond.message}"
    return None


class Follower:
    """Polls a VM and records every phase change with its time (the demo's timeline)."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.timeline: list[tuple[float, str, str]] = []  # (time, phase, summary)
        self._last_phase: str | None = None

    def poll(self) -> dict[str, Any] | None:
        try:
            obj = self.kube.get(vm_path(self.namespace, self.name))
        except NotFound:
            return None
        phase = (obj.get("status") or {}).get("phase") or "-"
        if phase != self._last_phase:
            self.timeline.append((time.time(), phase, summary(obj)))
            self._last_phase = phase
        return obj

    def wait(
        self,
        done: Callable[[dict[str, Any]], bool],
        timeout: float,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            obj = self.poll()
            if obj is not None:
                if on_poll is not None:
                    on_poll(obj)
                if done(obj):
                    return obj
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.namespace}/{self.name} did not get there within {timeout:.0f}s"
                    + (f" ({summary(obj)})" if obj else "")
                )
            time.sleep(interval)


def events_for(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = kube.get(
        f"/api/v1/namespaces/{namespace}/events",
        fieldSelector=f"involvedObject.name={name},involvedObject.kind={KIND}",
    )
    items = listing.get("items") or []
    # resourceVersions grow with every write: creation order, finer than timestamps.
    return sorted(items, key=lambda e: int(e["metadata"].get("resourceVersion") or 0))


def event_reasons(events: Iterable[dict[str, Any]], component: str | None = None) -> list[str]:
    """The reasons of ``events``, in their order; only ``component``'s, if given (the
    ``source.component`` each of our recorders sets)."""
    return [
        e.get("reason") or ""
        for e in events
        if component is None or (e.get("source") or {}).get("component") == component
    ]


def wait_for_events(
    kube: Kube,
    namespace: str,
    name: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
) -> list[dict[str, Any]]:
    """The VM's Events once ``done`` holds for them, or after ``timeout`` whatever is
    there: Events are best effort and must not hang a caller. They are written after the
    status they describe, so one who saw the status may have to wait for them."""
    deadline = time.monotonic() + timeout
    while True:
        events = events_for(kube, namespace, name)
        if done(events) or time.monotonic() >= deadline:
            return events
        time.sleep(EVENT_POLL_S)


def memory_arg(value: str) -> str:
    """A Kubernetes memory quantity (``8Gi``, ``8192Mi``, ``8G``), checked before any
    request is made so that a typo is named as such."""
    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Kubernetes quantity such as 8Gi or 8192Mi ({exc})"
        ) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value!r}")
    return value


def count_arg(value: str) -> int:
    """An argparse type for a count of at least 1 (vCPUs, sockets, cores)."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def status_report(obj: dict[str, Any]) -> str:
    """The VM's status as a person reads it after a resize: phase, what the spec asks,
    what the guest holds, and each condition with its reason and message."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    vm = parse_vm(obj)
    instance = (obj.get("spec") or {}).get("instance") or {}
    cpu = instance.get("cpu") or {}
    allocated = status.get("allocated") or {}
    lines = [f"{meta.get('namespace')}/{meta.get('name')}"]
    lines.append(f"  phase:     {status.get('phase') or '-'}")
    if vm.spec is not None:
        lines.append(
            f"  spec:      {vm.spec.vcpus} vCPUs ({cpu.get('sockets', 1)} sockets x "
            f"{cpu.get('coresPerSocket', 1)} cores), memory {format_bytes(vm.spec.memory)}"
        )
    else:
        lines.append("  spec:      invalid (see the SpecValid condition)")
    if allocated:
        lines.append(
            f"  allocated: {allocated.get('vcpus', '?')} vCPUs, memory "
            f"{allocated.get('memory', '?')}"
        )
    if status.get("nodeName"):
        lines.append(f"  node:      {status['nodeName']}")
    for cond in status.get("conditions") or ():
        if isinstance(cond, dict):
            message = f": {cond['message']}" if cond.get("message") else ""
            lines.append(
                f"  {cond.get('type')}={cond.get('status')} ({cond.get('reason') or '-'}){message}"
            )
    return "\n".join(lines)
