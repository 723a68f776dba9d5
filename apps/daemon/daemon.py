"""The node daemon: boots each VM's VMM and carries out the VMM step of a resize.

It watches the VirtualMachines and the VM pods on its node, reads ``vm.info`` over the
pod's VMM socket on every reconcile (the VMM is not watchable), asks :func:`core.decide`
and carries out the daemon-owned actions. A failed ``vm.resize`` is fed straight back
into the kernel as ``vmm.call_error`` so that the retry, the backoff and the event are the
kernel's decision, not ours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol

from attrs import evolve

from adapters.k8s.vms import owned_pod, pod_name
from apps.common.executor import SharedExecutor, StatusApi
from apps.common.logs import kv
from apps.common.worker import Cache, Metrics, Queue, Reconciler
from core import (
    Action,
    BootVmm,
    KernelConfig,
    Owner,
    ResizeVmm,
    VmmCallError,
    VmmCallErrorKind,
    VmmState,
    VmmView,
    decide,
    parse_pod,
    parse_vm,
)

log = logging.getLogger(__name__)

RESYNC_S = 30.0


class VmmClient(Protocol):
    """What the daemon needs from a Cloud Hypervisor API client."""

    def view(self) -> VmmView: ...

    def boot(self, action: BootVmm) -> None: ...

    def resize(self, vcpus: int | None, memory: int | None) -> None: ...


class VmmCallFailed(Exception):
    def __init__(self, error: VmmCallError) -> None:
        super().__init__(error.message)
        self.error = error


# What _vmm_calls returns once the VMM accepted a resize (core.RESIZED is a condition type).
VMM_ACCEPTED: Final = "resized"


class Daemon(Reconciler):
    resync_s = RESYNC_S

    def __init__(
        self,
        api: StatusApi,
        vms: Cache,
        pods: Cache,
        queue: Queue,
        metrics: Metrics,
        *,
        node_name: str,
        vmm_for_pod: Callable[[dict[str, Any], dict[str, Any]], VmmClient],
        config: KernelConfig,
        is_conflict: Callable[[BaseException], bool],
    ) -> None:
        super().__init__(queue, metrics, is_conflict)
        self.api, self.vms, self.pods = api, vms, pods
        self.node_name = node_name
        self.vmm_for_pod = vmm_for_pod
        self.config = config
        self.shared = SharedExecutor(api, vms.observe_write, metrics.resize_done)
        self._hold: dict[str, float] = {}
        self._unreachable: dict[str, float] = {}
        self._busy: dict[str, float] = {}  # key -> when its vCPU requests first got 429
        # key -> the pod whose VMM has answered: only a VMM that answered before can stop
        # answering (one that is still starting has no socket yet, which is no news).
        self._answered: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def on_vm(self, _event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        # The pod cache holds only this node's pods: a VM whose pod is not there is not ours.
        if self.pods.get(str(namespace), pod_name(str(name))) is not None:
            self.queue.add(f"{namespace}/{name}")

    def reconcile(self, key: str) -> float | None:
        namespace, _, name = key.partition("/")
        vm_obj = self.vms.get(namespace, name)
        if vm_obj is None:
            self._forget(key)
            return None
        pod_obj = owned_pod(vm_obj, self.pods.get(namespace, pod_name(name)))
        if pod_obj is None or (pod_obj.get("spec") or {}).get("nodeName") != self.node_name:
            self._forget(key)
            return None
        try:
            vm = parse_vm(vm_obj)
        except ValueError:
            return None
        pod = parse_pod(pod_obj)
        client = self.vmm_for_pod(pod_obj, vm_obj)
        vmm = self._remembered(key, pod.uid, client.view())
        actions = decide(vm, pod, vmm, self.config, time.time(), owner=Owner.DAEMON)
        if not actions:
            return None
        held = self._held(key)
        if held and any(isinstance(a, ResizeVmm | BootVmm) for a in actions):
            # A refused call is retried on the kernel's backoff, not on the next watch
            # event (our own status write would otherwise trigger an instant retry).
            return held
        vm_obj = self.shared.write_status(vm_obj, vm, actions)
        try:
            answered = self._vmm_calls(key, client, pod.name, vmm, actions)
        finally:
            # After the VMM call, not before: an Event is an API write the guest's step
            # need not wait for (issue 19).
            self.shared.record_events(vm_obj, vm, actions)
        if isinstance(answered, VmmCallError):
            return self._call_failed(key, vmm, answered)
        if answered == VMM_ACCEPTED:
            # A vCPU growth is done when vm.resize answers (Cloud Hypervisor starts the
            # threads first) and memory may be plugged already: look at once, as the echo
            # of a status write would (ADR 0019), not a poll interval later.
            view = self._remembered(key, pod.uid, client.view())
            return self._feed_back(key, view, hold=False, probe=(client, pod.name))
        if answered is not None:
            return self._feed_back(key, answered)
        return self.shared.requeue_after(actions)

    def _vmm_calls(
        self, key: str, client: VmmClient, pod: str, vmm: VmmView, actions: tuple[Action, ...]
    ) -> VmmCallError | VmmView | Literal["resized"] | None:
        """Make the daemon's VMM calls in the kernel's order. What the kernel must hear at
        once ends them: a refusal, or a probe's 204 (the view it then decides on); then
        :data:`VMM_ACCEPTED` if the VMM accepted a resize."""
        resized: Literal["resized"] | None = None
        for action in actions:
            try:
                if isinstance(action, BootVmm):
                    client.boot(action)
                    log.info("VMM booted", extra=kv(vm=key, pod=pod))
                elif isinstance(action, ResizeVmm):
                    client.resize(action.vcpus, action.memory)
                    if action.vcpus is not None:
                        with self._lock:
                            self._busy.pop(key, None)  # vCPU requests are taken again
                    if action.probe:
                        # 204 to the count already configured: the removal is done.
                        log.info("vCPU removal done", extra=kv(vm=key, vcpus=action.vcpus))
                        return evolve(vmm, probe_ok=True)
                    log.info(
                        "VMM resize requested",
                        extra=kv(vm=key, vcpus=action.vcpus, memory=action.memory),
                    )
                    resized = VMM_ACCEPTED
            except VmmCallFailed as failed:
                return failed.error
        return resized

    def _remembered(self, key: str, pod_uid: str | None, vmm: VmmView) -> VmmView:
        """``vmm`` with what this daemon remembers of it: when its socket first failed in
        a row (the kernel's deadline counts from there), and when its vCPU requests first
        answered 429 (a pending removal's probes back off from there). Kept in memory
        only: a restart starts the wait again, and backs off from the wait's start.

        A VMM that stops answering, and one that answers again, is logged once each: the
        kernel says nothing until its deadline, and a call that timed out has already
        cost seconds."""
        now = time.time()
        reachable = vmm.state is not VmmState.UNREACHABLE
        with self._lock:
            busy = self._busy.get(key)
            answered_before = key in self._answered and self._answered[key] == pod_uid
            if reachable:
                lost = self._unreachable.pop(key, None)
                self._answered[key] = pod_uid
            else:
                lost = self._unreachable.get(key)
                since = self._unreachable.setdefault(key, now)
        if answered_before and reachable and lost is not None:
            log.info("VMM answering again", extra=kv(vm=key, since_failed_s=round(now - lost, 3)))
        elif answered_before and not reachable and lost is None:
            log.warning("VMM stopped answering", extra=kv(vm=key, error=vmm.detail))
        if reachable:
            return vmm if busy is None else evolve(vmm, busy_since=busy)
        return evolve(vmm, unreachable_since=since, busy_since=busy)

    def _forget(self, key: str) -> None:
        """A VM, or its pod on this node, is gone: so is what this daemon remembers of
        its VMM (a new pod's VMM starts afresh)."""
        with self._lock:
            for memory in (self._hold, self._unreachable, self._busy, self._answered):
                memory.pop(key, None)

    def _call_failed(self, key: str, vmm: VmmView, error: VmmCallError) -> float | None:
        """Let the kernel decide what a VMM refusal means (retry, backoff, event)."""
        level = logging.INFO if error.kind is VmmCallErrorKind.BUSY else logging.WARNING
        log.log(level, "VMM call refused", extra=kv(vm=key, kind=error.kind, error=error.message))
        if error.kind is VmmCallErrorKind.BUSY:
            with self._lock:
                vmm = evolve(vmm, busy_since=self._busy.setdefault(key, time.time()))
        return self._feed_back(key, evolve(vmm, call_error=error))

    def _feed_back(
        self,
        key: str,
        vmm: VmmView,
        hold: bool = True,
        probe: tuple[VmmClient, str] | None = None,
    ) -> float | None:
        """Re-decide at once on what a VMM call just answered (its error, a probe's 204,
        or the VMM seen again after it accepted a resize), on the newest cached VM (our
        own status write included). Only status and events are carried out: a VMM call
        this decision asks for waits for the next reconcile (after its requeue, and held
        there after a refusal), so a VMM that accepts and does nothing costs a look per
        poll, never a loop. The one exception is ``probe``, given to the look right after
        an accepted resize: the probe of a vCPU removal it asks for is made at once, and
        its answer fed back once more (without ``probe``). A guest that ejected at once
        is then seen to have, not a backoff later (issue 19); one that has not costs one
        429."""
        namespace, _, name = key.partition("/")
        vm_obj = self.vms.get(namespace, name)
        pod_obj = self.pods.get(namespace, pod_name(name))
        if vm_obj is None or pod_obj is None:
            return None
        vm = parse_vm(vm_obj)
        if vmm.state is VmmState.UNOBSERVED:
            return None
        actions = decide(vm, parse_pod(pod_obj), vmm, self.config, time.time(), owner=Owner.DAEMON)
        vm_obj = self.shared.write_status(vm_obj, vm, actions)
        self.shared.record_events(vm_obj, vm, actions)
        if probe is not None:
            probes = tuple(a for a in actions if isinstance(a, ResizeVmm) and a.probe)
            client, pod = probe
            answered = self._vmm_calls(key, client, pod, vmm, probes) if probes else None
            if isinstance(answered, VmmCallError):
                return self._call_failed(key, vmm, answered)
            if answered is not None and answered != VMM_ACCEPTED:
                return self._feed_back(key, answered)
        after = self.shared.requeue_after(actions)
        if after is not None and hold:
            with self._lock:
                self._hold[key] = time.monotonic() + after
        return after

    def _held(self, key: str) -> float | None:
        with self._lock:
            until = self._hold.get(key)
            if until is None:
                return None
            left = until - time.monotonic()
            if left <= 0:
                del self._hold[key]
                return None
            return left
