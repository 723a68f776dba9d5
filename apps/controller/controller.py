"""The controller: turns watch events into reconciles, reconciles into kernel decisions,
and carries out the decisions it owns (pods, finalizers, status, events).

Level-triggered, as in controller-runtime: every event only enqueues the VM's key; a
reconcile reads the newest cached VM and pod and asks :func:`core.decide` what to do.
A key is never reconciled by two workers at once (the work queue guarantees it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from attrs import evolve

from adapters.k8s.vms import build_pod, finalizer_patch, owned_pod, pod_name
from apps.common.executor import SharedExecutor, StatusApi
from apps.common.logs import kv
from apps.common.worker import Cache, Metrics, Queue, Reconciler
from core import (
    UNOBSERVED_VMM,
    Action,
    AddFinalizer,
    CreatePod,
    DeletePod,
    KernelConfig,
    Owner,
    PodView,
    RemoveFinalizer,
    ResizePod,
    decide,
    parse_pod,
    parse_vm,
)

log = logging.getLogger(__name__)

# Even with nothing observed to change, look at every VM this often (a missed event, a
# clock-driven condition): the controller-runtime default is hours; VMs deserve better.
RESYNC_S = 300.0


class ControllerApi(StatusApi, Protocol):
    def patch_vm(self, vm_obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]: ...

    def create_pod(self, pod: dict[str, Any]) -> dict[str, Any]: ...

    def delete_pod(self, namespace: str, name: str) -> None: ...

    def resize_pod(
        self, namespace: str, name: str, cpu_millis: int, memory: int
    ) -> dict[str, Any]: ...


class ControllerMetrics(Metrics, Protocol):
    def pod_resize_requested(self, outcome: str) -> None: ...


class Controller(Reconciler):
    resync_s = RESYNC_S

    def __init__(
        self,
        api: ControllerApi,
        vms: Cache,
        pods: Cache,
        queue: Queue,
        metrics: ControllerMetrics,
        *,
        image: str,
        config: KernelConfig,
        is_conflict: Callable[[BaseException], bool],
        refusal: Callable[[BaseException], str | None],
        forbidden: Callable[[BaseException], str | None] = lambda _exc: None,
    ) -> None:
        super().__init__(queue, metrics, is_conflict)
        self.metrics: ControllerMetrics = metrics
        self.api, self.vms, self.pods = api, vms, pods
        self.image = image
        self.config = config
        self.refusal = refusal
        # A refusal no retry fixes (quota, RBAC, 422): reported once per spec generation.
        self.forbidden = forbidden
        self.shared = SharedExecutor(api, vms.observe_write, metrics.resize_done)

    # --- events -> keys ---------------------------------------------------------------

    def on_vm(self, _event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.queue.add(f"{meta.get('namespace')}/{meta.get('name')}")

    def reconcile(self, key: str) -> float | None:
        namespace, _, name = key.partition("/")
        vm_obj = self.vms.get(namespace, name)
        if vm_obj is None:
            return None  # gone: the finalizer made sure its pod went first
        try:
            vm = parse_vm(vm_obj)
        except ValueError:
            log.warning("ignoring an object without a name", extra=kv(vm=key))
            return None
        pod_obj = owned_pod(vm_obj, self.pods.get(namespace, pod_name(name)))
        pod = parse_pod(pod_obj) if pod_obj is not None else None
        actions = decide(vm, pod, UNOBSERVED_VMM, self.config, time.time(), owner=Owner.CONTROLLER)
        if not actions:
            return None
        vm_obj = self.shared.write_status(vm_obj, vm, actions)
        announced: list[Action] = []
        try:
            refusal = self._side_effects(key, vm_obj, pod, actions, announced)
        finally:
            # After the side effects, not before: an Event is an API write that the next
            # step (the kubelet's, the daemon's) need not wait for (issue 19).
            self.shared.record_events(vm_obj, vm, (*actions, *announced))
        if refusal is not None:
            return self._refused(key, **refusal)
        return self.shared.requeue_after(actions)

    def _side_effects(
        self,
        key: str,
        vm_obj: dict[str, Any],
        pod: PodView | None,
        actions: tuple[Action, ...],
        announced: list[Action],
    ) -> dict[str, str] | None:
        """Carry out the controller's side effects, in the kernel's order; a pod resize
        the API server refuses ends them and is returned for the kernel to judge. The
        events a side effect announces once it succeeded go to ``announced``."""
        namespace, _, name = key.partition("/")
        for action in actions:
            if isinstance(action, AddFinalizer | RemoveFinalizer):
                patched = self.api.patch_vm(
                    vm_obj, finalizer_patch(vm_obj, isinstance(action, AddFinalizer))
                )
                self.vms.observe_write(patched)
                vm_obj = patched
            elif isinstance(action, CreatePod):
                created = self.api.create_pod(build_pod(vm_obj, action.resources, self.image))
                self.pods.observe_write(created)
                log.info("pod created", extra=kv(vm=key, pod=pod_name(name)))
            elif isinstance(action, DeletePod):
                self.api.delete_pod(namespace, pod_name(name))
                log.info("pod deleted", extra=kv(vm=key, pod=pod_name(name)))
            elif isinstance(action, ResizePod) and pod is not None:
                try:
                    resized = self.api.resize_pod(
                        namespace, pod.name, action.resources.cpu_millis, action.resources.memory
                    )
                except Exception as exc:
                    message = self.refusal(exc)
                    forbidden = None if message is not None else self.forbidden(exc)
                    refused = message is not None or forbidden is not None
                    self.metrics.pod_resize_requested("refused" if refused else "error")
                    if message is not None:
                        return {"resize_refused": message}
                    if forbidden is not None:
                        return {"resize_forbidden": forbidden}
                    raise
                self.metrics.pod_resize_requested("accepted")
                self.pods.observe_write(resized)
                log.info(
                    "pod resize requested",
                    extra=kv(
                        vm=key,
                        pod=pod.name,
                        target=str(action.resources),
                        generation=(resized.get("metadata") or {}).get("generation"),
                    ),
                )
                if action.announce is not None:
                    announced.append(action.announce)
        return None

    def _refused(self, key: str, **refusal: str) -> float | None:
        """Feed a synchronous refusal back into the kernel at once."""
        namespace, _, name = key.partition("/")
        vm_obj = self.vms.get(namespace, name)
        pod_obj = self.pods.get(namespace, pod_name(name))
        if vm_obj is None or pod_obj is None:
            return None
        vm = parse_vm(vm_obj)
        pod = parse_pod(pod_obj)
        refused = evolve(pod, **refusal)
        actions = decide(
            vm, refused, UNOBSERVED_VMM, self.config, time.time(), owner=Owner.CONTROLLER
        )
        vm_obj = self.shared.write_status(vm_obj, vm, actions)
        self.shared.record_events(vm_obj, vm, actions)
        for action in actions:
            if isinstance(action, ResizePod):
                restored = self.api.resize_pod(
                    namespace, pod.name, action.resources.cpu_millis, action.resources.memory
                )
                self.metrics.pod_resize_requested("accepted")
                self.pods.observe_write(restored)
        return self.shared.requeue_after(actions)
