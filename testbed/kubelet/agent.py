"""The simulated kubelet's adapter: the Kubernetes API and the VMM processes around the
pure model in :mod:`sim.kubelet`.

What it does, as a kubelet would:

- registers its Node (capacity, allocatable, Ready, ``kubernetes.io/hostname``) and
  renews its Lease in ``kube-node-lease``;
- binds pending pods that select this node, first fit on allocatable (there is no
  scheduler in chscale's stack; see ADR 0005) through ``pods/binding``;
- feeds every change of the pods bound here (and the model's own timer) to the model
  and carries out its effects: status writes (merge patches of the status subresource
  with a UID precondition), VMM starts and stops, events, and the grace-period-0 delete
  that confirms a terminated pod.

One thread owns the model; informer handlers only wake it, and so does a watcher that
polls the VMM processes for exits. The memory usage the model's Error rule needs (what
each VMM process holds, see :mod:`testbed.kubelet.vmm`) is read only for the pods it
names, on every sync while a decrease waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from adapters.k8s.client import (
    AlreadyExists,
    ApiError,
    Conflict,
    Kube,
    NotFound,
)
from adapters.k8s.events import EventRecorder
from adapters.k8s.informer import Informer
from apps.common.logs import kv
from core.quantity import format_bytes, format_millicores
from sim.kubelet import (
    DeletePod,
    Effect,
    Kubelet,
    KubeletConfig,
    RecordEvent,
    StartVmm,
    StopVmm,
    WritePodStatus,
    fits_node,
    node_labels,
    selects_node,
)

log = logging.getLogger("chscale.kubelet")

KUBELET_VERSION = "v1.35.0-chscale-sim"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
HEARTBEAT_S = 10.0  # lease renewals, as the kubelet's default nodeLeaseRenewInterval
NODE_STATUS_S = 60.0  # full node status, as nodeStatusReportFrequency
EXIT_POLL_S = 0.2  # how often the VMM processes are checked for exits
RESYNC_S = 30.0
RETRY_S = 1.0
BIND_RETRY_S = 5.0  # a refused binding waits this long, as the scheduler's backoff would
SYNC_TIMEOUT_S = 60.0
MAX_PODS = "110"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
_PENDING_SELECTOR = "spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed"


class Runtime(Protocol):
    def ensure(self, uid: str, ref: str) -> None: ...

    def stop(self, uid: str) -> None: ...

    def stop_all(self) -> None: ...

    def memory_usage(self, uid: str) -> int | None: ...

    def poll_exits(self) -> dict[str, int]: ...


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pod_ref(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


class KubeletAgent:
    def __init__(
        self,
        kube: Kube,
        config: KubeletConfig,
        runtime: Runtime,
        *,
        events: EventRecorder | None = None,
        clock: Callable[[], float] = time.time,
        heartbeat_s: float = HEARTBEAT_S,
        node_status_s: float = NODE_STATUS_S,
        namespace: str | None = None,
        bind: bool = True,
    ) -> None:
        """``namespace`` confines the kubelet to one namespace's pods (tests share one
        API server; a real kubelet serves every namespace). ``bind=False`` leaves binding
        to a running kube-scheduler, as a real kubelet does (ADR 0014)."""
        self.bind = bind
        self.kube = kube
        self.config = config
        self.runtime = runtime
        self.events = events or EventRecorder(kube, "kubelet", host=config.node_name)
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.node_status_s = node_status_s
        self.model = Kubelet(config)
        node = config.node_name
        pods = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        self.own = Informer(kube, pods, field_selector=f"spec.nodeName={node}", name=f"pods:{node}")
        self.pending = Informer(
            kube, pods, field_selector=_PENDING_SELECTOR, name="pods:unscheduled"
        )
        self._kick = threading.Event()
        self._stop = threading.Event()
        # VMM exits seen by the watcher, not yet handed to the model (uid -> exit code).
        self._exits: dict[str, int] = {}
        self._exits_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Pods we bound whose watch event has not arrived yet: they count for first fit.
        self._bound: dict[str, dict[str, Any]] = {}
        self._unfit: set[str] = set()
        # Pods whose binding the API server refused, and when to try them again: one
        # refused pod (say, in a namespace being deleted) must not hold up the others.
        self._bind_retry_at: dict[str, float] = {}
        self._node_uid: str | None = None
        self._ready_since: str | None = None
        self._registered_at: str | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.register_node()
        self.renew_lease()
        for informer in (self.own, self.pending):
            informer.add_handler(lambda _event, _obj: self._kick.set())
            informer.start()
        for informer in (self.own, self.pending):
            if not informer.wait_synced(SYNC_TIMEOUT_S):
                raise RuntimeError(f"node {self.config.node_name}: pod cache did not sync")
        threads = ((self._loop, "sync"), (self._heartbeat, "heartbeat"), (self._watch, "exits"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=f"kubelet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._kick.set()
        log.info(
            "kubelet started",
            extra=kv(
                node=self.config.node_name,
                cpu=format_millicores(self.config.cpu),
                memory=format_bytes(self.config.memory),
            ),
        )

    def stop(self) -> None:
        """Stop syncing, stop every VMM this process started, and report the node as no
        longer posting status (there is no node lifecycle controller to do it)."""
        self._stop.set()
        self._kick.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.own.stop()
        self.pending.stop()
        self.runtime.stop_all()
        with contextlib.suppress(ApiError):
            self._post_node_status(ready=False)
        log.info("kubelet stopped", extra=kv(node=self.config.node_name))

    def kick(self) -> None:
        """Ask for a sync now (tests and the informers use it)."""
        self._kick.set()

    # --- node and lease ------------------------------------------------------------------

    def register_node(self) -> None:
        name = self.config.node_name
        labels = node_labels(self.config)
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {},
        }
        try:
            node = self.kube.create("/api/v1/nodes", body)
            log.info("node registered", extra=kv(node=name))
        except AlreadyExists:
            node = self.kube.patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": labels}})
        self._node_uid = (node.get("metadata") or {}).get("uid")
        self._post_node_status(ready=True)
        self._lift_not_ready_taint()

    def _lift_not_ready_taint(self) -> None:
        """The API server taints a new Node not-ready; the node lifecycle controller
        lifts the taint once the node reports Ready, and there is no such controller
        here. The resourceVersion makes the write conditional: a conflict is re-read."""
        path = f"/api/v1/nodes/{self.config.node_name}"
        for _ in range(5):
            node = self.kube.get(path)
            taints = (node.get("spec") or {}).get("taints") or []
            kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
            if kept == taints:
                return
            version = node["metadata"]["resourceVersion"]
            body = {"metadata": {"resourceVersion": version}, "spec": {"taints": kept or None}}
            try:
                self.kube.patch(path, body)
                return
            except Conflict:
                continue

    def _post_node_status(self, ready: bool) -> None:
        stamp = _stamp(self.clock())
        if self._registered_at is None:
            self._registered_at = stamp
        if ready and self._ready_since is None:
            self._ready_since = stamp
        since = self._ready_since if ready else stamp
        if not ready:
            self._ready_since = None
        capacity = {
            "cpu": format_millicores(self.config.cpu),
            "memory": format_bytes(self.config.memory),
            "pods": MAX_PODS,
        }
        allocatable = {
            "cpu": format_millicores(self.config.allocatable_cpu),
            "memory": format_bytes(self.config.allocatable_memory),
            "pods": MAX_PODS,
        }
        conditions = [
            {
                "type": type_,
                "status": "False",
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": self._registered_at,
            }
            for type_, reason, message in (
                ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True" if ready else "Unknown",
                "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                "message": "kubelet is posting ready status"
                if ready
                else "Kubelet stopped posting node status.",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": since,
            }
        )
        status = {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.config.host_ip},
                {"type": "Hostname", "address": self.config.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "chscale simulated node",
                "containerRuntimeVersion": "chscale-vmm://1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.kube.patch(f"/api/v1/nodes/{self.config.node_name}/status", {"status": status})

    def renew_lease(self) -> None:
        name = self.config.node_name
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}"
        spec = {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": _micro(self.clock()),
        }
        try:
            self.kube.patch(path, {"spec": spec})
            return
        except NotFound:
            pass
        meta: dict[str, Any] = {"name": name, "namespace": LEASE_NAMESPACE}
        if self._node_uid:
            meta["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self._node_uid}
            ]
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}
        body["spec"] = spec
        leases = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        try:
            self.kube.create(leases, body)
        except NotFound:
            # A bare API server may not have made the namespace yet.
            with contextlib.suppress(AlreadyExists):
                self.kube.create(
                    "/api/v1/namespaces",
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": LEASE_NAMESPACE},
                    },
                )
            self.kube.create(leases, body)
        except AlreadyExists:
            self.kube.patch(path, {"spec": spec})

    def _heartbeat(self) -> None:
        last_status = self.clock()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew_lease()
                if self.clock() - last_status >= self.node_status_s:
                    self._post_node_status(ready=True)
                    last_status = self.clock()
            except ApiError as exc:
                log.warning(
                    "heartbeat failed", extra=kv(node=self.config.node_name, error=str(exc))
                )

    # --- the sync loop -------------------------------------------------------------------

    def _loop(self) -> None:
        wake_at: float | None = None
        while not self._stop.is_set():
            self._kick.wait(self._timeout(wake_at))
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                bind_at = self.bind_pending() if self.bind else None
                wake_at = self.sync_once()
                if bind_at is not None:
                    wake_at = bind_at if wake_at is None else min(wake_at, bind_at)
            except Exception:
                log.exception("sync failed", extra=kv(node=self.config.node_name))
                wake_at = self.clock() + RETRY_S

    def _timeout(self, wake_at: float | None) -> float:
        timeout = RESYNC_S
        if wake_at is not None:
            timeout = min(timeout, wake_at - self.clock())
        if self.model.usage_wanted():
            # A refused decrease is retried on every sync: one sync period at the latest.
            timeout = min(timeout, self.config.error_retry_s)
        return max(timeout, 0.0)

    def _watch(self) -> None:
        """Hand VMM exits to the sync loop as they happen."""
        while not self._stop.wait(EXIT_POLL_S):
            exits = self.runtime.poll_exits()
            if exits:
                with self._exits_lock:
                    self._exits.update(exits)
                self._kick.set()

    def sync_once(self) -> float | None:
        """One model step over the pods bound here; returns when to step again."""
        pods = self.own.list()
        usage = {}
        for uid in self.model.usage_wanted(pods):
            used = self.runtime.memory_usage(uid)
            if used is not None:
                usage[uid] = used
        with self._exits_lock:
            exits = dict(self._exits)
        out = self.model.step(self.clock(), pods, usage, exits)
        with self._exits_lock:
            for uid in exits:
                self._exits.pop(uid, None)
        retry = False
        # Events last: a real kubelet hands them to client-go's broadcaster, whose own
        # goroutine writes them, so they never hold up a pod status write. Written first,
        # two Events (ResizeStarted, ResizeCompleted) delayed every resize's status by two
        # round trips (measured in bench.e2e: about 12 ms of a 16 ms kubelet stage).
        for effect in sorted(out.effects, key=lambda e: isinstance(e, RecordEvent)):
            retry = not self._execute(effect) or retry
        if retry:
            return self.clock() + RETRY_S
        return out.wake_at

    def _execute(self, effect: Effect) -> bool:
        """Carry out one effect; False when it should be tried again soon."""
        ref = f"{effect.namespace}/{effect.name}"
        node = self.config.node_name
        if isinstance(effect, StartVmm):
            try:
                self.runtime.ensure(effect.uid, ref)
            except OSError as exc:
                log.error("vmm did not start", extra=kv(pod=ref, node=node, error=str(exc)))
            return True
        if isinstance(effect, StopVmm):
            self.runtime.stop(effect.uid)
            return True
        if isinstance(effect, RecordEvent):
            log.info(
                "pod event",
                extra=kv(pod=ref, node=node, reason=effect.reason, message=effect.message),
            )
            regarding = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"namespace": effect.namespace, "name": effect.name, "uid": effect.uid},
            }
            self.events.record(regarding, effect.type, effect.reason, effect.message)
            return True
        if isinstance(effect, WritePodStatus):
            return self._write_status(effect, ref)
        if isinstance(effect, DeletePod):
            body = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "preconditions": {"uid": effect.uid},
            }
            try:
                self.kube.request("DELETE", _pod_path(effect.namespace, effect.name), body)
                log.info("pod deleted", extra=kv(pod=ref, node=node))
            except (NotFound, Conflict):
                pass  # gone already, or a newer pod of the same name: not ours to delete
            except ApiError as exc:
                log.warning("pod delete failed", extra=kv(pod=ref, node=node, error=str(exc)))
            return True
        raise TypeError(f"unknown effect {effect!r}")

    def _write_status(self, effect: WritePodStatus, ref: str) -> bool:
        # The UID in the patch is a precondition: a new pod of the same name is refused.
        body = {"metadata": {"uid": effect.uid}, "status": effect.status}
        try:
            pod = self.kube.patch(f"{_pod_path(effect.namespace, effect.name)}/status", body)
        except NotFound:
            return True
        except ApiError as exc:
            log.warning(
                "pod status write failed",
                extra=kv(pod=ref, node=self.config.node_name, error=str(exc)),
            )
            self.model.status_write_failed(effect.uid)
            return False
        self.own.observe_write(pod)
        conditions = {
            c.get("type"): c.get("reason") or "True"
            for c in effect.status.get("conditions") or ()
            if c.get("type") in ("PodResizePending", "PodResizeInProgress")
        }
        log.info(
            "pod status written",
            extra=kv(
                pod=ref,
                node=self.config.node_name,
                phase=effect.status.get("phase"),
                observed_generation=effect.status.get("observedGeneration"),
                resize=",".join(f"{k}={v}" for k, v in conditions.items()) or "-",
            ),
        )
        return True

    # --- binding -------------------------------------------------------------------------

    def bind_pending(self) -> float | None:
        """First fit: bind, oldest first, each pending pod that selects this node and fits
        beside the pods already here. Returns when a refused binding is due again."""
        own = {p["metadata"]["uid"]: p for p in self.own.list()}
        pending = self.pending.list()
        waiting = {p["metadata"]["uid"] for p in pending}
        for uid in list(self._bound):
            if uid in own or uid not in waiting:
                del self._bound[uid]
        for uid in list(self._bind_retry_at):
            if uid not in waiting:
                del self._bind_retry_at[uid]
        now = self.clock()
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", _pod_ref(p)))
        for pod in pending:
            meta = pod["metadata"]
            uid = meta["uid"]
            if uid in self._bound or not selects_node(self.config, pod):
                continue
            if self._bind_retry_at.get(uid, now) > now:
                continue
            here = [*own.values(), *self._bound.values()]
            if not fits_node(self.config, here, pod):
                if uid not in self._unfit:
                    self._unfit.add(uid)
                    log.info(
                        "pod does not fit",
                        extra=kv(pod=_pod_ref(pod), node=self.config.node_name),
                    )
                continue
            if self._bind(pod):
                self._unfit.discard(uid)
                bound = {**pod, "spec": {**pod["spec"], "nodeName": self.config.node_name}}
                self._bound[uid] = bound
        return min(self._bind_retry_at.values(), default=None)

    def _bind(self, pod: dict[str, Any]) -> bool:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.config.node_name},
        }
        path = f"{_pod_path(meta['namespace'], meta['name'])}/binding"
        try:
            self.kube.create(path, body)
        except (Conflict, AlreadyExists, NotFound):
            return False  # bound elsewhere, or gone
        except ApiError as exc:
            # The scheduler's way: this pod waits and is tried again; the rest go on.
            log.warning(
                "pod binding refused",
                extra=kv(pod=_pod_ref(pod), node=self.config.node_name, error=str(exc)),
            )
            self._bind_retry_at[meta["uid"]] = self.clock() + BIND_RETRY_S
            return False
        self._bind_retry_at.pop(meta["uid"], None)
        log.info("pod bound", extra=kv(pod=_pod_ref(pod), node=self.config.node_name))
        return True
